"""The entropy rule of multi-exit members: anchors, temperatures, calibrated thresholds, and its figures.

At exit k a query stops when the entropy of softmax(cos(embedding, anchors) / T_k) is at most threshold k;
the last edge exit always answers, unless the rule escalates: a last-exit entropy above `escalate_above`
sends the image to the cloud.  Anchors are the shared classifier's prototypes (labeled families, by default)
or k-means centres of the cloud's training embeddings (`anchors_from: kmeans`, and unlabeled data); T_k is
fitted on training images.  `calibrate` picks
the thresholds on the training data held out of training (`train.early_exit.held_out`, by default whole
classes, so the rule is fitted on classes the members never saw, as test classes are), never on test data.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hetero.data import calibration_split, gallery_and_queries
from hetero.errors import CalibrationError
from hetero.family import FamilyStore
from hetero.maths import apply_rule, correct_per_exit, escalation_threshold, rule_figures, spherical_kmeans
from hetero.models import MultiExitEmbedder, embed_images, exit_embeddings, exit_entropies

TEMPERATURES = torch.logspace(-3, 1, 81)
QUANTILES = torch.linspace(0, 1, 201)
# Rules a per-exit calibration tries beyond one quantile for every exit: a grid of each exit's own quantile, as
# fine as this many combinations allow (27 levels with 3 early exits, 7 with 5).
PER_EXIT_RULES = 20000


# ------------------------------------------------------------------------------------- after training


@torch.no_grad()
def fit_exit_rule(model: MultiExitEmbedder, cloud, head, train_images, settings) -> dict:
    """Set a multi-exit member's anchors and per-exit temperatures (buffers, so every export carries them).

    Each exit's temperature minimises the cross-entropy of its softmax over the anchors against the anchor
    nearest the cloud's embedding of the same training image: the entropy then measures how sure the exit is
    of where the cloud would put the image.
    """
    images = train_images.floats()
    reference = embed_images(cloud, images)
    if head is not None and settings.anchors_from == "prototypes":
        # the prototypes of the classes trained on (held-out classes have no images)
        prototypes = head.loss.W.detach().T.float()[torch.unique(train_images.labels)]
        anchors, source = F.normalize(prototypes, dim=1), "shared classifier prototypes"
    else:
        anchors, source = spherical_kmeans(reference, settings.anchors), "k-means of the cloud's training embeddings"
    model.anchors = anchors.clone()
    targets = (reference @ anchors.T).argmax(dim=1)
    embeddings = exit_embeddings(model, images)
    temperatures = []
    for k in range(len(model.exits)):
        similarity = embeddings[k] @ anchors.T
        losses = torch.stack([F.cross_entropy(similarity / t, targets) for t in TEMPERATURES])
        temperatures.append(float(TEMPERATURES[losses.argmin()]))
    model.temperatures = torch.tensor(temperatures)
    return {"anchors": {"source": source, "count": len(anchors)}, "temperatures": temperatures,
            "calibration_images_held_out": settings.held_out, "held_out_by": settings.held_out_by}


# ---------------------------------------------------------------------------------------------- the rule


# ------------------------------------------------------------------------------------------ calibration


def calibration_data(store: FamilyStore, member: str) -> dict:
    """Each exit's embeddings and entropies of the held-out training images as queries, and whether each
    retrieves right against the cloud's gallery: with classes held out, the queries are the second half of
    each held-out class's images (classes never trained on, as test queries are) and the gallery the first
    half of every training class's images, so a query meets as many classes as in a test gallery (against
    its own few held-out classes alone nearly every exit is right, and the rule stops too early on test
    data); with images held out, the gallery is the images trained on.  Without classes (unlabeled data),
    right means the cloud's own top answer."""
    entry = _multi_exit_entry(store, member)
    config, split = store.config(), store.split()
    settings = config.train.early_exit
    # what this family held out when it trained (families trained before `held_out_by` held out images)
    held_out_by = (entry.early_exit or {}).get("held_out_by", "images")
    keep, held = calibration_split(split.train, settings.held_out, held_out_by, config.data.split_seed)
    if len(held) == 0:
        raise CalibrationError(f"{store.root}: no training images were held out for calibration "
                               f"(train.early_exit.held_out is {settings.held_out}); retrain with a share such as 0.1")
    labels = split.train.labels
    if not torch.isin(labels[held], labels[keep]).any():  # whole classes held out: searched as a test split is
        gallery_rows, query_rows = gallery_and_queries(labels, split.train.names)
        query_rows = query_rows[torch.isin(query_rows, held)]
        if len(query_rows) == 0:
            raise CalibrationError(f"{store.root}: the {len(held)} images of the classes held out for calibration "
                                   f"give no query (a class needs 2 or more images); retrain with "
                                   f"train.early_exit.held_out_by: images")
        keep, held = gallery_rows, query_rows
    model, cloud = store.load_member(member), store.load_member(store.cloud.name)
    floats = split.train.floats()
    queries = exit_embeddings(model, floats[held])
    gallery = embed_images(cloud, floats[keep])
    cloud_queries = embed_images(cloud, floats[held])
    agreement = cloud_queries if len(split.train.class_names) < 2 else None
    return {"cloud_correct": correct_per_exit(cloud_queries[None], gallery, labels[held], labels[keep], agreement)[0],
            "entropies": exit_entropies(model, queries), "flops": [e.flops for e in entry.exits],
            "stages": [e.stage for e in entry.exits], "images": len(held), "gallery_images": len(keep),
            "embeddings": queries,
            "correct": correct_per_exit(queries, gallery, labels[held], labels[keep], agreement)}


def with_kmeans_anchors(store: FamilyStore, member: str, count: int) -> tuple[MultiExitEmbedder, dict]:
    """A trained multi-exit member loaded with class-free anchors: `count` k-means centres of the cloud's
    embeddings of the images it trained on, and its temperatures fitted again, as `anchors_from: kmeans`
    does at the end of training (its trunk and exits unchanged); and those facts for the manifest."""
    from dataclasses import replace

    entry = _multi_exit_entry(store, member)
    config, split = store.config(), store.split()
    settings = replace(config.train.early_exit, anchors_from="kmeans", anchors=count)
    held_out_by = (entry.early_exit or {}).get("held_out_by", "images")
    keep, _ = calibration_split(split.train, settings.held_out, held_out_by, config.data.split_seed)
    model, cloud = store.load_member(member), store.load_member(store.cloud.name)
    return model, fit_exit_rule(model, cloud, None, split.train.subset(keep), settings)


def refit_kmeans_anchors(store: FamilyStore, member: str, count: int) -> dict:
    """`with_kmeans_anchors`, written: the member's checkpoint again and its manifest record, its rule dropped
    (thresholds of the old entropies mean nothing for the new ones, so calibrate next)."""
    from hetero.family.store import save_weights
    from hetero.files import sha256_file

    with store.lock("calibrate"):
        store.reload()
        model, facts = with_kmeans_anchors(store, member, count)
        entry = store.member(member)
        path = store.checked_file(entry.checkpoint, f"checkpoint of member {member!r}")
        save_weights(path, model.state_dict(), {"member": member, "family": store.name})
        entry.checkpoint.sha256 = sha256_file(path)
        entry.early_exit = {key: value for key, value in {**(entry.early_exit or {}), **facts}.items()
                            if key != "rule"}
        store.save()
    return facts


def _multi_exit_entry(store: FamilyStore, member: str):
    entry = store.member(member)
    if entry.kind != "multi-exit":
        raise CalibrationError(f"member {member!r} of {store.name!r} has no exits (kind {entry.kind!r}); "
                               f"multi-exit members: {', '.join(m.name for m in store.members if m.exits) or 'none'}")
    return entry


def check_calibration_target(top1_loss: float | None, mean_flops: float | None, escalate: float,
                             thresholds: list[float] | None) -> None:
    if top1_loss is None and mean_flops is None and thresholds is None:
        raise CalibrationError("calibrate: give a target, --top1-loss (points of top-1 given up against the last "
                               "exit) or --mean-mflops, or explicit --thresholds")
    if not 0 <= escalate < 1:
        raise CalibrationError(f"--escalate: the share of queries sent to the cloud must be in [0, 1), got {escalate}")


def calibrate(store: FamilyStore, member: str, top1_loss: float | None = None, mean_flops: float | None = None,
              escalate: float = 0.0, thresholds: list[float] | None = None, per_exit: bool = False) -> dict:
    """Pick (or check given) thresholds for `member` on the held-out training images; store the rule.  With
    `per_exit`, each exit's threshold is searched on its own (see `candidate_thresholds`)."""
    check_calibration_target(top1_loss, mean_flops, escalate, thresholds)
    with store.lock("calibrate"):
        store.reload()
        data = calibration_data(store, member)
        H, correct, flops, stages = data["entropies"], data["correct"], data["flops"], data["stages"]
        last_top1 = correct[-1].float().mean().item()
        if thresholds is not None:
            chosen_thresholds = _checked_thresholds(thresholds, H, stages)
            escalate_above = _escalation(H, chosen_thresholds, escalate) if escalate > 0 else None
        else:
            chosen_thresholds, escalate_above = search_thresholds(H, correct, flops, stages, last_top1, top1_loss,
                                                                  mean_flops, escalate, data["cloud_correct"], per_exit)
        chosen = apply_rule(H, chosen_thresholds, escalate_above)
        figures = rule_figures(chosen, correct, flops, data["cloud_correct"])
        rule = {"thresholds": chosen_thresholds, "escalate_above": escalate_above,
                "target": {"top1_loss": top1_loss, "mean_mflops": mean_flops, "escalate": escalate,
                           "explicit": thresholds is not None, "per_exit": per_exit},
                "calibration": {"images": data["images"], "gallery_images": data["gallery_images"],
                                "top1_last_exit": last_top1,
                                "mean_mflops": figures["mean_flops"] / 1e6, "top1": figures["top1_edge"],
                                "shares": figures["shares"], "escalated": figures["escalated"],
                                "top1_system": figures["top1_system"]}}
        store.record_exit_rule(member, rule)
    return rule


def _checked_thresholds(thresholds: list[float], H: torch.Tensor, stages: list[int]) -> list[float]:
    if len(thresholds) != len(stages) - 1:
        raise CalibrationError(f"--thresholds: {len(thresholds)} given, but the member has {len(stages) - 1} exits "
                               f"before its last (stages {', '.join(map(str, stages[:-1]))}); the last always answers")
    chosen = apply_rule(H, thresholds)
    if (chosen < len(stages) - 1).sum() == 0:
        lowest = "; ".join(f"exit at stage {s}: lowest entropy {H[k].min().item():.4f} > threshold {t:g}"
                           for k, (s, t) in enumerate(zip(stages, thresholds)))
        raise CalibrationError(f"--thresholds {','.join(f'{t:g}' for t in thresholds)} make no query stop before "
                               f"the last exit on the {H.shape[1]} held-out training images ({lowest}); raise them")
    return [float(t) for t in thresholds]


def candidate_thresholds(H: torch.Tensor, per_exit: bool = False) -> torch.Tensor:
    """rules x early exits: the thresholds a calibration tries.  Every early exit at the same quantile q of its
    own entropies (q on a fine grid); with `per_exit` also each exit at its own quantile (every combination of
    a coarser grid), so an exit seldom right can stop nothing while a later one takes most queries.  Quantile 0
    stops nothing.  Per-exit rules fit the calibration queries more closely, which from a small set of them
    may not carry to new queries (benchmarks/early_exit.py reads both kinds on test queries)."""
    early = H.shape[0] - 1
    levels = max(3, min(len(QUANTILES), int(PER_EXIT_RULES ** (1 / max(early, 1)))))

    def thresholds(quantiles: torch.Tensor) -> torch.Tensor:  # len(quantiles) x early
        found = torch.stack([between(H[k].float(), H[k].float().quantile(quantiles)) for k in range(early)], dim=1)
        return torch.where(quantiles[:, None] > 0, found, torch.full_like(found, -1.0))

    if not per_exit:
        return thresholds(QUANTILES)
    grid = thresholds(torch.linspace(0, 1, levels))
    combinations = torch.cartesian_prod(*grid.T).reshape(-1, early)
    return torch.cat([thresholds(QUANTILES), combinations])


def between(values: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Each threshold moved halfway to the next of `values` above it, deciding `values` as it did.  A quantile
    often equals one calibration entropy; a device's entropy of that image differs from torch's in the last
    bits, so the image would stop at another exit by chance, and the export gate checks those very images.
    Above the largest value, the threshold is as far past it as the two largest are apart."""
    ordered = values.sort().values
    if len(ordered) < 2:
        return thresholds
    index = torch.searchsorted(ordered, thresholds, right=True)  # how many values the threshold stops
    below = ordered[(index - 1).clamp(min=0)]
    above = torch.where(index < len(ordered), ordered[index.clamp(max=len(ordered) - 1)],
                        2 * ordered[-1] - ordered[-2])
    return torch.where(index > 0, (below + above) / 2, thresholds)


def rules_figures(H: torch.Tensor, rules: torch.Tensor, correct: torch.Tensor, flops: list[int], escalate: float,
                  cloud_correct: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per rule (a row of `rules`), as `apply_rule` and `rule_figures` would give one at a time: top-1 of the
    edge answers and of the system, mean edge FLOPs, the share escalated, and the last-exit entropy above which
    queries are escalated (`_escalation`'s; NaN without `escalate`)."""
    exits, n = H.shape[0], H.shape[1]
    cost = torch.tensor(flops, dtype=torch.float64)
    found: dict[str, list] = {"top1_edge": [], "top1_system": [], "mean_flops": [], "escalated": [], "above": []}
    for chunk in rules.split(max(1, 2_000_000 // max(n * exits, 1))):
        stop = H[:-1][None] <= chunk[:, :, None]  # chunk x early exits x queries
        chosen = torch.where(stop.any(dim=1), stop.byte().argmax(dim=1), torch.full((), exits - 1))
        answered = correct.gather(0, chosen)
        reaching = chosen == exits - 1
        above = torch.full((len(chunk),), float("nan"))
        escalated = torch.zeros_like(reaching)
        if escalate > 0:
            ordered = torch.where(reaching, H[-1][None], torch.full((), -float("inf"))).sort(dim=1, descending=True)
            count = torch.minimum(reaching.sum(dim=1), torch.tensor(int(round(escalate * n))))
            last = ordered.values.gather(1, (reaching.sum(dim=1) - 1).clamp(min=0)[:, None])[:, 0] - 1.0
            # halfway between the least sure query kept and the surest one sent, as `between` does
            at = ordered.values.gather(1, torch.stack([count - 1, count], 1).clamp(0, n - 1)).mean(dim=1)
            above = torch.where(count < reaching.sum(dim=1), at, last)
            above[count == 0] = float("nan")
            escalated = reaching & (H[-1][None] > above[:, None])
        system = torch.where(escalated, cloud_correct[None], answered) if cloud_correct is not None else answered
        found["top1_edge"].append(answered.float().mean(dim=1))
        found["top1_system"].append(system.float().mean(dim=1))
        found["mean_flops"].append(cost[chosen].mean(dim=1))
        found["escalated"].append(escalated.float().mean(dim=1))
        found["above"].append(above)
    return {name: torch.cat(values) for name, values in found.items()}


def search_thresholds(H, correct, flops, stages, last_top1, top1_loss, mean_flops, escalate, cloud_correct,
                      per_exit: bool = False):
    """(thresholds, escalate_above): of the candidate rules (`candidate_thresholds`), the cheapest that meets
    the target (or the most accurate within a FLOPs budget).  With `escalate`, the least sure share of all
    queries at the last exit goes to the cloud, and top-1 is the system's."""
    if mean_flops is not None and mean_flops * 1e6 < flops[0]:
        raise CalibrationError(
            f"--mean-mflops {mean_flops:g} cannot be met: even stopping every query at the first exit (stage "
            f"{stages[0]}) costs {flops[0] / 1e6:.2f} MFLOPs, {flops[0] / 1e6 - mean_flops:.2f} above the budget")
    rules = candidate_thresholds(H, per_exit)
    found = rules_figures(H, rules, correct, flops, escalate, cloud_correct)
    loss = last_top1 - found["top1_system" if escalate > 0 else "top1_edge"]
    cost = found["mean_flops"]
    # with `escalate`, a rule must leave enough queries at the last exit to send that share to the cloud
    valid = found["escalated"] >= escalate - 1.0 / H.shape[1] if escalate > 0 else torch.ones(len(rules), dtype=bool)
    within = valid & (cost <= mean_flops * 1e6 * (1 + 1e-9) if mean_flops is not None else True)
    # top-1 figures are float32 shares: a loss of exactly the budget (0.1 of 100 queries) meets it
    meets = within & (loss <= top1_loss + 1e-6 if top1_loss is not None else True)
    if meets.any():
        first, then = (cost, loss) if top1_loss is not None else (loss, cost)
        best = _lexicographic_argmin(first, then, meets)
        above = found["above"][best]
        return rules[best].tolist(), None if above.isnan() else above.item()
    if not within.any():
        raise CalibrationError(f"--mean-mflops {mean_flops:g} cannot be met while sending {escalate:.0%} of queries "
                               f"to the cloud from the last exit (stage {stages[-1]}, {flops[-1] / 1e6:.2f} MFLOPs); "
                               f"lower --escalate or raise the budget")
    best = _lexicographic_argmin(loss, cost, within)
    above = None if found["above"][best].isnan() else found["above"][best].item()
    loss = loss[best].item()
    chosen = apply_rule(H, rules[best].tolist(), above)
    figures = rule_figures(chosen, correct, flops, cloud_correct)
    worst = max(range(len(stages)), key=lambda k: figures["shares"][k] * (1 - correct[k].float().mean().item()))
    why = (f"the exit at stage {stages[worst]} loses most (top-1 {correct[worst].float().mean().item():.3f} there "
           f"against {last_top1:.3f} at the last exit, {figures['shares'][worst]:.1%} of queries answered there)")
    if escalate > 0 and figures["escalated"] > 0:
        sent = chosen == len(stages)
        lost = (sent & correct[-1] & ~cloud_correct).float().mean().item()
        gained = (sent & ~correct[-1] & cloud_correct).float().mean().item()
        why = (f"of the {figures['escalated']:.1%} of queries sent to the cloud, it misses {lost:.4f} of all "
               f"queries that the last exit had right and gets {gained:.4f} right that the last exit missed; lower "
               f"--escalate or raise --top1-loss")
    raise CalibrationError(
        f"--top1-loss {top1_loss:g}{'' if mean_flops is None else f' with --mean-mflops {mean_flops:g}'} cannot be "
        f"met: the least top-1 loss{'' if mean_flops is None else ' within the FLOPs budget'} is {loss:.4f}, "
        f"{loss - top1_loss:.4f} over the budget; {why}")


def _lexicographic_argmin(first: torch.Tensor, then: torch.Tensor, allowed: torch.Tensor) -> int:
    """The first allowed index with the least `first`, ties broken by the least `then`."""
    inf = torch.full((), float("inf"), dtype=torch.float64)
    first = torch.where(allowed, first.double(), inf)
    tied = allowed & (first <= first.min() + 1e-9)
    return int(torch.where(tied, then.double(), inf).argmin())


def _escalation(H: torch.Tensor, thresholds: list[float], share: float) -> float | None:
    """The last-exit entropy above which the `share` of all queries least sure there go to the cloud."""
    return escalation_threshold(H[-1][apply_rule(H, thresholds) == H.shape[0] - 1], H.shape[1], share)
