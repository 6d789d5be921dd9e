"""Where a session's imported originals live: ``instance_images/originals/``.

The import writes them (:mod:`fastsd.dataset.images`); captions, crops and the contact
sheet read them through :func:`originals`.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic",
              ".heif"}
ORIGINALS = "originals"


def originals_dir(session) -> Path:
    return session.instance_images / ORIGINALS


def originals(session) -> list[Path]:
    """The session's imported originals, sorted by name."""
    folder = originals_dir(session)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
