"""A read-only FUSE passthrough of a folder whose reads are throttled to Google Drive's
speed: the stand-in for Colab's Drive mount in bench_models.py.

Run as its own process: ``python throttled_mount.py BACKING MOUNTPOINT BYTES_PER_S
LATENCY_MS``. Every read request sleeps for its size at BYTES_PER_S plus LATENCY_MS, the
way each request to Drive pays a round trip and the network's bandwidth. Unmount with
``fusermount3 -u MOUNTPOINT`` (which also drops the kernel's cache of it).
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time

import mfusepy as fuse


class Throttled(fuse.Operations):
    use_ns = True

    def __init__(self, root: str, bps: float, latency: float) -> None:
        self.root, self.bps, self.latency = os.path.realpath(root), bps, latency
        self.gate = threading.Lock()  # one request at a time: a single Drive connection

    def _p(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def getattr(self, path, fh=None):
        try:
            st = os.lstat(self._p(path))
        except FileNotFoundError:
            raise fuse.FuseOSError(errno.ENOENT) from None
        return {"st_mode": st.st_mode, "st_nlink": st.st_nlink, "st_size": st.st_size,
                "st_uid": st.st_uid, "st_gid": st.st_gid, "st_atime": st.st_atime_ns,
                "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns}

    def readdir(self, path, fh):
        return [".", "..", *os.listdir(self._p(path))]

    def open(self, path, flags):
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise fuse.FuseOSError(errno.EROFS)
        return os.open(self._p(path), os.O_RDONLY)

    def read(self, path, size, offset, fh):
        with self.gate:
            data = os.pread(fh, size, offset)
            time.sleep(self.latency + len(data) / self.bps)
        return data

    def release(self, path, fh):
        os.close(fh)
        return 0

    def statfs(self, path):
        st = os.statvfs(self.root)
        return {k: getattr(st, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree",
                                            "f_bavail", "f_files", "f_ffree", "f_namemax")}


if __name__ == "__main__":
    backing, mountpoint, bps, latency_ms = sys.argv[1:5]
    fuse.FUSE(Throttled(backing, float(bps), float(latency_ms) / 1000), mountpoint,
              foreground=True, ro=True, nothreads=False)
