"""Which timm / torchvision edge architectures export to which device profile, and verify there.

Trains a small family on the built-in procedural glyphs whose edges are library backbones (briefly: parity
checks need a trained network, not a random one), exports every edge to every profile, and verifies each file
in its runtime (parity and retrieval against the cloud gallery; CoreML: structure only off macOS).  Prints an
architecture x profile table: `ok`, `FAIL (check)` when the file does not verify, or the converter's refusal.

    python benchmarks/library_backbones.py                         # the default edges below, ~15 min
    python benchmarks/library_backbones.py --edges timm/resnet10t --profiles server-onnx-fp32
    python benchmarks/library_backbones.py --config examples/timm_family.yaml --epochs 6

One record per architecture (``benchmarks/results/library_backbones/<config or procedural>-<arch>.json``): its
M[edge][cloud] in the small family, and its cell of the table per profile.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import records  # noqa: E402

DEFAULT_EDGES = ["timm/resnet10t", "timm/resnet14t", "torchvision/resnet18", "timm/mobilenetv3_small_100",
                 "torchvision/mobilenet_v3_small", "timm/efficientnet_b0"]


def family_config(edges: list[str], epochs: int) -> dict:
    members = [{"name": "cloud", "role": "cloud", "arch": "timm/resnet18", "input_size": 64}]
    members += [{"name": arch.split("/")[1].replace("_", "-")[:40], "role": "edge", "arch": arch, "input_size": 48}
                for arch in edges]
    return {"family": {"name": "library-backbones", "embedding_dim": 64, "members": members},
            "data": {"source": "procedural", "num_classes": 160, "samples_per_class": 12, "test_fraction": 0.375,
                     "image_size": 64},
            "train": {"epochs": epochs, "batch_size": 96, "seed": 0}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a family config to use instead (its edges, its data)")
    parser.add_argument("--edges", nargs="+", default=DEFAULT_EDGES, help="edge architectures (timm/, torchvision/)")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs of the small family (default 4)")
    parser.add_argument("--profiles", nargs="+", help="device profiles (default: every built-in one)")
    parser.add_argument("--out", help="family directory (default: a temporary one)")
    args = parser.parse_args(argv)

    from hetero.config import load_config, parse_config
    from hetero.evaluate import evaluate
    from hetero.exporter import export_member
    from hetero.family import FamilyStore
    from hetero.profiles import all_profiles, load_profile
    from hetero.training import train
    from hetero.verify import verify

    config = load_config(args.config) if args.config else parse_config(family_config(args.edges, args.epochs), "edges")
    if args.config:
        config.train.epochs = args.epochs
    out = Path(args.out or tempfile.mkdtemp(prefix="hetero-backbones-"))
    started = time.perf_counter()
    store = FamilyStore.open(out) if (out / "manifest.json").is_file() else train(config, out, progress=False,
                                                                                    overwrite=True)
    report = evaluate(store)
    trained = time.perf_counter() - started
    print(f"trained {store.name} in {trained:.0f} s: M[edge][cloud] "
          + ", ".join(f"{e} {r['edge_vs_cloud_top1']:.3f}" for e, r in report["edges"].items()), flush=True)
    profiles = [load_profile(p) for p in args.profiles] if args.profiles else all_profiles()
    table: dict[str, dict[str, str]] = {}
    for edge in store.edges:
        began = time.perf_counter()
        for profile in profiles:
            try:
                with store.lock("export"):
                    export_member(store, edge.name, profile, allow_over_budget=True)
            except Exception as err:  # a converter refusing an op is the finding, not a crash of the benchmark
                table.setdefault(edge.arch, {})[profile.name] = f"export refused: {' '.join(str(err).split())[:160]}"
                print(f"{edge.arch} @ {profile.name}: {table[edge.arch][profile.name]}", flush=True)
                continue
            result, _ = verify(store.reload(), profile=profile.name, latency_runs=3, write=False)
            artifact = next(a for a in result["artifacts"] if a["member"] == edge.name)
            # A budget (params, MFLOPs, size, latency) is the profile's choice of device, not a fault of the file.
            failed = [c["name"] for c in artifact["checks"] if c["status"] == "fail"
                      and not c["name"].startswith("budget")]
            over = [c["name"].removeprefix("budget_") for c in artifact["checks"] if c["status"] == "fail"
                    and c["name"].startswith("budget")]
            skipped = [c["name"] for c in artifact["checks"] if c["status"] == "skip"]
            parity = next((c["values"].get("min_cosine") for c in artifact["checks"] if c["name"] == "parity"
                           and c.get("values")), None)
            if failed:
                cell = f"FAIL ({', '.join(failed)})"
            else:
                cell = "ok" + (f" (min cos {parity:.4f})" if parity is not None else "") + (
                    " (structure only)" if "parity" in skipped else "")
            if over:
                cell += f", over the {'/'.join(over)} budget"
            table.setdefault(edge.arch, {})[profile.name] = cell
            print(f"{edge.arch} @ {profile.name}: {cell}", flush=True)
        figures = {"edge_vs_cloud_top1": report["edges"][edge.name]["edge_vs_cloud_top1"],
                   "profiles": table.get(edge.arch, {}), "family_train_s": trained}
        records.write("library_backbones", records.key_of(Path(args.config).stem if args.config else "procedural",
                                                          edge.arch), figures,
                      wall_s=time.perf_counter() - began, recipe=records.relative(args.config),
                      overrides=[f"train.epochs={args.epochs}"], seeds=[config.train.seed], epochs=args.epochs)
    print(f"\n| architecture | {' | '.join(p.name for p in profiles)} |")
    print("| --- |" + " --- |" * len(profiles))
    for arch, row in table.items():
        print(f"| {arch} | {' | '.join(row.get(p.name, '-') for p in profiles)} |")
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
