"""The health check through a tunnel: the server answers, and refuses a request without
the password (a public URL must never open the GPU to anyone)."""

from __future__ import annotations

import base64
import time
import urllib.error
import urllib.request

from fastsd.errors import TunnelError
from fastsd.tunnel.base import CHECK_TIMEOUT, Auth, Tunnel, reason

# Headers that skip the interstitial pages localtunnel and ngrok show to browsers.
CHECK_HEADERS = {"User-Agent": "fastsd-health/1", "bypass-tunnel-reminder": "1",
                 "ngrok-skip-browser-warning": "1"}


def request_status(url: str, auth: Auth | None, timeout: float = CHECK_TIMEOUT) -> int:
    """The HTTP status of a GET of ``url`` (4xx/5xx included); OSError when none came back."""
    headers = dict(CHECK_HEADERS)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (our own URL)
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def check(url: str, auth: Auth, path: str = "/", timeout: float = CHECK_TIMEOUT) -> str | None:
    """Check a server through ``url``: ``None`` when healthy, else the reason it is not.

    Healthy means: a request without credentials is refused with 401 (the password is on)
    and one with them is answered below 400.
    """
    target = url.rstrip("/") + path
    try:
        anonymous = request_status(target, None, timeout)
    except OSError as e:
        return f"no answer from {url} ({reason(e)})"
    if anonymous < 400:
        return (f"{url} answered {anonymous} without a password: the server's auth is off, "
                "and a public URL must not open the GPU to anyone")
    if anonymous != 401:
        return f"{url} answered {anonymous} (the tunnel does not reach the server)"
    try:
        status = request_status(target, auth, timeout)
    except OSError as e:
        return f"no answer from {url} with the password ({reason(e)})"
    if status >= 400:
        return f"{url} answered {status} with the password"
    return None


def checked_url(tunnel: Tunnel) -> str:
    """The URL a health check goes through: the tunnel's, or the server's own when only the
    notebook's browser can open the tunnel's (Colab's proxy needs its cookies)."""
    return tunnel.url if tunnel.checkable else f"http://127.0.0.1:{tunnel.port}"


def require_auth(auth: Auth | None) -> Auth:
    """The (user, password) pair, or TunnelError when there is no password."""
    if not auth or not auth[0] or not auth[1]:
        raise TunnelError("A tunnel makes the web UI public, and anyone with its URL could use "
                          "your GPU: it is never opened without a user name and password. "
                          "Give the server a password (one is generated when you give none).")
    return auth


def wait_healthy(tunnel: Tunnel, auth: Auth, path: str, deadline: float) -> None:
    """Check ``tunnel`` until it is healthy or ``deadline`` (time.monotonic) passes.

    A new public name can take a few seconds to resolve, so failures are retried; a server
    that answers without a password fails at once.
    """
    if not tunnel.checkable:
        # Only the notebook's own browser can open this URL: check the server directly.
        why = check(checked_url(tunnel), auth, path)
        if why:
            raise TunnelError(why)
        return
    while True:
        remaining = deadline - time.monotonic()
        why = check(tunnel.url, auth, path, timeout=max(1.0, min(CHECK_TIMEOUT, remaining)))
        if why is None:
            return
        if "without a password" in why or time.monotonic() + 1 > deadline:
            raise TunnelError(why)
        time.sleep(1.0)
