"""Conversion between diffusers folders and single-file checkpoints.

* :func:`to_single_file`: a diffusers folder -> one ``.safetensors`` (or ``.ckpt``) in the
  original Stable Diffusion (LDM) layout that AUTOMATIC1111, Forge and ComfyUI load.
* :func:`to_diffusers`: a single file (path or link) -> a diffusers folder.
* :func:`inspect`: what a single file is (family, precision, tensor count, EMA, kind).

The name map between the two layouts lives in :mod:`fastsd.convert.keymap`.
"""

from __future__ import annotations

from fastsd.convert.to_single import to_single_file

__all__ = ["to_single_file", "to_diffusers", "inspect"]


def __getattr__(name: str):
    if name in ("to_diffusers", "inspect"):
        from fastsd.convert import from_single

        return getattr(from_single, name)
    raise AttributeError(name)
