"""The import graph follows the layers: lint-imports keeps the contract, nothing imports in
a circle, no module reaches for another's private names, nothing walks up to the workspace."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fastsd"
LINT = Path(sys.executable).with_name("lint-imports")


def lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"}, timeout=300)


def test_lint_imports_keeps_the_layer_contract():
    r = lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 kept, 0 broken" in r.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    # A copy of the package where the drive layer imports the trainer, as a function-level
    # import (the kind that used to hide circles): lint-imports must refuse it.
    shutil.copytree(PACKAGE, tmp_path / "fastsd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path)
    drive = tmp_path / "fastsd" / "drive.py"
    drive.write_text(drive.read_text() + "\n\ndef _upward():\n    from fastsd.train import trainer"
                     "  # noqa\n    return trainer\n")
    r = lint(tmp_path)
    assert r.returncode != 0
    assert "fastsd.drive is not allowed to import fastsd.train" in r.stdout


def _graph():
    return grimp.build_graph("fastsd", include_external_packages=False)


def test_no_module_imports_in_a_circle():
    graph = _graph()
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in edges[m]:
            if state.get(n) == 1:
                cycles.append(path[path.index(n):] + [n] if n in path else [m, n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    # A package's __init__ importing its own submodules is not a circle of ideas, but a
    # submodule importing its package's __init__ back is, and is caught here too.
    assert cycles == []


def _python_files():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastsd"):
                offenders += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}"
                              for a in node.names if a.name.startswith("_")
                              and not a.name.startswith("__")]
    assert offenders == []


@pytest.mark.parametrize("needle", [".parent.parent", "drive.workspace("])
def test_nothing_walks_up_to_find_the_workspace(needle):
    # (Walking up from __file__ to the package's own data files is another matter.)
    assert [f"{p.relative_to(ROOT)}: {line.strip()}" for p in _python_files()
            for line in p.read_text(encoding="utf-8").splitlines()
            if needle in line and "__file__" not in line] == []


def test_one_model_resolver():
    # Every caller goes through fastsd.models.resolve_model; no other function turns a
    # base-model name into a folder.
    defs = [f"{p.relative_to(ROOT)}:{n.name}" for p in _python_files()
            for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
            if isinstance(n, ast.FunctionDef) and n.name in ("resolve_model", "models_root",
                                                              "fetch_link", "snapshot")]
    assert defs == ["fastsd/models/__init__.py:resolve_model"]
