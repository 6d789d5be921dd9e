"""The notebook's install cell on fresh Colab-like runtimes (tests/colab/runtime.py), with
Drive as the real FUSE stand-in.

The first runtime installs fastsd from a folder, builds the wheelhouse on Drive from the
index (pip; uv is absent), and the next cell imports fastsd and every pin without a
restart. A second fresh runtime, with uv and no network, fails on the default source (the
project's address) and on a wrong folder with one message each, then installs fastsd from
a repository .zip on Drive, and again from one uploaded through the cell, and everything
else from that wheelhouse.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from test_notebooks import NOTEBOOKS, cell, default_source, fill_in

from conftest import COLAB, colab_module as _load  # noqa: E402


runtime = _load('runtime')
standin = _load('standin')

CHECK = """#@title check
import importlib.metadata as md, sys, fastsd, diffusers, gdown, tqdm
from fastsd import deps
print("FASTSD_FILE", fastsd.__file__)
print("MISSING", deps.missing(deps.read_requirements()))
print("TORCH", md.version("torch"))
print("TQDM", md.version("tqdm"))
"""


@pytest.fixture
def colab_drive(tmp_path, monkeypatch):
    """Environment of a Colab runtime whose Drive is the FUSE stand-in."""
    backing, mount = tmp_path / "drive-backing", tmp_path / "gdrive"
    env = {"COLAB_STANDIN_BACKING": str(backing), "COLAB_STANDIN_PYTHON": sys.executable,
           "FASTSD_DRIVE_MOUNT": str(mount), "PYTHONPATH": str(COLAB),
           "HF_HUB_OFFLINE": "1", "FASTSD_HOME": "", "COLAB_RELEASE_TAG": "standin"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    yield env | {"backing": backing, "mount": mount}
    standin.unmount(mount)


def shown(output) -> str:
    """What a cell output shows: its text, or an error's name, message and traceback."""
    if output.get("output_type") == "error":
        return "\n".join([f"{output['ename']}: {output['evalue']}", *output["traceback"]])
    return output.get("text", "")


def with_form(source: str, **fields) -> str:
    """The install cell's source with its form fields set, as the form's boxes set them."""
    for field, value in fields.items():
        source, n = re.subn(rf"^{field} = .*?  #@param", f"{field} = {value!r}  #@param",
                            source, count=1, flags=re.M)
        assert n == 1, field
    return source


def repository_zip(folder: Path, dest: Path) -> Path:
    """``folder`` as a code host's "Download ZIP" gives a repository: one top folder."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, f"fastsd-main/{p.relative_to(folder)}")
    return dest


def one_message(cell) -> str:
    """The one message a failed install cell shows: an error whose whole traceback is its
    message (no traceback, no SystemExit banner)."""
    (err,) = [o for o in cell.outputs if o.get("output_type") == "error"]
    assert err["traceback"] == [f"{err['ename']}: {err['evalue']}"], err["traceback"]
    text = "".join(shown(o) for o in cell.outputs)
    assert "SystemExit" not in text and "To exit" not in text and "Traceback" not in text
    return err["evalue"]


def run_cells(tmp_path, python, env, cells, name, allow_errors=False):
    nb = nbformat.read(NOTEBOOKS / "fast_dreambooth.ipynb", as_version=4)
    install = nb.cells[1]
    fill_in(nb, {"FASTSD_SOURCE": str(runtime.source_copy(tmp_path / f"src-{name}"))})
    nb.cells = [nbformat.v4.new_code_cell(c) if isinstance(c, str) else c
                for c in cells(install)]
    jpath = runtime.kernelspec(tmp_path / f"jupyter-{name}", python, env, name)
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(jpath)
    try:
        NotebookClient(nb, timeout=600, kernel_name=name, allow_errors=allow_errors,
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH")
        else:
            os.environ["JUPYTER_PATH"] = old
    run_cells.cells = nb.cells  # each cell with its outputs, for a closer look
    return "".join(shown(o) for c in nb.cells for o in c.get("outputs", []))


def value(text, key):
    return next(ln.split(" ", 1)[1] for ln in text.splitlines() if ln.startswith(key + " "))


@pytest.mark.timeout(1500)
def test_install_cell_first_runtime_then_offline_from_the_wheelhouse(tmp_path, colab_drive):
    base = {k: v for k, v in os.environ.items()}
    env1 = {k: v for k, v in base.items() if not k.startswith("JUPYTER")}
    py1 = runtime.fresh(tmp_path / "runtime1")
    out = run_cells(tmp_path, py1, env1,
                    lambda install: ["#@title preload\nimport tqdm", install, CHECK], "rt1")
    # fastsd is a regular install in the runtime, importable in the same kernel.
    assert value(out, "FASTSD_FILE").startswith(str(tmp_path / "runtime1")), out
    assert value(out, "MISSING") == "[]", out
    assert value(out, "TQDM") == "4.70.1", "a mismatched pin is reinstalled"
    assert "+" in value(out, "TORCH"), "Colab's torch, local label included, is kept"
    assert "Restart the session" in out and "tqdm" in out, "the kernel had imported tqdm"
    assert "with pip" in out, out

    houses = list((colab_drive["backing"] / "MyDrive" / "Fast-Dreambooth" / "wheels").iterdir())
    assert len(houses) == 1
    house = houses[0]
    assert "torch2.13.0_cpu" in house.name and "-pins" in house.name
    man = json.loads((house / "manifest.json").read_text())
    names = {w.split("-")[0].lower() for w in man["wheels"]}
    assert {"diffusers", "gdown", "bitsandbytes", "tqdm"} <= names
    assert not names & {"torch", "torchvision", "torchaudio", "transformers", "numpy",
                        "ipywidgets"}, "nothing Colab already has goes into the wheelhouse"
    assert not [p for p in house.iterdir() if p.name.startswith(".fastsd-tmp-")]
    for w in man["wheels"]:
        zipfile.ZipFile(house / w).testzip()

    # A second fresh runtime: uv present, no network (the package index unreachable). The
    # default source (the project's address) and a wrong folder fail with one message
    # each; a repository .zip on Drive installs, then one uploaded through the cell.
    standin.unmount(colab_drive["mount"])
    py2 = runtime.fresh(tmp_path / "runtime2", with_uv=True)
    env2 = runtime.offline_env(env1)
    repository_zip(runtime.source_copy(tmp_path / "zip-src"),
                   colab_drive["backing"] / "MyDrive" / "fastsd-main.zip")
    uploaded = runtime.source_copy(tmp_path / "upload-src")
    (uploaded / "fastsd" / "_uploaded.py").write_text("")  # tells the two installs apart
    (tmp_path / "upload").mkdir()
    repository_zip(uploaded, tmp_path / "upload" / "fastsd-main.zip")
    env2["COLAB_STANDIN_UPLOAD"] = str(tmp_path / "upload")

    def sources(install):
        return [cell(NOTEBOOKS / "fast_dreambooth.ipynb", "1."),  # the form's own source
                with_form(install.source, FASTSD_SOURCE=str(tmp_path / "no-such-folder")),
                with_form(install.source, FASTSD_SOURCE=str(
                    colab_drive["mount"] / "MyDrive" / "fastsd-main.zip")), CHECK,
                with_form(install.source, Upload_Zip=True),
                CHECK + "import fastsd._uploaded\nprint('UPLOADED')\n"]

    out2 = run_cells(tmp_path, py2, env2, sources, "rt2", allow_errors=True)
    cells = run_cells.cells
    unreachable = one_message(cells[0])
    assert unreachable.startswith(f"fastsd could not be installed from {default_source()!r} "
                                  "with uv"), unreachable
    assert "check this runtime's internet access" in unreachable and \
        "put it on your Drive and set FASTSD_SOURCE to its path" in unreachable
    assert "The installer said:" in unreachable and "github.com" in \
        unreachable.split("The installer said:")[1], "the installer's own output is shown"
    wrong = one_message(cells[1])
    assert wrong.startswith(f"{str(tmp_path / 'no-such-folder')!r} does not exist. What to do:")
    assert value(out2, "FASTSD_FILE").startswith(str(tmp_path / "runtime2")), out2
    assert value(out2, "MISSING") == "[]", out2
    assert "with uv" in out2 and "built the wheelhouse" not in out2, out2
    assert "Restart the session" not in out2
    assert [o for o in cells[5].outputs if "UPLOADED" in o.get("text", "")], out2
    res = subprocess.run([str(py2), "-m", "pip", "download", "--no-deps", "-d",
                          str(tmp_path / "x"), "tqdm==4.70.1"], env=env2, capture_output=True)
    assert res.returncode != 0, "the index must really be unreachable in this test"
