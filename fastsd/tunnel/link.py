"""What a notebook cell shows of a tunnel: a clickable link and a QR code for a phone."""

from __future__ import annotations

import io
import os
from pathlib import Path

from fastsd import drive


def qr_svg(url: str, scale: int = 4) -> str:
    """An inline SVG QR code of ``url``, for a phone's camera."""
    import segno

    return segno.make(url, error="m").svg_inline(scale=scale, dark="#000", light="#fff")


def qr_png(url: str, path: str | os.PathLike[str], scale: int = 6) -> Path:
    import segno

    buf = io.BytesIO()
    segno.make(url, error="m").save(buf, kind="png", scale=scale)
    return drive.atomic_write_bytes(path, buf.getvalue())


def link_html(url: str, title: str = "Open the web UI", note: str = "") -> str:
    """A clickable link and a QR code of ``url``, as HTML for a notebook cell."""
    import html

    safe = html.escape(url, quote=True)
    extra = f"<div>{html.escape(note)}</div>" if note else ""
    return (f'<div style="font-family:sans-serif"><div style="font-size:1.2em">'
            f'<a href="{safe}" target="_blank" rel="noopener">{html.escape(title)}: {safe}</a>'
            f"</div>{extra}<div>{qr_svg(url)}</div></div>")
