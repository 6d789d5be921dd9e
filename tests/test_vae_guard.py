"""The VAE decode in half precision (fastsd.models.vae): SDXL's own VAE never decodes in
fp16, and a black (inf/NaN) fp16 decode of any other VAE is caught and done again in fp32.

The tiny SDXL VAE is made to overflow fp16 as SDXL's real one does at 1024 px: its first
decoder convolution's weights are scaled so that its outputs pass fp16's 65504 while fp32
keeps them (the group norm after it brings them back to scale)."""

from __future__ import annotations

import logging

import pytest

from fastsd.models import vae as vae_guard

OVERFLOW = 1e4  # decoder.conv_in x this: outputs past 65504 in fp16, fine in fp32


def overflowing_vae(tiny_sdxl):
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(OVERFLOW)
    return vae


def latents():
    import torch

    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) / 0.13025


def test_a_black_fp16_decode_is_caught_and_the_vae_upcast(tiny_sdxl, caplog):
    import torch

    vae = overflowing_vae(tiny_sdxl)
    vae.register_to_config(force_upcast=False)  # says it is fp16-safe: it is not
    reference = vae.decode(latents()).sample  # fp32
    vae.half()
    assert not torch.isfinite(vae.decode(latents().half()).sample).all(), \
        "the test VAE must overflow fp16 unguarded"
    vae_guard.guard(vae, vae_guard.must_upcast(vae, sdxl=True))
    with caplog.at_level(logging.WARNING, "fastsd"):
        out = vae.decode(latents().half()).sample
    assert torch.isfinite(out).all() and vae.dtype == torch.float32
    assert torch.allclose(out, reference, atol=5e-3)  # the weights went through fp16
    assert "inf/NaN" in caplog.text
    caplog.clear()
    again = vae.decode(latents().half()).sample  # fp32 from the start now, no second try
    assert torch.isfinite(again).all() and "inf/NaN" not in caplog.text


def test_sdxl_vae_decodes_in_fp32_under_fp16_autocast(tiny_sdxl):
    """The trainer's samples on a T4: fp32 weights under fp16 autocast. diffusers upcasts
    only fp16 weights, so unguarded the decode runs in fp16 and overflows."""
    import torch

    vae = overflowing_vae(tiny_sdxl)
    assert vae.config.force_upcast is True  # SDXL's own VAE
    reference = vae.decode(latents()).sample
    with torch.autocast("cpu", dtype=torch.float16):
        assert not torch.isfinite(vae.decode(latents()).sample).all()
        vae_guard.guard(vae, vae_guard.must_upcast(vae, sdxl=True))
        out = vae.decode(latents()).sample
    assert out.dtype == torch.float32 and torch.allclose(out, reference, atol=1e-4)


def test_fp16_fixed_and_sd_vaes_keep_fp16(tiny_sdxl, tiny_sd1):
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    assert vae_guard.must_upcast(vae, sdxl=True)
    vae.register_to_config(force_upcast=False)
    assert not vae_guard.must_upcast(vae, sdxl=True)
    sd = AutoencoderKL.from_pretrained(tiny_sd1, subfolder="vae")
    assert not vae_guard.must_upcast(sd, sdxl=False)
    vae = vae_guard.guard(vae.half(), upcast=False)
    out = vae.decode(latents().half()).sample
    assert out.dtype == torch.float16 and vae.dtype == torch.float16


@pytest.mark.parametrize("force_upcast", [True, False])
def test_the_engine_pipeline_never_makes_a_black_sdxl_image(tiny_sdxl, force_upcast):
    """Through diffusers' own SDXL pipeline in fp16, as the engine sets it up
    (fastsd.webui.memory.apply): stock VAE (force_upcast) or one that wrongly claims to be
    fp16-safe, the image is finite."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline

    from fastsd.webui import memory

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, vae=overflowing_vae(tiny_sdxl))
    pipe = pipe.to(torch.float16)
    pipe.vae.register_to_config(force_upcast=force_upcast)
    pipe.set_progress_bar_config(disable=True)
    memory.apply(pipe, memory.MemoryPolicy(True, False, False, False, False), "cpu")
    image = pipe("a photo", num_inference_steps=1, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert np.isfinite(image).all() and image.max() > 0.05
