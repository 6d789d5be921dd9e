"""What every benchmark shares: where results go, how a result is written, peak memory.

A benchmark measures fastsd side by side against a baseline in the same run and reports
ratios, so the figures hold on whatever machine runs them. Each bench_*.py calls
write_result(); benchmarks/run.py gathers the JSON files into RESULTS.md.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE.parent))


@dataclass
class Row:
    """One measured figure: ours against the baseline, and the ratio the issue sets a target on.

    ``ratio`` is ours/baseline for "higher is better" figures when ``higher_is_better``,
    else baseline/ours, so a ratio above 1 always means fastsd is better.
    """

    metric: str
    unit: str
    ours: float
    baseline: float | None = None
    target: str = ""
    higher_is_better: bool = True
    passed: bool | None = None

    @property
    def ratio(self) -> float | None:
        if self.baseline in (None, 0) or self.ours == 0:
            return None
        return self.ours / self.baseline if self.higher_is_better else self.baseline / self.ours


def write_result(name: str, title: str, rows: list[Row], command: str, notes: str = "") -> Path:
    from fastsd import drive

    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {
        "name": name, "title": title, "command": command, "notes": notes,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {platform.processor() or '?'}, python "
                   f"{platform.python_version()}",
        "rows": [{**asdict(r), "ratio": r.ratio} for r in rows],
    }
    return drive.atomic_write_json(RESULTS / f"{name}.json", data)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def children_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def child_result(script: str, *args: str) -> dict:
    """Run ``script --child ARGS`` in its own process; the dict it printed as "RESULT {json}"."""
    import subprocess

    p = subprocess.run([sys.executable, script, "--child", *args], capture_output=True,
                       text=True, check=False)
    if p.returncode:
        raise RuntimeError(f"{script} --child {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])
