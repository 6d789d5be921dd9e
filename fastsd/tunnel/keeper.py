"""The keeper: checks an open tunnel now and then, and opens a new one (with a new URL)
when it stops answering; the server behind it keeps running."""

from __future__ import annotations

import logging
import threading
from typing import Callable

from fastsd.errors import TunnelError
from fastsd.tunnel.base import CHECK_TIMEOUT, Auth, Tunnel
from fastsd.tunnel.health import check, checked_url, require_auth

log = logging.getLogger("fastsd")


class Keeper:
    """Checks a tunnel every ``interval`` seconds; after ``failures`` failed checks in a
    row it closes it and opens a new one through ``reopen`` (``on_change`` gets the new
    tunnel, to show its URL). The server behind it is never touched."""

    def __init__(self, tunnel: Tunnel, auth: Auth, reopen: Callable[[], Tunnel],
                 on_change: Callable[[Tunnel], None] | None = None, interval: float = 30.0,
                 failures: int = 2, path: str = "/"):
        self.tunnel, self.auth, self.reopen = tunnel, require_auth(auth), reopen
        self.on_change, self.interval, self.failures, self.path = (
            on_change, interval, failures, path)
        self.reopened = 0
        self.checks = 0  # health checks done, each with what followed from it
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastsd-tunnel-keeper",
                                        daemon=True)

    def start(self) -> "Keeper":
        self._thread.start()
        return self

    def stop(self, close: bool = True) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(self.interval + CHECK_TIMEOUT * 2)
        if close:
            self.tunnel.close()

    def _run(self) -> None:
        bad = 0
        while not self._stop.wait(self.interval):
            bad = self._check(bad)
            self.checks += 1

    def _check(self, bad: int) -> int:
        """One health check and what follows from it; returns the failed checks in a row."""
        reason = check(checked_url(self.tunnel), self.auth, self.path,
                       timeout=min(CHECK_TIMEOUT, self.interval))
        if reason is None:
            return 0
        bad += 1
        log.warning("The tunnel %s failed a health check (%d/%d): %s", self.tunnel.url,
                    bad, self.failures, reason)
        if bad < self.failures:
            return bad
        self.tunnel.close()
        try:
            new = self.reopen()
        except TunnelError as e:
            self.last_error = str(e)
            log.error("The tunnel died and could not be reopened; trying again in %.0fs. "
                      "%s", self.interval, e)
            return bad
        self.tunnel, self.reopened = new, self.reopened + 1
        log.warning("The tunnel was reopened: the web UI is now at %s", new.url)
        if self.on_change:
            try:
                self.on_change(new)
            except Exception:  # showing the URL must not kill the keeper
                log.exception("Showing the new tunnel URL failed")
        return 0
