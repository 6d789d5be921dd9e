"""What every tunnel provider shares: the open :class:`Tunnel`, one provider's
:class:`Attempt`, the :class:`Provider` interface and the time bounds."""

from __future__ import annotations

import logging
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fastsd.workspace import Workspace

log = logging.getLogger("fastsd")

DEFAULT_TIMEOUT = 45.0  # seconds one provider may take to give a URL that answers
CHECK_TIMEOUT = 10.0  # seconds one health request (or one connection) may take

Auth = tuple[str, str]


@dataclass
class Attempt:
    """One provider's try: the URL it gave, or why it failed."""

    provider: str
    ok: bool
    reason: str
    seconds: float

    def __str__(self) -> str:
        state = "ok" if self.ok else "failed"
        return f"{self.provider}: {state} after {self.seconds:.1f}s: {self.reason}"


@dataclass
class Tunnel:
    """An open tunnel from ``url`` to ``127.0.0.1:port``. ``close()`` ends it."""

    provider: str
    url: str
    port: int
    checkable: bool = True  # False when only the notebook's browser can open the URL
    note: str = ""  # what the visitor must know (localtunnel's page password, ...)
    attempts: list[Attempt] = field(default_factory=list)
    _closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def close(self) -> None:
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except Exception as e:  # closing must go on for the rest
                log.warning("Closing the %s tunnel: %s", self.provider, e)

    def __enter__(self) -> "Tunnel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Provider:
    """A way to a public URL. ``open`` returns a Tunnel or raises TunnelError with the reason."""

    name = "?"
    checkable = True

    def open(self, port: int, deadline: float, root: Workspace | Path | None) -> Tunnel:
        raise NotImplementedError


def left(deadline: float) -> float:
    """The seconds left until ``deadline`` (time.monotonic), at least half a second."""
    return max(0.5, deadline - time.monotonic())


def reason(e: BaseException) -> str:
    """What went wrong, in a few words: a URLError's own reason, else the exception."""
    if isinstance(e, urllib.error.URLError) and e.reason is not None:
        e = e.reason if isinstance(e.reason, BaseException) else e
    return str(e) or type(e).__name__
