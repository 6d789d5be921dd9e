"""Gradio's share servers: a gradio.live URL through their frp client."""

from __future__ import annotations

import threading
from pathlib import Path

from fastsd.errors import TunnelError
from fastsd.tunnel.base import Provider, Tunnel, left, reason
from fastsd.workspace import Workspace


class GradioShare(Provider):
    """Gradio's share servers (a gradio.live URL through their frp client)."""

    name = "gradio"

    def open(self, port: int, deadline: float, root: Workspace | Path | None) -> Tunnel:
        try:
            from gradio import networking, tunneling
        except ImportError as e:
            raise TunnelError("gradio is not installed; run the install cell.") from e
        import secrets as pysecrets

        result: dict = {}
        before = list(tunneling.CURRENT_TUNNELS)

        def run() -> None:
            try:
                result["url"] = networking.setup_tunnel(
                    local_host="127.0.0.1", local_port=port,
                    share_token=pysecrets.token_urlsafe(32), share_server_address=None,
                    share_server_tls_certificate=None)
            except Exception as e:  # gradio raises plain exceptions of many kinds
                result["error"] = e

        def close() -> None:
            for t in [t for t in tunneling.CURRENT_TUNNELS if t not in before]:
                t.kill()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(left(deadline))
        if worker.is_alive():
            close()
            raise TunnelError("Gradio's share server gave no URL in time")
        if "error" in result:
            close()
            err = result["error"]
            cause = err.__cause__ or err
            raise TunnelError(f"Gradio's share server failed ({reason(err)}: {reason(cause)})")
        return Tunnel(self.name, result["url"], port, _closers=[close])
