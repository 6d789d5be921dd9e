"""Local copies of models: a model on Google Drive is copied to local disk before it is
loaded (:func:`local_copy`, Drive to local, for reading; writes go the other way through
:mod:`fastsd.drive`).

Loading a multi-gigabyte model straight from Drive's FUSE mount reads it over the network
every time it is loaded (and memory-mapped loaders fault it in page by page); copied once with
sequential reads, every later load in the same runtime reads only local disk. The copy is
reused within the runtime while every file of the Drive copy keeps its size and modification
time. benchmarks/bench_models.py measures both the first load (where the copy costs time)
and the reload (where it pays).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

from fastsd import drive, env
from fastsd.errors import DriveError

log = logging.getLogger("fastsd")

LOCAL_ENV = "FASTSD_LOCAL_MODELS"  # the local folder of the copies
MANIFEST = ".fastsd_local_copy.json"
READ = 1 << 20  # bytes per read: sequential; on a FUSE mount 1 MB reads beat 16 MB ones
#   (measured on the throttled stand-in: 39 against 26 MB/s), the kernel reading ahead


def local_root() -> Path:
    """Where the local copies go: $FASTSD_LOCAL_MODELS, else /content/fastsd-local-models on
    Colab, else a folder in the system's temporary directory."""
    if os.environ.get(LOCAL_ENV):
        return Path(os.environ[LOCAL_ENV])
    if env.runtime() == "colab":
        return Path("/content/fastsd-local-models")
    return Path(tempfile.gettempdir()) / "fastsd-local-models"


def _files(src: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime in ns)} of every file of a model folder (or the file)."""
    if src.is_file():
        st = src.stat()
        return {src.name: (st.st_size, st.st_mtime_ns)}
    out = {}
    for p in sorted(src.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts):
            st = p.stat()
            out[p.relative_to(src).as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


def local_copy(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None,
               force: bool = False) -> Path:
    """A local copy of the model folder (or single file) ``path``, to load from.

    A model not on Drive is returned as it is (unless ``force``). Otherwise it is copied
    into ``root`` (default :func:`local_root`) with large sequential reads and a progress
    bar, once per runtime: a later call reuses the copy while each file's size and
    modification time still match the Drive copy's, and copies again when they do not.
    """
    from tqdm.auto import tqdm

    src = Path(path)
    if not src.exists():
        raise DriveError(f"Cannot copy {src} to local disk: it does not exist. Check the "
                         "model's path (and that Drive is mounted).")
    if not force and not drive.on_drive(src):
        return src
    files = _files(src)
    key = hashlib.sha256(os.path.realpath(src).encode()).hexdigest()[:10]
    dest = Path(root or local_root()) / f"{src.name}-{key}"
    manifest = dest / MANIFEST
    if manifest.is_file():
        recorded = {k: tuple(v) for k, v in drive.read_json(manifest).items()}
        if recorded == files and all((dest / "data" / f).is_file() and
                                     (dest / "data" / f).stat().st_size == n
                                     for f, (n, _) in files.items()):
            log.info("Using the local copy %s of %s", dest / "data", src)
            return dest / "data" / (src.name if src.is_file() else "")
    total = sum(n for n, _ in files.values())
    drive.require_space(dest.parent, total, f"Copying {src.name} to local disk")
    with drive.atomic_folder(dest) as tmp, tqdm(total=total, unit="B", unit_scale=True,
                                                desc=f"Copying {src.name} to local disk") as bar:
        base = src.parent if src.is_file() else src
        for rel, (size, _) in files.items():
            out = tmp / "data" / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            drive.retry(lambda rel=rel, out=out: _copy(base / rel, out, bar),
                        f"Copying {rel} to local disk")
            if out.stat().st_size != size:
                raise DriveError(f"The local copy of {rel} has {out.stat().st_size} bytes, "
                                 f"not {size}: the Drive file changed while it was copied. "
                                 "Run this again.")
        drive.atomic_write_json(tmp / MANIFEST, files)
    log.info("Copied %s to local disk (%s)", src, drive.gb(total))
    return dest / "data" / (src.name if src.is_file() else "")


def _copy(src: Path, dst: Path, bar) -> None:
    done = 0
    try:
        with open(src, "rb", buffering=0) as fin, open(dst, "wb") as fout:
            while chunk := fin.read(READ):
                fout.write(chunk)
                done += len(chunk)
                bar.update(len(chunk))
    except OSError:
        bar.update(-done)
        raise
