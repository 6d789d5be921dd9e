"""ngrok through pyngrok, with the user's (free) account authtoken."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from fastsd import drive, env, fetch
from fastsd.errors import FastSDError, TunnelError
from fastsd.tunnel.base import CHECK_TIMEOUT, Provider, Tunnel, left
from fastsd.tunnel.tools import NGROK, ensure_tool
from fastsd.workspace import Workspace

log = logging.getLogger("fastsd")

NGROK_SECRET = "NGROK_AUTHTOKEN"  # Colab secret name and environment variable
TOKEN_FILE = "ngrok_token"  # in the workspace, when the user keeps the token for later runtimes


def set_token(token: str, root: Workspace | Path | None = None, save: bool = False) -> None:
    """Use ``token`` (a notebook's Ngrok_Token field) as the ngrok authtoken in this runtime:
    it goes where :func:`ngrok_token` reads it ($NGROK_AUTHTOKEN of this process, which the
    tunnel opens from), is hidden from the "fastsd" log (fetch.remember_secret) and is
    never printed. With ``save`` it is also kept in the workspace's ``ngrok_token`` file,
    readable by its owner only, for later runtimes (then the field can stay empty)."""
    token = (token or "").strip()
    if not token:
        return
    fetch.remember_secret(token)
    os.environ[NGROK_SECRET] = token
    if save:
        path = Workspace.current(root).root / TOKEN_FILE
        drive.atomic_write_text(path, token + "\n")
        path.chmod(0o600)
        log.info("The ngrok token is kept in %s for later runtimes.", path)


def ngrok_token(root: Workspace | Path | None = None) -> str | None:
    """The user's ngrok authtoken: $NGROK_AUTHTOKEN (where a notebook's Ngrok_Token field
    puts it), else Colab's secret NGROK_AUTHTOKEN, else the workspace's ``ngrok_token``
    file. Never logged."""
    if (os.environ.get(NGROK_SECRET) or "").strip():
        return fetch.remember_secret(os.environ[NGROK_SECRET].strip())
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
                return fetch.remember_secret(token.strip())
    if root is None and not os.environ.get("FASTSD_HOME") and env.runtime() != "colab":
        return None  # no workspace to look in (and none made for it)
    try:
        file = Workspace.current(root, mount=False).root / TOKEN_FILE
        saved = file.read_text(encoding="utf-8").strip() if file.is_file() else ""
    except (FastSDError, OSError):  # Drive not mounted (yet)
        return None
    return fetch.remember_secret(saved) if saved else None


class Ngrok(Provider):
    """ngrok through pyngrok. Needs a (free) account's authtoken (:func:`ngrok_token`).

    The token goes into a private ngrok config file on local disk, never onto a command
    line (where ``ps`` would show it) nor into a log.
    """

    name = "ngrok"

    def open(self, port: int, deadline: float, root: Workspace | Path | None) -> Tunnel:
        token = ngrok_token(root)
        if not token:
            raise TunnelError(f"no ngrok authtoken: give it in the Ngrok_Token field (tick "
                              "Save_Ngrok_Token to keep it for later runtimes), or add a Colab "
                              f"secret named {NGROK_SECRET} (the key icon on the left; allow "
                              f"this notebook to read it), or set ${NGROK_SECRET}. A free "
                              "ngrok account gives one.")
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
