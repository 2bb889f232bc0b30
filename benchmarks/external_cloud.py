"""Bring your own cloud, on Omniglot: students of an external ONNX cloud trained without labels.

From a trained family (default runs/omniglot, from `make omniglot`), its cloud is exported to ONNX and used as
an *external* cloud: a frozen file hetero did not train.  Then, side by side on the same seed and edge epochs:

- native: the family's own edges (labeled data, trained against the cloud in torch): read from its report;
- unlabeled: the same edge members trained against the ONNX file from the training images alone (copied flat
  into one folder, no class folders), evaluated on the usual held-out split (`data.eval`);
- unlabeled + teacher cache: the same, reading the cloud's embeddings of K views per image from the cache;
- adapter: edges trained independently (their own classifiers, labels used) and then mapped into the cloud's
  space with a map fitted on the training images (Procrustes, and a low-rank affine map).

Columns: M[edge][cloud] per edge, M[cloud][cloud], the label-free figures of the unlabeled rows, and the edge
phase's seconds (the cache row also shows the cache build).  The rows train one after the other.

    python benchmarks/external_cloud.py runs/omniglot                 # ~1 h on 2 CPU cores
    python benchmarks/external_cloud.py runs/omniglot --quick         # 3 edge epochs, 2 views: ~5 min
    python benchmarks/external_cloud.py runs/omniglot --keep runs/byo --rows unlabeled cached

One record per row (``benchmarks/results/external_cloud/<family>-<row>[-quick].json``, row: native, unlabeled,
cached, adapter-procrustes, adapter-affine-rank<r>) with the columns above.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import records  # noqa: E402
from hetero.config import parse_config  # noqa: E402
from hetero.evaluate import evaluate  # noqa: E402
from hetero.maths import compatibility_matrix  # noqa: E402
from hetero.family import FamilyStore  # noqa: E402
from hetero.training import train  # noqa: E402

ROWS = ("unlabeled", "cached", "adapter")


def export_cloud(store: FamilyStore, path: Path) -> Path:
    """The family's cloud as an ONNX file (the server profile's fp32 export), written outside the family."""
    from hetero import formats
    from hetero.exporter import artifact_metadata
    from hetero.profiles import load_profile

    if path.is_file():
        return path
    profile = load_profile("server-onnx-fp32")
    model = store.load_member(store.cloud.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    formats.get("onnx").export_function()(model, path, profile, artifact_metadata(store, store.cloud, profile))
    return path


def unlabeled_copy(store: FamilyStore, folder: Path) -> int:
    """The training images of the family's data, copied flat into `folder` under hashed names: no classes."""
    from hetero.data import OMNIGLOT_TEST_ALPHABETS, ImageReader, list_images

    config = store.config()
    held_out = set(config.data.test_groups or OMNIGLOT_TEST_ALPHABETS)
    folder.mkdir(parents=True, exist_ok=True)
    seen, reader = set(), ImageReader()
    for entry in list_images(Path(config.data.path)):
        rel = entry.name
        parts = PurePosixPath(rel).parts
        key = "/".join(parts[1:] if len(parts) > 3 else parts)  # as the family reads it: zips hold a top folder
        if key.split("/")[0] in held_out or key in seen:  # the same drawing in two zips is read once there too
            continue
        seen.add(key)
        target = folder / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}{PurePosixPath(rel).suffix}"
        if not target.exists():
            target.write_bytes(reader.read(entry))
    return len(seen)


def row_config(base: dict, cloud: Path, images: Path | None, edge_epochs: int, **train) -> dict:
    config = copy.deepcopy(base)
    config["family"]["name"] = f"{config['family']['name']}-external"
    members = [m for m in config["family"]["members"] if m["role"] != "cloud"]
    config["family"]["members"] = [{"name": "cloud", "role": "cloud", "model": str(cloud)}] + members
    for member in members:
        for key in ("model", "weights", "frozen", "mean", "std", "colour_order"):
            member.pop(key, None)
    data = config["data"]
    if images is not None:  # unlabeled: the images only; the labeled set only for evaluation
        config["data"] = {"source": "unlabeled", "path": str(images), "background": data["background"],
                          "eval": {"source": data["source"], "path": data["path"], "test_groups": data["test_groups"]}}
    config["train"].update(edge_epochs=edge_epochs, epochs=edge_epochs, **train)
    if images is not None:
        config["train"]["losses"] = {k: v for k, v in config["train"]["losses"].items() if k != "contrastive"}
    return config


def edge_seconds(store: FamilyStore) -> float:
    history = store.manifest.training.history
    return history[-1].seconds if history else 0.0


def median_epoch_seconds(store: FamilyStore, first_epoch: int = 1) -> float:
    """The median of the edge phase's epoch times: robust to a burst of other work on a shared machine."""
    import statistics

    history = [h for h in store.manifest.training.history if h.epoch >= first_epoch - 1]
    steps = [b.seconds - a.seconds for a, b in zip(history, history[1:]) if b.epoch >= first_epoch]
    return round(statistics.median(steps), 1) if steps else 0.0


def summary(key: str, name: str, store: FamilyStore, report: dict, seconds: float, extra: dict | None = None,
            first_epoch: int = 1) -> dict:
    return {"key": key, "row": name, "dir": str(store.root), "space_id": store.space_id,
            "median_epoch_seconds": median_epoch_seconds(store, first_epoch),
            "edges": {e: round(v["edge_vs_cloud_top1"], 4) for e, v in report["edges"].items()},
            "cloud_cloud": round(report["matrix"][report["cloud"]][report["cloud"]]["top1"], 4),
            "label_free": report.get("label_free"), "edge_phase_seconds": round(seconds, 1), **(extra or {})}


def write_record(row: dict, native: FamilyStore, args, epochs: int, views: int) -> Path:
    """The row's record, written as soon as the row is measured (a long run stopped midway keeps its rows)."""
    figures = {"edge_vs_cloud_top1": row["edges"], "cloud_cloud_top1": row["cloud_cloud"],
               "label_free_agreement_top1": {e: v["agreement_top1"] for e, v in row["label_free"].items()}
               if row.get("label_free") else None,
               "edge_phase_s": row["edge_phase_seconds"], "median_epoch_s": row["median_epoch_seconds"]}
    extra = {k: row[k] for k in ("space_id", "teacher_cache", "adapter") if k in row}
    return records.write("external_cloud", records.key_of(native.name, row["key"], quick=args.quick), figures,
                         wall_s=row["wall_s"], seeds=[native.config().train.seed], quick=args.quick, row=row["row"],
                         family=records.relative(args.family), edge_epochs=epochs, views=views, **extra)


def train_row(config: dict, out: Path) -> FamilyStore:
    if (out / "manifest.json").is_file():
        return FamilyStore.open(out)
    return train(parse_config(config, str(out)), out, progress=False, overwrite=True)


def adapter_rows(store: FamilyStore, report: dict, rank: int) -> list[dict]:
    """The adapter family's Procrustes row, and an affine map of rank `rank` fitted to the same edges."""
    from hetero.adapters import fit_affine
    from hetero.models import add_adapter, embed_images

    rows = [summary("adapter-procrustes", "adapter: Procrustes on independently trained edges", store, report,
                    edge_seconds(store), {"adapter": {m.name: m.adapter for m in store.edges}})]
    split = store.split()
    cloud = store.load_member(store.cloud.name)
    train_images, test_images = split.train.floats(), split.test.floats()
    embeddings = {store.cloud.name: embed_images(cloud, test_images)}
    reference = embed_images(cloud, train_images)
    for edge in store.edges:
        member = store.load_member(edge.name)
        member.adapter = None  # back to the edge's own space
        weight, bias = fit_affine(embed_images(member, train_images), reference, rank)
        add_adapter(member, weight, bias)
        embeddings[edge.name] = embed_images(member, test_images)
    matrix = compatibility_matrix(embeddings, split.test.labels, split.query_index, split.gallery_index)
    cloud_name = store.cloud.name
    rows.append({"key": f"adapter-affine-rank{rank}", "row": f"adapter: affine, rank {rank}, same edges",
                 "dir": str(store.root),
                 "edges": {e.name: round(matrix[e.name][cloud_name]["top1"], 4) for e in store.edges},
                 "cloud_cloud": round(matrix[cloud_name][cloud_name]["top1"], 4), "label_free": None,
                 "edge_phase_seconds": rows[0]["edge_phase_seconds"],
                 "median_epoch_seconds": rows[0]["median_epoch_seconds"]})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", nargs="?", default=str(ROOT / "runs" / "omniglot"),
                        help="a trained family whose cloud becomes the external cloud (default runs/omniglot)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--edge-epochs", type=int, help="edge epochs of every row (default: the family's own)")
    parser.add_argument("--views", type=int, default=8, help="teacher cache views per image (default 8)")
    parser.add_argument("--rank", type=int, default=32, help="rank of the affine adapter (default 32)")
    parser.add_argument("--quick", action="store_true", help="3 edge epochs and 2 views: checks the rows run (a "
                                                             "smoke test, never a result)")
    parser.add_argument("--keep", help="train the rows into this directory (a second run reuses finished rows)")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    native = FamilyStore.open(args.family)
    base = native.config().to_dict()
    epochs = 3 if args.quick else args.edge_epochs or base["train"]["edge_epochs"] or base["train"]["epochs"]
    views = 2 if args.quick else args.views
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="hetero-byo-"))
    cloud = export_cloud(native, work / "cloud.onnx")
    images = work / "unlabeled"
    print(f"external cloud {cloud}; {unlabeled_copy(native, images)} training images copied flat into {images}; "
          f"{epochs} edge epochs", flush=True)

    native_report = evaluate(native)
    history = native.manifest.training.history
    cloud_phase_end = next((h.seconds for h in history if h.epoch == base["train"]["epochs"]), 0.0)
    native_edges = history[-1].seconds - cloud_phase_end if history else 0.0
    rows = [summary("native", f"native: labeled, cloud trained in torch ({base['train']['edge_epochs']} edge epochs)",
                    native, native_report, native_edges, first_epoch=base["train"]["epochs"] + 2)]
    rows[0]["wall_s"] = time.perf_counter() - started
    write_record(rows[0], native, args, epochs, views)
    for name in args.rows:
        started, before = time.perf_counter(), len(rows)
        out = work / f"row-{name}"
        if name == "unlabeled":
            store = train_row(row_config(base, cloud, images, epochs), out)
        elif name == "cached":
            store = train_row(row_config(base, cloud, images, epochs, teacher_cache={
                "views": views, "dir": str(work / f"teacher-cache-{views}")}), out)
        else:
            store = train_row(row_config(base, cloud, None, epochs, compat="adapter",
                                         adapter={"kind": "procrustes"}), out)
        report = evaluate(store)
        if name == "adapter":
            rows += adapter_rows(store, report, args.rank)
        else:
            label = {"unlabeled": "unlabeled, ONNX cloud", "cached": f"unlabeled, ONNX cloud, teacher cache ({views} "
                                                                     f"views)"}[name]
            extra = {"teacher_cache": store.manifest.training.teacher_cache} if name == "cached" else {}
            rows.append(summary(name, label, store, report, edge_seconds(store), extra))
        for row in rows[before:]:  # the adapter's two rows share their training
            row["wall_s"] = time.perf_counter() - started
            write_record(row, native, args, epochs, views)
        print(json.dumps(rows[-1]), flush=True)

    edges = list(rows[0]["edges"])
    print(f"\n| row | {' | '.join(f'{e} M[e][cloud]' for e in edges)} | M[cloud][cloud] | label-free agreement "
          f"({', '.join(edges)}) | edge phase s | median s/epoch |")
    print("| --- |" + " ---: |" * (len(edges) + 4))
    for row in rows:
        agreement = ", ".join(f"{row['label_free'][e]['agreement_top1']:.3f}" for e in edges) \
            if row.get("label_free") else "-"
        scores = " | ".join(f"{row['edges'][e]:.3f}" for e in edges)
        print(f"| {row['row']} | {scores} | {row['cloud_cloud']:.3f} | {agreement} | {row['edge_phase_seconds']:,.0f} | "
              f"{row['median_epoch_seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
