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


@pytest.fixture(scope="session", params=["sd1", "sd2", "sdxl"])
def tiny_model(request: pytest.FixtureRequest, tiny_root: Path) -> tuple[str, Path]:
    """Each tiny family in turn, as (family, folder)."""
    return request.param, _tiny(tiny_root, request.param)


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
