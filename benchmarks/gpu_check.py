"""The GPU check: fastsd at real size on a CUDA machine, unattended, in under 8 minutes.

With the same random full-size models as the real-size tests (fastsd.models.full, built
from the official configs into $FASTSD_FULL_CACHE; nothing downloaded), it measures:

* the trainer with the T4 preset (fp16 mixed precision, 8-bit AdamW, gradient
  checkpointing, batch 1): it/s and peak VRAM (torch.cuda.max_memory_allocated) of the SD 1.5
  UNet stage at 512 px and of the text encoder stage, and of SDXL's LoRA UNet stage at
  1024 px, each against the VRAM estimate the trainer prints
  (fastsd.train.settings.estimate_vram_gib); each is one entry of TRAINING;
* the engine: txt2img it/s at each model's native size for one sampler of each scheduler
  class (each sampler family), with the memory options the engine chooses on this GPU;
* diffusers' own examples/dreambooth/train_dreambooth.py on the same weights and settings,
  side by side with the UNet stage (its version and flags recorded). The script is not
  part of fastsd and is not downloaded: give its path with --dreambooth-script (from a
  diffusers checkout of the installed version); without it the row says it was skipped.

It prints one summary table and writes its figures to benchmarks/results/gpu.json and
benchmarks/RESULTS.md, with the GPU's name. ``--dry-run`` runs everything but CUDA on the
CPU with the tiny models at 64 px and a few steps, writing into a temporary folder (or
``--results DIR``), so the check cannot rot: `make test` runs it.

Run: .venv/bin/python benchmarks/gpu_check.py [--dreambooth-script PATH]   (make gpu-check)
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import common
from common import Row, write_result

HERE = Path(__file__).resolve().parent
BUDGET_S = 7.5 * 60  # the whole check, on a GPU; a part that no longer fits is skipped
COMMAND = ".venv/bin/python benchmarks/gpu_check.py"


@dataclass(frozen=True)
class Training:
    """One training measurement: a stage of the trainer with the T4 preset."""

    title: str
    family: str
    resolution: int
    unet_steps: int
    text_steps: int
    method: str = "full"  # or "lora"
    pending: str = ""  # why it cannot run yet


TRAINING = (
    Training("SD 1.5, T4 preset, 512 px", "sd1", 512, unet_steps=20, text_steps=10),
    Training("SDXL LoRA, T4 preset, 1024 px", "sdxl", 1024, unet_steps=10, text_steps=0,
             method="lora"),
)
ENGINE_FAMILIES = ("sd1", "sdxl")
ENGINE_STEPS = 8


@dataclass
class Plan:
    """What this run does: on the GPU at real size, or the dry run on the CPU."""

    dry: bool
    root: Path  # scratch: sessions, exports
    tiny_models: Path | None = None  # the dry run's tiny models (built there when missing)

    def model(self, family: str) -> Path:
        from fastsd.models import full, tiny

        if self.dry:
            return tiny.ensure(family, self.tiny_models or self.root / "models")
        return full.ensure(family)

    def resolution(self, size: int) -> int:
        return 64 if self.dry else size

    def steps(self, n: int) -> int:
        return min(n, 1) if self.dry else n

    def sampler_names(self, family: str) -> list[str]:
        """Every sampler family; the dry run goes through all of them on SD 1.x only."""
        names = sampler_families()
        return names[:1] if self.dry and family != "sd1" else names

    def settings(self, **kw):
        """The T4 preset; on the CPU as far as it goes (bf16 autocast for fp16)."""
        from fastsd.train import TrainSettings

        cpu = dict(mixed_precision="bf16", adam_8bit=True) if self.dry else {}
        return TrainSettings(preset="t4", sample_every=0, checkpoint_every=0, **cpu, **kw)


# --------------------------------------------------------------------------- measures


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def reset_peak() -> None:
    import torch

    if cuda():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    import torch

    from fastsd.env import GIB

    return torch.cuda.max_memory_allocated() / GIB if cuda() else None


def rate(start: float, times: list[float]) -> float:
    """Steps per second from the end times of consecutive steps, the first left out as
    warm-up (with one step: that step, from ``start``)."""
    if len(times) < 2:
        return len(times) / (times[-1] - start) if times else 0.0
    return (len(times) - 1) / (times[-1] - times[0])


def session_for(plan: Plan, name: str, model: Path, resolution: int):
    """A session of the real-size tier's subject photos (tests/real/realsize.py, loaded by
    its path: with tests/real on sys.path, `conftest` would name that tier's conftest in
    the test process that runs the dry run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fastsd_realsize", HERE.parent / "tests" / "real" / "realsize.py")
    realsize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(realsize)
    return realsize.subject_session(name, plan.root / "home", model, resolution, n=4)


def train_rows(plan: Plan, t: Training) -> tuple[list[Row], list[str]]:
    from fastsd.train import train
    from fastsd.train.settings import estimate_vram_gib

    if t.pending:
        return [], [f"{t.title}: pending ({t.pending})."]
    res = plan.resolution(t.resolution)
    s = session_for(plan, f"train-{t.family}", plan.model(t.family), res)
    steps: dict[str, list[float]] = {}
    starts: dict[str, float] = {}
    peaks: dict[str, float | None] = {}
    parts = {}

    def hook(event, info):
        stage = info.get("stage_name")
        if event == "stage_start":
            parts["p"] = info["parts"]
            reset_peak()
            steps[stage], starts[stage] = [], time.perf_counter()
        elif event == "step":
            steps[stage].append(time.perf_counter())
        elif event == "stage_end":
            peaks[stage] = peak_gib()
    settings = plan.settings(unet_steps=plan.steps(t.unet_steps),
                             text_steps=plan.steps(t.text_steps), resolution=res,
                             method=t.method)
    train(s, settings, on_event=hook)
    resolved = s.settings["train"]
    from fastsd.train import TrainSettings

    p = parts["p"]
    estimate = estimate_vram_gib(TrainSettings.from_dict(resolved), t.family, p.param_counts(),
                                 p.adapter_counts())
    rows = []
    for stage, title in (("unet", "UNet stage"), ("text", "text encoder stage")):
        if stage not in steps:
            continue
        rows.append(Row(f"{t.title}: {title} speed", "it/s",
                        round(rate(starts[stage], steps[stage]), 3)))
        if peaks[stage] is not None:
            rows.append(Row(f"{t.title}: {title} peak VRAM, measured vs the estimate", "GiB",
                            round(peaks[stage], 2), estimate[stage], higher_is_better=False))
    return rows, [f"{t.title}: {t.method}, mixed precision {resolved['mixed_precision']}, "
                  f"8-bit AdamW {resolved['adam_8bit']}, gradient checkpointing "
                  f"{resolved['gradient_checkpointing']}, batch {resolved['batch_size']}."]


def sampler_families() -> list[str]:
    """One sampler name for each diffusers scheduler class fastsd offers."""
    from fastsd.webui import samplers

    seen: dict[str, str] = {}
    for s in samplers.SAMPLERS:
        seen.setdefault(s.cls, s.name)
    return list(seen.values())


def engine_rows(plan: Plan, family: str, deadline: float) -> tuple[list[Row], list[str]]:
    from fastsd.webui.catalog import Catalog
    from fastsd.webui.engine import Control, Engine
    from fastsd.webui.params import GenerationParams

    catalog = Catalog([])
    engine = Engine(catalog)
    engine.load(catalog.add(plan.model(family)))
    size = engine.native_size
    policy = ", ".join(k for k, v in engine.applied.to_dict().items() if v) or "fp32"
    rows, skipped = [], []
    for name in plan.sampler_names(family):
        if time.monotonic() > deadline:
            skipped.append(name)
            continue
        times: list[float] = []
        start = time.perf_counter()
        engine.generate(GenerationParams(prompt="a photo of sks toy", width=size, height=size,
                                         steps=plan.steps(ENGINE_STEPS), sampler_name=name,
                                         cfg_scale=1.0 if plan.dry else 7.0, seed=1),
                        Control(on_step=lambda i, n, lat: times.append(time.perf_counter())))
        rows.append(Row(f"engine {family} {size} px txt2img, {name}", "it/s",
                        round(rate(start, times), 3)))
    engine.unload()
    notes = [f"engine {family}: memory options {policy}"]
    if skipped:
        notes.append(f"engine {family}: out of time before {', '.join(skipped)}")
    return rows, notes


# --------------------------------------------------------------------------- diffusers


def dreambooth_flags(model: Path, images: Path, out: Path, t: Training, dry: bool) -> list[str]:
    """train_dreambooth.py's flags for the same weights and settings as the UNet stage."""
    flags = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images),
             "--instance_prompt", "a photo of sks toy", "--output_dir", str(out),
             "--resolution", str(64 if dry else t.resolution), "--train_batch_size", "1",
             "--learning_rate", "2e-6", "--lr_scheduler", "constant",
             "--max_train_steps", str(2 if dry else t.unet_steps), "--seed", "42",
             "--gradient_checkpointing", "--checkpointing_steps", "1000000"]
    return flags + (["--mixed_precision", "no"] if dry
                    else ["--mixed_precision", "fp16", "--use_8bit_adam"])


def script_version(script: Path) -> str:
    import diffusers

    pinned = re.search(r'check_min_version\("([^"]+)"\)', script.read_text(errors="replace"))
    return (f"diffusers {diffusers.__version__} installed, script requires "
            f"{pinned.group(1) if pinned else '?'}")


def gpu_memory_poller(pid: int, stop: threading.Event, peak: list[float]) -> None:
    """The largest GPU memory (GiB) nvidia-smi reports for process ``pid`` (context
    included)."""
    while not stop.wait(0.5):
        try:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                  "--format=csv,noheader,nounits"], capture_output=True,
                                 text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        for line in out.splitlines():
            p, _, mib = line.partition(",")
            if p.strip() == str(pid) and mib.strip().isdigit():
                peak[0] = max(peak[0], int(mib) / 1024)


def dreambooth_rows(plan: Plan, script: Path | None) -> tuple[list[Row], list[str]]:
    t = TRAINING[0]
    if script is None or not script.is_file():
        return [], ["diffusers' train_dreambooth.py: skipped, no script given "
                    "(--dreambooth-script PATH, from a diffusers checkout of the installed "
                    "version's examples/dreambooth)."]
    images = plan.root / "db-images"
    s = session_for(plan, "dreambooth", plan.model(t.family), plan.resolution(t.resolution))
    images.mkdir(exist_ok=True)
    for p in s.instance_images.glob("*.png"):
        (images / p.name).write_bytes(p.read_bytes())
    flags = dreambooth_flags(plan.model(t.family), images, plan.root / "db-out", t, plan.dry)
    proc = subprocess.Popen([sys.executable, str(script), *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    stop, peak = threading.Event(), [0.0]
    poller = threading.Thread(target=gpu_memory_poller, args=(proc.pid, stop, peak),
                              daemon=True)
    if not plan.dry:
        poller.start()
    out, _ = proc.communicate()
    stop.set()
    speeds = re.findall(r"([\d.]+)(it/s|s/it)", out)
    if proc.returncode or not speeds:
        return [], [f"diffusers' train_dreambooth.py failed (exit {proc.returncode}): "
                    + " | ".join(out.strip().splitlines()[-3:])]
    value, unit = speeds[-1]
    its = float(value) if unit == "it/s" else 1 / float(value)
    rows = [Row(f"{t.title}: diffusers train_dreambooth.py UNet training speed", "it/s",
                round(its, 3))]
    if not plan.dry:
        rows.append(Row(f"{t.title}: diffusers train_dreambooth.py peak GPU memory "
                        "(nvidia-smi, with its CUDA context)", "GiB", round(peak[0], 2),
                        higher_is_better=False))
    return rows, [f"train_dreambooth.py: {script_version(script)}; flags: {' '.join(flags)}"]


# --------------------------------------------------------------------------- the check


def device_name() -> str:
    import torch

    from fastsd import env

    return torch.cuda.get_device_name(env.cuda_index(torch.cuda.device_count())) \
        if cuda() else "CPU (dry run)"


def table(rows: list[Row]) -> str:
    width = max((len(r.metric) for r in rows), default=10)
    lines = [f"{'measure':{width}}  {'value':>10}  {'estimate/baseline':>18}  unit"]
    for r in rows:
        base = "" if r.baseline is None else f"{r.baseline:g}"
        lines.append(f"{r.metric:{width}}  {r.ours:>10g}  {base:>18}  {r.unit}")
    return "\n".join(lines)


def run(dry: bool, script: Path | None, results: Path | None,
        tiny_models: Path | None = None) -> list[Row]:
    """The whole check; returns its rows (also printed and written)."""
    import run as results_table

    if not dry and not cuda():
        raise SystemExit("No CUDA GPU here: run the GPU check on a GPU machine, or --dry-run "
                         "to exercise it on the CPU with the tiny models.")
    start = time.monotonic()
    deadline = start + BUDGET_S
    rows: list[Row] = []
    notes = [f"Device: {device_name()}."]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        plan = Plan(dry, Path(tmp), tiny_models)
        for t in TRAINING:
            if time.monotonic() > deadline:
                notes.append(f"{t.title}: skipped, out of time")
                continue
            r, n = train_rows(plan, t)
            rows, notes = rows + r, notes + n
        for family in ENGINE_FAMILIES:
            r, n = engine_rows(plan, family, deadline)
            rows, notes = rows + r, notes + n
        r, n = dreambooth_rows(plan, script)
        rows, notes = rows + r, notes + n
    notes.append(f"The whole check took {time.monotonic() - start:.0f} s.")
    print(table(rows))
    print("\n".join(notes))
    if results is not None:
        common.RESULTS = results
    write_result("gpu", f"GPU check at real size ({device_name()})", rows, COMMAND,
                 notes=" ".join(notes))
    md = (results.parent if results is not None else HERE) / "RESULTS.md"
    md.write_text(results_table.render(results_table.load(common.RESULTS)))
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="on the CPU with the tiny models: everything but CUDA")
    p.add_argument("--dreambooth-script", type=Path, default=None,
                   help="diffusers' examples/dreambooth/train_dreambooth.py, to run side by side")
    p.add_argument("--tiny-models", type=Path, default=None,
                   help="the dry run: a folder of tiny models to reuse (built when missing)")
    p.add_argument("--results", type=Path, default=None,
                   help="folder for gpu.json (default: benchmarks/results; the dry run: a "
                   "temporary folder); RESULTS.md is written beside it")
    args = p.parse_args(argv)
    if args.dry_run and args.results is None:  # printed, written to a folder then removed
        with tempfile.TemporaryDirectory(prefix="gpu-check-results-") as tmp:
            return run(True, args.dreambooth_script, Path(tmp) / "results", args.tiny_models)
    return run(args.dry_run, args.dreambooth_script, args.results, args.tiny_models)


if __name__ == "__main__":
    main()
