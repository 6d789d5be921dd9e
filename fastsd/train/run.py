"""A run and its set-up: :func:`prepare` does everything before the first step (settings,
the checkpoint to resume from, the model, the Drive space check, class images, the caches)
and returns the :class:`Run` the stages share; the prompt embeddings (:class:`Prompts`)."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastsd import drive, env, models, options
from fastsd.errors import DataError, ModelError
from fastsd.train import checkpoint, data, lora, segments
from fastsd.train import resume as resume_mod
from fastsd.train.parts import (Parts, Placement, encode_text, load_parts, placement_policy,
                                tokenize)
from fastsd.train.settings import (TrainSettings, describe, drive_plan, estimate_vram_gib,
                                   resolve, single_file_steps)
from fastsd.train.state import StopSignals, TrainState, rng_states, stages_left

log = logging.getLogger("fastsd")

SAMPLES_DIR = "samples"

Event = Callable[[str, dict], None]


# --------------------------------------------------------------------------- prompts


class Prompts:
    """Prompt embeddings: each distinct caption embedded once while the text encoders are
    frozen; computed at each step by the encoders while they train."""

    def __init__(self, parts: Parts, captions: list[str], device) -> None:
        self.parts, self.device = parts, device
        self.captions = sorted(set(captions))
        all_ids = tokenize(parts, self.captions)  # tokenized once, even while training
        self.ids = {c: [ids[i:i + 1] for ids in all_ids] for i, c in enumerate(self.captions)}
        self.cache: dict[str, tuple] = {}
        self.encodes = 0

    def build(self) -> None:
        import torch

        self.cache.clear()
        with torch.no_grad():
            for c in self.captions:
                self.cache[c] = encode_text(self.parts, self.ids[c], self.device)
                self.encodes += 1

    def embed(self, caps: list[str], encoders: list | None) -> tuple[Any, Any]:
        """(hidden states, pooled): cached when ``encoders`` is None, else computed by them."""
        import torch

        if encoders is None:
            hid = torch.cat([self.cache[c][0] for c in caps])
            pooled = torch.cat([self.cache[c][1] for c in caps]) if self.parts.sdxl else None
            return hid, pooled
        ids = [torch.cat([self.ids[c][k] for c in caps]) for k in range(len(self.ids[caps[0]]))]
        return encode_text(self.parts, ids, self.device, encoders)


# --------------------------------------------------------------------------- a run


@dataclass
class Run:
    """Everything a run's stages share: session, settings, model parts, data, caches, the
    checkpoint writer and the position."""

    session: Any
    settings: TrainSettings
    accelerator: Any
    parts: Parts
    placement: Placement
    examples: list
    class_examples: list
    latents: Any
    prompts: Prompts
    state: TrainState
    record: dict[str, Any]  # what a checkpoint records beside the state
    writer: checkpoint.Writer
    emit: Event
    stop: StopSignals
    ckpt: checkpoint.Checkpoint | None = None  # to restore from, once
    extended: str | None = None  # the stage whose step count changed on resume
    resumed_from: int | None = None
    samples: list[Path] = field(default_factory=list)
    checkpoint_waits: list[float] = field(default_factory=list)
    lineage: segments.Lineage | None = None  # the segment of the session's history
    base_dir: Path | None = None  # the local folder of the model the run started from

    def save_checkpoint(self, objects: dict[str, Any]) -> Path:
        """Snapshot the trained weights, ``objects`` and the state to CPU memory (once the
        previous checkpoint is on Drive); the writer puts them on Drive in the background."""
        acc, st = self.accelerator, self.state
        path = Path(self.session.checkpoints) / checkpoint.folder_name(st.global_step)
        if acc.is_main_process:
            t0, waited = time.perf_counter(), self.writer.waited_s
            tensors = self.parts.checkpoint_tensors(st.modified, acc.unwrap_model)
            path = self.writer.save(self.session.checkpoints, st.global_step, tensors,
                                    {**objects, "rng": rng_states()},
                                    {**st.to_dict(), **self.record,
                                     "settings": self.settings.to_dict()},
                                    self.settings.keep_checkpoints)
            self.checkpoint_waits.append(time.perf_counter() - t0)
            log.debug("Checkpoint %s: %.2f s in the loop (%.2f s waiting for the previous)",
                      path.name, self.checkpoint_waits[-1], self.writer.waited_s - waited)
            self.emit("checkpoint", {"global_step": st.global_step, "path": path})
        return path

    def finish_writes(self) -> None:
        if self.accelerator.is_main_process:
            self.writer.wait()
        self.accelerator.wait_for_everyone()

    def stop_here(self, path: Path) -> None:
        self.finish_writes()
        self.stop.raise_stop(self.state.global_step, path, self.session.name)

    def save_samples(self, phase: str) -> None:
        import torch

        if not self.accelerator.is_main_process:
            return
        s, parts = self.settings, self.parts
        prompts = s.sample_prompts or [data.instance_prompt(self.session.settings)]
        self.placement.apply(parts, "sample")
        modes = {m: m.training for m in parts.modules().values()}
        for m in modes:
            m.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]), self.accelerator.autocast():
            images = parts.pipe(prompts, num_inference_steps=s.sample_steps,
                                height=s.resolution, width=s.resolution,
                                generator=torch.Generator().manual_seed(s.seed)).images
        for m, was in modes.items():
            m.train(was)
        self.placement.apply(parts, phase)
        made = []
        for i, im in enumerate(images):
            path = (Path(self.session.outputs) / SAMPLES_DIR
                    / f"step-{self.state.global_step:07d}-{i}.png")
            with drive.atomic_writer(path) as f:
                im.save(f, format="PNG")
            made.append(path)
        self.samples.extend(made)
        self.emit("samples", {"global_step": self.state.global_step, "paths": made})


# --------------------------------------------------------------------------- set-up


def prepare(session, settings, *, resume: bool, restart: bool, accept_changed_data: bool,
            emit: Event, more: dict[str, int] | None = None) -> Run:
    """Everything before the first step: settings, the checkpoint to resume from (checked
    against the base model and the data), the model, the Drive space check, the caches.
    ``more`` (stage -> steps) starts a further segment on the trained model
    (:mod:`fastsd.train.segments`)."""
    import numpy as np
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    base_name = session.base_model  # none chosen yet: say how, before anything else
    ckroot = Path(session.checkpoints)
    given = resume_mod.given_options(settings)
    data.clean_local_leftovers()
    if Path(session.models).is_dir():
        drive.clean_temporaries(session.models)  # a killed export's half-written folder
    ckpt = None
    replace_checkpoints = False  # a new segment's: the last segment's go once it is set up
    if segments.wants_new(session, more or {}, resume=resume, restart=restart):
        chosen, lineage = segments.new_segment(session, given, more or {})
        replace_checkpoints = True
    elif resume:
        ckpt = checkpoint.latest(ckroot)
        if ckpt is not None and ckpt.state.get("format") != checkpoint.FORMAT:
            raise DataError(f"Checkpoint {ckpt.path} was written by another version of "
                            "fastsd and cannot be resumed by this one. To start over, which "
                            "deletes the old checkpoints: "
                            f"{options.say('restart', session=session.name)}.")
        lineage, ours = segments.resumed(session, ckpt.state if ckpt else None)
        if not ours:  # a segment stopped before its first checkpoint: these are the last's
            log.info("The checkpoints in %s are the previous segment's; this segment starts "
                     "again from its first step.", ckroot)
            ckpt, replace_checkpoints = None, True
        stored = ckpt.state["settings"] if ckpt else session.settings.get("train")
        if stored is None and not given:
            raise DataError(
                f"Session {session.name} has no checkpoint and no stored training settings "
                "to resume from (the run stopped before saving them). Start the run again "
                "with the options you want: "
                f"{options.say(('resume', False), session=session.name)}.")
        chosen = (resume_mod.resumed_settings(stored, given) if stored is not None
                  else resume_mod.fresh_settings(given))
        if ckpt is None:
            log.warning("No whole checkpoint in %s to resume from; starting at step 0 with "
                        "%s.", ckroot, "the settings stored for this run" if stored
                        else "the options given")
    else:
        if checkpoint.listing(ckroot):
            if not restart:
                raise DataError(
                    f"Session {session.name} already has checkpoints in {ckroot}. To "
                    f"resume that run: {options.say('resume', session=session.name)}; to start "
                    f"over, which deletes them: {options.say('restart', session=session.name)}.")
            log.warning("Starting over: removed %d checkpoints.", checkpoint.clear(ckroot))
        chosen = resume_mod.fresh_settings(given)
        lineage = segments.fresh(session)
    info = env.device_info()
    chosen, preset = resolve(chosen, info, session.settings.get("resolution", 512))
    session.update(train=chosen.to_dict())  # first, so that a resume finds them
    segments.record_start(session, lineage, chosen, base_name)
    s = chosen

    # one process may train several times (a notebook runtime): accelerate keeps its state
    # per process, and refuses another precision unless it is reset
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=s.mixed_precision, cpu=not info.is_cuda)
    device = accelerator.device
    if info.is_cuda and (info.capability or (0, 0)) >= (8, 0):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    random.seed(s.seed)
    np.random.seed(s.seed)
    torch.manual_seed(s.seed)

    # ---- model, and what the checkpoint must match
    examples = data.instance_examples(session)  # no images: say so before loading anything
    srcs = data.sources(session, examples) if s.crop == "random" else None
    base_label, trained = lineage.base_name(session, s), lineage.base_folder(session, s)
    model_dir = models.local_copy(trained if trained is not None else models.base_model(session))
    parts = load_parts(model_dir, s.base_dtype())
    record = {"family": parts.family, "resolution": s.resolution,
              "base_model": {"name": base_label,
                             "fingerprint": resume_mod.model_fingerprint(parts.unet)},
              "images": data.fingerprint(examples, srcs), "lineage": lineage.to_dict()}
    changed_data = False
    if ckpt is not None:
        check_segment_base(ckpt.state, record["base_model"], lineage, trained)
        changed_data = resume_mod.check_data(ckpt.state.get("images"), record["images"],
                                             accept_changed_data)
    for m in [parts.vae, *parts.modules().values()]:
        m.requires_grad_(False).eval()
    if s.lora:  # after the fingerprint, which is the base model's own
        parts.add_adapters(lora.Adapters.of(s), s.seed)
    vram = estimate_vram_gib(s, parts.family, parts.param_counts(), parts.adapter_counts())
    log.info("%s\n%s", f"Base model {model_dir} ({parts.family}, "
             f"{'v-prediction' if parts.v_prediction else 'epsilon'})", describe(s, preset, vram))
    if info.vram_total_gib and max(vram.values()) > info.vram_total_gib:
        log.warning("The estimated peak VRAM (%.1f GiB) is more than this GPU's %.1f GiB: "
                    "lower the resolution or batch size, or turn on 8-bit Adam and gradient "
                    "checkpointing, if it runs out of memory.", max(vram.values()),
                    info.vram_total_gib)
    if accelerator.is_main_process:
        check_drive_space(session, s, parts, ckpt, lineage.first_step)
        if replace_checkpoints and checkpoint.listing(ckroot):
            log.info("Removed the previous segment's %d checkpoint(s): this segment trains on "
                     "from its model.", checkpoint.clear(ckroot))
    accelerator.wait_for_everyone()
    if s.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
        for enc in parts.encoders:
            enc.activation_checkpointing_enable()
    placement = placement_policy(device, info)
    placement.apply(parts, "cache")

    # ---- class images, trained weights, position
    class_ex = class_images(session, s, parts, accelerator)
    state = TrainState(data.DataOrder(len(examples), s.seed),
                       data.DataOrder(max(len(class_ex), 1), s.seed + 1))
    extended = None
    if ckpt is not None:
        parts.load_checkpoint_tensors(ckpt.tensors)
        state = TrainState.load(ckpt.state, ckpt.object("rng"), len(examples),
                                max(len(class_ex), 1), changed_data)
        extended = resume_mod.apply_step_changes(
            state, TrainSettings.from_dict(ckpt.state["settings"]), s)
        log.info("Resuming from %s: %s.", ckpt.path.name, state.describe(s))
    else:
        state.global_step = lineage.first_step  # a further segment counts on

    # ---- caches
    latents = data.encode_latents(parts.vae, examples, class_ex, srcs, s, device)
    prompts = Prompts(parts, [ex.caption for ex in examples + class_ex], device)
    return Run(session, s, accelerator, parts, placement, examples, class_ex, latents,
               prompts, state, record, checkpoint.Writer(s.background_checkpoints), emit,
               StopSignals(), ckpt, extended, ckpt.step if ckpt else None,
               lineage=lineage, base_dir=model_dir)


def check_segment_base(state: dict[str, Any], base: dict[str, str],
                       lineage: segments.Lineage, trained: Path | None) -> None:
    """Check the base a checkpoint was trained from against the one loaded now. A further
    segment's base is the session's trained model, which changes only when the segment
    exports: once the checkpoint has trained every stage (only the export is left) the
    model there may be the segment's own export, and the checkpoint holds every module
    the segment changed."""
    if trained is None:
        resume_mod.check_base_model(state.get("base_model"), base["name"], base["fingerprint"])
        return
    recorded = (state.get("base_model") or {}).get("fingerprint")
    settings = TrainSettings.from_dict(state["settings"])
    if recorded == base["fingerprint"]:
        return
    if not stages_left(settings, state["stage"]):
        log.info("The trained model in %s is already this segment's export; writing it "
                 "again from the checkpoint.", trained)
        return
    raise ModelError(
        f"This training segment started from the trained model in {trained} (fingerprint "
        f"{recorded}), which has changed since (fingerprint {base['fingerprint']}): another "
        "run or a copy replaced it. Resuming would mix the two. Put that model back to "
        f"resume, or start over from the base model: {options.say('restart')}.")


def class_images(session, s: TrainSettings, parts: Parts, accelerator) -> list:
    """Prior preservation's class images: generated once by the base model, kept."""
    if not s.prior_preservation:
        return []
    if s.class_images < 1:
        raise DataError("Prior preservation needs class_images of 1 or more.")
    prompt = data.class_prompt(s, session.settings)
    folder, class_ex = data.class_examples(session, prompt, s.class_images)
    if len(class_ex) < s.class_images and accelerator.is_main_process:
        log.info("Generating %d class images of %r with the base model",
                 s.class_images - len(class_ex), prompt)
        # 16-bit like the samples, not fp32 (four times slower on a T4); a 16-bit base (LoRA)
        # runs with its fp32 VAE under autocast, and the VAE decodes safely (models.vae)
        with accelerator.autocast():
            data.generate_class_images(parts.pipe, folder, prompt, s.class_images,
                                       s.resolution, s.class_steps, s.seed, len(class_ex))
    accelerator.wait_for_everyone()
    return data.class_examples(session, prompt, s.class_images)[1]


def check_drive_space(session, s: TrainSettings, parts: Parts, ckpt,
                      first_step: int = 0) -> None:
    """Stop before any training when what the run puts on Drive does not fit its free
    space, with the numbers and the options that shrink them. ``first_step``: the global
    step the run's segment started from (the intermediate single files are counted from
    the checkpoint on, or from there)."""
    from fastsd.errors import DriveError

    have = sum(f.stat().st_size for f in Path(session.checkpoints).rglob("*") if f.is_file())
    files = single_file_steps(s, ckpt.step if ckpt else first_step,
                              first_step + s.unet_steps + s.text_steps)
    plan = drive_plan(s, parts.param_counts(), sum(p.numel() for p in parts.vae.parameters()),
                      have, parts.adapter_counts(), len(files))
    free = drive.free_bytes(session.path)
    log.info("Drive: this run needs about %s, %s free.", gb(plan.total), gb(free))
    if plan.total > free:
        raise DriveError(
            f"Not enough free space on Drive for this run: it needs about {gb(plan.total)} "
            f"({plan.describe()}), and {gb(free)} is free at {session.path}. To fit: "
            + plan.advice(s, session.name) + ", or free space on Drive (and empty its trash).")


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.2f} MB"
