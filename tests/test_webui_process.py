"""fastsd.webui.process: launch in the background, stop and relaunch of a real server
process on localhost."""

from __future__ import annotations

import sys

import psutil
import pytest

from fastsd.errors import LaunchError
from fastsd.tunnel import auto, health
from fastsd.webui import process
from tunnel_helpers import AUTH, LocalForward, wait_until

# A real server: Basic auth with the password from the environment, as the launcher
# hands it over; it waits DELAY seconds before listening, like a model loading.
CHILD = r"""
import base64, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port, delay, mode = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
print("hello from the server", flush=True)
if mode == "crash":
    print("CUDA out of memory while loading the model", flush=True)
    sys.exit(3)
if mode == "stubborn":
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
password = os.environ.get("FASTSD_WEBUI_PASSWORD")
expected = "Basic " + base64.b64encode(f"artist:{password}".encode()).decode()
time.sleep(delay)
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        if password and self.headers.get("Authorization") != expected:
            self.send_response(401); self.end_headers(); return
        self.send_response(200); self.end_headers(); self.wfile.write(b"page")
    def log_message(self, *a):
        print("request", self.path, flush=True)
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(port: int, delay: float = 0.0, mode: str = "ok") -> list[str]:
    return [sys.executable, "-c", CHILD, str(port), str(delay), mode]


@pytest.fixture(autouse=True)
def run_dir(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    monkeypatch.setenv(process.RUN_DIR_ENV, str(folder))
    monkeypatch.setattr(process, "_current", None)
    yield folder
    server = process.current()
    if server is not None:
        server.stop(timeout=5)


@pytest.fixture
def log_path(workspace):
    return workspace / "sessions" / "dog" / "logs" / "webui.log"


def test_launch_returns_at_once_and_serves(log_path):
    port = free_port()
    server = process.launch(command(port, delay=2.0), port, log_path, auth=AUTH)
    assert not server.ready  # returned while the server is still starting
    assert process.answers(server.local_url, AUTH, timeout=1) is None
    server.wait_ready(60)
    assert process.answers(server.local_url, AUTH) == 200
    assert process.answers(server.local_url, None) == 401
    assert process.answers(server.local_url, ("artist", "wrong")) == 401
    assert "hello from the server" in log_path.read_text()
    assert AUTH[1] not in log_path.read_text()
    assert AUTH[1] not in " ".join(psutil.Process(server.pid).cmdline())
    assert AUTH[1] not in (process.run_dir() / process.STATE_FILE).read_text()


def test_stop_ends_the_server_and_frees_the_port(log_path, run_dir):
    port = free_port()
    server = process.launch(command(port), port, log_path, auth=AUTH).wait_ready(60)
    pid = server.pid
    assert process.current() is server
    assert process.stop() is True
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert process.port_free(port)
    assert process.current() is None and not (run_dir / process.STATE_FILE).exists()
    assert process.stop() is False


def test_the_same_launch_reuses_the_running_server(log_path):
    port = free_port()
    first = process.launch(command(port), port, log_path, auth=AUTH).wait_ready(60)
    again = process.launch(command(port), port, log_path, auth=AUTH).wait_ready(60)
    assert again is first and first.alive()


def test_another_launch_replaces_the_first_never_two_servers(log_path):
    port = free_port()
    first = process.launch(command(port), port, log_path, auth=AUTH).wait_ready(60)
    other = process.launch(command(port), port, log_path,
                           auth=("artist", "another password")).wait_ready(60)
    assert other.pid != first.pid and not first.alive() and other.alive()
    assert process.answers(other.local_url, ("artist", "another password")) == 200
    third = process.launch(command(port, mode="ok2"), port, log_path,
                           auth=("artist", "another password")).wait_ready(60)
    assert not other.alive() and third.alive()
    servers = [p for p in psutil.process_iter(["cmdline"])
               if p.info["cmdline"] and "hello from the server" in " ".join(p.info["cmdline"])]
    assert [p.pid for p in servers] == [third.pid]


def test_a_new_kernel_finds_the_server_and_replaces_it(log_path, monkeypatch):
    """After a kernel restart only the state file knows the server."""
    port = free_port()
    first = process.launch(command(port), port, log_path, auth=AUTH).wait_ready(60)
    monkeypatch.setattr(process, "_current", None)  # a fresh kernel
    found = process.current()
    assert found is not first and found.pid == first.pid and found.alive()
    same = process.launch(command(port), port, log_path, auth=AUTH)
    assert same.pid == first.pid  # same command and password: reused
    monkeypatch.setattr(process, "_current", None)
    new_port = free_port()
    other = process.launch(command(new_port), new_port, log_path, auth=AUTH).wait_ready(60)
    assert other.pid != first.pid
    assert wait_until(lambda: not psutil.pid_exists(first.pid)
                      or psutil.Process(first.pid).status() == psutil.STATUS_ZOMBIE, 10)


def test_a_server_that_fails_to_start_says_why_with_its_log(log_path):
    port = free_port()
    server = process.launch(command(port, mode="crash"), port, log_path, auth=AUTH)
    with pytest.raises(LaunchError) as e:
        server.wait_ready(60)
    assert "exit status 3" in str(e.value)
    assert "CUDA out of memory while loading the model" in str(e.value)
    assert str(log_path) in str(e.value)


def test_a_server_that_ignores_sigterm_is_killed(log_path):
    port = free_port()
    server = process.launch(command(port, mode="stubborn"), port, log_path,
                           auth=AUTH).wait_ready(60)
    server.stop(timeout=1.0)
    assert not server.alive() and process.port_free(port)


def test_a_port_taken_by_another_program_is_named(log_path):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as other:
        port = other.getsockname()[1]
        with pytest.raises(LaunchError, match=f"Port {port} is already in use"):
            process.launch(command(port), port, log_path, auth=AUTH)


def test_no_tunnel_without_a_password(log_path):
    port = free_port()
    with pytest.raises(LaunchError, match="never opened without"):
        process.launch(command(port), port, log_path, auth=None, tunnel="auto")
    assert process.current() is None


def test_launch_with_a_tunnel_shows_its_url_and_keeps_it_open(log_path, monkeypatch):
    monkeypatch.setitem(auto.PROVIDERS, "local", LocalForward)
    port = free_port()
    urls = []
    server = process.launch(command(port, delay=1.0), port, log_path, auth=AUTH,
                           tunnel="local", keep_interval=0.3, on_url=urls.append)
    server.wait_ready(60)
    assert server.public_url and server.public_url != server.local_url
    assert urls == [server.public_url]
    assert health.check(server.public_url, AUTH) is None
    first = server.public_url
    LocalForward.processes[-1].kill()
    assert wait_until(lambda: len(urls) == 2, 30)
    assert server.public_url == urls[1] != first and health.check(urls[1], AUTH) is None
    assert process.answers(server.local_url, AUTH) == 200  # the server kept running
    server.stop()
    assert health.check(urls[1], AUTH, timeout=2).startswith("no answer")


def test_a_notebook_cell_launches_and_the_kernel_stays_usable(tmp_path, log_path):
    """In a real Jupyter kernel: the launch cell returns while the server still starts,
    the next cell runs at once, and the cell's display ends with the link."""
    import nbformat
    from nbclient import NotebookClient

    port = free_port()
    cells = [
        "import time\nfrom fastsd.webui import process\n"
        f"t0 = time.monotonic()\nserver = process.launch({command(port, delay=3.0)!r}, {port}, "
        f"{str(log_path)!r}, auth={AUTH!r})\nreturned_in = time.monotonic() - t0",
        "ready_after_launch = server.ready\nsquare = 12 * 12\nprint(ready_after_launch, square)",
        "server.wait_ready(60)\nprint(process.answers(server.local_url, server.auth))",
        "server.stop()\nprint(server.alive())",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})

    def shown() -> str:  # the launch cell's display, as updated in place
        return "".join(o["data"].get("text/html", "") for o in nb.cells[0].outputs
                       if o.output_type == "display_data")

    with client.setup_kernel():
        client.execute_cell(nb.cells[0], 0)
        assert "Starting the web UI" in shown()  # what the cell showed as it returned
        for i in (1, 2):
            client.execute_cell(nb.cells[i], i)
        ready = shown()
        client.execute_cell(nb.cells[3], 3)
    text = [[o.get("text", "") for o in c.outputs if o.output_type == "stream"]
            for c in nb.cells]
    assert text[1] == ["False 144\n"]  # the kernel ran a cell while the server started
    assert text[2] == ["200\n"] and text[3] == ["False\n"]
    assert "The web UI is ready" in ready and f'href="http://127.0.0.1:{port}"' in ready
    assert "<svg" in ready  # the QR code
    assert "Stopped the server" in shown()
    assert process.port_free(port)


def test_when_no_tunnel_opens_the_server_still_runs_and_every_reason_is_given(log_path):
    port = free_port()
    server = process.launch(command(port), port, log_path, auth=AUTH,
                            tunnel=["localtunnel", "colab"], tunnel_timeout=10)
    with pytest.raises(LaunchError) as e:
        server.wait_ready(60)
    assert "localtunnel: failed" in str(e.value) and "colab: failed" in str(e.value)
    assert server.alive() and process.answers(server.local_url, AUTH) == 200
    assert server.public_url is None
