"""The import graph: acyclic and layered as pyproject.toml's import-linter contracts declare.

import-linter reads the package from disk.  In this checkout `hetero.export` lives in export/ (mapped by
pyproject's package-dir), so the check runs on a copy laid out as installed: hetero/ with export/ and
device_profiles/ inside it.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def installed_layout(target: Path) -> Path:
    package = target / "hetero"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "hetero", package, ignore=ignore)
    shutil.copytree(ROOT / "export", package / "export", ignore=ignore)
    shutil.copytree(ROOT / "device_profiles", package / "device_profiles", ignore=ignore)
    return target


def lint_imports(source: Path, config: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint), str(config), "--no-cache"], cwd=source, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(source), "PATH": "/usr/bin:/bin"})


def test_import_contracts_hold(tmp_path):
    run = lint_imports(installed_layout(tmp_path / "src"), ROOT / "pyproject.toml")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Contracts: 2 kept, 0 broken" in run.stdout, run.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The check can fail: a converter module that imports the harness (as CoreML's once did) is caught."""
    source = installed_layout(tmp_path / "src")
    coreml = source / "hetero" / "export" / "coreml.py"
    coreml.write_text(coreml.read_text() + "\n\ndef _upward():\n    from hetero.verify import structure_problems\n")
    run = lint_imports(source, ROOT / "pyproject.toml")
    assert run.returncode != 0
    assert "hetero.export.coreml -> hetero.verify" in run.stdout, run.stdout
