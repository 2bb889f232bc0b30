"""The import graph: acyclic and layered as pyproject.toml's import-linter contracts declare.

import-linter reads the package from disk.  In this checkout `hetero.export` lives in export/ (mapped by
pyproject's package-dir), so the check runs on a copy laid out as installed: hetero/ with export/ and
device_profiles/ inside it.
"""
from __future__ import annotations

import json
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
    assert "Contracts: 9 kept, 0 broken" in run.stdout, run.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The check can fail: a converter module that imports the harness (as CoreML's once did) is caught."""
    source = installed_layout(tmp_path / "src")
    coreml = source / "hetero" / "export" / "coreml.py"
    coreml.write_text(coreml.read_text() + "\n\ndef _upward():\n    from hetero.verify import structure_problems\n")
    run = lint_imports(source, ROOT / "pyproject.toml")
    assert run.returncode != 0
    assert "hetero.export.coreml -> hetero.verify" in run.stdout, run.stdout


def floors(graph, package: str = "hetero") -> dict[str, int]:
    """Each top-level part of the package (a module, or a subpackage counted as one room) with its floor: 1 for
    a part that imports no other part, else one above the highest part it imports (function-level imports
    included)."""
    def part(module: str) -> str:
        return ".".join(module.split(".")[:2])

    parts = {part(m) for m in graph.modules if m != package}
    imports = {p: set() for p in parts}
    for module in graph.modules:
        if module == package:
            continue
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.startswith(package + ".") and part(imported) != part(module):
                imports[part(module)].add(part(imported))
    found: dict[str, int] = {}

    def floor(p: str) -> int:
        if p not in found:
            found[p] = 1 + max((floor(q) for q in imports[p]), default=0)
        return found[p]

    return {p: floor(p) for p in sorted(parts)}


def test_the_house_has_at_most_eight_floors(tmp_path):
    """Issue 26: the longest chain of imports between the package's parts is at most 8 (it was 12).  Counted in
    a fresh interpreter on the installed layout, so that hetero.export (export/ here) is in the graph."""
    source = installed_layout(tmp_path / "src")
    code = "import json, grimp, test_layers; print(json.dumps(test_layers.floors(grimp.build_graph('hetero'))))"
    run = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": f"{source}:{ROOT / 'tests'}", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    assert found["hetero.errors"] == 1 and found["hetero.export"] > 1
    assert max(found.values()) <= 8, sorted(found.items(), key=lambda item: item[1])


def test_the_floor_count_sees_a_long_chain():
    """The count can fail: a chain of nine parts is nine floors."""
    class Chain:
        modules = {"hetero", *(f"hetero.m{i}" for i in range(9))}

        @staticmethod
        def find_modules_directly_imported_by(module):
            i = int(module.rsplit("m", 1)[1])
            return {f"hetero.m{i - 1}"} if i else set()

    assert max(floors(Chain).values()) == 9
