"""A web server run as its own process, in the background of a notebook cell.

:func:`launch` starts the server as its own process and returns at once, so the cell ends
and the kernel stays free (for captioning, notes, another cell). A thread waits for the
server to answer, then opens the tunnel asked for and shows the link and QR code in the
cell; :meth:`Server.wait_ready` waits for that from a script.

One server per machine: its pid, port and what it serves are kept in a small state file
on local disk (``$FASTSD_RUN_DIR``, default ``/tmp/fastsd-run``; a pid means nothing on
another runtime, so never on Drive). A second launch of the same thing reuses the running
server; a launch of anything else stops it first, so two servers never fight over the GPU.
The server's output goes to a log file in the session.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from fastsd import drive
from fastsd.errors import LaunchError, TunnelError
from fastsd.tunnel.auto import open_tunnel, providers_for
from fastsd.tunnel.base import DEFAULT_TIMEOUT, Auth, Tunnel
from fastsd.tunnel.health import request_status, require_auth
from fastsd.tunnel.keeper import Keeper
from fastsd.tunnel.link import link_html
from fastsd.webui.auth import PASSWORD_ENV

log = logging.getLogger("fastsd")

RUN_DIR_ENV = "FASTSD_RUN_DIR"
STATE_FILE = "server.json"
READY_TIMEOUT = 600.0  # loading a big model from Drive can take minutes
STOP_TIMEOUT = 20.0
# A route both our server and AUTOMATIC1111/Forge (--api) serve: 401 without the
# password, 200 with it.
HEALTH_PATH = "/sdapi/v1/samplers"

_current: "Server | None" = None  # the server this kernel launched, with its tunnel


def run_dir() -> Path:
    path = Path(os.environ.get(RUN_DIR_ENV) or Path(tempfile.gettempdir()) / "fastsd-run")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fingerprint(command: list[str], port: int, auth: Auth | None, salt: str) -> str:
    """What a server serves, its port and its password, hashed: two launches with the same
    fingerprint are the same server. The password itself is never written anywhere."""
    h = hashlib.sha256(salt.encode())
    for part in (*command, str(port), *(auth or ("", ""))):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


@dataclass
class Server:
    """A server process started by :func:`launch`. ``stop()`` ends it."""

    pid: int
    port: int
    log: Path
    command: list[str]
    fingerprint: str
    salt: str
    started: float
    create_time: float
    user: str | None = None
    health_path: str = "/"
    public_url: str | None = None
    # Known only to the kernel that launched it:
    auth: Auth | None = field(default=None, repr=False)
    tunnel: Tunnel | None = field(default=None, repr=False)
    keeper: Keeper | None = field(default=None, repr=False)
    error: str | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    _ready: threading.Event = field(default_factory=threading.Event, repr=False)
    _display: Any = field(default=None, repr=False)

    # ------------------------------------------------------------------ state
    @property
    def local_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.public_url or self.local_url

    def to_state(self) -> dict:
        keep = ("pid", "port", "command", "fingerprint", "salt", "started", "create_time",
                "user", "health_path", "public_url")
        return {**{k: getattr(self, k) for k in keep}, "log": str(self.log)}

    def save_state(self) -> None:
        drive.atomic_write_json(run_dir() / STATE_FILE, self.to_state())

    def alive(self) -> bool:
        """Whether the process still runs (and is the one started, not a reused pid)."""
        if self.process is not None:
            return self.process.poll() is None
        import psutil

        try:
            proc = psutil.Process(self.pid)
            return (abs(proc.create_time() - self.create_time) < 1.0
                    and proc.status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ waiting
    def wait_ready(self, timeout: float = READY_TIMEOUT) -> "Server":
        """Wait until the server answers (and its tunnel is open, when one was asked for).

        Raises LaunchError with the end of the server's log when it failed to start.
        """
        if not self._ready.wait(timeout):
            raise LaunchError(f"The server did not answer within {timeout:.0f}s. It is still "
                              f"starting or stuck; its log is {self.log}. Last lines:\n"
                              f"{self.log_tail()}")
        if self.error:
            raise LaunchError(self.error)
        return self

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self.error

    # ------------------------------------------------------------------ stopping
    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """End the tunnel and the server (SIGTERM to its process group, SIGKILL after
        ``timeout``), and forget it."""
        global _current
        if self.keeper is not None:
            self.keeper.stop(close=True)
        elif self.tunnel is not None:
            self.tunnel.close()
        self.keeper = self.tunnel = None
        self.public_url = None
        if self.alive():
            _signal_group(self.pid, signal.SIGTERM)
            if not self._wait_exit(timeout):
                log.warning("The server (pid %d) did not stop in %.0fs; killing it.",
                            self.pid, timeout)
                _signal_group(self.pid, signal.SIGKILL)
                self._wait_exit(timeout)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(1)
        state = run_dir() / STATE_FILE
        with contextlib.suppress(OSError, ValueError):
            if drive.read_json(state).get("pid") == self.pid:
                state.unlink()
        if _current is self:
            _current = None
        self._show(f"Stopped the server (log: {self.log}).")

    def _wait_exit(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.alive():
                return True
            time.sleep(0.1)
        return not self.alive()

    # ------------------------------------------------------------------ showing
    def _show(self, text: str, url: str | None = None, note: str = "") -> None:
        log.info("%s%s", text, f" {url}" if url else "")
        handle = self._display
        if handle is None:
            return
        import html

        from IPython.display import HTML

        body = f"<div>{html.escape(text)}</div>"
        if url:
            body += link_html(url, note=note)
        handle.update(HTML(body))

    def _attach_display(self) -> None:
        try:
            from IPython import get_ipython
            from IPython.display import HTML, display
        except ImportError:
            return
        if get_ipython() is None:
            return
        self._display = display(HTML("<div>Starting the web UI…</div>"), display_id=True)

    def __repr__(self) -> str:
        state = "ready" if self.ready else ("failed" if self.error else "starting")
        return f"<Server pid={self.pid} {state} at {self.url} log={self.log}>"


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(os.getpgid(pid), sig)
    except ProcessLookupError:
        return
    except PermissionError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    with open(run_dir() / "launch.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def current() -> Server | None:
    """The server running on this machine, if any (launched by this kernel or another)."""
    global _current
    state = run_dir() / STATE_FILE
    try:
        data = drive.read_json(state)
    except (OSError, ValueError):
        data = None
    if _current is not None and data and data.get("pid") == _current.pid:
        return _current if _current.alive() else None
    if not data:
        return None
    server = Server(**{**data, "log": Path(data["log"])})
    if not server.alive():
        with contextlib.suppress(OSError):
            state.unlink()
        return None
    server._ready.set()  # it was started before this kernel: treat it as serving
    return server


def stop() -> bool:
    """Stop the server running on this machine. Returns whether there was one."""
    with _lock():
        server = current()
        if server is None:
            return False
        server.stop()
        return True


def port_free(port: int) -> bool:
    """Whether a server could listen on ``port`` (as servers do, with SO_REUSEADDR, so
    connections closing in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def answers(url: str, auth: Auth | None, timeout: float = 5.0) -> int | None:
    """The HTTP status ``url`` answers with (with ``auth``), or None when nothing answers."""
    try:
        return request_status(url, auth, timeout)
    except OSError:
        return None


def launch(command: list[str], port: int, log_path: Path, *, auth: Auth | None = None,
           tunnel: str | None = None, env: dict[str, str] | None = None,
           cwd: Path | None = None, health_path: str = "/", ready_timeout: float = READY_TIMEOUT,
           tunnel_timeout: float = DEFAULT_TIMEOUT, keep_interval: float = 30.0,
           on_url: Callable[[str], None] | None = None) -> Server:
    """Start ``command`` (a server listening on ``port``) in the background and return.

    ``auth`` is (user, password); its password reaches the child only through the
    environment variable PASSWORD_ENV. With ``tunnel`` (a provider name or ``"auto"``)
    a password is required, and a tunnel is opened once the server answers and kept open
    by a :class:`~fastsd.tunnel.keeper.Keeper`. The same command, port and password as the
    running server reuse it; anything else replaces it.
    """
    global _current
    if tunnel:
        try:
            require_auth(auth)
        except TunnelError as e:
            raise LaunchError(str(e)) from None
        providers_for(tunnel)
    with _lock():
        old = current()
        if old is not None:
            if old.fingerprint == _fingerprint(command, port, auth, old.salt) and (
                    not tunnel or old.tunnel is not None or old is not _current):
                log.info("The server (pid %d) already serves this; reusing it.", old.pid)
                if old is not _current:
                    old.auth = auth
                    _current = old
                    if tunnel:
                        _start_watch(old, tunnel, tunnel_timeout, ready_timeout,
                                     keep_interval, on_url)
                return old
            log.info("Stopping the running server (pid %d) before starting another.", old.pid)
            old.stop()
        if not port_free(port):
            raise LaunchError(f"Port {port} is already in use by another program. Stop it, "
                              "or launch on another port.")
        log_path = Path(log_path)
        drive.make_folder(log_path.parent)
        child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        child_env.pop(PASSWORD_ENV, None)
        if auth:
            child_env[PASSWORD_ENV] = auth[1]
        with open(log_path, "ab") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: "
                      f"{' '.join(command)}\n".encode())
            out.flush()
            try:
                proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=child_env, cwd=cwd,
                                        start_new_session=True)
            except OSError as e:
                raise LaunchError(f"Could not start {command[0]}: {e}") from e
        import psutil

        salt = secrets.token_hex(8)
        server = Server(pid=proc.pid, port=port, log=log_path, command=list(command),
                        fingerprint=_fingerprint(command, port, auth, salt), salt=salt,
                        started=time.time(), create_time=psutil.Process(proc.pid).create_time(),
                        user=auth[0] if auth else None, health_path=health_path, auth=auth,
                        process=proc)
        server.save_state()
        _current = server
    server._attach_display()
    server._show(f"Starting the web UI (log: {log_path})…")
    _start_watch(server, tunnel, tunnel_timeout, ready_timeout, keep_interval, on_url)
    return server


def _start_watch(server: Server, tunnel: str | None, tunnel_timeout: float,
                 ready_timeout: float, keep_interval: float,
                 on_url: Callable[[str], None] | None) -> None:
    server._ready.clear()
    threading.Thread(target=_watch, name="fastsd-launch", daemon=True,
                     args=(server, tunnel, tunnel_timeout, ready_timeout, keep_interval,
                           on_url)).start()


def _watch(server: Server, tunnel: str | None, tunnel_timeout: float, ready_timeout: float,
           keep_interval: float, on_url: Callable[[str], None] | None) -> None:
    """Wait for the server to answer, then open and keep its tunnel; report either way."""
    try:
        _wait_serving(server, ready_timeout)
        if tunnel:
            assert server.auth is not None
            auth, path = server.auth, server.health_path

            def reopen() -> Tunnel:
                return open_tunnel(server.port, auth, tunnel, tunnel_timeout, path)

            def changed(t: Tunnel) -> None:
                server.tunnel, server.public_url = t, t.url
                with contextlib.suppress(OSError):
                    server.save_state()
                server._show("The tunnel was reopened; the web UI's new address:", t.url,
                             t.note)
                if on_url:
                    on_url(t.url)

            t = reopen()
            server.tunnel, server.public_url = t, t.url
            server.keeper = Keeper(t, auth, reopen, changed, interval=keep_interval,
                                   path=path).start()
            server.save_state()
        note = server.tunnel.note if server.tunnel else ""
        passed = [str(a) for a in (server.tunnel.attempts[:-1] if server.tunnel else [])]
        if passed:
            note = " ".join([note, "Passed over:", "; ".join(passed)]).strip()
        server._show("The web UI is ready:", server.url, note)
        if on_url:
            on_url(server.url)
    except TunnelError as e:
        server.error = str(e)
        server._show(f"The web UI runs on this machine ({server.local_url}), but no public "
                     f"URL could be opened: {e}")
    except LaunchError as e:
        server.error = str(e)
        server._show(f"The web UI did not start: {e}")
    finally:
        server._ready.set()


def _wait_serving(server: Server, timeout: float) -> None:
    end = time.monotonic() + timeout
    url = server.local_url + server.health_path
    while True:
        if not server.alive():
            code = server.process.poll() if server.process is not None else None
            raise LaunchError(f"The server stopped while starting (exit status {code}). "
                              f"The end of its log ({server.log}):\n{server.log_tail()}")
        status = answers(url, server.auth, timeout=5.0)
        if status == 401 and server.auth:
            raise LaunchError(f"The server refuses its own password at {url} (401): it did "
                              f"not get it. Its log ({server.log}):\n{server.log_tail()}")
        if status is not None and status < 500:
            return
        if time.monotonic() > end:
            raise LaunchError(f"The server did not answer within {timeout:.0f}s. Its log "
                              f"({server.log}) ends with:\n{server.log_tail()}")
        time.sleep(0.5)
