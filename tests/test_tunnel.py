"""Tunnels: selection, failure reasons and time bounds offline; health checks, auth and the
keeper against a real server and a real forwarder process on localhost."""

from __future__ import annotations

import io
import json
import logging
import socket
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fastsd.tunnel import auto, health, link, tools
from fastsd.tunnel.base import Provider
from fastsd.tunnel.keeper import Keeper
from fastsd.tunnel.localtunnel import Localtunnel
from fastsd.errors import TunnelError
from tunnel_helpers import AUTH, AuthServer, LocalForward, wait_until

BOUND = 20.0  # each provider's time bound in these tests
SLACK = 5.0  # what cleanup may add to a bound

# What each provider says here, with no internet and outside Colab.
OFFLINE_REASONS = {
    "cloudflared": "could not download cloudflared",
    "ngrok": "no ngrok authtoken",
    "gradio": "Gradio's share server failed",
    "localtunnel": "localtunnel gave no tunnel",
    "colab": "only inside Colab",
}


@pytest.fixture
def server():
    with AuthServer() as s:
        yield s


@pytest.fixture(autouse=True)
def _no_token(monkeypatch):
    monkeypatch.delenv("NGROK_AUTHTOKEN", raising=False)


@pytest.mark.parametrize("name", auto.AUTO_ORDER)
def test_each_provider_fails_fast_offline_with_its_reason(name, server):
    start = time.monotonic()
    with pytest.raises(TunnelError) as e:
        auto.open_tunnel(server.port, AUTH, name, timeout=BOUND)
    elapsed = time.monotonic() - start
    assert OFFLINE_REASONS[name] in str(e.value)
    assert f"  - {name}: failed after" in str(e.value)
    assert elapsed < BOUND + SLACK


def test_auto_tries_every_provider_and_reports_each_reason(server):
    with pytest.raises(TunnelError) as e:
        auto.open_tunnel(server.port, AUTH, "auto", timeout=BOUND)
    message = str(e.value)
    lines = [ln for ln in message.splitlines() if ln.startswith("  - ")]
    assert [ln.split(":")[0][4:] for ln in lines] == list(auto.AUTO_ORDER)
    for name, reason in OFFLINE_REASONS.items():
        assert reason in message, name


def test_ngrok_with_a_token_fails_on_the_download_and_never_shows_the_token(
        server, monkeypatch, caplog):
    secret = "2abcSECRETtoken_do_not_print"
    monkeypatch.setenv("NGROK_AUTHTOKEN", secret)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(TunnelError) as e:
        auto.open_tunnel(server.port, AUTH, "ngrok", timeout=BOUND)
    assert "could not download ngrok" in str(e.value)
    assert secret not in str(e.value) and secret not in caplog.text


def test_no_tunnel_without_a_password(server):
    for auth in (None, ("artist", ""), ("", "pw")):
        with pytest.raises(TunnelError, match="never opened without"):
            auto.open_tunnel(server.port, auth, "auto", timeout=BOUND)


def test_unknown_provider_is_named():
    with pytest.raises(TunnelError, match="Unknown tunnel bore"):
        auto.open_tunnel(1, AUTH, "bore")


def test_a_provider_that_hangs_is_given_up_at_its_bound(server):
    """localtunnel pointed at a real server that accepts and never answers."""
    silent = socket.create_server(("127.0.0.1", 0))
    held = []
    threading.Thread(target=lambda: held.append(silent.accept()), daemon=True).start()
    host = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        start = time.monotonic()
        with pytest.raises(TunnelError, match="localtunnel gave no tunnel"):
            auto.open_tunnel(server.port, AUTH, "localtunnel", timeout=2.0,
                               providers={"localtunnel": lambda: Localtunnel(host)})
        assert 1.5 < time.monotonic() - start < 2.0 + SLACK
    finally:
        silent.close()


def test_a_binary_that_gives_no_url_is_stopped_at_the_bound(server, workspace):
    """A cloudflared kept in the workspace that never prints a URL."""
    folder = workspace / "tools" / "cloudflared"
    folder.mkdir(parents=True)
    (folder / "cloudflared").write_text("#!/bin/sh\necho starting quietly\nexec sleep 600\n")
    (folder / "version.json").write_text(json.dumps({"version": "0"}))
    start = time.monotonic()
    with pytest.raises(TunnelError) as e:
        auto.open_tunnel(server.port, AUTH, "cloudflared", timeout=2.0)
    assert "cloudflared gave no URL in time" in str(e.value)
    assert "starting quietly" in str(e.value)
    assert time.monotonic() - start < 2.0 + SLACK


def test_a_tool_is_fetched_once_with_its_version_recorded(workspace):
    script = b"#!/bin/sh\necho 'ngrok version 3.20.0'\n"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("ngrok")
        info.size, info.mode = len(script), 0o755
        tar.addfile(info, io.BytesIO(script))
    archive = buf.getvalue()
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(archive)))
            self.end_headers()
            self.wfile.write(archive)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/ngrok.tgz"
    tool = tools.Tool("ngrok", "stable", {tools.platform_key(): url}, member="ngrok")
    try:
        first = tools.ensure_tool(tool)
    finally:
        httpd.shutdown()
        httpd.server_close()
    record = json.loads((workspace / "tools" / "ngrok" / "version.json").read_text())
    assert record["version"] == "3.20.0" and record["url"] == url
    assert (workspace / "tools" / "ngrok" / "ngrok").read_bytes() == script
    assert tools.tool_version(tool) == "3.20.0"
    second = tools.ensure_tool(tool)  # the server is gone: the kept copy is used
    assert second == first and hits == ["/ngrok.tgz"]


def test_a_failed_download_leaves_nothing_behind(workspace):
    with pytest.raises(TunnelError, match="could not download cloudflared"):
        tools.ensure_tool(tools.CLOUDFLARED)
    assert not [p for p in workspace.rglob("*") if p.is_file()]


def test_health_is_checked_through_the_tunnel(server):
    t = auto.open_tunnel(server.port, AUTH, "local", timeout=BOUND,
                           providers={"local": LocalForward})
    try:
        assert t.provider == "local" and t.url != f"http://127.0.0.1:{server.port}"
        assert health.check(t.url, AUTH) is None
        assert "401" in health.check(t.url, ("artist", "wrong"))
        assert [a.provider for a in t.attempts] == ["local"] and t.attempts[0].ok
    finally:
        t.close()
    assert health.check(t.url, AUTH, timeout=2).startswith("no answer")


def test_auto_passes_over_a_failing_provider_to_a_working_one(server):
    class Broken(Provider):
        name = "broken"

        def open(self, port, deadline, root):
            raise TunnelError("this one is down")

    t = auto.open_tunnel(server.port, AUTH, "auto", timeout=BOUND,
                           providers={"broken": Broken, "local": LocalForward})
    try:
        assert [(a.provider, a.ok) for a in t.attempts] == [("broken", False), ("local", True)]
        assert "this one is down" in t.attempts[0].reason
    finally:
        t.close()


def test_a_server_without_auth_gets_no_tunnel():
    with AuthServer(auth=None) as open_server:
        with pytest.raises(TunnelError, match="without a password"):
            auto.open_tunnel(open_server.port, AUTH, "local", timeout=BOUND,
                               providers={"local": LocalForward})
    assert all(p.poll() is not None for p in LocalForward.processes)  # closed again


def test_keeper_reopens_a_dead_tunnel_while_the_server_keeps_running(server):
    providers = {"local": LocalForward}

    def reopen():
        return auto.open_tunnel(server.port, AUTH, "local", BOUND, providers=providers)

    first = reopen()
    changes = []
    keeper = Keeper(first, AUTH, reopen, changes.append, interval=0.3, failures=2)
    keeper.start()
    try:
        # A healthy tunnel is left alone: as many checks as would close a failing one ran.
        assert wait_until(lambda: keeper.checks >= keeper.failures, timeout=30), (
            "the keeper ran no health check")
        assert keeper.reopened == 0 and changes == [] and keeper.tunnel is first
        LocalForward.processes[-1].kill()  # the tunnel dies
        assert wait_until(lambda: changes, timeout=30)
        new = changes[0]
        assert new.url != first.url and keeper.tunnel is new and keeper.reopened == 1
        assert health.check(new.url, AUTH) is None
        assert health.check(f"http://127.0.0.1:{server.port}", AUTH) is None  # never touched
    finally:
        keeper.stop()
    assert health.check(new.url, AUTH, timeout=2).startswith("no answer")


def test_auth_cannot_be_turned_off_while_a_tunnel_is_open(server):
    providers = {"local": LocalForward}

    def reopen():
        return auto.open_tunnel(server.port, AUTH, "local", BOUND, providers=providers)

    first = reopen()
    keeper = Keeper(first, AUTH, reopen, interval=0.3, failures=1).start()
    try:
        server.auth_on = False  # the server starts answering without a password
        assert wait_until(lambda: keeper.last_error is not None, timeout=30)
        assert "without a password" in keeper.last_error
        assert health.check(first.url, AUTH, timeout=2).startswith("no answer")  # closed
        assert keeper.reopened == 0
    finally:
        keeper.stop()


def test_link_and_qr_code():
    url = "https://quiet-river.trycloudflare.com"
    html = link.link_html(url, note="tunnel password 1.2.3.4")
    assert f'href="{url}"' in html and "<svg" in html and "1.2.3.4" in html
    assert link.qr_svg(url) != link.qr_svg(url + "/x")
    assert "&lt;script&gt;" in link.link_html("https://a.b/<script>")
