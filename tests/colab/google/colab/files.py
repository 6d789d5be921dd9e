"""Stand-in for ``google.colab.files``: ``upload`` takes the files in
``$COLAB_STANDIN_UPLOAD`` as if the user had picked them, writes them to the working
folder as Colab does and returns ``{name: bytes}``. With ``$COLAB_STANDIN_UPLOAD_FAIL`` set,
the browser side fails, as it does when the page's third-party cookies are blocked."""

from __future__ import annotations

import os
from pathlib import Path

from google.colab._message import MessageError

downloads: list[str] = []


def upload(target_dir: str = "") -> dict[str, bytes]:
    if os.environ.get("COLAB_STANDIN_UPLOAD_FAIL"):
        raise MessageError("TypeError: Cannot read properties of undefined (reading "
                           "'_uploadFiles')")
    src = os.environ.get("COLAB_STANDIN_UPLOAD")
    out: dict[str, bytes] = {}
    if not src:
        return out
    for p in sorted(Path(src).iterdir()):
        if p.is_file():
            data = p.read_bytes()
            (Path(target_dir or ".") / p.name).write_bytes(data)
            out[p.name] = data
    return out


def download(filename: str) -> None:
    downloads.append(filename)
