"""A FUSE passthrough of a local folder: the stand-in for Colab's Google Drive mount.

Run as its own process (``python passthrough.py BACKING MOUNTPOINT CONTROL``); killing it
leaves the mount dead, so every path under it raises ``OSError: [Errno 107] Transport
endpoint is not connected``, as Colab's Drive does when it drops.

CONTROL is a JSON file read again whenever it changes:
``{"quota": bytes or null, "read_bps": bytes/s or null, "write_bps": ...}``. With a quota,
``statfs`` reports it and a write that would go past it fails with ENOSPC.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
import time

import mfusepy as fuse


class Passthrough(fuse.Operations):
    use_ns = True

    def __init__(self, root: str, control: str) -> None:
        self.root = os.path.realpath(root)
        self.control = control
        self._limits: dict = {}
        self._mtime = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ helpers
    def _p(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def limits(self) -> dict:
        try:
            m = os.stat(self.control).st_mtime_ns
        except OSError:
            return {}
        if m != self._mtime:
            with open(self.control) as f:
                self._limits = json.load(f)
            self._mtime = m
        return self._limits

    def _used(self) -> int:
        total = 0
        for dirpath, _, files in os.walk(self.root):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:
                    pass
        return total

    def _throttle(self, n: int, key: str) -> None:
        bps = self.limits().get(key)
        if bps:
            time.sleep(n / bps)

    # ------------------------------------------------------------------ metadata
    def access(self, path, amode):
        if not os.access(self._p(path), amode):
            raise fuse.FuseOSError(errno.EACCES)
        return 0

    def getattr(self, path, fh=None):
        st = os.lstat(self._p(path)) if fh is None else os.fstat(fh)
        return {k: getattr(st, k) for k in (
            "st_mode", "st_nlink", "st_size", "st_uid", "st_gid", "st_atime_ns",
            "st_mtime_ns", "st_ctime_ns")} | {
            "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns}

    def readdir(self, path, fh):
        return [".", "..", *os.listdir(self._p(path))]

    def statfs(self, path):
        sv = os.statvfs(self._p(path))
        out = {k: getattr(sv, k) for k in (
            "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree",
            "f_favail", "f_flag", "f_namemax")}
        quota = self.limits().get("quota")
        if quota is not None:
            free = max(0, quota - self._used())
            out.update(f_blocks=quota // sv.f_frsize, f_bfree=free // sv.f_frsize,
                       f_bavail=free // sv.f_frsize)
        return out

    def chmod(self, path, mode):
        os.chmod(self._p(path), mode)
        return 0

    def chown(self, path, uid, gid):
        os.chown(self._p(path), uid, gid)
        return 0

    def utimens(self, path, times=None):
        os.utime(self._p(path), ns=times)
        return 0

    def mkdir(self, path, mode):
        os.mkdir(self._p(path), mode)
        return 0

    def rmdir(self, path):
        os.rmdir(self._p(path))
        return 0

    def unlink(self, path):
        os.unlink(self._p(path))
        return 0

    def rename(self, old, new):
        os.replace(self._p(old), self._p(new))
        return 0

    def readlink(self, path):
        return os.readlink(self._p(path))

    def symlink(self, target, source):
        os.symlink(source, self._p(target))
        return 0

    def truncate(self, path, length, fh=None):
        if fh is None:
            os.truncate(self._p(path), length)
        else:
            os.ftruncate(fh, length)
        return 0

    # ------------------------------------------------------------------ data
    def open(self, path, flags):
        return os.open(self._p(path), flags)

    def create(self, path, mode, fi=None):
        return os.open(self._p(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

    def read(self, path, size, offset, fh):
        self._throttle(size, "read_bps")
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        quota = self.limits().get("quota")
        if quota is not None:
            grow = max(0, offset + len(data) - os.fstat(fh).st_size)
            if grow and self._used() + grow > quota:
                raise fuse.FuseOSError(errno.ENOSPC)
        self._throttle(len(data), "write_bps")
        return os.pwrite(fh, data, offset)

    def flush(self, path, fh):
        return 0

    def fsync(self, path, datasync, fh):
        os.fsync(fh)
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0


def main() -> None:
    backing, mountpoint, control = sys.argv[1:4]
    fuse.FUSE(Passthrough(backing, control), mountpoint, foreground=True, nothreads=False)


if __name__ == "__main__":
    main()
