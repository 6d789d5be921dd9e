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

from fastsd import options
from fastsd.drive import gb
from fastsd.env import GIB
from fastsd.errors import DataError
from fastsd.session import DEFAULT_TEXT_STEPS, DEFAULT_UNET_STEPS

log = logging.getLogger("fastsd")

STAGES = ("unet", "text")
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
             "polynomial")
PRECISIONS = ("no", "fp16", "bf16")
METHODS = ("full", "lora")
#: The learning rates each method uses where the user gave none (sources in the fields'
#: help): LoRA's adapters start at zero and need rates ~100x those of full fine-tuning.
DEFAULT_LR = {"full": {"unet": 2e-6, "text": 1e-6}, "lora": {"unet": 1e-4, "text": 1e-5}}


def rate_text(lr: float) -> str:
    """A learning rate as people write it: 2e-6."""
    return f"{lr:.0e}".replace("e-0", "e-")


def _opt(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainSettings:
    """Everything the two-stage trainer can be told. ``None`` means "from the preset"."""

    # what is trained: the whole model, or LoRA adapters on a frozen base
    method: str = _opt("full", "full: fine-tune the model's weights (a whole model to save); "
                       "lora: train small LoRA adapters on the frozen base model (a LoRA file "
                       "of megabytes that AUTOMATIC1111, Forge, ComfyUI and diffusers load; "
                       "SDXL fits a T4)", choices=METHODS)
    rank: int = _opt(16, "LoRA: rank of each adapter (kohya's docs/train_network.md uses "
                     "--network_dim=16 in its example; a face needs 8-32)")
    alpha: float = _opt(8.0, "LoRA: alpha; an adapter's update is scaled by alpha/rank "
                        "(kohya's docs advise about half the rank, as in their SDXL example "
                        "dim 32, alpha 16)")
    lora_dropout: float = _opt(0.0, "LoRA: dropout on each adapter's input (diffusers' "
                               "train_dreambooth_lora*.py default: 0)")
    # stage 1 (UNet, text encoder frozen) and stage 2 (text encoder, UNet frozen)
    unet_steps: int = _opt(DEFAULT_UNET_STEPS, "UNet stage: training steps (0 skips the stage)")
    unet_lr: float | None = _opt(None, "UNet stage: learning rate (default: "
                                 f"{rate_text(DEFAULT_LR['full']['unet'])} for full "
                                 "fine-tuning, as fast-stable-diffusion's notebook; "
                                 f"{rate_text(DEFAULT_LR['lora']['unet'])} for LoRA, kohya's "
                                 "docs/train_network.md --unet_lr and diffusers' "
                                 "README_sdxl.md --learning_rate)")
    unet_schedule: str = _opt("linear", "UNet stage: learning-rate schedule",
                              choices=SCHEDULES)
    unet_warmup: int = _opt(0, "UNet stage: warm-up steps")
    text_steps: int = _opt(DEFAULT_TEXT_STEPS, "text encoder stage: training steps (0 skips the stage)")
    text_lr: float | None = _opt(None, "text encoder stage: learning rate (default: "
                                 f"{rate_text(DEFAULT_LR['full']['text'])} for full "
                                 f"fine-tuning; {rate_text(DEFAULT_LR['lora']['text'])} for "
                                 "LoRA, kohya's docs/train_network.md --text_encoder_lr, also "
                                 "for both SDXL encoders in docs/sdxl_train_network.md)")
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
    save_every: int = _opt(0, "also write the model as one .safetensors file every N steps, "
                           "to compare (models/NAME-stepN.safetensors, beside the resumable "
                           "checkpoints; 0 = off)")
    save_from: int = _opt(0, "the first step at which --save-every writes a file")
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
                     "checkpoint_every", "sample_every", "class_images", "save_every",
                     "save_from"):
            if getattr(self, name) < 0:
                raise DataError(f"{name} is {getattr(self, name)}; it must be 0 or more.")
        if self.rank < 1:
            raise DataError(f"rank is {self.rank}; a LoRA's rank must be at least 1 (4 to 64 "
                            "is usual).")
        if self.alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise DataError(f"alpha {self.alpha:g} must be above 0 and lora_dropout "
                            f"{self.lora_dropout:g} from 0 to below 1.")
        if self.keep_checkpoints < 1:
            raise DataError("keep_checkpoints must be at least 1, so that a run can resume.")
        if self.batch_size is not None and self.batch_size < 1:
            raise DataError(f"batch_size is {self.batch_size}; it must be at least 1.")
        if self.resolution is not None and self.resolution % 8:
            raise DataError(f"resolution {self.resolution} is not a multiple of 8 (the VAE "
                            "downsamples by 8). Use 512, 576, 640, 768, 1024...")
        for name, choices in (("unet_schedule", SCHEDULES), ("text_schedule", SCHEDULES),
                              ("order", ("unet,text", "text,unet")),
                              ("crop", ("center", "random")), ("method", METHODS)):
            if getattr(self, name) not in choices:
                raise DataError(f"{name} {getattr(self, name)!r} is not one of {choices}.")

    # ------------------------------------------------------------------ helpers
    @property
    def stage_order(self) -> tuple[str, ...]:
        return tuple(self.order.split(","))

    @property
    def lora(self) -> bool:
        return self.method == "lora"

    def stage(self, name: str) -> dict[str, Any]:
        p = "unet_" if name == "unet" else "text_"
        return {k: getattr(self, p + k) for k in ("steps", "lr", "schedule", "warmup")}

    def base_dtype(self) -> str:
        """The precision of the frozen base model: a LoRA run in fp16 or bf16 mixed
        precision keeps it in that half precision (half the memory; the adapters and
        their optimizer stay fp32); full fine-tuning keeps fp32 master weights."""
        return self.mixed_precision if self.lora and self.mixed_precision in ("fp16",
                                                                                "bf16") else "fp32"

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


#: A GPU that the name does not place gets a T4's preset below T4_CLASS_GIB of total VRAM,
#: an L4's below ROOMY_GIB, an A100's from there. ROOMY_GIB is also where the trainer stops
#: moving the VAE and the text encoders off the GPU between phases (train.parts.Placement).
T4_CLASS_GIB = 18.0
ROOMY_GIB = 30.0


def choose_preset(info) -> str:
    """The preset for a fastsd.env.DeviceInfo: by GPU name, else by total VRAM."""
    if not getattr(info, "is_cuda", False):
        return "cpu"
    name = (info.name or "").upper()
    for key in ("T4", "L4", "A100"):
        if key in name:
            return key.lower()
    total = info.vram_total_gib or 0
    return "t4" if total < T4_CLASS_GIB else "l4" if total < ROOMY_GIB else "a100"


def resolve(settings: TrainSettings, info, session_resolution: int) -> tuple[TrainSettings, str]:
    """Fill the ``None`` fields from the preset of the device; returns (settings, preset)."""
    preset = choose_preset(info) if settings.preset == "auto" else settings.preset
    values = {k: v for k, v in PRESETS[preset].items() if getattr(settings, k) is None}
    if settings.resolution is None:
        values["resolution"] = int(session_resolution)
    for stage in STAGES:  # the method's learning rates, where none was given
        if getattr(settings, f"{stage}_lr") is None:
            values[f"{stage}_lr"] = DEFAULT_LR[settings.method][stage]
    if not getattr(info, "is_cuda", False):
        # fp16 needs CUDA: on CPU fp32 unless bf16 is asked for by name; 8-bit Adam (which
        # bitsandbytes runs on CPU too) only when asked for by name.
        values.update(adam_8bit=bool(settings.adam_8bit),
                      mixed_precision="bf16" if settings.mixed_precision == "bf16" else "no")
    return dataclasses.replace(settings, **values), preset


# --------------------------------------------------------------------------- VRAM estimate

#: Activations the UNet's forward keeps for the backward pass, one 512x512 image, 16-bit,
#: in bytes: measured on the real architectures (random weights on PyTorch's meta device,
#: no memory used) by fastsd.train.activations.measure, which sums the tensors autograd
#: saves, less the L x L attention matrices that SDPA's memory-efficient kernels never store
#: and less views of the weights (no memory of their own). They grow with the pixel count
#: (the same measure at 768 and 1024 px: within 3% of (px/512)^2). tests/real checks these
#: figures against the measure.
ACTIVATION_BYTES_512 = {"sd1": 1.21e9, "sd2": 1.19e9, "sdxl": 2.38e9}
BACKWARD_FACTOR = 1.25  # activation gradients and temporaries live during the backward
#: With gradient checkpointing only each block's input is kept, plus one block's
#: activations while it is recomputed: measured 0.41 (SDXL) to 0.48 (SD 1.5) of the above.
CHECKPOINTED_FRACTION = 0.5
#: LoRA (the base frozen, adapters on every linear layer of the UNet's transformer blocks),
#: measured the same way with the adapters in place, and more finely: the views of frozen
#: weights that autograd keeps for the input gradients are not counted as activations,
#: and diffusers' gradient checkpointing recomputes one transformer or ResNet block at a
#: time, so its peak is the blocks' inputs plus the largest one block (SD 1.5: 0.15e9 +
#: 0.09e9 of 1.09e9 bytes; SDXL: 0.14e9 + 0.05e9 of 2.07e9 at 512 px, 0.57e9 + 0.18e9 of
#: 8.1e9 at 1024 px). Rounded up. See benchmarks/bench_lora.py.
LORA_ACTIVATION_BYTES_512 = {"sd1": 1.1e9, "sd2": 1.1e9, "sdxl": 2.1e9}
LORA_CHECKPOINTED_FRACTION = {"sd1": 0.25, "sd2": 0.25, "sdxl": 0.1}
CUDA_OVERHEAD_GIB = 0.75  # CUDA context, cuBLAS workspace, allocator fragmentation


def _text(counts: dict[str, int]) -> int:
    return sum(v for k, v in counts.items() if k.startswith("text_encoder"))


def estimate_vram_gib(settings: TrainSettings, family: str, params: dict[str, int],
                      adapters: dict[str, int] | None = None) -> dict[str, float]:
    """Peak VRAM of each stage in GiB, from the parameter counts of the model's parts
    (``adapters``: those of the LoRA adapters of each part, for the LoRA method).

    Trained weights: fp32 weights (4 B/param) + fp32 gradients (4) + AdamW moments (8, or 2
    with 8-bit Adam) + the 16-bit copies autocast caches during the forward (2, mixed
    precision only). Full fine-tuning: the frozen UNet of stage 2 stays in fp32 (4 B/param;
    its 16-bit casts are transient). LoRA: the whole base is frozen, in fp16/bf16 (2 B)
    under mixed precision, else fp32; the adapters are the trained weights. The VAE and
    the frozen text encoders leave the GPU once the caches are built. Plus activations,
    which scale with batch x pixels, and a fixed CUDA overhead.
    """
    mixed = settings.mixed_precision not in (None, "no")
    trained_b = 4 + 4 + (2 if settings.adam_8bit else 8) + (2 if mixed else 0)
    res = settings.resolution or 512
    table, fraction = ((LORA_ACTIVATION_BYTES_512, LORA_CHECKPOINTED_FRACTION.get(family, 0.25))
                       if settings.lora else (ACTIVATION_BYTES_512, CHECKPOINTED_FRACTION))
    act = (table.get(family, table["sd1"]) * BACKWARD_FACTOR * (settings.batch_size or 1)
           * (res / 512) ** 2)
    act *= 2 if settings.prior_preservation else 1
    act *= fraction if settings.gradient_checkpointing else 1
    act *= 1 if mixed else 2
    text, unet = _text(params), params.get("unet", 0)
    if settings.lora:
        base_b = 4 if settings.base_dtype() == "fp32" else 2
        a_text, a_unet = _text(adapters or {}), (adapters or {}).get("unet", 0)
        # stage 1 trains the UNet's adapters; stage 2 the encoders' (both on the GPU then)
        weights = {"unet": unet * base_b + a_unet * trained_b,
                   "text": (unet + text) * base_b + a_unet * 4 + a_text * trained_b}
    else:
        # Stage 1: the text encoder and the VAE are used for the caches, then leave the GPU.
        # Stage 2: the UNet is frozen but activations still flow through it.
        weights = {"unet": unet * trained_b, "text": unet * 4 + text * trained_b}
    return {k: round((w + act) / GIB + CUDA_OVERHEAD_GIB, 1) for k, w in weights.items()}


@dataclass
class DrivePlan:
    """What a run puts on Drive at its peak, in bytes (an estimate from parameter counts)."""

    checkpoint: int  # the largest checkpoint of the run
    copies: int  # checkpoints on Drive at once: keep + the one being written
    have: int  # checkpoints already there (part of the copies)
    model: int
    single_file: int
    samples: int
    lora: int = 0  # the LoRA file (LoRA method: no model folder, no single file)
    single_files: int = 0  # the intermediate single files the run writes (save_every)

    @property
    def total(self) -> int:
        return (max(0, self.checkpoint * self.copies - self.have) + self.model
                + (self.single_file + self.lora) * (1 + self.single_files) + self.samples)

    def describe(self) -> str:
        each = self.lora or self.single_file
        return (f"checkpoints {self.copies} x {gb(self.checkpoint)}"
                + (f" less {gb(self.have)} already there" if self.have else "")
                + (f", LoRA file {gb(self.lora)}" if self.lora else
                   f", model folder {gb(self.model)}, single file {gb(self.single_file)}")
                + (f", intermediate {'LoRA' if self.lora else 'single'} files "
                   f"{self.single_files} x {gb(each)}" if self.single_files else "")
                + f", samples {gb(self.samples)}")

    def advice(self, s: TrainSettings, session: str = "SESSION") -> str:
        """What shrinks the run, each with how to set it (fastsd.options)."""
        tips = []
        if s.keep_checkpoints > 1:
            tips.append(f"keep one checkpoint, not {s.keep_checkpoints} "
                        f"({options.say(('keep_checkpoints', 1), session=session)})")
        if not s.adam_8bit:
            tips.append("8-bit Adam on a GPU, a quarter of the optimizer state "
                        f"({options.say('adam_8bit', session=session)})")
        if s.save_precision != "fp16":
            tips.append(("an fp16 LoRA file" if s.lora else "an fp16 model folder")
                        + ", half the size "
                        f"({options.say(('save_precision', 'fp16'), session=session)})")
        if not s.lora:
            tips.append("a LoRA, checkpoints and the result in megabytes "
                        f"({options.say(('method', 'lora'), session=session)})")
        if s.sample_every:
            tips.append(f"fewer samples ({options.say('sample_every', session=session)})")
        if self.single_files:
            tips.append(f"fewer intermediate {'LoRA' if self.lora else 'single'} files, "
                        f"{gb(self.lora or self.single_file)} each "
                        f"({options.say('save_every', 'save_from', session=session)})")
        return "; ".join(tips) or "nothing in the settings shrinks it further"


def single_file_due(s: TrainSettings, step: int) -> bool:
    """Whether the run writes an intermediate single file at global step ``step``."""
    return bool(s.save_every) and step >= s.save_from and step % s.save_every == 0


def single_file_steps(s: TrainSettings, first: int, last: int) -> list[int]:
    """The global steps after ``first`` up to ``last`` that write an intermediate file."""
    return [k for k in range(first + 1, last + 1) if single_file_due(s, k)] \
        if s.save_every else []


def drive_plan(s: TrainSettings, params: dict[str, int], vae_params: int,
               have: int = 0, adapters: dict[str, int] | None = None,
               single_files: int = 0) -> DrivePlan:
    """Estimate the Drive space of a run: checkpoints hold fp32 weights of the trained
    modules (4 B/param: the whole modules, or for LoRA their adapters) and the optimizer
    state of the stage (AdamW 8 B/param, 8-bit 2); the model folder all weights at the
    save precision, the single file fp16 weights (LoRA: neither, but one LoRA file of the
    adapters at the save precision), and as much again for each of the ``single_files``
    intermediate ones; a sample PNG about 1.5 bytes per pixel."""
    trained = (adapters or {}) if s.lora else params
    unet, text = trained.get("unet", 0), _text(trained)
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
    n_samples = (total // s.sample_every * max(1, len(s.sample_prompts))
                 if s.sample_every else 0)
    res = s.resolution or 512
    saved_b = 2 if s.save_precision == "fp16" else 4
    allw = params.get("unet", 0) + _text(params) + vae_params
    model, single, lora = ((0, 0, (unet + text) * saved_b) if s.lora
                           else (allw * saved_b, allw * 2, 0))
    return DrivePlan(ckpt, min(s.keep_checkpoints, n_ckpt) + 1, have, model, single,
                     int(n_samples * res * res * 1.5), lora, single_files)


def describe(settings: TrainSettings, preset: str, vram: dict[str, float] | None = None) -> str:
    """A few lines that show the chosen settings (and the VRAM estimate) to the user."""
    s = settings
    lines = [
        ("Method: LoRA, rank {}, alpha {:g}, dropout {:g}; the base model frozen in {}".format(
            s.rank, s.alpha, s.lora_dropout, s.base_dtype()) if s.lora
         else "Method: full fine-tuning"),
        f"Preset {preset}: mixed precision {s.mixed_precision}, 8-bit Adam {s.adam_8bit}, "
        f"gradient checkpointing {s.gradient_checkpointing}, batch {s.batch_size}, "
        f"{s.resolution} px, crop {s.crop}, flip {s.flip}",
        f"Stages {s.order}: UNet {s.unet_steps} steps at {s.unet_lr:g} ({s.unet_schedule}, "
        f"warm-up {s.unet_warmup}); text encoder {s.text_steps} steps at {s.text_lr:g} "
        f"({s.text_schedule}, warm-up {s.text_warmup})",
        f"Prior preservation {s.prior_preservation}, offset noise {s.offset_noise:g}, min-SNR "
        f"gamma {s.min_snr_gamma:g}, checkpoint every {s.checkpoint_every} (keep "
        f"{s.keep_checkpoints}), samples every {s.sample_every}, seed {s.seed}"
        + (f", a single file every {s.save_every} steps from step {s.save_from}"
           if s.save_every else ""),
    ]
    if vram:
        lines.append("Estimated peak VRAM: " + ", ".join(
            f"{'UNet' if k == 'unet' else 'text encoder'} stage {v:.1f} GiB"
            for k, v in vram.items()))
    return "\n".join(lines)
