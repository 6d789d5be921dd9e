"""Resumable checkpoints: snapshotted at the step, written to Drive in the background, and
verified while they are read back.

A checkpoint is a folder ``checkpoints/step-NNNNNNN/`` holding the weights that differ
from the base model (``*.safetensors``), the optimizer, LR scheduler, grad scaler and RNG
states (``*.pt``), the trainer's position (``state.json``), and ``manifest.json`` with the
size and sha256 of every other file, written last.

Writing. :func:`capture` copies what is saved to CPU memory at the step (the only part
the training loop waits for); :class:`Writer` writes that snapshot on Drive in a background
thread while the next steps run. A checkpoint due before the previous one is on Drive
waits for it before it is captured, so there is never more than one snapshot in memory.
The snapshot is the only copy: each tensor's bytes go from it straight to the file (no
serialised copy of the checkpoint), hashed as they are written, into a temporary folder
beside the target that is renamed whole, so on Drive a checkpoint is whole or absent and a
kill at any moment leaves the previous one usable. Only once the new checkpoint is renamed
into place and read back (sizes and hashes, in 1 MB pieces) are the checkpoints beyond
``keep`` removed.
Nothing is written to local disk.

Reading. :func:`latest` returns the newest checkpoint whose files all match the manifest
(hashed in 1 MB pieces, nothing kept) with its ``state.json``; a damaged one is skipped
with a warning and removed. Its weights (``tensors``) and objects (``objects``) are read
when they are used, one file at a time (hashed again as they are read): a resume holds the
checkpoint's weights only while it copies them into the model, never beside the whole
model as it loads.
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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from fastsd import drive
from fastsd.errors import DataError

log = logging.getLogger("fastsd")

FORMAT = 2
MANIFEST = "manifest.json"
STATE = "state.json"
_NAME = re.compile(r"^step-(\d{7,})$")
CHUNK = 1 << 20  # bytes per read and per hash update


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


class _Hashing:
    """A file object that hashes and counts what is written through it."""

    def __init__(self, f) -> None:
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.n += len(memoryview(b).cast("B"))
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def _write_safetensors(f, sd: dict) -> None:
    """A state dict as .safetensors, each tensor's bytes written from the tensor itself."""
    from fastsd.convert.tensors import Info, dtype_name, safetensors_header, tensor_bytes

    items = [(k, v.contiguous()) for k, v in sd.items()]
    f.write(safetensors_header([(k, Info(dtype_name(v.dtype), tuple(v.shape)))
                                for k, v in items]))
    for _, v in items:
        f.write(tensor_bytes(v))


def _files(snap: Snapshot) -> dict[str, Callable[[Any], None]]:
    """Each file of the checkpoint: name -> a function that writes it to a file object."""
    import json

    import torch

    files: dict[str, Callable[[Any], None]] = {}
    for n, sd in snap.tensors.items():
        files[f"{n}.safetensors"] = lambda f, sd=sd: _write_safetensors(f, sd)
    for name, obj in snap.objects.items():
        files[f"{name}.pt"] = lambda f, obj=obj: torch.save(obj, f)
    state = {**snap.state, "format": FORMAT, "step": snap.step}
    text = (json.dumps(state, indent=2, sort_keys=True) + "\n").encode()
    files[STATE] = lambda f: f.write(text)
    return files


def write(root: Path, snap: Snapshot, keep: int) -> Path:
    """Write ``snap`` as checkpoint ``step`` under ``root`` (whole or not at all), check it
    read back, then keep only the newest ``keep``."""
    root = Path(root)
    dest = root / folder_name(snap.step)
    manifest = {"format": FORMAT, "step": snap.step, "files": {}}
    with drive.atomic_folder(dest) as tmp:
        for name, produce in _files(snap).items():
            def write_one(name=name, produce=produce) -> _Hashing:
                with drive.atomic_writer(tmp / name, "wb") as f:
                    out = _Hashing(f)
                    produce(out)
                return out
            out = drive.retry(write_one, f"Writing {name} of checkpoint {dest.name}")
            manifest["files"][name] = {"bytes": out.n, "sha256": out.sha.hexdigest()}
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

    :meth:`save` waits for the previous write (re-raising its error), then captures the
    next snapshot and starts writing it, and returns at once; :meth:`submit` does the same
    with a snapshot already captured. :meth:`wait` waits for the write under way.
    ``waited_s`` adds up the time the training loop spent waiting in any of them.
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

    def save(self, root: Path, step: int, tensors: dict[str, dict], objects: dict[str, Any],
             state: dict[str, Any], keep: int) -> Path:
        """Capture checkpoint ``step`` once the previous one is written, and write it."""
        self.wait()  # the previous snapshot is gone before the next is taken
        return self.submit(root, capture(step, tensors, objects, state), keep)

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


class _Lazy(Mapping):
    """The checkpoint's state dicts (``.safetensors``) or objects (``.pt``) by name, each
    read from its file when it is looked up, and not kept."""

    def __init__(self, ckpt: "Checkpoint", suffix: str) -> None:
        self.ckpt, self.suffix = ckpt, suffix

    def _names(self) -> list[str]:
        return [n[:-len(self.suffix)] for n in self.ckpt.files() if n.endswith(self.suffix)]

    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        try:
            return self.ckpt.read(key + self.suffix)
        except Damaged as e:
            raise DataError(f"Checkpoint {self.ckpt.path} changed after it was checked: {e}. "
                            "Run again: a damaged checkpoint is removed and the previous one "
                            "used.") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


class _Reader(io.RawIOBase):
    """A read-only file over a buffer, for torch.load (io.BytesIO would copy it)."""

    def __init__(self, view: memoryview) -> None:
        self.view, self.pos = view, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), len(self.view) - self.pos)
        b[:n] = self.view[self.pos:self.pos + n]
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: 0, 1: self.pos, 2: len(self.view)}[whence] + offset
        return self.pos

    def tell(self) -> int:
        return self.pos


@dataclass
class Checkpoint:
    """A checkpoint folder on disk. :meth:`load` checks every file and reads its state;
    ``tensors`` and ``objects`` read their files when used."""

    path: Path
    step: int
    state: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tensors: Mapping[str, dict] = _Lazy(self, ".safetensors")
        self.objects: Mapping[str, Any] = _Lazy(self, ".pt")
        self._manifest: dict[str, dict] | None = None

    def files(self) -> dict[str, dict]:
        """The manifest's files: name -> {bytes, sha256}."""
        if self._manifest is not None:
            return self._manifest
        man = self.path / MANIFEST
        if not man.is_file():
            raise Damaged("it has no manifest.json (the write did not finish)")
        try:
            files = drive.read_json(man)["files"]
        except (ValueError, KeyError) as e:
            raise Damaged(f"manifest.json is unreadable ({e})") from e
        if STATE not in files:
            raise Damaged("the manifest does not list state.json")
        self._manifest = files
        return files

    def _pass(self, name: str, into=None) -> None:
        """Read file ``name`` once, hashing it: into the uint8 tensor ``into`` (its size)
        or through a 1 MB buffer. Damaged when it does not match the manifest."""
        meta = self.files()[name]
        f = self.path / name
        if not f.is_file():
            raise Damaged(f"{name} is missing")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise Damaged(f"{name} has {size} bytes, the manifest says {meta['bytes']}")

        def read():
            sha, done = hashlib.sha256(), 0
            chunk = None if into is not None else memoryview(bytearray(CHUNK))
            view = memoryview(into.numpy()) if into is not None else None
            with open(f, "rb", buffering=0) as fh:  # never memory-mapped from Drive
                while done < size:
                    part = view[done:done + CHUNK] if view is not None \
                        else chunk[:min(CHUNK, size - done)]
                    n = fh.readinto(part)
                    if not n:
                        raise Damaged(f"{name} is shorter than it was a moment ago")
                    sha.update(part[:n])
                    done += n
            return sha.hexdigest()

        if drive.retry(read, f"Reading {name} of checkpoint {self.path.name}") \
                != meta["sha256"]:
            raise Damaged(f"{name} does not match its sha256 checksum")

    def read(self, name: str) -> Any:
        """What file ``name`` holds (a state dict, an object or the state), checked against
        the manifest as it is read; one copy of it in memory."""
        import json

        import torch

        from fastsd.convert.tensors import tensors_in

        buf = torch.empty(self.files()[name]["bytes"], dtype=torch.uint8)
        self._pass(name, buf)
        try:
            if name == STATE:
                return json.loads(bytes(buf.numpy()))
            if name.endswith(".safetensors"):
                return tensors_in(buf, self.path / name)
            return torch.load(_Reader(memoryview(buf.numpy())), weights_only=True)
        except Exception as e:
            raise DataError(f"Checkpoint {self.path}: {name} matches its checksum but cannot "
                            f"be read ({e}). Start over with --restart.") from e

    def check(self) -> str | None:
        """None when every file matches the manifest, else what is wrong (each file is
        hashed in 1 MB pieces: nothing is kept)."""
        try:
            for name in self.files():
                self._pass(name)
        except Damaged as e:
            return str(e)
        return None

    def load(self) -> "Checkpoint":
        """Check every file and read the state; raises Damaged."""
        problem = self.check()
        if problem:
            raise Damaged(problem)
        self.state = self.read(STATE)
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
