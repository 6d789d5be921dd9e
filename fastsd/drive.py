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
import errno
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Iterator, TypeVar

from fastsd.errors import DriveError

log = logging.getLogger("fastsd")

COLAB_MOUNT = Path(os.environ.get("FASTSD_DRIVE_MOUNT") or "/content/gdrive")
DEFAULT_RETRIES = 5
DEFAULT_DELAY = 1.0
_CHUNK = 4 << 20
_TMP_MARK = ".fastsd-tmp-"

T = TypeVar("T")


def is_mounted() -> bool:
    """Whether Drive is mounted and answering. A dead FUSE mount raises OSError (Errno 107
    on Python 3.11+) instead of returning False: that counts as not mounted."""
    try:
        # statvfs always asks the FUSE daemon; a stat may be answered from the kernel's
        # attribute cache for a while after the daemon died.
        os.statvfs(COLAB_MOUNT / "MyDrive")
        return (COLAB_MOUNT / "MyDrive").is_dir()
    except OSError:
        return False


def _dead() -> bool:
    """Whether the mount point is a mount that stopped answering (a Drive drop)."""
    try:
        os.stat(COLAB_MOUNT)
        os.listdir(COLAB_MOUNT)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return os.path.ismount(COLAB_MOUNT) and not is_mounted()


def mount_drive(force: bool = False) -> Path:
    """Mount Google Drive on Colab at /content/gdrive (a no-op when it is mounted and
    answering). A dropped mount is remounted with ``force_remount=True``."""
    if not force and is_mounted():
        return COLAB_MOUNT
    try:
        from google.colab import drive  # type: ignore[import-not-found]
    except ImportError as e:
        raise DriveError("Google Drive can only be mounted inside Colab. "
                         "Elsewhere, set FASTSD_HOME to a local folder.") from e
    remount = force or _dead()
    if remount:
        log.warning("Google Drive stopped answering; mounting it again.")
    try:
        drive.mount(str(COLAB_MOUNT), force_remount=remount)
    except Exception as e:  # Colab raises ValueError, TimeoutError, MessageError...
        raise DriveError(f"Mounting Google Drive at {COLAB_MOUNT} failed: {e}. Run the "
                         "Drive cell again; if it keeps failing, restart the runtime "
                         "(Runtime > Restart session).") from e
    if not is_mounted():
        raise DriveError(f"Google Drive did not appear at {COLAB_MOUNT} after mounting. "
                         "Run the Drive cell again.")
    _clean_orphans()
    return COLAB_MOUNT


def _on_drive(path: Path) -> bool:
    try:
        return Path(path).is_relative_to(COLAB_MOUNT)
    except ValueError:
        return False


def ensure_mounted() -> None:
    """On Colab, remount Drive if it dropped; elsewhere nothing."""
    from fastsd import env

    if env.runtime() == "colab" and not is_mounted():
        mount_drive(force=True)


# --------------------------------------------------------------------------- retries


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DriveFull(DriveError):
    """Drive (or the local disk) has no room left for a write."""


_workspaces: set[Path] = set()  # workspace roots in use (told by fastsd.workspace)


def note_workspace(root: Path) -> None:
    """Remember a workspace root, to say what to delete there when Drive is full."""
    _workspaces.add(Path(root))


def space_hogs(root: Path | None = None, limit: int = 5) -> list[tuple[Path, int]]:
    """The biggest checkpoints and models in the workspace(s), largest first, as
    (path, bytes): what to delete when Drive is full."""
    found: list[tuple[Path, int]] = []
    for r in [root] if root else sorted(_workspaces):
        found += _hogs(r)
    return sorted(found, key=lambda x: -x[1])[:limit]


def _hogs(root: Path) -> list[tuple[Path, int]]:
    found: list[tuple[Path, int]] = []
    with contextlib.suppress(OSError):
        for folder in [*root.glob("sessions/*/checkpoints/*"), *root.glob("sessions/*/models/*"),
                       *root.glob("models/*"), *root.glob("wheels/*")]:
            if is_temporary(folder):
                continue
            files = [folder] if folder.is_file() else [p for p in folder.rglob("*") if p.is_file()]
            found.append((folder, sum(p.stat().st_size for p in files)))
    return found


def _full_message(what: str, e: OSError) -> str:
    hogs = space_hogs()
    lines = "\n".join(f"  {p}  ({n / 1e9:.2f} GB)" for p, n in hogs)
    return (f"{what} failed: no space left ({e.strerror or e}). Free some room, then run this "
            "cell again. The biggest fastsd folders are:\n" + (lines or "  (none)") +
            "\nDelete the old checkpoint or model folders you no longer need (in the Drive web "
            "page, or a whole session with `fastsd session delete NAME --yes`), then empty "
            "Drive's trash (drive.google.com/drive/trash): Drive keeps deleted files there, and "
            "they count against the quota until it is emptied.")


def retry(fn: Callable[[], T], what: str, attempts: int | None = None,
          delay: float | None = None) -> T:
    """Call ``fn`` until it returns, retrying on OSError with a growing pause.

    On Colab a dropped Drive is remounted (``force_remount=True``) before the next try.
    A full Drive fails at once with what to delete. When the attempts run out a
    DriveError says what failed and what to do.
    """
    attempts = DEFAULT_RETRIES if attempts is None else attempts
    delay = DEFAULT_DELAY if delay is None else delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                DriveError):
            raise
        except OSError as e:
            if e.errno in NO_SPACE:
                raise DriveFull(_full_message(what, e)) from e
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
            try:
                ensure_mounted()
            except DriveError as m:  # the next attempt fails too, and says so
                log.warning("%s", m)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- atomic writes


_orphans: list[Path] = []  # temporaries a drop kept us from removing


def is_temporary(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a half-written temporary (readers must skip it)."""
    return Path(path).name.startswith(_TMP_MARK)


def _clean_orphans() -> None:
    while _orphans:
        p = _orphans.pop()
        with contextlib.suppress(OSError):
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


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
def _write_beside(path: Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """A temporary file beside ``path``, fsynced and renamed over it on a clean exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with _open_dest(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            _orphans.append(tmp)  # the mount dropped: removed once it is back
        raise
    _fsync_dir(path.parent)


def _drive_path(path: Path) -> bool:
    """Whether ``path`` lies on Colab's Drive mount (where writes are staged locally)."""
    from fastsd import env

    return _on_drive(path) and env.runtime() == "colab"


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file; on a clean exit it becomes ``path`` whole. On an error
    ``path`` is untouched and the temporary is removed.

    On Colab's Drive the file is written to the local disk first and then copied to Drive
    with :func:`copy_file` (which remounts and retries after a drop), so a drop mid-write
    loses nothing: the local copy is removed only once the Drive copy is whole."""
    path = Path(path)
    if not _drive_path(path):
        with _write_beside(path, mode) as f:
            yield f
        return
    fd, local = tempfile.mkstemp(prefix=_TMP_MARK, suffix="-" + path.name)
    os.close(fd)
    try:
        with _open_dest(Path(local), mode) as f:
            yield f
        copy_file(local, path)
    finally:
        Path(local).unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` whole or not at all, retrying (and remounting) on a Drive drop."""
    path = Path(path)

    def write() -> None:
        with atomic_writer(path, "wb") as f:
            f.write(data)

    retry(write, f"Writing {path.name}")
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    path = Path(path)
    return json.loads(retry(lambda: path.read_text(encoding="utf-8"), f"Reading {path.name}"))


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """A file's bytes, read whole into memory (retrying on a Drive drop). Use it instead of
    a memory map for anything on Drive: a mapped page read after a drop is a SIGBUS."""
    path = Path(path)
    return retry(path.read_bytes, f"Reading {path.name}")


def clean_temporaries(folder: str | os.PathLike[str], recursive: bool = False) -> int:
    """Remove temporaries a killed write left behind in ``folder``."""
    n = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for p in list(folder.rglob(f"{_TMP_MARK}*") if recursive else folder.glob(f"{_TMP_MARK}*")):
        if not p.exists():  # inside a temporary folder removed just before
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


_trash_noted = False


def delete(path: str | os.PathLike[str]) -> None:
    """Delete a file or folder (retrying after a Drive drop). On Drive, say once that the
    space comes back only when Drive's trash is emptied."""
    global _trash_noted
    path = Path(path)

    def remove() -> None:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    retry(remove, f"Deleting {path.name}")
    if _on_drive(path) and not _trash_noted:
        _trash_noted = True
        log.info("Deleted %s. Google Drive keeps deleted files in its trash, where they still "
                 "count against your quota, until you empty it: "
                 "https://drive.google.com/drive/trash", path.name)


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Free space where ``path`` lives. On Colab, Drive's FUSE mount reports the Google
    account's quota less what it uses; elsewhere the disk's free space."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


# --------------------------------------------------------------------------- copies


def _copy_once(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, _write_beside(dst, "wb") as fout:
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
        try:
            shutil.rmtree(tmp)
        except FileNotFoundError:
            pass
        except OSError:
            _orphans.append(tmp)  # the mount dropped: removed once it is back
        raise
    _fsync_dir(dst.parent)


@contextlib.contextmanager
def staged_folder(dst: str | os.PathLike[str]) -> Iterator[Path]:
    """A folder to write into that becomes ``dst`` whole on a clean exit, as
    :func:`atomic_folder`. On Colab's Drive it is written on the local disk first and then
    copied with :func:`copy_tree` (which remounts and retries after a drop); the local copy
    is removed only once the Drive copy is whole."""
    dst = Path(dst)
    if not _drive_path(dst):
        with atomic_folder(dst) as tmp:
            yield tmp
        return
    local = Path(tempfile.mkdtemp(prefix=_TMP_MARK, suffix="-" + dst.name))
    try:
        yield local
        copy_tree(local, dst)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def copy_tree(src: str | os.PathLike[str], dst: str | os.PathLike[str],
              attempts: int | None = None, delay: float | None = None) -> Path:
    """Copy a folder so that ``dst`` appears whole or not at all.

    The files go into a temporary folder beside ``dst`` (each with retries), which is
    renamed to ``dst`` at the end. An existing ``dst`` is replaced only after that.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise DriveError(f"Cannot copy {src}: it is not a folder.")
    files = sorted(p for p in src.rglob("*") if p.is_file() and not is_temporary(p))

    def copy_all() -> None:
        with atomic_folder(dst) as tmp:
            for f in files:
                copy_file(f, tmp / f.relative_to(src), attempts, delay)

    retry(copy_all, f"Copying {src.name} to {dst.parent}", attempts, delay)
    return dst
