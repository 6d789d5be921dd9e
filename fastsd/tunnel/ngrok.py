"""ngrok through pyngrok, with the user's (free) account authtoken."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from fastsd.errors import TunnelError
from fastsd.tunnel.base import CHECK_TIMEOUT, Provider, Tunnel, left
from fastsd.tunnel.tools import NGROK, ensure_tool
from fastsd.workspace import Workspace

log = logging.getLogger("fastsd")

NGROK_SECRET = "NGROK_AUTHTOKEN"  # Colab secret name and environment variable


def ngrok_token() -> str | None:
    """The user's ngrok authtoken from Colab's secrets, else $NGROK_AUTHTOKEN. Never logged."""
    try:
        from google.colab import userdata  # type: ignore[import-not-found]
    except ImportError:
        userdata = None
    if userdata is not None:
        try:
            token = userdata.get(NGROK_SECRET)
        except Exception as e:  # SecretNotFoundError, NotebookAccessError, TimeoutException
            log.debug("No Colab secret %s: %s", NGROK_SECRET, type(e).__name__)
        else:
            if token:
                return token.strip()
    return (os.environ.get(NGROK_SECRET) or "").strip() or None


class Ngrok(Provider):
    """ngrok through pyngrok. Needs a (free) account's authtoken: Colab secret or env var.

    The token goes into a private ngrok config file on local disk, never onto a command
    line (where ``ps`` would show it) nor into a log.
    """

    name = "ngrok"

    def open(self, port: int, deadline: float, root: Workspace | Path | None) -> Tunnel:
        token = ngrok_token()
        if not token:
            raise TunnelError(f"no ngrok authtoken: add a Colab secret named {NGROK_SECRET} "
                              "(the key icon on the left; allow this notebook to read it) or "
                              f"set ${NGROK_SECRET}. A free ngrok account gives one.")
        try:
            from pyngrok import conf, ngrok
            from pyngrok.exception import PyngrokError
        except ImportError as e:
            raise TunnelError("pyngrok is not installed; run the install cell.") from e
        binary = ensure_tool(NGROK, root)
        private = Path(tempfile.mkdtemp(prefix="fastsd-ngrok-"))
        config = private / "ngrok.yml"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f'version: "3"\nagent:\n  authtoken: {json.dumps(token)}\n')
        cfg = conf.PyngrokConfig(ngrok_path=str(binary), config_path=str(config),
                                 startup_timeout=max(1, int(left(deadline))),
                                 request_timeout=min(CHECK_TIMEOUT, left(deadline)),
                                 monitor_thread=True)  # drains its log pipe
        cfg.auth_token = None  # PyngrokConfig reads $NGROK_AUTHTOKEN onto the command line
        cleanup = [lambda: shutil.rmtree(private, ignore_errors=True)]
        try:
            tunnel = ngrok.connect(str(port), "http", pyngrok_config=cfg)
        except (PyngrokError, OSError) as e:
            with contextlib.suppress(Exception):
                ngrok.kill(cfg)
            cleanup[0]()
            raise TunnelError(f"ngrok did not start: {_scrub(str(e), token)}") from None
        cleanup.append(lambda: ngrok.kill(cfg))
        return Tunnel(self.name, tunnel.public_url, port, _closers=cleanup)


def _scrub(text: str, *secrets: str) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text
