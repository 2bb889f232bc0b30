"""Results records: every figure a user reads is a JSON file a benchmark wrote, never a number typed by hand.

A record lives at ``benchmarks/results/<benchmark>/<key>.json`` and says how it was made: the command line,
the commit (and whether the tree had uncommitted changes), the date, the machine (CPU model, cores, bf16
support, GPU), the wall time, the recipe's config hash, the seeds, whether it was a ``--quick`` smoke test,
and the figures.  ``benchmarks/render_results.py`` turns the records into the docs' results page; a record
whose config hash no longer matches the current example is shown there as stale, with its command.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCHEMA = 1


def commit() -> dict:
    """The checkout's commit and whether tracked files differ from it (a record of a dirty tree says so)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"sha": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def machine() -> dict:
    """What a figure depends on: the processor, its cores, native bf16, the GPU, and the library versions."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "cpu_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}), "gpu": gpu,
            "python": platform.python_version(), "torch": torch.__version__, "os": platform.system(),
            # other work on the machine slows a timed run: the load averages when the record was written
            "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def config_hash(recipe: str | Path, overrides: list[str] = ()) -> str:
    """The recipe a figure belongs to: sha256 of the config file's YAML data and the --set overrides on it.

    The YAML as written, not the validated config: validation resolves paths against the checkout, which
    differs per machine; and not the text, so that rewording a comment leaves the figures current.
    """
    import yaml

    path = Path(recipe) if Path(recipe).is_absolute() else ROOT / recipe
    data = {"config": yaml.safe_load(path.read_text()), "overrides": list(overrides)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def record_path(benchmark: str, key: str) -> Path:
    return RESULTS / benchmark / f"{key}.json"


def read(benchmark: str, key: str) -> dict | None:
    path = record_path(benchmark, key)
    return json.loads(path.read_text()) if path.is_file() else None


def read_all(benchmark: str | None = None) -> list[dict]:
    folders = [RESULTS / benchmark] if benchmark else sorted(p for p in RESULTS.glob("*") if p.is_dir())
    return [json.loads(p.read_text()) for folder in folders for p in sorted(folder.glob("*.json"))]


def write(benchmark: str, key: str, figures: dict, *, wall_s: float, recipe: str | None = None,
          overrides: list[str] = (), seeds: list[int] | None = None, quick: bool = False,
          argv: list[str] | None = None, **extra) -> Path:
    """Write one record atomically; `recipe` (a path under the checkout) and `overrides` give its hash."""
    record = {
        "schema": SCHEMA, "benchmark": benchmark, "key": key,
        "command": " ".join(["python", *(argv if argv is not None else sys.argv)]),
        "commit": commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
        "wall_s": round(wall_s, 1), "recipe": recipe, "overrides": list(overrides),
        "config_hash": config_hash(recipe, overrides) if recipe else None,
        "seeds": seeds, "quick": quick, "figures": figures, **extra,
    }
    path = record_path(benchmark, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path
