"""Resumable checkpoints: written locally, copied whole to Drive, verified on the way back.

A checkpoint is a folder ``checkpoints/step-NNNNNNN/`` holding the weights that differ
from the base model (``*.safetensors``), the optimizer, LR scheduler, grad scaler and RNG
states (``*.pt``), the trainer's position (``state.json``), and ``manifest.json`` with the
size and sha256 of every other file, written last.

It is written to a local temporary folder first, then copied to the session with
:func:`fastsd.drive.copy_tree`, so on Drive it is whole or absent. Reading picks the newest
checkpoint whose files all match the manifest; a damaged one is skipped with a warning.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastsd import drive

log = logging.getLogger("fastsd")

FORMAT = 1
MANIFEST = "manifest.json"
STATE = "state.json"
_NAME = re.compile(r"^step-(\d{7,})$")


def folder_name(step: int) -> str:
    return f"step-{step:07d}"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Checkpoint:
    path: Path
    step: int

    @property
    def state(self) -> dict[str, Any]:
        return drive.read_json(self.path / STATE)

    def tensors(self, name: str) -> dict | None:
        """The state dict ``name`` (a safetensors file), or None when it was not saved."""
        from safetensors.torch import load

        # Read whole, never memory-mapped: a mapped page read after a Drive drop is a SIGBUS.
        f = self.path / f"{name}.safetensors"
        return load(drive.read_bytes(f)) if f.is_file() else None

    def object(self, name: str) -> Any:
        """A torch-saved object ``name`` (optimizer, scheduler, scaler, RNG), or None."""
        import torch

        f = self.path / f"{name}.pt"
        return torch.load(io.BytesIO(drive.read_bytes(f)), weights_only=True) \
            if f.is_file() else None


def save(root: Path, step: int, tensors: dict[str, dict], objects: dict[str, Any],
         state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` under ``root`` and keep only the newest ``keep``."""
    import torch
    from safetensors.torch import save_file

    local = Path(tempfile.mkdtemp(prefix="fastsd-ckpt-"))
    try:
        for name, sd in tensors.items():
            save_file({k: v.detach().to("cpu").contiguous() for k, v in sd.items()},
                      str(local / f"{name}.safetensors"))
        for name, obj in objects.items():
            if obj is not None:
                torch.save(obj, local / f"{name}.pt")
        drive.atomic_write_json(local / STATE, {**state, "format": FORMAT, "step": step})
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)}
                 for p in sorted(local.iterdir())}
        drive.atomic_write_json(local / MANIFEST, {"format": FORMAT, "step": step,
                                                    "files": files})
        dest = drive.copy_tree(local, Path(root) / folder_name(step))
    finally:
        shutil.rmtree(local, ignore_errors=True)
    prune(root, keep)
    return dest


def listing(root: Path) -> list[Checkpoint]:
    """The checkpoint folders under ``root``, oldest first (whole or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [Checkpoint(p, int(m.group(1))) for p in root.iterdir()
             if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found, key=lambda c: c.step)


def verify(ckpt: Checkpoint) -> str | None:
    """None when every file matches the manifest, else what is wrong."""
    man = ckpt.path / MANIFEST
    if not man.is_file():
        return "it has no manifest.json (the write did not finish)"
    try:
        files = drive.read_json(man)["files"]
    except (ValueError, KeyError) as e:
        return f"manifest.json is unreadable ({e})"
    if STATE not in files:
        return "the manifest does not list state.json"
    for name, meta in files.items():
        f = ckpt.path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {meta['bytes']}"
        if sha256(f) != meta["sha256"]:
            return f"{name} does not match its sha256 checksum"
    return None


def latest(root: Path) -> Checkpoint | None:
    """The newest whole checkpoint under ``root``; damaged ones are skipped, with a warning."""
    if Path(root).is_dir():
        drive.clean_temporaries(root)  # halves of copies a killed run left behind
    for ckpt in reversed(listing(root)):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        log.warning("Checkpoint %s is damaged: %s. Using the previous checkpoint instead; "
                    "the damaged one is removed.", ckpt.path.name, problem)
        shutil.rmtree(ckpt.path, ignore_errors=True)
    return None


def prune(root: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` checkpoints (damaged ones count as checkpoints)."""
    for ckpt in listing(root)[:-keep]:
        drive.delete(ckpt.path)
        log.debug("Removed old checkpoint %s", ckpt.path.name)


def clear(root: Path) -> int:
    """Remove every checkpoint under ``root`` (starting over); returns how many."""
    gone = listing(root)
    for ckpt in gone:
        drive.delete(ckpt.path)
    if Path(root).is_dir():
        drive.clean_temporaries(root)
    return len(gone)
