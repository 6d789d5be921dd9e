"""AUTOMATIC1111 or Forge instead of our own web UI.

The chosen UI is cloned at a pinned commit onto local disk (never Drive: its thousands of
small files would crawl through Drive's FUSE) and runs in the background through
:func:`fastsd.webui.process.launch` with ``--api``, a password for the page and the API,
the chosen tunnel and a health check. A failure to start is reported with the end of its
log.

**Its own environment.** Its set-up (``launch.py``) pip-installs its own pinned versions of
transformers, gradio, accelerate, pillow and more. It runs in ``venv/`` inside its folder,
made without pip: a ``.pth`` file there adds fastsd's site-packages *after* the venv's own,
so Colab's torch (and pip) are used as they are, while everything the UI installs lands in
the venv and shadows fastsd's copy for the UI only. pip never removes a package from
outside the environment it installs into, so fastsd's packages stay as they are.

**What it lists.** A folder of links on local disk (``fastsd-models/``) is its checkpoint
folder (``--ckpt-dir``) and LoRA folder (``--lora-dir``): the single-file checkpoints of the
workspace's and every session's ``models/`` (the list fastsd's own server shows, as single
files), and their LoRAs (``models/Lora/``, LoRA files in ``models/``, and so each
session's trained LoRAs, never listed as checkpoints). The workspace's ControlNets are
linked, one file each under their repository's name, into ``models/ControlNet/fastsd/``,
where Forge and AUTOMATIC1111's ControlNet extension look. The model chosen in the notebook
is loaded at start (``--ckpt``); a diffusers model is converted into one file once
(:func:`single_file`, after a check of Drive's free space) and kept.

Its password reaches it without ever being written to a log: a small wrapper (this
module's ``main``) reads it from the environment, adds ``--api-auth`` and copies the UI's
output to the log with the password masked (AUTOMATIC1111 prints its whole command line).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fastsd import drive, env, models, session as sessions
from fastsd.errors import LaunchError
from fastsd.models import registry
from fastsd.session import Session
from fastsd.webui import process
from fastsd.webui.auth import PASSWORD_ENV
from fastsd.webui.catalog import SINGLE_SUFFIXES, Catalog
from fastsd.workspace import Workspace

log = logging.getLogger("fastsd")

GIT_TIMEOUT = 300.0
VENV_TIMEOUT = 120.0
VENV = "venv"  # in the UI's folder, where its own webui.sh would make it
BASE_PATHS = "fastsd-base.pth"  # in the venv: fastsd's site-packages, after the venv's own
VIEW = "fastsd-models"  # in the UI's folder: links to what it lists, made again at each start
CONTROLNET_VIEW = Path("models", "ControlNet", "fastsd")  # searched recursively by both
SINGLE_FILES = "single-files"  # in the workspace's models/: files made for these UIs from
# diffusers folders that are not the workspace's or a session's own (a Hugging Face repo)
OLD_LINK = "fastsd-session-"  # earlier releases linked whole session folders: stale now
CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
# Settings that would send the UI's pip installs outside its venv.
PIP_REDIRECTS = ("PIP_TARGET", "PIP_PREFIX", "PIP_ROOT", "PIP_USER")


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


# --------------------------------------------------------------------------- environment


def base_site_dirs() -> list[str]:
    """fastsd's site-packages folders (on Colab, those holding its torch)."""
    import site

    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _venv_run(cmd: list[str], what: str) -> str:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True,
                              timeout=VENV_TIMEOUT).stdout
    except subprocess.CalledProcessError as e:
        tail = "\n".join((e.stderr or e.stdout or "").strip().splitlines()[-5:])
        raise LaunchError(f"Could not {what}:\n{tail}") from None
    except subprocess.TimeoutExpired:
        raise LaunchError(f"Could not {what} in {VENV_TIMEOUT:.0f}s; run the cell again.") \
            from None


def ensure_venv(folder: Path) -> Path:
    """The UI's own virtual environment (``folder/venv``), made once; returns its python.

    It has no pip of its own and reads fastsd's site-packages after its own (a ``.pth`` file
    that runs ``site.addsitedir``, so their ``.pth`` files count too): what the UI's set-up
    installs goes into the venv, and what it finds there already (torch) is used as it is.
    """
    venv = folder / VENV
    python = venv / "bin" / "python"
    if not (python.exists() and (venv / "pyvenv.cfg").is_file()):
        shutil.rmtree(venv, ignore_errors=True)
        _venv_run([sys.executable, "-m", "venv", "--without-pip", str(venv)],
                  f"create the web UI's environment in {venv}")
    site_dir = Path(_venv_run([str(python), "-c", "import sysconfig; "
                               "print(sysconfig.get_path('purelib'))"],
                              f"read the web UI's environment in {venv}").strip())
    site_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"import site; site.addsitedir({d!r})" for d in base_site_dirs()]
    (site_dir / BASE_PATHS).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return python


# --------------------------------------------------------------------------- models


def chosen_model(model: str | os.PathLike[str] | None, session: Session | None,
                 ws: Workspace) -> Path | None:
    """The model to load at start: ``model`` (a single file as it is, or any name the
    resolver takes), else the session's newest trained model, else none."""
    from fastsd.models.upload import trained_model

    if model:
        path = Path(model).expanduser()
        if path.is_file() and path.suffix.lower() in SINGLE_SUFFIXES:
            return path
        return models.resolve_model(model, ws)
    if session is not None and any(session.models.glob("*/model_index.json")):
        return trained_model(session)
    return None


def _own_folder(model: Path, ws: Workspace) -> bool:
    """Whether ``model`` is a folder of the workspace's or a session's models/, where its
    single file belongs beside it (the layout the trainer and the catalog use)."""
    try:
        parts = model.relative_to(ws.sessions).parts  # NAME/models/MODEL
    except ValueError:
        return model.parent == ws.models
    return len(parts) == 3 and parts[1] == "models"


def _label(model: Path, ws: Workspace) -> str:
    """A file name for a diffusers folder with no place of its own (a Hub snapshot is named
    after its repo, not its commit)."""
    try:
        repo = model.relative_to(ws.hub_cache).parts[0]
    except ValueError:
        return model.name
    return repo.removeprefix("models--")


def single_file(model: Path, ws: Workspace) -> Path:
    """The single file AUTOMATIC1111 and Forge load for ``model``.

    A single file is used as it is; a diffusers folder gives the file beside it (a trained
    model's) or the file it was converted from. Otherwise the folder is converted once with
    :func:`fastsd.convert.to_single_file` (fp16), after a check that Drive has room for it,
    and the file is kept: beside the folder when it is the workspace's or a session's, in
    ``models/single-files/`` when not.
    """
    from fastsd.convert import to_single_file
    from fastsd.convert.to_single import planned_size

    model = Path(model)
    if model.is_file():
        return model
    beside = [model.parent / (model.name + s) for s in SINGLE_SUFFIXES]
    dest = beside[0] if _own_folder(model, ws) else \
        ws.models / SINGLE_FILES / f"{_label(model, ws)}.safetensors"
    for found in (*beside, models.source_file(model), dest):
        if found is not None and found.is_file():
            return found
    need = planned_size(model)
    drive.require_space(dest.parent, need, f"The single file of {model.name} for the web UI")
    log.info("Converting %s into one file for the web UI (%s, once): %s", model.name,
             drive.gb(need), dest)
    return to_single_file(model, dest)


def controlnet_files(ws: Workspace) -> list[tuple[str, Path]]:
    """The workspace's ControlNets as (file name, weights). A downloaded one is named after
    its repository (``control_v11p_sd15_canny``): the name is what the UIs read its base
    family and its kind from."""
    root = ws.models / registry.CONTROLNET_DIR
    out = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if p.is_file() and p.suffix.lower() in CONTROLNET_SUFFIXES:
            out.append((p.name, p))
        elif p.is_dir() and registry.is_whole(p):
            weights = sorted(p.glob("*.safetensors"))
            repo = drive.read_json(p / registry.MARKER).get("repo") or p.name
            if len(weights) == 1:
                out.append((repo.rsplit("/", 1)[-1] + weights[0].suffix, weights[0]))
    return out


@dataclass(frozen=True)
class ModelView:
    """The folders of links the UI reads, and the link of the model it loads at start."""

    checkpoints: Path
    loras: Path
    controlnets: Path
    chosen: Path | None


def _link(folder: Path, target: Path, name: str | None = None) -> Path | None:
    link = folder / (name or target.name)
    if link.is_symlink() or link.exists():
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return link
        log.info("Not listing %s in the web UI: %s already has that name.", target, link)
        return None
    link.symlink_to(target)
    return link


def link_models(folder: Path, ws: Workspace, chosen: Path | None = None,
                session: Session | None = None) -> ModelView:
    """Make the UI's folders of links again: checkpoints (the chosen file first, then the
    single files of ``session``'s, every other session's and the workspace's models/, and
    the files made for these UIs), LoRAs and ControlNets. Only links are removed."""
    view = ModelView(folder / VIEW / "Stable-diffusion", folder / VIEW / "Lora",
                     folder / CONTROLNET_VIEW, None)
    for d in (view.checkpoints, view.loras, view.controlnets):
        d.mkdir(parents=True, exist_ok=True)
        for p in d.iterdir():
            if p.is_symlink():
                p.unlink()
    for p in (folder / "models" / "Stable-diffusion").glob(OLD_LINK + "*"):  # its own folder
        if p.is_symlink():
            p.unlink()
    names = [session.name] if session else []
    names += [n for n in sessions.list_sessions(ws) if n not in names]
    catalog = Catalog([sessions.load(n, ws).models for n in names] + [ws.models])
    made = ws.models / SINGLE_FILES
    files = [chosen] if chosen else []
    files += [c.file for c in catalog.checkpoints() if c.file is not None]
    files += sorted(p for p in made.iterdir() if p.suffix in SINGLE_SUFFIXES) \
        if made.is_dir() else []
    chosen_link = None
    for f in dict.fromkeys(files):
        link = _link(view.checkpoints, f)
        if link is not None and f.with_suffix(".yaml").is_file():  # an SD 2.x model's config
            _link(view.checkpoints, f.with_suffix(".yaml"), link.with_suffix(".yaml").name)
        if f == chosen:
            chosen_link = link
    left = [c.name for c in catalog.checkpoints() if c.file is None]
    if left:
        log.info("Not in the web UI's list (diffusers folders without a single file; choose "
                 "one as the model to convert it once): %s", ", ".join(left))
    for lora in catalog.loras():
        _link(view.loras, lora.path)
    for name, weights in controlnet_files(ws):
        _link(view.controlnets, weights, name)
    return ModelView(view.checkpoints, view.loras, view.controlnets, chosen_link)


# --------------------------------------------------------------------------- launch


def write_auth_file(folder: Path, auth: tuple[str, str]) -> Path:
    """The page's ``user:password`` file (``--gradio-auth-path``), readable by us only."""
    path = folder / ".fastsd-auth"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{auth[0]}:{auth[1]}\n")
    return path


def ui_args(port: int, auth_file: Path, view: ModelView, listen: bool = False,
            cpu: bool = False) -> list[str]:
    """The UI's own command-line flags (the API password is added by the wrapper)."""
    args = ["--api", "--port", str(port), "--gradio-auth-path", str(auth_file),
            "--ckpt-dir", str(view.checkpoints), "--lora-dir", str(view.loras),
            "--no-download-sd-model", "--skip-version-check", "--disable-console-progressbars"]
    if view.chosen is not None:
        args += ["--ckpt", str(view.chosen)]
    if listen:
        args.append("--listen")
    if cpu:
        args += ["--skip-torch-cuda-test", "--use-cpu", "all", "--no-half"]
    return args


def command(folder: Path, user: str, python: Path, args: list[str]) -> list[str]:
    """The wrapper's command line (run by fastsd's interpreter; ``python`` runs the UI):
    no password on it."""
    return [sys.executable, "-m", "fastsd.webui.external", "--folder", str(folder),
            "--user", user, "--python", str(python), "--", *args]


def start(ui: str, port: int, auth: tuple[str, str], *,
          model: str | os.PathLike[str] | None = None, session: Session | None = None,
          log_path: Path, workspace: Workspace | Path, tunnel: str | None = "auto",
          folder: Path | None = None, clone: bool = True, cpu: bool | None = None,
          ready_timeout: float = process.READY_TIMEOUT,
          tunnel_timeout: float | None = None) -> process.Server:
    """Clone (once) and start ``ui`` in the background in its own environment, with
    ``model`` (else ``session``'s trained model) loaded; see :func:`process.launch`."""
    spec = get(ui)
    ws = Workspace.current(workspace)
    folder = check_local(Path(folder) if folder else local_root() / spec.folder, ws.root)
    chosen = chosen_model(model, session, ws)
    if clone:
        folder = install(ui, folder)
    if not (folder / "launch.py").is_file():
        raise LaunchError(f"{folder} has no launch.py: it is not a {spec.name} folder.")
    python = ensure_venv(folder)
    view = link_models(folder, ws, single_file(chosen, ws) if chosen else None, session)
    if cpu is None:
        cpu = not _has_cuda()
    args = ui_args(port, write_auth_file(folder, auth), view, cpu=cpu)
    extra = {} if tunnel_timeout is None else {"tunnel_timeout": tunnel_timeout}
    return process.launch(command(folder, auth[0], python, args), port, log_path, auth=auth,
                          tunnel=tunnel, cwd=folder, health_path=process.HEALTH_PATH,
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
    parser.add_argument("--python", required=True)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    password = os.environ.pop(PASSWORD_ENV, "")
    if not password:
        print("error: no password was given to the web UI", flush=True)
        return 2
    args = [a for a in ns.args if a != "--"]
    cmd = [ns.python, "launch.py", *args, "--api-auth", f"{ns.user}:{password}"]
    ui_env = {k: v for k, v in os.environ.items() if k not in PIP_REDIRECTS}
    proc = subprocess.Popen(cmd, cwd=ns.folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=ui_env)

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
