"""Training settings, the GPU presets, and an estimate of peak VRAM.

One dataclass holds every option; the CLI builds its options from these fields (and their
``help`` metadata), and the settings a run used are stored in the session so that a resume
continues with exactly the same ones. Fields left at ``None`` are filled from the preset of
the detected device (T4, L4, A100 or CPU).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from fastsd.errors import DataError

log = logging.getLogger("fastsd")

STAGES = ("unet", "text")
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
             "polynomial")
PRECISIONS = ("no", "fp16", "bf16")


def _opt(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainSettings:
    """Everything the two-stage trainer can be told. ``None`` means "from the preset"."""

    # stage 1 (UNet, text encoder frozen) and stage 2 (text encoder, UNet frozen)
    unet_steps: int = _opt(1500, "UNet stage: training steps (0 skips the stage)")
    unet_lr: float = _opt(2e-6, "UNet stage: learning rate")
    unet_schedule: str = _opt("linear", "UNet stage: learning-rate schedule",
                              choices=SCHEDULES)
    unet_warmup: int = _opt(0, "UNet stage: warm-up steps")
    text_steps: int = _opt(350, "text encoder stage: training steps (0 skips the stage)")
    text_lr: float = _opt(1e-6, "text encoder stage: learning rate")
    text_schedule: str = _opt("linear", "text encoder stage: learning-rate schedule",
                              choices=SCHEDULES)
    text_warmup: int = _opt(0, "text encoder stage: warm-up steps")
    order: str = _opt("unet,text", "order of the stages", choices=("unet,text", "text,unet"))
    # data
    resolution: int | None = _opt(None, "training resolution in pixels (default: the "
                                  "session's resolution)")
    batch_size: int | None = _opt(None, "images per step (default: from the preset)")
    flip: bool = _opt(False, "randomly flip images horizontally")
    crop: str = _opt("center", "crop to a square: centre or random (random crops the cached "
                     "latents)", choices=("center", "random"))
    # prior preservation
    prior_preservation: bool = _opt(False, "train on class images too (prior preservation)")
    class_images: int = _opt(50, "prior preservation: number of class images, generated "
                             "once by the base model and kept in the session")
    class_prompt: str = _opt("", "prior preservation: class prompt (default: 'photo of a "
                             "CLASS')")
    prior_weight: float = _opt(1.0, "prior preservation: weight of the class loss")
    # loss
    offset_noise: float = _opt(0.0, "offset noise strength (0 = off; 0.05 is typical)")
    min_snr_gamma: float = _opt(0.0, "min-SNR weighting gamma (0 = off; 5 is typical)")
    # engine
    preset: str = _opt("auto", "GPU preset: auto picks from the detected device",
                       choices=("auto", "t4", "l4", "a100", "cpu"))
    mixed_precision: str | None = _opt(None, "no, fp16 or bf16 (default: from the preset)",
                                       choices=PRECISIONS)
    adam_8bit: bool | None = _opt(None, "8-bit AdamW from bitsandbytes on CUDA (default: "
                                  "from the preset)")
    gradient_checkpointing: bool | None = _opt(None, "gradient checkpointing (default: "
                                               "from the preset)")
    save_precision: str | None = _opt(None, "precision of the saved diffusers model: fp32 "
                                      "or fp16 (default: from the preset)",
                                      choices=("fp32", "fp16"))
    fused_adam: bool = _opt(True, "torch's fused AdamW kernel (when 8-bit Adam is off)")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 = off)")
    weight_decay: float = _opt(1e-2, "AdamW weight decay")
    # checkpoints, samples, outputs
    checkpoint_every: int = _opt(500, "save a resumable checkpoint every N steps (0 = only "
                                 "at stage ends and on interruption)")
    keep_checkpoints: int = _opt(1, "how many checkpoints to keep on Drive (a new one is "
                                 "written whole before the old one is removed)")
    background_checkpoints: bool = _opt(True, "write checkpoints to Drive in the background "
                                        "while training goes on (off: training waits)")
    sample_every: int = _opt(0, "save sample images every M steps (0 = off)")
    sample_prompts: list[str] = _opt([], "prompts of the sample images, repeatable "
                                     "(default: the instance prompt)")
    sample_steps: int = _opt(25, "inference steps of a sample image")
    class_steps: int = _opt(25, "inference steps of a class image")
    model_name: str = _opt("", "name of the trained model in the session's models/ "
                           "(default: the session's name)")
    latent_cache_mb: int = _opt(1024, "keep up to this many MB of cached latents in memory; "
                                "the rest spills to local disk")
    seed: int = _opt(42, "random seed")

    def __post_init__(self) -> None:
        for name in ("unet_steps", "text_steps", "unet_warmup", "text_warmup",
                     "checkpoint_every", "sample_every", "class_images"):
            if getattr(self, name) < 0:
                raise DataError(f"{name} is {getattr(self, name)}; it must be 0 or more.")
        if self.keep_checkpoints < 1:
            raise DataError("keep_checkpoints must be at least 1, so that a run can resume.")
        if self.batch_size is not None and self.batch_size < 1:
            raise DataError(f"batch_size is {self.batch_size}; it must be at least 1.")
        if self.resolution is not None and self.resolution % 8:
            raise DataError(f"resolution {self.resolution} is not a multiple of 8 (the VAE "
                            "downsamples by 8). Use 512, 576, 640, 768, 1024...")
        for name, choices in (("unet_schedule", SCHEDULES), ("text_schedule", SCHEDULES),
                              ("order", ("unet,text", "text,unet")),
                              ("crop", ("center", "random"))):
            if getattr(self, name) not in choices:
                raise DataError(f"{name} {getattr(self, name)!r} is not one of {choices}.")

    # ------------------------------------------------------------------ helpers
    @property
    def stage_order(self) -> tuple[str, ...]:
        return tuple(self.order.split(","))

    def stage(self, name: str) -> dict[str, Any]:
        p = "unet_" if name == "unet" else "text_"
        return {k: getattr(self, p + k) for k in ("steps", "lr", "schedule", "warmup")}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            log.warning("Ignoring unknown training settings: %s", ", ".join(sorted(unknown)))
        return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------- presets

#: What each preset sets; only fields the user left at ``None`` are taken from it.
PRESETS: dict[str, dict[str, Any]] = {
    # T4: 15 GB, no bf16. 8-bit Adam and gradient checkpointing make SD 1.5 fit.
    "t4": dict(mixed_precision="fp16", adam_8bit=True, gradient_checkpointing=True,
               batch_size=1, save_precision="fp16"),
    # L4: 24 GB, bf16.
    "l4": dict(mixed_precision="bf16", adam_8bit=True, gradient_checkpointing=True,
               batch_size=1, save_precision="fp16"),
    # A100: 40 or 80 GB, bf16; room for the full optimizer and the activations.
    "a100": dict(mixed_precision="bf16", adam_8bit=False, gradient_checkpointing=False,
                 batch_size=2, save_precision="fp16"),
    # CPU (tests, demo): full precision, exact.
    "cpu": dict(mixed_precision="no", adam_8bit=False, gradient_checkpointing=False,
                batch_size=1, save_precision="fp32"),
}


def choose_preset(info) -> str:
    """The preset for a fastsd.env.DeviceInfo: by GPU name, else by total VRAM."""
    if not getattr(info, "is_cuda", False):
        return "cpu"
    name = (info.name or "").upper()
    for key in ("T4", "L4", "A100"):
        if key in name:
            return key.lower()
    total = info.vram_total_gb or 0
    return "t4" if total < 18 else "l4" if total < 30 else "a100"


def resolve(settings: TrainSettings, info, session_resolution: int) -> tuple[TrainSettings, str]:
    """Fill the ``None`` fields from the preset of the device; returns (settings, preset)."""
    preset = choose_preset(info) if settings.preset == "auto" else settings.preset
    values = {k: v for k, v in PRESETS[preset].items() if getattr(settings, k) is None}
    if settings.resolution is None:
        values["resolution"] = int(session_resolution)
    if not getattr(info, "is_cuda", False):
        # fp16 needs CUDA: on CPU fp32 unless bf16 is asked for by name; 8-bit Adam (which
        # bitsandbytes runs on CPU too) only when asked for by name.
        values.update(adam_8bit=bool(settings.adam_8bit),
                      mixed_precision="bf16" if settings.mixed_precision == "bf16" else "no")
    return dataclasses.replace(settings, **values), preset


# --------------------------------------------------------------------------- VRAM estimate

#: Activations the UNet's forward keeps for the backward pass, one 512x512 image, 16-bit,
#: in GB: measured on the real architectures (random weights on PyTorch's meta device, no
#: memory used) by fastsd.train.activations.measure, which sums the tensors autograd saves,
#: less the L x L attention matrices that SDPA's memory-efficient kernels never store and
#: less views of the weights (no memory of their own). They grow with the pixel count (the
#: same measure at 768 and 1024 px: within 3% of (px/512)^2). tests/real checks these
#: figures against the measure.
ACTIVATION_GB_512 = {"sd1": 1.21, "sd2": 1.19, "sdxl": 2.38}
BACKWARD_FACTOR = 1.25  # activation gradients and temporaries live during the backward
#: With gradient checkpointing only each block's input is kept, plus one block's
#: activations while it is recomputed: measured 0.41 (SDXL) to 0.48 (SD 1.5) of the above.
CHECKPOINTED_FRACTION = 0.5
CUDA_OVERHEAD_GB = 0.8  # CUDA context, cuBLAS workspace, allocator fragmentation
GB = 1e9


def estimate_vram_gb(settings: TrainSettings, family: str, params: dict[str, int]) -> dict[str, float]:
    """Peak VRAM of each stage in GB, from the parameter counts of the model's parts.

    Trained part: fp32 weights (4 B/param) + fp32 gradients (4) + AdamW moments (8, or 2
    with 8-bit Adam) + the 16-bit copies autocast caches during the forward (2, mixed
    precision only). The frozen UNet of stage 2 stays in fp32 (4 B/param; its 16-bit casts
    are transient); the VAE and the frozen text encoders leave the GPU once the caches are
    built. Plus activations, which scale with batch x pixels, and a fixed CUDA overhead.
    """
    mixed = settings.mixed_precision not in (None, "no")
    trained_b = 4 + 4 + (2 if settings.adam_8bit else 8) + (2 if mixed else 0)
    res = settings.resolution or 512
    act = (ACTIVATION_GB_512.get(family, ACTIVATION_GB_512["sd1"]) * BACKWARD_FACTOR
           * (settings.batch_size or 1) * (res / 512) ** 2)
    act *= 2 if settings.prior_preservation else 1
    act *= CHECKPOINTED_FRACTION if settings.gradient_checkpointing else 1
    act *= 1 if mixed else 2
    text = sum(v for k, v in params.items() if k.startswith("text_encoder"))
    unet = params.get("unet", 0)
    out = {}
    # Stage 1: the text encoder and the VAE are used for the caches, then leave the GPU.
    out["unet"] = (unet * trained_b) / GB + act + CUDA_OVERHEAD_GB
    # Stage 2: the UNet is frozen but activations still flow through it.
    out["text"] = (unet * 4 + text * trained_b) / GB + act + CUDA_OVERHEAD_GB
    return {k: round(v, 1) for k, v in out.items()}


@dataclass
class DrivePlan:
    """What a run puts on Drive at its peak, in bytes (an estimate from parameter counts)."""

    checkpoint: int  # the largest checkpoint of the run
    copies: int  # checkpoints on Drive at once: keep + the one being written
    have: int  # checkpoints already there (part of the copies)
    model: int
    single_file: int
    samples: int

    @property
    def total(self) -> int:
        return (max(0, self.checkpoint * self.copies - self.have) + self.model
                + self.single_file + self.samples)

    def describe(self) -> str:
        def g(n: float) -> str:
            return f"{n / 1e9:.2f} GB"
        return (f"checkpoints {self.copies} x {g(self.checkpoint)}"
                + (f" less {g(self.have)} already there" if self.have else "")
                + f", model folder {g(self.model)}, single file {g(self.single_file)}, "
                f"samples {g(self.samples)}")

    def advice(self, s: TrainSettings) -> str:
        tips = []
        if s.keep_checkpoints > 1:
            tips.append(f"--keep-checkpoints 1 (now {s.keep_checkpoints})")
        if not s.adam_8bit:
            tips.append("--adam-8bit on a GPU (a quarter of the optimizer state)")
        if s.save_precision != "fp16":
            tips.append("--save-precision fp16 (half the model folder)")
        if s.sample_every:
            tips.append("fewer samples (--sample-every)")
        return "; ".join(tips) or "nothing in the settings shrinks it further"


def drive_plan(s: TrainSettings, params: dict[str, int], vae_params: int,
               have: int = 0) -> DrivePlan:
    """Estimate the Drive space of a run: checkpoints hold fp32 weights of the trained
    modules (4 B/param) and the optimizer state of the stage (AdamW 8 B/param, 8-bit 2);
    the model folder all weights at the save precision; the single file fp16 weights;
    a sample PNG about 1.5 bytes per pixel."""
    unet = params.get("unet", 0)
    text = sum(v for k, v in params.items() if k.startswith("text_encoder"))
    opt = 2 if s.adam_8bit else 8
    sizes = []
    if s.unet_steps:
        sizes.append(unet * (4 + opt) + (text * 4 if s.order == "text,unet" and s.text_steps
                                          else 0))
    if s.text_steps:
        sizes.append(text * (4 + opt) + (unet * 4 if s.unet_steps else 0))
    ckpt = max(sizes, default=0)
    total = s.unet_steps + s.text_steps
    n_ckpt = (total // s.checkpoint_every if s.checkpoint_every else 0) + 2
    allw = unet + text + vae_params
    n_samples = (total // s.sample_every * max(1, len(s.sample_prompts))
                 if s.sample_every else 0)
    res = s.resolution or 512
    return DrivePlan(ckpt, min(s.keep_checkpoints, n_ckpt) + 1, have,
                     allw * (2 if s.save_precision == "fp16" else 4), allw * 2,
                     int(n_samples * res * res * 1.5))


def describe(settings: TrainSettings, preset: str, vram: dict[str, float] | None = None) -> str:
    """A few lines that show the chosen settings (and the VRAM estimate) to the user."""
    s = settings
    lines = [
        f"Preset {preset}: mixed precision {s.mixed_precision}, 8-bit Adam {s.adam_8bit}, "
        f"gradient checkpointing {s.gradient_checkpointing}, batch {s.batch_size}, "
        f"{s.resolution} px, crop {s.crop}, flip {s.flip}",
        f"Stages {s.order}: UNet {s.unet_steps} steps at {s.unet_lr:g} ({s.unet_schedule}, "
        f"warm-up {s.unet_warmup}); text encoder {s.text_steps} steps at {s.text_lr:g} "
        f"({s.text_schedule}, warm-up {s.text_warmup})",
        f"Prior preservation {s.prior_preservation}, offset noise {s.offset_noise:g}, min-SNR "
        f"gamma {s.min_snr_gamma:g}, checkpoint every {s.checkpoint_every} (keep "
        f"{s.keep_checkpoints}), samples every {s.sample_every}, seed {s.seed}",
    ]
    if vram:
        lines.append("Estimated peak VRAM: " + ", ".join(
            f"{'UNet' if k == 'unet' else 'text encoder'} stage {v:.1f} GB"
            for k, v in vram.items()))
    return "\n".join(lines)
