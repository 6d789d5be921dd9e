"""Tunnels: selection, failure reasons and time bounds offline; health checks, auth and the
keeper against a real server and a real forwarder process on localhost."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import subprocess
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


def test_the_ngrok_token_of_the_form_is_used_kept_on_request_and_never_shown(
        server, workspace, monkeypatch, caplog, capsys):
    """Ngrok_Token (webui.ipynb's launch cell, fast_dreambooth.ipynb's cell 7) goes where the
    ngrok tunnel reads it; Save_Ngrok_Token keeps it in the workspace (owner only) for a
    later runtime, whose tunnel then uses it; `fastsd ngrok-token` does the same from
    standard input. It is never in a log, an error or the output."""
    import io
    import os
    import sys

    from fastsd.cli import main
    from fastsd.errors import SessionNotFound
    from fastsd.tunnel import ngrok
    from fastsd.webui import start

    secret = "2abcFORMtoken_do_not_print"
    monkeypatch.setenv(ngrok.NGROK_SECRET, "")  # undone after the test, as set_token sets it
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SessionNotFound):
        start.start("nobody", tunnel=None, home=workspace, ngrok_token=secret,
                    save_ngrok_token=True)
    assert os.environ[ngrok.NGROK_SECRET] == secret
    kept = workspace / ngrok.TOKEN_FILE
    assert kept.read_text().strip() == secret and kept.stat().st_mode & 0o777 == 0o600
    os.environ[ngrok.NGROK_SECRET] = ""  # a new runtime: only the workspace has it
    assert ngrok.ngrok_token(workspace) == secret
    with pytest.raises(TunnelError) as e:
        auto.open_tunnel(server.port, AUTH, "ngrok", timeout=BOUND, root=workspace)
    assert "could not download ngrok" in str(e.value)  # past the token, offline
    kept.unlink()
    with pytest.raises(TunnelError, match="give it in the Ngrok_Token field"):
        auto.open_tunnel(server.port, AUTH, "ngrok", timeout=BOUND, root=workspace)
    monkeypatch.setattr(sys, "stdin", io.StringIO("2abcCLItoken_do_not_print\n"))
    assert main(["ngrok-token", "--home", str(workspace)]) == 0
    assert kept.read_text().strip() == "2abcCLItoken_do_not_print"
    shown = capsys.readouterr()
    for text in (str(e.value), caplog.text, shown.out, shown.err):
        assert secret not in text and "2abcCLItoken_do_not_print" not in text


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
    (folder / "version.json").write_text(json.dumps({"version": tools.CLOUDFLARED.version}))
    start = time.monotonic()
    with pytest.raises(TunnelError) as e:
        auto.open_tunnel(server.port, AUTH, "cloudflared", timeout=2.0)
    assert "cloudflared gave no URL in time" in str(e.value)
    assert "starting quietly" in str(e.value)
    assert time.monotonic() - start < 2.0 + SLACK


@pytest.fixture
def files():
    """A real HTTP server on localhost serving ``files`` (path -> bytes); ``hits`` lists
    the paths asked for."""
    served: dict[str, bytes] = {}
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            body = served[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield base, served, hits
    httpd.shutdown()
    httpd.server_close()


def _tool(version: str, url: str, data: bytes) -> tools.Tool:
    key = tools.platform_key()
    return tools.Tool("ngrok", version, {key: url}, {key: hashlib.sha256(data).hexdigest()})


def test_a_tool_is_fetched_once_at_its_pinned_version(workspace, files):
    base, served, hits = files
    served["/v3.20.0/ngrok"] = old = b"#!/bin/sh\necho 'ngrok version 3.20.0'\n"
    served["/v3.21.0/ngrok"] = new = b"#!/bin/sh\necho 'ngrok version 3.21.0'\n"
    pinned = _tool("3.20.0", base + "/v3.20.0/ngrok", old)
    first = tools.ensure_tool(pinned)
    record = json.loads((workspace / "tools" / "ngrok" / "version.json").read_text())
    assert record["version"] == "3.20.0" and record["url"] == base + "/v3.20.0/ngrok"
    assert record["sha256"] == hashlib.sha256(old).hexdigest()
    assert (workspace / "tools" / "ngrok" / "ngrok").read_bytes() == old
    assert "3.20.0" in subprocess.run([first], capture_output=True, text=True).stdout
    assert tools.ensure_tool(pinned) == first and hits == ["/v3.20.0/ngrok"]  # kept copy
    # A new pin replaces the kept copy of the old version.
    second = tools.ensure_tool(_tool("3.21.0", base + "/v3.21.0/ngrok", new))
    assert hits == ["/v3.20.0/ngrok", "/v3.21.0/ngrok"]
    assert tools.tool_version(pinned) == "3.21.0"
    assert "3.21.0" in subprocess.run([second], capture_output=True, text=True).stdout


def test_a_download_that_is_not_the_published_file_is_refused(workspace, files):
    base, served, hits = files
    served["/ngrok"] = b"#!/bin/sh\necho tampered\n"
    tool = _tool("3.20.0", base + "/ngrok", b"the published file")
    with pytest.raises(TunnelError, match="is not the published file"):
        tools.ensure_tool(tool)
    assert hits == ["/ngrok"]
    assert not [p for p in workspace.rglob("*") if p.is_file()]


def test_ngrok_is_pinned_with_a_checksum_per_build():
    for tool in (tools.NGROK, tools.CLOUDFLARED):
        assert re.fullmatch(r"\d+\.\d+\.\d+", tool.version), tool
        assert all(tool.version in url and "stable" not in url for url in tool.urls.values())
    assert tools.NGROK.sha256.keys() == tools.NGROK.urls.keys()
    assert all(re.fullmatch("[0-9a-f]{64}", h) for h in tools.NGROK.sha256.values())


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
