"""Tiny, randomly initialised Stable Diffusion pipelines, built offline from configs.

They use the real architectures' component classes and tensor names (same block layout
as SD 1.x, SD 2.x and SDXL, with few channels), so the training loop, the converter and
the web UI run on them exactly as on the real weights. Each builds in a few seconds,
deterministically from a seed, and weighs a few MB. Beside them: a tiny ControlNet for each
family (:func:`ensure_controlnet`, its encoder shaped like that family's tiny UNet) and a
tiny SDXL refiner (:func:`ensure_refiner`, the refiner's layout: one text encoder, the
aesthetic-score conditioning).

The tokenizers are CLIP byte-level BPE tokenizers whose small vocabulary is learned here
from a fixed word list, so they tokenize any text (unknown words fall back to bytes).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from fastsd import drive
from fastsd.errors import ModelError

log = logging.getLogger("fastsd")

FAMILIES = ("sd1", "sd2", "sdxl")
TINY_VERSION = 2
MARKER = "fastsd_tiny.json"
RESOLUTION = 64  # pixels; the VAE downsamples by 8 like the real ones

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WORDS = """a an the of in on at with and by photo picture portrait painting drawing image
sks ohwx zwx person man woman boy girl child face dog cat pet puppy kitten bird horse
toy car house tree flower style art close up high quality detailed sharp blurry smiling
red green blue black white yellow brown sitting standing walking looking camera beach
forest city street snow mountain sky sunset studio light background wearing hat shirt
glasses astronaut coffee rocket cup table grass water field old young happy""".split()


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses to stand for the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _learn_merges(words: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on a word list, each word ending in '</w>'. Deterministic."""
    seqs = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in words]
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for s in seqs:
            pairs.update(zip(s, s[1:]))
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        merged = []
        for s in seqs:
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            merged.append(tuple(out))
        seqs = merged
    return merges


def build_clip_tokenizer(pad_token: str = EOS):
    """A working CLIPTokenizer with a small learned vocabulary (about 700 tokens)."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges = _learn_merges(WORDS, 200)
    tokens += ["".join(m) for m in merges]
    vocab: dict[str, int] = {}
    for t in tokens + [BOS, EOS]:
        vocab.setdefault(t, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token,
                         model_max_length=77)


# SDXL's second text encoder is wider than its first (1280 against 768), and diffusers'
# single-file loader tells them apart by width, so the tiny ones differ too.
TEXT_WIDTH, TEXT2_WIDTH = 32, 48


def _text_config(tokenizer, hidden_act: str, width: int = TEXT_WIDTH):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        hidden_act=hidden_act, projection_dim=width, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64), norm_num_groups=32, sample_size=RESOLUTION,
        scaling_factor=scaling_factor)


def _sd_unet(v2: bool):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, norm_num_groups=32,
        attention_head_dim=(2, 4, 8, 8) if v2 else 2, use_linear_projection=v2)


def _sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4), use_linear_projection=True,
        cross_attention_dim=TEXT_WIDTH + TEXT2_WIDTH,
        norm_num_groups=32, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=TEXT2_WIDTH + 6 * 8)


def _sd_scheduler_config(v_prediction: bool) -> dict:
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                num_train_timesteps=1000, steps_offset=1,
                prediction_type="v_prediction" if v_prediction else "epsilon")


def build_pipeline(family: str, seed: int = 0):
    """Build the tiny pipeline of ``family`` ("sd1", "sd2" or "sdxl") in memory."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if family not in FAMILIES:
        raise ModelError(f"Unknown tiny model family {family!r}; choose one of {FAMILIES}.")

    def seeded(i: int):
        torch.manual_seed(seed * 1000 + i)

    if family in ("sd1", "sd2"):
        from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

        v2 = family == "sd2"
        tok = build_clip_tokenizer(pad_token="!" if v2 else EOS)
        seeded(1)
        text_encoder = CLIPTextModel(_text_config(tok, "gelu" if v2 else "quick_gelu"))
        seeded(2)
        vae = _vae(0.18215)
        seeded(3)
        unet = _sd_unet(v2)
        sched_cls = DDIMScheduler if v2 else PNDMScheduler
        extra = ({"clip_sample": False} if v2 else {"skip_prk_steps": True})
        extra["set_alpha_to_one"] = False
        scheduler = sched_cls(**_sd_scheduler_config(v2), **extra)
        return StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tok = build_clip_tokenizer()
    tok2 = build_clip_tokenizer(pad_token="!")
    seeded(1)
    te1 = CLIPTextModel(_text_config(tok, "quick_gelu"))
    seeded(4)
    te2 = CLIPTextModelWithProjection(_text_config(tok2, "gelu", TEXT2_WIDTH))
    seeded(2)
    vae = _vae(0.13025)
    vae.register_to_config(force_upcast=True)
    seeded(3)
    unet = _sdxl_unet()
    scheduler = EulerDiscreteScheduler(**_sd_scheduler_config(False), timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False)


#: The widest UNet block of a tiny model (and of its ControlNet); a real model's narrowest
#: has 320 channels.
TINY_MAX_WIDTH = 64


def is_tiny(config: dict) -> bool:
    """Whether a UNet's or a ControlNet's ``config`` is one of the tiny test architectures
    built here (or a model trained from one): its widest block has at most TINY_MAX_WIDTH
    channels."""
    widths = config.get("block_out_channels") or ()
    return bool(widths) and max(widths) <= TINY_MAX_WIDTH


def is_tiny_model(folder: str | Path) -> bool:
    """Whether the diffusers folder ``folder`` holds a tiny test model (by its UNet)."""
    config = Path(folder) / "unet" / "config.json"
    return config.is_file() and is_tiny(drive.read_json(config))


def _unet_of(family: str):
    return _sdxl_unet() if family == "sdxl" else _sd_unet(family == "sd2")


def build_controlnet(family: str, seed: int = 0):
    """A tiny ControlNet for the tiny ``family`` model, in memory. Its zero convolutions
    (zero at the start of a real training) get small random weights, and its control-image
    encoder He-initialised ones, so that what it adds depends on the control image, as a
    trained ControlNet's does."""
    import torch
    from diffusers import ControlNetModel

    if family not in FAMILIES:
        raise ModelError(f"Unknown tiny model family {family!r}; choose one of {FAMILIES}.")
    torch.manual_seed(seed * 1000 + 7)
    net = ControlNetModel.from_unet(_unet_of(family), load_weights_from_unet=False,
                                    conditioning_embedding_out_channels=(8, 16, 16, 32))
    embedding = net.controlnet_cond_embedding
    with torch.no_grad():
        for conv in [embedding.conv_in, *embedding.blocks]:
            torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, embedding.conv_out]:
            conv.weight.normal_(0.0, 0.05)
            conv.bias.normal_(0.0, 0.05)
    return net


def build_refiner(seed: int = 0):
    """A tiny SDXL refiner in memory: SDXL's second text encoder only, and a UNet whose
    added conditioning carries the aesthetic score (5 numbers where the base has 6)."""
    import torch
    from diffusers import (EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModelWithProjection

    tok2 = build_clip_tokenizer(pad_token="!")
    torch.manual_seed(seed * 1000 + 4)
    te2 = CLIPTextModelWithProjection(_text_config(tok2, "gelu", TEXT2_WIDTH))
    torch.manual_seed(seed * 1000 + 2)
    vae = _vae(0.13025)
    vae.register_to_config(force_upcast=True)
    torch.manual_seed(seed * 1000 + 5)
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4), use_linear_projection=True,
        cross_attention_dim=TEXT2_WIDTH, norm_num_groups=32, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=TEXT2_WIDTH + 5 * 8)
    scheduler = EulerDiscreteScheduler(**_sd_scheduler_config(False), timestep_spacing="leading")
    return StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None, tokenizer_2=tok2,
        unet=unet, scheduler=scheduler, requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False)


def _save(model, out_dir: Path, meta: dict) -> Path:
    with drive.folder_writer(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        drive.atomic_write_json(tmp / MARKER, {**meta, "version": TINY_VERSION})
    log.info("Built tiny %s in %s", meta["kind"], out_dir)
    return out_dir


def _fresh(folder: Path, seed: int) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    meta = drive.read_json(marker)
    return meta.get("version") == TINY_VERSION and meta.get("seed") == seed


def ensure_controlnet(family: str, folder: str | Path, seed: int = 0) -> Path:
    """The tiny ControlNet of ``family`` saved (diffusers layout) in ``folder``, built when
    missing or stale."""
    folder = Path(folder)
    if _fresh(folder, seed):
        return folder
    return _save(build_controlnet(family, seed), folder,
                 {"kind": "controlnet", "family": family, "seed": seed})


def ensure_refiner(root: str | Path, seed: int = 0) -> Path:
    """The folder of the tiny SDXL refiner under ``root``, built when missing or stale."""
    folder = Path(root) / ("tiny-sdxl-refiner" + ("" if seed == 0 else f"-seed{seed}"))
    if _fresh(folder, seed):
        return folder
    return _save(build_refiner(seed), folder, {"kind": "sdxl refiner", "family": "sdxl",
                                               "seed": seed})


def build(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny ``family`` pipeline and save it in diffusers format to ``out_dir``."""
    return _save(build_pipeline(family, seed), Path(out_dir),
                 {"kind": f"{family} model", "family": family, "seed": seed})


def ensure(family: str, root: str | Path, seed: int = 0) -> Path:
    """The folder of the tiny ``family`` model under ``root``, built when missing or stale."""
    path = Path(root) / (f"tiny-{family}" + ("" if seed == 0 else f"-seed{seed}"))
    return path if _fresh(path, seed) else build(family, path, seed)
