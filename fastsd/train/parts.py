"""The model parts a run trains: the diffusers folder loaded (:func:`load_parts`), what
each stage trains and what a checkpoint keeps of it (:class:`Parts`), where the parts live
in each phase (:class:`Placement`), the text encoding and the denoising loss."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastsd import drive
from fastsd.errors import ModelError
from fastsd.train import lora
from fastsd.train.settings import ROOMY_GIB


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
    adapters: lora.Adapters | None = None  # LoRA: only the adapters train, the base is frozen

    @property
    def sdxl(self) -> bool:
        return self.family == "sdxl"

    @property
    def half(self) -> bool:
        """Whether the frozen base is in 16-bit (a LoRA run in mixed precision)."""
        return next(self.unet.parameters()).element_size() == 2

    # What a stage trains and what a checkpoint keeps of it.

    def trainable(self, stage: str) -> dict[str, Any]:
        """The modules ``stage`` ("unet" or "text") trains, by their name in a checkpoint."""
        if stage == "unet":
            return {"unet": self.unet}
        return {("text_encoder" if i == 0 else f"text_encoder_{i + 1}"): m
                for i, m in enumerate(self.encoders)}

    def parameters(self, stage: str) -> list:
        """The parameters the optimizer of ``stage`` steps: the modules' own, or for LoRA
        their adapters'."""
        trained = self.trainable(stage).values()
        if self.adapters is not None:
            return [p for m in trained for p in lora.weights(m)]
        return [p for m in trained for p in m.parameters()]

    def unfreeze(self, stage: str) -> list:
        """Start ``stage``: its parameters take gradients, its modules train; returns them."""
        params = self.parameters(stage)
        for p in params:
            p.requires_grad_(True)
        for m in self.trainable(stage).values():
            m.train()
        return params

    def freeze(self, stage: str) -> None:
        """End ``stage``: nothing of it takes gradients any more."""
        for p in self.parameters(stage):
            p.requires_grad_(False)
        for m in self.trainable(stage).values():
            m.eval()

    def modules(self) -> dict[str, Any]:
        return {**self.trainable("unet"), **self.trainable("text")}

    def checkpoint_tensors(self, names: list[str], unwrap) -> dict[str, dict]:
        """What a checkpoint keeps of the modules ``names`` (those trained so far): their
        state dicts, or for LoRA their adapters' weights only; each module unwrapped from
        accelerate by ``unwrap``."""
        keep = lora.state if self.adapters is not None else (lambda m: m.state_dict())
        return {n: keep(unwrap(m)) for n, m in self.modules().items() if n in names}

    def load_checkpoint_tensors(self, tensors: dict[str, dict]) -> None:
        """Put back what :meth:`checkpoint_tensors` kept."""
        for name, sd in tensors.items():
            if self.adapters is not None:
                lora.load_state(self.modules()[name], sd)
            else:
                self.modules()[name].load_state_dict(sd)

    def add_adapters(self, adapters: lora.Adapters, seed: int) -> None:
        """Make this a LoRA run: adapters on the UNet and the text encoders."""
        lora.add_to_parts(self, adapters, seed)
        self.adapters = adapters

    def param_counts(self) -> dict[str, int]:
        """Parameters of each module of the base model (adapters not counted)."""
        return {k: sum(p.numel() for n, p in m.named_parameters() if not lora.is_adapter(n))
                for k, m in self.modules().items()}

    def adapter_counts(self) -> dict[str, int]:
        """Parameters of each module's LoRA adapters (none without adapters)."""
        return {k: lora.count(m) for k, m in self.modules().items()}


#: the parts that take the training's precision (the VAE stays fp32)
PRECISION_PARTS = ("unet", "text_encoder", "text_encoder_2")


def stored_dtype(folder: Path):
    """The floating-point type most of the .safetensors weights in ``folder`` are stored in,
    read from their headers; None when it has none (or only .bin files)."""
    from collections import Counter

    from fastsd.convert.tensors import main_float, open_tensors, torch_dtype

    nbytes: Counter = Counter()
    for f in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        with open_tensors(f) as t:
            for k in t.keys():
                info = t.info(k)
                nbytes[info.dtype] += info.nbytes
    name = main_float(nbytes)
    return None if name is None else torch_dtype(name)


def load_parts(model_dir: Path, precision: str = "fp32") -> Parts:
    """Load a diffusers folder (SD 1.x, SD 2.x or SDXL) and tell its family. ``precision``
    (fp32, fp16 or bf16) is that of the UNet and the text encoders; the VAE is always fp32
    (it encodes the latent cache, and SDXL's VAE overflows in fp16)."""
    import torch
    from diffusers import DDPMScheduler, DiffusionPipeline

    from fastsd.convert.detect import detect_folder
    from fastsd.models import vae as vae_guard

    index = drive.read_json(Path(model_dir) / "model_index.json")
    unused = {k: None for k in ("safety_checker", "feature_extractor", "image_encoder")
              if k in index}
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    # Each part is loaded in the precision its files hold and then converted one tensor at a
    # time: converted while loading, the part would be in memory twice (an fp32 SDXL UNet
    # loaded in fp16 peaks at 15 GB, over Colab's 12.7).
    stored = {name: stored_dtype(Path(model_dir) / name) for name in PRECISION_PARTS}
    dtypes = {"default": dtype, "vae": torch.float32,
              **{name: d for name, d in stored.items() if d is not None}}
    try:
        pipe = DiffusionPipeline.from_pretrained(str(model_dir), dtype=dtypes, **unused)
    except (OSError, ValueError) as e:
        raise ModelError(f"Cannot load the base model from {model_dir}: {e}. Check that the "
                         "folder is a complete diffusers model.") from e
    for name in PRECISION_PARTS:
        part = getattr(pipe, name, None)
        if part is not None and part.dtype != dtype:
            part.to(dtype)
    pipe.set_progress_bar_config(disable=True)
    detected = detect_folder(model_dir)
    if detected.kind != "checkpoint":
        raise ModelError(f"{model_dir} is {detected.describe()}, not a base model to train.")
    te2 = getattr(pipe, "text_encoder_2", None)
    family = detected.family
    v_pred = detected.prediction_type == "v_prediction"
    encoders = [pipe.text_encoder] + ([te2] if te2 is not None else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if te2 is not None else [])
    vae_guard.guard(pipe.vae, vae_guard.must_upcast(pipe.vae, family == "sdxl"))  # samples
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


# --------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class Placement:
    """Where the VAE, the text encoders and the UNet live in each phase of a run.

    On a GPU with less than ``settings.ROOMY_GIB`` of memory (below an A100's class), what
    a phase does not run leaves it: the VAE after the latent cache is built, the text
    encoders during the UNet stage (their embeddings are cached). On CPU, or a GPU with
    room, everything stays on the device.
    """

    device: Any
    offload: bool

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
    vram = getattr(info, "vram_total_gib", None) or 0.0
    return Placement(device, device.type == "cuda" and vram < ROOMY_GIB)
