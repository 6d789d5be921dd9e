"""Colab's own port proxy: a URL that opens in the browser that runs the notebook."""

from __future__ import annotations

from pathlib import Path

from fastsd.errors import TunnelError
from fastsd.tunnel.base import Provider, Tunnel, left, reason
from fastsd.workspace import Workspace


class ColabProxy(Provider):
    """Colab's port proxy. No third party is involved and only the signed-in notebook user
    can open the URL, so it is the choice on a laptop. It cannot be checked from here (it
    needs that browser's cookies), so the server is checked directly instead.
    """

    name = "colab"
    checkable = False

    def open(self, port: int, deadline: float, root: Workspace | Path | None) -> Tunnel:
        try:
            from google.colab import output  # type: ignore[import-not-found]
        except ImportError:
            raise TunnelError("Colab's port proxy exists only inside Colab") from None
        try:
            url = output.eval_js(f"google.colab.kernel.proxyPort({int(port)}, "
                                 "{'cache': false})", timeout_sec=max(1, left(deadline)))
        except Exception as e:  # eval_js raises its own timeout and message errors
            raise TunnelError(f"Colab's port proxy gave no URL ({reason(e)})") from None
        if not isinstance(url, str) or not url.startswith("http"):
            raise TunnelError(f"Colab's port proxy gave no URL (it returned {url!r})")
        return Tunnel(self.name, url, port, checkable=False)
