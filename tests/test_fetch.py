"""The one downloader, against a real HTTP server on localhost: whole files only, resume
from a partial download, a fast and clear failure when the host is gone, no token shown."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path

import pytest

from fastsd import fetch, models
from fastsd.errors import DataError, OfflineError
from conftest import cache_family_configs

BODY = bytes(range(256)) * 4096  # 1 MiB


class Handler(http.server.BaseHTTPRequestHandler):
    cut_after: int | None = None  # bytes sent before the connection is dropped
    seen_ranges: list[str] = []

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        start = 0
        rng = self.headers.get("Range")
        if rng:
            type(self).seen_ranges.append(rng)
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(BODY) - 1}/{len(BODY)}")
        else:
            self.send_response(200)
        body = BODY[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = type(self).cut_after
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def server():
    Handler.cut_after, Handler.seen_ranges = None, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_whole_download(server, tmp_path):
    got = fetch.http_file(f"{server}/models/model.safetensors", tmp_path / "m.safetensors")
    assert got.read_bytes() == BODY
    assert not list(tmp_path.glob("*.part"))


def test_a_cut_download_is_never_taken_for_whole_and_resumes(server, tmp_path):
    dest = tmp_path / "m.safetensors"
    Handler.cut_after = 300_000
    with pytest.raises(OfflineError, match="Run it again to resume"):
        fetch.http_file(f"{server}/m.safetensors", dest)
    assert not dest.exists()  # only the .part
    part = dest.with_name(dest.name + fetch.PART)
    assert part.stat().st_size == 300_000
    Handler.cut_after = None
    assert fetch.http_file(f"{server}/m.safetensors", dest).read_bytes() == BODY
    assert Handler.seen_ranges == ["bytes=300000-"]  # it asked only for the rest
    assert not part.exists()


def test_an_unreachable_host_fails_fast_and_hides_the_token(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/file.safetensors?token=SECRET123"
    t0 = time.monotonic()
    with pytest.raises(OfflineError) as e:
        fetch.http_file(url, tmp_path / "dl" / "f.safetensors")
    assert time.monotonic() - t0 < fetch.CONNECT_TIMEOUT + 1
    assert "SECRET123" not in str(e.value) and "file.safetensors" in str(e.value)
    assert not (tmp_path / "dl").exists()


def test_link_kinds():
    assert fetch.parse_hf_url("https://huggingface.co/o/r/resolve/main/sub/m.safetensors") == (
        "o/r", "main", "sub/m.safetensors")
    assert fetch.parse_hf_url("https://huggingface.co/o/r/blob/abc123/m.ckpt") == (
        "o/r", "abc123", "m.ckpt")
    assert fetch.parse_hf_url("https://civitai.com/api/download/models/12345") is None
    assert fetch.is_drive_link("https://drive.google.com/file/d/1AbCdEfGhIjK/view")
    assert not fetch.is_drive_link("https://example.com/drive.google.com")
    assert fetch.file_name("https://civitai.com/api/download/models/12345") == "12345"
    with pytest.raises(DataError, match="not a Google Drive share link"):
        fetch.parse_drive_link("https://drive.google.com/")


def test_a_link_given_as_a_model_is_downloaded_once_and_converted_once(server, workspace,
                                                                      tiny_sd1, tmp_path):
    # The server hands out a real single file of the tiny model; the resolver fetches it,
    # converts it to diffusers once, and the second call reuses both.
    from fastsd.convert import to_single_file

    cache_family_configs(workspace, "sd1", tiny_sd1)
    single = to_single_file(tiny_sd1, tmp_path / "tiny.safetensors")
    global BODY
    saved, BODY = BODY, single.read_bytes()
    try:
        first = models.resolve_model(f"{server}/tiny.safetensors")
        assert (first / "model_index.json").is_file()
        mtime = (first / "model_index.json").stat().st_mtime
        assert models.resolve_model(f"{server}/tiny.safetensors") == first
        assert (first / "model_index.json").stat().st_mtime == mtime
        assert (workspace / "models" / "downloads" / "tiny.safetensors").read_bytes() == BODY
    finally:
        BODY = saved
