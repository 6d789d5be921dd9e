"""Training in a child process, driven from a notebook cell.

The train cell calls :func:`train_in_child`: it starts ``fastsd train SESSION --events`` as
a child process (through ``accelerate launch`` when there are several GPUs), shows its
progress bar and loss in the cell, and returns when it is done. The kernel never imports
torch for training, so its GPU memory is untouched: a crash or an out-of-memory error ends
the child, not the notebook.

Interrupting the cell (the Stop button) sends SIGINT to the child, which checkpoints and
exits; if it has not exited after ``grace`` seconds it gets SIGTERM (the trainer finishes
its step, checkpoints and exits), then SIGKILL. A stopped run resumes with ``resume=True``.

With Disconnect_After_Training ticked the cell then calls :func:`disconnect_when_safe`,
which gives the Colab runtime back once the model is whole on Drive.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path

from fastsd import env as fastsd_env, options
from fastsd.errors import FastSDError, OutOfMemory

log = logging.getLogger("fastsd")

EVENT_MARK = "@@fastsd-event "
OOM_MARKS = ("CUDA out of memory", "OutOfMemoryError", "out of memory", "MPS backend out of memory")


@dataclasses.dataclass
class ChildResult:
    """What the child trained: like TrainResult, read back from the session's folders."""

    model_dir: Path | None  # None for a LoRA run
    global_step: int
    single_file: Path | None
    loss_curve: Path | None
    samples: list[Path] = dataclasses.field(default_factory=list)  # as the child made them
    lora: Path | None = None  # the LoRA file of a LoRA run


class TrainingStopped(FastSDError):
    """The user stopped training; it resumes from the last checkpoint."""


class TrainingFailed(FastSDError):
    """The training process ended with an error."""


# --------------------------------------------------------------------------- child side


def event_printer(name: str, info: dict) -> None:
    """An ``on_event`` hook for the trainer that writes each event as one JSON line on
    stdout, for the parent to read (``fastsd train --events``)."""
    keep = {k: (str(v) if isinstance(v, Path) else v) for k, v in info.items()
            if k in ("global_step", "stage_name", "stage_step", "loss", "path", "model_dir",
                     "lora")}
    if name == "samples":
        keep["paths"] = [str(p) for p in info["paths"]]
    if name == "step" or name in ("stage_start", "stage_end", "checkpoint", "samples",
                                  "single_file", "done"):
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
    """GPUs this runtime has, asked of the driver so that the kernel never touches CUDA."""
    return len(fastsd_env.driver_gpus() or [])


def command(session_name: str, settings=None, *, resume: bool = False, restart: bool = False,
            accept_changed_data: bool = False, home: Path | None = None,
            gpus: int | None = None, more_unet_steps: int = 0,
            more_text_steps: int = 0) -> list[str]:
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
    for flag, n in (("--more-unet-steps", more_unet_steps), ("--more-text-steps",
                                                            more_text_steps)):
        if n:
            cmd += [flag, str(int(n))]
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


def _oom_message(settings, session: str) -> str:
    now = []
    for name, what in (("resolution", "resolution"), ("batch_size", "batch size"),
                       ("gradient_checkpointing", "gradient checkpointing"),
                       ("adam_8bit", "8-bit Adam")):
        value = getattr(settings, name, None) if settings is not None else None
        now.append(f"{what} {'from the preset' if value is None else value}")
    less = options.say(("batch_size", 1), "gradient_checkpointing", "adam_8bit",
                       session=session)
    return ("The GPU ran out of memory while training (" + ", ".join(now) + "). Use less: "
            "one image per step (enough for DreamBooth), gradient checkpointing and 8-bit Adam "
            f"({less}), or fewer text encoder steps; then resume: "
            f"{options.say('resume', session=session)}. The notebook's own GPU memory is "
            "untouched.")


def train_in_child(session, settings=None, *, resume: bool = False, restart: bool = False,
                   accept_changed_data: bool = False, grace: float = 120.0,
                   env: dict | None = None, more_unet_steps: int = 0,
                   more_text_steps: int = 0) -> ChildResult:
    """Run ``fastsd train`` for ``session`` in a child process, showing its progress here.
    ``more_unet_steps`` / ``more_text_steps``: a further segment on the trained model
    (:mod:`fastsd.train.segments`).

    Returns where the model, its single file and the loss curve are. Stop
    (KeyboardInterrupt) stops the child with a checkpoint and raises TrainingStopped; an
    error in the child raises TrainingFailed, or fastsd.errors.OutOfMemory (with what to
    lower) when the GPU ran out of memory.
    """
    from tqdm.auto import tqdm

    cmd = command(session.name, settings, resume=resume, restart=restart,
                  accept_changed_data=accept_changed_data, home=session.workspace.root,
                  more_unet_steps=more_unet_steps, more_text_steps=more_text_steps)
    log.debug("starting %s", " ".join(cmd))
    # The child's own bars are off: its events drive one bar here. Its messages name what
    # the user sets where this runs (a notebook cell's form fields: fastsd.options).
    child_env = {**(os.environ if env is None else env), **fastsd_env.caller_env(),
                 "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
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
            elif ev["event"] == "single_file":
                tqdm.write(f"single file at step {ev['global_step']}: {ev.get('path')}")
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
            f"To continue from {where}: {options.say('resume', session=session.name)}, and "
            "run it again.") from None
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
            raise OutOfMemory(_oom_message(settings, session.name))
        errors = [ln for ln in tail if ln.startswith("error: ")]
        if errors:
            raise TrainingFailed(errors[-1][len("error: "):])
        raise TrainingFailed(f"Training stopped with exit code {code}. The last lines it "
                             "wrote:\n" + "\n".join(list(tail)[-8:]) + "\nCheckpoints are "
                             "kept: fix the cause, then "
                             f"{options.say('resume', session=session.name)}.")
    done = done or last
    model_dir = Path(done["model_dir"]) if done.get("model_dir") else None
    single = model_dir.parent / f"{model_dir.name}.safetensors" if model_dir else None
    curve = Path(session.outputs) / "loss.png"
    return ChildResult(model_dir, int(done["global_step"]),
                       single if single and single.is_file() else None,
                       curve if curve.is_file() else None, samples,
                       Path(done["lora"]) if done.get("lora") else None)


# --------------------------------------------------------------------------- disconnect


def check_whole(model_dir: Path | None, single_file: Path | None,
                lora: Path | None = None) -> str | None:
    """None when what the run made is whole on disk: the trained model folder (every weight
    file there, each as long as its header says) and its single file, or for a LoRA run
    its LoRA file; else what is wrong."""
    from fastsd.convert.tensors import open_tensors
    from fastsd.convert.to_single import weight_files

    try:
        if lora is not None:
            files = [Path(lora)]
        else:
            model_dir = Path(model_dir)
            index = json.loads((model_dir / "model_index.json").read_text(encoding="utf-8"))
            files = [f for part in ("unet", "vae", "text_encoder", "text_encoder_2")
                     if part in index for f in weight_files(model_dir / part)]
            if single_file is None or not Path(single_file).is_file():
                return (f"the single file {single_file or model_dir.name + '.safetensors'} "
                        "is missing")
            files.append(Path(single_file))
        for f in files:
            open_tensors(f).close()
    except (OSError, ValueError, FastSDError) as e:
        return str(e)
    return None


def disconnect_when_safe(model_dir: Path | None, single_file: Path | None,
                         lora: Path | None = None) -> bool:
    """Give this Colab runtime back (Disconnect_After_Training, ``--disconnect``), so that
    it stops using the account's compute units, once the result is safely on Drive: the
    model folder and the single file (or the LoRA file) are checked whole, Drive's pending
    writes are flushed (``google.colab.drive.flush_and_unmount``), and only then is the
    runtime unassigned. Outside Colab it does nothing and says so in one line. Returns
    whether it disconnected; a result that is not whole is a TrainingFailed, and the
    runtime stays."""
    made = lora if lora is not None else model_dir
    if fastsd_env.runtime() != "colab":
        log.info("Not on Colab: nothing to disconnect (the %s).",
                 f"LoRA is {made}" if lora else f"model is in {made}")
        return False
    problem = check_whole(model_dir, single_file, lora)
    if problem:
        raise TrainingFailed(f"Not disconnecting: the trained model is not whole on Drive "
                             f"({problem}). The runtime stays connected: run the train cell "
                             f"again ({options.say('resume')}) to export it again.")
    from google.colab import drive as colab_drive  # type: ignore[import-not-found]
    from google.colab import runtime  # type: ignore[import-not-found]

    log.info("%s is whole on Drive; flushing Drive and disconnecting this runtime.",
             Path(made).name if lora is not None else
             f"{Path(model_dir).name} with {Path(single_file).name}")
    colab_drive.flush_and_unmount()  # what is still being uploaded reaches Drive first
    runtime.unassign()
    return True
