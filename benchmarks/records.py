"""Results records: every figure a user reads is a JSON file a benchmark wrote, never a number typed by hand.

A record lives at ``benchmarks/results/<benchmark>/<key>.json`` (``$HETERO_RESULTS_DIR/<benchmark>/`` when
that is set: smoke runs and tests write there, never into the checkout's records) and says how it was made:
the command line, the commit (and whether the tree had uncommitted changes), the date, the machine (CPU
model, cores, bf16 support, GPU), the wall time, the recipe's config hash, the seeds, whether it was a
``--quick`` smoke test, and the figures.  ``benchmarks/render_results.py`` turns the records into the docs'
results page; a record whose config hash no longer matches the current example is shown there as stale,
with its command.  Every script in benchmarks/ but the two tools (``TOOLS``) writes records: the test suite
checks that each calls ``records.write``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"  # the checkout's records; $HETERO_RESULTS_DIR stands in for it
ENV = "HETERO_RESULTS_DIR"
SCHEMA = 1
TOOLS = {"records", "render_results"}  # the scripts in benchmarks/ that measure nothing themselves


def results_dir() -> Path:
    """Where records are read and written: $HETERO_RESULTS_DIR when set, else benchmarks/results/."""
    return Path(os.environ.get(ENV) or RESULTS)


@contextlib.contextmanager
def results_in(folder: Path):
    """Read and write records in `folder` for the duration, as $HETERO_RESULTS_DIR=folder would."""
    before = os.environ.get(ENV)
    os.environ[ENV] = str(folder)
    try:
        yield Path(folder)
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def benchmark_scripts() -> list[Path]:
    """Every script in benchmarks/ that measures something (and so writes records): all but the tools."""
    return sorted(p for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in TOOLS)


def key_of(*parts, quick: bool = False) -> str:
    """A record's key from the parts that name its cell (model, profile, seed, ...): lower case, any run of
    other characters as one '-', and '-quick' last for a smoke test, so it never replaces a full run's record."""
    text = "-".join(str(part) for part in parts if part not in (None, ""))
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") + ("-quick" if quick else "")


def relative(path: str | Path | None) -> str | None:
    """A file as a record names it (a `recipe`, a model): its path in the checkout, so that the record reads the
    same on any clone (and a recipe's staleness can be checked there); the absolute path of a file outside it."""
    if not path:
        return None
    path = Path(path).resolve()
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def commit() -> dict:
    """The checkout's commit and whether tracked files differ from it (a record of a dirty tree says so); the
    records folder is left out: a record an earlier cell of the same run wrote changes no code."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    return {"sha": git("rev-parse", "HEAD") or None, "dirty": bool(changed)}


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


def machine_tag(found: dict) -> str:
    """A short name of a machine (`machine()`'s dict) for record keys: two machines' figures are two cells."""
    words = re.sub(r"\(r\)|\(tm\)|processor|\bcpu\b|@.*", " ", found["cpu"].lower())
    tag = "-".join(re.findall(r"[a-z0-9]+", words)) or "cpu"
    if found.get("cpu_bf16"):
        tag += "-bf16"
    if found.get("gpu"):
        tag += "-" + "-".join(re.findall(r"[a-z0-9]+", found["gpu"].lower()))
    return tag


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
    return results_dir() / benchmark / f"{key}.json"


def read(benchmark: str, key: str) -> dict | None:
    path = record_path(benchmark, key)
    return json.loads(path.read_text()) if path.is_file() else None


def read_all(benchmark: str | None = None) -> list[dict]:
    root = results_dir()
    folders = [root / benchmark] if benchmark else sorted(p for p in root.glob("*") if p.is_dir())
    return [json.loads(p.read_text()) for folder in folders for p in sorted(folder.glob("*.json"))]


def command(argv: list[str]) -> str:
    """The command line as a shell takes it, the script's path relative to the checkout when it lies inside (as
    the docs write it)."""
    argv = list(argv)
    if argv and argv[0].endswith(".py"):
        with contextlib.suppress(ValueError):
            argv[0] = Path(argv[0]).resolve().relative_to(ROOT).as_posix()
    return shlex.join(["python", *argv])


def rounded(value, digits: int = 6):
    """`value` with every float to `digits` significant digits: a timing's 17th digit is noise, not a figure."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, digits) for v in value]
    return value


def write(benchmark: str, key: str, figures: dict, *, wall_s: float, recipe: str | None = None,
          overrides: list[str] = (), seeds: list[int] | None = None, quick: bool = False,
          argv: list[str] | None = None, **extra) -> Path:
    """Write one record atomically; `recipe` (a path under the checkout) and `overrides` give its hash."""
    record = {
        "schema": SCHEMA, "benchmark": benchmark, "key": key,
        "command": command(argv if argv is not None else sys.argv),
        "commit": commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
        "wall_s": round(wall_s, 1), "recipe": recipe, "overrides": list(overrides),
        "config_hash": config_hash(recipe, overrides) if recipe else None,
        "seeds": seeds, "quick": quick, "figures": rounded(figures), **rounded(extra),
    }
    path = record_path(benchmark, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path
