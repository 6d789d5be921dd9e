"""Opening a tunnel: the table of providers, and ``"auto"``, which tries them in turn until
one gives a URL that answers a health check through the tunnel."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Iterable

from fastsd.errors import TunnelError
from fastsd.tunnel.base import DEFAULT_TIMEOUT, Attempt, Auth, Provider, Tunnel
from fastsd.tunnel.cloudflared import Cloudflared
from fastsd.tunnel.colab_proxy import ColabProxy
from fastsd.tunnel.gradio_share import GradioShare
from fastsd.tunnel.health import require_auth, wait_healthy
from fastsd.tunnel.localtunnel import Localtunnel
from fastsd.tunnel.ngrok import Ngrok
from fastsd.workspace import Workspace

log = logging.getLogger("fastsd")

AUTO_ORDER = ("cloudflared", "ngrok", "gradio", "localtunnel", "colab")

PROVIDERS: dict[str, Callable[[], Provider]] = {
    "cloudflared": Cloudflared, "ngrok": Ngrok, "gradio": GradioShare,
    "localtunnel": Localtunnel, "colab": ColabProxy,
}


def providers_for(choice: str | Iterable[str],
                  table: dict[str, Callable[[], Provider]] | None = None) -> list[str]:
    """The provider names ``choice`` stands for, in the order they are tried."""
    table = PROVIDERS if table is None else table
    if choice == "auto":
        return [n for n in AUTO_ORDER if n in table] or list(table)
    names = [choice] if isinstance(choice, str) else list(choice)
    unknown = [n for n in names if n not in table]
    if unknown or not names:
        raise TunnelError(f"Unknown tunnel {', '.join(unknown) or '(none)'}: choose one of "
                          f"{', '.join(table)} or 'auto'.")
    return names


def open_tunnel(port: int, auth: Auth | None, provider: str | Iterable[str] = "auto",
                timeout: float = DEFAULT_TIMEOUT, path: str = "/",
                root: Workspace | Path | None = None,
                providers: dict[str, Callable[[], Provider]] | None = None) -> Tunnel:
    """Open a tunnel to ``127.0.0.1:port`` that answers a health check through it.

    ``provider`` is a name, a list of names, or ``"auto"`` (all in AUTO_ORDER). Each is
    given ``timeout`` seconds; the first healthy one wins. When none does, TunnelError
    lists every provider with its reason. ``auth`` is required: see
    :func:`fastsd.tunnel.health.require_auth`.
    """
    auth = require_auth(auth)
    table = PROVIDERS if providers is None else providers
    names = providers_for(provider, table)
    attempts: list[Attempt] = []
    for name in names:
        start = time.monotonic()
        deadline = start + timeout
        tunnel = None
        try:
            tunnel = table[name]().open(port, deadline, root)
            wait_healthy(tunnel, auth, path, deadline)
        except TunnelError as e:
            if tunnel is not None:
                tunnel.close()
            attempts.append(Attempt(name, False, str(e), time.monotonic() - start))
            log.info("Tunnel %s", attempts[-1])
            continue
        attempts.append(Attempt(name, True, tunnel.url, time.monotonic() - start))
        tunnel.attempts = attempts
        return tunnel
    lines = "\n".join(f"  - {a}" for a in attempts)
    raise TunnelError(f"No tunnel could be opened to port {port}:\n{lines}\n"
                      "Check the runtime's internet access, or pick another tunnel.")
