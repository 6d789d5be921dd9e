"""Google Drive, or the local folder that stands in for it, and the one guarded path of
every write into the workspace.

On Colab, Drive is mounted at ``/content/gdrive``; elsewhere a local folder stands in for it
(the workspace, :mod:`fastsd.workspace`, says which). Colab's Drive is a FUSE mount that
drops now and then (``OSError: [Errno 107] Transport endpoint is not connected``).

Every write into the workspace goes through this module; tests/test_architecture.py fails
on a write call anywhere else whose target is not provably local. The guard:

* :func:`atomic_writer` (and :func:`atomic_write_bytes`, ``_text``, ``_json``) for a file,
  :func:`folder_writer` for a folder a library fills (``save_pretrained``): on Drive
  (:func:`on_drive`) the content is written on local disk first, then copied;
* :func:`copy_file` and :func:`copy_tree` copy into a temporary beside the target, fsync it
  and rename it into place, retrying (:func:`retry`) after a drop, remounting Drive on Colab;
* :func:`atomic_folder` assembles a folder beside its target from files written or moved
  (:func:`rename`) with these calls, and renames it into place whole;
* :func:`make_folder`, :func:`rename` and :func:`delete` retry the same way.

A temporary's name says which process writes it (``.fastsd-tmp-BOOT.PID.RANDOM-NAME``). The
first write of a process into a folder removes the temporaries that dead processes left
there, so a drop or a kill leaves none behind once the next run writes there; readers skip
temporaries (:func:`is_temporary`). Free space has one reading here (:func:`free_bytes`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
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


def _mount_dead() -> bool:
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
    remount = force or _mount_dead()
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


def on_drive(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is on Google Drive: under Colab's mount point, or on any other FUSE
    mount (Drive mounted elsewhere, rclone or google-drive-ocamlfuse on a local Jupyter, the
    tests' stand-in). What is written there is staged on local disk and copied with retries;
    a model there is copied to local disk before it is loaded."""
    real = os.path.realpath(path)
    if real == str(COLAB_MOUNT) or real.startswith(str(COLAB_MOUNT) + os.sep):
        return True
    best, fstype = "", ""
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            mounts = f.read().splitlines()
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


def ensure_mounted() -> None:
    """On Colab, remount Drive if it dropped; elsewhere nothing."""
    from fastsd import env

    if env.runtime() == "colab" and not is_mounted():
        mount_drive(force=True)


# --------------------------------------------------------------------------- retries


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DriveFull(DriveError):
    """Drive (or the local disk) has no room left for a write."""


SPACE_MARGIN = 256 << 20  # bytes left free beyond a download or copy, for what goes beside it


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _free_now(path: Path) -> int:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Free bytes where ``path`` lives (its nearest existing folder), retrying after a drop.
    On Drive's FUSE mount that is the Google account's quota less what it uses; elsewhere
    the disk's free space. The one reading of free space: ``fastsd doctor``, the checks
    before a download, a local copy or a training run, and the full-Drive message use it."""
    return retry(lambda: _free_now(Path(path)), f"Reading the free space at {path}")


def require_space(folder: str | os.PathLike[str], need: int, what: str) -> None:
    """Raise DriveFull before writing ``need`` bytes into ``folder`` when they would not fit,
    with room to spare (:data:`SPACE_MARGIN`)."""
    free = free_bytes(folder)
    if need + SPACE_MARGIN > free:
        where = (f"Free up space on Google Drive ({FREE_SPACE_HINT}; empty Drive's trash too)"
                 if on_drive(folder) else "Free up space on that disk")
        raise DriveFull(f"{what} needs {gb(need)} but {folder} has only {gb(free)} free. "
                        f"{where}, or choose something smaller, then run this again.")


FREE_SPACE_HINT = ("`fastsd space` (the notebook's last cell, Free Drive space) lists what "
                   "fastsd keeps, largest first, and deletes what you pick")


def _full_message(what: str, e: OSError, where: Path | None) -> str:
    free = ""
    if where is not None:
        with contextlib.suppress(OSError):
            free = f"; {gb(_free_now(where))} free at {where}"
    return (f"{what} failed: no space left ({e.strerror or e}{free}). Free some room, then "
            f"run this cell again: {FREE_SPACE_HINT}. Then empty Drive's trash "
            "(drive.google.com/drive/trash): Drive keeps deleted files there, and they count "
            "against the quota until it is emptied.")


def retry(fn: Callable[[], T], what: str, attempts: int | None = None,
          delay: float | None = None, where: Path | None = None) -> T:
    """Call ``fn`` until it returns, retrying on OSError with a growing pause.

    On Colab a dropped Drive is remounted (``force_remount=True``) before the next try.
    A full Drive fails at once (DriveFull), saying how much is free at ``where`` (the folder
    written into) and how to make room. When the attempts run out a DriveError says what
    failed and what to do.
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
                raise DriveFull(_full_message(what, e, where)) from e
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


# --------------------------------------------------------------------------- temporaries


_orphans: list[Path] = []  # temporaries a drop kept us from removing
_cleaned: set[Path] = set()  # folders whose abandoned temporaries this process removed
_OWNED = re.compile(r"^\.fastsd-tmp-([0-9a-f]{8})\.(\d+)\.")


def _boot_id() -> str:
    """This machine's boot (a new Colab runtime is a new one), 8 hex digits."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip().replace("-", "")[:8]
    except OSError:
        import socket

        return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


_BOOT = _boot_id()


def is_temporary(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a half-written temporary (readers must skip it)."""
    return Path(path).name.startswith(_TMP_MARK)


def running(pid: int) -> bool:
    """Whether the process ``pid`` of this machine runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")  # not a zombie
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _abandoned(path: Path) -> bool:
    """Whether the temporary ``path`` was left by a process that is gone: one of an earlier
    boot (another runtime), a process that no longer runs, or an earlier fastsd (whose
    temporaries do not name their writer)."""
    m = _OWNED.match(path.name)
    if m is None:
        return True
    return m.group(1) != _BOOT or not running(int(m.group(2)))


def _discard(path: Path) -> None:
    """Remove a temporary; when the mount dropped, once it is back."""
    try:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        _orphans.append(path)


def _clean_orphans() -> None:
    while _orphans:
        _discard(_orphans.pop())


def clean_temporaries(folder: str | os.PathLike[str], recursive: bool = False) -> int:
    """Remove the temporaries that killed or dropped writes left in ``folder`` (those of a
    process still writing stay). Returns how many."""
    n = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    pattern = f"{_TMP_MARK}*"
    for p in list(folder.rglob(pattern) if recursive else folder.glob(pattern)):
        if os.path.lexists(p) and _abandoned(p):  # (inside one removed just before: gone)
            _discard(p)
            n += 1
    return n


def _before_writing_in(folder: Path) -> None:
    """Once per process and folder: remove what dead writers left there."""
    if folder not in _cleaned:
        with contextlib.suppress(OSError):
            clean_temporaries(folder)
            _cleaned.add(folder)


def _owned() -> str:
    """The start of the name of a temporary this process writes."""
    return f"{_TMP_MARK}{_BOOT}.{os.getpid()}."


def _tmp_path(path: Path) -> Path:
    return path.with_name(f"{_owned()}{uuid.uuid4().hex[:6]}-{path.name}")


def _local_stage(name: str, folder: bool = False) -> Path:
    """A file (or folder) on the local disk to stage a write to Drive in; the first one of
    a process removes those that killed processes left there."""
    _before_writing_in(Path(tempfile.gettempdir()))
    if folder:
        return Path(tempfile.mkdtemp(prefix=_owned(), suffix="-" + name))
    fd, local = tempfile.mkstemp(prefix=_owned(), suffix="-" + name)
    os.close(fd)
    return Path(local)


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
    _before_writing_in(path.parent)
    tmp = _tmp_path(path)
    try:
        with _open_dest(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    _fsync_dir(path.parent)


# --------------------------------------------------------------------------- the guard


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a file to write; on a clean exit it becomes ``path`` whole. On an error
    ``path`` is untouched and the temporary is removed.

    On Drive (:func:`on_drive`) the file is written on the local disk first and then copied
    with :func:`copy_file` (which remounts and retries after a drop), so a drop mid-write
    loses nothing: the local copy is removed only once the Drive copy is whole."""
    path = Path(path)
    if not on_drive(path):
        with _write_beside(path, mode) as f:
            yield f
        return
    local = _local_stage(path.name)
    try:
        with _open_dest(local, mode) as f:
            yield f
        copy_file(local, path)
    finally:
        local.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` whole or not at all, retrying (and remounting) on a Drive drop."""
    path = Path(path)

    def write() -> None:
        with atomic_writer(path, "wb") as f:
            f.write(data)

    retry(write, f"Writing {path.name}", where=path.parent)
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


def make_folder(path: str | os.PathLike[str]) -> Path:
    """Create the folder ``path`` and its parents (nothing when it exists), retrying after a
    drop."""
    path = Path(path)
    retry(lambda: path.mkdir(parents=True, exist_ok=True), f"Creating {path}",
          where=path.parent)
    return path


def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Move ``src`` to ``dst`` on the same file system (a rename: a download's finished
    file into place, say), replacing ``dst``; retried after a drop."""
    src, dst = Path(src), Path(dst)
    make_folder(dst.parent)

    def move() -> None:
        if not os.path.lexists(src) and os.path.lexists(dst):
            return  # the rename went through before the drop that hid its answer
        os.replace(src, dst)

    retry(move, f"Moving {src.name} to {dst.parent}", where=dst.parent)
    return dst


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
    if on_drive(path) and not _trash_noted:
        _trash_noted = True
        log.info("Deleted %s. Google Drive keeps deleted files in its trash, where they still "
                 "count against your quota, until you empty it: "
                 "https://drive.google.com/drive/trash", path.name)


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
    retry(lambda: _copy_once(src, dst), f"Copying {src.name} to {dst.parent}", attempts, delay,
          where=dst.parent)
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
    what was there only then); removed on an error, leaving ``dst`` untouched.

    It is beside ``dst``, so on Drive too: fill it with this module's calls (files written
    with :func:`atomic_write_bytes`, copied with :func:`copy_file`, moved in with
    :func:`rename`). For a folder a library writes, use :func:`folder_writer`."""
    dst = Path(dst)
    make_folder(dst.parent)
    _before_writing_in(dst.parent)
    tmp = _tmp_path(dst)
    retry(tmp.mkdir, f"Creating {tmp.name}", where=dst.parent)
    old = _tmp_path(dst)  # the folder being replaced, until the new one is in place

    def swap() -> None:
        if os.path.lexists(tmp):
            if os.path.lexists(dst):
                os.replace(dst, old)
            os.replace(tmp, dst)

    try:
        yield tmp
        retry(swap, f"Renaming {tmp.name} to {dst.name}", where=dst.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            if os.path.lexists(old) and not os.path.lexists(dst):
                os.replace(old, dst)  # the previous folder back, as it was
        _discard(tmp)
        raise
    finally:
        if os.path.lexists(old) and os.path.lexists(dst):
            _discard(old)
    _fsync_dir(dst.parent)


@contextlib.contextmanager
def folder_writer(dst: str | os.PathLike[str]) -> Iterator[Path]:
    """A folder to write into (``save_pretrained`` and the like) that becomes ``dst`` whole
    on a clean exit. On Drive it is a folder on the local disk, copied to ``dst`` with
    :func:`copy_tree` (which remounts and retries after a drop) and removed only once the
    Drive copy is whole; elsewhere a temporary beside ``dst`` (:func:`atomic_folder`)."""
    dst = Path(dst)
    if not on_drive(dst):
        with atomic_folder(dst) as tmp:
            yield tmp
        return
    local = _local_stage(dst.name, folder=True)
    try:
        yield local
        copy_tree(local, dst)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def copy_tree(src: str | os.PathLike[str], dst: str | os.PathLike[str],
              attempts: int | None = None, delay: float | None = None) -> Path:
    """Copy a folder (its empty folders too) so that ``dst`` appears whole or not at all.

    The files go into a temporary folder beside ``dst`` (each with retries), which is
    renamed to ``dst`` at the end. An existing ``dst`` is replaced only after that.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise DriveError(f"Cannot copy {src}: it is not a folder.")
    entries = sorted(p for p in src.rglob("*") if not is_temporary(p))

    def copy_all() -> None:
        with atomic_folder(dst) as tmp:
            for p in entries:
                if p.is_dir():
                    (tmp / p.relative_to(src)).mkdir(parents=True, exist_ok=True)
                elif p.is_file():
                    copy_file(p, tmp / p.relative_to(src), attempts, delay)

    retry(copy_all, f"Copying {src.name} to {dst.parent}", attempts, delay, where=dst.parent)
    return dst
