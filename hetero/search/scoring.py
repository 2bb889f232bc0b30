"""Scoring candidates: FLOPs and parameters before any weights, the ranking figures on validation images
(top-1 and label-free agreement with the cloud) and real latency (each exported for a profile and timed by
its runtime here) kept in a resumable JSON file, and the budgets a candidate breaks, with the message that
says why no sub-network meets a target."""
from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hetero import formats
from hetero.config import Config
from hetero.files import atomic_write_text, path_bytes
from hetero.latency import time_batch1
from hetero.maths import label_free_figures, retrieval_metrics
from hetero.models import Embedder, build_member, count_flops, count_params, embed_images, resize_to
from hetero.search.space import Candidate
from hetero.search.supernet import Supernet, recalibrate

BYTES_PER_WEIGHT = {"fp32": 4, "fp16": 2, "int8": 1}


@dataclass
class Scorer:
    """Measures candidates, each figure once, kept in a JSON file so an interrupted search resumes."""

    supernet: Supernet
    cloud: Embedder
    validation: object  # a Split: held-out training classes, gallery and query rows
    bn_images: torch.Tensor
    file: Path
    latency_runs: int
    calibration: torch.Tensor
    statics: dict  # Candidate -> static_records' figures
    rank_by: str = "neighbours"  # search.rank_by: the figure of `figures` that ranks them

    def __post_init__(self):
        self.records: dict[str, dict] = json.loads(self.file.read_text()) if self.file.is_file() else {}
        self._members: dict[Candidate, Embedder] = {}
        self._images = self.validation.test.floats()
        self._cloud = embed_images(self.cloud, self._images)

    def record(self, candidate: Candidate) -> dict:
        if candidate.key not in self.records:
            self.records[candidate.key] = {**self.statics[candidate], "latency": {}}
            self._save()
        return self.records[candidate.key]

    def member(self, candidate: Candidate) -> Embedder:
        """The candidate extracted with its shared weights and its own BatchNorm statistics."""
        if candidate not in self._members:
            self._members[candidate] = recalibrate(self.supernet.extract(candidate), self.bn_images)
        return self._members[candidate]

    def figures(self, candidate: Candidate) -> dict:
        """The candidate's record with its figures on the validation images, each measured once: `top1`,
        M[candidate][cloud] on the validation classes (labels), and the label-free agreement with the cloud
        (`neighbours`: recall of the cloud's own 10 nearest neighbours; `agreement_top1`; `cosine_mean`)."""
        record = self.record(candidate)
        if not {"top1", "neighbours"} <= set(record):
            queries = embed_images(self.member(candidate), self._images)
            val = self.validation
            labels, q, g = val.test.labels, val.query_index, val.gallery_index
            record["top1"] = round(retrieval_metrics(queries[q], labels[q], self._cloud[g], labels[g])["top1"], 5)
            free = label_free_figures(queries, self._cloud)
            recall = next(v for k, v in free.items() if k.startswith("recall_at_"))
            record.update(neighbours=round(recall, 5), agreement_top1=round(free["agreement_top1"], 5),
                          cosine_mean=round(free["cosine_mean"], 5))
            self._save()
        return record

    def top1(self, candidate: Candidate) -> float:
        """M[candidate][cloud] top-1 on the validation classes."""
        return self.figures(candidate)["top1"]

    def rank(self, candidate: Candidate) -> float:
        """The figure that ranks candidates (search.rank_by), higher is better."""
        return self.figures(candidate)[self.rank_by]

    def latency(self, candidate: Candidate, profile) -> dict:
        """Median batch-1 latency (ms) and file size of the candidate exported for `profile`, timed by the
        profile's runtime here."""
        record = self.record(candidate)
        measured = record["latency"].get(profile.name, {})
        # A latency measured under another protocol (an earlier hetero's, or other runs) is measured again.
        if measured.get("protocol", {}).get("runs") != self.latency_runs:
            record["latency"][profile.name] = time_export(self.member(candidate), profile, self.calibration,
                                                          self.latency_runs)
            self._save()
        return record["latency"][profile.name]

    def _save(self) -> None:
        atomic_write_text(self.file, json.dumps(self.records, indent=1))


def static_records(space: list[Candidate], config: Config) -> dict[Candidate, dict]:
    """FLOPs (and their share of the cloud's) and parameters of every candidate; no weights needed."""
    dim, arch = config.family.embedding_dim, config.search.arch
    cloud_flops = count_flops(build_member(config.family.cloud, dim))
    records = {}
    for candidate in space:
        model = Embedder(arch, candidate.width, candidate.depth, dim, candidate.input_size,
                         blocks=candidate.blocks(arch))
        flops = count_flops(model)
        genes = {k: v for k, v in dataclasses.asdict(candidate).items() if v is not None}
        records[candidate] = {**genes, "flops": flops,
                              "flops_vs_cloud": round(flops / cloud_flops, 5), "params": count_params(model)}
    return records


def time_export(model: Embedder, profile, calibration: torch.Tensor, runs: int) -> dict:
    """Export `model` with the profile's converter, then time it batch-1 with the profile's runtime, as
    `hetero verify` times the exported member (latency.time_batch1, on a real image: the first calibration
    image)."""
    with tempfile.TemporaryDirectory(prefix="hetero-search-") as folder:
        path = export_candidate(model, profile, calibration, Path(folder))
        size = path_bytes(path)
        timed = time_file(path, profile, resize_to(calibration[:1], model.input_size).numpy(), runs)
    return {**timed, "median_ms": round(timed["median_ms"], 4), "bytes": size}


def export_candidate(model: Embedder, profile, calibration: torch.Tensor, folder: Path) -> Path:
    """`model` exported into `folder` with the profile's converter (int8 calibrated on `calibration`)."""
    spec = formats.get(profile.format)
    metadata = {"member": "candidate", "role": "edge", "embedding_dim": model.dim, "input_size": model.input_size,
                "layout": profile.layout, "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(),
                "input_range": [0.0, 1.0], "precision": profile.precision, "profile": profile.name,
                "format": profile.format, "batch": profile.batch}
    path = folder / f"candidate{spec.suffix}"
    spec.export_function()(model, path, profile, metadata, resize_to(calibration, model.input_size), None)
    return path


def time_file(path: Path, profile, image: np.ndarray, runs: int) -> dict:
    """An exported file timed batch-1 by the profile's runtime in this process (latency.time_batch1)."""
    runtime = formats.get(profile.format).open(path, profile.verify.runtime)
    try:
        return time_batch1(runtime, image, runs)
    finally:
        if hasattr(runtime, "close"):
            runtime.close()


def static_problems(record: dict, profile, target) -> list[str]:
    """The budgets a candidate breaks before it is exported (FLOPs, params, estimated file size)."""
    budgets, problems = profile.budgets, []
    if target.max_flops_vs_cloud is not None and record["flops_vs_cloud"] > target.max_flops_vs_cloud:
        problems.append("max_flops_vs_cloud")
    if budgets.max_mflops is not None and record["flops"] / 1e6 > budgets.max_mflops:
        problems.append("max_mflops")
    if budgets.max_params is not None and record["params"] > budgets.max_params:
        problems.append("max_params")
    weight_bytes = record["params"] * BYTES_PER_WEIGHT.get(profile.precision, 4)
    if budgets.max_file_mb is not None and weight_bytes / 2**20 > budgets.max_file_mb:
        problems.append("max_file_mb")
    return problems


def latency_budget(profile, target) -> float | None:
    limits = [x for x in (profile.budgets.target_latency_ms, target.max_latency_ms) if x is not None]
    return min(limits) if limits else None


def measured_problems(measured: dict, profile, target) -> list[str]:
    problems = []
    budget = latency_budget(profile, target)
    if budget is not None and measured["median_ms"] > budget:
        problems.append("latency")
    if profile.budgets.max_file_mb is not None and measured["bytes"] / 2**20 > profile.budgets.max_file_mb:
        problems.append("max_file_mb")
    return problems


def no_candidate_message(target, profile, records: list[dict], budget: str) -> str:
    """Why no sub-network meets a target: the budget and the smallest figure the space reaches."""
    where = f"search.targets {target.name!r} (profile {profile.name!r})"
    figure = {"max_flops_vs_cloud": ("flops_vs_cloud", target.max_flops_vs_cloud, "of the cloud's FLOPs"),
              "max_mflops": ("flops", (profile.budgets.max_mflops or 0) * 1e6, "FLOPs"),
              "max_params": ("params", profile.budgets.max_params, "parameters")}
    if budget in figure:
        field, limit, words = figure[budget]
        best = min(records, key=lambda r: r[field])
        return (f"{where}: no sub-network meets {budget} {limit:g}; the smallest in the search space "
                f"({_key(best)}) has {best[field]:g} {words}")
    if budget == "latency":
        timed = [r for r in records if profile.name in r["latency"]]
        best = min(timed, key=lambda r: r["latency"][profile.name]["median_ms"])
        return (f"{where}: no sub-network meets the latency budget {latency_budget(profile, target):g} ms; the "
                f"fastest measured ({_key(best)}) takes {best['latency'][profile.name]['median_ms']:.3f} ms "
                f"on this machine")
    return f"{where}: no sub-network meets the profile's file size budget {profile.budgets.max_file_mb:g} MB"


def _key(record: dict) -> str:
    return Candidate(**{f.name: record.get(f.name) for f in dataclasses.fields(Candidate)}).key
