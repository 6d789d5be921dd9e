"""One generation step through the engine at each family's native size, with the memory
options the engine chooses on Colab's T4 (fp16 weights, SDPA, the savers its free VRAM
calls for), SDXL at 1024 px with its fp16-safe VAE path.

This CPU has no fp16 arithmetic worth the name (fp16 runs three times slower than bf16
here), so once the engine has loaded the model as on a T4, the UNet and the text encoders
run in bf16; the VAE decodes as loaded (fp16), through the guard of fastsd.models.vae.
The classifier-free guidance batch is left out (guidance 1): a second UNet pass would only
double the time."""

from __future__ import annotations

import numpy as np
import pytest

from realsize import cpu_compute, t4_policy

from fastsd.models import full
from fastsd.webui.catalog import Catalog
from fastsd.webui.engine import Engine
from fastsd.webui.params import GenerationParams


@pytest.mark.parametrize("family", full.FAMILIES)
def test_one_step_at_native_size_with_the_t4_memory_options(full_models, family, caplog):
    import torch

    folder = full_models[family]
    policy = t4_policy(folder)
    assert policy.fp16 and not policy.cpu_offload  # fits a free T4: fp16, no offload
    catalog = Catalog([])
    engine = Engine(catalog, policy, device="cpu")
    engine.load(catalog.add(folder))
    pipe = engine.pipeline("txt2img")
    size = engine.native_size
    assert size == full.CONFIGS[family]["resolution"]
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float16  # as on a T4
    assert engine.applied == policy
    cpu_compute(pipe)
    result = engine.generate(GenerationParams(prompt="a photo of sks dog", width=size,
                                              height=size, steps=1, cfg_scale=1.0, seed=7))
    image = np.asarray(result.images[0], dtype=np.float32)
    assert image.shape == (size, size, 3)
    assert image.std() > 1.0  # not a black (NaN) or flat image
    if family == "sdxl":  # the fp16-fixed VAE decodes in fp16, and made finite pixels
        assert pipe.vae.dtype == torch.float16 and "inf/NaN" not in caplog.text


def test_sdxl_stock_vae_decodes_1024px_in_fp32(full_models):
    """SDXL's own VAE (force_upcast) never decodes in fp16, even with fp16 weights."""
    import torch
    from diffusers import AutoencoderKL

    from fastsd.models import vae as vae_guard

    vae = AutoencoderKL.from_pretrained(full_models["sdxl"], subfolder="vae",
                                        torch_dtype=torch.float16)
    vae.register_to_config(force_upcast=True)
    vae_guard.guard(vae, vae_guard.must_upcast(vae, sdxl=True))
    latents = torch.randn(1, 4, 128, 128, generator=torch.Generator().manual_seed(0),
                          dtype=torch.float16)
    seen = []
    vae.decoder.conv_in.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    with torch.no_grad():
        image = vae.decode(latents / vae.config.scaling_factor).sample
    assert seen == [torch.float32] and image.shape == (1, 3, 1024, 1024)
    assert torch.isfinite(image).all()
