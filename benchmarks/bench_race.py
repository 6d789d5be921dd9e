"""The race: `fastsd train` against diffusers' examples/dreambooth/train_dreambooth.py,
whole process, from the command to a trained model on disk.

Both sides train the UNet of the same tiny SD 1.x on the same images with the same
settings: 64 px, batch 1, learning rate 5e-6 (constant), AdamW with weight decay 1e-2 and
gradient clipping at 1.0, fp32 on the CPU, no text encoder training, no prior
preservation, seed 42. Each side runs 300 and 20 UNet steps, each run in its own process,
the sides alternating (which one goes first swaps every round) so that the load of a
shared machine falls on both. Per step is the difference of the 300- and the 20-step runs
over 280 steps; it leaves out what both pay once (imports, model load, saving).

The diffusers script is not part of the diffusers package and is not kept in this
repository: copy examples/dreambooth/train_dreambooth.py from the diffusers repository at
a release whose ``check_min_version`` the installed diffusers passes, to
``~/.cache/fastsd-bench/train_dreambooth.py`` (or give ``--script PATH`` or
``$FASTSD_BENCH_DREAMBOOTH``). The result records its sha256 and, when it is a known copy,
the diffusers commit it is from. The script imports torchvision (for its image
transforms), which fastsd does not need: install it beside, not into, the environment:

    pip install --no-deps --target ~/.cache/fastsd-bench/site torchvision==<the torch's>

(``--site PATH`` or ``$FASTSD_BENCH_SITE`` to put it elsewhere). PyPI's Linux torchvision
is built for CUDA; against a CPU build of torch its compiled operators do not load and its
import stops at registering them. The script only uses torchvision's image transforms
(Python on PIL images), so the launcher here declares those two operators' schemas first
when they are missing, then runs the script unchanged.

Usage: ``python benchmarks/bench_race.py [--rounds N] [--threads N] [--script PATH]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Row, write_result

HERE = Path(__file__).resolve().parent
CACHE = Path.home() / ".cache" / "fastsd-bench"
DEFAULT_SCRIPT = CACHE / "train_dreambooth.py"
DEFAULT_SITE = CACHE / "site"
#: copies of train_dreambooth.py this benchmark was checked with: sha256 -> where from
KNOWN_SCRIPTS = {
    "4474ee28643acdc3b5e6fa01c1b3d97df55b754b7cbd88f48e9253fb4ea82803":
        "huggingface/diffusers d035dcd7cc7c88e0a154609b62887d50bba9fdc2 (v0.40.0-release, "
        "'Release: v0.40.0'), examples/dreambooth/train_dreambooth.py",
}
LONG, SHORT = 300, 20
RES, BATCH, LR = 64, 1, 5e-6
PROMPT = "sks cat"  # the session's instance prompt: instance token "sks", class word "cat"


# --------------------------------------------------------------------------- the two commands


def fastsd_cmd(home: Path, steps: int) -> list[str]:
    """`fastsd train` as a user runs it: defaults, but the race's settings."""
    return [sys.executable, "-m", "fastsd.cli", "train", "bench", "--restart",
            "--unet-steps", str(steps), "--text-steps", "0", "--unet-lr", str(LR),
            "--unet-schedule", "constant", "--batch-size", str(BATCH), "--resolution", str(RES),
            "--max-grad-norm", "1.0", "--weight-decay", "0.01", "--seed", "42",
            "--home", str(home)]


def diffusers_cmd(script: Path, home: Path, out: Path, steps: int) -> list[str]:
    """diffusers' script, with the same settings (no tracker: none is installed, and
    "all" picks only installed ones)."""
    return [sys.executable, __file__, "--launch", str(script),
            "--pretrained_model_name_or_path", str(home / "models" / "tiny-sd1"),
            "--instance_data_dir", str(home / "sessions" / "bench" / "instance_images"),
            "--instance_prompt", PROMPT, "--output_dir", str(out), "--resolution", str(RES),
            "--train_batch_size", str(BATCH), "--max_train_steps", str(steps),
            "--learning_rate", str(LR), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--adam_weight_decay", "0.01", "--max_grad_norm", "1.0",
            "--mixed_precision", "no", "--report_to", "all", "--seed", "42"]


def launch(argv: list[str]) -> None:
    """Run diffusers' script (argv[0]) with its arguments, as `python script ...` would,
    after making torchvision importable on a CPU build of torch (see the module doc)."""
    import runpy

    import torch

    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:  # its CUDA-built operators did not load
        if "torchvision::" not in str(e):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision  # noqa: F401,F811
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")


def timed(cmd: list[str], env: dict, log: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process) of one run; raises with its log's tail."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                              stdin=subprocess.DEVNULL).returncode
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({code}):\n"
                           + log.read_text()[-3000:])
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


# --------------------------------------------------------------------------- the script


def find_script(given: str | None) -> Path | None:
    path = Path(given or os.environ.get("FASTSD_BENCH_DREAMBOOTH") or DEFAULT_SCRIPT)
    return path if path.is_file() else None


def script_record(path: Path) -> dict:
    text = path.read_bytes()
    sha = hashlib.sha256(text).hexdigest()
    m = re.search(rb'check_min_version\("([^"]+)"\)', text)
    return {"path": str(path), "sha256": sha,
            "source": KNOWN_SCRIPTS.get(sha, "not a copy this benchmark knows: record where "
                                             "it is from"),
            "check_min_version": m.group(1).decode() if m else None}


HOW_TO_GET = (
    "diffusers' train_dreambooth.py is not installed with diffusers. To run the race, copy "
    "examples/dreambooth/train_dreambooth.py from the diffusers repository (a release whose "
    "check_min_version the installed diffusers passes) to {default}, or pass --script PATH "
    "(or set FASTSD_BENCH_DREAMBOOTH); and install torchvision beside the environment: "
    "pip install --no-deps --target {site} torchvision==<the version made for this torch>. "
    "Never commit the script.")


# --------------------------------------------------------------------------- main


def spread(xs: list[float]) -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--script", help="diffusers' train_dreambooth.py (default: "
                   "$FASTSD_BENCH_DREAMBOOTH or ~/.cache/fastsd-bench/train_dreambooth.py)")
    p.add_argument("--site", help="folder with torchvision for the diffusers side (default: "
                   "$FASTSD_BENCH_SITE or ~/.cache/fastsd-bench/site)")
    p.add_argument("--rounds", type=int, default=5, help="rounds; each runs both sides at "
                   "both step counts (default: 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides "
                   "(OMP_NUM_THREADS; default 1: steadier on a shared machine; 0: torch's "
                   "own default, as a user runs it, on a quiet machine)")
    args = p.parse_args(argv)
    site = Path(args.site or os.environ.get("FASTSD_BENCH_SITE") or DEFAULT_SITE)
    script = find_script(args.script)
    if script is None:
        print("Skipping the race: " + HOW_TO_GET.format(default=DEFAULT_SCRIPT, site=site))
        return 0
    record = script_record(script)

    from bench_train import make_session

    import diffusers
    import torch

    from fastsd.models import tiny

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    threads = f"{args.threads} torch thread(s)" if args.threads else "torch's default threads"
    base_env = {**env, "PYTHONPATH": os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    times: dict[tuple[str, int], list[tuple[float, float]]] = {
        (side, n): [] for side in ("fastsd", "diffusers") for n in (LONG, SHORT)}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="bench-race-") as tmp:
        home = Path(tmp)
        tiny.ensure("sd1", home / "models")
        make_session(home, RES)
        out, log = home / "diffusers-out", home / "run.log"
        for r in range(args.rounds):
            sides = ["fastsd", "diffusers"] if r % 2 == 0 else ["diffusers", "fastsd"]
            for n in (LONG, SHORT):
                for side in sides:
                    shutil.rmtree(out, ignore_errors=True)
                    cmd = (fastsd_cmd(home, n) if side == "fastsd"
                           else diffusers_cmd(script, home, out, n))
                    times[side, n].append(timed(cmd, env if side == "fastsd" else base_env, log))
                    loads.append(os.getloadavg()[0])
                    print(f"round {r + 1}: {side} {n} steps: {times[side, n][-1][0]:.1f} s "
                          f"(CPU {times[side, n][-1][1]:.1f} s)", flush=True)
        assert (out / "unet").is_dir() and (home / "sessions/bench/models/bench").is_dir()

    def med(side: str, n: int, k: int) -> float:
        return statistics.median(t[k] for t in times[side, n])

    def per_step(side: str, k: int, i: int | None = None) -> float:
        """ms per step: (300-step run - 20-step run) / 280, of round i or of the medians."""
        if i is None:
            return 1000 * (med(side, LONG, k) - med(side, SHORT, k)) / (LONG - SHORT)
        return 1000 * (times[side, LONG][i][k] - times[side, SHORT][i][k]) / (LONG - SHORT)

    rounds = range(args.rounds)
    paired_whole = [times["diffusers", LONG][i][0] / times["fastsd", LONG][i][0] for i in rounds]
    paired_step = [per_step("diffusers", 0, i) / per_step("fastsd", 0, i) for i in rounds]
    paired_cpu_step = [per_step("diffusers", 1, i) / per_step("fastsd", 1, i) for i in rounds]
    rows = [
        Row(f"whole process, command to model on disk, {LONG} UNet steps (wall)", "s",
            round(med("fastsd", LONG, 0), 2), round(med("diffusers", LONG, 0), 2), ">= 1.5x",
            higher_is_better=False),
        Row(f"per UNet step: ({LONG}-step run - {SHORT}-step run) / {LONG - SHORT} (wall)",
            "ms", round(per_step("fastsd", 0), 1), round(per_step("diffusers", 0), 1),
            ">= 2x", higher_is_better=False),
        Row(f"whole process, {SHORT} UNet steps (wall)", "s", round(med("fastsd", SHORT, 0), 2),
            round(med("diffusers", SHORT, 0), 2), higher_is_better=False),
        Row(f"whole process, {LONG} UNet steps (CPU time of the process)", "s",
            round(med("fastsd", LONG, 1), 2), round(med("diffusers", LONG, 1), 2),
            higher_is_better=False),
        Row("per UNet step (CPU time of the process)", "ms", round(per_step("fastsd", 1), 1),
            round(per_step("diffusers", 1), 1), higher_is_better=False),
    ]
    for row in rows[:2]:
        row.passed = row.ratio is not None and row.ratio >= float(row.target[3:-1])
    raw = {f"{side} {n}": [[round(w, 2), round(c, 2)] for w, c in ts]
           for (side, n), ts in times.items()}
    notes = (
        f"Ratios above 1: fastsd takes less time. The ratio comes from everything the two "
        f"programs do differently at the same settings: fastsd encodes each image with the "
        f"VAE and the prompt with the text encoder once, before the loop, and steps with "
        f"torch's fused AdamW over one flat buffer of the UNet's weights, gradients and "
        f"moments (clipping, the step and the zeroing of the gradients are a call each on one "
        f"tensor, not on each of 684: fastsd.train.flat); the diffusers script re-reads, "
        f"re-encodes and re-embeds every "
        f"batch and steps with AdamW's default implementation; fastsd also writes a "
        f"resumable checkpoint at the stage's end, the single .safetensors file and the loss "
        f"curve, which the diffusers script does not. Settings on both sides: tiny SD 1.x "
        f"(fastsd.models.tiny), 8 images of 96 px made by bench_train.make_session, "
        f"{RES} px, batch {BATCH}, constant learning rate {LR}, weight decay 0.01, gradient "
        f"clipping 1.0, fp32 on the CPU, seed 42, no text encoder training, no prior "
        f"preservation, {threads} (OMP_NUM_THREADS), each run its own "
        f"process, {args.rounds} rounds alternating which side goes first; medians. Spread "
        f"over the rounds of the paired ratios (same round, back to back): whole process "
        f"{spread(paired_whole)}x, per step {spread(paired_step)}x (wall), "
        f"{spread(paired_cpu_step)}x (CPU time). The CPU-time rows count the time the "
        f"process ran, not the time it waited for a core: steadier on a shared machine. "
        f"Load average (1 min) during the runs: {spread(loads)} on {os.cpu_count()} "
        f"cores.\n\n"
        f"diffusers' script: sha256 {record['sha256']}, {record['source']}; its "
        f"check_min_version(\"{record['check_min_version']}\") passed with the installed "
        f"diffusers {diffusers.__version__} (torch {torch.__version__}); torchvision from "
        f"{site} (its image transforms only).\n\nRuns (wall s, CPU s): "
        + "; ".join(f"{k}: {v}" for k, v in raw.items()))
    write_result("race", "The race: fastsd train vs diffusers' train_dreambooth.py, command "
                 "to model on disk", rows, "python benchmarks/bench_race.py", notes)
    for row in rows:
        print(f"{row.metric}: {row.ours} vs {row.baseline} ({row.ratio:.2f}x)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--launch":
        launch(sys.argv[2:])
    else:
        sys.exit(main(sys.argv[1:]))
