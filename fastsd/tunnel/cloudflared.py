"""A cloudflared quick tunnel: a random trycloudflare.com URL, no account needed."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections import deque
from pathlib import Path

from fastsd.errors import TunnelError
from fastsd.tunnel.base import Provider, Tunnel
from fastsd.tunnel.tools import CLOUDFLARED, ensure_tool
from fastsd.workspace import Workspace


class Cloudflared(Provider):
    """Runs ``cloudflared tunnel --url`` and waits for the URL it prints."""

    name = "cloudflared"
    URL = re.compile(r"https://[a-z0-9-]+\.trycloudflare\.com")

    def open(self, port: int, deadline: float, root: Workspace | Path | None) -> Tunnel:
        binary = ensure_tool(CLOUDFLARED, root)
        proc = subprocess.Popen(
            [str(binary), "tunnel", "--no-autoupdate", "--url", f"http://127.0.0.1:{port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            stdin=subprocess.DEVNULL, start_new_session=True)
        out = _Output(proc)
        url = out.wait_for(self.URL, deadline)
        if url is None:
            _terminate(proc)
            raise TunnelError(f"cloudflared gave no URL in time (its last words: {out.tail()})")
        return Tunnel(self.name, url, port, _closers=[lambda: _terminate(proc)])


class _Output:
    """Reads a process's output in a thread, keeping the last lines and waking waiters."""

    def __init__(self, proc: subprocess.Popen, keep: int = 60):
        self.proc = proc
        self.lines: deque[str] = deque(maxlen=keep)
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip())
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: re.Pattern[str], deadline: float) -> str | None:
        """The first match of ``pattern`` in the output, or None at the deadline or exit."""
        with self._cond:
            while True:
                for line in self.lines:
                    m = pattern.search(line)
                    if m:
                        return m.group(0)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None
                                      and not self._thread.is_alive()):
                    return None
                self._cond.wait(min(remaining, 0.5))

    def tail(self, n: int = 5) -> str:
        return " | ".join(list(self.lines)[-n:])


def _terminate(proc: subprocess.Popen, grace: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)
