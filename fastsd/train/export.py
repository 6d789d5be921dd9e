"""What a run leaves: the model in diffusers format, its single file and the loss curve
(:func:`export`, which returns the :class:`TrainResult`), and the intermediate single files
written while it trains (:func:`save_single_file`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastsd import drive
from fastsd.train import segments
from fastsd.train.parts import Parts
from fastsd.train.resume import STAGE_TITLES
from fastsd.train.run import Run
from fastsd.train.settings import TrainSettings

log = logging.getLogger("fastsd")

LOSS_PNG = "loss.png"


@dataclass
class TrainResult:
    model_dir: Path | None  # the trained diffusers model (None for a LoRA run)
    single_file: Path | None
    global_step: int
    losses: list[float]
    loss_curve: Path | None
    samples: list[Path] = field(default_factory=list)
    resumed_from: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    lora: Path | None = None  # the LoRA file (a LoRA run)


def export(run: Run) -> TrainResult:
    """Full fine-tuning: the model folder and its single file. LoRA: the LoRA file (the
    base model is not written again). Both: the loss curve."""
    acc, s, st = run.accelerator, run.settings, run.state
    name = s.model_name or run.session.name
    result = TrainResult(None if s.lora else Path(run.session.models) / name, None,
                         st.global_step, st.losses, None, run.samples,
                         run.resumed_from, {"vae_encodes": run.latents.encodes,
                                            "prompt_encodes": run.prompts.encodes,
                                            "checkpoint_stalls": run.checkpoint_waits})
    if acc.is_main_process:
        if s.lora:
            result.lora = export_lora(run, Path(run.session.loras) / f"{name}.safetensors")
        else:
            run.placement.apply(run.parts, "export")
            export_model(run.parts, result.model_dir, s.save_precision or "fp32")
            result.single_file = export_single_file(result.model_dir, st.global_step)
        result.loss_curve = save_loss_curve(st.losses, s, Path(run.session.outputs) / LOSS_PNG)
        if run.lineage is not None:
            segments.record_finish(run.session, run.lineage, st.global_step)
    acc.wait_for_everyone()
    log.info("Trained %d steps; %s", st.global_step,
             f"the LoRA is {result.lora}" if s.lora else f"the model is in {result.model_dir}")
    run.emit("done", {**st.to_dict(), "model_dir": result.model_dir, "lora": result.lora})
    return result


def export_lora(run: Run, dest: Path, extra: dict[str, str] | None = None) -> Path:
    """The adapters trained (both stages') as one kohya-layout LoRA file (``extra``: more
    metadata)."""
    from fastsd.train import lora_export
    from fastsd.train.data import instance_prompt

    s, st, settings = run.settings, run.state, run.session.settings
    meta = lora_export.metadata(run.parts, s, title=dest.stem,
                                base_model=run.session.base_model,
                                trigger=instance_prompt(settings),
                                captions=[ex.caption for ex in run.examples],
                                steps=st.global_step)
    return lora_export.write(run.parts, s, dest, st.modified, {**meta, **(extra or {})})


def export_model(parts: Parts, dest: Path, precision: str) -> Path:
    """Save the pipeline in diffusers format into ``dest``, whole or not at all (staged
    locally when ``dest`` is on Drive, so a drop mid-export remounts and goes on)."""
    import torch

    if precision == "fp16":
        parts.pipe.to(dtype=torch.float16)
    with drive.folder_writer(dest) as tmp:
        parts.pipe.save_pretrained(tmp, safe_serialization=True)
    return dest


def export_single_file(model_dir: Path, step: int) -> Path:
    """The trained model as one .safetensors file beside its folder (via fastsd.convert)."""
    from fastsd.convert import to_single_file

    out = model_dir.parent / f"{model_dir.name}.safetensors"
    to_single_file(model_dir, out, fp16=True, ckpt=False, global_step=step)
    return out


SEGMENT_META = "fastsd.segment"  # in an intermediate file: the history segment that wrote it


def single_file_path(session, settings: TrainSettings, step: int) -> Path:
    """An intermediate file: ``models/NAME-stepN.safetensors``, beside the trained model
    (``models/NAME``), or for a LoRA run ``models/Lora/NAME-stepN.safetensors`` beside the
    LoRA; never in checkpoints/ (the resumable ``step-NNNNNNN`` folders)."""
    if settings.lora:
        name = settings.model_name or session.name
        return Path(session.loras) / f"{name}-step{step}.safetensors"
    model = segments.trained_model(session, settings)
    return model.parent / f"{model.name}-step{step}.safetensors"


def save_single_file(run: Run) -> Path | None:
    """Write the model as it is at this step as one fp16 .safetensors file (the streaming
    exporter, from the weights in memory; the components this run does not train from its
    base's folder), or a LoRA run's adapters as a LoRA file, for comparing steps in
    AUTOMATIC1111, Forge or ComfyUI. A file this
    segment already wrote (before a resume) is kept as it is."""
    from fastsd.convert import to_single_file
    from fastsd.convert.tensors import open_tensors
    from fastsd.errors import FastSDError

    acc, st = run.accelerator, run.state
    if not acc.is_main_process:
        return None
    path = single_file_path(run.session, run.settings, st.global_step)
    segment = run.lineage.id if run.lineage is not None else ""
    if path.is_file():
        try:
            with open_tensors(path) as tf:
                mine = tf.metadata.get(SEGMENT_META) == segment
        except FastSDError:
            mine = False
        if mine:
            log.info("%s is already there (written before the resume); kept.", path.name)
            return path
    if run.settings.lora:  # the adapters so far, as a LoRA file every UI loads
        export_lora(run, path, {SEGMENT_META: segment})
    else:
        tensors = run.parts.checkpoint_tensors(st.modified, acc.unwrap_model)
        to_single_file(run.base_dir, path, fp16=True, global_step=st.global_step,
                       tensors=tensors, metadata={SEGMENT_META: segment})
    run.emit("single_file", {"global_step": st.global_step, "path": path})
    return path


def save_loss_curve(losses: list[float], settings: TrainSettings, path: Path) -> Path | None:
    """The loss per step (and a moving average past 100 steps) as a PNG
    (:mod:`fastsd.train.curve`); the notebook's train cell shows it."""
    if not losses:
        return None
    import io

    from fastsd.train import curve

    first = settings.stage_order[0]
    title = " then ".join(STAGE_TITLES[s] for s in settings.stage_order
                          if settings.stage(s)["steps"])
    buf = io.BytesIO()
    curve.draw(losses, settings.stage(first)["steps"], title).save(buf, format="PNG")
    drive.atomic_write_bytes(path, buf.getvalue())
    return path
