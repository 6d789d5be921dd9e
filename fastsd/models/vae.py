"""The VAE decode, safe in half precision.

SDXL's own VAE overflows fp16 at 1024 px: its decode in fp16 makes inf, then NaN, and the
image comes out black. diffusers' SDXL pipelines upcast it to fp32 for the decode when its
config says ``force_upcast``, but only when the VAE's weights are fp16: under fp16 autocast
(the trainer's samples on a T4) its weights are fp32, nothing is upcast, and autocast runs
every convolution in fp16 all the same. The fp16-fixed VAE (``force_upcast: false`` in its
config) is the one that may decode in fp16.

:func:`guard` wraps a VAE's ``decode`` so that

* a VAE that must be upcast decodes in fp32 with autocast off, whatever the weights' dtype
  or the autocast around it;
* any other half-precision decode is checked, and one that made inf or NaN is caught: the
  VAE moves to fp32 for good (the next images decode in fp32 from the start) and the
  latents are decoded again.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger("fastsd")

GUARDED = "_fastsd_decode_guard"


def must_upcast(vae, sdxl: bool) -> bool:
    """Whether ``vae`` must decode in fp32: SDXL's VAE unless its config says it is the
    fp16-fixed one (``force_upcast`` false)."""
    return bool(sdxl and getattr(vae.config, "force_upcast", True))


def _autocast_fp16(device_type: str) -> bool:
    """Whether fp16 autocast is on for ``device_type`` (torch 2.4's API, or the older one)."""
    import torch

    if hasattr(torch, "get_autocast_dtype"):
        return (torch.is_autocast_enabled(device_type)
                and torch.get_autocast_dtype(device_type) == torch.float16)
    if device_type == "cpu":
        return torch.is_autocast_cpu_enabled() and \
            torch.get_autocast_cpu_dtype() == torch.float16
    return torch.is_autocast_enabled() and torch.get_autocast_gpu_dtype() == torch.float16


def _half(vae, device_type: str) -> bool:
    import torch

    if vae.dtype in (torch.float16, torch.bfloat16):
        return vae.dtype == torch.float16
    return _autocast_fp16(device_type)


def _sample(out) -> Any:
    return out[0] if isinstance(out, tuple) else out.sample


def guard(vae, upcast: bool) -> Any:
    """Make ``vae.decode`` safe in fp16 (see the module's docstring); returns ``vae``.
    ``upcast``: always decode in fp32 (:func:`must_upcast`). Guarding twice changes
    nothing but ``upcast``."""
    import torch

    original = getattr(vae, GUARDED, None) or vae.decode

    def fp32(z, *args, **kwargs):
        if vae.dtype != torch.float32:
            vae.to(torch.float32)
        with torch.autocast(z.device.type, enabled=False):
            return original(z.float(), *args, **kwargs)

    @functools.wraps(original)
    def decode(z, *args, **kwargs):
        if not _half(vae, z.device.type):
            return original(z.to(vae.dtype), *args, **kwargs)
        if upcast:
            return fp32(z, *args, **kwargs)
        out = original(z.to(vae.dtype) if vae.dtype == torch.float16 else z, *args, **kwargs)
        if torch.isfinite(_sample(out)).all():
            return out
        log.warning("The VAE made inf/NaN pixels in fp16 (a black image): decoding again in "
                    "fp32, and from now on. Use an fp16-fixed VAE to keep fp16.")
        return fp32(z, *args, **kwargs)

    vae.decode = decode
    setattr(vae, GUARDED, original)
    return vae
