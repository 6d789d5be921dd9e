"""Real local stand-ins for the tunnel tests: an HTTP server with Basic auth on localhost,
and a tunnel provider whose "tunnel" is a real TCP forwarder process on localhost."""

from __future__ import annotations

import base64
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fastsd.tunnel.base import Provider, Tunnel
from fastsd.errors import TunnelError

AUTH = ("artist", "correct horse")


class AuthServer:
    """A real HTTP server on 127.0.0.1: 401 without the password (unless ``open``)."""

    def __init__(self, auth: tuple[str, str] | None = AUTH, port: int = 0):
        expected = ("Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
                    if auth else None)
        self.auth_on = expected is not None  # a test may turn it off while serving
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                if outer.auth_on and self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="fastsd"')
                    self.end_headers()
                    return
                body = b"fastsd ok"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "AuthServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


FORWARDER = ("import sys\nfrom fastsd.tunnel.relay import forward\n"
             "forward(0, int(sys.argv[1]), ready=lambda p: print(p, flush=True))\n")


class LocalForward(Provider):
    """A provider whose tunnel is a forwarder process: its URL is a new localhost port."""

    name = "local"
    processes: list[subprocess.Popen] = []

    def open(self, port, deadline, root):
        proc = subprocess.Popen([sys.executable, "-c", FORWARDER, str(port)],
                                stdout=subprocess.PIPE, text=True)
        LocalForward.processes.append(proc)
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            proc.kill()
            raise TunnelError(f"the forwarder did not start ({line!r})")

        def close():
            proc.kill()
            proc.wait()
        return Tunnel(self.name, f"http://127.0.0.1:{line}", port, _closers=[close])


def wait_until(predicate, timeout: float = 30.0, step: float = 0.1) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return predicate()
