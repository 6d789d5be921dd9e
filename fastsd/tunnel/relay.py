"""TCP relaying: bytes copied both ways between two sockets, and a local forwarder."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from typing import Callable

from fastsd.tunnel.base import CHECK_TIMEOUT


def pipe(a: socket.socket, b: socket.socket, stop: threading.Event | None = None) -> None:
    """Copy bytes both ways between two connected sockets until either side closes."""
    socks = [a, b]
    try:
        while not (stop and stop.is_set()):
            ready, _, _ = select.select(socks, [], [], 1.0)
            for s in ready:
                data = s.recv(65536)
                if not data:
                    return
                (b if s is a else a).sendall(data)
    except OSError:
        return
    finally:
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()


def forward(listen_port: int, target_port: int, ready: Callable[[int], None] | None = None,
            host: str = "127.0.0.1") -> None:
    """Forward every TCP connection on ``host:listen_port`` to ``127.0.0.1:target_port``.

    Runs until the process ends; ``ready`` gets the port listened on (useful with 0).
    """
    with socket.create_server((host, listen_port)) as srv:
        if ready:
            ready(srv.getsockname()[1])
        while True:
            conn, _ = srv.accept()
            try:
                up = socket.create_connection(("127.0.0.1", target_port), timeout=CHECK_TIMEOUT)
            except OSError:
                conn.close()
                continue
            threading.Thread(target=pipe, args=(conn, up), daemon=True).start()
