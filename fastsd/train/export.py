"""What a run leaves: the model in diffusers format, its single file and the loss curve
(:func:`export`, which returns the :class:`TrainResult`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastsd import drive
from fastsd.train.parts import Parts
from fastsd.train.resume import STAGE_TITLES
from fastsd.train.run import Run
from fastsd.train.settings import TrainSettings

log = logging.getLogger("fastsd")

LOSS_PNG = "loss.png"


@dataclass
class TrainResult:
    model_dir: Path
    single_file: Path | None
    global_step: int
    losses: list[float]
    loss_curve: Path | None
    samples: list[Path] = field(default_factory=list)
    resumed_from: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def export(run: Run) -> TrainResult:
    acc, s, st = run.accelerator, run.settings, run.state
    run.placement.apply(run.parts, "export")
    result = TrainResult(Path(run.session.models) / (s.model_name or run.session.name), None,
                         st.global_step, st.losses, None, run.samples,
                         run.resumed_from, {"vae_encodes": run.latents.encodes,
                                            "prompt_encodes": run.prompts.encodes,
                                            "checkpoint_stalls": run.checkpoint_waits})
    if acc.is_main_process:
        export_model(run.parts, result.model_dir, s.save_precision or "fp32")
        result.single_file = export_single_file(result.model_dir, st.global_step)
        result.loss_curve = save_loss_curve(st.losses, s, Path(run.session.outputs) / LOSS_PNG)
    acc.wait_for_everyone()
    log.info("Trained %d steps; the model is in %s", st.global_step, result.model_dir)
    run.emit("done", {**st.to_dict(), "model_dir": result.model_dir})
    return result


def export_model(parts: Parts, dest: Path, precision: str) -> Path:
    """Save the pipeline in diffusers format into ``dest``, whole or not at all (staged
    locally when ``dest`` is on Drive, so a drop mid-export remounts and goes on)."""
    import torch

    if precision == "fp16":
        parts.pipe.to(dtype=torch.float16)
    with drive.staged_folder(dest) as tmp:
        parts.pipe.save_pretrained(tmp, safe_serialization=True)
    return dest


def export_single_file(model_dir: Path, step: int) -> Path:
    """The trained model as one .safetensors file beside its folder (via fastsd.convert)."""
    from fastsd.convert import to_single_file

    out = model_dir.parent / f"{model_dir.name}.safetensors"
    to_single_file(model_dir, out, fp16=True, ckpt=False, global_step=step)
    return out


def save_loss_curve(losses: list[float], settings: TrainSettings, path: Path) -> Path | None:
    """The loss per step (and a moving average past 100 steps) as a PNG."""
    if not losses:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5), dpi=100)
    ax = fig.add_subplot()
    steps = range(1, len(losses) + 1)
    k = len(losses) // 50  # a moving average once there are many steps
    ax.plot(steps, losses, lw=0.6 if k > 1 else 1.5, alpha=0.5 if k > 1 else 1, label="loss")
    if k > 1:
        avg = [sum(losses[max(0, i - k + 1):i + 1]) / min(k, i + 1) for i in range(len(losses))]
        ax.plot(steps, avg, lw=1.5, label=f"mean of {k} steps")
    first = settings.stage_order[0]
    boundary = settings.stage(first)["steps"]
    if 0 < boundary < len(losses):
        ax.axvline(boundary + 0.5, color="grey", ls="--", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(" then ".join(STAGE_TITLES[s] for s in settings.stage_order
                               if settings.stage(s)["steps"]))
    ax.legend(loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    drive.atomic_write_bytes(path, buf.getvalue())  # the notebook's train cell shows it
    return path
