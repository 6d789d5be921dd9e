"""The two-stage DreamBooth trainer: UNet with the text encoder frozen, then the reverse.

:func:`train` is one loop that reads top to bottom. Around it: loading the model parts,
the caches (VAE latents per image and flip, prompt embeddings per caption), the resumable
checkpoints, and the outputs (a diffusers model, a single .safetensors file, sample
images, a loss curve).

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
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastsd import drive, env, models
from fastsd.errors import DataError, ModelError
from fastsd.train import checkpoint, data
from fastsd.train.settings import TrainSettings, describe, estimate_vram_gb, resolve

log = logging.getLogger("fastsd")

STAGE_TITLES = {"unet": "UNet", "text": "text encoder"}
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
    stats: dict[str, int] = field(default_factory=dict)


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

    model_dir = drive.local_copy(model_dir)  # never memory-mapped from Drive (SIGBUS)
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

    def raise_stop(self, step: int, where: Path) -> None:
        log.warning("Stopped at step %d; the checkpoint is in %s. Resume with "
                    "'fastsd train SESSION --resume' (or tick 'resume' in the notebook).",
                    step, where)
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + int(self.signum or signal.SIGTERM))


# --------------------------------------------------------------------------- helpers


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


def _step_generator(seed: int, step: int, process: int):
    import torch

    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 64 + process)


def _place(modules, device) -> None:
    for m in modules:
        m.to(device)


def _select_settings(session, settings: TrainSettings | None, ckpt) -> TrainSettings:
    stored = ckpt.state["settings"] if ckpt else session.settings.get("train")
    if stored is None:
        return settings or TrainSettings()
    kept = TrainSettings.from_dict(stored)
    if settings is not None:
        given = {k: v for k, v in settings.to_dict().items()
                 if v is not None and stored.get(k) != v and k in stored
                 and TrainSettings().to_dict().get(k) != v}
        if given:
            log.warning("Resuming with the settings this run started with; ignoring %s.",
                        ", ".join(f"{k}={v!r}" for k, v in sorted(given.items())))
    return kept


# --------------------------------------------------------------------------- train


def train(session, settings: TrainSettings | None = None, *, resume: bool = False,
          restart: bool = False, on_event: Event | None = None) -> TrainResult:
    """Train ``session``'s subject into its base model, in two stages, resumably.

    ``resume`` continues from the newest whole checkpoint in the session (with the
    settings stored there). Without it, a session that already has checkpoints is refused
    unless ``restart`` says to delete them. ``on_event(name, info)`` is called at
    "stage_start", "step", "checkpoint", "samples", "stage_end" and "done" with the position (and at
    stage starts and ends the model ``parts``): for progress displays and tests.
    """
    import numpy as np
    import torch
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    emit = on_event or (lambda name, info: None)
    ckroot = Path(session.checkpoints)

    # ---- settings, device, checkpoint to resume from
    ckpt = None
    if resume:
        ckpt = checkpoint.latest(ckroot)
        if ckpt is None:
            log.warning("No whole checkpoint in %s to resume from; starting at step 0.", ckroot)
    elif checkpoint.listing(ckroot):
        if not restart:
            raise DataError(
                f"Session {session.name} already has checkpoints in {ckroot}. Resume that "
                "run ('fastsd train SESSION --resume', or tick 'resume'), or start over with "
                "--restart, which deletes them.")
        log.warning("Starting over: removed %d checkpoints.", checkpoint.clear(ckroot))
    settings = _select_settings(session, settings, ckpt) if resume else (settings or TrainSettings())
    info = env.device_info()
    settings, preset = resolve(settings, info, session.settings.get("resolution", 512))
    session.update(train=settings.to_dict())

    accelerator = Accelerator(mixed_precision=settings.mixed_precision, cpu=not info.is_cuda)
    device, rank = accelerator.device, accelerator.process_index
    if info.is_cuda and (info.capability or (0, 0)) >= (8, 0):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    random.seed(settings.seed)
    np.random.seed(settings.seed)
    torch.manual_seed(settings.seed)

    # ---- model
    examples = data.instance_examples(session)  # no images: say so before loading anything
    model_dir = models.resolve_model(session.settings["base_model"], session.workspace)
    parts = load_parts(model_dir)
    for m in [parts.vae, *parts.modules().values()]:
        m.requires_grad_(False)
        m.eval()
    _place([parts.vae, *parts.modules().values()], device)
    res = settings.resolution
    vram = estimate_vram_gb(settings, parts.family, parts.param_counts())
    log.info("%s\n%s", f"Base model {model_dir} ({parts.family}, "
             f"{'v-prediction' if parts.v_prediction else 'epsilon'})",
             describe(settings, preset, vram))
    if info.vram_total_gb and max(vram.values()) > info.vram_total_gb:
        log.warning("The estimated peak VRAM (%.1f GB) is more than this GPU's %.1f GB: "
                    "lower the resolution or batch size, or turn on 8-bit Adam and gradient "
                    "checkpointing, if it runs out of memory.", max(vram.values()),
                    info.vram_total_gb)

    # ---- data and caches
    class_ex: list[data.Example] = []
    if settings.prior_preservation:
        if settings.class_images < 1:
            raise DataError("Prior preservation needs class_images of 1 or more.")
        prompt = data.class_prompt(settings, session.settings)
        folder, class_ex = data.class_examples(session, prompt, settings.class_images)
        if len(class_ex) < settings.class_images and accelerator.is_main_process:
            log.info("Generating %d class images of %r with the base model",
                     settings.class_images - len(class_ex), prompt)
            data.generate_class_images(parts.pipe, folder, prompt, settings.class_images, res,
                                       settings.class_steps, settings.seed, len(class_ex))
        accelerator.wait_for_everyone()
        folder, class_ex = data.class_examples(session, prompt, settings.class_images)
    if ckpt is not None:  # the trained weights, once the base model made the class images
        for name, module in parts.modules().items():
            sd = ckpt.tensors(name)
            if sd is not None:
                module.load_state_dict(sd)
    stats = {"vae_encodes": 0, "prompt_encodes": 0}
    latents = data.LatentCache(settings.latent_cache_mb << 20)
    meta: dict[tuple, tuple] = {}  # (kind, index) -> (original size, crop top-left)
    flips = (False, True) if settings.flip else (False,)
    with torch.no_grad():
        for kind, exs in (("i", examples), ("c", class_ex)):
            for j, ex in enumerate(tqdm(exs, desc=f"{'instance' if kind == 'i' else 'class'}"
                                        " latents", unit="img", leave=False)):
                pixels, size, top_left = data.training_pixels(ex.image, res, settings.crop)
                meta[kind, j] = (size, top_left)
                for flip in flips:
                    x = pixels.flip(-1) if flip else pixels
                    dist = parts.vae.encode(x[None].to(device)).latent_dist
                    latents.put((kind, j, flip), torch.cat([dist.mean, dist.std]))
                    stats["vae_encodes"] += 1
    captions = sorted({ex.caption for ex in examples + class_ex})
    all_ids = tokenize(parts, captions)  # tokenized once, even while the encoders train
    token_ids = {c: [ids[i:i + 1] for ids in all_ids] for i, c in enumerate(captions)}
    prompt_cache: dict[str, tuple] = {}

    def build_prompt_cache() -> None:
        """Embed each distinct caption once, with the text encoders as they are now: they
        stay frozen until the UNet stage ends."""
        prompt_cache.clear()
        with torch.no_grad():
            for c in captions:
                prompt_cache[c] = encode_text(parts, token_ids[c], device)
                stats["prompt_encodes"] += 1

    def embeddings(caps: list[str], encoders: list | None):
        """Prompt embeddings of a batch: from the cache while the text encoders are frozen
        (``encoders`` None), else computed by ``encoders``, which are being trained."""
        if encoders is None:
            hid = torch.cat([prompt_cache[c][0] for c in caps])
            pooled = torch.cat([prompt_cache[c][1] for c in caps]) if parts.sdxl else None
            return hid, pooled
        ids = [torch.cat([token_ids[c][k] for c in caps]) for k in range(len(parts.tokenizers))]
        return encode_text(parts, ids, device, encoders)

    # ---- position: stage, step, data order, losses
    order = data.DataOrder(len(examples), settings.seed)
    class_order = data.DataOrder(max(len(class_ex), 1), settings.seed + 1)
    state: dict[str, Any] = {"stage": 0, "stage_step": 0, "global_step": 0, "losses": [],
                             "modified": []}
    if ckpt is not None:
        st = ckpt.state
        state.update({k: st[k] for k in state})
        order.load(st["data"])
        if class_ex:
            class_order.load(st["class_data"])
        log.info("Resuming from %s: global step %d, %s stage step %d.", ckpt.path.name,
                 st["global_step"], STAGE_TITLES[settings.stage_order[min(
                     st["stage"], len(settings.stage_order) - 1)]], st["stage_step"])

    def save_checkpoint(stage_objects: dict[str, Any]) -> Path | None:
        path = None
        if accelerator.is_main_process:
            tensors = {n: accelerator.unwrap_model(m).state_dict()
                       for n, m in parts.modules().items() if n in state["modified"]}
            path = checkpoint.save(
                ckroot, state["global_step"], tensors, {**stage_objects, "rng": _rng_states()},
                {**state, "data": order.state(), "class_data": class_order.state(),
                 "settings": settings.to_dict(), "family": parts.family},
                settings.keep_checkpoints)
            emit("checkpoint", {"global_step": state["global_step"], "path": path})
        accelerator.wait_for_everyone()
        return path or ckroot / checkpoint.folder_name(state["global_step"])

    sample_files: list[Path] = []
    sample_prompts = settings.sample_prompts or [data.instance_prompt(session.settings)]

    def save_samples() -> None:
        if not accelerator.is_main_process:
            return
        modes = {m: m.training for m in parts.modules().values()}
        for m in modes:
            m.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]), accelerator.autocast():
            images = parts.pipe(sample_prompts, num_inference_steps=settings.sample_steps,
                                height=res, width=res,
                                generator=torch.Generator().manual_seed(settings.seed)).images
        for m, was in modes.items():
            m.train(was)
        made = []
        for i, im in enumerate(images):
            path = Path(session.outputs) / SAMPLES_DIR / f"step-{state['global_step']:07d}-{i}.png"
            with drive.atomic_writer(path) as f:
                im.save(f, format="PNG")
            made.append(path)
        sample_files.extend(made)
        emit("samples", {"global_step": state["global_step"], "paths": made})

    # ---- the two stages
    resumed_from = ckpt.step if ckpt else None
    with StopSignals() as stop, contextlib.closing(latents):
        for si, stage in enumerate(settings.stage_order):
            cfg = settings.stage(stage)
            if si < state["stage"] or cfg["steps"] == 0:
                continue
            trained = parts.trainable(stage)
            text_frozen = stage == "unet"
            for m in trained.values():
                m.requires_grad_(True)
                m.train()
            if settings.gradient_checkpointing:
                parts.unet.enable_gradient_checkpointing()
                for enc in parts.encoders:
                    enc.activation_checkpointing_enable()
            _place(trained.values(), device)
            if text_frozen:  # after a text encoder stage, the cache is built anew
                _place(parts.encoders, device)
                build_prompt_cache()
            if info.is_cuda:  # what this stage does not run leaves the GPU
                _place([parts.vae] + (parts.encoders if text_frozen else []), "cpu")
            params = [p for m in trained.values() for p in m.parameters()]
            if settings.adam_8bit and device.type == "cuda":
                import bitsandbytes as bnb

                optimizer = bnb.optim.AdamW8bit(params, lr=cfg["lr"],
                                                weight_decay=settings.weight_decay)
            else:  # the fused kernel: one op for all tensors instead of a dozen per tensor
                optimizer = torch.optim.AdamW(params, lr=cfg["lr"],
                                              weight_decay=settings.weight_decay,
                                              fused=device.type in ("cpu", "cuda"))
            lr_schedule = get_scheduler(cfg["schedule"], optimizer,
                                        num_warmup_steps=cfg["warmup"],
                                        num_training_steps=cfg["steps"])
            models_in = accelerator.prepare(*trained.values(), optimizer)
            optimizer = models_in[-1]
            run = dict(zip(trained, models_in[:-1]))
            unet = run.get("unet", parts.unet)
            if ckpt is not None and state["stage"] == si and state["stage_step"] > 0:
                optimizer.load_state_dict(ckpt.object("optimizer"))
                lr_schedule.load_state_dict(ckpt.object("lr_scheduler"))
                if accelerator.scaler is not None and ckpt.object("scaler") is not None:
                    accelerator.scaler.load_state_dict(ckpt.object("scaler"))
            if ckpt is not None:
                _set_rng_states(ckpt.object("rng"))
                ckpt = None  # restored once
            for name in trained:
                if name not in state["modified"]:
                    state["modified"].append(name)
            emit("stage_start", {**state, "stage_name": stage, "parts": parts})
            bar = tqdm(total=cfg["steps"], initial=state["stage_step"], unit="step",
                       desc=f"{STAGE_TITLES[stage]} stage")
            B = settings.batch_size
            while state["stage_step"] < cfg["steps"]:
                t0 = time.perf_counter()
                # -- batch: indices, then every random draw from this step's generator
                gen = _step_generator(settings.seed, state["global_step"], rank)
                nproc = accelerator.num_processes
                items = [("i", j) for j in order.take(B * nproc)[rank * B:(rank + 1) * B]]
                if class_ex:
                    items += [("c", j) for j in
                              class_order.take(B * nproc)[rank * B:(rank + 1) * B]]
                lat, time_ids = [], []
                for kind, j in items:
                    flip = bool(torch.rand((), generator=gen) < 0.5) if settings.flip else False
                    mean, std = latents.get((kind, j, flip))
                    (h0, w0), (top, left) = meta[kind, j]
                    if settings.crop == "random":
                        size = res // 8
                        oy = int(torch.randint(mean.shape[-2] - size + 1, (), generator=gen))
                        ox = int(torch.randint(mean.shape[-1] - size + 1, (), generator=gen))
                        mean = mean[:, oy:oy + size, ox:ox + size]
                        std = std[:, oy:oy + size, ox:ox + size]
                        top, left = oy * 8, ox * 8
                    lat.append(mean + std * torch.randn(mean.shape, generator=gen))
                    time_ids.append([h0, w0, top, left, res, res])
                x0 = torch.stack(lat) * parts.vae.config.scaling_factor
                noise = torch.randn(x0.shape, generator=gen)
                if settings.offset_noise:
                    noise += settings.offset_noise * torch.randn(
                        (x0.shape[0], x0.shape[1], 1, 1), generator=gen)
                steps_t = torch.randint(0, parts.noise_scheduler.config.num_train_timesteps,
                                        (x0.shape[0],), generator=gen)
                caps = [(examples if k == "i" else class_ex)[j].caption for k, j in items]
                # -- forward, backward, update
                with accelerator.autocast():
                    hidden, pooled = embeddings(caps, None if text_frozen else list(run.values()))
                    added = ({"text_embeds": pooled, "time_ids": torch.tensor(
                        time_ids, dtype=hidden.dtype, device=device)} if parts.sdxl else None)
                    per_example = denoise_loss(parts, unet, x0.to(device), noise.to(device),
                                               steps_t.to(device), hidden, added,
                                               settings.min_snr_gamma)
                if class_ex:
                    inst, prior = per_example.chunk(2)
                    loss = inst.mean() + settings.prior_weight * prior.mean()
                else:
                    loss = per_example.mean()
                accelerator.backward(loss)
                if settings.max_grad_norm > 0 and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, settings.max_grad_norm)
                optimizer.step()
                if not optimizer.step_was_skipped:
                    lr_schedule.step()
                optimizer.zero_grad(set_to_none=True)
                # -- bookkeeping, samples, checkpoints
                state["stage_step"] += 1
                state["global_step"] += 1
                state["losses"].append(float(loss.detach().item()))
                bar.update(1)
                bar.set_postfix(loss=f"{state['losses'][-1]:.4f}",
                                s_per_step=f"{time.perf_counter() - t0:.2f}")
                emit("step", {**state, "stage_name": stage, "loss": state["losses"][-1]})
                if settings.sample_every and state["global_step"] % settings.sample_every == 0:
                    if info.is_cuda:
                        _place([parts.vae, *parts.encoders], device)
                    save_samples()
                    if info.is_cuda and text_frozen:
                        _place([parts.vae, *parts.encoders], "cpu")
                due = (settings.checkpoint_every
                       and state["global_step"] % settings.checkpoint_every == 0)
                if (due or stop.signum) and state["stage_step"] < cfg["steps"]:
                    path = save_checkpoint({
                        "optimizer": optimizer.state_dict(),
                        "lr_scheduler": lr_schedule.state_dict(),
                        "scaler": (accelerator.scaler.state_dict()
                                   if accelerator.scaler is not None else None)})
                    if stop.signum:
                        bar.close()
                        stop.raise_stop(state["global_step"], path)
            bar.close()
            for m in trained.values():
                m.requires_grad_(False)
                m.eval()
            del optimizer, lr_schedule, models_in, run
            accelerator.free_memory()
            state["stage"], state["stage_step"] = si + 1, 0
            path = save_checkpoint({})  # the stage boundary: a new stage starts afresh
            emit("stage_end", {**state, "stage_name": stage, "parts": parts})
            if stop.signum:
                stop.raise_stop(state["global_step"], path)

    # ---- outputs
    _place([parts.vae, *parts.modules().values()], device)
    result = TrainResult(Path(session.models) / (settings.model_name or session.name), None,
                         state["global_step"], state["losses"], None, sample_files,
                         resumed_from, stats)
    if accelerator.is_main_process:
        export_model(parts, result.model_dir, settings.save_precision or "fp32")
        result.single_file = export_single_file(result.model_dir, state["global_step"])
        result.loss_curve = save_loss_curve(state["losses"], settings,
                                            Path(session.outputs) / LOSS_PNG)
    accelerator.wait_for_everyone()
    log.info("Trained %d steps; the model is in %s", state["global_step"], result.model_dir)
    emit("done", {**state, "model_dir": result.model_dir})
    return result


# --------------------------------------------------------------------------- outputs


def export_model(parts: Parts, dest: Path, precision: str) -> Path:
    """Save the pipeline in diffusers format: locally first, then whole into ``dest``."""
    import torch

    if precision == "fp16":
        parts.pipe.to(dtype=torch.float16)
    with tempfile.TemporaryDirectory(prefix="fastsd-model-") as tmp:
        parts.pipe.save_pretrained(tmp, safe_serialization=True)
        drive.copy_tree(tmp, dest)
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

