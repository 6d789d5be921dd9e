"""A real HTTP server on localhost that answers the few Hugging Face Hub API calls fastsd
makes (model info, file downloads, repo creation, preupload, commit), so the real
huggingface_hub client runs against it offline (HF_ENDPOINT)."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import threading
from urllib.parse import unquote, urlparse

import pytest


class Hub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}  # repo id -> {path: bytes}
        self.private: dict[str, bool] = {}
        self.auth: list[str] = []  # the Authorization headers seen
        self.fail_with: tuple[int, str] | None = None  # (status, body) for every API call
        self.missing: set[str] = set()  # files listed but answered 404 on download
        self.gets: list[str] = []  # files downloaded (GET, not HEAD)
        self.url = ""

    def serve(self):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, code: int, body: bytes, ctype="application/json", extra=None):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, code: int, obj) -> None:
                self._send(code, json.dumps(obj).encode())

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _fail(self) -> bool:
                hub.auth.append(self.headers.get("Authorization", ""))
                if hub.fail_with:
                    code, body = hub.fail_with
                    self._send(code, body.replace("{auth}", self.headers.get(
                        "Authorization", "")).encode())
                    return True
                return False

            def do_GET(self):
                if self._fail():
                    return
                path = unquote(urlparse(self.path).path)
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"]:  # /api/models/OWNER/NAME[/revision/REV]
                    repo = "/".join(parts[2:4])
                    files = hub.repos.get(repo)
                    if files is None:
                        return self._json(404, {"error": "Repository not found"})
                    if len(parts) > 4 and parts[4] == "tree":  # the file listing
                        return self._json(200, [
                            {"type": "file", "path": f, "size": len(b),
                             "oid": hashlib.sha1(bytes(b)).hexdigest()}
                            for f, b in files.items()])
                    return self._json(200, {
                        "id": repo, "sha": "a" * 40, "private": hub.private.get(repo, False),
                        "siblings": [{"rfilename": f, "size": len(b)} for f, b in files.items()]})
                self.do_HEAD(send_body=True)

            def do_HEAD(self, send_body=False):
                path = unquote(urlparse(self.path).path)
                parts = path.strip("/").split("/")
                # /OWNER/NAME/resolve/REV/FILE
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, name = "/".join(parts[:2]), "/".join(parts[4:])
                    data = hub.repos.get(repo, {}).get(name)
                    if data is None or name in hub.missing:
                        return self._json(404, {"error": "Entry not found"})
                    start = 0
                    rng = self.headers.get("Range")
                    code = 200
                    if rng:
                        start = int(rng.split("=")[1].split("-")[0])
                        code = 206
                    etag = hashlib.sha1(data).hexdigest()
                    body = data[start:]
                    self.send_response(code)
                    self.send_header("Content-Length", str(len(body)))
                    self.send_header("ETag", f'"{etag}"')
                    self.send_header("X-Repo-Commit", "a" * 40)
                    self.end_headers()
                    if self.command != "HEAD":
                        hub.gets.append(name)
                        self.wfile.write(body)
                    return
                self._json(404, {"error": "not found"})

            def do_POST(self):
                if self._fail():
                    return
                path = unquote(urlparse(self.path).path)
                body = self._body()
                if path == "/api/validate-yaml":  # the model card's front matter
                    return self._json(200, {"errors": [], "warnings": []})
                if path == "/api/repos/create":
                    req = json.loads(body)
                    repo = f"{req.get('organization') or 'user'}/{req['name']}"
                    hub.repos.setdefault(repo, {})
                    hub.private[repo] = req.get("visibility") == "private" or \
                        bool(req.get("private"))
                    return self._json(200, {"url": f"{hub.url}/{repo}", "name": repo})
                parts = path.strip("/").split("/")
                if len(parts) >= 6 and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    return self._json(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in files]})
                if len(parts) >= 6 and parts[4] == "commit":
                    repo = "/".join(parts[2:4])
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            v = item["value"]
                            hub.repos.setdefault(repo, {})[v["path"]] = base64.b64decode(
                                v["content"])
                    return self._json(200, {"commitUrl": f"{hub.url}/{repo}/commit/1",
                                            "commitOid": "b" * 40})
                self._json(404, {"error": f"no route {path}"})

        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        return httpd


@pytest.fixture
def hub(monkeypatch):
    """A Hub stand-in that huggingface_hub (and fastsd's online checks) talk to."""
    from huggingface_hub import constants

    h = Hub()
    httpd = h.serve()
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", h.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        h.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    yield h
    httpd.shutdown()
    httpd.server_close()
