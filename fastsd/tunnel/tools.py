"""The binaries the tunnels run (cloudflared, ngrok): downloaded once into the workspace's
``tools/`` folder with their version recorded, and copied to local disk to run."""

from __future__ import annotations

import hashlib
import logging
import platform
import stat
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastsd import drive, fetch
from fastsd.errors import FastSDError, TunnelError
from fastsd.workspace import Workspace

log = logging.getLogger("fastsd")

LOCAL_TOOLS = Path(tempfile.gettempdir()) / "fastsd-tools"  # binaries run from local disk


@dataclass(frozen=True)
class Tool:
    """A binary a tunnel needs: its pinned version, where to get it for this machine, and
    the SHA-256 the vendor publishes for that file (checked after the download)."""

    name: str
    version: str
    urls: dict[str, str]  # platform key ("linux-amd64", ...) -> URL of the bare binary
    sha256: dict[str, str] = field(default_factory=dict)  # platform key -> SHA-256, if known

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
_CF_VERSION = "2025.1.0"
CLOUDFLARED = Tool("cloudflared", _CF_VERSION, {  # GitHub serves no checksum file for these
    p: _CF.format(v=_CF_VERSION, p=p) for p in ("linux-amd64", "linux-arm64")})
# ngrok's versioned builds (each under its own id) with the SHA-256 that ngrok's update
# service (update.ngrok-agent.com/check) gives for each: https://ngrok.com/docs/agent/changelog/
_NG = "https://bin.equinox.io/a/{id}/ngrok-v3-{v}-{p}"
_NG_VERSION = "3.14.0"
_NG_BUILDS = {  # platform key -> (file id, SHA-256)
    "linux-amd64": ("8oZyZn8Sh2k",
                    "80d5ea4de774ad7f579d7381a492b6531c1d83c2a0476d236bd87b1aaaac3c7e"),
    "linux-arm64": ("3H9YcER9Em2",
                    "021e698af6ccff051184e72bf02de4a5ce45b8e4ace28e000f004e8af841db23"),
}
NGROK = Tool("ngrok", _NG_VERSION,
             {p: _NG.format(id=i, v=_NG_VERSION, p=p) for p, (i, _) in _NG_BUILDS.items()},
             {p: sha for p, (_, sha) in _NG_BUILDS.items()})


def tools_dir(root: Workspace | Path | None = None) -> Path:
    return Workspace.current(root).tools


def ensure_tool(tool: Tool, root: Workspace | Path | None = None) -> Path:
    """The path of ``tool``'s binary on local disk, downloaded into the workspace once.

    The workspace keeps ``tools/NAME/NAME`` and ``tools/NAME/version.json`` (version, URL,
    SHA-256, when); a kept copy of another version is replaced by the pinned one. A download
    whose SHA-256 differs from the published one is refused and not kept. Drive may not run
    binaries, so a local copy is the one that runs. The download goes through fastsd.fetch:
    offline, it fails within its connect timeout.
    """
    folder = tools_dir(root) / tool.name
    kept, record = folder / tool.name, folder / "version.json"
    if kept.is_file() and tool_version(tool, root) == tool.version:
        return _local_copy(kept, tool.version)
    url = tool.url()
    download = folder / ("download-" + url.rsplit("/", 1)[-1])
    try:
        fetch.http_file(url, download)
    except FastSDError as e:
        raise TunnelError(f"could not download {tool.name}: {e} After the first download "
                          f"the copy in {folder} is used.") from None
    data = download.read_bytes()
    download.unlink()
    digest = hashlib.sha256(data).hexdigest()
    expected = tool.sha256.get(platform_key())
    if expected and digest != expected:
        raise TunnelError(f"the {tool.name} {tool.version} downloaded from {url} is not the "
                          f"published file (SHA-256 {digest}, expected {expected}); it was "
                          "not kept. Try again later, or pick another tunnel.")
    drive.atomic_write_bytes(kept, data)
    drive.atomic_write_json(record, {"name": tool.name, "version": tool.version, "url": url,
                                     "sha256": digest,
                                     "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                              time.gmtime())})
    log.info("Downloaded %s %s into %s", tool.name, tool.version, folder)
    return _local_copy(kept, tool.version)


def tool_version(tool: Tool, root: Workspace | Path | None = None) -> str | None:
    """The recorded version of ``tool`` in the workspace, or None when it was never fetched."""
    record = tools_dir(root) / tool.name / "version.json"
    return drive.read_json(record).get("version") if record.is_file() else None


def _local_copy(kept: Path, version: str) -> Path:
    local = LOCAL_TOOLS / version / kept.name
    local.parent.mkdir(parents=True, exist_ok=True)
    if not local.is_file() or local.stat().st_size != kept.stat().st_size:
        drive.copy_file(kept, local)
    local.chmod(local.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return local
