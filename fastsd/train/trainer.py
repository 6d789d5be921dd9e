"""The two-stage DreamBooth trainer: UNet with the text encoder frozen, then the reverse.

Read top to bottom: :func:`train` prepares a :class:`~fastsd.train.run.Run` (settings, the
checkpoint to resume from, the model, the Drive space check, the caches:
:mod:`fastsd.train.run`), runs :func:`train_stage` for each stage and exports the model
(:mod:`fastsd.train.export`). A stage builds its optimizer (:mod:`fastsd.train.optim`),
places the model parts by the :class:`~fastsd.train.parts.Placement` policy, and runs the
step loop: sample a batch (:func:`fastsd.train.data.sample_batch`), forward, backward, step,
bookkeeping in the :class:`~fastsd.train.state.TrainState`, samples and checkpoints
(written in the background). What each stage trains and what a checkpoint keeps of it is
decided by :class:`~fastsd.train.parts.Parts`.

Exactness. Every random draw of a step (flip, crop, latent sample, noise, timesteps) comes
from a generator seeded from (seed, global step, process), and the data order is a function
of (seed, epoch, cursor) that the checkpoint stores, so a resumed run takes the very same
batches and draws as an uninterrupted one. The global RNG states are saved and restored
too, for anything else that draws from them.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from fastsd.train import data, segments
from fastsd.train.export import TrainResult, export, save_single_file
from fastsd.train.optim import (build_optimizer, drop_gradients, restore_optimizer,
                                trained_tensors)
from fastsd.train.parts import denoise_loss
from fastsd.train.resume import STAGE_TITLES
from fastsd.train.run import Event, Run, prepare
from fastsd.train.settings import TrainSettings, single_file_due
from fastsd.train.state import set_rng_states


def train(session, settings: TrainSettings | dict | None = None, *, resume: bool = False,
          restart: bool = False, accept_changed_data: bool = False,
          on_event: Event | None = None, more_unet_steps: int = 0,
          more_text_steps: int = 0) -> TrainResult:
    """Train ``session``'s subject into its base model, in two stages, resumably.

    ``settings``: a TrainSettings, or a dict of the options the user gave (the CLI's). With
    ``resume`` the run continues from the newest whole checkpoint with the settings stored
    there; what may change and what is refused is in :mod:`fastsd.train.resume`. Without
    it, a session that already has checkpoints is refused unless ``restart`` says to delete
    them. ``on_event(name, info)`` is called at "stage_start", "step", "checkpoint",
    "samples", "single_file", "stage_end" and "done" (and at stage starts and ends with the
    model ``parts``). ``more_unet_steps`` / ``more_text_steps`` train that many more steps
    on the session's trained model, as a new segment of its history, even after the text
    encoder stage ran (:mod:`fastsd.train.segments`).
    Each step has its "step" event, in order, with its loss (:class:`StepReport`); on a GPU
    they come in small batches, a fraction of a second after the steps.
    """
    run = prepare(session, settings, resume=resume, restart=restart,
                  accept_changed_data=accept_changed_data,
                  emit=on_event or (lambda name, info: None),
                  more=segments.more_steps(more_unet_steps, more_text_steps))
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
    params = parts.unfreeze(stage)  # the modules' weights, or for LoRA their adapters
    optimizer, schedule = build_optimizer(params, cfg, s, acc.device, acc.num_processes)
    *wrapped, optimizer = acc.prepare(*trained.values(), optimizer)
    clipped = trained_tensors(optimizer)
    encoders = None if stage == "unet" else wrapped
    unet = wrapped[0] if stage == "unet" else parts.unet
    resumed = run.ckpt
    if resumed is not None:
        if st.optimizer_stage == stage and st.stage_step > 0:
            restore_optimizer(optimizer, schedule, resumed.objects, run.extended == stage)
            scaler = resumed.object("scaler") if acc.scaler is not None else None
            if scaler is not None:  # read from Drive once
                acc.scaler.load_state_dict(scaler)
        set_rng_states(st.rng)
        run.ckpt = None  # restored once
    st.modified += [n for n in trained if n not in st.modified]
    run.emit("stage_start", {**st.to_dict(), "stage_name": stage, "parts": parts})
    report = StepReport(run, stage, cfg["steps"])
    T, scale = parts.noise_scheduler.config.num_train_timesteps, parts.vae.config.scaling_factor

    def objects() -> dict[str, Any]:
        return {"optimizer": optimizer.state_dict(), "lr_scheduler": schedule.state_dict(),
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None}

    while st.stage_step < cfg["steps"]:
        batch = data.sample_batch(st, run.latents, s, run.examples, run.class_examples,
                                  acc.process_index, acc.num_processes, T, scale)
        with acc.autocast():
            hidden, pooled = run.prompts.embed(batch.captions, encoders)
            added = ({"text_embeds": pooled, "time_ids": to_device(torch_tensor(
                batch.time_ids, hidden.dtype), acc.device)} if parts.sdxl else None)
            per_example = denoise_loss(parts, unet, to_device(batch.latents, acc.device),
                                       to_device(batch.noise, acc.device),
                                       to_device(batch.timesteps, acc.device), hidden, added,
                                       s.min_snr_gamma)
        loss = (per_example.chunk(2)[0].mean() + s.prior_weight * per_example.chunk(2)[1].mean()
                if run.class_examples else per_example.mean())
        acc.backward(loss)
        if s.max_grad_norm > 0 and acc.sync_gradients:
            acc.clip_grad_norm_(clipped, s.max_grad_norm)
        optimizer.step()
        if not optimizer.step_was_skipped:
            schedule.step()
        optimizer.zero_grad(set_to_none=True)
        st.advance(stage)
        report.step(loss, batch.crops)
        if s.sample_every and st.global_step % s.sample_every == 0:
            report.read()
            run.save_samples(stage)
        if single_file_due(s, st.global_step):
            save_single_file(run)
        due = s.checkpoint_every and st.global_step % s.checkpoint_every == 0
        if (due or run.stop.signum) and st.stage_step < cfg["steps"]:
            report.read()  # the checkpoint holds every loss so far
            st.optimizer_stage = stage
            path = run.save_checkpoint(objects())
            if run.stop.signum:
                report.close()
                run.stop_here(path)
    report.close()
    # the stage boundary: its optimizer is kept, so that the stage can be extended later
    st.stage, st.stage_step, st.optimizer_stage = si + 1, 0, stage
    path = run.save_checkpoint(objects())
    drop_gradients(optimizer, params)
    parts.freeze(stage)
    acc.free_memory()  # accelerate lets go of the stage's optimizer and wrapped modules
    run.emit("stage_end", {**st.to_dict(), "stage_name": stage, "parts": parts})
    if run.stop.signum:
        run.stop_here(path)


class StepReport:
    """What each step reports: its loss into the state's curve, a "step" event and the
    progress bar, kept off the hot path.

    Reading a loss off a GPU waits until the step has run there, and the GPU then idles
    while Python prepares the next step. So losses stay on the device and are read
    together (one wait for all) every ``READ_EVERY_S`` seconds of the device's kind (at
    once on the CPU, where a loss is ready when the step returns), and before anything
    that needs them (:meth:`read`: a checkpoint, samples, the stage's end). Each step
    still gets its own event, in order, with its loss: ``stage_name``, ``global_step``,
    ``stage_step``, ``loss`` and ``crops`` (the batch's crop corners), no more.
    """

    #: seconds between reads, by device type; others: DEFAULT_READ_S
    READ_EVERY_S = {"cpu": 0.0}
    DEFAULT_READ_S = 0.5

    def __init__(self, run: Run, stage: str, total: int) -> None:
        self.run, self.stage = run, stage
        self.every = self.READ_EVERY_S.get(run.accelerator.device.type, self.DEFAULT_READ_S)
        self.bar = tqdm_bar(total, run.state.stage_step, f"{STAGE_TITLES[stage]} stage")
        self.pending: list[tuple[int, int, Any, list]] = []
        self.last = time.monotonic()

    def step(self, loss, crops: list) -> None:
        st = self.run.state
        self.pending.append((st.global_step, st.stage_step, loss.detach(), crops))
        self.bar.update(1)
        if time.monotonic() - self.last >= self.every:
            self.read()

    def read(self) -> None:
        """Read the pending losses (one device sync) and report their steps."""
        import torch

        if not self.pending:
            return
        losses = torch.stack([p[2] for p in self.pending]).float().tolist()
        self.run.state.losses.extend(losses)
        for (global_step, stage_step, _, crops), loss in zip(self.pending, losses):
            self.run.emit("step", {"stage_name": self.stage, "global_step": global_step,
                                   "stage_step": stage_step, "loss": loss, "crops": crops})
        self.pending.clear()
        self.bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        self.last = time.monotonic()

    def close(self) -> None:
        self.read()
        self.bar.close()


def to_device(t, device):
    """A CPU tensor on ``device``. To a GPU from pinned memory without waiting: a copy from
    ordinary memory waits until the GPU has finished everything queued (the last step)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def torch_tensor(rows: list[list[int]], dtype):
    import torch

    return torch.tensor(rows, dtype=dtype)


def tqdm_bar(total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", desc=desc)
