"""Public URLs for a server on this machine, so a phone or a laptop can reach the web UI.

Providers: a cloudflared quick tunnel, ngrok (through pyngrok, with the user's authtoken),
Gradio's share servers, localtunnel, and Colab's own port proxy (a URL that opens only in
the browser that runs the notebook). :func:`open_tunnel` opens the one asked for, or with
``"auto"`` tries them in :data:`AUTO_ORDER` until one gives a URL that answers a health
check *through the tunnel*. Every attempt is bounded in time and every failure is kept with
its reason, so the user sees why each provider was passed over.

A tunnel makes the server public, so none is opened without a password, and the health
check proves through the tunnel that the server refuses a request without one.

:class:`Keeper` checks an open tunnel now and then and opens a new one (with a new URL)
when it stops answering; the server behind it keeps running.

Binaries (cloudflared, ngrok) are downloaded once into the workspace's ``tools/`` folder
with their version recorded, and copied to local disk to run.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import os
import platform
import re
import select
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from fastsd import drive, fetch
from fastsd.errors import FastSDError, TunnelError
from fastsd.workspace import Workspace

log = logging.getLogger("fastsd")

AUTO_ORDER = ("cloudflared", "ngrok", "gradio", "localtunnel", "colab")
DEFAULT_TIMEOUT = 45.0  # seconds one provider may take to give a URL that answers
CHECK_TIMEOUT = 10.0  # seconds one health request may take
# Headers that skip the interstitial pages localtunnel and ngrok show to browsers.
CHECK_HEADERS = {"User-Agent": "fastsd-health/1", "bypass-tunnel-reminder": "1",
                 "ngrok-skip-browser-warning": "1"}
NGROK_SECRET = "NGROK_AUTHTOKEN"  # Colab secret name and environment variable
LOCALTUNNEL_HOST = "https://localtunnel.me"
LOCAL_TOOLS = Path(tempfile.gettempdir()) / "fastsd-tools"  # binaries run from local disk

Auth = tuple[str, str]


# --------------------------------------------------------------------------- results


@dataclass
class Attempt:
    """One provider's try: the URL it gave, or why it failed."""

    provider: str
    ok: bool
    reason: str
    seconds: float

    def __str__(self) -> str:
        state = "ok" if self.ok else "failed"
        return f"{self.provider}: {state} after {self.seconds:.1f}s: {self.reason}"


@dataclass
class Tunnel:
    """An open tunnel from ``url`` to ``127.0.0.1:port``. ``close()`` ends it."""

    provider: str
    url: str
    port: int
    checkable: bool = True  # False when only the notebook's browser can open the URL
    note: str = ""  # what the visitor must know (localtunnel's page password, ...)
    attempts: list[Attempt] = field(default_factory=list)
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def close(self) -> None:
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except Exception as e:  # closing must go on for the rest
                log.warning("Closing the %s tunnel: %s", self.provider, e)

    def __enter__(self) -> "Tunnel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- health


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


def _get(url: str, timeout: float) -> bytes:
    """The body of a small API answer (localtunnel's); files go through fastsd.fetch."""
    req = urllib.request.Request(url, headers={"User-Agent": "fastsd"})
    with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (fixed hosts)
        return r.read(1 << 20)


def check(url: str, auth: Auth, path: str = "/", timeout: float = CHECK_TIMEOUT) -> str | None:
    """Check a server through ``url``: ``None`` when healthy, else the reason it is not.

    Healthy means: a request without credentials is refused with 401 (the password is on)
    and one with them is answered below 400.
    """
    target = url.rstrip("/") + path
    try:
        anonymous = request_status(target, None, timeout)
    except OSError as e:
        return f"no answer from {url} ({_reason(e)})"
    if anonymous < 400:
        return (f"{url} answered {anonymous} without a password: the server's auth is off, "
                "and a public URL must not open the GPU to anyone")
    if anonymous != 401:
        return f"{url} answered {anonymous} (the tunnel does not reach the server)"
    try:
        status = request_status(target, auth, timeout)
    except OSError as e:
        return f"no answer from {url} with the password ({_reason(e)})"
    if status >= 400:
        return f"{url} answered {status} with the password"
    return None


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and e.reason is not None:
        e = e.reason if isinstance(e.reason, BaseException) else e
    return str(e) or type(e).__name__


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
        reason = check(f"http://127.0.0.1:{tunnel.port}", auth, path)
        if reason:
            raise TunnelError(reason)
        return
    reason = "no check ran"
    while True:
        left = deadline - time.monotonic()
        reason = check(tunnel.url, auth, path, timeout=max(1.0, min(CHECK_TIMEOUT, left)))
        if reason is None:
            return
        if "without a password" in reason or time.monotonic() + 1 > deadline:
            raise TunnelError(reason)
        time.sleep(1.0)


# --------------------------------------------------------------------------- binaries


@dataclass(frozen=True)
class Tool:
    """A binary a tunnel needs: where to get it for this machine, and its pinned version."""

    name: str
    version: str  # the pinned version, or "stable" where the vendor serves only the latest
    urls: dict[str, str]  # platform key ("linux-amd64", ...) -> URL
    member: str | None = None  # the file inside a .tgz/.zip download, None for a bare binary

    def url(self) -> str:
        key = platform_key()
        if key not in self.urls:
            raise TunnelError(f"{self.name} has no build for this machine ({key}).")
        return self.urls[key]


def platform_key() -> str:
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        machine, machine)
    return f"{sys.platform}-{arch}"


_CF = "https://github.com/cloudflare/cloudflared/releases/download/{v}/cloudflared-{p}"
CLOUDFLARED = Tool("cloudflared", "2025.1.0", {
    "linux-amd64": _CF.format(v="2025.1.0", p="linux-amd64"),
    "linux-arm64": _CF.format(v="2025.1.0", p="linux-arm64"),
})
# ngrok serves only its latest v3 agent; the version it reports is recorded when fetched.
_NG = "https://bin.equinox.io/c/bNyj1mQVY4c/ngrok-v3-stable-{p}.tgz"
NGROK = Tool("ngrok", "stable", {
    "linux-amd64": _NG.format(p="linux-amd64"),
    "linux-arm64": _NG.format(p="linux-arm64"),
}, member="ngrok")


def tools_dir(root: Workspace | Path | None = None) -> Path:
    return Workspace.current(root).tools


def ensure_tool(tool: Tool, root: Workspace | Path | None = None) -> Path:
    """The path of ``tool``'s binary on local disk, downloaded into the workspace once.

    The workspace keeps ``tools/NAME/NAME`` and ``tools/NAME/version.json`` (version, URL,
    SHA-256, when). Drive may not run binaries, so a local copy is the one that runs.
    The download goes through fastsd.fetch: offline, it fails within its connect timeout.
    """
    folder = tools_dir(root) / tool.name
    kept, record = folder / tool.name, folder / "version.json"
    if not (kept.is_file() and record.is_file()):
        url = tool.url()
        download = folder / ("download-" + url.rsplit("/", 1)[-1])
        try:
            fetch.http_file(url, download)
        except FastSDError as e:
            raise TunnelError(f"could not download {tool.name}: {e} After the first download "
                              f"the copy in {folder} is used.") from None
        data = download.read_bytes()
        if tool.member:
            data = _extract(data, tool.member, url)
        drive.atomic_write_bytes(kept, data)
        download.unlink()
        local = _local_copy(kept)
        version = _version_of(local) or tool.version
        drive.atomic_write_json(record, {"name": tool.name, "version": version, "url": url,
                                         "sha256": hashlib.sha256(data).hexdigest(),
                                         "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                  time.gmtime())})
        log.info("Downloaded %s %s into %s", tool.name, version, folder)
        return local
    return _local_copy(kept)


def tool_version(tool: Tool, root: Workspace | Path | None = None) -> str | None:
    """The recorded version of ``tool`` in the workspace, or None when it was never fetched."""
    record = tools_dir(root) / tool.name / "version.json"
    return drive.read_json(record).get("version") if record.is_file() else None


def _extract(data: bytes, member: str, url: str) -> bytes:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            f = tar.extractfile(member)
            if f is None:
                raise KeyError(member)
            return f.read()
    except (tarfile.TarError, KeyError, OSError) as e:
        raise TunnelError(f"the download from {url} is not the expected archive ({e}); "
                          "try again later.") from e


def _local_copy(kept: Path) -> Path:
    LOCAL_TOOLS.mkdir(parents=True, exist_ok=True)
    local = LOCAL_TOOLS / kept.name
    if not local.is_file() or local.stat().st_size != kept.stat().st_size:
        drive.copy_file(kept, local)
    local.chmod(local.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return local


def _version_of(binary: Path) -> str | None:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             timeout=15, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"\d+\.\d+\.\d+", out)
    return found.group(0) if found else None


# --------------------------------------------------------------------------- processes


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
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._thread.is_alive()):
                    return None
                self._cond.wait(min(left, 0.5))

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


def _spawn(cmd: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True, **kw)


# --------------------------------------------------------------------------- providers


class Provider:
    """A way to a public URL. ``open`` returns a Tunnel or raises TunnelError with the reason."""

    name = "?"
    checkable = True

    def open(self, port: int, deadline: float, root: Workspace | Path | None) -> Tunnel:
        raise NotImplementedError


class Cloudflared(Provider):
    """A cloudflared quick tunnel: a random trycloudflare.com URL, no account needed."""

    name = "cloudflared"
    URL = re.compile(r"https://[a-z0-9-]+\.trycloudflare\.com")

    def open(self, port: int, deadline: float, root: Workspace | Path | None) -> Tunnel:
        binary = ensure_tool(CLOUDFLARED, root)
        proc = _spawn([str(binary), "tunnel", "--no-autoupdate", "--url",
                       f"http://127.0.0.1:{port}"])
        out = _Output(proc)
        url = out.wait_for(self.URL, deadline)
        if url is None:
            _terminate(proc)
            raise TunnelError(f"cloudflared gave no URL in time (its last words: {out.tail()})")
        return Tunnel(self.name, url, port, _closers=[lambda: _terminate(proc)])


def ngrok_token() -> str | None:
    """The user's ngrok authtoken from Colab's secrets, else $NGROK_AUTHTOKEN. Never logged."""
    try:
        from google.colab import userdata  # type: ignore[import-not-found]
    except ImportError:
        userdata = None
    if userdata is not None:
        try:
            token = userdata.get(NGROK_SECRET)
        except Exception as e:  # SecretNotFoundError, NotebookAccessError, TimeoutException
            log.debug("No Colab secret %s: %s", NGROK_SECRET, type(e).__name__)
        else:
            if token:
                return token.strip()
    return (os.environ.get(NGROK_SECRET) or "").strip() or None


class Ngrok(Provider):
    """ngrok through pyngrok. Needs a (free) account's authtoken: Colab secret or env var.

    The token goes into a private ngrok config file on local disk, never onto a command
    line (where ``ps`` would show it) nor into a log.
    """

    name = "ngrok"

    def open(self, port: int, deadline: float, root: Workspace | Path | None) -> Tunnel:
        token = ngrok_token()
        if not token:
            raise TunnelError(f"no ngrok authtoken: add a Colab secret named {NGROK_SECRET} "
                              "(the key icon on the left; allow this notebook to read it) or "
                              f"set ${NGROK_SECRET}. A free ngrok account gives one.")
        try:
            from pyngrok import conf, ngrok
            from pyngrok.exception import PyngrokError
        except ImportError as e:
            raise TunnelError("pyngrok is not installed; run the install cell.") from e
        binary = ensure_tool(NGROK, root)
        private = Path(tempfile.mkdtemp(prefix="fastsd-ngrok-"))
        config = private / "ngrok.yml"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f'version: "3"\nagent:\n  authtoken: {json.dumps(token)}\n')
        cfg = conf.PyngrokConfig(ngrok_path=str(binary), config_path=str(config),
                                 startup_timeout=max(1, int(_left(deadline))),
                                 request_timeout=min(CHECK_TIMEOUT, _left(deadline)),
                                 monitor_thread=True)  # drains its log pipe
        cfg.auth_token = None  # PyngrokConfig reads $NGROK_AUTHTOKEN onto the command line
        cleanup = [lambda: shutil.rmtree(private, ignore_errors=True)]
        try:
            tunnel = ngrok.connect(str(port), "http", pyngrok_config=cfg)
        except (PyngrokError, OSError) as e:
            with contextlib.suppress(Exception):
                ngrok.kill(cfg)
            cleanup[0]()
            raise TunnelError(f"ngrok did not start: {_scrub(str(e), token)}") from None
        cleanup.append(lambda: ngrok.kill(cfg))
        return Tunnel(self.name, tunnel.public_url, port, _closers=cleanup)


def _scrub(text: str, *secrets: str) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


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
        worker.join(_left(deadline))
        if worker.is_alive():
            close()
            raise TunnelError("Gradio's share server gave no URL in time")
        if "error" in result:
            close()
            err = result["error"]
            cause = err.__cause__ or err
            raise TunnelError(f"Gradio's share server failed ({_reason(err)}: {_reason(cause)})")
        return Tunnel(self.name, result["url"], port, _closers=[close])


class Localtunnel(Provider):
    """localtunnel.me, spoken to directly: one HTTP request for a name, then TCP links.

    The page asks a first-time visitor for a "tunnel password", which is this machine's
    public IP address; it is shown with the URL.
    """

    name = "localtunnel"

    def __init__(self, host: str = LOCALTUNNEL_HOST):
        self.host = host

    def open(self, port: int, deadline: float, root: Workspace | Path | None) -> Tunnel:
        try:
            info = json.loads(_get(f"{self.host}/?new", timeout=_left(deadline)))
            remote_port, url = int(info["port"]), str(info["url"])
            links = max(1, min(int(info.get("max_conn_count", 8)), 10))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TunnelError(f"localtunnel gave no tunnel ({_reason(e)})") from None
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


class ColabProxy(Provider):
    """Colab's own port proxy: a URL that opens in the browser that runs the notebook.

    No third party is involved and only the signed-in notebook user can open it, so it is
    the choice on a laptop. It cannot be checked from here (it needs that browser's
    cookies), so the server is checked directly instead.
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
                                 "{'cache': false})", timeout_sec=max(1, _left(deadline)))
        except Exception as e:  # eval_js raises its own timeout and message errors
            raise TunnelError(f"Colab's port proxy gave no URL ({_reason(e)})") from None
        if not isinstance(url, str) or not url.startswith("http"):
            raise TunnelError(f"Colab's port proxy gave no URL (it returned {url!r})")
        return Tunnel(self.name, url, port, checkable=False)


PROVIDERS: dict[str, Callable[[], Provider]] = {
    "cloudflared": Cloudflared, "ngrok": Ngrok, "gradio": GradioShare,
    "localtunnel": Localtunnel, "colab": ColabProxy,
}


def _left(deadline: float) -> float:
    return max(0.5, deadline - time.monotonic())


# --------------------------------------------------------------------------- relaying


def _pipe(a: socket.socket, b: socket.socket, stop: threading.Event | None = None) -> None:
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
        _pipe(remote, local, stop)


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
            threading.Thread(target=_pipe, args=(conn, up), daemon=True).start()


# --------------------------------------------------------------------------- opening


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
    lists every provider with its reason. ``auth`` is required: see :func:`require_auth`.
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


# --------------------------------------------------------------------------- keeping


class Keeper:
    """Checks a tunnel every ``interval`` seconds; after ``failures`` failed checks in a
    row it closes it and opens a new one through ``reopen`` (``on_change`` gets the new
    tunnel, to show its URL). The server behind it is never touched."""

    def __init__(self, tunnel: Tunnel, auth: Auth, reopen: Callable[[], Tunnel],
                 on_change: Callable[[Tunnel], None] | None = None, interval: float = 30.0,
                 failures: int = 2, path: str = "/"):
        self.tunnel, self.auth, self.reopen = tunnel, require_auth(auth), reopen
        self.on_change, self.interval, self.failures, self.path = (
            on_change, interval, failures, path)
        self.reopened = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastsd-tunnel-keeper",
                                        daemon=True)

    def start(self) -> "Keeper":
        self._thread.start()
        return self

    def stop(self, close: bool = True) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(self.interval + CHECK_TIMEOUT * 2)
        if close:
            self.tunnel.close()

    def _healthy(self) -> str | None:
        t = self.tunnel
        url = t.url if t.checkable else f"http://127.0.0.1:{t.port}"
        return check(url, self.auth, self.path, timeout=min(CHECK_TIMEOUT, self.interval))

    def _run(self) -> None:
        bad = 0
        while not self._stop.wait(self.interval):
            reason = self._healthy()
            if reason is None:
                bad = 0
                continue
            bad += 1
            log.warning("The tunnel %s failed a health check (%d/%d): %s", self.tunnel.url,
                        bad, self.failures, reason)
            if bad < self.failures:
                continue
            self.tunnel.close()
            try:
                new = self.reopen()
            except TunnelError as e:
                self.last_error = str(e)
                log.error("The tunnel died and could not be reopened; trying again in %.0fs. "
                          "%s", self.interval, e)
                continue
            bad = 0
            self.tunnel, self.reopened = new, self.reopened + 1
            log.warning("The tunnel was reopened: the web UI is now at %s", new.url)
            if self.on_change:
                try:
                    self.on_change(new)
                except Exception:  # showing the URL must not kill the keeper
                    log.exception("Showing the new tunnel URL failed")


# --------------------------------------------------------------------------- showing


def qr_svg(url: str, scale: int = 4) -> str:
    """An inline SVG QR code of ``url``, for a phone's camera."""
    import segno

    return segno.make(url, error="m").svg_inline(scale=scale, dark="#000", light="#fff")


def qr_png(url: str, path: str | os.PathLike[str], scale: int = 6) -> Path:
    import segno

    buf = io.BytesIO()
    segno.make(url, error="m").save(buf, kind="png", scale=scale)
    return drive.atomic_write_bytes(path, buf.getvalue())


def link_html(url: str, title: str = "Open the web UI", note: str = "") -> str:
    """A clickable link and a QR code of ``url``, as HTML for a notebook cell."""
    import html

    safe = html.escape(url, quote=True)
    extra = f"<div>{html.escape(note)}</div>" if note else ""
    return (f'<div style="font-family:sans-serif"><div style="font-size:1.2em">'
            f'<a href="{safe}" target="_blank" rel="noopener">{html.escape(title)}: {safe}</a>'
            f"</div>{extra}<div>{qr_svg(url)}</div></div>")
