"""Tensor files read one tensor at a time, and .safetensors written as a stream.

Readers never hold more than one tensor in memory:

* ``.safetensors`` is parsed here (8-byte little-endian header length, a JSON header of
  ``{name: {dtype, shape, data_offsets}}``, then the raw bytes) and each tensor is read
  with one ``readinto`` into a fresh buffer, so nothing of the file stays mapped.
* ``.ckpt``/``.bin``/``.pt`` pickles are opened with ``torch.load(mmap=True,
  weights_only=True)``: a pickle that needs arbitrary code is refused, never run.

:func:`write_safetensors` writes the header first (the shapes and dtypes are known from
the plan) and then each tensor's bytes as it is produced, through ``drive.atomic_writer``.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from fastsd.errors import DataError, ModelError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fastsd")

SAFETENSORS_EXT = (".safetensors",)
PICKLE_EXT = (".ckpt", ".bin", ".pt", ".pth")
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header

# safetensors dtype name -> (torch dtype attribute, bytes per element)
DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2),
    "BF16": ("bfloat16", 2), "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2),
    "I8": ("int8", 1), "U8": ("uint8", 1), "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}
FLOATS = ("F64", "F32", "F16", "BF16")


def main_float(bytes_by_dtype: dict[str, int]) -> str | None:
    """The floating-point type (its safetensors name) that holds most of the bytes counted
    in ``bytes_by_dtype``; None when none of them is a floating-point type."""
    floats = {d: n for d, n in bytes_by_dtype.items() if d in FLOATS}
    return max(floats, key=lambda d: (floats[d], d)) if floats else None


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    return getattr(torch, DTYPES[name][0])


def dtype_name(dtype: "torch.dtype") -> str:
    short = str(dtype).removeprefix("torch.")
    for name, (attr, _) in DTYPES.items():
        if attr == short:
            return name
    raise DataError(f"Tensors of type {dtype} cannot be stored in a .safetensors file.")


@dataclass(frozen=True)
class Info:
    """What is known about a tensor without reading it."""

    dtype: str  # safetensors name: F32, F16, ...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for d in self.shape:
            n *= d
        return n


class TensorFile:
    """A tensor file opened for reading one tensor at a time (a context manager)."""

    path: Path
    metadata: dict[str, str]
    pickle_extra: dict  # non-tensor top-level entries of a pickle (global_step, ...)

    def keys(self) -> list[str]:
        raise NotImplementedError

    def info(self, key: str) -> Info:
        raise NotImplementedError

    def read(self, key: str, scratch: bool = False) -> "torch.Tensor":
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close_read_only(f) -> None:
    """Close a file opened for reading. On a Drive that dropped, closing raises Errno 107;
    nothing of a read is lost, and that error would hide the one that matters."""
    try:
        f.close()
    except OSError as e:
        log.debug("Closing %s: %s", getattr(f, "name", f), e)


class MemoryTensors(TensorFile):
    """Tensors already in memory (the state dict of a model being trained), read one at a
    time as from a file; each is copied to CPU memory when it is read."""

    def __init__(self, tensors: dict[str, "torch.Tensor"], name: str = "(in memory)") -> None:
        self.path, self.metadata, self.pickle_extra = Path(name), {}, {}
        self.index = dict(tensors)

    def keys(self) -> list[str]:
        return list(self.index)

    def info(self, key: str) -> Info:
        t = self.index[key]
        return Info(dtype_name(t.dtype), tuple(t.shape))

    def read(self, key: str, scratch: bool = False) -> "torch.Tensor":
        return self.index[key].detach().to("cpu")


def _bad(path: Path, what: str) -> DataError:
    return DataError(f"{path} is not a usable model file: {what}. Download it again (the copy "
                     "may be incomplete) or check that it is a .safetensors or .ckpt model.")


def parse_header(raw: bytes, size: int, path: Path) -> tuple[dict[str, str], int,
                                                              dict[str, tuple[Info, int, int]]]:
    """(metadata, offset of the data, {name: (Info, start, stop)}) of a .safetensors file
    of ``size`` bytes whose JSON header is ``raw`` (the bytes after the 8-byte length)."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _bad(path, "its header is not valid JSON (not a .safetensors file?)") from None
    if not isinstance(header, dict):
        raise _bad(path, "its header is not a JSON object")
    metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
    base = 8 + len(raw)
    index: dict[str, tuple[Info, int, int]] = {}
    end = 0
    for key, h in header.items():
        try:
            info = Info(h["dtype"], tuple(int(d) for d in h["shape"]))
            start, stop = (int(o) for o in h["data_offsets"])
            ok = info.dtype in DTYPES and stop - start == info.nbytes
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise _bad(path, f"the entry of tensor {key!r} in its header is damaged")
        index[key] = (info, start, stop)
        end = max(end, stop)
    if base + end > size:
        raise _bad(path, f"it is truncated ({size} bytes, the header promises {base + end})")
    return metadata, base, index


def header_length(head: bytes, size: int, path: Path) -> int:
    """The JSON header's length from the first 8 bytes of a .safetensors file."""
    if len(head) < 8:
        raise _bad(path, f"the file is only {size} bytes long")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER or 8 + n > size:
        raise _bad(path, "its header is damaged or it is not a .safetensors file")
    return n


def tensors_in(buf: "torch.Tensor", path: Path) -> dict[str, "torch.Tensor"]:
    """The tensors of a whole .safetensors file held in the uint8 tensor ``buf``, as views
    of it (no copy; a tensor whose bytes are not aligned for its type is copied)."""
    raw = bytes(buf[:8].numpy())
    n = header_length(raw, buf.numel(), path)
    _, base, index = parse_header(bytes(buf[8:8 + n].numpy()), buf.numel(), path)
    out = {}
    for k, (info, a, b) in index.items():
        part, size = buf[base + a:base + b], DTYPES[info.dtype][1]
        if (base + a) % size:
            part = part.clone()
        out[k] = part.view(torch_dtype(info.dtype)).reshape(info.shape)
    return out


class SafetensorsFile(TensorFile):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.pickle_extra = {}
        size = path.stat().st_size
        if size == 0:
            raise _bad(path, "the file is empty (0 bytes)")
        self._f = open(path, "rb")
        try:
            n = header_length(self._f.read(8), size, path)
            self.metadata, self.base, self.index = parse_header(self._f.read(n), size, path)
            self._scratch = None
        except BaseException:
            _close_read_only(self._f)
            raise

    def keys(self) -> list[str]:
        return list(self.index)

    def info(self, key: str) -> Info:
        return self.index[key][0]

    def read(self, key: str, scratch: bool = False) -> "torch.Tensor":
        """The tensor ``key``; with ``scratch`` a view of a buffer that the next scratch
        read overwrites (copy it before reading on)."""
        import torch

        info, start, stop = self.index[key]
        n = stop - start
        if scratch:  # one buffer, reused: no fresh pages to fault in for every tensor
            if self._scratch is None or self._scratch.numel() < n:
                self._scratch = torch.empty(n, dtype=torch.uint8)
            buf = self._scratch[:n]
        else:  # torch.empty, not bytearray: no pass to zero memory that is read over
            buf = torch.empty(n, dtype=torch.uint8)
        view, done, fd = memoryview(buf.numpy()), 0, self._f.fileno()
        while done < len(view):
            n = os.preadv(fd, [view[done:]], self.base + start + done)
            if n <= 0:
                raise _bad(self.path, f"tensor {key!r} is cut short")
            done += n
        return buf.view(torch_dtype(info.dtype)).reshape(info.shape)

    def close(self) -> None:
        _close_read_only(self._f)


class PickleFile(TensorFile):
    """A torch pickle (.ckpt, .bin), loaded with ``weights_only=True`` and ``mmap=True``."""

    def __init__(self, path: Path) -> None:
        import pickle
        import zipfile

        import torch

        self.path = path
        size = path.stat().st_size
        if size == 0:
            raise _bad(path, "the file is empty (0 bytes)")
        if not zipfile.is_zipfile(path):
            with open(path, "rb") as f:
                first = f.read(2)
            if first[:1] != b"\x80":
                raise _bad(path, "it is neither a .safetensors file nor a torch pickle")
            mmap = False  # the legacy (pre-zip) torch format cannot be memory-mapped
        else:
            mmap = True
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            msg = str(e)
            if "weights_only" in msg or "Unsupported global" in msg or "GLOBAL" in msg:
                raise ModelError(
                    f"{path.name} is a pickle that needs to run code to load "
                    f"({msg.splitlines()[0][:200]}). fastsd only loads pickles that hold plain "
                    "tensors (torch.load weights_only=True), because a pickle can run any "
                    "program on this machine. Get the .safetensors version of this model, "
                    "or convert it on a machine you do not mind risking.") from None
            raise _bad(path, f"torch could not read it ({msg.splitlines()[0][:200]})") from None
        except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
            raise _bad(path, f"torch could not read it ({str(e).splitlines()[0][:200]}); it "
                             "is probably truncated") from None
        sd = obj
        self.pickle_extra = {}
        while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            self.pickle_extra.update({k: v for k, v in sd.items() if k != "state_dict"
                                      and not isinstance(v, (dict, torch.Tensor))})
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise _bad(path, f"it holds a {type(sd).__name__}, not a dictionary of tensors")
        self._sd = _flatten(sd)
        self.index = self._sd
        self.metadata = {}

    def keys(self) -> list[str]:
        return list(self._sd)

    def info(self, key: str) -> Info:
        t = self._sd[key]
        return Info(dtype_name(t.dtype), tuple(t.shape))

    def read(self, key: str, scratch: bool = False) -> "torch.Tensor":
        return self._sd[key]

    def close(self) -> None:
        self._sd = {}
        self.index = self._sd


def _flatten(d: dict, prefix: str = "") -> dict:
    """The tensors of a nested dict, named with dotted paths (an A1111 embedding keeps its
    vectors under ``string_to_param: {"*": tensor}``)."""
    import torch

    out = {}
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            out[prefix + str(k)] = v
        elif isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
    return out


def open_tensors(path: str | os.PathLike[str]) -> TensorFile:
    """Open a .safetensors file or a torch pickle for reading tensor by tensor.

    A missing, empty, truncated or foreign file raises a DataError; a pickle that would
    run code raises a ModelError.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist or is not a file. Check the path.")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix.lower() in SAFETENSORS_EXT or (len(head) >= 9 and head[8:9] == b"{"):
        return SafetensorsFile(path)
    if path.suffix.lower() in PICKLE_EXT or head[:2] in (b"PK", b"\x80\x02"):
        return PickleFile(path)
    raise _bad(path, "it is neither a .safetensors file nor a torch pickle (.ckpt, .bin)")


# --------------------------------------------------------------------------- writing


def safetensors_header(items: Iterable[tuple[str, Info]],
                       metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length and the JSON header for tensors written in this order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, info in items:
        header[name] = {"dtype": info.dtype, "shape": list(info.shape),
                        "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(t: "torch.Tensor") -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    import torch

    t = t.detach().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        t = t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.uint8)
    return memoryview(t.numpy()).cast("B")


def write_safetensors(path: Path, items: list[tuple[str, Info]],
                      produce: Callable[[str], "torch.Tensor"],
                      metadata: dict[str, str] | None = None,
                      progress: Iterator | None = None) -> Path:
    """Write a .safetensors file whose tensors (``items``, in order) are produced one by one.

    ``produce(name)`` returns the tensor; its dtype and shape must match ``items``. The
    file is written through ``drive.atomic_writer``: whole or not at all.
    """
    from fastsd import drive

    with drive.atomic_writer(path, "wb") as f, _Writer(f) as w:
        w.put(safetensors_header(items, metadata))
        for name, info in items:
            t = produce(name)
            got = Info(dtype_name(t.dtype), tuple(t.shape))
            if got != info:
                raise AssertionError(f"{name}: planned {info}, produced {got}")
            w.put(t)
            del t
            if progress is not None:
                next(progress, None)
    return path


class _Writer:
    """Writes tensors, in a thread when ``threaded`` (file writes release the GIL, so the
    caller reads and converts the next tensor meanwhile), and starts the disk writeback of
    every ``flush_every`` bytes at once, so the final fsync has little left to wait for
    and the page cache is not filled with the whole file. At most two tensors wait in the
    queue, which bounds the memory it adds."""

    def __init__(self, f, threaded: bool = True,
                 flush_every: int = 256 << 20) -> None:
        import queue
        import threading

        self.f, self.flush_every, self.threaded = f, flush_every, threaded
        self.written = self.started = 0
        self.q: "queue.Queue" = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="fastsd-writer", daemon=True)

    def __enter__(self) -> "_Writer":
        if self.threaded:
            self.thread.start()
        return self

    def put(self, item) -> None:
        if self.error is not None:
            raise self.error
        if self.threaded:
            self.q.put(item)
        else:
            self._write(item)

    def _write(self, item) -> None:
        data = item if isinstance(item, bytes) else tensor_bytes(item)
        self.f.write(data)
        self.written += len(data)
        fadvise = getattr(os, "posix_fadvise", None)
        if fadvise is not None and self.written - self.started >= self.flush_every:
            self.f.flush()
            # DONTNEED starts writing these pages to disk now and frees them once written
            fadvise(self.f.fileno(), self.started, self.written - self.started,
                    os.POSIX_FADV_DONTNEED)
            self.started = self.written

    def _run(self) -> None:
        while (item := self.q.get()) is not None:
            if self.error is None:
                try:
                    self._write(item)
                except BaseException as e:  # handed to the caller's thread, raised there
                    self.error = e

    def __exit__(self, *exc) -> None:
        if self.threaded:
            self.q.put(None)
            self.thread.join()
        if self.error is not None and exc[0] is None:
            raise self.error
