"""Verification harness: run each exported artifact in its runtime on real held-out images.

Per artifact: identity (sha256 against the manifest, space id in the file's own metadata), embedding
parity (cosine to the torch member) and retrieval (queries through the runtime against a gallery embedded
by the torch cloud member, compared with the torch edge member's figure).  A failing or broken artifact is
a failed check with its reason; the others are still verified.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hetero.evaluate import embed, retrieval_metrics
from hetero.manifest import atomic_write_json, read_manifest, sha256_file
from hetero.models import resize_to


@dataclass
class Check:
    name: str
    status: str  # pass | fail | skip
    detail: str
    values: dict = field(default_factory=dict)


@dataclass
class ArtifactResult:
    member: str
    profile: str
    file: str
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(c.status != "fail" for c in self.checks)


def _subset(index: torch.Tensor, count: int) -> torch.Tensor:
    """`count` rows spread evenly over `index` (queries are grouped by class, so not the first ones)."""
    if count >= len(index):
        return index
    return index[torch.linspace(0, len(index) - 1, count).round().long()]


def verify_artifact(run_dir: Path, manifest: dict, artifact: dict, split, torch_embeddings: dict,
                    queries: torch.Tensor) -> ArtifactResult:
    from hetero.export import open_runtime
    from hetero.profiles import load_profile

    result = ArtifactResult(artifact["member"], artifact["profile"], artifact["file"], [])
    checks = result.checks
    path = run_dir / artifact["file"]
    if not path.exists():
        checks.append(Check("identity", "fail", f"{path} is listed in the manifest but missing"))
        return result
    actual = sha256_file(path) if path.is_file() else None
    if actual is not None and actual != artifact["sha256"]:
        checks.append(Check("identity", "fail", f"sha256 {actual} differs from the manifest's {artifact['sha256']}",
                            {"file_sha256": actual, "manifest_sha256": artifact["sha256"]}))
        return result
    profile = load_profile(artifact["profile"])
    try:
        runtime = open_runtime(path, artifact["format"], profile.verify.runtime)
    except Exception as err:  # a corrupt file or missing metadata is a failed check, not a crash
        checks.append(Check("identity", "fail", f"cannot open {path} with {profile.verify.runtime}: "
                                                f"{type(err).__name__}: {str(err)[:300]}"))
        return result
    file_space = runtime.metadata.get("space_id")
    if file_space != manifest["space_id"]:
        checks.append(Check("identity", "fail", f"space id in the file {file_space!r} differs from the cloud "
                                                f"gallery's {manifest['space_id']!r}",
                            {"file_space_id": file_space, "gallery_space_id": manifest["space_id"]}))
        return result
    checks.append(Check("identity", "pass", f"sha256 and space id {file_space} match"))

    size = runtime.metadata["input_size"]
    images = resize_to(split.test.floats()[queries], size).numpy()
    ours = torch.from_numpy(runtime.embed(images))
    reference = torch_embeddings[artifact["member"]][queries]
    cosine = torch.nn.functional.cosine_similarity(ours, reference, dim=1)
    tolerance = profile.tolerances
    parity_ok = cosine.min().item() >= tolerance.min_cosine
    checks.append(Check("parity", "pass" if parity_ok else "fail",
                        f"cosine to torch min {cosine.min():.6f} / mean {cosine.mean():.6f} "
                        f"(tolerance {tolerance.min_cosine})",
                        {"min_cosine": cosine.min().item(), "mean_cosine": cosine.mean().item()}))

    cloud = next(m["name"] for m in manifest["members"] if m["role"] == "cloud")
    labels = split.test.labels
    gallery = torch_embeddings[cloud][split.gallery_index]
    via_runtime = retrieval_metrics(ours, labels[queries], gallery, labels[split.gallery_index])
    via_torch = retrieval_metrics(reference, labels[queries], gallery, labels[split.gallery_index])
    drop = via_torch["top1"] - via_runtime["top1"]
    agreement = ((ours @ gallery.T).argmax(1) == (reference @ gallery.T).argmax(1)).float().mean().item()
    checks.append(Check("retrieval", "pass" if drop <= tolerance.max_top1_drop else "fail",
                        f"M[{artifact['member']} via {runtime.name}][{cloud}] top-1 {via_runtime['top1']:.4f} vs "
                        f"torch {via_torch['top1']:.4f} (drop {drop:+.4f}, allowed {tolerance.max_top1_drop}); "
                        f"nearest gallery item unchanged for {agreement:.1%}",
                        {"runtime": via_runtime, "torch": via_torch, "top1_drop": drop, "top1_agreement": agreement}))
    return result


def verify(run_dir: str | Path, profile: str | None = None, max_images: int | None = None) -> dict:
    """Verify every artifact in the manifest (or those of one profile); write DIR/verify.json."""
    from hetero.config import load_config
    from hetero.data import load_split
    from hetero.train import load_member

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    artifacts = [a for a in manifest.get("artifacts", []) if profile in (None, a["profile"])]
    config = load_config(run_dir / "config.yaml")
    split = load_split(config.data, config.load_size)
    queries = _subset(split.query_index, max_images or config.export.verify_images)
    images = split.test.floats()
    needed = {a["member"] for a in artifacts} | {m["name"] for m in manifest["members"] if m["role"] == "cloud"}
    torch_embeddings = {name: embed(load_member(run_dir, manifest, name), images) for name in sorted(needed)}
    results = [verify_artifact(run_dir, manifest, a, split, torch_embeddings, queries) for a in artifacts]
    report = {
        "space_id": manifest["space_id"], "queries": len(queries), "gallery": len(split.gallery_index),
        "passed": bool(artifacts) and all(r.passed for r in results),
        "artifacts": [{**asdict(r), "passed": r.passed} for r in results],
    }
    atomic_write_json(run_dir / "verify.json", report)
    return report


def format_verify(report: dict):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"Verification of {len(report['artifacts'])} artifact(s) on {report['queries']} held-out "
                        f"queries vs {report['gallery']} cloud-gallery images")
    for column in ("member", "profile", "check", "status", "detail"):
        table.add_column(column)
    for artifact in report["artifacts"]:
        for check in artifact["checks"]:
            style = {"pass": "green", "fail": "bold red", "skip": "yellow"}[check["status"]]
            table.add_row(artifact["member"], artifact["profile"], check["name"],
                          f"[{style}]{check['status']}[/]", escape(check["detail"]))
    return table
