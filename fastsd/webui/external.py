"""AUTOMATIC1111 or Forge instead of our own web UI.

The chosen UI is cloned at a pinned commit onto local disk (never Drive: its thousands of
small files would crawl through Drive's FUSE), its model folders point at the session's
models and the workspace's models on Drive, and it runs in the background through
:func:`fastsd.webui.background.launch` with ``--api``, a password for the page and the API,
the chosen tunnel and a health check. A failure to start is reported with the end of its
log.

Its password reaches it without ever being written to a log: a small wrapper (this
module's ``main``) reads it from the environment, adds ``--api-auth`` and copies the UI's
output to the log with the password masked (AUTOMATIC1111 prints its whole command line).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fastsd import drive, env
from fastsd.errors import LaunchError
from fastsd.webui import background
from fastsd.webui.auth import PASSWORD_ENV

GIT_TIMEOUT = 300.0
SESSION_LINK = "fastsd-session-{name}"


@dataclass(frozen=True)
class ExternalUI:
    name: str
    repo: str
    commit: str  # pinned: a known-good tree, the same on every runtime
    folder: str  # default folder name on local disk


UIS = {
    "a1111": ExternalUI("AUTOMATIC1111", "https://github.com/AUTOMATIC1111/stable-diffusion-webui",
                        "82a973c04367123ae98bd9abdf80d9eda9b910e2", "stable-diffusion-webui"),
    "forge": ExternalUI("Forge", "https://github.com/lllyasviel/stable-diffusion-webui-forge",
                        "bfee03d8d9415a925616f40ede030fe7a51cbcfd",
                        "stable-diffusion-webui-forge"),
}


def get(ui: str) -> ExternalUI:
    if ui not in UIS:
        raise LaunchError(f"Unknown web UI {ui!r}: choose one of {', '.join(UIS)}.")
    return UIS[ui]


def local_root() -> Path:
    """Where UIs are cloned: /content on Colab (local disk), else the temp folder."""
    base = Path("/content") if env.runtime() == "colab" else Path(tempfile.gettempdir())
    return base / "fastsd-external"


def check_local(folder: Path, workspace: Path) -> Path:
    """Refuse a folder on Drive or inside the workspace (which is on Drive on Colab)."""
    real = folder.expanduser().resolve()
    for slow in (drive.COLAB_MOUNT, workspace):
        try:
            real.relative_to(Path(slow).resolve())
        except ValueError:
            continue
        raise LaunchError(f"{folder} is on Google Drive (under {slow}); the web UI must be "
                          "cloned onto local disk, where it runs many times faster. "
                          "Leave the folder at its default.")
    return real


def _git(args: list[str], cwd: Path, timeout: float) -> None:
    try:
        subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
    except subprocess.CalledProcessError as e:
        tail = "\n".join((e.stderr or e.stdout or "").strip().splitlines()[-5:])
        raise LaunchError(f"git {args[0]} failed in {cwd}:\n{tail}") from None
    except subprocess.TimeoutExpired:
        raise LaunchError(f"git {args[0]} took more than {timeout:.0f}s in {cwd}; check the "
                          "runtime's internet access and run the cell again.") from None
    except FileNotFoundError:
        raise LaunchError("git is not installed on this machine.") from None


def head(folder: Path) -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, check=True,
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def install(ui: str, folder: Path | None = None, timeout: float = GIT_TIMEOUT) -> Path:
    """Clone ``ui`` at its pinned commit into ``folder`` (default: under local_root()).

    Only the pinned commit is fetched (shallow). An existing clone at that commit is
    kept; a failed clone leaves no folder behind.
    """
    spec = get(ui)
    folder = Path(folder) if folder else local_root() / spec.folder
    if head(folder) == spec.commit:
        return folder
    if folder.exists():
        raise LaunchError(f"{folder} exists but is not {spec.name} at {spec.commit[:10]}. "
                          "Delete it (or choose another folder) and run the cell again.")
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _git(["init", "-q"], tmp, timeout)
        _git(["fetch", "-q", "--depth", "1", spec.repo, spec.commit], tmp, timeout)
        _git(["checkout", "-q", "--detach", "FETCH_HEAD"], tmp, timeout)
    except LaunchError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LaunchError(f"Could not get {spec.name} ({spec.repo} at {spec.commit[:10]}): "
                          f"{e}") from None
    os.replace(tmp, folder)
    return folder


def link_models(folder: Path, session_models: Path | None, session_name: str | None) -> Path | None:
    """Link the session's models folder into the UI's checkpoint folder (it scans it
    recursively), so the trained model appears in its model list. Returns the link."""
    if session_models is None:
        return None
    ckpt = folder / "models" / "Stable-diffusion"
    ckpt.mkdir(parents=True, exist_ok=True)
    link = ckpt / SESSION_LINK.format(name=session_name or "models")
    if link.is_symlink() or link.exists():
        if link.is_symlink() and Path(os.readlink(link)) == session_models:
            return link
        link.unlink()
    link.symlink_to(session_models, target_is_directory=True)
    return link


def write_auth_file(folder: Path, auth: tuple[str, str]) -> Path:
    """The page's ``user:password`` file (``--gradio-auth-path``), readable by us only."""
    path = folder / ".fastsd-auth"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{auth[0]}:{auth[1]}\n")
    return path


def ui_args(folder: Path, port: int, workspace_models: Path, auth_file: Path,
            listen: bool = False, cpu: bool = False) -> list[str]:
    """The UI's own command-line flags (the API password is added by the wrapper)."""
    args = ["--api", "--port", str(port), "--gradio-auth-path", str(auth_file),
            "--ckpt-dir", str(workspace_models), "--lora-dir", str(workspace_models / "Lora"),
            "--no-download-sd-model", "--skip-version-check", "--disable-console-progressbars"]
    if listen:
        args.append("--listen")
    if cpu:
        args += ["--skip-torch-cuda-test", "--use-cpu", "all", "--no-half"]
    return args


def command(folder: Path, user: str, args: list[str], python: str | None = None) -> list[str]:
    """The wrapper's command line: no password on it."""
    return [python or sys.executable, "-m", "fastsd.webui.external", "--folder", str(folder),
            "--user", user, "--", *args]


def start(ui: str, port: int, auth: tuple[str, str], *, session_models: Path | None = None,
          session_name: str | None = None, log_path: Path, workspace: Path,
          tunnel: str | None = "auto", folder: Path | None = None, clone: bool = True,
          cpu: bool | None = None, ready_timeout: float = background.READY_TIMEOUT,
          tunnel_timeout: float | None = None) -> background.Server:
    """Clone (once) and start ``ui`` in the background; see :func:`background.launch`."""
    spec = get(ui)
    folder = check_local(Path(folder) if folder else local_root() / spec.folder, workspace)
    if clone:
        folder = install(ui, folder)
    if not (folder / "launch.py").is_file():
        raise LaunchError(f"{folder} has no launch.py: it is not a {spec.name} folder.")
    link_models(folder, session_models, session_name)
    workspace_models = drive.make_folder(workspace / "models")
    if cpu is None:
        cpu = not _has_cuda()
    args = ui_args(folder, port, workspace_models, write_auth_file(folder, auth), cpu=cpu)
    extra = {} if tunnel_timeout is None else {"tunnel_timeout": tunnel_timeout}
    return background.launch(command(folder, auth[0], args), port, log_path, auth=auth,
                           tunnel=tunnel, cwd=folder, health_path=background.HEALTH_PATH,
                           ready_timeout=ready_timeout, **extra)


def _has_cuda() -> bool:
    return shutil.which("nvidia-smi") is not None


# --------------------------------------------------------------------------- the wrapper


def main(argv: list[str] | None = None) -> int:
    """Run the UI's launch.py with ``--api-auth`` from the environment, masking the
    password in everything it prints."""
    parser = argparse.ArgumentParser(prog="python -m fastsd.webui.external")
    parser.add_argument("--folder", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    password = os.environ.pop(PASSWORD_ENV, "")
    if not password:
        print("error: no password was given to the web UI", flush=True)
        return 2
    args = [a for a in ns.args if a != "--"]
    cmd = [sys.executable, "launch.py", *args, "--api-auth", f"{ns.user}:{password}"]
    proc = subprocess.Popen(cmd, cwd=ns.folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)

    def forward(sig, _frame):
        proc.send_signal(sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode("utf-8", "replace").replace(password, "***")
        sys.stdout.write(line)
        sys.stdout.flush()
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
