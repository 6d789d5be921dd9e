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


def test_gpu_check_dry_run_exercises_everything_but_cuda(tmp_path, tiny_root, tiny_sd1,
                                                          tiny_sdxl):
    """benchmarks/gpu_check.py --dry-run: the same code as on a GPU (the trainer with the T4
    preset, the engine with each sampler family, the results table), on the CPU with the
    tiny models, so that the check is ready the day a GPU is lent."""
    import gpu_check

    from fastsd.webui import samplers

    rows = gpu_check.main(["--dry-run", "--results", str(tmp_path / "results"),
                           "--tiny-models", str(tiny_root)])
    metrics = [r.metric for r in rows]
    assert "SD 1.5, T4 preset, 512 px: UNet stage speed" in metrics
    assert "SD 1.5, T4 preset, 512 px: text encoder stage speed" in metrics
    families = gpu_check.sampler_families()
    assert len(families) == len({s.cls for s in samplers.SAMPLERS})
    assert sum("engine sd1 64 px txt2img" in m for m in metrics) == len(families)
    assert sum("engine sdxl 64 px txt2img" in m for m in metrics) == 1  # all on a GPU
    assert all(r.ours > 0 for r in rows)
    saved = json.loads((tmp_path / "results" / "gpu.json").read_text())
    assert saved["title"] == "GPU check at real size (CPU (dry run))"
    assert "SDXL LoRA, T4 preset, 1024 px: UNet stage speed" in metrics
    assert "train_dreambooth.py: skipped, no script given" in saved["notes"]
    assert "## GPU check at real size" in (tmp_path / "RESULTS.md").read_text()
    # nothing of the real-size tier on the path: its conftest would shadow this suite's
    assert not any(Path(p).name == "real" for p in sys.path)
