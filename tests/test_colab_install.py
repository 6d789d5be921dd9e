"""The notebook's install cell on fresh Colab-like runtimes (tests/colab/runtime.py), with
Drive as the real FUSE stand-in.

The first runtime installs fastsd from a folder, builds the wheelhouse on Drive from the
index (pip; uv is absent), and the next cell imports fastsd and every pin without a
restart. A second fresh runtime, with uv and the index unreachable, installs everything
from that wheelhouse.
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

from test_notebooks import NOTEBOOKS, fill_in

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

    # A second fresh runtime: uv present, the package index unreachable.
    standin.unmount(colab_drive["mount"])
    py2 = runtime.fresh(tmp_path / "runtime2", with_uv=True)
    env2 = runtime.offline_env(env1)
    def wrong_then_right(install):
        missing = str(tmp_path / "no-such-folder")
        wrong = re.sub(r'^FASTSD_SOURCE = .*?  #@param', f"FASTSD_SOURCE = {missing!r}  #@param",
                       install.source, count=1, flags=re.M)
        assert wrong != install.source
        return [wrong, install, CHECK]

    out2 = run_cells(tmp_path, py2, env2, wrong_then_right, "rt2", allow_errors=True)
    # A wrong source: one message that says what to set, not a traceback.
    assert "SystemExit: fastsd could not be installed from" in out2 and \
        "Set FASTSD_SOURCE to the folder" in out2, out2
    assert "Traceback (most recent call last)" not in out2, out2
    assert value(out2, "FASTSD_FILE").startswith(str(tmp_path / "runtime2")), out2
    assert value(out2, "MISSING") == "[]", out2
    assert "with uv" in out2 and "built the wheelhouse" not in out2, out2
    assert "Restart the session" not in out2
    res = subprocess.run([str(py2), "-m", "pip", "download", "--no-deps", "-d",
                          str(tmp_path / "x"), "tqdm==4.70.1"], env=env2, capture_output=True)
    assert res.returncode != 0, "the index must really be unreachable in this test"
