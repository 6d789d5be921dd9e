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


# --------------------------------------------------------------------------- writes

# What writes a file or folder, and which operand is where it writes: "receiver" for
# path.write_bytes(...), an argument's index otherwise (open's first, torch.save's second).
WRITE_METHODS = {"write_bytes": "receiver", "write_text": "receiver", "mkdir": "receiver",
                 "touch": "receiver", "symlink_to": "receiver", "hardlink_to": "receiver",
                 "save": 0, "save_pretrained": 0, "savefig": 0, "to_file": 0}
WRITE_FUNCTIONS = {"save_file": 1,  # imported by name: safetensors'
                   # libraries that download into a folder they are given
                   "snapshot_download": None, "hf_hub_download": None}
WRITE_MODULES = {"torch": {"save": 1}, "np": {"save": 0},
                 "os": {"mkdir": 0, "makedirs": 0, "replace": 1, "rename": 1, "symlink": 1,
                        "link": 1},
                 "shutil": {"copy": 1, "copy2": 1, "copyfile": 1, "copytree": 1, "move": 1},
                 "gdown": {"download": None, "download_folder": None}}
# Where a write is provably local (or left to the guard): names bound by these...
LOCAL_WITH = {"atomic_writer", "folder_writer", "TemporaryDirectory", "NamedTemporaryFile"}
LOCAL_CALLS = {"BytesIO", "StringIO", "mkdtemp", "mkstemp"}
# ...and these functions, whose target is not in the workspace or cannot be staged, each
# with the reason. The test fails on an entry that no longer writes, so the list stays short.
ALLOWED = {
    "fastsd/fetch.py:_http_to_part": "a download's .part stays on Drive so that a later "
    "runtime resumes it; http_file retries a drop (resuming) and renames it with drive.rename",
    "fastsd/fetch.py:hf_snapshot": "the Hub's client fills its cache on Drive, resumable; a "
    "drop or a network error ends in one message (_hub_errors)",
    "fastsd/fetch.py:hf_file": "as hf_snapshot",
    "fastsd/fetch.py:hf_download": "as hf_snapshot, into a plain folder it resumes",
    "fastsd/fetch.py:drive_link": "gdown downloads into the folder given; an OSError (Drive "
    "dropped or full) ends in a DriveError",
    "fastsd/models/local.py:local_copy": "the local copy of a model goes to local_root(), the "
    "local disk",
    "fastsd/models/local.py:_copy": "as local_copy",
    "fastsd/deps.py:_constraints": "called with a TemporaryDirectory only",
    "fastsd/train/data.py:put": "the latent cache spills into a tempfile.mkdtemp on local disk",
    "fastsd/dataset/images.py:extract_zip": "extracts into the import's TemporaryDirectory",
    "fastsd/webui/process.py:run_dir": "the launcher's state: a folder in the local temp dir",
    "fastsd/webui/process.py:_lock": "a lock file in run_dir(), local",
    "fastsd/webui/process.py:launch": "the server's log, appended live by its own process "
    "(an atomic write cannot hold a live log); its folder is made through drive.make_folder",
    "fastsd/webui/external.py:install": "AUTOMATIC1111/Forge are cloned on local disk "
    "(check_local refuses Drive)",
    "fastsd/webui/external.py:ensure_venv": "the UI's own venv, inside the local clone",
    "fastsd/webui/external.py:_link": "a link in a folder of links inside the local clone",
    "fastsd/webui/external.py:link_models": "the folders of links, inside the local clone",
    "fastsd/webui/external.py:write_auth_file": "a file inside the local clone",
    "fastsd/tunnel/tools.py:_local_copy": "the tunnel binary's copy on local disk (LOCAL_TOOLS)",
    "fastsd/cli.py:main": "opens /dev/null to stand in for a standard output whose reader "
    "has gone",
    "fastsd/train/checkpoint.py:_files": "each function writes into the file object that "
    "write() opened with drive.atomic_writer inside drive.atomic_folder, under drive.retry",
    "fastsd/train/run.py:save_checkpoint": "checkpoint.Writer.save, whose files are written "
    "by checkpoint.write through drive (atomic_folder, atomic_writer, retry)",
}


def _called(node: ast.Call) -> tuple[str | None, str | None]:
    f = node.func
    if isinstance(f, ast.Attribute):
        return (f.value.id if isinstance(f.value, ast.Name) else None), f.attr
    if isinstance(f, ast.Name):
        return None, f.id
    return None, None


def _names(node: ast.AST | None) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} if node else set()


def _is_local_call(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Call) and _called(n)[1] in LOCAL_CALLS for n in ast.walk(node))


def _write_target(node: ast.Call) -> tuple[bool, ast.AST | None]:
    """(whether ``node`` writes, the operand naming where)."""
    base, name = _called(node)
    args = node.args
    plain = isinstance(node.func, ast.Name)
    if name in ("open", "fdopen") and (plain or base in ("os", "io")):
        mode = args[1] if len(args) > 1 else next(
            (k.value for k in node.keywords if k.arg in ("mode", "flags")), None)
        if isinstance(mode, ast.Constant):
            return bool(set(str(mode.value)) & set("wax+")), args[0] if args else None
        return mode is not None, args[0] if args else None  # os.open(path, flags)
    if base in WRITE_MODULES and name in WRITE_MODULES[base]:
        i = WRITE_MODULES[base][name]
        return True, args[i] if i is not None and len(args) > i else None
    if isinstance(node.func, ast.Attribute) and name == "open":  # Path.open("w")
        mode = args[0] if args else next((k.value for k in node.keywords if k.arg == "mode"),
                                         None)
        return (isinstance(mode, ast.Constant) and bool(set(str(mode.value)) & set("wax+")),
                node.func.value)
    if plain and name in WRITE_FUNCTIONS:
        i = WRITE_FUNCTIONS[name]
        return True, (args[i] if i is not None and len(args) > i else None)
    if isinstance(node.func, ast.Attribute) and name in ("rename", "replace") and \
            len(args) == 1 and not node.keywords and base not in ("dataclasses",):
        return True, args[0]  # Path.rename / Path.replace (str.replace takes two)
    if isinstance(node.func, ast.Attribute) and name in WRITE_METHODS:
        where = WRITE_METHODS[name]
        if where == "receiver":
            return True, node.func.value
        return len(args) > where, args[where] if len(args) > where else None
    return False, None


def raw_writes(source: str) -> list[tuple[str, int, str]]:
    """(function, line, call) of every write in ``source`` whose target is not provably
    local: not rooted in a name bound by drive.atomic_writer / drive.folder_writer, a
    temporary directory or file, or an in-memory buffer."""
    found: list[tuple[str, int, str]] = []

    def visit(fn: ast.AST, outer: set[str], name: str) -> None:
        body = list(ast.iter_child_nodes(fn))
        inner = [n for n in ast.walk(fn) if n is not fn and
                 isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        nested = {id(x) for f in inner for x in ast.walk(f) if x is not f}
        own = [n for n in ast.walk(fn) if id(n) not in nested]
        local = set(outer)
        for _ in range(3):  # names derived from local ones are local (tmp_path = Path(tmp))
            for n in own:
                if isinstance(n, (ast.With, ast.AsyncWith)):
                    for item in n.items:
                        c = item.context_expr
                        if isinstance(c, ast.Call) and _called(c)[1] in LOCAL_WITH:
                            local |= _names(item.optional_vars)
                elif isinstance(n, ast.Assign) and (
                        _is_local_call(n.value) or _names(n.value) & local):
                    for t in n.targets:
                        local |= _names(t)
        for n in own:
            if isinstance(n, ast.Call):
                writes, target = _write_target(n)
                if writes and not (target is not None and (
                        _names(target) & local or _is_local_call(target))):
                    found.append((name, n.lineno, ast.unparse(n)[:100]))
        for f in inner:
            if not any(f in ast.walk(g) for g in inner if g is not f):  # direct children
                visit(f, local, f.name)

    visit(ast.parse(source), set(), "<module>")
    return sorted(found, key=lambda f: f[1])


def test_every_write_into_the_workspace_goes_through_drive():
    """No module but fastsd/drive.py writes a file or folder by itself, unless its target is
    provably local or ALLOWED says why: every write into the workspace (on Drive: staged
    locally, copied with remount and retry, renamed into place) goes through the guard."""
    found, used = [], set()
    for path in _python_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel == "fastsd/drive.py":
            continue
        for fn, line, call in raw_writes(path.read_text(encoding="utf-8")):
            key = f"{rel}:{fn}"
            if key in ALLOWED:
                used.add(key)
            else:
                found.append(f"{rel}:{line} in {fn}: {call}")
    assert found == [], ("write through fastsd.drive (atomic_writer, folder_writer, copy_file, "
                         "make_folder...), or say in ALLOWED why the target is local:\n"
                         + "\n".join(found))
    assert sorted(set(ALLOWED) - used) == [], "ALLOWED names functions that no longer write"


def test_the_write_scan_finds_raw_writes_and_passes_guarded_ones():
    source = '''
def raw(session, img, pipe, src):
    (session.path / "a.json").write_text("{}")
    with open(session.path / "b.bin", "wb") as f:
        f.write(b"x")
    img.save(session.outputs / "c.png")
    pipe.save_pretrained(session.models / "m")
    shutil.copy(src, session.path / "d")
    torch.save({}, session.path / "e.pt")
    os.replace(src, session.path / "f")
    (session.path / "g").mkdir()

def guarded(session, img, pipe):
    with drive.atomic_writer(session.outputs / "c.png") as f:
        img.save(f, format="PNG")
    with drive.folder_writer(session.models / "m") as tmp:
        pipe.save_pretrained(tmp)
        (tmp / "x.json").write_text("{}")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    with tempfile.TemporaryDirectory() as t:
        req = Path(t) / "r.txt"
        req.write_text("x")
    with open(session.path / "r.txt", "rb") as f:
        f.read()
    "a b".replace("a", "b")
'''
    found = raw_writes(source)
    assert [fn for fn, _, _ in found] == ["raw"] * 8, found
    assert [line for _, line, _ in found] == [3, 4, 6, 7, 8, 9, 10, 11]
