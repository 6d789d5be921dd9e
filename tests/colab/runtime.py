"""A fresh Python runtime built like Colab's, for the install cell's tests and benchmark.

The *image* is a venv with what Colab preinstalls that matters to us: torch with a local
version label (``+cpu`` here, ``+cu126`` on Colab), an older ipywidgets (7.x), ipykernel,
setuptools and wheel, and some of our pins at other versions than ours (tqdm). It is built
once and kept under ``$FASTSD_TEST_CACHE`` (default ``~/.cache/fastsd-tests``), keyed by a
hash of its recipe. Each *runtime* is a fresh copy of it, as each Colab runtime starts from
the same image.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TORCH = os.environ.get("TORCH", "torch==2.13.0")  # the Makefile's; the CPU build here
# What Colab preinstalls (a subset that matters to fastsd), at Colab-like versions: some
# equal to our pins, tqdm older than our pin, ipywidgets 7 as Colab ships it.
PREINSTALLED = [TORCH, "ipykernel==7.4.0", "ipywidgets==7.7.1", "setuptools==84.2.1",
                "wheel==0.48.0", "tqdm==4.67.1", "numpy==2.4.6", "pillow==13.0.0",
                "psutil==7.2.2", "safetensors==0.8.0", "huggingface_hub==2.4.0",
                "tokenizers==0.23.3", "transformers==5.23.0", "accelerate==1.15.0",
                "matplotlib==3.11.2", "scikit-image==0.26.0",
                "opencv-python-headless==4.14.0.94"]
UV = "uv==0.13.9"


def cache_dir() -> Path:
    return Path(os.environ.get("FASTSD_TEST_CACHE") or Path.home() / ".cache" / "fastsd-tests")


def _pip(python: Path, *args: str, env: dict | None = None) -> None:
    subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "-q", *args],
                   check=True, env=env)


def image() -> Path:
    """The Colab-like image venv, built once (atomically) and reused."""
    recipe = json.dumps([sys.version, PREINSTALLED, UV], sort_keys=True)
    key = hashlib.sha256(recipe.encode()).hexdigest()[:12]
    path = cache_dir() / f"colab-image-{key}"
    if (path / "ready").is_file():
        return path
    tmp = cache_dir() / f".building-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    # --copies: the venv must keep working after it is renamed and copied.
    subprocess.run([sys.executable, "-m", "venv", "--copies", str(tmp / "venv")], check=True)
    py = tmp / "venv" / "bin" / "python"
    _pip(py, "install", "--upgrade", "pip==26.3")
    _pip(py, "install", *PREINSTALLED)
    _pip(py, "download", "--no-deps", "-d", str(tmp / "uv-wheel"), UV)
    version = subprocess.run([str(py), "-c", "import torch; print(torch.__version__)"],
                             check=True, capture_output=True, text=True).stdout.strip()
    if "+" not in version:
        raise RuntimeError(f"the image's torch {version} has no local version label; set "
                           "TORCH to a build that has one (e.g. the +cpu wheel)")
    (tmp / "ready").write_text(version)
    if path.exists():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, path)
    return path


def fresh(dest: Path, with_uv: bool = False) -> Path:
    """A new runtime at ``dest`` (a copy of the image); returns its python."""
    img = image()
    subprocess.run(["cp", "-a", "--reflink=auto", str(img / "venv"), str(dest)], check=True)
    # The copy's scripts name the image's interpreter; fix the venv's own paths.
    cfg = dest / "pyvenv.cfg"
    cfg.write_text(cfg.read_text().replace(str(img / "venv"), str(dest)))
    py = dest / "bin" / "python"
    if with_uv:
        (wheel,) = (img / "uv-wheel").glob("uv-*.whl")
        _pip(py, "install", "--no-index", "--no-deps", str(wheel))
    return py


def offline_env(base: dict | None = None) -> dict:
    """Environment in which the package index cannot be reached: pip and uv point at a
    closed port on localhost and read no configuration that adds other sources."""
    env = dict(os.environ if base is None else base)
    for k in list(env):
        if k.startswith(("PIP_", "UV_")):
            del env[k]
    closed = "http://127.0.0.1:9/simple"
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=closed, PIP_DEFAULT_TIMEOUT="3",
               PIP_RETRIES="0", UV_INDEX_URL=closed, UV_NO_CONFIG="1", UV_HTTP_TIMEOUT="3")
    return env


def source_copy(dest: Path) -> Path:
    """fastsd's source as a user keeps it on Drive: the package, the session template,
    setup.py, MANIFEST.in, pins, README."""
    dest.mkdir(parents=True, exist_ok=True)
    for folder in ("fastsd", "sessions_template"):
        shutil.copytree(REPO / folder, dest / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("setup.py", "MANIFEST.in", "requirements-colab.txt", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    return dest


def kernelspec(folder: Path, python: Path, env: dict, name: str = "colabrt") -> Path:
    """A Jupyter kernelspec (under ``folder``/kernels) running ``python`` with ``env``;
    put ``folder`` on JUPYTER_PATH and ask nbclient for kernel ``name``."""
    spec = folder / "kernels" / name
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": name, "language": "python", "env": env}))
    return folder
