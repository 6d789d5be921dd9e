"""One call from a notebook cell: start the web UI (ours, AUTOMATIC1111 or Forge) in the
background on a session's models, behind a password, with a tunnel, and show its link.

The password is the user's, or one generated once and kept in the workspace's
``webui-password.txt`` (readable by its owner only), so the phone that learned it keeps
working after a restart. It never appears in a log, a URL or the cell's output:
:func:`show_password` prints it when asked, beside the user name. An ngrok token typed in
a cell's form goes where the ngrok tunnel reads it (:func:`fastsd.tunnel.ngrok.set_token`),
never into the cell's output.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from fastsd import drive, env, options, session as sessions
from fastsd.workspace import Workspace
from fastsd.errors import LaunchError
from fastsd.webui import external, process
from fastsd.tunnel import ngrok
from fastsd.webui.auth import (DEFAULT_PORT, DEFAULT_USER, PASSWORD_ENV, generate_password,
                               login)

log = logging.getLogger("fastsd")

PASSWORD_FILE = "webui-password.txt"
UIS = ("fastsd", *external.UIS)


def colab_note() -> str:
    """The one line said where a web UI starts on Colab."""
    return ("Colab restricts web UIs on its free runtimes (one may be disconnected for it); "
            "on a free runtime, generate in the notebook instead: "
            f"{options.cell((options.TRAIN_NB, 7))}, or fastsd.webui.generate(PROMPT, "
            "SESSION) in any cell.")


def password_file(root: Workspace | Path | None = None) -> Path:
    return Workspace.current(root).root / PASSWORD_FILE


def saved_password(root: Workspace | Path | None = None) -> str:
    """The workspace's web UI password, generated and saved the first time."""
    path = password_file(root)
    if path.is_file():
        text = path.read_text(encoding="utf-8").strip()
        if text:
            return text
    password = generate_password()
    drive.atomic_write_text(path, password + "\n")
    path.chmod(0o600)
    log.info("Generated a web UI password and saved it in %s", path)
    return password


def show_password(root: Workspace | Path | None = None, user: str = DEFAULT_USER) -> None:
    """Print the saved web UI password beside the user name (only when the user asks)."""
    print(f"The web UI's login: {login(user, saved_password(root))}")


def serve_command(port: int, user: str, session: str | None = None,
                  model: str | None = None, home: Path | None = None) -> list[str]:
    """``fastsd serve`` on loopback: a tunnel, not the server, faces the internet. The
    password reaches it through the environment (PASSWORD_ENV), never argv."""
    cmd = [sys.executable, "-m", "fastsd.cli", "serve", "--port", str(port), "--user", user]
    if session:
        cmd += ["--session", session]
    if model:
        cmd += ["--model", model]
    if home:
        cmd += ["--home", str(home)]
    return cmd


def start(session: str | None = None, *, model: str | None = None, ui: str = "fastsd",
          tunnel: str | None = "auto", port: int = DEFAULT_PORT, user: str = DEFAULT_USER,
          password: str | None = None, home: Path | None = None,
          ready_timeout: float = process.READY_TIMEOUT, ngrok_token: str | None = None,
          save_ngrok_token: bool = False) -> process.Server:
    """Start the web UI in the background and return at once (the cell ends; the link and
    QR code appear in it when the server answers). A second call with the same settings
    reuses the running server; other settings replace it.

    ``model`` (any name the resolver takes, or a single file) is loaded at start, else the
    session's trained model; AUTOMATIC1111 and Forge get it as a single file
    (:func:`external.single_file`). ``tunnel`` is a provider name, ``"auto"``, or None for
    this machine only. A password is always set; without one, the workspace's saved
    password is used. ``ngrok_token`` (the form's Ngrok_Token) is the ngrok tunnel's
    authtoken, kept in the workspace for later runtimes with ``save_ngrok_token``.
    """
    if ui not in UIS:
        raise LaunchError(f"Unknown web UI {ui!r}: choose one of {', '.join(UIS)}.")
    if env.runtime() == "colab":
        log.warning("%s", colab_note())
    root = Workspace.current(home).root
    ngrok.set_token(ngrok_token or "", root, save=save_ngrok_token)
    s = sessions.load(session, root) if session else None
    logs = (s.path if s else root) / "logs"
    auth = (user, password or os.environ.get(PASSWORD_ENV) or saved_password(root))
    if not password:
        log.info("Log in as user %r; the password is in %s (fastsd.webui.start."
                 "show_password() prints both).", user, password_file(root))
    if ui == "fastsd":
        cmd = serve_command(port, user, s.name if s else None, model, root)
        return process.launch(cmd, port, logs / "webui.log", auth=auth, tunnel=tunnel,
                              health_path=process.HEALTH_PATH, env=env.caller_env(),
                              ready_timeout=ready_timeout)
    return external.start(ui, port, auth, model=model, session=s, log_path=logs / f"{ui}.log",
                          workspace=root, tunnel=tunnel, ready_timeout=ready_timeout)


def stop() -> bool:
    """Stop the web UI running on this machine, if any."""
    return process.stop()
