"""The binaries the tunnels run (cloudflared, ngrok): downloaded once into the workspace's
``tools/`` folder with their version recorded, and copied to local disk to run."""

from __future__ import annotations

import hashlib
import io
import logging
import platform
import re
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fastsd import drive, fetch
from fastsd.errors import FastSDError, TunnelError
from fastsd.workspace import Workspace

log = logging.getLogger("fastsd")

LOCAL_TOOLS = Path(tempfile.gettempdir()) / "fastsd-tools"  # binaries run from local disk


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
