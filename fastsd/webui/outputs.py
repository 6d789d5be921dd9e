"""Where generated images go: the session's outputs/, as A1111 lays them out.

``outputs/txt2img-images/2026-11-25/00012-1234.png``: a running number and the seed. Each
PNG carries its infotext and is written atomically (whole or absent), before the response
that returns it is sent.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from fastsd import drive

_NUMBERED = re.compile(r"^(\d{5})-")


class Outputs:
    """Names and writes images under ``root``; safe to call from many threads."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock = threading.Lock()
        self._next: dict[Path, int] = {}

    def folder(self, mode: str) -> Path:
        kind = "txt2img" if mode == "txt2img" else "img2img"
        return self.root / f"{kind}-images" / time.strftime("%Y-%m-%d")

    def reserve(self, mode: str, seeds: list[int]) -> list[Path]:
        """New file names for ``seeds``' images, never handed out twice."""
        folder = self.folder(mode)
        with self._lock:
            if folder not in self._next:
                numbers = [int(m.group(1)) for p in folder.glob("*.png")
                           if (m := _NUMBERED.match(p.name))] if folder.is_dir() else []
                self._next[folder] = max(numbers, default=-1) + 1
            first = self._next[folder]
            self._next[folder] += len(seeds)
        return [folder / f"{first + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]

    def write(self, paths: list[Path], pngs: list[bytes]) -> list[Path]:
        for path, data in zip(paths, pngs):
            drive.retry(lambda p=path, d=data: drive.atomic_write_bytes(p, d),
                        f"Saving {path.name}")
        return paths
