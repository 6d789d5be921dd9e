"""localtunnel.me, spoken to directly: one HTTP request for a name, then TCP links."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import urllib.request
from pathlib import Path

from fastsd.errors import TunnelError
from fastsd.tunnel.base import CHECK_TIMEOUT, Provider, Tunnel, left, reason
from fastsd.tunnel.relay import pipe
from fastsd.workspace import Workspace

LOCALTUNNEL_HOST = "https://localtunnel.me"


class Localtunnel(Provider):
    """localtunnel.me: asks the server for a name, then keeps TCP links to it open.

    The page asks a first-time visitor for a "tunnel password", which is this machine's
    public IP address; it is shown with the URL.
    """

    name = "localtunnel"

    def __init__(self, host: str = LOCALTUNNEL_HOST):
        self.host = host

    def open(self, port: int, deadline: float, root: Workspace | Path | None) -> Tunnel:
        try:
            info = json.loads(_get(f"{self.host}/?new", timeout=left(deadline)))
            remote_port, url = int(info["port"]), str(info["url"])
            links = max(1, min(int(info.get("max_conn_count", 8)), 10))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TunnelError(f"localtunnel gave no tunnel ({reason(e)})") from None
        server = urllib.request.urlparse(self.host).hostname or "localtunnel.me"
        stop = threading.Event()
        for _ in range(links):
            threading.Thread(target=_relay_loop, args=(server, remote_port, port, stop),
                             daemon=True).start()
        note = ""
        with contextlib.suppress(OSError, ValueError):
            ip = _get("https://loca.lt/mytunnelpassword", timeout=5).decode().strip()
            note = f"If the page asks for a tunnel password, it is {ip}"
        return Tunnel(self.name, url, port, note=note, _closers=[stop.set])


def _get(url: str, timeout: float) -> bytes:
    """The body of a small API answer (localtunnel's); files go through fastsd.fetch."""
    req = urllib.request.Request(url, headers={"User-Agent": "fastsd"})
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (fixed hosts)
        return r.read(1 << 20)


def _relay_loop(server: str, remote_port: int, local_port: int, stop: threading.Event) -> None:
    """Keep one link from the tunnel server to the local port, reopening it after each use."""
    failures = 0
    while not stop.is_set() and failures < 5:
        try:
            remote = socket.create_connection((server, remote_port), timeout=CHECK_TIMEOUT)
            remote.settimeout(None)
            ready, _, _ = select.select([remote], [], [], 60)
            if not ready:
                remote.close()
                continue
            local = socket.create_connection(("127.0.0.1", local_port), timeout=CHECK_TIMEOUT)
            failures = 0
        except OSError:
            failures += 1
            stop.wait(1.0 * failures)
            continue
        pipe(remote, local, stop)
