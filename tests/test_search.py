"""Compatibility-aware student search (issue 16): the weight-sharing supernet, the Pareto/evolutionary search,
the students as members, and the bad inputs (budgets no sub-network meets, runtimes not here, a one-candidate
space, an interrupted search)."""
from __future__ import annotations

import json
import random
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from hetero.config import MemberConfig, parse_config
from hetero.errors import ConfigError
from hetero.evaluate import evaluate
from hetero.family import FamilyStore
from hetero.models import Embedder, build_member
from hetero.search import (Candidate, Supernet, layer_map, evolve, pareto_front, progressive_space, recalibrate,
                           sandwich, search, search_space, sort_channels)
from hetero.search import scoring as scoring_module
from hetero.search import supernet as supernet_module

from .conftest import tiny_config

SPACE = {"widths": [0.25, 0.375, 0.5], "depths": [0.5, 1.0], "input_sizes": [24, 32]}


def search_config(design="shared-cloud", targets=None, cloud=None, **settings) -> dict:
    config = tiny_config(epochs=1)
    config["family"]["members"] = [
        {"name": "cloud", "role": "cloud", "arch": "resnet", "width": 0.5, "depth": 1.0, "input_size": 32}]
    config["train"].update(edge_classification=0.0, losses={"relational": 5.0, "regression": 20.0},
                           matching_inputs=["mixup", "dihedral"])
    config["search"] = {"design": design, **SPACE, "epochs": 6, "evaluations": 6, "population": 3,
                        "latency_runs": 3, "bn_images": 128,
                        "targets": targets or [{"name": "edge-small", "profile": "server-onnx-fp32",
                                                "max_flops_vs_cloud": 0.3}], **settings}
    if cloud is not None:
        config["search"]["cloud"] = str(cloud)
    return config


# ----------------------------------------------------------------------------------------- the supernet


def _supernet(width=0.5, depth=1.0, size=32) -> Supernet:
    torch.manual_seed(0)
    return Supernet("resnet", Candidate(width, depth, size), 16, [0.5] * 3, [0.5] * 3).eval()


@pytest.mark.parametrize("candidate", [Candidate(0.25, 0.5, 24), Candidate(0.375, 1.0, 32), Candidate(0.5, 0.5, 16)])
def test_a_sub_network_is_a_slice_of_the_supernet_and_extracts_as_an_ordinary_member(candidate):
    supernet = _supernet()
    images = torch.rand(4, 3, 40, 40)
    extracted = supernet.extract(candidate)
    assert (extracted.width, extracted.depth, extracted.input_size) == (candidate.width, candidate.depth,
                                                                        candidate.input_size)
    with torch.no_grad():
        torch.testing.assert_close(supernet(candidate, images), extracted.eval()(
            torch.nn.functional.interpolate(images, size=candidate.input_size, mode="bilinear", antialias=True)))
    # Shared, not copied: training the sub-network moves the supernet's leading channels and nothing else.
    supernet.train()
    stem = supernet.model.backbone[0][0].weight
    supernet(candidate, images).sum().backward()
    kept = extracted.backbone[0][0].weight.shape[0]
    assert stem.grad[:kept].abs().sum() > 0 and stem.grad[kept:].abs().sum() == 0


def test_a_shallower_sub_network_keeps_the_first_blocks_of_each_stage():
    supernet = _supernet()
    shallow = supernet.build(Candidate(0.5, 0.5, 32))
    # resnet at depth 1.0 has 2 blocks per stage (layers 1-2, 3-4, 5-6, 7-8); at 0.5 one (layers 1-4).
    assert layer_map(shallow.backbone, supernet.model.backbone) == {0: 0, 1: 1, 2: 3, 3: 5, 4: 7}


def sorted_keeping_the_function(model):
    """`model` with trained-looking BatchNorm statistics and scales, its channels sorted; the sorting must
    not change what it computes."""
    for norm in model.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.weight.data.uniform_(0.1, 2.0)
            norm.bias.data.normal_()
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
    model.eval()
    images = torch.rand(4, 3, 32, 32)
    before = model(images)
    sort_channels(model)
    torch.testing.assert_close(model(images), before, atol=1e-5, rtol=1e-5)
    return model


@pytest.mark.parametrize("depth", [0.5, 1.0])
def test_channel_sorting_keeps_the_function_and_puts_important_channels_first(depth):
    torch.manual_seed(0)
    model = sorted_keeping_the_function(Embedder("resnet", 0.5, depth, 16, 32))
    stem = model.backbone[0][1].weight.abs()
    inner = model.backbone[1].conv1.weight.abs().sum(dim=(1, 2, 3))
    assert stem[:4].mean() > stem[-4:].mean() and torch.all(inner[:-1] >= inner[1:])


MOBILE = Candidate(0.5, 1.0, 32, 6.0, 7)  # the largest of an elastic mobilenet's space


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_mobilenet_sub_network_extracts_as_an_ordinary_registry_member(seed):
    """Random candidates of every gene: the extracted member is a plain mobilenet with its per-block options,
    and computes what the supernet computes for that candidate."""
    rng = random.Random(seed)
    candidate = Candidate(rng.choice([0.25, 0.375, 0.5]), rng.choice([0.5, 1.0]), rng.choice([16, 24, 32]),
                          rng.choice([3.0, 4.0, 6.0]), rng.choice([3, 5, 7]))
    torch.manual_seed(seed)
    supernet = Supernet("mobilenet", MOBILE, 16, [0.5] * 3, [0.5] * 3).eval()
    extracted = supernet.extract(candidate).eval()
    # An ordinary member of the registry: rebuilt from its config alone, the weights fit.
    config = MemberConfig(name="edge", arch="mobilenet", width=candidate.width, depth=candidate.depth,
                          input_size=candidate.input_size, **candidate.blocks("mobilenet"))
    rebuilt = build_member(config, 16).eval()
    rebuilt.load_state_dict(extracted.state_dict())
    images = torch.rand(3, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(supernet(candidate, images), rebuilt(
            torch.nn.functional.interpolate(images, size=candidate.input_size, mode="bilinear", antialias=True)))
    # The smaller kernel is the centre of the largest, the fewer hidden channels the leading ones.
    block = supernet.model.backbone[2].conv
    small = extracted.backbone[2].conv
    k, hidden = candidate.kernel, small[0][0].out_channels
    start = (7 - k) // 2
    torch.testing.assert_close(small[1][0].weight, block[1][0].weight[:hidden, :, start:start + k, start:start + k])
    assert small[1][0].kernel_size == (k, k) and hidden <= block[0][0].out_channels


def test_the_default_mobilenet_is_todays_and_per_block_options_change_only_their_blocks():
    from hetero.models import mobilenet_defaults

    ratios, kernels = mobilenet_defaults(1.0)
    assert ratios == [1, 4, 4, 4, 4, 4, 4, 4, 4, 4] and kernels == [3] * 10
    torch.manual_seed(0)
    plain = Embedder("mobilenet", 0.5, 1.0, 16, 32)
    torch.manual_seed(0)
    explicit = Embedder("mobilenet", 0.5, 1.0, 16, 32, blocks={"expand_ratios": ratios, "kernel_sizes": kernels})
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in explicit.state_dict().items())
    wide = Embedder("mobilenet", 0.5, 1.0, 16, 32, blocks={"expand_ratios": ratios[:-1] + [6], "kernel_sizes":
                                                           kernels[:-1] + [5]})
    changed = {k for k, v in wide.state_dict().items() if v.shape != plain.state_dict()[k].shape}
    assert changed and all(k.startswith("backbone.10.") for k in changed)


def test_sorting_a_mobilenets_expansion_keeps_the_function_and_puts_important_channels_first():
    torch.manual_seed(0)
    model = sorted_keeping_the_function(Supernet("mobilenet", MOBILE, 16, [0.5] * 3, [0.5] * 3).model)
    importance = model.backbone[2].conv[2].weight.abs().sum(dim=(0, 2, 3))
    assert torch.all(importance[:-1] >= importance[1:])


@pytest.mark.parametrize("member, words", [
    ({"expand_ratios": [4.0] * 3}, "expand_ratios: a mobilenet of depth 1 has 10 blocks, so one value per block (10); "
                                   "got 3"),
    ({"kernel_sizes": [3] * 9 + [4]}, "kernel_sizes: 4 is not a depthwise kernel size; one of 3, 5, 7"),
    ({"expand_ratios": [1.0] + [-2.0] * 9}, "expand_ratios: -2.0 is not an expansion ratio in (0, 16]"),
    ({"arch": "resnet", "kernel_sizes": [3] * 10}, "kernel_sizes: per-block options of the mobilenet architecture; "
                                                   "member 'edge-a' is 'resnet'"),
])
def test_bad_mobilenet_block_options_are_refused_naming_the_field_and_value(member, words):
    config = tiny_config()
    config["family"]["members"][1].update({"arch": "mobilenet", "depth": 1.0, **member})
    with pytest.raises(ConfigError) as err:
        parse_config(config, "family.yaml")
    assert words in str(err.value)


def test_recalibration_sets_batchnorm_statistics_from_the_images():
    model = _supernet().extract(Candidate(0.25, 0.5, 24))
    images = torch.rand(32, 3, 24, 24)
    recalibrate(model, images, batch_size=64)
    inputs = []
    hook = model.backbone[0][0].register_forward_hook(lambda m, i, o: inputs.append(o))
    with torch.no_grad():
        model(images)
    hook.remove()
    torch.testing.assert_close(model.backbone[0][1].running_mean, inputs[0].mean(dim=(0, 2, 3)))


def test_sandwich_and_progressive_schedules_pick_from_the_right_space():
    settings = type("S", (), SPACE)
    space = search_space(settings)
    assert len(space) == 12
    picks = sandwich(space, 2, random.Random(0))
    assert picks[0] == Candidate(0.5, 1.0, 32) and picks[1] == Candidate(0.25, 0.5, 24) and len(picks) <= 4
    first, middle, last = (progressive_space(space, epoch, 6) for epoch in (1, 3, 6))
    assert {(c.width, c.depth) for c in first} == {(0.5, 1.0)} and len(first) == 2
    assert {c.width for c in middle} == {0.5} and len(middle) == 4
    assert last == space


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=30))
def test_the_pareto_front_holds_exactly_the_undominated_points(pairs):
    points = [(float(lat), float(top), Candidate(0.5, 0.5, 16 + i)) for i, (lat, top) in enumerate(pairs)]
    front = pareto_front(points)
    on_front = {p[2] for p in front}

    def dominated(p):
        return any(q[0] <= p[0] and q[1] >= p[1] and (q[0], q[1]) != (p[0], p[1]) for q in points)

    assert all(not dominated(p) for p in front)
    # Off the front: dominated, or a duplicate of a front point's figures.
    assert all(dominated(p) or any((q[0], q[1]) == (p[0], p[1]) for q in front) for p in points if p[2] not in on_front)


def test_evolution_visits_its_budget_of_distinct_candidates_from_the_pool_and_all_of_a_small_pool():
    settings = type("S", (), {"widths": [0.25 * k for k in range(1, 8)], "depths": [0.5, 1.0],
                              "input_sizes": [24, 32, 40, 48, 56], "evaluations": 20, "population": 6})
    space = search_space(settings)
    pool = [c for c in space if c.input_size <= 48]
    calls = []

    def evaluate(c):
        calls.append(c)
        return (c.width * c.input_size, c.width)

    visited = evolve(pool, evaluate, settings, random.Random(0))
    assert len(visited) == len(set(visited)) == 20 and set(visited) <= set(pool) and sorted(calls) == sorted(visited)
    small = pool[:7]
    assert sorted(evolve(small, evaluate, settings, random.Random(0))) == sorted(small)


def test_the_neighbours_figure_is_label_free_and_ranks_the_cloud_itself_first(tmp_path):
    """rank_by neighbours: recall of the cloud's own neighbours on the validation images needs no labels (its
    value stays when the labels are shuffled, top-1's does not), and a candidate that computes the cloud's
    function recalls every neighbour."""
    import dataclasses

    from hetero.data import load_split, split_open_set
    from hetero.search import Scorer

    config = parse_config(tiny_config(), "tiny")
    validation = split_open_set(load_split(config.data, 32).train, None, 0.3, 0)
    supernet = _supernet(0.5, 0.5, 32)
    candidates = [Candidate(0.5, 0.5, 32), Candidate(0.25, 0.5, 24)]
    bn_images = validation.train.spread(64)
    cloud = recalibrate(supernet.extract(candidates[0]), bn_images)  # what the largest sub-network extracts as

    def scorer(split, name):
        statics = {c: {"width": c.width} for c in candidates}
        return Scorer(supernet, cloud, split, bn_images, tmp_path / name, 1, bn_images, statics, "neighbours")

    plain = scorer(validation, "plain.json")
    order = torch.randperm(len(validation.test.labels), generator=torch.Generator().manual_seed(0))
    labels = validation.test.labels[order]
    shuffled = scorer(dataclasses.replace(validation, test=dataclasses.replace(validation.test, labels=labels)),
                      "shuffled.json")
    assert plain.rank(candidates[0]) == 1.0 and plain.rank(candidates[1]) < 1.0
    assert all(plain.rank(c) == shuffled.rank(c) for c in candidates)
    assert any(plain.top1(c) != shuffled.top1(c) for c in candidates)
    assert {"top1", "neighbours", "agreement_top1", "cosine_mean"} <= set(json.loads((tmp_path / "plain.json")
                                                                                     .read_text())["w0.25-d0.5-24px"])


def test_the_search_and_verify_time_the_same_file_with_one_protocol(tmp_path, monkeypatch):
    """The search's timing of a candidate and verify's of the exported file are one function with the same
    settings (and so agree: within a factor a tiny model meets on a loaded machine)."""
    from hetero import formats
    from hetero.latency import LATENCY_RUNS, time_batch1
    from hetero.profiles import load_profile
    from hetero.verify import checks
    from hetero.verify.results import ArtifactResult

    calls = []

    def spy(runtime, image, runs, **settings):
        calls.append((image.shape, runs, settings))
        return time_batch1(runtime, image, runs, **settings)

    monkeypatch.setattr(scoring_module, "time_batch1", spy)
    monkeypatch.setattr(checks, "time_batch1", spy)
    profile = load_profile("server-onnx-fp32")
    model = _supernet().extract(Candidate(0.25, 0.5, 24)).eval()
    path = scoring_module.export_candidate(model, profile, torch.rand(8, 3, 32, 32), tmp_path)
    image = torch.rand(1, 3, 24, 24).numpy()
    searched = scoring_module.time_file(path, profile, image, LATENCY_RUNS)
    result = ArtifactResult("candidate", profile.name, profile.format, profile.precision, "onnxruntime", path.name)
    checks.check_latency(result, formats.get(profile.format).open(path), image, None, LATENCY_RUNS)
    verified = result.check("budget_latency").values
    assert calls[0] == calls[1] == ((1, 3, 24, 24), LATENCY_RUNS, {})
    assert searched["protocol"] == verified["protocol"] and searched["protocol"]["runs"] == LATENCY_RUNS
    assert 1 / 3 < verified["median_ms"] / searched["median_ms"] < 3


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("change, words", [
    (lambda c: c["search"].update(widths=[0.5], depths=[1.0], input_sizes=[32]), "the search space has a single "
                                                                                   "candidate"),
    (lambda c: c["search"].update(widths=[0.25, 0.375]), "must be the cloud's (0.5, 1.0, 32 px)"),
    (lambda c: c["family"]["members"].append({"name": "edge-m", "role": "edge", "arch": "resnet", "width": 0.25,
                                               "depth": 0.5, "input_size": 32}), "list only the cloud"),
    (lambda c: c["search"]["targets"].append(dict(c["search"]["targets"][0])), "member names must be unique"),
    (lambda c: c["search"].update(rank_by="accuracy"), "search.rank_by: 'accuracy' is not allowed; input should be "
                                                       "'neighbours' or 'top1'"),
    (lambda c: c["search"].update(kernel_sizes=[3, 5]), "kernel_sizes: genes of a mobilenet supernet (arch: "
                                                         "mobilenet); arch 'resnet' has none (got [3, 5])"),
    (lambda c: c["search"].update(arch="mobilenet", kernel_sizes=[3, 4]), "search.kernel_sizes.1: 4 is not allowed"),
    (lambda c: c["search"].update(arch="mobilenet", expand_ratios=[1, 4]), "search.expand_ratios.0: Input should be "
                                                                           "greater than 1, got 1"),
    (lambda c: c["search"].update(arch="mobilenet"), "search.arch: design 'shared-cloud' makes the cloud the largest "
                                                     "sub-network, so the supernet is the cloud's architecture "
                                                     "'resnet', not 'mobilenet'"),
])
def test_bad_search_configs_are_refused_naming_the_field(change, words):
    config = search_config()
    change(config)
    with pytest.raises(ConfigError) as err:
        parse_config(config, "search.yaml")
    assert words in str(err.value)


def test_a_cloud_alone_needs_a_search_section_and_hetero_train_refuses_it(tmp_path):
    from hetero.training import train

    config = search_config()
    del config["search"]
    with pytest.raises(ConfigError, match="at least one edge member .or a `search` section"):
        parse_config(config, "cloud-only.yaml")
    with pytest.raises(ConfigError, match="`hetero search`, which finds the edge members"):
        train(parse_config(search_config(), "search.yaml"), tmp_path / "out", progress=False)


def test_a_budget_no_sub_network_meets_names_the_smallest_figure_before_training(tmp_path):
    config = parse_config(search_config(targets=[{"name": "edge-tiny", "profile": "rpi-onnx-int8",
                                                   "max_flops_vs_cloud": 0.001}]), "search.yaml")
    with pytest.raises(ConfigError) as err:
        search(config, tmp_path / "out", progress=False)
    message = str(err.value)
    assert "'edge-tiny'" in message and "max_flops_vs_cloud 0.001" in message
    assert "smallest in the search space (w0.25-d0.5-24px) has 0.0" in message
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.skipif(sys.platform == "darwin", reason="CoreML runs on macOS")
def test_a_profile_whose_runtime_cannot_run_here_is_refused(tmp_path):
    config = parse_config(search_config(targets=[{"name": "edge-ios", "profile": "iphone-coreml-fp16"}]), "s.yaml")
    with pytest.raises(ConfigError, match=r"'iphone-coreml-fp16' times candidates with coreml, which runs on macos"):
        search(config, tmp_path / "out", progress=False)


def test_a_profile_whose_runtime_is_not_installed_is_refused_with_the_install_command(tmp_path, monkeypatch):
    from hetero import formats

    monkeypatch.setattr(formats.Format, "missing_packages", lambda self: ["ai_edge_litert"])
    config = parse_config(search_config(targets=[{"name": "edge-a", "profile": "android-litert-fp16"}]), "s.yaml")
    with pytest.raises(ConfigError, match=r"ai_edge_litert is not installed. Install it with: pip install "
                                          r"'hetero\[litert\]'"):
        search(config, tmp_path / "out", progress=False)


def test_frozen_cloud_needs_a_trained_family(tmp_path):
    with pytest.raises(ConfigError, match="design 'frozen-cloud' matches the cloud of a trained family"):
        search(parse_config(search_config("frozen-cloud"), "s.yaml"), tmp_path / "out", progress=False)


# ------------------------------------------------------------------------------------------ end to end


def from_tiny_family(design: str, tiny_family_dir, **settings) -> dict:
    """A search that starts from (shared-cloud) or matches (frozen-cloud) the tiny family's cloud."""
    config = search_config(design, cloud=tiny_family_dir, depths=[0.5], **settings)
    config["family"]["members"][0]["depth"] = 0.5  # the tiny family's cloud
    return config


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_family_dir):
    out = tmp_path_factory.mktemp("searched") / "family"
    store = search(parse_config(from_tiny_family("shared-cloud", tiny_family_dir), "search.yaml"), out,
                   progress=False)
    evaluate(store)
    return FamilyStore.open(out)


@pytest.mark.slow
def test_search_writes_compatible_students_as_members_that_export_picks(searched, tmp_path):
    from hetero.cli import main

    store = searched
    student = store.member("edge-small")
    assert student.search["profile"] == "server-onnx-fp32" and student.flops_vs_cloud <= 0.3
    assert (student.width, student.depth, student.input_size) in {
        (c.width, c.depth, c.input_size) for c in search_space(type("S", (), {**SPACE, "depths": [0.5]}))}
    report = json.loads((store.root / "report.json").read_text())
    chance = 1 / report["test_classes"]
    assert report["edges"]["edge-small"]["edge_vs_cloud_top1"] >= max(0.3, 4 * chance)
    assert report["matrix"]["cloud"]["cloud"]["top1"] >= 0.4
    for name in ("search.json", "pareto-server-onnx-fp32.md", "pareto-server-onnx-fp32.png", "candidates.json"):
        assert (store.root / "search" / name).is_file()
    front = (store.root / "search" / "pareto-server-onnx-fp32.md").read_text()
    assert "edge-small" in front  # the chosen one is on the front
    # Every visited candidate has its figures recorded; the chosen one has the best ranking figure.
    summary = json.loads((store.root / "search" / "search.json").read_text())
    measured = json.loads((store.root / "search" / "candidates.json").read_text())
    visited = [measured[key] for key in summary["visited"]["edge-small"]]
    assert summary["rank_by"] == student.search["rank_by"] == "neighbours" and len(visited) >= 2
    protocol = summary["latency_protocol"]["server-onnx-fp32"]  # verify's: hetero.latency.time_batch1
    assert protocol["function"] == "hetero.latency.time_batch1" and protocol["runs"] == 3 and protocol["batch"] == 1
    assert all(0 <= r["neighbours"] <= 1 and 0 <= r["top1"] <= 1 for r in visited)
    feasible = [r for r in visited if r["flops_vs_cloud"] <= 0.3]
    assert student.search["ranking_figure"] == max(r["neighbours"] for r in feasible)
    # `hetero export --profile P` without --member exports the student searched for P.
    family = tmp_path / "family"
    import shutil

    shutil.copytree(store.root, family)
    assert main(["export", str(family), "--profile", "server-onnx-fp32"]) == 0
    assert [a.member for a in FamilyStore.open(family).artifacts()] == ["edge-small"]


@pytest.mark.slow
def test_a_searched_mobilenet_student_is_a_member_that_exports_to_onnx_with_torchs_embeddings(tiny_family_dir,
                                                                                              tmp_path):
    """A mobilenet supernet matching the tiny family's (resnet) frozen cloud: its student is written as an
    ordinary mobilenet member with per-block options, and its ONNX file gives the torch member's embeddings."""
    from hetero.cli import main
    from hetero.verify import verify

    config = from_tiny_family("frozen-cloud", tiny_family_dir, arch="mobilenet", widths=[0.25, 0.375],
                              input_sizes=[24], expand_ratios=[3, 4], kernel_sizes=[3, 5], epochs=1,
                              evaluations=3, targets=[{"name": "edge-phone", "profile": "server-onnx-fp32"}])
    store = search(parse_config(config, "search.yaml"), tmp_path / "out", progress=False)
    student = store.member("edge-phone")
    assert student.arch == "mobilenet" and set(student.kernel_sizes) <= {3, 5} and len(student.kernel_sizes) == 6
    assert student.expand_ratios[0] == 1 and set(student.expand_ratios[1:]) <= {3, 4}
    assert student.search["candidate"].endswith(f"-e{max(student.expand_ratios):g}-k{student.kernel_sizes[0]}")
    evaluate(store)
    assert main(["export", str(store.root), "--profile", "server-onnx-fp32"]) == 0
    report, _ = verify(FamilyStore.open(store.root), latency_runs=2)
    parity = next(c for a in report["artifacts"] if a["member"] == "edge-phone" for c in a["checks"]
                  if c["name"] == "parity")
    assert parity["values"]["min_cosine"] > 0.9999, parity


@pytest.mark.slow
def test_frozen_cloud_students_keep_the_given_cloud_and_its_space(tiny_family_dir, tmp_path):
    config = from_tiny_family("frozen-cloud", tiny_family_dir, epochs=4, fine_tune_epochs=2)
    store = search(parse_config(config, "search.yaml"), tmp_path / "out", progress=False)
    given = FamilyStore.open(tiny_family_dir)
    assert store.space_id == given.space_id  # the same cloud weights: its galleries stay valid
    for key, value in given.load_member("cloud").state_dict().items():
        assert torch.equal(store.load_member("cloud").state_dict()[key], value), key
    report = evaluate(store)
    assert report["edges"]["edge-small"]["edge_vs_cloud_top1"] >= 0.3
    student = store.member("edge-small")
    assert student.search["fine_tune_epochs"] == 2
    assert (tmp_path / "out" / "search" / f"fine-tune-{student.search['candidate']}-e2").is_dir()


@pytest.mark.slow
def test_an_interrupted_search_resumes_where_it_stopped(tmp_path, monkeypatch):
    config = parse_config(search_config(epochs=2), "search.yaml")
    whole = search(config, tmp_path / "whole", progress=False)

    saves, timings = [], []
    real_save, real_time = supernet_module.save_state, scoring_module.time_export

    def crash_after_first_epoch(*args):
        real_save(*args)
        saves.append(args[3])
        if len(saves) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(supernet_module, "save_state", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        search(config, tmp_path / "resumed", progress=False)

    def crash_after_two_timings(*args):
        if len(timings) == 2:
            raise KeyboardInterrupt
        timings.append(args)
        return real_time(*args)

    monkeypatch.setattr(scoring_module, "time_export", crash_after_two_timings)
    with pytest.raises(KeyboardInterrupt):
        search(config, tmp_path / "resumed", resume=True, progress=False)
    assert saves == [1, 2]  # the second start trained epoch 2 only
    measured = json.loads((tmp_path / "resumed" / "search" / "candidates.json").read_text())
    assert sum(bool(r["latency"]) for r in measured.values()) == 2

    timings.clear()
    monkeypatch.setattr(scoring_module, "time_export", lambda *args: timings.append(args) or real_time(*args))
    resumed = search(config, tmp_path / "resumed", resume=True, progress=False)
    assert saves == [1, 2]  # nothing trained again
    visited = json.loads((tmp_path / "resumed" / "search" / "search.json").read_text())["chosen"]["edge-small"]
    assert len(timings) == visited["visited"] - 2  # the two measured before the crash were not timed again
    for name in ("cloud",):  # the supernet (its largest sub-network) equals the uninterrupted run's
        a, b = (load_file(str(s.root / "checkpoints" / f"{name}.safetensors")) for s in (whole, resumed))
        assert all(torch.equal(a[k], b[k]) for k in a)


def _held_in(config):
    from hetero.data import load_split, split_open_set

    split = load_split(config.data, config.load_size)
    return split_open_set(split.train, None, config.search.validation_classes, config.train.seed).train


def test_the_cached_supernet_matches_the_clouds_answers_for_the_same_views_without_running_it(tiny_family_dir,
                                                                                                tmp_path, monkeypatch):
    """frozen-cloud through the teacher cache: the targets a step trains on are the cloud's embeddings of that
    step's views and matching inputs, read from the cache; the cloud never runs while the supernet trains."""
    from hetero.models import resize_to
    from hetero.search import cached_teacher, given_cloud, train_supernet

    config = parse_config(from_tiny_family("frozen-cloud", tiny_family_dir, epochs=1), "search.yaml")
    images = _held_in(config)
    cloud = given_cloud(config)
    teacher = cached_teacher(config, tmp_path / "cache", cloud, images, progress=False)
    assert teacher.built["views"] == 8 and teacher.built["rows"] == len(images) * 8  # the edge phase's default
    seen, real_loss, real_forward = [], supernet_module.supernet_loss, type(cloud).forward
    monkeypatch.setattr(supernet_module, "supernet_loss", lambda *args: seen.append(args) or real_loss(*args))
    runs = []
    monkeypatch.setattr(type(cloud), "forward", lambda self, x: runs.append(self) or real_forward(self, x))
    train_supernet(config, tmp_path / "state", images, search_space(config.search), teacher, None, 1, False)
    assert cloud not in runs and len(seen) > 1
    _, _, batch, _, mixed, _, _, _, _, (reference, mixed_reference) = seen[-1]
    assert mixed is not None  # train.matching_inputs: the label-free terms also match on the matching inputs
    with torch.no_grad():
        torch.testing.assert_close(reference, real_forward(cloud, resize_to(batch, 32)), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mixed_reference, real_forward(cloud, resize_to(mixed, 32)), atol=1e-5, rtol=1e-4)


def test_a_cached_supernet_resumed_after_a_crash_ends_as_an_uninterrupted_one(tiny_family_dir, tmp_path,
                                                                             monkeypatch):
    from hetero.search import cached_teacher, given_cloud, train_supernet

    config = parse_config(from_tiny_family("frozen-cloud", tiny_family_dir, widths=[0.25, 0.5], input_sizes=[24]),
                          "search.yaml")
    images, space = _held_in(config), search_space(config.search)

    def run(folder):
        teacher = cached_teacher(config, tmp_path / "cache", given_cloud(config), images, progress=False)
        return train_supernet(config, folder, images, space, teacher, None, 2, False).model.state_dict()

    whole = run(tmp_path / "whole")
    real_save = supernet_module.save_state

    def crash_after_first_epoch(*args):
        real_save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(supernet_module, "save_state", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed")
    monkeypatch.setattr(supernet_module, "save_state", real_save)
    resumed = run(tmp_path / "resumed")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_fine_tuning_is_the_edge_phase_through_the_cache_and_resumes_as_an_uninterrupted_run(tiny_family_dir,
                                                                                                 tmp_path):
    """search.fine_tune_epochs: a chosen student trains in the edge phase of a family of the cloud and itself,
    on every training image, reading the teacher cache; a crash after an epoch resumes to the same weights."""
    from hetero.data import load_split
    from hetero.search import fine_tune, given_cloud

    from .conftest import crash_after

    config = parse_config(from_tiny_family("frozen-cloud", tiny_family_dir, fine_tune_epochs=2), "search.yaml")
    split = load_split(config.data, config.load_size)
    cloud = given_cloud(config)
    torch.manual_seed(0)
    student = Embedder("resnet", 0.25, 0.5, 32, 24)
    start = {k: v.clone() for k, v in student.state_dict().items()}

    def tune(out, callbacks=()):
        student.load_state_dict(start)
        return fine_tune(config, out, student, cloud, split, False, callbacks).state_dict()

    whole = tune(tmp_path / "whole")
    plan = json.loads((tmp_path / "whole" / "search" / "teacher-cache" / "cache.json").read_text())
    assert plan["images"] == len(split.train) and plan["views"] == 8  # every training image, the default views
    assert not torch.equal(whole["backbone.0.0.weight"], start["backbone.0.0.weight"])
    with pytest.raises(KeyboardInterrupt):
        tune(tmp_path / "resumed", [crash_after(1)])
    ends = []
    resumed = tune(tmp_path / "resumed", [ends.append])
    assert [(e.epoch, e.epochs, e.stage) for e in ends] == [(2, 2, "fine-tuning w0.25-d0.5-24px")]  # epoch 2 only
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_the_example_search_config_is_valid_and_its_cloud_path_is_relative_to_the_file():
    from pathlib import Path

    from hetero.config import load_config

    path = Path(__file__).resolve().parents[1] / "examples" / "omniglot_search.yaml"
    config = load_config(path)
    assert Path(config.search.cloud) == (path.parent / ".." / "runs" / "omniglot").resolve()
    assert config.search.design == "frozen-cloud" and len(search_space(config.search)) == 70


@pytest.mark.slow
def test_a_log_gets_one_line_per_supernet_and_fine_tuning_epoch(tmp_path, capsys):
    """`hetero search` in CI: progress bars show nothing in a log, so each epoch prints a line (issue 31)."""
    import re

    import yaml

    from hetero.cli import main

    config = search_config(epochs=2, fine_tune_epochs=1, widths=[0.25, 0.5], depths=[0.5], input_sizes=[24],
                           evaluations=2, population=2, latency_runs=1, bn_images=32)
    config["family"]["members"][0].update(depth=0.5, input_size=24)  # shared-cloud: the largest sub-network
    # a batch more than the held-in images can fill shrinks to what they fill (was an AssertionError)
    config["train"]["batch_size"] = 4000  # a multiple of samples_per_class (4 by default)
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["search", str(path), "--out", str(tmp_path / "out")]) == 0  # capsys: stdout is not a terminal
    lines = [line for line in capsys.readouterr().out.splitlines() if " epoch " in line]
    elapsed = r"loss \d+\.\d{4} \[\d+:\d\d:\d\d elapsed\]"
    assert len(lines) == 3, lines
    for epoch, line in enumerate(lines[:2], start=1):
        assert re.fullmatch(rf"supernet epoch {epoch}/2: {elapsed}", line), line
    assert re.fullmatch(rf"fine-tuning \S+ epoch 1/1: {elapsed}", lines[2]), lines[2]
