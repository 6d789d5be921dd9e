"""The two-stage DreamBooth trainer: UNet with the text encoder frozen, then the reverse.

Read top to bottom: :func:`train` prepares a :class:`Run` (settings, the checkpoint to
resume from, the model, the Drive space check, the caches), runs :func:`train_stage` for
each stage and exports the model. A stage builds its optimizer (:func:`build_optimizer`),
places the model parts by the :class:`Placement` policy, and runs the step loop: sample a
batch (:func:`fastsd.train.data.sample_batch`), forward, backward, step, bookkeeping in
the :class:`TrainState`, samples and checkpoints (written in the background).

Exactness. Every random draw of a step (flip, crop, latent sample, noise, timesteps) comes
from a generator seeded from (seed, global step, process), and the data order is a function
of (seed, epoch, cursor) that the checkpoint stores, so a resumed run takes the very same
batches and draws as an uninterrupted one. The global RNG states are saved and restored
too, for anything else that draws from them.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastsd import drive, env, models
from fastsd.errors import DataError, ModelError
from fastsd.train import checkpoint, data
from fastsd.train import resume as resume_mod
from fastsd.train.resume import STAGE_TITLES
from fastsd.train.settings import (TrainSettings, describe, drive_plan, estimate_vram_gb,
                                   resolve)

log = logging.getLogger("fastsd")

SAMPLES_DIR = "samples"
LOSS_PNG = "loss.png"

Event = Callable[[str, dict], None]


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


# --------------------------------------------------------------------------- model parts


@dataclass
class Parts:
    """The pipeline and the pieces of it the trainer touches."""

    pipe: Any
    unet: Any
    vae: Any
    encoders: list  # one text encoder, or two for SDXL
    tokenizers: list
    noise_scheduler: Any
    family: str  # sd1 | sd2 | sdxl
    v_prediction: bool

    @property
    def sdxl(self) -> bool:
        return self.family == "sdxl"

    def trainable(self, stage: str) -> dict[str, Any]:
        if stage == "unet":
            return {"unet": self.unet}
        return {("text_encoder" if i == 0 else f"text_encoder_{i + 1}"): m
                for i, m in enumerate(self.encoders)}

    def modules(self) -> dict[str, Any]:
        return {**self.trainable("unet"), **self.trainable("text")}

    def param_counts(self) -> dict[str, int]:
        return {k: sum(p.numel() for p in m.parameters()) for k, m in self.modules().items()}


def load_parts(model_dir: Path) -> Parts:
    """Load a diffusers folder (SD 1.x, SD 2.x or SDXL) in fp32 and tell its family."""
    import torch
    from diffusers import DDPMScheduler, DiffusionPipeline

    from fastsd.convert.detect import detect_folder

    index = drive.read_json(Path(model_dir) / "model_index.json")
    unused = {k: None for k in ("safety_checker", "feature_extractor", "image_encoder")
              if k in index}
    try:
        pipe = DiffusionPipeline.from_pretrained(str(model_dir), dtype=torch.float32,
                                                 **unused)
    except (OSError, ValueError) as e:
        raise ModelError(f"Cannot load the base model from {model_dir}: {e}. Check that the "
                         "folder is a complete diffusers model.") from e
    pipe.set_progress_bar_config(disable=True)
    detected = detect_folder(model_dir)
    if detected.kind != "checkpoint":
        raise ModelError(f"{model_dir} is {detected.describe()}, not a base model to train.")
    te2 = getattr(pipe, "text_encoder_2", None)
    family = detected.family
    v_pred = detected.prediction_type == "v_prediction"
    encoders = [pipe.text_encoder] + ([te2] if te2 is not None else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if te2 is not None else [])
    return Parts(pipe, pipe.unet, pipe.vae, encoders, tokenizers,
                 DDPMScheduler.from_config(pipe.scheduler.config), family, v_pred)


def tokenize(parts: Parts, captions: list[str]) -> list:
    """Token ids of ``captions`` for each tokenizer, padded to its maximum length."""
    return [tok(captions, padding="max_length", max_length=tok.model_max_length,
                truncation=True, return_tensors="pt").input_ids for tok in parts.tokenizers]


def encode_text(parts: Parts, ids: list, device, encoders: list | None = None) -> tuple[Any, Any]:
    """(hidden states, pooled embedding or None), as the pipelines compute them.
    ``encoders`` (default: the parts' own) may be the accelerate-wrapped ones."""
    import torch

    encoders = encoders or parts.encoders
    if not parts.sdxl:
        return encoders[0](ids[0].to(device))[0], None
    hidden, pooled = [], None
    for enc, tok_ids in zip(encoders, ids):
        out = enc(tok_ids.to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the second encoder's projected, pooled embedding
    return torch.cat(hidden, dim=-1), pooled


def snr(noise_scheduler, timesteps):
    """Signal-to-noise ratio alpha_t^2 / sigma_t^2 of each timestep."""
    ac = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return ac / (1 - ac)


def denoise_loss(parts: Parts, unet, latents, noise, timesteps, hidden, added=None,
                 min_snr_gamma: float = 0.0):
    """Per-example denoising loss (epsilon or v target), min-SNR weighted when gamma > 0."""
    import torch.nn.functional as F

    noisy = parts.noise_scheduler.add_noise(latents, noise, timesteps)
    target = (parts.noise_scheduler.get_velocity(latents, noise, timesteps)
              if parts.v_prediction else noise)
    pred = unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma > 0:
        s = snr(parts.noise_scheduler, timesteps)
        weight = s.clamp(max=min_snr_gamma) / (s + 1 if parts.v_prediction else s)
        loss = loss * weight
    return loss


# --------------------------------------------------------------------------- stopping


class StopSignals:
    """SIGTERM and Ctrl-C (SIGINT) ask the loop to stop after the current step, so the
    checkpoint it saves is consistent. A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("Got %s: stopping after this step and saving a checkpoint "
                    "(press Ctrl-C again to stop at once, without one).",
                    signal.Signals(signum).name)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)

    def raise_stop(self, step: int, where: Path, session: str = "SESSION") -> None:
        log.warning("Stopped at step %d; the checkpoint is in %s. Resume with "
                    "'fastsd train %s --resume' (or tick 'resume' in the notebook).",
                    step, where, session)
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + int(self.signum or signal.SIGTERM))


# --------------------------------------------------------------------------- state


def _rng_states() -> dict[str, Any]:
    import numpy as np
    import torch

    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": [version, list(state), gauss],
           "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_states(states: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@dataclass
class TrainState:
    """Where a run is: saved whole in each checkpoint (``state.json`` and ``rng.pt``) and
    loaded whole on resume."""

    order: data.DataOrder
    class_order: data.DataOrder
    stage: int = 0  # index in the stage order of the stage in progress
    stage_step: int = 0
    global_step: int = 0
    losses: list[float] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)  # modules that differ from the base
    stage_steps: dict[str, int] = field(default_factory=dict)  # steps each stage trained
    optimizer_stage: str | None = None  # whose optimizer state the checkpoint holds
    rng: dict[str, Any] | None = None

    def advance(self, stage: str, loss: float) -> None:
        self.stage_step += 1
        self.global_step += 1
        self.stage_steps[stage] = self.stage_steps.get(stage, 0) + 1
        self.losses.append(loss)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "stage_step": self.stage_step,
                "global_step": self.global_step, "losses": self.losses,
                "modified": self.modified, "stage_steps": self.stage_steps,
                "optimizer_stage": self.optimizer_stage, "data_order": self.order.state(),
                "class_order": self.class_order.state()}

    @classmethod
    def load(cls, saved: dict[str, Any], rng, n: int, n_class: int,
             allow_change: bool = False) -> "TrainState":
        order, class_order = data.DataOrder(n, 0), data.DataOrder(n_class, 0)
        order.load(saved["data_order"], allow_change)
        class_order.load(saved["class_order"], allow_change)
        return cls(order, class_order, saved["stage"], saved["stage_step"],
                   saved["global_step"], list(saved["losses"]), list(saved["modified"]),
                   dict(saved["stage_steps"]), saved["optimizer_stage"], rng)

    def describe(self, settings: TrainSettings) -> str:
        left = [st for st in settings.stage_order[self.stage:] if settings.stage(st)["steps"]]
        if not left:
            return (f"global step {self.global_step}, both stages done; only the export is "
                    "left")
        return (f"global step {self.global_step}, {STAGE_TITLES[left[0]]} stage "
                f"step {self.stage_step if left[0] == settings.stage_order[self.stage] else 0}")


# --------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class Placement:
    """Where the VAE, the text encoders and the UNet live in each phase of a run.

    On a GPU with less than ``ROOMY_GB`` of memory, what a phase does not run leaves it:
    the VAE after the latent cache is built, the text encoders during the UNet stage (their
    embeddings are cached). On CPU, or a GPU with room, everything stays on the device.
    """

    device: Any
    offload: bool

    ROOMY_GB = 30.0

    def where(self, phase: str) -> dict[str, Any]:
        """Device of each group ("vae", "text", "unet") in ``phase``: "cache", "unet",
        "text" (the stages), "sample" or "export"."""
        off = "cpu" if self.offload else self.device
        if phase == "unet":
            return {"unet": self.device, "text": off, "vae": off}
        if phase == "text":
            return {"unet": self.device, "text": self.device, "vae": off}
        return {"unet": self.device, "text": self.device, "vae": self.device}

    def apply(self, parts: Parts, phase: str) -> None:
        where = self.where(phase)
        parts.unet.to(where["unet"])
        parts.vae.to(where["vae"])
        for enc in parts.encoders:
            enc.to(where["text"])


def placement_policy(device, info) -> Placement:
    vram = getattr(info, "vram_total_gb", None) or 0.0
    return Placement(device, device.type == "cuda" and vram < Placement.ROOMY_GB)


# --------------------------------------------------------------------------- optimizer


def build_optimizer(params: list, cfg: dict[str, Any], settings: TrainSettings, device):
    """The optimizer and learning-rate schedule of a stage: 8-bit AdamW (bitsandbytes) on
    CUDA when asked, else torch's fused AdamW (one kernel for all tensors)."""
    import torch
    from diffusers.optimization import get_scheduler

    if settings.adam_8bit and device.type == "cuda":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=cfg["lr"], weight_decay=settings.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=settings.weight_decay,
                                      fused=settings.fused_adam and device.type in ("cpu", "cuda"))
    schedule = get_scheduler(cfg["schedule"], optimizer, num_warmup_steps=cfg["warmup"],
                             num_training_steps=cfg["steps"])
    return optimizer, schedule


def restore_optimizer(optimizer, schedule, objects: dict[str, Any], extended: bool) -> None:
    """Load a checkpoint's optimizer and schedule. After a change of the stage's step count
    the schedule (built for the new total) sets the learning rate of the step reached."""
    import warnings

    optimizer.load_state_dict(objects["optimizer"])
    schedule.load_state_dict(objects["lr_scheduler"])
    if extended:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lrs = schedule.get_lr()
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        schedule._last_lr = lrs


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

    def save_checkpoint(self, objects: dict[str, Any]) -> Path:
        """Snapshot the trained weights, ``objects`` and the state to CPU memory now; the
        writer puts them on Drive in the background."""
        acc, st = self.accelerator, self.state
        path = Path(self.session.checkpoints) / checkpoint.folder_name(st.global_step)
        if acc.is_main_process:
            t0, waited = time.perf_counter(), self.writer.waited_s
            tensors = {n: acc.unwrap_model(m).state_dict()
                       for n, m in self.parts.modules().items() if n in st.modified}
            snap = checkpoint.capture(st.global_step, tensors, {**objects, "rng": _rng_states()},
                                       {**st.to_dict(), **self.record,
                                        "settings": self.settings.to_dict()})
            path = self.writer.submit(self.session.checkpoints, snap,
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


# --------------------------------------------------------------------------- train


def train(session, settings: TrainSettings | dict | None = None, *, resume: bool = False,
          restart: bool = False, accept_changed_data: bool = False,
          on_event: Event | None = None) -> TrainResult:
    """Train ``session``'s subject into its base model, in two stages, resumably.

    ``settings``: a TrainSettings, or a dict of the options the user gave (the CLI's). With
    ``resume`` the run continues from the newest whole checkpoint with the settings stored
    there; what may change and what is refused is in :mod:`fastsd.train.resume`. Without
    it, a session that already has checkpoints is refused unless ``restart`` says to delete
    them. ``on_event(name, info)`` is called at "stage_start", "step", "checkpoint",
    "samples", "stage_end" and "done" (and at stage starts and ends with the model ``parts``).
    """
    run = prepare(session, settings, resume=resume, restart=restart,
                  accept_changed_data=accept_changed_data,
                  emit=on_event or (lambda name, info: None))
    with run.stop, contextlib.closing(run.latents), run.writer:
        for si, stage in enumerate(run.settings.stage_order):
            if si >= run.state.stage and run.settings.stage(stage)["steps"]:
                train_stage(run, si, stage)
        run.finish_writes()
    return export(run)


def train_stage(run: Run, si: int, stage: str) -> None:
    """One stage: build its optimizer, place the parts, run the step loop, checkpoint."""
    acc, parts, s, st = run.accelerator, run.parts, run.settings, run.state
    cfg = s.stage(stage)
    trained = parts.trainable(stage)
    if stage == "unet":  # embeddings of the text encoders as they are now
        run.placement.apply(parts, "cache")
        run.prompts.build()
    run.placement.apply(parts, stage)
    for m in trained.values():
        m.requires_grad_(True).train()
    params = [p for m in trained.values() for p in m.parameters()]
    optimizer, schedule = build_optimizer(params, cfg, s, acc.device)
    *wrapped, optimizer = acc.prepare(*trained.values(), optimizer)
    encoders = None if stage == "unet" else wrapped
    unet = wrapped[0] if stage == "unet" else parts.unet
    resumed = run.ckpt
    if resumed is not None:
        if st.optimizer_stage == stage and st.stage_step > 0:
            restore_optimizer(optimizer, schedule, resumed.objects, run.extended == stage)
            if acc.scaler is not None and resumed.object("scaler") is not None:
                acc.scaler.load_state_dict(resumed.object("scaler"))
        _set_rng_states(st.rng)
        run.ckpt = None  # restored once
    st.modified += [n for n in trained if n not in st.modified]
    run.emit("stage_start", {**st.to_dict(), "stage_name": stage, "parts": parts})
    bar = tqdm_bar(cfg["steps"], st.stage_step, f"{STAGE_TITLES[stage]} stage")
    T, scale = parts.noise_scheduler.config.num_train_timesteps, parts.vae.config.scaling_factor

    def objects() -> dict[str, Any]:
        return {"optimizer": optimizer.state_dict(), "lr_scheduler": schedule.state_dict(),
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None}

    while st.stage_step < cfg["steps"]:
        t0 = time.perf_counter()
        batch = data.sample_batch(st, run.latents, s, run.examples, run.class_examples,
                                  acc.process_index, acc.num_processes, T, scale)
        with acc.autocast():
            hidden, pooled = run.prompts.embed(batch.captions, encoders)
            added = ({"text_embeds": pooled, "time_ids": torch_tensor(
                batch.time_ids, hidden)} if parts.sdxl else None)
            per_example = denoise_loss(parts, unet, batch.latents.to(acc.device),
                                       batch.noise.to(acc.device),
                                       batch.timesteps.to(acc.device), hidden, added,
                                       s.min_snr_gamma)
        loss = (per_example.chunk(2)[0].mean() + s.prior_weight * per_example.chunk(2)[1].mean()
                if run.class_examples else per_example.mean())
        acc.backward(loss)
        if s.max_grad_norm > 0 and acc.sync_gradients:
            acc.clip_grad_norm_(params, s.max_grad_norm)
        optimizer.step()
        if not optimizer.step_was_skipped:
            schedule.step()
        optimizer.zero_grad(set_to_none=True)
        st.advance(stage, float(loss.detach().item()))
        bar.update(1)
        bar.set_postfix(loss=f"{st.losses[-1]:.4f}", s_per_step=f"{time.perf_counter() - t0:.2f}")
        run.emit("step", {**st.to_dict(), "stage_name": stage, "loss": st.losses[-1],
                          "crops": batch.crops, "global_step": st.global_step})
        if s.sample_every and st.global_step % s.sample_every == 0:
            run.save_samples(stage)
        due = s.checkpoint_every and st.global_step % s.checkpoint_every == 0
        if (due or run.stop.signum) and st.stage_step < cfg["steps"]:
            st.optimizer_stage = stage
            path = run.save_checkpoint(objects())
            if run.stop.signum:
                bar.close()
                run.stop_here(path)
    bar.close()
    # the stage boundary: its optimizer is kept, so that the stage can be extended later
    st.stage, st.stage_step, st.optimizer_stage = si + 1, 0, stage
    path = run.save_checkpoint(objects())
    for m in trained.values():
        m.requires_grad_(False).eval()
    acc.free_memory()  # accelerate lets go of the stage's optimizer and wrapped modules
    run.emit("stage_end", {**st.to_dict(), "stage_name": stage, "parts": parts})
    if run.stop.signum:
        run.stop_here(path)


def torch_tensor(rows: list[list[int]], like):
    import torch

    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def tqdm_bar(total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", desc=desc)


# --------------------------------------------------------------------------- set-up


def prepare(session, settings, *, resume: bool, restart: bool, accept_changed_data: bool,
            emit: Event) -> Run:
    """Everything before the first step: settings, the checkpoint to resume from (checked
    against the base model and the data), the model, the Drive space check, the caches."""
    import numpy as np
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    ckroot = Path(session.checkpoints)
    given = resume_mod.given_options(settings)
    data.clean_local_leftovers()
    if Path(session.models).is_dir():
        drive.clean_temporaries(session.models)  # a killed export's half-written folder
    ckpt = None
    if resume:
        ckpt = checkpoint.latest(ckroot)
        if ckpt is not None and ckpt.state.get("format") != checkpoint.FORMAT:
            raise DataError(f"Checkpoint {ckpt.path} was written by another version of "
                            "fastsd and cannot be resumed by this one. Start over with "
                            "--restart (it deletes the old checkpoints).")
        stored = ckpt.state["settings"] if ckpt else session.settings.get("train")
        if stored is None and not given:
            raise DataError(
                f"Session {session.name} has no checkpoint and no stored training settings "
                "to resume from (the run stopped before saving them). Start the run again "
                "without --resume, with the options you want.")
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
                    f"Session {session.name} already has checkpoints in {ckroot}. Resume "
                    "that run ('fastsd train SESSION --resume', or tick 'resume'), or start "
                    "over with --restart, which deletes them.")
            log.warning("Starting over: removed %d checkpoints.", checkpoint.clear(ckroot))
        chosen = resume_mod.fresh_settings(given)
    info = env.device_info()
    chosen, preset = resolve(chosen, info, session.settings.get("resolution", 512))
    session.update(train=chosen.to_dict())  # first, so that a resume finds them
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
    base_name = session.settings["base_model"]
    model_dir = models.local_copy(models.resolve_model(base_name, session.workspace))
    parts = load_parts(model_dir)
    record = {"family": parts.family, "resolution": s.resolution,
              "base_model": {"name": base_name,
                             "fingerprint": resume_mod.model_fingerprint(parts.unet)},
              "images": data.fingerprint(examples, srcs)}
    changed_data = False
    if ckpt is not None:
        resume_mod.check_base_model(ckpt.state.get("base_model"), base_name,
                                    record["base_model"]["fingerprint"])
        changed_data = resume_mod.check_data(ckpt.state.get("images"), record["images"],
                                             accept_changed_data)
    for m in [parts.vae, *parts.modules().values()]:
        m.requires_grad_(False).eval()
    vram = estimate_vram_gb(s, parts.family, parts.param_counts())
    log.info("%s\n%s", f"Base model {model_dir} ({parts.family}, "
             f"{'v-prediction' if parts.v_prediction else 'epsilon'})", describe(s, preset, vram))
    if info.vram_total_gb and max(vram.values()) > info.vram_total_gb:
        log.warning("The estimated peak VRAM (%.1f GB) is more than this GPU's %.1f GB: "
                    "lower the resolution or batch size, or turn on 8-bit Adam and gradient "
                    "checkpointing, if it runs out of memory.", max(vram.values()),
                    info.vram_total_gb)
    if accelerator.is_main_process:
        check_drive_space(session, s, parts, ckpt)
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
        for name, sd in ckpt.tensors.items():
            parts.modules()[name].load_state_dict(sd)
        state = TrainState.load(ckpt.state, ckpt.object("rng"), len(examples),
                                max(len(class_ex), 1), changed_data)
        extended = resume_mod.apply_step_changes(
            state, TrainSettings.from_dict(ckpt.state["settings"]), s)
        log.info("Resuming from %s: %s.", ckpt.path.name, state.describe(s))

    # ---- caches
    latents = data.encode_latents(parts.vae, examples, class_ex, srcs, s, device)
    prompts = Prompts(parts, [ex.caption for ex in examples + class_ex], device)
    return Run(session, s, accelerator, parts, placement, examples, class_ex, latents,
               prompts, state, record, checkpoint.Writer(s.background_checkpoints), emit,
               StopSignals(), ckpt, extended, ckpt.step if ckpt else None)


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
        data.generate_class_images(parts.pipe, folder, prompt, s.class_images, s.resolution,
                                   s.class_steps, s.seed, len(class_ex))
    accelerator.wait_for_everyone()
    return data.class_examples(session, prompt, s.class_images)[1]


def check_drive_space(session, s: TrainSettings, parts: Parts, ckpt) -> None:
    """Stop before any training when what the run puts on Drive does not fit its free
    space, with the numbers and the options that shrink them."""
    from fastsd.errors import DriveError

    have = sum(f.stat().st_size for f in Path(session.checkpoints).rglob("*") if f.is_file())
    plan = drive_plan(s, parts.param_counts(), sum(p.numel() for p in parts.vae.parameters()),
                      have)
    free = drive.free_bytes(session.path)
    log.info("Drive: this run needs about %s, %s free.", gb(plan.total), gb(free))
    if plan.total > free:
        raise DriveError(
            f"Not enough free space on Drive for this run: it needs about {gb(plan.total)} "
            f"({plan.describe()}), and {gb(free)} is free at {session.path}. To fit: "
            + plan.advice(s) + ", or free space on Drive (and empty its trash).")


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


# --------------------------------------------------------------------------- outputs


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
    with drive.folder_writer(dest) as tmp:
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

