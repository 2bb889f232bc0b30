"""One latency protocol for the search's timing of a candidate and verify's timing of an exported member.

They must be the same measurement, or a student chosen for a latency budget fails that budget in verify: both
call `time_batch1`, with LATENCY_RUNS runs by default (search.latency_runs, `hetero verify --latency-runs`).
Light on purpose (numpy is imported when timing), so configs and the CLI can read the defaults.
"""
from __future__ import annotations

import os
import time

LATENCY_RUNS = 100  # enough batch-1 runs that the median of a sub-millisecond model holds on a loaded machine
LATENCY_WARMUP = 5  # untimed runs first: lazy initialisation, allocator and caches


def time_batch1(runtime, image, runs: int = LATENCY_RUNS, warmup: int = LATENCY_WARMUP) -> dict:
    """Batch-1 latency of an opened runtime (in process or isolated) on one image (NCHW floats in [0, 1] at
    the artifact's input size): `warmup` untimed runs, then the median of `runs` timed ones (ms).

    Each run is timed around `embed` (the layout change and a fixed-batch file's padding included, as an app
    pays them), except that a runtime reporting its own time per run (`last_run_seconds`: an isolated
    worker) is taken at its word, leaving out the request protocol.  The runtime runs with its adapter's own
    session options (onnxruntime's default threads), the same class whichever caller opened it.
    `protocol` says all of it, for the records.
    """
    import numpy as np

    one = np.ascontiguousarray(image[:1], dtype=np.float32)
    for _ in range(warmup):
        runtime.embed(one)
    times = []
    for _ in range(max(1, runs)):
        started = time.perf_counter()
        runtime.embed(one)
        wall = time.perf_counter() - started
        times.append(getattr(runtime, "last_run_seconds", wall) * 1000)
    own_clock = hasattr(runtime, "last_run_seconds")
    return {"median_ms": float(np.median(times)), "p10_ms": float(np.percentile(times, 10)),
            "p90_ms": float(np.percentile(times, 90)), "runs": len(times),
            "protocol": latency_protocol(len(times), warmup, own_clock, getattr(runtime, "name", None))}


def latency_protocol(runs: int = LATENCY_RUNS, warmup: int = LATENCY_WARMUP, own_clock: bool = False,
                     runtime: str | None = None) -> dict:
    """What `time_batch1` measured, as recorded beside the figures."""
    return {"function": "hetero.latency.time_batch1", "batch": 1, "warmup": warmup, "runs": runs,
            "statistic": "median", "input": "one real image at the artifact's input size",
            "clock": "the runtime worker's own time per run" if own_clock else "wall time of embed() in this process",
            "session": "the runtime adapter's own options (onnxruntime: its default intra-op threads)",
            "runtime": runtime, "cpus": os.cpu_count()}
