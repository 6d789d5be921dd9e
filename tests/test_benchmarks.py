import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import common  # noqa: E402
import run  # noqa: E402


def test_ratio_always_reads_higher_is_better():
    assert common.Row("steps/s", "1/s", ours=3.0, baseline=2.0).ratio == 1.5
    assert common.Row("peak RSS", "MB", ours=500, baseline=2000,
                      higher_is_better=False).ratio == 4.0
    assert common.Row("x", "s", ours=1.0).ratio is None


def test_results_table(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    path = common.write_result("demo", "Demo bench", [
        common.Row("speed", "it/s", ours=30.0, baseline=10.0, target=">= 3x", passed=True),
        common.Row("peak RSS", "MB", ours=900.0, baseline=1800.0, target="<= 1 GB",
                   higher_is_better=False, passed=False)],
        command="python benchmarks/bench_demo.py", notes="A note.")
    result = json.loads(path.read_text())
    md = run.render([result])
    assert "## Demo bench" in md
    assert "| speed (it/s) | 30 | 10 | 3.00× | >= 3x | yes |" in md
    assert "| peak RSS (MB) | 900 | 1,800 | 2.00× | <= 1 GB | **no** |" in md
    assert "A note." in md
