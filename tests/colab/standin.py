"""Controls for the Colab stand-in (tests only): where its Drive lives, killing the FUSE
passthrough (a Drive drop), throttling and a quota (a full Drive).

Environment (set by the tests, inherited by kernels and child processes):
``COLAB_STANDIN_BACKING`` the local folder Drive shows (``MyDrive/`` inside it),
``COLAB_STANDIN_STATE`` where the passthrough's pid, log and control file live,
``COLAB_STANDIN_PYTHON`` the interpreter that has mfusepy (default: this one).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PASSTHROUGH = HERE / "passthrough.py"


def backing() -> Path:
    return Path(os.environ["COLAB_STANDIN_BACKING"])


def state() -> Path:
    path = Path(os.environ.get("COLAB_STANDIN_STATE") or str(backing()) + ".state")
    path.mkdir(parents=True, exist_ok=True)
    return path


def control() -> Path:
    return state() / "control.json"


def set_limits(quota: int | None = None, read_bps: float | None = None,
               write_bps: float | None = None) -> None:
    """Throttle reads/writes (bytes per second) or cap the Drive at ``quota`` bytes."""
    tmp = control().with_suffix(".tmp")
    tmp.write_text(json.dumps({"quota": quota, "read_bps": read_bps, "write_bps": write_bps}))
    os.replace(tmp, control())


def pid() -> int | None:
    f = state() / "pid"
    return int(f.read_text()) if f.is_file() else None


def alive(mountpoint: Path) -> bool:
    try:
        os.statvfs(mountpoint / "MyDrive")  # always answered by the daemon, never cached
    except OSError:
        return False
    return os.path.ismount(mountpoint)


def kill() -> None:
    """Kill the passthrough: every path under the mount then raises Errno 107."""
    p = pid()
    if p is None:
        return
    try:
        os.kill(p, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # reap (our child) or wait for it to vanish
        try:
            if os.waitpid(p, os.WNOHANG) != (0, 0):
                break
        except ChildProcessError:
            try:
                os.kill(p, 0)
            except ProcessLookupError:
                break
        time.sleep(0.02)
    (state() / "pid").unlink(missing_ok=True)


def unmount(mountpoint: Path) -> None:
    kill()
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


def start(mountpoint: Path) -> None:
    """Start a passthrough of backing() at ``mountpoint`` and wait until it serves."""
    (backing() / "MyDrive").mkdir(parents=True, exist_ok=True)
    mountpoint.mkdir(parents=True, exist_ok=True)
    if not control().exists():
        set_limits()
    log = open(state() / "passthrough.log", "ab")
    proc = subprocess.Popen(
        [os.environ.get("COLAB_STANDIN_PYTHON") or sys.executable, str(PASSTHROUGH),
         str(backing()), str(mountpoint), str(control())],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    (state() / "pid").write_text(str(proc.pid))
    deadline = time.monotonic() + 30
    while not alive(mountpoint):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise OSError(f"the Drive stand-in did not mount at {mountpoint}; see "
                          f"{state() / 'passthrough.log'}")
        time.sleep(0.02)
