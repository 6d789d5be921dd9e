"""Stand-in for ``google.colab.drive``: mounts a local folder through a real FUSE
passthrough (see tests/colab/passthrough.py). With ``$COLAB_STANDIN_DECLINE`` set, the user
declines the authorization, as Colab reports it."""

from __future__ import annotations

import os
from pathlib import Path

import standin

from google.colab._message import MessageError

mounts: list[tuple[str, bool]] = []  # every call, for tests to inspect


def mount(mountpoint: str, force_remount: bool = False, timeout_ms: int = 120000,
          readonly: bool = False) -> None:
    mounts.append((mountpoint, force_remount))
    if os.environ.get("COLAB_STANDIN_DECLINE"):  # the user declined the authorization
        raise MessageError("Error: credential propagation was unsuccessful")
    point = Path(mountpoint)
    if standin.alive(point):
        if not force_remount:
            print(f"Drive already mounted at {mountpoint}; to attempt to forcibly remount, "
                  f'call drive.mount("{mountpoint}", force_remount=True).')
            return
    elif not force_remount:
        try:
            point.mkdir(parents=True, exist_ok=True)
            list(point.iterdir())
        except OSError as e:  # a dead mount, as Colab leaves it after a drop
            raise ValueError("Mountpoint must not already contain files") from e
    standin.unmount(point)
    standin.start(point)
    print(f"Mounted at {mountpoint}")


def flush_and_unmount(timeout_ms: int = 24 * 60 * 60 * 1000) -> None:
    from google import colab

    colab.events.append("flush_and_unmount")
    for point, _ in mounts[-1:]:
        standin.unmount(Path(point))
