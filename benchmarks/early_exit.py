"""Early-exit edge students on Omniglot at the full recipe, over seeds: the anytime curve against separate
students, the FLOPs saved at edge-m's top-1, calibration on unseen classes, and the edge-to-cloud split.

Each seed trains one family: examples/omniglot.yaml as it is (its cloud, edge-m, edge-s, epochs, teacher cache
and losses) with three more edge members trained beside them in the same edge phase, on the same batches:

- `multi`: edge-m's trunk (resnet, width 0.625, depth 0.5, 48 px) with an exit after every stage (`exits: auto`);
- `single-w25`, `single-w375`: single-exit students of widths 0.25 and 0.375; with edge-s (0.5) they sit at
  about the FLOPs of the multi-exit member's first three exits.

Every member, the cloud included, trains without 10% of the training classes (train.early_exit.held_out,
`held_out_by: classes`): `hetero calibrate` fits the entropy rule on them, classes never trained on, as the
test characters are.  Per seed the record holds:

- each member's top-1 against the cloud gallery (M[member][cloud]) and MFLOPs, each exit's alone;
- the anytime curve: each early exit's threshold at the same quantile q of its entropies on the held-out
  classes, top-1 and mean FLOPs read on the test queries; the curve at each separate student's FLOPs;
- the per-exit curve: the rule `hetero calibrate --per-exit --top1-loss L` fits on the held-out classes (each
  exit its own threshold), per L, read on the test queries (with its loss on the held-out queries beside);
- the cheapest point of each curve within 0.5 points of edge-m's top-1 (goal: >= 1.5x fewer mean FLOPs than
  edge-m);
- calibration transfer: `--top1-loss 0.01` fitted on the held-out classes, the loss read on the test queries
  (goal: within 1 point of the target), and `--escalate 0.1` (goal: 8-12% of test queries escalated);
- the split (`--escalate 0.1` with the most accurate rule within the last exit's FLOPs): the system's top-1
  against the point halfway from edge-m's top-1 to the cloud's (goal: at or above it);
- class-free anchors: the rule's anchors as k-means centres of the cloud's training embeddings (64, 256 and
  1024 of them, refitted on a copy of the trained member) instead of the classifier's prototypes, and both
  calibrations' transfer to the test queries with them;
- the escalation budget (`hetero gallery search --escalate-share 0.1`, by the last exit's entropy and with
  `--escalate-by margin`): the split's rule with the threshold fitted again after each batch of a stream of
  the test queries to the queries before; the share escalated (goal: 8-12%) and the gap closed;
- which queries to escalate: exactly 10% of the test queries sent to the cloud, ranked by the last exit's
  entropy, by the gallery margin (nearest item against the nearest of another class), or by whether the last
  two exits answer different classes, and the share of the edge-m-to-cloud gap each closes (the share is
  fixed on the test queries: it compares the rankings only).

    python benchmarks/early_exit.py run --seeds 0 1 2                 # hetero's defaults; ~35 min a seed on 2 cores
    python benchmarks/early_exit.py run --seeds 0 --self-distillation 0     # the self-distillation lever
    python benchmarks/early_exit.py run --seeds 0 --held-out-by images      # the rule fitted on seen classes
    python benchmarks/early_exit.py run --seeds 0 --exit-head pooled        # earlier exits pooled to one average
    python benchmarks/early_exit.py run --quick --seeds 0             # a sixth of the epochs: a smoke test
    python benchmarks/early_exit.py measure --seeds 0 1 2             # measure trained seeds again
    python benchmarks/early_exit.py chains --seeds 0                  # each seed's chains on every profile
    python benchmarks/early_exit.py summary                           # mean and spread over seeds

One record per seed and lever (``benchmarks/results/early_exit/<machine>-sd<weight>-<held out by>-<exit
head>-seed<s>.json``); a run killed in the middle resumes from its last finished epoch (runs/early_exit/<key>).
The plot of the anytime curve goes beside each family (anytime.png).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import records  # noqa: E402
from recipe_seeds import TrainingClock, is_current  # noqa: E402

BENCHMARK = "early_exit"
RECIPE = "examples/omniglot.yaml"
RUNS = ROOT / "runs" / "early_exit"
SINGLES = {"single-w25": 0.25, "single-w375": 0.375}  # with the recipe's edge-s (0.5)
STUDENTS = [*SINGLES, "edge-s", "edge-m"]
QUANTILES = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]
ANCHOR_COUNTS = [64, 256, 1024]  # class-free anchors: k-means centres of the cloud's training embeddings
PER_EXIT_LOSSES = [0.0, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5]
LOSS_TARGET = 0.01  # the --top1-loss whose transfer from the held-out classes to the test queries is read
ESCALATE = 0.1
BUDGET_BATCH = 64  # queries per batch of the escalation budget's stream
# What a run may change (the levers of issue 28), and each one's value in records written before it was one.
DEFAULT_LEVER = {"self_distillation": 0.0, "held_out_by": "classes", "exit_head": "pooled"}


def hetero_defaults() -> dict:
    """Each lever as hetero sets it for a member with `exits` when the config says nothing."""
    from hetero.config.members import MemberConfig
    from hetero.config.train import EarlyExitConfig

    early_exit = EarlyExitConfig()
    member = MemberConfig(name="multi", role="edge", arch="resnet", exits="auto")
    return {"self_distillation": early_exit.self_distillation, "held_out_by": early_exit.held_out_by,
            "exit_head": member.exit_head}


def cell_key(lever: dict, seed: int, quick: bool) -> str:
    return records.key_of(records.machine_tag(records.machine()), f"sd{lever['self_distillation']:g}",
                          lever["held_out_by"], lever["exit_head"], f"seed{seed}", quick=quick)


def overrides_of(lever: dict, seed: int) -> list[str]:
    """The recipe's members plus `multi` and the two narrower students, and the early-exit settings, as
    overrides on examples/omniglot.yaml (so a change of the recipe makes the records stale)."""
    from hetero.config import read_yaml

    members = read_yaml(ROOT / RECIPE)["family"]["members"]
    edge_m = next(m for m in members if m["name"] == "edge-m")
    added = [{**edge_m, "name": "multi", "exits": "auto", "exit_head": lever["exit_head"]}]
    added += [{**edge_m, "name": name, "width": width} for name, width in SINGLES.items()]
    settings = {"held_out": 0.1, "held_out_by": lever["held_out_by"], "self_distillation": lever["self_distillation"]}
    return [f"family.members={json.dumps(members + added)}", f"train.early_exit={json.dumps(settings)}",
            f"train.seed={seed}"]


# ------------------------------------------------------------------------------------------- one seed


def read_test_queries(store, member: str) -> dict:
    """The test queries through `member`'s exits against the cloud's gallery: each exit's embeddings,
    entropies and whether it retrieves right, and whether the cloud's own query does."""
    from hetero.maths import correct_per_exit
    from hetero.models import embed_images, exit_embeddings, exit_entropies

    split = store.split()
    model, cloud = store.load_member(member), store.load_member(store.cloud.name)
    images = split.test.floats()
    q, g, labels = split.query_index, split.gallery_index, split.test.labels
    exits, gallery = exit_embeddings(model, images[q]), embed_images(cloud, images[g])
    return {"exits": exits, "gallery": gallery, "query_labels": labels[q], "gallery_labels": labels[g],
            "entropies": exit_entropies(model, exits),
            "correct": correct_per_exit(exits, gallery, labels[q], labels[g]),
            "cloud_correct": correct_per_exit(embed_images(cloud, images[q])[None], gallery, labels[q], labels[g])[0]}


def anytime_curves(store, member: str, held: dict, test: dict) -> tuple[list[dict], list[dict]]:
    """Two curves of (mean MFLOPs, top-1 vs the cloud gallery, shares) on the test queries, each rule fitted
    on the held-out calibration queries: one quantile q of each early exit's entropies for all of them; and
    the rule `hetero calibrate --per-exit --top1-loss L` picks (each exit its own threshold), per loss L."""
    from hetero.maths import apply_rule, rule_figures
    from hetero.training.exits import search_thresholds

    flops, stages = held["flops"], held["stages"]

    def on_test(thresholds: list[float]) -> dict:
        figures = rule_figures(apply_rule(test["entropies"], thresholds), test["correct"], flops)
        return {"mean_mflops": figures["mean_flops"] / 1e6, "top1": figures["top1_edge"],
                "shares": [round(s, 3) for s in figures["shares"]]}

    shared = [{"q": quantile, **on_test([held["entropies"][k].quantile(quantile).item() if quantile > 0 else -1.0
                                         for k in range(len(flops) - 1)])} for quantile in QUANTILES]
    H, right = held["entropies"], held["correct"]
    last = right[-1].float().mean().item()
    per_exit = []
    for loss in PER_EXIT_LOSSES:
        thresholds, _ = search_thresholds(H, right, flops, stages, last, loss, None, 0.0, None, per_exit=True)
        fitted = rule_figures(apply_rule(H, thresholds), right, flops)
        per_exit.append({"top1_loss": loss, **on_test(thresholds), "held_out_top1_loss": last - fitted["top1_edge"]})
    return shared, per_exit


def class_free_anchors(store, member: str, held: dict, test: dict, edge_m: float, cloud_top1: float) -> dict:
    """The entropy rule with class-free anchors, per count in ANCHOR_COUNTS: k-means centres of the cloud's
    embeddings of the images trained on (what unlabeled families get) instead of the shared classifier's
    prototypes, the anchors and temperatures refitted on the loaded member as `hetero calibrate
    --kmeans-anchors` does (the family is not changed).  Both calibrations fitted on the held-out classes and
    read on the test queries, as for the prototypes: the top-1 loss of `--top1-loss LOSS_TARGET`, and the
    share escalated, the system's top-1 and the gap closed with `--escalate ESCALATE` (the most accurate rule
    within the last exit's FLOPs)."""
    from hetero.maths import apply_rule, rule_figures
    from hetero.models import exit_entropies
    from hetero.training.exits import search_thresholds, with_kmeans_anchors

    flops, stages, right = held["flops"], held["stages"], held["correct"]
    last, last_test = right[-1].float().mean().item(), test["correct"][-1].float().mean().item()
    found = {}
    for count in ANCHOR_COUNTS:
        model, _ = with_kmeans_anchors(store, member, count)
        H, H_test = exit_entropies(model, held["embeddings"]), exit_entropies(model, test["exits"])
        thresholds, _ = search_thresholds(H, right, flops, stages, last, LOSS_TARGET, None, 0.0, None)
        loss_test = last_test - rule_figures(apply_rule(H_test, thresholds), test["correct"], flops)["top1_edge"]
        thresholds, above = search_thresholds(H, right, flops, stages, last, None, flops[-1] / 1e6, ESCALATE,
                                              held["cloud_correct"])
        split_test = rule_figures(apply_rule(H_test, thresholds, above), test["correct"], flops, test["cloud_correct"])
        found[f"kmeans-{count}"] = {
            "top1_loss_test": loss_test, "escalated_test": split_test["escalated"],
            "top1_system": split_test["top1_system"],
            "gap_closed": (split_test["top1_system"] - edge_m) / (cloud_top1 - edge_m) if cloud_top1 > edge_m else None}
    return found


def escalation_rankings(test: dict, edge_m: float, cloud_top1: float) -> dict:
    """Which queries to send to the cloud, each signal given exactly ESCALATE of the test queries (the share
    fixed on the test queries themselves, so only the ranking is compared): the last exit's entropy (the
    rule's); the gallery margin (the last exit's similarity to its nearest gallery item minus that to the
    nearest item of another class; smaller is less sure); and the last two exits' disagreement (their
    nearest gallery items of different classes first, each group ranked by the cosine between the two exits'
    embeddings, lower less sure).  The last two need the gallery's classes, which the entropy rule does not.
    System top-1: escalated queries answered by the cloud's own query, the others by the last exit."""
    last, before = test["exits"][-1], test["exits"][-2]
    labels = test["gallery_labels"]
    similarity = last @ test["gallery"].T
    nearest = similarity.argmax(dim=1)
    same_class = labels[None] == labels[nearest][:, None]
    margin = similarity.max(dim=1).values - similarity.masked_fill(same_class, -2.0).max(dim=1).values
    # cosines lie in [-1, 1], so a disagreement (+3) outranks every agreement
    disagree = (labels[(before @ test["gallery"].T).argmax(dim=1)] != labels[nearest]).float()
    disagreement = 3 * disagree - (last * before).sum(dim=1)
    count = int(round(ESCALATE * len(last)))
    found = {"share": count / len(last), "last_two_exits_disagree": disagree.mean().item()}
    for name, unsure in (("entropy", test["entropies"][-1]), ("gallery_margin", -margin),
                         ("exit_disagreement", disagreement)):
        chosen = unsure.topk(count).indices
        system = test["correct"][-1].clone()
        system[chosen] = test["cloud_correct"][chosen]
        top1 = system.float().mean().item()
        found[name] = {"top1_system": top1,
                       "gap_closed": (top1 - edge_m) / (cloud_top1 - edge_m) if cloud_top1 > edge_m else None}
    return found


def escalation_budget(rule: dict, test: dict, exits: int, edge_m: float, cloud_top1: float, flops: list[int]
                      ) -> dict:
    """The split's rule with `hetero gallery search --escalate-share ESCALATE` (hetero.maths.EscalationBudget,
    its default window), by the last exit's entropy (starting at the calibrated threshold) and by the gallery
    margin (`--escalate-by margin`, from the nearest MARGIN_NEIGHBOURS items as the search has them): the test
    queries as a stream in a seeded random order, BUDGET_BATCH at a time, the threshold fitted again after
    each batch to the queries before.  Per ranking: the share escalated on the test queries (overall, and once
    the window holds only test queries), the system's top-1 and the share of the edge-m-to-cloud gap closed."""
    import torch

    from hetero.gallery.query import MARGIN_NEIGHBOURS
    from hetero.maths import EscalationBudget, apply_rule, gallery_margin, rule_figures

    H = test["entropies"]
    order = torch.randperm(H.shape[1], generator=torch.Generator().manual_seed(0))
    chosen = apply_rule(H, rule["thresholds"])[order]
    reaching = chosen == exits - 1
    scores, items = (test["exits"][-1][order] @ test["gallery"].T).topk(MARGIN_NEIGHBOURS, dim=1)
    labels = test["gallery_labels"][items]
    margin = gallery_margin(scores, labels == labels[:, :1])
    found = {}
    for by, unsure, start in (("entropy", H[-1][order], rule["escalate_above"]), ("margin", -margin, None)):
        budget = EscalationBudget(ESCALATE, start)
        sent = torch.cat([budget(batch) for batch in torch.where(reaching, unsure, torch.nan).split(BUDGET_BATCH)])
        figures = rule_figures(torch.where(sent, exits, chosen), test["correct"][:, order], flops,
                               test["cloud_correct"][order])
        steady = sent[budget.window:] if len(sent) > budget.window else None
        found[by] = {"escalated_test": figures["escalated"],
                     "escalated_after_one_window": None if steady is None else steady.float().mean().item(),
                     "top1_system": figures["top1_system"],
                     "gap_closed": (figures["top1_system"] - edge_m) / (cloud_top1 - edge_m)
                     if cloud_top1 > edge_m else None}
    return {"asked": ESCALATE, "window": budget.window, "batch": BUDGET_BATCH, **found}


def interpolate(curve: list[dict], mflops: float) -> float | None:
    """The curve's top-1 at `mflops`: linear between its points, or its best point at or below; None below
    its cheapest point."""
    points = sorted((r["mean_mflops"], r["top1"]) for r in curve)
    if mflops < points[0][0]:
        return None
    best = max(t for f, t in points if f <= mflops)
    for (f0, t0), (f1, t1) in zip(points, points[1:]):
        if f0 <= mflops <= f1 and f1 > f0:
            best = max(best, t0 + (t1 - t0) * (mflops - f0) / (f1 - f0))
    return best


def measure(store) -> dict:
    """Every figure of one trained family (see the module's docstring); calibrates `multi` twice."""
    from hetero.evaluate import evaluate
    from hetero.models import Embedder, count_flops
    from hetero.training.exits import calibrate, calibration_data

    report = evaluate(store)
    cloud = report["cloud"]
    top1 = {name: report["matrix"][name][cloud]["top1"] for name in report["matrix"]}
    mflops = {m.name: m.flops / 1e6 for m in store.members}
    exits = report["early_exit"]["multi"]["exits"]
    held, test = calibration_data(store, "multi"), read_test_queries(store, "multi")
    curve, per_exit = anytime_curves(store, "multi", held, test)
    students = {}
    for name in STUDENTS:
        at, fitted = interpolate(curve, mflops[name]), interpolate(per_exit, mflops[name])
        students[name] = {"mflops": mflops[name], "top1": top1[name], "curve_at_its_mflops": at,
                          "curve_minus_student": None if at is None else at - top1[name],
                          "per_exit_curve_minus_student": None if fitted is None else fitted - top1[name]}
    edge_m, cloud_top1 = top1["edge-m"], top1[cloud]

    def within_half_point(points: list[dict], by: str) -> dict | None:
        matching = [r for r in points if r["top1"] >= edge_m - 0.005]
        cheapest = min(matching, key=lambda r: r["mean_mflops"]) if matching else None
        return cheapest and {by: cheapest[by], "top1": cheapest["top1"], "mean_mflops": cheapest["mean_mflops"],
                             "times_fewer_mflops_than_edge_m": mflops["edge-m"] / cheapest["mean_mflops"]}
    last = exits[-1]["top1_vs_cloud"]

    rule = calibrate(store, "multi", top1_loss=LOSS_TARGET)
    on_test = evaluate(store)["early_exit"]["multi"]["rule"]
    transfer = {"target": LOSS_TARGET, "held_out": rule["calibration"]["top1_last_exit"] - rule["calibration"]["top1"],
                "test": last - on_test["top1_edge"], "test_mean_mflops": on_test["mean_flops"] / 1e6}
    # the most accurate rule within the last exit's FLOPs: what escalation alone does (a top-1 loss budget
    # cannot always be met once the cloud answers queries the last exit had right)
    rule = calibrate(store, "multi", mean_flops=store.member("multi").exits[-1].flops / 1e6, escalate=ESCALATE)
    on_test = evaluate(store)["early_exit"]["multi"]["rule"]
    split = {"asked": ESCALATE, "escalated_held_out": rule["calibration"]["escalated"],
             "escalated_test": on_test["escalated"], "top1_system": on_test["top1_system"],
             "top1_edge": on_test["top1_edge"], "mean_mflops": on_test["mean_flops"] / 1e6,
             "shares": on_test["shares"], "halfway_edge_m_to_cloud": edge_m + (cloud_top1 - edge_m) / 2,
             "gap_closed": (on_test["top1_system"] - edge_m) / (cloud_top1 - edge_m) if cloud_top1 > edge_m else None}
    plain = count_flops(Embedder("resnet", 0.625, 0.5, 128, 48))
    budget = escalation_budget(rule, test, len(exits), edge_m, cloud_top1, flops=[e["flops"] for e in exits])
    return {
        "top1_vs_cloud": top1, "mflops": mflops,
        "exits_alone": {f"stage {e['stage']}": {"mflops": e["flops"] / 1e6, "top1_vs_cloud": e["top1_vs_cloud"]}
                        for e in exits},
        "anytime_curve": {f"q={r['q']:.2f}": {k: v for k, v in r.items() if k != "q"} for r in curve},
        "per_exit_curve": {f"loss={r['top1_loss']:g}": {k: v for k, v in r.items() if k != "top1_loss"}
                           for r in per_exit},
        "students": students,
        "within_half_point_of_edge_m": within_half_point(curve, "q"),
        "per_exit_within_half_point_of_edge_m": within_half_point(per_exit, "top1_loss"),
        "top1_loss_transfer": transfer, "split": split, "escalation_budget": budget,
        "escalation_rankings": escalation_rankings(test, edge_m, cloud_top1),
        "class_free_anchors": class_free_anchors(store, "multi", held, test, edge_m, cloud_top1),
        "exit_overhead": exits[-1]["flops"] / plain - 1,
    }


def plot(figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = sorted(figures["anytime_curve"].values(), key=lambda r: r["mean_mflops"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["mean_mflops"] for r in curve], [r["top1"] for r in curve], "o-", label="multi-exit, one quantile")
    per_exit = sorted(figures["per_exit_curve"].values(), key=lambda r: r["mean_mflops"])
    ax.plot([r["mean_mflops"] for r in per_exit], [r["top1"] for r in per_exit], "^--", label="multi-exit, per exit")
    for name, student in figures["students"].items():
        ax.plot([student["mflops"]], [student["top1"]], "D" if name == "edge-m" else "s", label=name)
    ax.axhline(figures["top1_vs_cloud"]["cloud"], ls="--", c="grey", label="cloud/cloud")
    ax.set_xlabel("mean MFLOPs per query (edge)")
    ax.set_ylabel("top-1 vs the cloud gallery")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_seed(lever: dict, seed: int, quick: bool) -> Path:
    from hetero.config import load_config
    from hetero.family import TRAIN_STATE, FamilyStore
    from hetero.training import train

    key, overrides = cell_key(lever, seed, quick), overrides_of(lever, seed)
    config = load_config(str(ROOT / RECIPE), overrides)
    if quick:
        config.train.epochs = max(1, config.train.epochs // 6)
        config.train.edge_epochs = max(1, (config.train.edge_epochs or config.train.epochs) // 6)
    out, clock_file = RUNS / key, RUNS / f"{key}.seconds.json"
    if not (out / "manifest.json").is_file():
        resume = (out / TRAIN_STATE).is_file()
        print(f"[{time.strftime('%H:%M:%S')}] {key}: {'resuming' if resume else 'training'} into {out}", flush=True)
        with TrainingClock(clock_file):
            train(config, out, resume=resume, overwrite=not resume and out.exists(), progress=False)
    seconds = json.loads(clock_file.read_text())["seconds"] if clock_file.is_file() else None
    store = FamilyStore.open(out)
    figures = {**measure(store), "train_s": seconds, "epochs": [config.train.epochs, config.train.edge_epochs]}
    plot(figures, out / "anytime.png")
    path = records.write(BENCHMARK, key, figures, wall_s=seconds or 0.0, recipe=RECIPE, overrides=overrides,
                         seeds=[seed], quick=quick, **lever, amp_bf16=store.manifest.training.amp_bf16)
    print(f"[{time.strftime('%H:%M:%S')}] {key} -> {path}", flush=True)
    return path


def verify_chains(lever: dict, seed: int, quick: bool) -> Path:
    """`multi`'s chain exported for every built-in profile and verified on every runtime version it declares
    (the isolated environments included): per runtime, the share of test queries whose exit equals torch's
    and each exit's lowest cosine to torch; a format without chains says why.  Needs the seed's family."""
    from hetero.errors import ConfigError, ExportError
    from hetero.exporter import export_member
    from hetero.family import FamilyStore
    from hetero.profiles import all_profiles
    from hetero.verify import verify

    key = cell_key(lever, seed, quick)
    store, started, found = FamilyStore.open(RUNS / key), time.perf_counter(), {}
    for profile in all_profiles():
        try:
            with store.lock("export"):
                artifact = export_member(store, "multi", profile)
        except (ConfigError, ExportError) as err:
            found[profile.name] = {"exported": False, "why": str(err)}
            continue
        report, _ = verify(store, profile=profile.name, latency_runs=5, all_runtimes=True)
        runtimes = {}
        for run in report["artifacts"]:
            parity = next(c for c in run["checks"] if c["name"] == "parity")
            values = parity.get("values") or {}
            runtimes[run["runtime"]] = {"status": parity["status"], "exit_agreement": values.get("exit_agreement"),
                                        "min_cosine": values.get("min_cosine"),
                                        **({"why": parity["detail"]} if parity["status"] == "skip" else {})}
        found[profile.name] = {"exported": True, "passed": report["passed"], "quantization": artifact.quantization,
                               "runtimes": runtimes}
        print(f"[{time.strftime('%H:%M:%S')}] {key} {profile.name}: passed {report['passed']}, "
              + ", ".join(f"{r} exit agreement {v['exit_agreement']}" for r, v in runtimes.items()), flush=True)
    agreements = [v["exit_agreement"] for f in found.values() for v in f.get("runtimes", {}).values()
                  if v["exit_agreement"] is not None]
    figures = {"profiles": found, "lowest_exit_agreement": min(agreements) if agreements else None,
               "runs_checked": len(agreements)}
    return records.write(BENCHMARK, f"{key}-chains", figures, wall_s=time.perf_counter() - started, recipe=RECIPE,
                         overrides=overrides_of(lever, seed), seeds=[seed], quick=quick, kind="chains", **lever)


# ------------------------------------------------------------------------------------------ over seeds


# Each headline figure: (name, how it is read from a record's figures); None where a seed has none.
HEADLINE = [
    ("edge-m top-1", lambda f: f["top1_vs_cloud"]["edge-m"]),
    ("multi last exit top-1", lambda f: f["top1_vs_cloud"]["multi"]),
    ("cloud top-1", lambda f: f["top1_vs_cloud"]["cloud"]),
    *[(f"exit at stage {stage} alone, top-1",
       lambda f, s=stage: f.get("exits_alone", {}).get(f"stage {s}", {}).get("top1_vs_cloud")) for stage in (1, 2, 3)],
    ("x fewer MFLOPs than edge-m within 0.5 pts of it",
     lambda f: (f["within_half_point_of_edge_m"] or {}).get("times_fewer_mflops_than_edge_m")),
    ("same, the per-exit curve", lambda f: (f.get("per_exit_within_half_point_of_edge_m") or {}).get(
        "times_fewer_mflops_than_edge_m")),
    ("curve - single-w375 (pts)", lambda f: _points(f["students"]["single-w375"]["curve_minus_student"])),
    ("per-exit curve - single-w375 (pts)",
     lambda f: _points(f["students"]["single-w375"].get("per_exit_curve_minus_student"))),
    ("curve - edge-s (pts)", lambda f: _points(f["students"]["edge-s"]["curve_minus_student"])),
    ("per-exit curve - edge-s (pts)",
     lambda f: _points(f["students"]["edge-s"].get("per_exit_curve_minus_student"))),
    ("top-1 loss on test, target 1 pt (pts)", lambda f: _points(f["top1_loss_transfer"]["test"])),
    ("escalated on test, 10% asked", lambda f: f["split"]["escalated_test"]),
    ("system top-1 with 10% to the cloud", lambda f: f["split"]["top1_system"]),
    ("share of the edge-m to cloud gap closed", lambda f: f["split"]["gap_closed"]),
    *[row for by in ("entropy", "margin") for row in (
        (f"escalated on test, a budget of 10% by {by}",
         lambda f, b=by: f.get("escalation_budget", {}).get(b, {}).get("escalated_test")),
        (f"gap closed, a budget of 10% by {by}",
         lambda f, b=by: f.get("escalation_budget", {}).get(b, {}).get("gap_closed")))],
    ("same, 10% of test queries by last-exit entropy",
     lambda f: f.get("escalation_rankings", {}).get("entropy", {}).get("gap_closed")),
    ("same, 10% of test queries by gallery margin",
     lambda f: f.get("escalation_rankings", {}).get("gallery_margin", {}).get("gap_closed")),
    ("same, 10% of test queries by the last two exits' disagreement",
     lambda f: f.get("escalation_rankings", {}).get("exit_disagreement", {}).get("gap_closed")),
    ("test queries whose last two exits answer different classes",
     lambda f: f.get("escalation_rankings", {}).get("last_two_exits_disagree")),
    *[row for count in ANCHOR_COUNTS for row in (
        (f"top-1 loss on test, target 1 pt, {count} k-means anchors (pts)",
         lambda f, c=count: _points(f.get("class_free_anchors", {}).get(f"kmeans-{c}", {}).get("top1_loss_test"))),
        (f"escalated on test, 10% asked, {count} k-means anchors",
         lambda f, c=count: f.get("class_free_anchors", {}).get(f"kmeans-{c}", {}).get("escalated_test")),
        (f"gap closed, {count} k-means anchors",
         lambda f, c=count: f.get("class_free_anchors", {}).get(f"kmeans-{c}", {}).get("gap_closed")))],
]


def lever_label(row: dict) -> str:
    return (f"self-distillation {row['self_distillation']:g}, held out by {row['held_out_by']}, "
            f"{row['exit_head']} exit heads")


def _points(value: float | None) -> float | None:
    return None if value is None else value * 100


def summary(found: list[dict], quick: bool = False) -> list[dict]:
    """Per machine and lever (self-distillation weight, what was held out): the mean and spread (max - min)
    of each headline figure over the seeds of the current records."""
    groups: dict[tuple, list[dict]] = {}
    for record in found:
        if record["quick"] == quick and is_current(record) and record.get("kind") != "chains":
            cell = (records.machine_tag(record["machine"]), *(record.get(k, v) for k, v in DEFAULT_LEVER.items()))
            groups.setdefault(cell, []).append(record)
    rows = []
    for (machine, *lever), cell in sorted(groups.items()):
        row = {"machine": machine, **dict(zip(DEFAULT_LEVER, lever)), "seeds": sorted(r["seeds"][0] for r in cell)}
        for name, read in HEADLINE:
            values = [v for v in (read(r["figures"]) for r in cell) if v is not None]
            row[name] = (statistics.mean(values), max(values) - min(values), len(values)) if values else None
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["run", "measure", "chains", "summary"],
                        help="run: train and measure each seed (a seed with a current record is skipped); measure: "
                             "measure each seed's trained family again (after the measurement changed); chains: "
                             "export and verify each seed's chains")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    product = hetero_defaults()
    parser.add_argument("--self-distillation", type=float, default=product["self_distillation"],
                        help="weight of each earlier exit's regression onto the last exit (default hetero's, "
                             f"{product['self_distillation']:g})")
    parser.add_argument("--held-out-by", choices=["classes", "groups", "images"], default=product["held_out_by"],
                        help=f"what calibration holds out of training (default hetero's, {product['held_out_by']})")
    parser.add_argument("--exit-head", choices=["pooled", "grid"], default=product["exit_head"],
                        help=f"how multi's earlier exits pool their stage (default hetero's, {product['exit_head']})")
    parser.add_argument("--quick", action="store_true", help="a sixth of the epochs: a smoke test, never a result")
    args = parser.parse_args(argv)
    lever = {"self_distillation": args.self_distillation, "held_out_by": args.held_out_by, "exit_head": args.exit_head}
    if args.mode == "run":
        for seed in args.seeds:
            key = cell_key(lever, seed, args.quick)
            if is_current(records.read(BENCHMARK, key)):
                print(f"{key}: record is current, skipped")
                continue
            run_seed(lever, seed, args.quick)
    if args.mode == "measure":
        for seed in args.seeds:
            if not (RUNS / cell_key(lever, seed, args.quick) / "manifest.json").is_file():
                raise SystemExit(f"measure: seed {seed} has no trained family in "
                                 f"{RUNS / cell_key(lever, seed, args.quick)}; `run --seeds {seed}` trains it")
            run_seed(lever, seed, args.quick)
    if args.mode == "chains":
        for seed in args.seeds:
            print(f"{verify_chains(lever, seed, args.quick)}")
    for row in summary(records.read_all(BENCHMARK), args.quick):
        print(f"{row['machine']} {lever_label(row)}, seeds {row['seeds']}:")
        for name, _ in HEADLINE:
            value = row[name]
            shown = "-" if value is None else f"{value[0]:.4g} (spread {value[1]:.3g}, {value[2]} seeds)"
            print(f"  {name}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
