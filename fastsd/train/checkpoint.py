"""Resumable checkpoints: snapshotted at the step, written to Drive in the background, and
verified while they are read back.

A checkpoint is a folder ``checkpoints/step-NNNNNNN/`` holding the weights that differ
from the base model (``*.safetensors``), the optimizer, LR scheduler, grad scaler and RNG
states (``*.pt``), the trainer's position (``state.json``), and ``manifest.json`` with the
size and sha256 of every other file, written last.

Writing. :func:`capture` copies what is saved to CPU memory at the step (the only part
the training loop waits for); :class:`Writer` serialises the snapshot and writes it on
Drive in a background thread while the next steps run. Each file is hashed from the bytes
as they are written, into a temporary folder beside the target that is renamed whole, so
on Drive a checkpoint is whole or absent and a kill at any moment leaves the previous one
usable. Only once the new one is renamed into place and read back (sizes and hashes) are
the checkpoints beyond ``keep`` removed. A second checkpoint due before the first is on
Drive waits for it. Nothing is written to local disk.

Reading. :func:`latest` loads the newest checkpoint whose files match the manifest,
hashing each file while it is read: one pass over Drive. A damaged one is skipped with a
warning and removed.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastsd import drive
from fastsd.errors import DataError

log = logging.getLogger("fastsd")

FORMAT = 2
MANIFEST = "manifest.json"
STATE = "state.json"
_NAME = re.compile(r"^step-(\d{7,})$")


def folder_name(step: int) -> str:
    return f"step-{step:07d}"


# --------------------------------------------------------------------------- snapshot


def to_cpu(obj: Any) -> Any:
    """A deep copy of ``obj`` with every tensor copied to CPU memory (nothing shared with
    the live model or optimizer, so training may go on while it is written)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


@dataclass
class Snapshot:
    """What a checkpoint holds, in CPU memory: state dicts, torch objects and the state."""

    step: int
    tensors: dict[str, dict]
    objects: dict[str, Any]
    state: dict[str, Any]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for sd in self.tensors.values()
                   for t in sd.values())


def capture(step: int, tensors: dict[str, dict], objects: dict[str, Any],
             state: dict[str, Any]) -> Snapshot:
    return Snapshot(step, to_cpu(tensors), {k: to_cpu(v) for k, v in objects.items()
                                            if v is not None}, copy.deepcopy(state))


def _serialise(snap: Snapshot) -> dict[str, bytes]:
    import json

    import torch
    from safetensors.torch import save as st_save

    files = {f"{n}.safetensors": st_save({k: v.contiguous() for k, v in sd.items()})
             for n, sd in snap.tensors.items()}
    for name, obj in snap.objects.items():
        buf = io.BytesIO()
        torch.save(obj, buf)
        files[f"{name}.pt"] = buf.getvalue()
    state = {**snap.state, "format": FORMAT, "step": snap.step}
    files[STATE] = (json.dumps(state, indent=2, sort_keys=True) + "\n").encode()
    return files


def write(root: Path, snap: Snapshot, keep: int) -> Path:
    """Write ``snap`` as checkpoint ``step`` under ``root`` (whole or not at all), check it
    read back, then keep only the newest ``keep``."""
    root = Path(root)
    dest = root / folder_name(snap.step)
    files = _serialise(snap)
    manifest = {"format": FORMAT, "step": snap.step, "files": {}}
    with drive.atomic_folder(dest) as tmp:
        for name, data in files.items():
            drive.retry(lambda: drive.atomic_write_bytes(tmp / name, data),
                        f"Writing {name} of checkpoint {dest.name}")
            manifest["files"][name] = {"bytes": len(data),
                                       "sha256": hashlib.sha256(data).hexdigest()}
        drive.atomic_write_json(tmp / MANIFEST, manifest)
    # Drive may drop (and be remounted) while this runs beside training: the read back and
    # the removal of older checkpoints retry like the writes
    problem = drive.retry(lambda: Checkpoint(dest, snap.step).check(),
                          f"Reading checkpoint {dest.name} back")
    if problem:
        raise DataError(f"Checkpoint {dest} reads back wrong: {problem}. The previous "
                        "checkpoint is kept; check Drive's free space and connection.")
    drive.retry(lambda: prune(root, keep), f"Removing checkpoints older than {dest.name}")
    return dest


class Writer:
    """Writes checkpoints in a background thread, one at a time.

    :meth:`submit` waits for the previous write (re-raising its error), then starts the
    next one and returns at once. :meth:`wait` waits for the write under way. ``waited_s``
    adds up the time the training loop spent waiting in either.
    """

    def __init__(self, background: bool = True) -> None:
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last: Path | None = None
        self.waited_s = 0.0

    def _run(self, root: Path, snap: Snapshot, keep: int) -> None:
        try:
            self.last = write(root, snap, keep)
            log.debug("Checkpoint %s is on Drive", self.last.name)
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e

    def wait(self) -> Path | None:
        t0 = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.waited_s += time.perf_counter() - t0
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self.last

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """A write under way is finished (it is a whole, consistent checkpoint) even when
        the run stops on an error; its own error is raised only when there is no other."""
        if exc_type is None:
            self.wait()
        elif self._thread is not None:
            self._thread.join()

    def submit(self, root: Path, snap: Snapshot, keep: int) -> Path:
        self.wait()
        if not self.background:
            t0 = time.perf_counter()
            self._run(root, snap, keep)
            self.waited_s += time.perf_counter() - t0
            return self.wait() or Path(root) / folder_name(snap.step)
        self._thread = threading.Thread(target=self._run, args=(Path(root), snap, keep),
                                        name=f"fastsd-checkpoint-{snap.step}", daemon=True)
        self._thread.start()
        return Path(root) / folder_name(snap.step)


# --------------------------------------------------------------------------- reading


class Damaged(Exception):
    """A checkpoint whose files do not match its manifest."""


@dataclass
class Checkpoint:
    """A checkpoint folder on disk; :meth:`load` reads it whole, checking every file."""

    path: Path
    step: int
    state: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, dict] = field(default_factory=dict)
    objects: dict[str, Any] = field(default_factory=dict)

    def _files(self) -> dict[str, dict]:
        man = self.path / MANIFEST
        if not man.is_file():
            raise Damaged("it has no manifest.json (the write did not finish)")
        try:
            files = drive.read_json(man)["files"]
        except (ValueError, KeyError) as e:
            raise Damaged(f"manifest.json is unreadable ({e})") from e
        if STATE not in files:
            raise Damaged("the manifest does not list state.json")
        return files

    def _read(self, name: str, meta: dict) -> bytes:
        f = self.path / name
        if not f.is_file():
            raise Damaged(f"{name} is missing")
        data = drive.read_bytes(f)  # whole, never memory-mapped from Drive
        if len(data) != meta["bytes"]:
            raise Damaged(f"{name} has {len(data)} bytes, the manifest says {meta['bytes']}")
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise Damaged(f"{name} does not match its sha256 checksum")
        return data

    def check(self) -> str | None:
        """None when every file matches the manifest, else what is wrong."""
        try:
            for name, meta in self._files().items():
                self._read(name, meta)
        except Damaged as e:
            return str(e)
        return None

    def load(self) -> "Checkpoint":
        """Read every file once, hashing it as it is read, and keep what it holds."""
        import json

        import torch
        from safetensors.torch import load as st_load

        for name, meta in self._files().items():
            data = self._read(name, meta)
            stem = name.rsplit(".", 1)[0]
            if name == STATE:
                self.state = json.loads(data)
            elif name.endswith(".safetensors"):
                self.tensors[stem] = st_load(data)
            elif name.endswith(".pt"):
                self.objects[stem] = torch.load(io.BytesIO(data), weights_only=True)
        return self

    def object(self, name: str) -> Any:
        return self.objects.get(name)


def listing(root: Path) -> list[Checkpoint]:
    """The checkpoint folders under ``root``, oldest first (whole or not), unread."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [Checkpoint(p, int(m.group(1))) for p in root.iterdir()
             if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found, key=lambda c: c.step)


def verify(ckpt: Checkpoint) -> str | None:
    """None when every file of ``ckpt`` matches its manifest, else what is wrong."""
    return ckpt.check()


def latest(root: Path) -> Checkpoint | None:
    """The newest whole checkpoint under ``root``, loaded; damaged ones are skipped (and
    removed) with a warning."""
    if Path(root).is_dir():
        drive.clean_temporaries(root)  # halves of writes a killed run left behind
    for ckpt in reversed(listing(root)):
        try:
            return ckpt.load()
        except Damaged as e:
            log.warning("Checkpoint %s is damaged: %s. Using the previous checkpoint "
                        "instead; the damaged one is removed.", ckpt.path.name, e)
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


def save(root: Path, step: int, tensors: dict[str, dict], objects: dict[str, Any],
         state: dict[str, Any], keep: int) -> Path:
    """Write a checkpoint synchronously (snapshot and write in one call)."""
    return write(root, capture(step, tensors, objects, state), keep)
