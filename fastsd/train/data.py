"""Training data: the session's images and captions, the data order, and the caches.

Nothing that does not change is computed twice: VAE latents are computed once per image
(and once per flip) and prompt embeddings once per distinct caption while the text
encoder is frozen. The order of the images is a function of the seed and a position
(epoch, cursor) that a checkpoint stores, so a resumed run takes the very same batches.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastsd import drive, options
from fastsd.errors import DataError

log = logging.getLogger("fastsd")

CLASS_DIR = "class_images"
SPILL_PREFIX = "fastsd-latents-"
#: Random crop: the cached latents cover the square crop plus this fraction of its side
#: on each side (where the original has it), so the crop can move.
CROP_MARGIN = 1 / 8


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
                        f"the session first: {options.run('images', session.name)}.")
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
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "cursor": self.cursor}

    def load(self, state: dict[str, int], allow_change: bool = False) -> None:
        """Continue from a saved position; with ``allow_change`` also when the number of
        items changed (the epoch goes on, its order is the new count's)."""
        if state["n"] != self.n and not allow_change:
            raise DataError(f"The checkpoint was made with {state['n']} images, the session "
                            f"now has {self.n}. Put the images back as they were to resume, "
                            "or start a new training run.")
        self.seed = state.get("seed", self.seed)
        self.epoch, self.cursor = state["epoch"], min(state["cursor"], self.n)


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
            self._tmp = tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-")
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


def clean_local_leftovers() -> int:
    """Remove the latent spill folders of processes that no longer run (a killed run's),
    and the local checkpoint/model copies older fastsd versions left in $TMPDIR."""
    n = 0
    for p in Path(tempfile.gettempdir()).glob("fastsd-*"):
        if p.name.startswith(("fastsd-ckpt-", "fastsd-model-")):
            owner = None
        elif p.name.startswith(SPILL_PREFIX):
            pid = p.name[len(SPILL_PREFIX):].split("-", 1)[0]
            owner = int(pid) if pid.isdigit() else None
            if owner is not None and drive.running(owner):
                continue
        else:
            continue
        shutil.rmtree(p, ignore_errors=True)
        n += 1
    return n


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Source:
    """Where an example's pixels come from: the file, and the square crop box in it (the
    images step's smart crop of the original; None: the centre of the file)."""

    path: Path
    box: tuple[int, int, int, int] | None = None


def sources(session, examples: list[Example]) -> list[Source]:
    """For random crop: each training image's original and its crop box, when the images
    step kept them (instance_images/originals/ and crops.json); else the image itself."""
    from fastsd.dataset import crop
    from fastsd.dataset.originals import originals as kept_originals

    record_path = session.instance_images / crop.CROPS
    record = drive.read_json(record_path) if record_path.is_file() else {}
    originals = {p.stem: p for p in kept_originals(session)}
    out = []
    for ex in examples:
        box = record.get(ex.image.stem, {}).get("box")
        orig = originals.get(ex.image.stem)
        out.append(Source(orig, tuple(box)) if orig and box else Source(ex.image))
    return out


def crop_region(w: int, h: int, box, resolution: int, margin: float = CROP_MARGIN):
    """The region of a (w, h) image to cache for a random crop around the square ``box``
    (None: the centred square that leaves ``margin`` around it), and the size it is
    resized to: (left, top, right, bottom), (width, height), a multiple of 8, at least
    ``resolution``, the box's side becoming ``resolution``."""
    if box is None:
        side = min(w, h) / (1 + 2 * margin)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    side = box[2] - box[0]
    m = side * margin
    left, top = max(0.0, box[0] - m), max(0.0, box[1] - m)
    right, bottom = min(float(w), box[2] + m), min(float(h), box[3] + m)
    scale = resolution / side
    size = (max(resolution, int((right - left) * scale) // 8 * 8),
            max(resolution, int((bottom - top) * scale) // 8 * 8))
    return (left, top, right, bottom), size, scale


def training_pixels(source: Source | Path, resolution: int, crop: str):
    """The pixels to cache for an example as a (3, H, W) tensor in [-1, 1], the original's
    (h, w), and the top-left corner of the tensor in the original scaled so that the crop
    is ``resolution`` px (SDXL's crop conditioning adds the random offset to it).

    Centre crop: the centred square of the file, ``resolution`` px. Random crop: the crop
    box with a margin (:func:`crop_region`), from which a ``resolution`` square is cut in
    latent space at each step.
    """
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    if not isinstance(source, Source):
        source = Source(Path(source))
    with Image.open(source.path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
    w, h = im.size
    if crop == "center":
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
    else:
        region, size, scale = crop_region(w, h, source.box, resolution)
        im = im.resize(size, Image.Resampling.BICUBIC, box=region)
        left, top = round(region[0] * scale), round(region[1] * scale)
    arr = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)
    return arr / 127.5 - 1.0, (h, w), (top, left)


def fingerprint(examples: list[Example], srcs: list[Source] | None = None) -> dict[str, str]:
    """A hash of each training example's pixels (file bytes, and the original and crop box
    it is cut from) and caption, by image name: what a checkpoint was trained on."""
    out = {}
    for i, ex in enumerate(examples):
        h = hashlib.sha256(ex.image.read_bytes())
        if srcs and srcs[i].path != ex.image:
            h.update(srcs[i].path.read_bytes())
            h.update(repr(srcs[i].box).encode())
        h.update(b"\0" + ex.caption.encode())
        out[ex.image.name] = h.hexdigest()[:16]
    return out


def fingerprint_changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """What differs between two fingerprints, in words (empty: nothing)."""
    out = []
    for kind, names in (("added", sorted(set(new) - set(old))),
                        ("removed", sorted(set(old) - set(new))),
                        ("changed", sorted(k for k in set(old) & set(new) if old[k] != new[k]))):
        if names:
            out.append(f"{kind}: {', '.join(names[:5])}" + (" ..." if len(names) > 5 else ""))
    return out


# --------------------------------------------------------------------------- latents


class Latents:
    """The VAE latents of every example (and of its mirror image when flipping), as the
    mean and std of the VAE's distribution, with the original's size and the cached
    region's top-left corner (see :func:`training_pixels`)."""

    def __init__(self, limit_bytes: int) -> None:
        self.cache = LatentCache(limit_bytes)
        self.meta: dict[tuple, tuple] = {}
        self.encodes = 0

    def get(self, key: tuple):
        """(mean, std, (h, w) of the original, (top, left)) of key (kind, index, flip)."""
        mean, std = self.cache.get(key).chunk(2)
        size, top_left = self.meta[key]
        return mean[0], std[0], size, top_left

    def close(self) -> None:
        self.cache.close()


def encode_latents(vae, examples: list[Example], class_examples: list[Example],
                   srcs: list[Source] | None, settings, device) -> Latents:
    """Encode each image once (twice when flipping) with the VAE on ``device``."""
    import torch
    from tqdm.auto import tqdm

    out = Latents(settings.latent_cache_mb << 20)
    flips = (False, True) if settings.flip else (False,)
    with torch.no_grad():
        for kind, exs in (("i", examples), ("c", class_examples)):
            for j, ex in enumerate(tqdm(exs, desc=f"{'instance' if kind == 'i' else 'class'}"
                                        " latents", unit="img", leave=False)):
                src = srcs[j] if srcs and kind == "i" else ex.image
                pixels, (h, w), (top, left) = training_pixels(src, settings.resolution, settings.crop)
                for flip in flips:
                    x = pixels.flip(-1) if flip else pixels
                    dist = vae.encode(x[None].to(device)).latent_dist
                    out.cache.put((kind, j, flip), torch.cat([dist.mean, dist.std]))
                    # mirrored, the region's left edge is measured from the other side
                    scaled_w = round(w * settings.resolution / _box_side(src, w, h, settings))
                    corner = (top, scaled_w - left - x.shape[-1]) if flip else (top, left)
                    out.meta[kind, j, flip] = ((h, w), corner)
                    out.encodes += 1
    return out


def _box_side(src, w: int, h: int, settings) -> float:
    """The side, in the original's pixels, of the square that becomes ``resolution``."""
    if settings.crop == "center":
        return float(min(w, h))
    box = src.box if isinstance(src, Source) else None
    return (box[2] - box[0]) if box else min(w, h) / (1 + 2 * CROP_MARGIN)


# --------------------------------------------------------------------------- batches


def step_generator(seed: int, step: int, process: int):
    """The generator of every random draw of one step of one process."""
    import torch

    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 64 + process)


@dataclass
class Batch:
    """One step's inputs on CPU: scaled latents, noise, timesteps, captions, and per
    example the crop's top-left corner in pixels and SDXL's time ids."""

    latents: Any
    noise: Any
    timesteps: Any
    captions: list[str]
    crops: list[tuple[int, int]]
    time_ids: list[list[int]]


def sample_batch(state, cache, settings, examples, class_examples, rank: int, nproc: int,
                 num_timesteps: int, scaling: float) -> Batch:
    """The batch of ``state.global_step`` for process ``rank``: the indices from the data
    order, then every random draw (flip, crop offset, latent sample, noise, timesteps)
    from the step's own generator, so a resumed run draws exactly the same."""
    import torch

    gen = step_generator(settings.seed, state.global_step, rank)
    B, res = settings.batch_size, settings.resolution
    items = [("i", j) for j in state.order.take(B * nproc)[rank * B:(rank + 1) * B]]
    if class_examples:
        items += [("c", j) for j in state.class_order.take(B * nproc)[rank * B:(rank + 1) * B]]
    lat, crops, time_ids = [], [], []
    for kind, j in items:
        flip = bool(torch.rand((), generator=gen) < 0.5) if settings.flip else False
        mean, std, (h0, w0), (top, left) = cache.get((kind, j, flip))
        if settings.crop == "random":
            size = res // 8
            oy = int(torch.randint(mean.shape[-2] - size + 1, (), generator=gen))
            ox = int(torch.randint(mean.shape[-1] - size + 1, (), generator=gen))
            mean, std = (t[:, oy:oy + size, ox:ox + size] for t in (mean, std))
            top, left = top + oy * 8, left + ox * 8
        lat.append(mean + std * torch.randn(mean.shape, generator=gen))
        crops.append((top, left))
        time_ids.append([h0, w0, top, left, res, res])
    x0 = torch.stack(lat) * scaling
    noise = torch.randn(x0.shape, generator=gen)
    if settings.offset_noise:
        noise += settings.offset_noise * torch.randn((x0.shape[0], x0.shape[1], 1, 1),
                                                     generator=gen)
    timesteps = torch.randint(0, num_timesteps, (x0.shape[0],), generator=gen)
    captions = [(examples if k == "i" else class_examples)[j].caption for k, j in items]
    return Batch(x0, noise, timesteps, captions, crops, time_ids)
