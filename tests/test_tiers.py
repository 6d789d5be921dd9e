"""The real-size tier (tests/real) is collected only by `make test-real`: `make test` never
builds or loads a full-size model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def collect(real: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FASTSD_TEST_REAL"}
    if real:
        env["FASTSD_TEST_REAL"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", "tests/real"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_make_test_does_not_collect_the_real_size_tier(monkeypatch):
    import importlib.util

    monkeypatch.delenv("FASTSD_TEST_REAL", raising=False)  # `pytest tests` skips the folder
    spec = importlib.util.spec_from_file_location("tiers_conftest", ROOT / "tests" /
                                                  "conftest.py")
    shared = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shared)
    assert shared.collect_ignore == ["real"]
    plain, real = collect(False), collect(True)  # named to pytest: only with the variable
    assert plain.returncode == 5 and "tests/real/" not in plain.stdout, plain.stdout[-2000:]
    assert real.returncode == 0, real.stdout[-2000:]
    items = [ln for ln in real.stdout.splitlines() if ln.startswith("tests/real/")]
    assert any("test_train.py::" in ln for ln in items) and len(items) >= 10
