"""Tiny models: build time and size per family (targets: under 10 s and 20 MB each).

Run: .venv/bin/python benchmarks/bench_tiny.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import Row, write_result

from fastsd.models import tiny


def main() -> None:
    import diffusers  # noqa: F401  (import time is not build time)
    import transformers  # noqa: F401

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in tiny.FAMILIES:
            start = time.perf_counter()
            path = tiny.build(family, Path(tmp) / family)
            seconds = time.perf_counter() - start
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1024**2
            rows += [Row(f"{family} build time", "s", round(seconds, 2), target="< 10 s",
                         higher_is_better=False, passed=seconds < 10),
                     Row(f"{family} size on disk", "MB", round(size, 2), target="< 20 MB",
                         higher_is_better=False, passed=size < 20)]
    write_result("tiny", "Embedded tiny models", rows,
                 command=".venv/bin/python benchmarks/bench_tiny.py",
                 notes="Built offline from configs, fp32 safetensors, in diffusers format.")


if __name__ == "__main__":
    main()
