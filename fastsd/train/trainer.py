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

from fastsd.train import data
from fastsd.train.export import TrainResult, export
from fastsd.train.optim import build_optimizer, restore_optimizer
from fastsd.train.parts import denoise_loss
from fastsd.train.resume import STAGE_TITLES
from fastsd.train.run import Event, Run, prepare
from fastsd.train.settings import TrainSettings
from fastsd.train.state import set_rng_states


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
    params = parts.parameters(stage)
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
        set_rng_states(st.rng)
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
