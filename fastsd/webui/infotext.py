"""AUTOMATIC1111's "parameters" text: how a generated PNG records its prompt and settings.

::

    a photo of sks cat
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 42, Size: 512x512, Model: demo

:func:`format` writes it, :func:`parse` reads it back (ours and A1111's alike), and
:func:`png_bytes` stores it in a PNG's ``parameters`` text chunk, where A1111, Forge,
ComfyUI, civitai and our own /png-info look for it.
"""

from __future__ import annotations

import io
import json
from typing import Any

NEGATIVE = "Negative prompt:"
PNG_KEY = "parameters"


def _value(v: Any) -> str:
    s = str(v)
    return json.dumps(s) if any(c in s for c in ',:"\n') else s


def format(prompt: str, negative_prompt: str, settings: dict[str, Any]) -> str:
    """The infotext of one image. ``settings`` is ordered; None values are left out."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{NEGATIVE} {negative_prompt}")
    lines.append(", ".join(f"{k}: {_value(v)}" for k, v in settings.items() if v is not None))
    return "\n".join(lines)


def _split_settings(line: str) -> dict[str, str]:
    """``Key: value, Key: "quoted, value"`` -> dict; quoted values are JSON strings."""
    out: dict[str, str] = {}
    i, n = 0, len(line)
    while i < n:
        colon = line.find(":", i)
        if colon < 0:
            break
        key = line[i:colon].strip().lstrip(",").strip()
        j = colon + 1
        while j < n and line[j] == " ":
            j += 1
        if j < n and line[j] == '"':
            k = j + 1
            while k < n and line[k] != '"':
                k += 2 if line[k] == "\\" else 1
            raw = line[j:k + 1]
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw
            end = line.find(",", k + 1)
        else:
            end = line.find(",", j)
            value = line[j:end if end >= 0 else n].strip()
        if key:
            out[key] = value
        if end < 0:
            break
        i = end + 1
    return out


def _looks_like_settings(line: str) -> bool:
    return line.startswith("Steps:") or (line.count(": ") >= 3 and "Seed:" in line)


def parse(text: str) -> dict[str, Any]:
    """Prompt, negative prompt and each setting of an infotext (values as strings)."""
    lines = text.strip().split("\n")
    settings: dict[str, str] = {}
    if lines and _looks_like_settings(lines[-1]):
        settings = _split_settings(lines.pop())
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(NEGATIVE):
            in_negative = True
            line = line[len(NEGATIVE):].strip()
        (negative if in_negative else prompt).append(line)
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **settings}


def png_bytes(image, infotext: str | None) -> bytes:
    """``image`` as PNG bytes, with the infotext in its ``parameters`` text chunk."""
    from PIL.PngImagePlugin import PngInfo

    meta = None
    if infotext is not None:
        meta = PngInfo()
        meta.add_text(PNG_KEY, infotext)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta, compress_level=4)
    return buf.getvalue()


def read_png(image) -> tuple[str, dict[str, Any]]:
    """(the ``parameters`` text or "", the other text chunks) of a PIL image."""
    items = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
    text = items.pop(PNG_KEY, "")
    return text, items
