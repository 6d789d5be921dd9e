"""Staging: a local-disk copy of a model that lives on Google Drive, made before loading.

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

from fastsd import drive, env, fetch
from fastsd.errors import DriveError

log = logging.getLogger("fastsd")

STAGE_ENV = "FASTSD_STAGE"  # the local folder of staged copies
MANIFEST = ".fastsd_stage.json"
READ = 1 << 20  # bytes per read: sequential; on a FUSE mount 1 MB reads beat 16 MB ones
#   (measured on the throttled stand-in: 39 against 26 MB/s), the kernel reading ahead


def stage_root() -> Path:
    """Where staged copies go: $FASTSD_STAGE, else /content/fastsd-stage on Colab, else a
    folder in the system's temporary directory."""
    if os.environ.get(STAGE_ENV):
        return Path(os.environ[STAGE_ENV])
    if env.runtime() == "colab":
        return Path("/content/fastsd-stage")
    return Path(tempfile.gettempdir()) / "fastsd-stage"


def on_drive(path: Path) -> bool:
    """Whether ``path`` is on Colab's Drive or another FUSE mount (Drive's stand-in)."""
    real = os.path.realpath(path)
    if real.startswith(str(drive.COLAB_MOUNT) + os.sep):
        return True
    best, fstype = "", ""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return False
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3:
            point = parts[1].replace("\\040", " ")
            if (real == point or real.startswith(point.rstrip("/") + "/")) and \
                    len(point) > len(best):
                best, fstype = point, parts[2]
    return fstype.startswith("fuse")


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


def stage(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None,
          force: bool = False) -> Path:
    """A local copy of the model folder (or single file) ``path``, to load from.

    A model not on Drive is returned as it is (unless ``force``). Otherwise it is copied
    into ``root`` (default :func:`stage_root`) with large sequential reads and a progress
    bar, once per runtime: a later call reuses the copy while each file's size and
    modification time still match the Drive copy's, and copies again when they do not.
    """
    from tqdm.auto import tqdm

    src = Path(path)
    if not src.exists():
        raise DriveError(f"Cannot stage {src}: it does not exist. Check the model's path (and "
                         "that Drive is mounted).")
    if not force and not on_drive(src):
        return src
    files = _files(src)
    key = hashlib.sha256(os.path.realpath(src).encode()).hexdigest()[:10]
    dest = Path(root or stage_root()) / f"{src.name}-{key}"
    manifest = dest / MANIFEST
    if manifest.is_file():
        recorded = {k: tuple(v) for k, v in drive.read_json(manifest).items()}
        if recorded == files and all((dest / "data" / f).is_file() and
                                     (dest / "data" / f).stat().st_size == n
                                     for f, (n, _) in files.items()):
            log.info("Using the local copy %s of %s", dest / "data", src)
            return dest / "data" / (src.name if src.is_file() else "")
    total = sum(n for n, _ in files.values())
    fetch.check_space(dest.parent, total, f"Copying {src.name} to local disk")
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
    log.info("Copied %s to local disk (%s)", src, fetch.gb(total))
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
