"""Full-size Stable Diffusion pipelines with random weights, built offline from the official
configs: SD 1.5, SD 2.1 (768 px, v-prediction) and SDXL base 1.0.

They have the real architectures' every tensor name, shape and parameter count (the
registry's ``params`` are checked against them), so memory, dtype and shape paths run at
real size without downloading anything. The weights are random: images come out as noise.

What is from the public configs (the ``config.json`` files of the models' diffusers repos),
written below as data: every structural value of the UNets, VAEs and text encoders, and the
schedulers. What is not: the tokenizers. The real ones are 49,408-token BPE vocabularies
that cannot be built offline, so each pipeline gets the small byte-level CLIP tokenizer of
:mod:`fastsd.models.tiny` (the token ids it makes are all valid rows of the full-size
49,408-row embedding tables).

Saved as a user's download is: the registry fetches fp16 UNets and text encoders, and for
SD 1.5 and SDXL an fp32 VAE override (sd-vae-ft-mse; SDXL's fp16-fix VAE, whose config says
``force_upcast: false``), so those are stored the same way.

The models are built once into a cache folder outside the repository
(``$FASTSD_FULL_CACHE``, default ``~/.cache/fastsd-full``), one component at a time (the
SDXL build peaks at about one fp16 SDXL UNet in RAM), and reused after; each folder's marker
records how long it took to build and its size on disk.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from fastsd import drive
from fastsd.errors import ModelError

log = logging.getLogger("fastsd")

FAMILIES = ("sd1", "sd2", "sdxl")
NAMES = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}  # the registry entries they mirror
FULL_VERSION = 1
MARKER = "fastsd_full.json"
CACHE_ENV = "FASTSD_FULL_CACHE"

_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
               num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
               hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5)
_OPENCLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                   num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77,
                   hidden_act="gelu", projection_dim=512, layer_norm_eps=1e-5)
_OPENCLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                      num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
                      hidden_act="gelu", projection_dim=1280, layer_norm_eps=1e-5)
_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), norm_num_groups=32, act_fn="silu",
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4)
_SD_UNET = dict(
    in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    norm_num_groups=32, norm_eps=1e-5, act_fn="silu", downsample_padding=1,
    flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1, center_input_sample=False)
_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              num_train_timesteps=1000, steps_offset=1)

#: Each family: the pipeline class, its components (class, config, saved dtype) and the
#: tokenizers' pad tokens. Values from the official diffusers configs of
#: stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1 and
#: stabilityai/stable-diffusion-xl-base-1.0.
CONFIGS: dict[str, dict[str, Any]] = {
    "sd1": {
        "pipeline": "StableDiffusionPipeline", "resolution": 512,
        "unet": dict(_SD_UNET, sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        "vae": dict(_VAE, sample_size=512, scaling_factor=0.18215),
        "text_encoder": ("CLIPTextModel", _CLIP_L),
        "tokenizers": {"tokenizer": "<|endoftext|>"},
        "scheduler": ("PNDMScheduler", dict(_BETAS, skip_prk_steps=True, set_alpha_to_one=False,
                                            prediction_type="epsilon")),
        "dtypes": {"unet": "float16", "text_encoder": "float16", "vae": "float32"},
    },
    "sd2": {
        "pipeline": "StableDiffusionPipeline", "resolution": 768,
        "unet": dict(_SD_UNET, sample_size=96, cross_attention_dim=1024,
                     attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                     upcast_attention=True),
        "vae": dict(_VAE, sample_size=768, scaling_factor=0.18215),
        "text_encoder": ("CLIPTextModel", _OPENCLIP_H),
        "tokenizers": {"tokenizer": "!"},
        "scheduler": ("DDIMScheduler", dict(_BETAS, clip_sample=False, set_alpha_to_one=False,
                                            prediction_type="v_prediction")),
        "dtypes": {"unet": "float16", "text_encoder": "float16", "vae": "float16"},
    },
    "sdxl": {
        "pipeline": "StableDiffusionXLPipeline", "resolution": 1024,
        "unet": dict(
            in_channels=4, out_channels=4, layers_per_block=2, sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            addition_embed_type_num_heads=64, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
            downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
            center_input_sample=False),
        # the fp16-fix VAE the registry puts in SDXL's place: same shapes, no forced upcast
        "vae": dict(_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=False),
        "text_encoder": ("CLIPTextModel", _CLIP_L),
        "text_encoder_2": ("CLIPTextModelWithProjection", _OPENCLIP_BIGG),
        "tokenizers": {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"},
        "scheduler": ("EulerDiscreteScheduler", dict(
            _BETAS, prediction_type="epsilon", interpolation_type="linear",
            timestep_spacing="leading", use_karras_sigmas=False)),
        "dtypes": {"unet": "float16", "text_encoder": "float16", "text_encoder_2": "float16",
                   "vae": "float32"},
    },
}


def cache_root() -> Path:
    """Where the full-size models are kept: ``$FASTSD_FULL_CACHE``, else ~/.cache/fastsd-full."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fastsd-full"


def _init_(module, seed: int) -> None:
    """Random weights of the scale a trained network has, so that activations stay in fp16's
    range through the whole depth: linear and convolution weights ~ N(0, 1/fan_in), biases
    0, norm scales 1, embeddings ~ N(0, 0.02). Deterministic from ``seed``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                if isinstance(m, torch.nn.Embedding):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                elif p.dim() == 1:
                    p.fill_(1.0 if name == "weight" and "Norm" in type(m).__name__ else 0.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            for name, b in m.named_buffers(recurse=False):
                if name == "position_ids":
                    b.copy_(torch.arange(b.shape[-1]).expand_as(b))


def _empty(make, dtype: str):
    """A module built without memory on the meta device, then given uninitialised CPU
    storage in ``dtype``: never a full fp32 copy first."""
    import torch

    with torch.device("meta"):
        module = make()
    return module.to(getattr(torch, dtype)).to_empty(device="cpu")


def _component(family: str, name: str, tokenizers: dict):
    """(module, kind) of one weighted component, random and in its saved dtype."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cfg = CONFIGS[family]
    dtype = cfg["dtypes"][name]
    if name == "unet":
        return _empty(lambda: UNet2DConditionModel(**cfg["unet"]), dtype)
    if name == "vae":
        return _empty(lambda: AutoencoderKL(**cfg["vae"]), dtype)
    import transformers

    cls_name, text = cfg[name]
    tok = tokenizers["tokenizer" if name == "text_encoder" else "tokenizer_2"]
    config = transformers.CLIPTextConfig(**text, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id)
    return _empty(lambda: getattr(transformers, cls_name)(config), dtype)


def components(family: str) -> list[str]:
    return [k for k in ("unet", "vae", "text_encoder", "text_encoder_2") if k in CONFIGS[family]]


def build(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build the full-size ``family`` pipeline into ``out_dir`` (diffusers layout), one
    component in memory at a time; the marker, written last, records the build."""
    import diffusers

    from fastsd.models import tiny

    if family not in FAMILIES:
        raise ModelError(f"Unknown model family {family!r}; choose one of {FAMILIES}.")
    cfg = CONFIGS[family]
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    tokenizers = {k: tiny.build_clip_tokenizer(pad_token=pad)
                  for k, pad in cfg["tokenizers"].items()}
    index: dict[str, Any] = {"_class_name": cfg["pipeline"],
                             "_diffusers_version": diffusers.__version__}
    with drive.folder_writer(out_dir) as tmp:
        for i, name in enumerate(components(family)):
            module = _component(family, name, tokenizers)
            _init_(module, seed * 1000 + i)
            module.save_pretrained(tmp / name, safe_serialization=True)
            lib = "diffusers" if name in ("unet", "vae") else "transformers"
            index[name] = [lib, type(module).__name__]
            del module
        for name, tok in tokenizers.items():
            tok.save_pretrained(tmp / name)
            index[name] = ["transformers", "CLIPTokenizer"]
        sched_name, sched_cfg = cfg["scheduler"]
        getattr(diffusers, sched_name)(**sched_cfg).save_pretrained(tmp / "scheduler")
        index["scheduler"] = ["diffusers", sched_name]
        if family == "sdxl":
            index.update(force_zeros_for_empty_prompt=True, feature_extractor=[None, None],
                         image_encoder=[None, None])
        else:
            index.update(safety_checker=[None, None], feature_extractor=[None, None],
                         requires_safety_checker=False)
        drive.atomic_write_json(tmp / "model_index.json", index)
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        drive.atomic_write_json(tmp / MARKER, {
            "family": family, "seed": seed, "version": FULL_VERSION, "bytes": size,
            "build_s": round(time.perf_counter() - t0, 1)})
    log.info("Built the full-size %s model in %s (%.2f GB, %.0f s)", family, out_dir,
             size / 1e9, time.perf_counter() - t0)
    return out_dir


def record(path: Path) -> dict | None:
    """The marker of a built model (family, seed, build time, bytes), or None."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    meta = drive.read_json(marker)
    return meta if meta.get("version") == FULL_VERSION else None


def ensure(family: str, root: str | Path | None = None, seed: int = 0) -> Path:
    """The folder of the full-size ``family`` model under ``root`` (default
    :func:`cache_root`), built when missing or stale."""
    path = Path(root or cache_root()) / (NAMES.get(family, family)
                                         + ("" if seed == 0 else f"-seed{seed}"))
    meta = record(path)
    if meta is not None and meta.get("seed") == seed:
        return path
    return build(family, path, seed)
