"""Training in a child process, driven from a notebook cell.

The train cell calls :func:`train_in_child`: it starts ``fastsd train SESSION --events`` as
a child process (through ``accelerate launch`` when there are several GPUs), shows its
progress bar and loss in the cell, and returns when it is done. The kernel never imports
torch for training, so its GPU memory is untouched: a crash or an out-of-memory error ends
the child, not the notebook.

Interrupting the cell (the Stop button) sends SIGINT to the child, which checkpoints and
exits; if it has not exited after ``grace`` seconds it gets SIGTERM (the trainer finishes
its step, checkpoints and exits), then SIGKILL. A stopped run resumes with ``resume=True``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path

from fastsd.errors import FastSDError

log = logging.getLogger("fastsd")

EVENT_MARK = "@@fastsd-event "
OOM_MARKS = ("CUDA out of memory", "OutOfMemoryError", "out of memory", "MPS backend out of memory")


@dataclasses.dataclass
class ChildResult:
    """What the child trained: like TrainResult, read back from the session's folders."""

    model_dir: Path
    global_step: int
    single_file: Path | None
    loss_curve: Path | None
    samples: list[Path] = dataclasses.field(default_factory=list)  # as the child made them


class TrainingStopped(FastSDError):
    """The user stopped training; it resumes from the last checkpoint."""


class TrainingFailed(FastSDError):
    """The training process ended with an error."""


class OutOfMemory(TrainingFailed):
    """The GPU ran out of memory while training."""


# --------------------------------------------------------------------------- child side


def event_printer(name: str, info: dict) -> None:
    """An ``on_event`` hook for the trainer that writes each event as one JSON line on
    stdout, for the parent to read (``fastsd train --events``)."""
    keep = {k: (str(v) if isinstance(v, Path) else v) for k, v in info.items()
            if k in ("global_step", "stage_name", "stage_step", "loss", "path", "model_dir")}
    if name == "samples":
        keep["paths"] = [str(p) for p in info["paths"]]
    if name == "step" or name in ("stage_start", "stage_end", "checkpoint", "samples", "done"):
        print(EVENT_MARK + json.dumps({"event": name, **keep}), flush=True)


# --------------------------------------------------------------------------- parent side


def show_samples(step: int, paths: list[str]) -> None:
    """Show sample images in the notebook cell as the child writes them (elsewhere, say
    where they are)."""
    from tqdm.auto import tqdm

    tqdm.write(f"samples at step {step}: " + ", ".join(Path(p).name for p in paths))
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        return
    if get_ipython() is not None:
        for p in paths:
            display(Image(filename=p, width=256))


def _settings_args(settings) -> list[str]:
    """``--flag value`` for every setting that differs from TrainSettings' default."""
    from fastsd.train.settings import TrainSettings

    args: list[str] = []
    default = TrainSettings()
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if value == getattr(default, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            for v in value:
                args += [flag.rstrip("s"), str(v)]
        elif value is not None:
            args += [flag, str(value)]
    return args


def gpu_count() -> int:
    """GPUs this runtime has, asked of nvidia-smi so that the kernel never touches CUDA."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    res = subprocess.run([smi, "-L"], capture_output=True, text=True)
    return sum(1 for ln in res.stdout.splitlines() if ln.startswith("GPU "))


def command(session_name: str, settings=None, *, resume: bool = False, restart: bool = False,
            accept_changed_data: bool = False, home: Path | None = None,
            gpus: int | None = None) -> list[str]:
    """The child's command line."""
    gpus = gpu_count() if gpus is None else gpus
    if gpus > 1:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes",
                  str(gpus), "-m", "fastsd.cli"]
    else:
        launch = [sys.executable, "-m", "fastsd.cli"]
    cmd = [*launch, "train", session_name, "--events"]
    if resume:
        cmd.append("--resume")
    if restart:
        cmd.append("--restart")
    if accept_changed_data:
        cmd.append("--accept-changed-data")
    if home is not None:
        cmd += ["--home", str(home)]
    if settings is not None:
        cmd += _settings_args(settings)
    return cmd


def _stop(proc: subprocess.Popen, grace: float) -> int:
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, grace), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            log.warning("Training did not stop after %s; sending the next signal.",
                        signal.Signals(sig).name)
    return proc.wait()


def _oom_message(settings) -> str:
    now = []
    for name in ("resolution", "batch_size", "gradient_checkpointing", "adam_8bit"):
        value = getattr(settings, name, None) if settings is not None else None
        now.append(f"{name}={'preset' if value is None else value}")
    return ("The GPU ran out of memory while training (" + ", ".join(now) + "). Lower "
            "batch_size (1 is enough for DreamBooth) or resolution, turn on "
            "gradient_checkpointing and adam_8bit, or train the text encoder for fewer steps; "
            "then run the train cell again with Resume ticked. The notebook's own GPU memory "
            "is untouched.")


def train_in_child(session, settings=None, *, resume: bool = False, restart: bool = False,
                   accept_changed_data: bool = False, grace: float = 120.0,
                   env: dict | None = None) -> ChildResult:
    """Run ``fastsd train`` for ``session`` in a child process, showing its progress here.

    Returns where the model, its single file and the loss curve are. Stop
    (KeyboardInterrupt) stops the child with a checkpoint and raises TrainingStopped; an
    error in the child raises TrainingFailed (OutOfMemory with what to lower).
    """
    from tqdm.auto import tqdm

    cmd = command(session.name, settings, resume=resume, restart=restart,
                  accept_changed_data=accept_changed_data, home=session.workspace.root)
    log.debug("starting %s", " ".join(cmd))
    # The child's own bars are off: its events drive one bar here.
    child_env = {**(os.environ if env is None else env), "TQDM_DISABLE": "1",
                 "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True, env=child_env,
                            stdin=subprocess.DEVNULL)
    bar, last, done, tail = None, {}, None, deque(maxlen=40)
    samples: list[Path] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.startswith(EVENT_MARK):
                tail.append(line.rstrip("\n"))
                print(line, end="", flush=True)  # the child's log, shown in the cell
                continue
            ev = json.loads(line[len(EVENT_MARK):])
            last = ev
            if ev["event"] == "stage_start":
                if bar is not None:
                    bar.close()
                bar = tqdm(desc=ev.get("stage_name", "training"), unit="step",
                           initial=ev.get("stage_step", 0))
            elif ev["event"] == "step" and bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{ev['loss']:.4f}", step=ev["global_step"])
            elif ev["event"] == "checkpoint":
                tqdm.write(f"checkpoint at step {ev['global_step']}: {ev.get('path')}")
            elif ev["event"] == "samples":
                samples += [Path(p) for p in ev["paths"]]
                show_samples(ev["global_step"], ev["paths"])
            elif ev["event"] == "done":
                done = ev
        code = proc.wait()
    except KeyboardInterrupt:
        code = _stop(proc, grace)
        if bar is not None:
            bar.close()
        from fastsd.train import checkpoint

        # The newest finished checkpoint (its manifest is written last); not loaded here,
        # which would read gigabytes and import torch into the kernel.
        ck = next((c for c in reversed(checkpoint.listing(session.checkpoints))
                   if (c.path / checkpoint.MANIFEST).is_file()), None)
        where = f"the checkpoint at step {ck.step}" if ck else "the start (no checkpoint yet)"
        raise TrainingStopped(
            f"Training stopped at step {last.get('global_step', 0)} (exit code {code}). "
            f"Tick Resume and run this cell again to continue from {where}.") from None
    finally:
        if bar is not None:
            bar.close()
        if proc.poll() is None:
            _stop(proc, grace)
    if code == -signal.SIGKILL:
        raise TrainingFailed(
            f"The training process was killed (SIGKILL) at step {last.get('global_step', 0)}. "
            "On Colab that is almost always the system RAM running out (12.7 GB on the free "
            "runtime): stop what else holds memory in this runtime (the web UI, a model loaded "
            "in the notebook), or restart the runtime, then run the cell again with Resume: "
            "the checkpoints are kept.")
    if code != 0:
        text = "\n".join(tail)
        if any(m in text for m in OOM_MARKS):
            raise OutOfMemory(_oom_message(settings))
        errors = [ln for ln in tail if ln.startswith("error: ")]
        if errors:
            raise TrainingFailed(errors[-1][len("error: "):])
        raise TrainingFailed(f"Training stopped with exit code {code}. The last lines it "
                             "wrote:\n" + "\n".join(list(tail)[-8:]) + "\nCheckpoints are "
                             "kept: fix the cause, then run the cell again with Resume.")
    done = done or last
    model_dir = Path(done["model_dir"])
    single = model_dir.parent / f"{model_dir.name}.safetensors"
    curve = Path(session.outputs) / "loss.png"
    return ChildResult(model_dir, int(done["global_step"]), single if single.is_file() else None,
                       curve if curve.is_file() else None, samples)
