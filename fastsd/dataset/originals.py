"""Where a session's imported originals live: ``instance_images/originals/``, and their
previews: ``instance_images/previews/``.

The import writes them (:mod:`fastsd.dataset.images`); captions, crops and the contact
sheet read them through :func:`originals`; :func:`forget` removes an image's original and
preview (``fastsd.dataset.images.remove_images`` removes everything else of it). A preview
is a copy whose longest side is at most PREVIEW_SIDE pixels (about the scale training
sees), so the set check, the contact sheet and the notebook widgets never decode a 12 Mpx
original again.
"""

from __future__ import annotations

from pathlib import Path

from fastsd import drive

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic",
              ".heif"}
ORIGINALS = "originals"
PREVIEWS = "previews"
PREVIEW_SIDE = 768


def originals_dir(session) -> Path:
    return session.instance_images / ORIGINALS


def originals(session) -> list[Path]:
    """The session's imported originals, sorted by name."""
    folder = originals_dir(session)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                  and not drive.is_temporary(p))  # a half-written original is no image


def downsize(img, side: int = PREVIEW_SIDE):
    """``img`` with its longest side at most ``side`` (the same image when it is smaller)."""
    from PIL import Image

    scale = side / max(img.size)
    if scale >= 1:
        return img
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    factor = int(1 / scale)  # box-average to just above the size first: 10x faster
    if factor > 1:
        img = img.reduce(factor)
    return img.resize(size, Image.Resampling.LANCZOS)


def write_preview(session, stem: str, img) -> Path:
    """Save the preview of an image being imported (``img``: the 8-bit RGB original)."""
    path = session.instance_images / PREVIEWS / f"{stem}.png"
    with drive.atomic_writer(path) as f:
        downsize(img).save(f, format="PNG", compress_level=1)
    return path


def preview(session, original: Path) -> Path:
    """The preview of an original, made now when it is missing or older than the original
    (sessions imported before previews existed, or an original replaced by hand)."""
    from PIL import Image

    path = session.instance_images / PREVIEWS / f"{original.stem}.png"
    if path.is_file() and path.stat().st_mtime_ns >= original.stat().st_mtime_ns:
        return path
    with Image.open(original) as im:
        return write_preview(session, original.stem, im.convert("RGB"))


def forget(session, stems: set[str]) -> int:
    """Delete the originals and previews of ``stems``; returns how many files went."""
    gone = 0
    for folder in (originals_dir(session), session.instance_images / PREVIEWS):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.is_file() and p.stem in stems and p.suffix.lower() in IMAGE_EXTS:
                drive.delete(p)
                gone += 1
    return gone
