"""Google Drive, or the local folder that stands in for it, and safe writes onto it.

On Colab, Drive is mounted at ``/content/gdrive``; elsewhere a local folder stands in for it
(the workspace, :mod:`fastsd.workspace`, says which).

Colab's Drive is a FUSE mount that drops now and then (``OSError: [Errno 107] Transport
endpoint is not connected``). Everything fastsd writes there goes through this module:

* :func:`atomic_write` and friends write a temporary file beside the target, fsync it and
  rename it over the target, so a reader sees the old file or the new one, never a mix.
* :func:`copy_file` and :func:`copy_tree` retry on ``OSError`` and only ever rename a whole
  copy into place. :func:`move_file` removes the source only once the copy is whole.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Iterator, TypeVar

from fastsd.errors import DriveError

log = logging.getLogger("fastsd")

COLAB_MOUNT = Path("/content/gdrive")
DEFAULT_RETRIES = 5
DEFAULT_DELAY = 1.0
_CHUNK = 4 << 20
_TMP_MARK = ".fastsd-tmp-"

T = TypeVar("T")


# --------------------------------------------------------------------------- mount


def mount_drive() -> Path:
    """Mount Google Drive on Colab at /content/gdrive (a no-op when already mounted)."""
    if (COLAB_MOUNT / "MyDrive").is_dir():
        return COLAB_MOUNT
    try:
        from google.colab import drive  # type: ignore[import-not-found]
    except ImportError as e:
        raise DriveError("Google Drive can only be mounted inside Colab. "
                         "Elsewhere, set FASTSD_HOME to a local folder.") from e
    drive.mount(str(COLAB_MOUNT))
    return COLAB_MOUNT


# --------------------------------------------------------------------------- retries


def retry(fn: Callable[[], T], what: str, attempts: int | None = None,
          delay: float | None = None) -> T:
    """Call ``fn`` until it returns, retrying on OSError with a growing pause.

    When the attempts run out a DriveError says what failed and what to do.
    """
    attempts = DEFAULT_RETRIES if attempts is None else attempts
    delay = DEFAULT_DELAY if delay is None else delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise
        except OSError as e:
            if attempt == attempts:
                raise DriveError(
                    f"{what} failed {attempts} times; the last error was: {e}. Google Drive "
                    "may have disconnected: re-run the Drive cell (or check free space), then "
                    "run this cell again. Nothing already saved was removed."
                ) from e
            pause = delay * 2 ** (attempt - 1)
            log.warning("%s failed (%s); retrying in %.1fs (%d/%d)", what, e, pause,
                        attempt, attempts - 1)
            time.sleep(pause)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- atomic writes


def _tmp_path(path: Path) -> Path:
    return path.with_name(f"{_TMP_MARK}{uuid.uuid4().hex[:8]}-{path.name}")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _open_dest(path: Path, mode: str = "wb") -> IO[Any]:
    """Open the destination of a write. Tests wrap it to inject I/O errors."""
    return open(path, mode)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on a clean exit fsync it and rename it over
    ``path``. On an error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with _open_dest(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_writer(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def clean_temporaries(folder: str | os.PathLike[str]) -> int:
    """Remove temporaries a killed write left behind in ``folder`` (not recursive)."""
    n = 0
    for p in Path(folder).glob(f"{_TMP_MARK}*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Free space where ``path`` lives. On Colab, Drive's FUSE mount reports the Google
    account's quota less what it uses; elsewhere the disk's free space."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


# --------------------------------------------------------------------------- copies


def _copy_once(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, atomic_writer(dst, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            fout.write(chunk)
    if dst.stat().st_size != src.stat().st_size:
        raise OSError(f"copy of {src} to {dst} is incomplete")
    shutil.copystat(src, dst)


def copy_file(src: str | os.PathLike[str], dst: str | os.PathLike[str],
              attempts: int | None = None, delay: float | None = None) -> Path:
    """Copy ``src`` to ``dst`` atomically, retrying on OSError."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise DriveError(f"Cannot copy {src}: it does not exist or is not a file.")
    retry(lambda: _copy_once(src, dst), f"Copying {src.name} to {dst.parent}", attempts, delay)
    return dst


def move_file(src: str | os.PathLike[str], dst: str | os.PathLike[str],
              attempts: int | None = None, delay: float | None = None) -> Path:
    """Copy then remove the source, which is removed only once the copy is whole."""
    dst = copy_file(src, dst, attempts, delay)
    Path(src).unlink()
    return dst


@contextlib.contextmanager
def atomic_folder(dst: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary folder beside ``dst``, renamed to ``dst`` on a clean exit (replacing
    what was there only then); removed on an error, leaving ``dst`` untouched."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(dst)
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            old = _tmp_path(dst)
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            retry(lambda: os.replace(tmp, dst), f"Renaming {tmp.name}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(dst.parent)


def copy_tree(src: str | os.PathLike[str], dst: str | os.PathLike[str],
              attempts: int | None = None, delay: float | None = None) -> Path:
    """Copy a folder so that ``dst`` appears whole or not at all.

    The files go into a temporary folder beside ``dst`` (each with retries), which is
    renamed to ``dst`` at the end. An existing ``dst`` is replaced only after that.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise DriveError(f"Cannot copy {src}: it is not a folder.")
    with atomic_folder(dst) as tmp:
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            copy_file(f, tmp / f.relative_to(src), attempts, delay)
    return dst
