"""Training data: the session's images and captions, the data order, and the caches.

Nothing that does not change is computed twice: VAE latents are computed once per image
(and once per flip) and prompt embeddings once per distinct caption while the text
encoder is frozen. The order of the images is a function of the seed and a position
(epoch, cursor) that a checkpoint stores, so a resumed run takes the very same batches.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastsd import drive
from fastsd.errors import DataError

log = logging.getLogger("fastsd")

CLASS_DIR = "class_images"


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str


def instance_prompt(settings: dict[str, Any]) -> str:
    """"{token} {class}" from the session's settings, e.g. "sks dog"."""
    return f"{settings.get('instance_token', 'sks')} {settings.get('class_word', 'person')}"


def instance_examples(session) -> list[Example]:
    """The top-level images of the session with their captions (or the instance prompt)."""
    from fastsd.dataset import captions, crop

    images = crop.training_images(session)
    if not images:
        raise DataError(f"No training images in {session.instance_images}. Add images to "
                        "the session first "
                        "('fastsd images import' or the images cell).")
    fallback = instance_prompt(session.settings)
    out = []
    for p in images:
        out.append(Example(p, captions.read(session, p.stem) or fallback))
    return out


def class_prompt(settings, session_settings: dict[str, Any]) -> str:
    return settings.class_prompt or f"photo of a {session_settings.get('class_word', 'person')}"


def class_examples(session, prompt: str, count: int) -> tuple[Path, list[Example]]:
    """The cached class images of ``prompt`` in the session (possibly fewer than count)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_").lower()[:60] or "class"
    folder = Path(session.path) / CLASS_DIR / slug
    have = sorted(p for p in folder.glob("*.png") if not drive.is_temporary(p)) \
        if folder.is_dir() else []
    return folder, [Example(p, prompt) for p in have[:count]]


def generate_class_images(pipe, folder: Path, prompt: str, count: int, resolution: int,
                          steps: int, seed: int, start: int = 0) -> None:
    """Generate class images ``start..count-1`` with the base model, one file each."""
    import torch
    from tqdm.auto import tqdm

    for i in tqdm(range(start, count), desc="class images", unit="img"):
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            image = pipe(prompt, num_inference_steps=steps, height=resolution,
                         width=resolution, generator=g).images[0]
        with drive.atomic_writer(folder / f"{i:05d}.png") as f:
            image.save(f, format="PNG")


# --------------------------------------------------------------------------- data order


@dataclass
class DataOrder:
    """An endless stream of indices 0..n-1, reshuffled each epoch from (seed, epoch).

    ``epoch`` and ``cursor`` are the position; save them and a new DataOrder continues
    with exactly the indices the old one would have given.
    """

    n: int
    seed: int
    epoch: int = 0
    cursor: int = 0

    def _perm(self, epoch: int) -> list[int]:
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        perm = self._perm(self.epoch)
        while len(out) < k:
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
                perm = self._perm(self.epoch)
            out.append(perm[self.cursor])
            self.cursor += 1
        return out

    def state(self) -> dict[str, int]:
        return {"n": self.n, "epoch": self.epoch, "cursor": self.cursor}

    def load(self, state: dict[str, int]) -> None:
        if state["n"] != self.n:
            raise DataError(f"The checkpoint was made with {state['n']} images, the session "
                            f"now has {self.n}. Put the images back as they were to resume, "
                            "or start a new training run.")
        self.epoch, self.cursor = state["epoch"], state["cursor"]


# --------------------------------------------------------------------------- caches


class LatentCache:
    """Tensors by key, in memory up to ``limit_bytes`` and on local disk past that."""

    def __init__(self, limit_bytes: int, spill_dir: Path | None = None) -> None:
        self.limit = limit_bytes
        self.mem: dict[Any, Any] = {}
        self.files: dict[Any, Path] = {}
        self.bytes = 0
        self._spill_dir = spill_dir
        self._tmp: str | None = None

    def _dir(self) -> Path:
        if self._spill_dir is None:
            self._tmp = tempfile.mkdtemp(prefix="fastsd-latents-")
            self._spill_dir = Path(self._tmp)
            log.info("Latent cache is over %.0f MB; spilling to %s", self.limit / 2**20,
                     self._spill_dir)
        return self._spill_dir

    def put(self, key: Any, value) -> None:
        import torch

        value = value.detach().to("cpu").contiguous()
        size = value.numel() * value.element_size()
        if self.bytes + size <= self.limit:
            self.mem[key] = value
            self.bytes += size
        else:
            path = self._dir() / f"{len(self.files):07d}.pt"
            torch.save(value, path)
            self.files[key] = path

    def get(self, key: Any):
        import torch

        if key in self.mem:
            return self.mem[key]
        return torch.load(self.files[key], weights_only=True)

    def __contains__(self, key: Any) -> bool:
        return key in self.mem or key in self.files

    def __len__(self) -> int:
        return len(self.mem) + len(self.files)

    def close(self) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def training_pixels(path: Path, resolution: int, crop: str):
    """The image as a (3, H, W) tensor in [-1, 1], its original (h, w) and the top-left
    corner of the crop (SDXL's crop conditioning).

    Centre crop: a square of ``resolution`` px. Random crop: the short side is scaled to
    ``resolution`` (the long one to a multiple of 8), and the square is cut from the
    latents at each step.
    """
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
    w, h = im.size
    scale = resolution / min(w, h)
    if crop == "center":
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
    else:
        left = top = 0
        nw = max(resolution, round(w * scale / 8) * 8)
        nh = max(resolution, round(h * scale / 8) * 8)
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    arr = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)
    return arr / 127.5 - 1.0, (h, w), (top, left)
