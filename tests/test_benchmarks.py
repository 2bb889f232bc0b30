"""The benchmarks write their figures as results records: every script in benchmarks/ calls `records.write`,
and the cheapest ones, run end to end in their smallest mode, write a record that names its command, commit and
machine and carries the figures the script printed.  Records go to a temporary $HETERO_RESULTS_DIR, never
into benchmarks/results/."""
from __future__ import annotations

import ast
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import records  # noqa: E402
import render_results  # noqa: E402


def _calls_records_write(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "write" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "records":
            return True
    return False


def test_every_benchmark_writes_records():
    scripts = records.benchmark_scripts()
    assert {"gallery_search", "recipe_seeds", "time_to_quality"} <= {p.stem for p in scripts}
    assert not {p.stem for p in scripts} & records.TOOLS
    silent = [p.name for p in scripts if not _calls_records_write(p)]
    assert not silent, f"benchmarks that measure without writing a record (call records.write): {silent}"


def test_record_keys_name_the_cell_and_mark_smoke_tests():
    assert records.key_of("omniglot", "independent (compat: none)", "seed0") == "omniglot-independent-compat-none-seed0"
    assert records.key_of("clustered", None, "10000rows", "", quick=True) == "clustered-10000rows-quick"
    assert records.key_of("timm/resnet10t") == "timm-resnet10t"


def test_records_go_to_hetero_results_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(records.ENV, str(tmp_path))
    path = records.write("demo", "cell", {"top1": 0.123456789}, wall_s=1.23, recipe="examples/quickstart.yaml",
                         quick=True, argv=[str(ROOT / "benchmarks" / "demo.py"), "--quick"])
    assert path == tmp_path / "demo" / "cell.json"
    record = json.loads(path.read_text())
    assert record["command"] == "python benchmarks/demo.py --quick"  # the script as the docs write it
    assert record["figures"] == {"top1": 0.123457} and record["quick"] is True
    assert record["config_hash"] == records.config_hash("examples/quickstart.yaml")
    assert records.read_all("demo") == [record]
    other = tmp_path / "other"
    with records.results_in(other):
        assert records.results_dir() == other and records.read_all() == []
    assert records.results_dir() == tmp_path


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture
def results(tmp_path):
    """A temporary records folder, and a check that benchmarks/results/ was left as it was."""
    before = sorted(p.relative_to(records.RESULTS) for p in records.RESULTS.rglob("*"))
    yield tmp_path / "records"
    assert sorted(p.relative_to(records.RESULTS) for p in records.RESULTS.rglob("*")) == before


def _run(script: str, *args: str, results: Path) -> str:
    done = subprocess.run([sys.executable, f"benchmarks/{script}.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, records.ENV: str(results)})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _record(results: Path, benchmark: str, key: str, command: str, quick: bool) -> dict:
    path = results / benchmark / f"{key}.json"
    assert path.is_file(), f"no record {path}: {sorted(p.name for p in (results / benchmark).glob('*'))}"
    record = json.loads(path.read_text())
    assert record["benchmark"] == benchmark and record["key"] == key
    assert record["command"].startswith(f"python benchmarks/{command}")
    assert re.fullmatch(r"[0-9a-f]{40}", record["commit"]["sha"] or "")
    assert record["machine"]["cpu"] and record["machine"]["cores"] >= 1
    assert record["quick"] is quick and record["wall_s"] >= 0
    return record


def _same(printed: str, value: float) -> bool:
    """Whether `printed` (as the script formatted it) is `value` to the digits it shows (a record keeps six
    significant digits)."""
    text = printed.replace(",", "").rstrip("x")
    decimals = len(text.partition(".")[2])
    return math.isclose(float(text), value, rel_tol=1e-5, abs_tol=10 ** -decimals)


@pytest.mark.slow
def test_gallery_search_quick_writes_a_record_of_each_index(results, tmp_path):
    out = _run("gallery_search", "--quick", "--sizes", "2000", "--queries", "200", "--nprobe", "8",
               "--hnsw-max", "0", results=results)
    record = _record(results, "gallery_search", "clustered-2000rows-d128-quick", "gallery_search.py --quick",
                     quick=True)
    indexes = record["figures"]["indexes"]
    assert "flat (exact)" in indexes and any(name.startswith("ivf") and "nprobe=8" in name for name in indexes)
    assert not any(name.startswith("hnsw") for name in indexes)  # --hnsw-max 0
    assert record["figures"]["auto_index"] == "flat" and indexes["flat (exact)"]["auto"]
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("|")]
        label = cells[1].removesuffix(" *auto") if len(cells) == 7 else None
        if label in indexes:  # rows | index | build s | MB | queries/s | recall@1 | speed-up
            figures = indexes.pop(label)
            assert _same(cells[4], figures["queries_per_s"]) and _same(cells[5], figures["recall_at_1"])
            assert _same(cells[6], figures["speed_up"])
    assert not indexes, f"indexes in the record but not printed: {list(indexes)}"
    assert f"record: {results / 'gallery_search' / 'clustered-2000rows-d128-quick.json'}" in out

    # the results page renders it as a smoke test, never a result
    page, readme = tmp_path / "results.md", tmp_path / "README.md"
    readme.write_text(f"{render_results.BEGIN}\n{render_results.END}\n")
    assert render_results.main(["--results", str(results), "--page", str(page), "--readme", str(readme)]) == 0
    row = next(line for line in page.read_text().splitlines() if "`clustered-2000rows-d128-quick`" in line)
    assert "## gallery_search" in page.read_text() and "smoke test" in row
    assert "indexes.flat (exact).recall_at_1: 1" in row


@pytest.mark.slow
def test_vector_store_writes_a_record_per_size(results):
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    pytest.importorskip("lancedb")
    out = _run("vector_store", "--sizes", "2000", "--queries", "50", "--repeats", "3", results=results)
    key = f"{records.machine_tag(records.machine())}-2000rows-d128"  # timings are per machine
    record = _record(results, "vector_store", key, "vector_store.py --sizes 2000", quick=False)
    stores = record["figures"]
    assert len(stores) == 3 and any(s.startswith("faiss") for s in stores) and any("milvus" in s for s in stores)
    assert any(s.startswith("lancedb") for s in stores)
    for line in out.splitlines():  # | rows | store | ingest (writes) rows/s | batch-1 p50 / p95 | ... | recall@1 |
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[1] in stores:
            figures = stores.pop(cells[1])
            one, hundred = cells[3].split(" / "), cells[4].split(" / ")
            ingest, writes = cells[2].rstrip(")").split(" (")
            assert _same(ingest, figures["ingest_rows_per_s"]) and _same(writes, figures["write_rows_per_s"])
            assert figures["write_rows_per_s"] >= figures["ingest_rows_per_s"] and figures["index_s"] >= 0
            assert _same(cells[5], figures["recall_at_1"])
            assert _same(one[0], figures["batch1_p50_ms"]) and _same(one[1], figures["batch1_p95_ms"])
            assert _same(hundred[0], figures["batch100_p50_ms"])
    assert not stores, f"stores in the record but not printed: {list(stores)}"


@pytest.mark.slow
def test_runtime_latency_records_each_member_with_its_recipe(results):
    out = _run("runtime_latency", "--config", "examples/quickstart.yaml", "--runs", "1", "--calibration", "8",
               results=results)
    for member in ("edge-m", "edge-s"):
        record = _record(results, "runtime_latency", f"quickstart-{member}-1threads", "runtime_latency.py",
                         quick=False)
        assert record["recipe"] == "examples/quickstart.yaml"
        assert record["config_hash"] == records.config_hash("examples/quickstart.yaml")
        runtimes = record["figures"]
        assert {"torch eager fp32", "onnxruntime fp32", "onnxruntime int8 QDQ static"} <= set(runtimes)
        for line in out.splitlines():  # member | runtime | batch-1 ms | batch-32 img/s | vs torch b1 | b32
            cells = [c.strip() for c in line.split("|")]
            if len(cells) == 6 and cells[0] == member and cells[1] in runtimes:
                assert _same(cells[2], runtimes[cells[1]]["batch1_ms"])
                assert _same(cells[3], runtimes[cells[1]]["batch32_images_per_s"])


def test_the_results_page_says_how_much_each_stage_grew_and_sets_the_stores_side_by_side(tmp_path, monkeypatch):
    monkeypatch.setenv(records.ENV, str(tmp_path / "results"))
    for rows, ingest in ((1_000_000, 1500.0), (10_000_000, 1800.0)):
        records.write("scale_memory", f"m-{rows}rows-d128", {"ingest": {"peak_rss_mib": ingest, "rows_per_s": 9.0},
                                                            "teacher-cache": {"peak_rss_mib": 900.0}},
                      wall_s=1.0, rows=rows, dim=128, argv=["benchmarks/scale_memory.py"])
    store = {"ingest_rows_per_s": 40_000.0, "write_rows_per_s": 120_000.0, "batch1_p50_ms": 8.0,
             "batch100_p50_ms": 140.0, "recall_at_1": 0.982, "batch1_p50_vs_faiss": 5.0, "batch100_p50_vs_faiss": 1.25}
    records.write("vector_store", "m-1000000rows-d128", {"lancedb ivf nprobe 32": store}, wall_s=1.0,
                  rows=1_000_000, argv=["benchmarks/vector_store.py"])
    page, readme = tmp_path / "results.md", tmp_path / "README.md"
    readme.write_text(f"{render_results.BEGIN}\n{render_results.END}\n")
    assert render_results.main(["--results", str(tmp_path / "results"), "--page", str(page),
                                "--readme", str(readme)]) == 0
    lines = page.read_text().splitlines()
    assert "| ingest | 1,500 | 1,800 | +20% |" in lines and "| teacher-cache | 900 | 900 | +0% |" in lines
    row = next(line for line in lines if line.startswith("| 1,000,000 | lancedb ivf nprobe 32 |"))
    assert "| 40,000 (120,000) | 8.00 | 140.0 | 0.982 | 5.0x, 1.2x |" in row


def test_vector_store_asks_for_the_server_it_is_to_measure(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/vector_store.py", "--stores", "faiss", "milvus-server"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, records.ENV: str(tmp_path)})
    assert done.returncode == 2 and "--stores milvus-server needs --milvus-uri http://HOST:PORT" in done.stderr
    assert not any(tmp_path.rglob("*.json"))  # nothing measured, nothing recorded


def test_scale_memory_records_its_command_without_the_machines_work_folder():
    import scale_memory

    argv = ["benchmarks/scale_memory.py", "--rows", "1000", "--work", "/mnt/big", "--stages", "ingest"]
    assert scale_memory.without_work(argv) == ["benchmarks/scale_memory.py", "--rows", "1000", "--stages", "ingest"]
    script = "benchmarks/scale_memory.py"
    assert scale_memory.without_work([script, "--work=/mnt/big"]) == [script]


def test_the_early_exit_summary_averages_the_current_seeds_and_leaves_stale_ones_out(tmp_path, monkeypatch):
    import early_exit

    monkeypatch.setenv(records.ENV, str(tmp_path / "results"))

    def figures(edge_m: float, escalated: float) -> dict:
        return {"top1_vs_cloud": {"cloud": 0.87, "edge-m": edge_m, "multi": 0.84},
                "within_half_point_of_edge_m": None,  # no point of the curve came that close
                "per_exit_within_half_point_of_edge_m": {"times_fewer_mflops_than_edge_m": edge_m * 2},
                "students": {"single-w375": {"curve_minus_student": 0.01, "per_exit_curve_minus_student": 0.02},
                             "edge-s": {"curve_minus_student": None}},
                "top1_loss_transfer": {"test": 0.012}, "split": {"escalated_test": escalated, "top1_system": 0.86,
                                                                 "gap_closed": 0.5}}

    for seed, (edge_m, escalated) in enumerate([(0.84, 0.09), (0.85, 0.13), (0.10, 0.90)]):
        records.write("early_exit", f"m-seed{seed}", figures(edge_m, escalated), wall_s=1.0, recipe=early_exit.RECIPE,
                      overrides=early_exit.overrides_of(early_exit.DEFAULT_LEVER, seed), seeds=[seed],
                      **early_exit.DEFAULT_LEVER, argv=["benchmarks/early_exit.py"])
    stale = records.record_path("early_exit", "m-seed2")
    stale.write_text(stale.read_text().replace('"config_hash": "', '"config_hash": "0'))  # its recipe changed since
    chains = {"profiles": {"android-litert-int8": {"exported": True, "passed": True, "runtimes": {
        "tflite-runtime 2.14.0": {"status": "pass", "exit_agreement": 0.995, "min_cosine": 0.9991}}},
        "android-executorch-fp32": {"exported": False, "why": "no exit chains for executorch"}}}
    records.write("early_exit", "m-seed0-chains", chains, wall_s=1.0, recipe=early_exit.RECIPE, kind="chains",
                  overrides=early_exit.overrides_of(early_exit.DEFAULT_LEVER, 0), seeds=[0],
                  **early_exit.DEFAULT_LEVER, argv=["benchmarks/early_exit.py", "chains"])
    [row] = early_exit.summary(records.read_all("early_exit"))  # the chains' record is no seed of the figures
    assert row["seeds"] == [0, 1] and row["held_out_by"] == "classes"
    assert row["edge-m top-1"] == pytest.approx((0.845, 0.01, 2))
    assert row["escalated on test, 10% asked"] == pytest.approx((0.11, 0.04, 2))
    assert row["curve - edge-s (pts)"] is None and row["x fewer MFLOPs than edge-m within 0.5 pts of it"] is None
    assert row["same, the per-exit curve"] == pytest.approx((1.69, 0.02, 2))
    assert row["per-exit curve - single-w375 (pts)"] == pytest.approx((2.0, 0.0, 2))
    assert row["per-exit curve - edge-s (pts)"] is None  # a record without the per-exit curve reads as none
    page, readme = tmp_path / "results.md", tmp_path / "README.md"
    readme.write_text(f"{render_results.BEGIN}\n{render_results.END}\n")
    assert render_results.main(["--results", str(tmp_path / "results"), "--page", str(page),
                                "--readme", str(readme)]) == 0
    text = page.read_text()
    assert "| escalated on test, 10% asked | 0.11 (spread 0.04) |" in text
    assert "held out by classes, pooled exit heads, seeds 0, 1" in text
    assert "| m-seed0-chains | android-litert-int8 | tflite-runtime 2.14.0 | pass | 0.9950 | 0.99910 |" in text
    assert "| m-seed0-chains | android-executorch-fp32 | - | not exported | - | - |" in text


def test_measuring_a_seed_that_was_never_trained_says_how_to_train_it(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/early_exit.py", "measure", "--seeds", "97", "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, records.ENV: str(tmp_path / "results")})
    assert done.returncode != 0
    assert "seed 97 has no trained family" in done.stderr and "`run --seeds 97` trains it" in done.stderr
    assert not (tmp_path / "results").exists()  # nothing recorded


def test_escalation_by_gallery_margin_or_exit_disagreement_sends_the_unsure_query_and_by_entropy_what_the_rule_does():
    import early_exit
    import torch

    # 10 queries; gallery: classes 0 and 1, two items each.  Queries 0-8 sit on their class's item; query 9 sits
    # between an item of class 0 and one of class 1 (margin 0) and the edge gets it wrong, its exit before the
    # last on the class-1 item (the two disagree); the last exit's entropy is highest on query 0, which the edge
    # gets right.
    gallery = torch.eye(4)
    labels = torch.tensor([0, 0, 1, 1])
    queries = torch.eye(4)[[0, 1, 2, 3, 0, 1, 2, 3, 0, 0]]
    queries[9] = torch.nn.functional.normalize(torch.tensor([1.0, 0.0, 1.0, 0.0]), dim=0)
    query_labels = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1, 0, 1])
    correct = torch.ones(2, 10, dtype=torch.bool)
    correct[-1, 9] = False
    entropies = torch.zeros(2, 10)
    entropies[-1, 0] = 1.0
    before = queries.clone()
    before[9] = gallery[2]
    before[0] = torch.nn.functional.normalize(torch.tensor([1.0, 1.2, 0.0, 0.0]), dim=0)  # agrees, lowest cosine
    test = {"exits": torch.stack([before, queries]), "gallery": gallery, "query_labels": query_labels,
            "gallery_labels": labels, "entropies": entropies, "correct": correct,
            "cloud_correct": torch.ones(10, dtype=torch.bool)}
    found = early_exit.escalation_rankings(test, edge_m=0.9, cloud_top1=1.0)
    assert found["share"] == 0.1
    assert found["gallery_margin"]["top1_system"] == 1.0 and found["gallery_margin"]["gap_closed"] == pytest.approx(1.0)
    assert found["exit_disagreement"]["top1_system"] == 1.0 and found["last_two_exits_disagree"] == pytest.approx(0.1)
    assert found["entropy"]["top1_system"] == pytest.approx(0.9, abs=1e-6)
    assert found["entropy"]["gap_closed"] == pytest.approx(0, abs=1e-5)


def test_the_early_exit_escalation_budget_streams_the_test_queries_and_sends_the_share_asked():
    import early_exit
    import torch

    # 3000 test queries, none stopping early: the last exit's entropy uniform on [0, 1]; a calibrated threshold
    # of 0.6 would send 40%.  The edge misses exactly the least sure 10%, which the cloud gets right.
    n = 3000
    entropies = torch.stack([torch.full((n,), 9.0), torch.rand(n, generator=torch.Generator().manual_seed(1))])
    correct = torch.ones(2, n, dtype=torch.bool)
    correct[-1] = entropies[-1] <= entropies[-1].quantile(0.9)
    # The gallery: 100 classes of one item each (unit vectors); each query sits near its class's item, the
    # least sure ones by entropy nearly halfway to another class's (small margins) and the rest close to theirs.
    gallery = torch.eye(100)
    labels = torch.arange(100)
    own, other = torch.arange(n) % 100, (torch.arange(n) + 1) % 100
    spread = torch.rand(n, generator=torch.Generator().manual_seed(2)) * 0.1
    closeness = torch.where(correct[-1], spread, 0.9 + spread)[:, None]
    queries = torch.nn.functional.normalize(gallery[own] + closeness * gallery[other], dim=1)
    test = {"entropies": entropies, "correct": correct, "cloud_correct": torch.ones(n, dtype=torch.bool),
            "exits": torch.stack([queries, queries]), "gallery": gallery, "gallery_labels": labels}
    rule = {"thresholds": [0.5], "escalate_above": 0.6}
    found = early_exit.escalation_budget(rule, test, 2, edge_m=0.9, cloud_top1=1.0, flops=[1, 2])
    for by in ("entropy", "margin"):
        assert found[by]["escalated_test"] == pytest.approx(0.1, abs=0.02), by
        assert found[by]["escalated_after_one_window"] == pytest.approx(0.1, abs=0.01), by
        assert found[by]["gap_closed"] > 0.85, by  # those sent are the ones the edge missed


def test_the_lqf_summary_gives_each_method_and_its_linearised_model_over_current_seeds(tmp_path, monkeypatch):
    import lqf_update

    monkeypatch.setenv(records.ENV, str(tmp_path / "results"))

    def figures(nfr: float, linear_nfr: float | None = None) -> dict:
        found = {"korean_top1": {"cloud": 0.6, "edge-m": 0.5, "edge-s": 0.4}, "new_vs_old": 0.8, "old_vs_old": 0.85,
                 "nfr": nfr, "edges_vs_old": {"edge-m": 0.8, "edge-s": 0.7}, "cpu_s": 100.0}
        if linear_nfr is not None:
            found["linearised"] = {**found, "nfr": linear_nfr}
        return found

    base = lqf_update.old_overrides(tmp_path)
    for seed, (method, nfr, linear) in enumerate([("lqf-compat0", 0.04, 0.03), ("lqf-compat0", 0.04, 0.03),
                                                  ("fine-tuning", 0.06, None), ("fine-tuning", 0.10, None)]):
        records.write("lqf_update", f"{method}-seed{seed}", figures(nfr, linear), wall_s=1.0, recipe=lqf_update.RECIPE,
                      overrides=base, seeds=[seed % 2], method=method, argv=["benchmarks/lqf_update.py"])
    stale = records.record_path("lqf_update", "fine-tuning-seed3")
    stale.write_text(stale.read_text().replace('"config_hash": "', '"config_hash": "0'))  # its recipe changed since
    rows = {row["method"]: row for row in lqf_update.summary(records.read_all("lqf_update"))}
    assert list(rows) == ["lqf-compat0", "lqf-compat0 (linearised)", "fine-tuning"]
    assert rows["lqf-compat0"]["NFR vs old gallery"] == pytest.approx((0.04, 0.0))
    assert rows["lqf-compat0 (linearised)"]["NFR vs old gallery"] == pytest.approx((0.03, 0.0))
    assert rows["fine-tuning"]["seeds"] == 1 and rows["fine-tuning"]["NFR vs old gallery"] == pytest.approx((0.06, 0))
    assert rows["fine-tuning"]["Korean top-1, edges (mean)"] == pytest.approx((0.45, 0.0))
    page, readme = tmp_path / "results.md", tmp_path / "README.md"
    readme.write_text(f"{render_results.BEGIN}\n{render_results.END}\n")
    assert render_results.main(["--results", str(tmp_path / "results"), "--page", str(page),
                                "--readme", str(readme)]) == 0
    assert "| lqf-compat0 (linearised) | 2 | 0.6 (spread 0) |" in page.read_text()
