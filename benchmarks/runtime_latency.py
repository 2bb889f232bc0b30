"""Per-runtime latency (batch 1) and throughput (batch 32) of each edge member, side by side.

    python benchmarks/runtime_latency.py runs/quickstart          # a trained family (and its exported files)
    python benchmarks/runtime_latency.py --config examples/quickstart.yaml   # untrained members: timing only

For every edge member it times, in one process and interleaved round by round so that load from other
processes hits every runtime alike:
  - torch eager fp32 (the member as trained), the reference of every ratio;
  - onnxruntime fp32 (exported here with the project's ONNX exporter, dynamic batch);
  - onnxruntime int8 (static QDQ, per-channel weights, calibrated here on --calibration images);
  - every artifact already registered in the family manifest (LiteRT, ONNX fp16/int8, ...) through
    `hetero.export.open_runtime`, i.e. exactly what `hetero verify` runs.
Latency is the median wall time of one batch-1 call; throughput is images/s of one batch-32 call (fixed-
batch artifacts are called once per image, as a device would).  The int8 numbers here are speed only:
accuracy of quantised artifacts is `hetero verify`'s job.  Threads: torch and onnxruntime both use
--threads (default 1).

One record per member (``benchmarks/results/runtime_latency/<family or config>-<member>-<threads>threads.json``):
per runtime its batch-1 ms, batch-32 images/s and both against torch.
"""
from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import records  # noqa: E402


def _export_onnx(model, path: Path, metadata: dict) -> Path:
    from hetero.export.onnx import export_onnx
    from hetero.profiles import load_profile

    export_onnx(model, path, load_profile("server-onnx-fp32"), metadata)
    return path


def _quantize_int8(source: Path, target: Path, size: int, images: np.ndarray) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": images[i:i + 16]} for i in range(0, len(images), 16)])

        def get_next(self):
            return next(self.batches, None)

    prepared = target.with_suffix(".pre.onnx")
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    return target


def _ort(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    # No busy-waiting between calls: spinning pool threads would steal the cores from the runtime timed next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _members(args) -> tuple[list[tuple[str, torch.nn.Module, dict]], object]:
    """(name, torch model, artifact metadata) per edge member; the family (None for untrained members)."""
    from hetero.exporter import artifact_metadata
    from hetero.profiles import load_profile

    profile = load_profile("server-onnx-fp32")
    if args.family:
        from hetero.family import FamilyStore

        store = FamilyStore.open(args.family)
        out = [(m.name, store.load_member(m.name), artifact_metadata(store, m, profile)) for m in store.edges]
        return out, store
    from hetero.config import load_config
    from hetero.models import build_member

    config = load_config(args.config)
    out = []
    for cfg in config.family.edges:
        model = build_member(cfg, config.family.embedding_dim).eval()
        meta = {"space_id": "untrained", "member": cfg.name, "input_size": cfg.input_size, "layout": "NCHW"}
        out.append((cfg.name, model, meta))
    return out, None


def _time(fn, x: np.ndarray, warmup: int) -> float:
    for _ in range(warmup):
        fn(x)
    started = time.perf_counter()
    fn(x)
    return time.perf_counter() - started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("family", nargs="?", help="trained family directory")
    source.add_argument("--config", help="family config: time untrained members (no family directory needed)")
    parser.add_argument("--runs", type=int, default=15, help="timed calls per runtime and batch size (median)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for torch and onnxruntime (default 1: on a shared 2-core host, 2-thread "
                             "timings swung 5x with load from other processes)")
    parser.add_argument("--calibration", type=int, default=64, help="images to calibrate the int8 model on")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from hetero import formats
    from hetero.profiles import load_profile

    members, store = _members(args)
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
          f"median of {args.runs} calls, runtimes interleaved")
    header = (f"{'member':<8} | {'runtime':<28} | {'batch-1 ms':>10} | {'batch-32 img/s':>14} | "
              f"{'vs torch b1':>11} | {'vs torch b32':>12}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, meta in members:
            started, skipped = time.perf_counter(), {}
            size = meta["input_size"]
            rng = np.random.default_rng(0)
            calib = rng.random((args.calibration, 3, size, size), dtype=np.float32)
            fp32 = _export_onnx(model, Path(tmp) / f"{name}.onnx", meta)
            int8 = _quantize_int8(fp32, Path(tmp) / f"{name}.int8.onnx", size, calib)

            def torch_eager(x, model=model):
                with torch.inference_mode():
                    return model(torch.from_numpy(x)).numpy()

            runtimes = {"torch eager fp32": torch_eager, "onnxruntime fp32": _ort(fp32, args.threads),
                        "onnxruntime int8 QDQ static": _ort(int8, args.threads)}
            for artifact in store.artifacts() if store else []:
                if artifact.member != name:
                    continue
                label = f"{artifact.format} {artifact.precision} ({artifact.profile})"
                try:
                    runtime = formats.get(artifact.format).open(store.artifact_path(artifact),
                                                                load_profile(artifact.profile).verify.runtime)
                except Exception as err:  # e.g. CoreML on Linux: say so, keep timing the others
                    print(f"{name:<8} | {label[:28]:<28} | skipped: {type(err).__name__}: {str(err)[:60]}")
                    skipped[label] = f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"
                    continue
                runtimes[label] = runtime.embed
            one = rng.random((1, 3, size, size), dtype=np.float32)
            many = rng.random((32, 3, size, size), dtype=np.float32)
            times = {label: ([], []) for label in runtimes}
            for _ in range(args.runs):  # interleaved: round r times every runtime once
                for label, fn in runtimes.items():
                    times[label][0].append(_time(fn, one, warmup=1 if not times[label][0] else 0))
                    times[label][1].append(_time(fn, many, warmup=1 if not times[label][1] else 0))
            base1 = statistics.median(times["torch eager fp32"][0])
            base32 = statistics.median(times["torch eager fp32"][1])
            figures = {}
            for label, (b1, b32) in times.items():
                t1, t32 = statistics.median(b1), statistics.median(b32)
                print(f"{name:<8} | {label[:28]:<28} | {t1 * 1e3:>10.3f} | {32 / t32:>14,.0f} | "
                      f"{base1 / t1:>10.2f}x | {base32 / t32:>11.2f}x")
                figures[label] = {"batch1_ms": t1 * 1e3, "batch32_images_per_s": 32 / t32,
                                  "batch1_vs_torch": base1 / t1, "batch32_vs_torch": base32 / t32}
            source = Path(args.family).name if args.family else Path(args.config).stem
            records.write("runtime_latency", records.key_of(source, name, f"{args.threads}threads"),
                          {**figures, **({"skipped": skipped} if skipped else {})},
                          wall_s=time.perf_counter() - started, recipe=records.relative(args.config),
                          family=records.relative(args.family), runs=args.runs, threads=args.threads,
                          calibration=args.calibration)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"peak resident memory of this process: {peak:,.0f} MB")


if __name__ == "__main__":
    main()
