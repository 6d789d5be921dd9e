"""Fitting a picture to a size, in AUTOMATIC1111's three ways (its ``resize_mode``).

0 stretches it, 1 fills the size and crops what sticks out (centred), 2 fits it inside
and fills the rest (black). img2img's init images and masks and ControlNet's control
images all go through :func:`resize`.
"""

from __future__ import annotations

RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")


def resize(img, w: int, h: int, mode: int, resample=None):
    """``img`` at ``w`` x ``h`` by ``mode`` (0, 1 or 2), as RGB unless it is a mask ("L")."""
    from PIL import Image, ImageOps

    resample = Image.Resampling.LANCZOS if resample is None else resample
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    if img.size == (w, h):
        return img
    if mode == 1:
        return ImageOps.fit(img, (w, h), resample)
    if mode == 2:
        return ImageOps.pad(img, (w, h), resample)
    return img.resize((w, h), resample)
