"""HTTP Basic auth in front of every route of the web UI's app: the API, the page, and any
app mounted on it.

The server needs it whenever it listens beyond localhost or a tunnel is open
(:func:`required`). :class:`BasicAuth` holds the one user and password (a password is
generated when the user gave none, and shown to them by the caller, never logged);
:class:`AuthMiddleware` is a plain ASGI middleware, so it also guards apps mounted later on
the same FastAPI app (a Gradio page: ``gr.mount_gradio_app(app, blocks, path="/")``),
which FastAPI dependencies would not. Wrong credentials get 401; after a few failures from
one address, each further failure is answered more slowly (up to MAX_DELAY seconds).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import secrets
import threading
import time
from dataclasses import dataclass, field

FREE_FAILURES = 3  # failures from one address answered at once
BASE_DELAY, MAX_DELAY = 0.5, 10.0  # seconds: doubled from the 4th failure on
FORGET_AFTER = 15 * 60.0  # seconds without a failure before an address starts afresh
REALM = "fastsd"
DEFAULT_USER = "fastsd"  # the user name when none is given
DEFAULT_PORT = 7860  # AUTOMATIC1111's port, the one its clients try first
PASSWORD_ENV = "FASTSD_WEBUI_PASSWORD"  # how a launcher hands a server its password (not argv)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def required(host: str, tunnel: bool = False) -> bool:
    """Whether a server bound to ``host`` (with a tunnel open or not) must ask for a password."""
    return tunnel or not is_loopback(host)


def generate_password() -> str:
    return secrets.token_urlsafe(12)


def login(user: str, password: str) -> str:
    """How the web UI's user name and password are shown to their owner, always together."""
    return f"user {user!r}, password {password}"


@dataclass
class BasicAuth:
    username: str
    password: str = field(repr=False)
    _failures: dict[str, tuple[int, float]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def with_generated_password(cls, username: str = DEFAULT_USER) -> "BasicAuth":
        return cls(username, generate_password())

    def check(self, header: str | None) -> bool:
        """Whether an Authorization header carries this user and password."""
        if not header or not header[:6].lower() == "basic ":
            return False
        try:
            user, _, pw = base64.b64decode(header[6:].strip(), validate=True).decode(
                "utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return False
        ok_user = secrets.compare_digest(user.encode(), self.username.encode())
        ok_pw = secrets.compare_digest(pw.encode(), self.password.encode())
        return ok_user and ok_pw

    def failed(self, client: str) -> float:
        """Record a failure from ``client``; the seconds to wait before answering it."""
        now = time.monotonic()
        with self._lock:
            n, last = self._failures.get(client, (0, now))
            if now - last > FORGET_AFTER:
                n = 0
            n += 1
            self._failures[client] = (n, now)
        return 0.0 if n <= FREE_FAILURES else min(BASE_DELAY * 2 ** (n - FREE_FAILURES - 1),
                                                  MAX_DELAY)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)

    def failures(self, client: str) -> int:
        return self._failures.get(client, (0, 0.0))[0]


def client_address(scope) -> str:
    """The caller's address; behind a local tunnel (the peer is loopback) the forwarded one."""
    peer = (scope.get("client") or ("", 0))[0]
    if is_loopback(peer):
        headers = dict(scope.get("headers") or [])
        for name in (b"cf-connecting-ip", b"x-forwarded-for", b"x-real-ip"):
            if name in headers:
                return headers[name].decode("latin-1").split(",")[0].strip()
    return peer


class AuthMiddleware:
    """ASGI middleware: every HTTP request and websocket needs ``auth``'s credentials."""

    def __init__(self, app, auth: BasicAuth):
        self.app = app
        self.auth = auth

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        header = headers.get(b"authorization", b"").decode("latin-1")
        client = client_address(scope)
        if self.auth.check(header):
            self.auth.succeeded(client)
            return await self.app(scope, receive, send)
        delay = self.auth.failed(client) if header else 0.0
        if delay:
            await asyncio.sleep(delay)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = (b'{"error": "Unauthorized", "detail": "Wrong or missing user name and password '
                b'(HTTP Basic auth)."}')
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", f'Basic realm="{REALM}"'.encode())]})
        await send({"type": "http.response.body", "body": body})
