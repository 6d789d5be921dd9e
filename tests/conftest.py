"""Shared fixtures: an isolated workspace per test and the tiny models, built once per run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

#: The real-size tier (tests/real: full-size models, tens of minutes, ~12 GB of RAM) runs
#: only under `make test-real`, which sets this. `make test` (`pytest tests`) never enters
#: the folder: its conftest would also take the name `conftest` from this one.
REAL_ENV = "FASTSD_TEST_REAL"
collect_ignore = [] if os.environ.get(REAL_ENV) else ["real"]


@pytest.fixture(autouse=True)
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own Drive stand-in, as $FASTSD_HOME."""
    home = tmp_path / "fastsd-home"
    home.mkdir()
    monkeypatch.setenv("FASTSD_HOME", str(home))
    # on the command line unless the test says otherwise: a test that runs a notebook cell
    # in this process (env.form) does not make later tests' messages name form fields
    from fastsd import env

    monkeypatch.setattr(env, "_caller", None)
    monkeypatch.delenv(env.CALLER_ENV, raising=False)
    return home


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


def _tiny(root: Path, family: str) -> Path:
    from fastsd.models import tiny

    return tiny.ensure(family, root)


@pytest.fixture(scope="session")
def tiny_sd1(tiny_root: Path) -> Path:
    return _tiny(tiny_root, "sd1")


@pytest.fixture(scope="session")
def tiny_sd2(tiny_root: Path) -> Path:
    return _tiny(tiny_root, "sd2")


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_root: Path) -> Path:
    return _tiny(tiny_root, "sdxl")


@pytest.fixture(scope="session")
def tiny_controlnet_sd1(tiny_root: Path) -> Path:
    """The tiny ControlNet of tiny-sd1, as the registry's tiny-canny lays it out."""
    from fastsd.models import tiny

    return tiny.ensure_controlnet("sd1", tiny_root / "controlnet" / "sd1-tiny-canny")


@pytest.fixture(scope="session")
def tiny_controlnet_sdxl(tiny_root: Path) -> Path:
    from fastsd.models import tiny

    return tiny.ensure_controlnet("sdxl", tiny_root / "controlnet" / "sdxl-tiny-canny")


@pytest.fixture(scope="session")
def tiny_refiner(tiny_root: Path) -> Path:
    from fastsd.models import tiny

    return tiny.ensure_refiner(tiny_root)


@pytest.fixture(scope="session", params=["sd1", "sd2", "sdxl"])
def tiny_model(request: pytest.FixtureRequest, tiny_root: Path) -> tuple[str, Path]:
    """Each tiny family in turn, as (family, folder)."""
    return request.param, _tiny(tiny_root, request.param)


def tiny_session(name: str, root=None, family: str = "sd1", **settings):
    """A session on the tiny random model of ``family``. A session has no base model until
    one is named (never a default), and tests name the tiny ones, built offline."""
    from fastsd import session

    return session.create(name, root, **{"base_model": f"tiny-{family}", **settings})


def cached_repo(cache: Path, repo_id: str, files: dict[str, str | bytes]) -> Path:
    """Lay out a repo in a Hugging Face cache folder as huggingface_hub itself does."""
    commit = "1" * 40
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    for name, data in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            (snap / name).write_bytes(data)
        else:
            (snap / name).write_text(data)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


def cache_family_configs(home: Path, family: str, model: Path) -> Path:
    """Put a tiny model's config files in the workspace's Hub cache under the name of the
    family's config repo, as a first online run would have fetched the real ones."""
    from fastsd.convert.from_single import CONFIG_FILES, CONFIG_REPOS

    files = {str(p.relative_to(model)): p.read_text() for pattern in CONFIG_FILES
             for p in model.glob(pattern)}
    return cached_repo(home / "models" / "hub", CONFIG_REPOS[(family, False)], files)


def fake_nvidia_smi(bin_dir: Path, *gpus: str) -> Path:
    """nvidia-smi cannot run here (no GPU): a script in ``bin_dir`` that answers the query
    fastsd.env.driver_gpus makes as a driver with ``gpus`` ("name, free MiB, total MiB")
    does, and fails any other. Returns ``bin_dir``, to put first on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n[ \"$1\" = --query-gpu=name,memory.free,memory.total ] || exit 9\n"
                   + "".join(f"echo '{g}'\n" for g in gpus))
    smi.chmod(0o755)
    return bin_dir


COLAB = Path(__file__).resolve().parent / "colab"


def colab_module(name: str):
    """A module of tests/colab (the Colab stand-in), without putting that folder (and so
    google.colab) on sys.path for every other test."""
    import importlib.util
    import sys

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, COLAB / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
