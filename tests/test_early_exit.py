"""Multi-exit edge members: config, the trunk and its exits, training, the entropy rule and calibration, the
chained export and its verification, and the bad inputs of issue 15."""
from __future__ import annotations

import re
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hetero.config import parse_config
from hetero.errors import CalibrationError, ConfigError, ExportError
from hetero.models import Embedder, MultiExitEmbedder, count_flops, exit_flops

from .conftest import tiny_config


def multi_exit_config(exits="auto", **train) -> dict:
    config = tiny_config(epochs=8, **train)
    config["family"]["members"][1]["exits"] = exits
    return config


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("member, exits, words", [
    (1, [2, 7], "stage 7 does not exist; architecture 'resnet' has stages 1-4"),
    (1, [0], "stage 0 does not exist"),
    (0, "auto", "only an edge member can have exits"),
    (1, [], "at least one stage index"),
])
def test_bad_exits_are_refused_naming_the_member_and_value(member, exits, words):
    config = tiny_config()
    config["family"]["members"][member]["exits"] = exits
    with pytest.raises(ConfigError) as err:
        parse_config(config, "bad.yaml")
    assert f"family.members.{member}" in str(err.value) and words in str(err.value)


def test_library_backbones_and_independent_members_are_refused_with_exits():
    config = multi_exit_config()
    config["family"]["members"][1]["arch"] = "torchvision/resnet18"
    config["family"]["members"][1].update(width=1.0, depth=1.0)
    with pytest.raises(ConfigError, match="hetero's own architectures"):
        parse_config(config, "bad.yaml")
    with pytest.raises(ConfigError, match="train.compat: multi-exit member 'edge-a'"):
        parse_config(multi_exit_config(compat="none"), "bad.yaml")


# ------------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("arch, stages", [("resnet", 4), ("mobilenet", 5)])
def test_exits_chain_stage_by_stage_and_cost_little_over_the_plain_trunk(arch, stages):
    torch.manual_seed(0)
    model = MultiExitEmbedder(arch, 0.5, 0.5, 32, 40, [2]).eval()
    assert model.exits == [2, stages]  # the last stage is always an exit
    images = torch.rand(3, 3, 40, 40)
    exits = model.forward_exits(images)
    features, chained = images, []
    for index in range(len(model.exits)):
        embedding, entropy, features = model.stage(index, features)
        chained.append(embedding)
        assert entropy.shape == (3,) and (entropy >= 0).all()
    for a, b in zip(exits, chained):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(model(images), exits[-1])
    assert torch.allclose(exits[0].norm(dim=1), torch.ones(3))
    flops = exit_flops(model)
    assert flops == sorted(flops) and flops[0] < flops[-1] / 2
    plain = count_flops(Embedder(arch, 0.5, 0.5, 32, 40))
    assert plain < flops[-1] < 1.05 * plain  # the exit machinery: under 5% of the last exit


@pytest.mark.parametrize("arch", ["resnet", "mobilenet"])
def test_grid_exit_heads_see_where_features_are_and_export_as_plain_pooling(arch, tmp_path):
    from hetero import formats
    from hetero.models import ExitHead
    from hetero.profiles import load_profile

    torch.manual_seed(0)
    model = MultiExitEmbedder(arch, 0.5, 0.5, 32, 48, "auto", exit_head="grid").eval()
    assert [h.grid for h in model.heads][0] == 4 and model.heads[-1].grid == 1  # the last exit is the member
    plain = count_flops(Embedder(arch, 0.5, 0.5, 32, 48))
    assert plain < exit_flops(model)[-1] < 1.25 * plain  # the grid heads' cost is in the exits' FLOPs
    # two maps of equal channel means, their mass in opposite corners: a global average cannot tell them apart
    left, right = torch.zeros(1, 8, 12, 12), torch.zeros(1, 8, 12, 12)
    left[..., :6, :6], right[..., 6:, 6:] = 1.0, 1.0
    pooled, grid = ExitHead(8, 16).eval(), ExitHead(8, 16, "grid", 12).eval()
    torch.testing.assert_close(pooled(left), pooled(right))
    assert torch.nn.functional.cosine_similarity(grid(left), grid(right)).item() < 0.99

    folder = tmp_path / "chain"
    formats.get("onnx").exit_chain_function("server-onnx-fp32")(
        model, folder, load_profile("server-onnx-fp32"), {"input_size": 48, "embedding_dim": 32, "member": "m"})
    images = torch.rand(5, 3, 48, 48)
    ours, _ = formats.get("onnx").open_exit_chain(folder).exits(images.numpy())
    with torch.no_grad():
        theirs = torch.stack(model.forward_exits(images), dim=1)
    assert torch.nn.functional.cosine_similarity(torch.from_numpy(ours), theirs, dim=2).min() > 0.9999

    # int8: the convolutions' weights only; a dequantised MatMul (a head's projection, the entropy's anchors)
    # runs differently across the onnxruntime versions the profile declares, so they stay float32
    import onnx

    int8 = tmp_path / "int8"
    quantization = formats.get("onnx").exit_chain_function("rpi-onnx-int8")(
        model, int8, load_profile("rpi-onnx-int8"), {"input_size": 48, "embedding_dim": 32, "member": "m"}
    )["quantization"]
    assert quantization["quantized_ops"] == ["Conv"] and quantization["float32_nodes"] == "exit heads and entropy"
    graph = onnx.load(str(int8 / "all_exits.onnx")).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    fed = {n.op_type for n in graph.node if set(n.input) & dequantized}
    assert fed == {"Conv"}, fed


@pytest.mark.parametrize("anchors_from", ["prototypes", "kmeans"])
def test_a_labeled_family_takes_its_classes_prototypes_or_class_free_kmeans_anchors(anchors_from):
    from dataclasses import replace

    from hetero.config.train import EarlyExitConfig
    from hetero.data import procedural_glyphs
    from hetero.losses import SharedClassifier
    from hetero.training.exits import fit_exit_rule

    torch.manual_seed(0)
    images = procedural_glyphs(6, 4, 32, 0).subset(torch.arange(20))  # 5 classes trained on, the 6th held out
    model, cloud = MultiExitEmbedder("resnet", 0.25, 0.5, 16, 32, [2]).eval(), Embedder("resnet", 0.25, 0.5, 16, 32)
    head = SharedClassifier(6, 16)
    settings = replace(EarlyExitConfig(), anchors_from=anchors_from, anchors=8)
    facts = fit_exit_rule(model, cloud.eval(), head, images, settings)
    if anchors_from == "prototypes":  # one per class trained on, the classifier's own
        expected = torch.nn.functional.normalize(head.loss.W.detach().T[:5], dim=1)
        torch.testing.assert_close(model.anchors, expected)
        assert facts["anchors"] == {"source": "shared classifier prototypes", "count": 5}
    else:  # class-free: unit centres of the cloud's embeddings, as many as asked
        assert facts["anchors"] == {"source": "k-means of the cloud's training embeddings", "count": 8}
        assert torch.allclose(model.anchors.norm(dim=1), torch.ones(8))
    assert len(model.temperatures) == len(model.exits)
    with pytest.raises(ConfigError, match="anchors_from"):
        config = tiny_config()
        config["train"]["early_exit"] = {"anchors_from": "classes"}
        parse_config(config, "tiny")


def test_multi_exit_members_take_grid_heads_unless_told_and_an_exit_head_needs_exits():
    member = lambda config: parse_config(config, "tiny").family.members[1]  # noqa: E731
    assert member(multi_exit_config()).exit_head == "grid"
    pooled = multi_exit_config()
    pooled["family"]["members"][1]["exit_head"] = "pooled"
    assert member(pooled).exit_head == "pooled"
    assert member(tiny_config()).exit_head is None
    config = tiny_config()
    config["family"]["members"][1]["exit_head"] = "grid"
    with pytest.raises(ConfigError, match="exit_head: 'grid' shapes the heads of a multi-exit member; give `exits`"):
        parse_config(config, "tiny")
    # every member of a config saved before grid heads became the default says `pooled`: it loads as none
    config["family"]["members"][1]["exit_head"] = "pooled"
    assert member(config).exit_head is None


# ----------------------------------------------------------------------------------- the calibration search


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), queries=st.integers(1, 40), exits=st.integers(2, 4),
       escalate=st.sampled_from([0.0, 0.1, 0.3]))
def test_rules_scored_together_equal_each_rule_applied_alone(seed, queries, exits, escalate):
    from hetero.maths import apply_rule, rule_figures
    from hetero.training.exits import _escalation, candidate_thresholds, rules_figures

    generator = torch.Generator().manual_seed(seed)
    H = torch.rand(exits, queries, generator=generator).round(decimals=1)  # ties, as entropies of one anchor give
    correct = torch.rand(exits, queries, generator=generator) > 0.4
    cloud_correct = torch.rand(queries, generator=generator) > 0.2
    flops = [100 * (k + 1) for k in range(exits)]
    rules = candidate_thresholds(H, per_exit=True)
    rules = rules[torch.randperm(len(rules), generator=generator)[:25]]
    found = rules_figures(H, rules, correct, flops, escalate, cloud_correct)
    for i, thresholds in enumerate(rules.tolist()):
        above = _escalation(H, thresholds, escalate) if escalate > 0 else None
        alone = rule_figures(apply_rule(H, thresholds, above), correct, flops, cloud_correct)
        assert (above is None) == bool(found["above"][i].isnan())
        for name in ("top1_edge", "top1_system", "mean_flops", "escalated"):
            assert found[name][i].item() == pytest.approx(alone[name], abs=1e-9), name


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), queries=st.integers(8, 80), exits=st.integers(2, 4),
       escalate=st.sampled_from([0.0, 0.1, 0.3]), per_exit=st.booleans())
def test_a_calibrated_rule_sits_halfway_between_the_entropies_it_was_fitted_on(seed, queries, exits, escalate,
                                                                               per_exit):
    """A device computes an entropy a few bits off torch's: a threshold equal to a calibration image's entropy
    would move that image's exit by chance, and the chain's export gate checks those images."""
    from hetero.maths import apply_rule
    from hetero.training.exits import search_thresholds

    generator = torch.Generator().manual_seed(seed)
    H = torch.rand(exits, queries, generator=generator).mul(3)
    correct = torch.rand(exits, queries, generator=generator) < 0.8
    flops = [10 * (k + 1) for k in range(exits)]
    thresholds, above = search_thresholds(H, correct, flops, list(range(1, exits + 1)), 1.0, None, flops[-1] / 1e6,
                                          escalate, torch.ones(queries, dtype=torch.bool), per_exit)
    chosen = apply_rule(H, thresholds, above)

    def halfway(values, threshold):
        lower, upper = values[values <= threshold], values[values > threshold]
        if len(lower) > 0 and len(upper) > 0:  # (below every value: all sent to the cloud, a margin of 1)
            assert threshold == pytest.approx((lower.max() + upper.min()).item() / 2, abs=1e-6)

    for k, threshold in enumerate(thresholds):
        if threshold >= 0:
            halfway(H[k], threshold)
    if above is not None:
        assert chosen.eq(exits).float().mean().item() == pytest.approx(escalate, abs=1.01 / queries)
        halfway(H[-1][chosen >= exits - 1], above)


def test_an_escalation_budget_sends_the_share_asked_of_queries_less_sure_than_the_calibration():
    from hetero.maths import EscalationBudget, escalation_threshold

    generator = torch.Generator().manual_seed(0)
    calibration = torch.rand(1000, generator=generator)
    fixed = escalation_threshold(calibration, len(calibration), 0.1)
    # queries of new classes: less sure at the last exit; a third stopped at an earlier exit (NaN there)
    stream = torch.rand(3000, generator=generator) * 1.2 + 0.3
    stream[torch.rand(3000, generator=generator) < 1 / 3] = torch.nan
    assert (stream > fixed).float().mean().item() > 0.3  # the fixed threshold sends three times the share
    budget = EscalationBudget(0.1, fixed, window=500)
    sent = torch.cat([budget(batch) for batch in stream.split(64)])
    assert not sent[stream.isnan()].any()  # a query that stopped earlier never goes to the cloud
    assert sent.float().mean().item() == pytest.approx(0.1, abs=0.02)
    assert sent[500:].float().mean().item() == pytest.approx(0.1, abs=0.01)  # once the window holds new queries
    ranked = stream.nan_to_num(-1.0)[500:]  # and those it sends are the least sure
    assert ranked[sent[500:]].min() > ranked.quantile(0.8)


def test_a_budget_without_a_calibrated_start_fits_its_first_batch_on_itself():
    from hetero.maths import EscalationBudget

    budget = EscalationBudget(0.25, None, window=100)
    first = budget(torch.tensor([0.1, 0.9, 0.2, 0.3, float("nan"), 0.4, 0.5, 0.6]))
    assert first.tolist() == [False, True, False, False, False, False, False, True]  # the 2 least sure of 8


def test_the_gallery_margin_is_the_nearest_item_against_the_nearest_of_another_class():
    from hetero.gallery.query import unsure_by_margin

    def hits(*pairs):
        return [{"name": f"{cls}/{i}.png", "score": score} for i, (cls, score) in enumerate(pairs)]

    found = [hits(("a", 0.9), ("a", 0.8), ("b", 0.5)),  # margin 0.4
             hits(("a", 0.9), ("b", 0.85)),  # margin 0.05: the least sure
             hits(("c", 0.7), ("c", 0.6)),  # no other class among its neighbours: at least 0.1
             hits(("a", 0.9), ("b", 0.1))]  # answered at an earlier exit: never escalated
    unsure = unsure_by_margin(found, ["stage 4", "stage 4", "stage 4", "stage 2"], "stage 4")
    assert unsure[:3].tolist() == pytest.approx([-0.4, -0.05, -0.1]) and unsure[3].isnan()
    with pytest.raises(Exception, match="gallery item 'x.png' is in no class folder"):
        unsure_by_margin([[{"name": "x.png", "score": 1.0}]], ["stage 4"], "stage 4")


@pytest.mark.parametrize("share, window, words", [(1.5, 10, "must be in (0, 1), got 1.5"),
                                                  (0.1, 0, "at least 1 query, got 0")])
def test_a_bad_escalation_budget_is_refused_naming_the_value(share, window, words):
    from hetero.maths import EscalationBudget

    with pytest.raises(ValueError, match=re.escape(words)):
        EscalationBudget(share, None, window)


def test_an_escalation_budget_without_a_chain_is_refused_saying_what_escalates(tmp_path):
    from hetero.gallery import GalleryError, open_query_model

    with pytest.raises(GalleryError, match="--escalate-share 0.1: only an exported exit chain escalates"):
        open_query_model(None, artifact=tmp_path / "edge.onnx", escalate_share=0.1)


def test_calibration_leaves_out_an_exit_that_is_seldom_right_where_one_quantile_for_all_cannot():
    from hetero.maths import apply_rule, rule_figures
    from hetero.training.exits import QUANTILES, search_thresholds

    # exit 1 is sure of every query and right on none; exit 2 is sure of half and right on those; the last
    # exit is right on all.  One quantile for both early exits sends queries to exit 1 before exit 2 takes any.
    n = 100
    H = torch.stack([torch.linspace(0.0, 0.1, n), torch.cat([torch.zeros(n // 2), torch.ones(n // 2)]),
                     torch.linspace(0.0, 1.0, n)])
    correct = torch.stack([torch.zeros(n, dtype=torch.bool), H[1] == 0, torch.ones(n, dtype=torch.bool)])
    flops = [10, 20, 40]
    thresholds, above = search_thresholds(H, correct, flops, [1, 2, 3], 1.0, 0.0, None, 0.0, None, per_exit=True)
    figures = rule_figures(apply_rule(H, thresholds, above), correct, flops)
    assert figures["top1_edge"] == 1.0 and figures["shares"][0] == 0.0
    assert figures["mean_flops"] == pytest.approx(30.0)  # half at exit 2, half at the last
    shared = [rule_figures(apply_rule(H, [H[0].quantile(q).item(), H[1].quantile(q).item()] if q > 0 else [-1, -1]),
                           correct, flops) for q in QUANTILES.tolist()]
    assert min(f["mean_flops"] for f in shared if f["top1_edge"] == 1.0) == 40.0


def test_a_loss_budget_that_escalation_alone_breaks_says_what_the_cloud_missed():
    from hetero.training.exits import search_thresholds

    # the last exit is right on every query; the cloud is wrong on the least sure tenth: escalating it costs 0.1
    n = 100
    H = torch.stack([torch.full((n,), 5.0), torch.linspace(0.0, 1.0, n)])
    correct = torch.ones(2, n, dtype=torch.bool)
    cloud_correct = torch.arange(n) < 90
    with pytest.raises(CalibrationError, match=r"least top-1 loss is 0\.1000.*of the 10\.0% of queries sent to the "
                                               r"cloud, it misses 0\.1000 of all queries that the last exit had right "
                                               r"and gets 0\.0000 right"):
        search_thresholds(H, correct, [10, 20], [1, 2], 1.0, 0.05, None, 0.1, cloud_correct)
    thresholds, above = search_thresholds(H, correct, [10, 20], [1, 2], 1.0, 0.1, None, 0.1, cloud_correct)
    assert above is not None and (H[-1] > above).sum() == 10


# ------------------------------------------------------------------------------------ trained end to end


@pytest.fixture(scope="module")
def multi_exit_dir(tmp_path_factory):
    from hetero.training import train

    out = tmp_path_factory.mktemp("multi-exit")
    train(parse_config(multi_exit_config(early_exit={"self_distillation": 1.0}), "tiny"), out, progress=False)
    return out


@pytest.fixture
def multi_exit_copy(multi_exit_dir, tmp_path):
    target = tmp_path / "family"
    shutil.copytree(multi_exit_dir, target)
    return target


@pytest.mark.slow
def test_every_exit_is_trained_against_the_cloud_and_recorded(multi_exit_copy):
    from hetero.evaluate import evaluate
    from hetero.family import FamilyStore

    store = FamilyStore.open(multi_exit_copy)
    entry = store.member("edge-a")
    assert entry.kind == "multi-exit" and [e.stage for e in entry.exits] == [1, 2, 3, 4]
    assert [e.flops for e in entry.exits] == sorted(e.flops for e in entry.exits)
    assert entry.exits[-1].flops >= entry.flops  # the last exit is the member, plus the earlier heads
    # 4 of the 32 training classes (held_out 0.1, rounded up) are held out for calibration, every image of
    # them: the anchors are the prototypes of the 28 classes trained on
    assert entry.early_exit["anchors"] == {"source": "shared classifier prototypes", "count": 28}
    assert len(entry.early_exit["temperatures"]) == 4
    assert store.manifest.data.train_images == 28 * 8
    report = evaluate(store)
    assert {"edge-a@1", "edge-a@2", "edge-a@3", "edge-a"} <= set(report["matrix"])
    chance = report["chance_top1"]
    rows = report["early_exit"]["edge-a"]["exits"]
    # stage 1 of this tiny trunk has 8 channels: only the deeper exits are held to a floor
    assert all(row["top1_vs_cloud"] > 2 * chance for row in rows[1:]), rows
    assert rows[-1]["top1_vs_cloud"] > 5 * chance
    assert rows[-1]["top1_vs_cloud"] == report["matrix"]["edge-a"]["cloud"]["top1"]


@pytest.mark.slow
def test_calibration_meets_its_target_and_eval_reports_the_rule_and_the_split(multi_exit_copy):
    from hetero.evaluate import evaluate
    from hetero.training.exits import calibrate
    from hetero.family import FamilyStore

    store = FamilyStore.open(multi_exit_copy)
    rule = calibrate(store, "edge-a", top1_loss=0.05, escalate=0.1)
    found = rule["calibration"]
    assert found["images"] == 16  # the queries of the 4 held-out classes: the last 4 of each one's 8 images
    # searched among every training class, as test queries are among many: the first 4 images of each
    assert found["gallery_images"] == 4 * len(store.split().train.class_names) > 4 * 4
    assert found["top1_last_exit"] - found["top1_system"] <= 0.05 + 1e-6
    assert found["escalated"] == pytest.approx(0.1, abs=1 / 16 + 1e-6)
    assert FamilyStore.open(multi_exit_copy).member("edge-a").early_exit["rule"]["thresholds"] == rule["thresholds"]
    summary = evaluate(store)["early_exit"]["edge-a"]["rule"]
    assert sum(summary["shares"]) + summary["escalated"] == pytest.approx(1.0)
    assert 0 < summary["escalated"] < 0.3
    assert summary["mean_flops"] <= store.member("edge-a").exits[-1].flops
    # per-exit thresholds try every shared quantile too: the target met at no more FLOPs, and recorded
    shared = calibrate(store, "edge-a", top1_loss=0.05)
    own = calibrate(store, "edge-a", top1_loss=0.05, per_exit=True)
    assert found["top1_last_exit"] - own["calibration"]["top1"] <= 0.05 + 1e-6
    assert own["calibration"]["mean_mflops"] <= shared["calibration"]["mean_mflops"] + 1e-9
    assert FamilyStore.open(multi_exit_copy).member("edge-a").early_exit["rule"]["target"]["per_exit"] is True
    # a family trained before `held_out_by` held out the last image of every class: calibrated on those
    store.member("edge-a").early_exit.pop("held_out_by")
    store.save()
    assert calibrate(store, "edge-a", top1_loss=0.05)["calibration"]["images"] == 32


@pytest.mark.slow
def test_a_chains_export_gate_compares_exits_on_the_classes_its_rule_was_fitted_on(multi_exit_dir):
    """Images a member trained on are sure at its first exits, so few sit near a threshold, where an int8
    weight moves a query's exit; the gate checks the held-out classes, as unseen as a user's queries."""
    from hetero.data import calibration_split
    from hetero.exporter import exit_gate_images
    from hetero.family import FamilyStore
    from hetero.models import resize_to

    store = FamilyStore.open(multi_exit_dir)
    entry, split, config = store.member("edge-a"), store.split(), store.config()
    keep, held = calibration_split(split.train, config.train.early_exit.held_out, entry.early_exit["held_out_by"],
                                   config.data.split_seed)
    assert not set(split.train.labels[held].tolist()) & set(split.train.labels[keep].tolist())
    every = exit_gate_images(store, entry, 10_000)
    assert torch.equal(every, resize_to(split.train.floats()[held], entry.input_size))
    some = exit_gate_images(store, entry, 5)
    assert len(some) == 5 and all(any(torch.equal(image, row) for row in every) for image in some)


@pytest.mark.slow
def test_a_trained_member_takes_class_free_anchors_without_changing_its_exits(multi_exit_copy, capsys):
    from hetero.cli import main
    from hetero.data import calibration_split
    from hetero.family import FamilyStore
    from hetero.maths import spherical_kmeans
    from hetero.models import embed_images, exit_embeddings, exit_entropies

    store = FamilyStore.open(multi_exit_copy)
    images = store.split().test.floats()[:24]
    before = store.load_member("edge-a")
    sha = store.member("edge-a").checkpoint.sha256
    assert main(["calibrate", str(multi_exit_copy), "--kmeans-anchors", "16"]) == 2
    assert "give a target" in "".join(capsys.readouterr())
    assert main(["calibrate", str(multi_exit_copy), "--kmeans-anchors", "1", "--top1-loss", "0.05"]) == 2
    assert "--kmeans-anchors 1: give between 2 and 4096 centres" in "".join(capsys.readouterr())
    assert FamilyStore.open(multi_exit_copy).member("edge-a").checkpoint.sha256 == sha  # refused before writing
    assert main(["calibrate", str(multi_exit_copy), "--kmeans-anchors", "16", "--top1-loss", "0.05"]) == 0

    store = FamilyStore.open(multi_exit_copy)
    entry, after = store.member("edge-a"), store.load_member("edge-a")  # the new checkpoint's sha256 checked
    assert entry.early_exit["anchors"] == {"source": "k-means of the cloud's training embeddings", "count": 16}
    assert entry.early_exit["rule"]["target"]["top1_loss"] == 0.05  # calibrated again on the new entropies
    # the centres of the cloud's embeddings of the images the member trained on (the held-out classes left out)
    split, config = store.split(), store.config()
    keep, _ = calibration_split(split.train, 0.1, entry.early_exit["held_out_by"], config.data.split_seed)
    trained_on = embed_images(store.load_member("cloud"), split.train.floats()[keep])
    torch.testing.assert_close(after.anchors, spherical_kmeans(trained_on, 16))
    for old, new in zip(exit_embeddings(before, images), exit_embeddings(after, images)):
        torch.testing.assert_close(old, new)  # the trunk and the exits are the trained ones
    assert not torch.allclose(exit_entropies(before, exit_embeddings(before, images)),
                              exit_entropies(after, exit_embeddings(after, images)))


@pytest.mark.slow
def test_unmeetable_targets_and_thresholds_that_stop_nothing_say_which_exit(multi_exit_copy):
    from hetero.training.exits import calibrate
    from hetero.family import FamilyStore

    store = FamilyStore.open(multi_exit_copy)
    first = store.member("edge-a").exits[0].flops / 1e6
    with pytest.raises(CalibrationError, match=rf"first exit \(stage 1\) costs {first:.2f} MFLOPs, "
                                               rf"{first - 0.01:.2f} above the budget"):
        calibrate(store, "edge-a", mean_flops=0.01)
    with pytest.raises(CalibrationError, match=r"make no query stop before the last exit.*exit at stage 1: lowest "
                                               r"entropy"):
        calibrate(store, "edge-a", thresholds=[-1.0, -1.0, -1.0])
    with pytest.raises(CalibrationError, match="1 given, but the member has 3 exits before its last"):
        calibrate(store, "edge-a", thresholds=[1.0])
    with pytest.raises(CalibrationError, match="'edge-b' .* has no exits"):
        calibrate(store, "edge-b", top1_loss=0.01)
    assert store.reload().member("edge-a").early_exit.get("rule") is None  # nothing stored by a failed calibration


@pytest.mark.slow
def test_chained_export_verifies_per_exit_and_refuses_stages_of_another_export(multi_exit_copy):
    from hetero import formats
    from hetero.training.exits import calibrate
    from hetero.exporter import export_member
    from hetero.family import FamilyStore
    from hetero.profiles import load_profile
    from hetero.verify import verify

    store = FamilyStore.open(multi_exit_copy)
    calibrate(store, "edge-a", top1_loss=0.05)
    server = load_profile("server-onnx-fp32")
    with store.lock("export"):
        artifact = export_member(store, "edge-a", server)
        with pytest.raises(ExportError, match=r"profile 'android-executorch-fp32' exports executorch files, which "
                                              r"have no chained multi-exit export yet \(formats with one: onnx, "
                                              r"tflite, coreml\)"):
            export_member(store, "edge-a", load_profile("android-executorch-fp32"))
    folder = store.artifact_path(artifact)
    assert sorted(p.name for p in folder.iterdir()) == ["all_exits.onnx", "chain.json", "stage1.onnx", "stage2.onnx",
                                                        "stage3.onnx", "stage4.onnx"]
    chain = formats.get("onnx").open_exit_chain(folder)
    assert chain.metadata["early_exit"]["rule"]["thresholds"] == store.member("edge-a").early_exit["rule"]["thresholds"]
    report, _ = verify(store, profile="server-onnx-fp32", latency_runs=2)
    checks = {c["name"]: c for c in report["artifacts"][0]["checks"]}
    assert report["passed"], checks
    assert checks["parity"]["values"]["exit_agreement"] >= 0.99
    assert len(checks["retrieval"]["values"]["exits"]) == 4

    # A stage graph from another export of the same member: refused by the chain's sha256s.
    keep = folder.parent / "first"
    shutil.copytree(folder, keep)
    with store.lock("export"):
        export_member(store, "edge-a", server)
    shutil.copyfile(keep / "stage2.onnx", folder / "stage2.onnx")
    with pytest.raises(ExportError, match="stage2.onnx: sha256 .* comes from another export"):
        formats.get("onnx").open_exit_chain(folder)
    store.reload()
    report, _ = verify(store, profile="server-onnx-fp32", latency_runs=2)
    assert not report["passed"]


def test_an_int8_chain_is_held_at_export_to_what_verify_checks_and_falls_back_to_a_float_exit_decision(
        multi_exit_copy, monkeypatch):
    """Export runs verify's parity gate (cosine per exit and the exit the chained run stops at) on every declared
    runtime; an int8 chain that misses it is exported again with the heads and the entropy in float32, then with
    int8 weights in the last segment only (no exit decision before the last reads it), or refused with nothing
    written."""
    import onnx

    from hetero import exporter
    from hetero.training.exits import calibrate
    from hetero.family import FamilyStore
    from hetero.profiles import load_profile
    from hetero.verify import verify

    store = FamilyStore.open(multi_exit_copy)
    calibrate(store, "edge-a", top1_loss=0.05)
    int8 = load_profile("rpi-onnx-int8")
    real, calls = exporter._chain_refusal, []

    def first_refused(*args):
        calls.append(real(*args))
        refused = "its chained run stops at torch's exit for 96.9% of the 256 images checked"
        return refused if len(calls) == 1 else calls[-1]

    monkeypatch.setattr(exporter, "_chain_refusal", first_refused)
    with store.lock("export"):
        try:
            artifact = exporter.export_member(store, "edge-a", int8)
        except ExportError as refused:
            # On a CPU without VNNI (an AMD EPYC here) onnxruntime's int8 kernels can move even the smallest int8
            # scope under the gate: then the refusal names every scheme tried and nothing is written.
            assert "int8 weights in the trunk" in str(refused) and "nothing was written" in str(refused)
            assert not [a for a in FamilyStore.open(multi_exit_copy).manifest.artifacts if a.profile == "rpi-onnx-int8"]
            return
    assert calls[-1] is None  # the chain exported holds on the last runtime checked (and on every one before it)
    quantization = artifact.quantization
    assert quantization["fallback_from"] == "int8-weights everywhere" and "96.9%" in quantization["fallback_reason"]
    scope = quantization["int8_scope"]
    assert scope in ("trunk", "last segment"), quantization
    stage = onnx.load(str(store.artifact_path(artifact) / "stage4.onnx")).graph
    dequantized = {n.name for n in stage.node if n.op_type == "DequantizeLinear"}
    int8_nodes = [n.name for n in stage.node if n.op_type in ("Conv", "Gemm", "MatMul")
                  and n.input[1] + "_dequantize" in dequantized]
    # the head's and entropy's weights stay float, and with the last segment's scope every earlier segment's too
    assert int8_nodes and all(("segments." if scope == "trunk" else "segments.3") in name for name in int8_nodes)
    if scope == "trunk":
        assert quantization["float32_nodes"] == "exit heads and entropy"
    else:
        assert "int8 weights in the trunk:" in quantization["fallback_reason"]
        first = onnx.load(str(store.artifact_path(artifact) / "stage1.onnx")).graph
        assert not [n for n in first.node if n.op_type == "DequantizeLinear"]  # its exit decision is torch's
    report, _ = verify(store, profile="rpi-onnx-int8", latency_runs=2)
    for run in report["artifacts"]:  # every declared runtime here, the isolated onnxruntime 1.17.3 too
        checks = {c["name"]: c for c in run["checks"]}
        assert checks["parity"]["status"] == "pass" and checks["parity"]["values"]["exit_agreement"] >= 0.99, run

    monkeypatch.setattr(exporter, "_chain_refusal", lambda *args: "an exit's cosine to torch falls to 0.9000")
    before = sorted(p.name for p in store.artifact_path(artifact).iterdir())
    with store.lock("export"), pytest.raises(ExportError, match="falls to 0.9000; nothing was written"):
        exporter.export_member(store, "edge-a", int8)
    assert sorted(p.name for p in store.artifact_path(artifact).iterdir()) == before  # the earlier export kept


@pytest.mark.slow
def test_gallery_search_with_an_exported_chain_stops_where_torch_does_and_escalates_to_the_cloud(multi_exit_copy,
                                                                                               tmp_path):
    from PIL import Image

    from hetero import gallery as G
    from hetero.exporter import export_member
    from hetero.family import FamilyStore
    from hetero.maths import EscalationBudget, apply_rule
    from hetero.models import exit_embeddings, exit_entropies, resize_to
    from hetero.profiles import load_profile
    from hetero.training.exits import calibrate

    store = FamilyStore.open(multi_exit_copy)
    with store.lock("export"):  # a chain exported before calibration carries no rule: search says what to do
        uncalibrated = store.artifact_path(export_member(store, "edge-a", load_profile("server-onnx-fp32")))
    with pytest.raises(G.GalleryError, match="carries no calibrated exit rule; run `hetero calibrate`"):
        G.open_query_model(store, artifact=uncalibrated)
    exits = store.member("edge-a").exits  # a FLOPs budget that stops queries early
    rule = calibrate(store, "edge-a", mean_flops=(exits[1].flops + exits[-1].flops) / 2e6, escalate=0.25)
    with store.lock("export"):
        chain = store.artifact_path(export_member(store, "edge-a", load_profile("server-onnx-fp32")))
    split = store.split()
    for role, rows in (("gallery", split.gallery_index), ("queries", split.query_index)):
        for row in rows.tolist():
            path = tmp_path / role / f"{split.test.names[row]}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(split.test.images[row].permute(1, 2, 0).squeeze(-1).numpy()).save(path)
    G.build_gallery(store, tmp_path / "gallery", tmp_path / "g", batch_size=16)

    model = G.open_query_model(store, artifact=chain)
    found = G.search_images(tmp_path / "g", tmp_path / "queries", model, k=3, batch_size=16)
    # torch's choice of exit on the same decoded pixels
    torch_member = store.load_member("edge-a")
    floats = torch.stack([G.ImageFiles(G.list_images(tmp_path / "queries"), store.config().load_size)[i][1]
                          for i in range(len(found))]).float().div(255)
    with torch.no_grad():
        entropies = exit_entropies(torch_member, exit_embeddings(torch_member, resize_to(floats, 32)))
    expected = apply_rule(entropies, rule["thresholds"], rule["escalate_above"])
    names = ["stage 1", "stage 2", "stage 3", "stage 4", "cloud"]
    agreement = sum(q["exit"] == names[c] for q, c in zip(found, expected.tolist())) / len(found)
    assert agreement >= 0.98, agreement
    escalated = [q for q in found if q["exit"] == "cloud"]
    assert escalated and len(escalated) < len(found)
    assert any(q["exit"] in names[:3] for q in found)  # and some stopped before the last stage
    by_cloud = {q["query"]: q for q in G.search_images(tmp_path / "g", tmp_path / "queries",
                                                       G.open_query_model(store, member="cloud"), k=3)}
    assert all([r["row"] for r in q["results"]] == [r["row"] for r in by_cloud[q["query"]]["results"]]
               for q in escalated)  # an escalated query is the cloud's own query
    summary = G.exit_summary(found, model)
    assert sum(summary["shares"].values()) == pytest.approx(1.0)
    assert summary["shares"]["cloud"] == len(escalated) / len(found)
    assert summary["mean_edge_mflops"] < exits[-1].flops / 1e6

    # an escalation budget: batch by batch, the threshold fitted on the queries before, as torch's entropies say
    budgeted = G.open_query_model(store, artifact=chain, escalate_share=0.1, escalate_window=24)
    assert "10% of the last 24 queries" in budgeted.label
    found = G.search_images(tmp_path / "g", tmp_path / "queries", budgeted, k=3, batch_size=8)
    budget = EscalationBudget(0.1, rule["escalate_above"], 24)
    expected = apply_rule(entropies, rule["thresholds"])
    last = torch.where(expected == len(exits) - 1, entropies[-1], torch.nan)
    by_entropy = expected.clone()
    by_entropy[torch.cat([budget(batch) for batch in last.split(8)])] = len(exits)
    agreement = sum(q["exit"] == names[c] for q, c in zip(found, by_entropy.tolist())) / len(found)
    assert agreement >= 0.98, agreement

    # by the gallery margin: the queries sent are among those the rule leaves at the last exit, the least
    # sure of their batch by margin once the budget has seen one, and each is the cloud's own query
    by_margin = G.open_query_model(store, artifact=chain, escalate_share=0.25, escalate_window=24,
                                   escalate_by="margin")
    found = G.search_images(tmp_path / "g", tmp_path / "queries", by_margin, k=3, batch_size=8)
    sent = [i for i, q in enumerate(found) if q["exit"] == "cloud"]
    assert sent and all(expected[i] == len(exits) - 1 for i in sent)
    kept = [i for i, q in enumerate(found) if q["exit"] != "cloud"]
    assert sum(found[i]["exit"] == names[expected[i]] for i in kept) / len(kept) >= 0.98
    assert all([r["row"] for r in found[i]["results"]] == [r["row"] for r in by_cloud[found[i]["query"]]["results"]]
               for i in sent)
    reaching = (expected == len(exits) - 1).float().mean().item()  # only these can go: a share of all queries
    assert len(sent) / len(found) == pytest.approx(min(0.25, reaching), abs=0.1), reaching
    with pytest.raises(G.GalleryError, match="--escalate-by margin: ranks queries for an escalation budget"):
        G.open_query_model(store, artifact=chain, escalate_by="margin")


# ------------------------------------------------------------------------- chains on every edge format


def chain_environment(requirement: str):
    """The isolated runtime environment `requirement` names: found here or created from the package registry
    (as CI, on a fresh machine, does for every profile's runtimes); skipped, saying why, where it cannot be."""
    from hetero import runtimes

    try:
        return runtimes.ensure(requirement)
    except (runtimes.RuntimeEnvError, OSError) as err:
        pytest.skip(f"no {requirement} environment here and it cannot be created: {err}")


def export_to(family, profile: str):
    from hetero.exporter import export_member
    from hetero.family import FamilyStore
    from hetero.profiles import load_profile

    store = FamilyStore.open(family)
    with store.lock("export"):
        return store, export_member(store, "edge-a", load_profile(profile))


@pytest.mark.slow
def test_a_litert_chain_exports_and_verifies_per_exit_on_every_declared_runtime(multi_exit_copy):
    """android-litert-fp16 and -int8: stage<k>.tflite + all_exits.tflite + chain.json, each flatbuffer with its
    metadata; verify runs every exit and the chained run on ai-edge-litert here and on the tflite-runtime 2.14
    the profiles declare (in its isolated environment), the exit chosen being torch's for >= 99% of queries;
    stage files of two exports mixed are refused, naming the file."""
    from hetero import formats
    from hetero.export.litert import read_tflite_metadata
    from hetero.training.exits import calibrate
    from hetero.family import FamilyStore
    from hetero.verify import verify

    chain_environment("tflite-runtime==2.14.0")
    calibrate(FamilyStore.open(multi_exit_copy), "edge-a", top1_loss=0.05)
    store, artifact = export_to(multi_exit_copy, "android-litert-fp16")
    folder = store.artifact_path(artifact)
    assert sorted(p.name for p in folder.iterdir()) == ["all_exits.tflite", "chain.json", "stage1.tflite",
                                                        "stage2.tflite", "stage3.tflite", "stage4.tflite"]
    assert artifact.checked_on == ["ai-edge-litert 2.3.0", "tflite-runtime 2.14.0"]
    first, second = read_tflite_metadata(folder / "stage1.tflite"), read_tflite_metadata(folder / "stage2.tflite")
    assert first["chain"]["id"] == second["chain"]["id"] and first["layout"] == "NHWC"
    assert (first["inputs"], second["inputs"], second["outputs"]) == (
        ["images"], ["features"], ["embedding", "entropy", "next_features"])
    chain = formats.get("tflite").open_exit_chain(folder)
    assert chain.stages[0].runner.get_input_details()["args_0"]["shape"].tolist() == [1, 32, 32, 3]  # NHWC, batch 1

    report, _ = verify(store, profile="android-litert-fp16", latency_runs=2)
    runs = {run["runtime"]: {c["name"]: c for c in run["checks"]} for run in report["artifacts"]}
    assert set(runs) == {"ai-edge-litert 2.3.0", "tflite-runtime 2.14.0"} and report["passed"], runs
    for checks in runs.values():
        parity = checks["parity"]["values"]
        assert parity["exit_agreement"] >= 0.99 and min(parity["per_exit_min_cosine"]) >= 0.999, parity
        assert len(checks["retrieval"]["values"]["exits"]) == 4

    store, int8 = export_to(multi_exit_copy, "android-litert-int8")
    assert int8.quantization["scheme"] == "int8-weights" and "exit decision" in int8.quantization["why"]
    assert int8.quantization["int8_tensors"] > 0
    report, _ = verify(store, profile="android-litert-int8", latency_runs=2)
    assert len(report["artifacts"]) == 2 and report["passed"], report["artifacts"]
    for run in report["artifacts"]:
        parity = next(c for c in run["checks"] if c["name"] == "parity")["values"]
        assert parity["exit_agreement"] >= 0.99 and min(parity["per_exit_min_cosine"]) >= 0.99, parity

    keep = folder.parent / "first"
    shutil.copytree(folder, keep)
    export_to(multi_exit_copy, "android-litert-fp16")  # the float conversions are cached: a second export is quick
    shutil.copyfile(keep / "stage3.tflite", folder / "stage3.tflite")
    with pytest.raises(ExportError, match=r"stage3.tflite: sha256 .* comes from another export"):
        formats.get("tflite").open_exit_chain(folder)
    report, _ = verify(store.reload(), profile="android-litert-fp16", latency_runs=2)
    for run in report["artifacts"]:  # refused on every runtime, before anything runs (the folder's sha256 first)
        identity = next(c for c in run["checks"] if c["name"] == "identity")
        assert identity["status"] == "fail" and "file changed after export" in identity["detail"], identity


@pytest.mark.slow
@pytest.mark.parametrize("profile, requirement", [("rpi-onnx-int8", "onnxruntime==1.17.3"),
                                                  ("android-litert-fp16", "tflite-runtime==2.14.0")])
def test_an_isolated_runtime_runs_a_chain_as_this_process_does(multi_exit_copy, profile, requirement):
    """The worker of an isolated environment runs each graph; chain.json, the fixed-batch loop and the rule are
    hetero's own: every exit, every entropy and the exit each query stops at match the in-process runtime."""
    import numpy as np

    from hetero import formats, runtimes
    from hetero.exporter import calibration_images
    from hetero.training.exits import calibrate
    from hetero.family import FamilyStore

    from hetero.models import exit_embeddings, exit_entropies

    env = chain_environment(requirement)
    store = FamilyStore.open(multi_exit_copy)
    images, model = calibration_images(store, 32, 24), store.load_member("edge-a")
    # each early exit's median entropy on these images: queries stop at several exits
    medians = exit_entropies(model, exit_embeddings(model, images))[:-1].median(dim=1).values
    rule = calibrate(store, "edge-a", thresholds=medians.tolist())
    store, artifact = export_to(multi_exit_copy, profile)
    spec = formats.get(artifact.format)
    images = images.numpy()
    here = spec.open_exit_chain(store.artifact_path(artifact))
    there = runtimes.IsolatedExitChain(env, store.artifact_path(artifact), spec.read_metadata)
    try:
        assert there._worker.hello["version"] == env.version
        ours, theirs = here.exits(images), there.exits(images)
        np.testing.assert_allclose(theirs[0], ours[0], atol=1e-5)
        np.testing.assert_allclose(theirs[1], ours[1], atol=1e-4)
        chosen, answer, entropies = there.run_chain(images, rule["thresholds"], rule["escalate_above"])
        expected = here.run_chain(images, rule["thresholds"], rule["escalate_above"])
        np.testing.assert_array_equal(chosen, expected[0])
        np.testing.assert_allclose(answer, expected[1], atol=1e-5)
        np.testing.assert_allclose(entropies, expected[2], atol=1e-4)  # NaN where a stage did not run, alike
        assert len(set(chosen.tolist())) > 1  # the rule stopped queries at more than one exit
    finally:
        there.close()


@pytest.mark.slow
def test_a_coreml_chain_is_checked_for_structure_and_says_its_run_was_not_checked_here(multi_exit_copy):
    import platform

    from hetero.training.exits import calibrate
    from hetero.family import FamilyStore
    from hetero.verify import verify

    if platform.system() == "Darwin":
        pytest.skip("on macOS the CoreML chain runs: the ONNX and LiteRT tests cover the run")
    calibrate(FamilyStore.open(multi_exit_copy), "edge-a", top1_loss=0.05)
    store, artifact = export_to(multi_exit_copy, "iphone-coreml-int8")
    assert sorted(p.name for p in store.artifact_path(artifact).iterdir()) == [
        "all_exits.mlpackage", "chain.json", "stage1.mlpackage", "stage2.mlpackage", "stage3.mlpackage",
        "stage4.mlpackage"]
    assert artifact.checked_on == [] and "execute only on macOS" in artifact.unchecked_on[0]
    report, _ = verify(store, profile="iphone-coreml-int8", latency_runs=2)
    (run,) = report["artifacts"]
    checks = {c["name"]: c for c in run["checks"]}
    assert report["passed"] and checks["identity"]["status"] == "pass"
    assert checks["structure"]["status"] == "pass", checks["structure"]
    assert "stage2.mlpackage: in {'features': [1, 8, 16, 16]}" in checks["structure"]["detail"]
    for name in ("parity", "retrieval", "budget_latency"):
        assert checks[name]["status"] == "skip" and checks[name]["values"]["needs_platform"] == "macOS"
        assert "the chain's run" in checks[name]["detail"] and "was not checked on this host" in \
            checks[name]["detail"] and "(this host: Linux)" in checks[name]["detail"]
    assert report["counts"]["skip"] == report["counts"]["skip_platform"]  # --strict does not demand a Mac here

    # A stage whose input does not take what the stage before gives: the structure check says which.
    from hetero.verify.chains import chain_structure_problems

    graphs = [(name, facts) for name, facts in checks["structure"]["values"]["graphs"].items()]
    graphs[2][1]["inputs"] = {"features": [1, 16, 4, 4]}
    problems = chain_structure_problems(graphs, 4, 32, 32, "NCHW", "int8-weights")
    assert problems == ["stage3.mlpackage: input 'features' has shape [1, 16, 4, 4], but the stage before gives "
                        "features [1, 16, 8, 8]"]
