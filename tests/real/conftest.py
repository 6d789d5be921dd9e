"""The real-size tier: random full-size SD 1.5, SD 2.1 (v, 768 px) and SDXL from their
official configs (fastsd.models.full), built once into $FASTSD_FULL_CACHE and reused, run
through fastsd's own code paths on the CPU. Run by `make test-real` only.

One full-size model is in memory at a time: each test loads what it needs and lets it go,
and the fixtures below hold folders, never models."""

from __future__ import annotations

import gc
import logging
import os
import shutil
from pathlib import Path

import pytest

log = logging.getLogger("fastsd")

#: Set by `make test-real`. Without it nothing here is collected even when this folder is
#: named to pytest (`make test` does not enter it: see tests/conftest.py).
REAL_ENV = "FASTSD_TEST_REAL"


def pytest_ignore_collect(collection_path: Path, config) -> bool | None:
    if not os.environ.get(REAL_ENV) and collection_path.suffix == ".py":
        return True
    return None


@pytest.fixture(scope="session")
def full_models() -> dict[str, Path]:
    """The full-size models' folders, built on first use (their build time and size are in
    each folder's marker and printed with the results)."""
    from fastsd.models import full

    return {f: full.ensure(f) for f in full.FAMILIES}


@pytest.fixture(autouse=True)
def one_model_at_a_time(tmp_path: Path):
    """Whatever a test loaded is gone before the next one loads its model, and what it
    wrote (gigabytes of checkpoints and models) is gone from the disk."""
    yield
    gc.collect()
    give_back_memory()
    shutil.rmtree(tmp_path, ignore_errors=True)


def give_back_memory() -> None:
    """Return the freed heap to the system: glibc keeps what a full-size model's load freed
    (about 12 GB after the SDXL training test), and a test that starts a full-size child
    next would have the kernel's out-of-memory killer end it on a 24 GB machine."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to give back this way
        pass
