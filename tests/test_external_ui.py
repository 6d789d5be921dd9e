"""AUTOMATIC1111 / Forge: command building, the offline clone failure, a failed start, and
a launch from the notebook's call of a stand-in UI that does what the real one's start-up
does to fastsd: it pip-installs its own pinned versions and reads the model folders and the
model to load from its command line."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from fastsd import deps, session as sessions
from fastsd.errors import DriveError, LaunchError
from fastsd.models import registry
from fastsd.webui import external, process, start
from fastsd.workspace import Workspace
from test_colab_drive import fuse_drive, standin  # noqa: F401  (the FUSE Drive fixture)
from tunnel_helpers import AUTH


@pytest.fixture(autouse=True)
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(process.RUN_DIR_ENV, str(tmp_path / "run"))
    monkeypatch.setattr(process, "_current", None)
    yield
    server = process.current()
    if server is not None:
        server.stop(timeout=5)


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_flags_name_the_model_folders_the_model_and_the_password_file(tmp_path):
    folder = tmp_path / "webui"
    folder.mkdir()
    auth_file = external.write_auth_file(folder, AUTH)
    assert auth_file.read_text() == f"{AUTH[0]}:{AUTH[1]}\n"
    assert auth_file.stat().st_mode & 0o777 == 0o600
    view = external.ModelView(folder / "c", folder / "l", folder / "n", folder / "c" / "m.ckpt")
    args = external.ui_args(7861, auth_file, view, cpu=True)
    assert "--api" in args and flag(args, "--port") == "7861"
    assert flag(args, "--ckpt-dir") == str(folder / "c")
    assert flag(args, "--ckpt") == str(view.chosen)
    assert flag(args, "--lora-dir") == str(folder / "l")
    assert flag(args, "--gradio-auth-path") == str(auth_file)
    assert "--skip-torch-cuda-test" in args and "--listen" not in args
    assert AUTH[1] not in " ".join(args)
    python = folder / "venv" / "bin" / "python"
    cmd = external.command(folder, AUTH[0], python, args)
    assert cmd[:3] == [sys.executable, "-m", "fastsd.webui.external"]
    assert flag(cmd, "--folder") == str(folder) and flag(cmd, "--user") == AUTH[0]
    assert flag(cmd, "--python") == str(python)
    assert AUTH[1] not in " ".join(cmd)
    none_chosen = external.ModelView(view.checkpoints, view.loras, view.controlnets, None)
    gpu = external.ui_args(7861, auth_file, none_chosen, cpu=False)
    assert "--skip-torch-cuda-test" not in gpu and "--use-cpu" not in gpu
    assert "--ckpt" not in gpu


def test_pins_are_full_commits():
    for ui in external.UIS.values():
        assert len(ui.commit) == 40 and int(ui.commit, 16) >= 0
        assert ui.repo.startswith("https://github.com/")


def test_a_folder_on_drive_is_refused(workspace, tmp_path):
    with pytest.raises(LaunchError, match="on Google Drive"):
        external.start("a1111", 7861, AUTH, log_path=tmp_path / "l.log", workspace=workspace,
                       folder=workspace / "webui", tunnel=None)


def test_unknown_ui_is_named(workspace, tmp_path):
    with pytest.raises(LaunchError, match="Unknown web UI 'comfy'"):
        external.get("comfy")


def test_clone_offline_fails_fast_and_leaves_nothing(tmp_path):
    start = time.monotonic()
    with pytest.raises(LaunchError) as e:
        external.install("forge", tmp_path / "ui" / "forge", timeout=60)
    assert "Could not get Forge" in str(e.value) and "git fetch failed" in str(e.value)
    assert time.monotonic() - start < 30
    assert not list((tmp_path / "ui").iterdir())


# A stand-in for the UI's launch.py: prints its command line as AUTOMATIC1111 does, then
# fails the way a broken install does.
FAILING_UI = """
import sys
print("Launching Web UI with arguments:", " ".join(sys.argv[1:]), flush=True)
print("RuntimeError: Torch is not able to use GPU", flush=True)
sys.exit(1)
"""


def test_a_ui_that_fails_to_start_says_why_and_never_logs_the_password(tmp_path, workspace):
    folder = tmp_path / "webui"
    folder.mkdir()
    (folder / "launch.py").write_text(FAILING_UI)
    log = workspace / "sessions" / "dog" / "logs" / "a1111.log"
    server = external.start("a1111", 7869, AUTH, log_path=log, workspace=workspace,
                            folder=folder, clone=False, tunnel=None, cpu=True)
    with pytest.raises(LaunchError) as e:
        server.wait_ready(60)
    message = str(e.value)
    assert "Torch is not able to use GPU" in message and "exit status 1" in message
    text = log.read_text()
    assert f"--api-auth {AUTH[0]}:***" in text and AUTH[1] not in text
    assert "--ckpt-dir " + str(folder / external.VIEW / "Stable-diffusion") in text


# --------------------------------------------------------------------------- a real launch

# A stand-in for AUTOMATIC1111's launch.py, doing what the real start-up does that matters to
# fastsd: its command line is parsed strictly (an unknown flag stops it); its environment
# set-up installs torch only when it cannot find one, and pip-installs its pinned
# requirements with the interpreter it runs under; its checkpoint list is every .ckpt and
# .safetensors under --ckpt-dir and its own models/Stable-diffusion (recursively, following
# links), and --ckpt adds a file and selects it; LoRAs come from --lora-dir, ControlNets from
# models/ControlNet (recursively). It answers the API's routes behind --api-auth.
STANDIN_UI = r'''
import argparse, base64, importlib.util, json, os, subprocess, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

p = argparse.ArgumentParser()
for name in ("--api", "--no-download-sd-model", "--skip-version-check", "--listen",
             "--disable-console-progressbars", "--skip-torch-cuda-test", "--no-half",
             "--skip-install"):
    p.add_argument(name, action="store_true")
for name in ("--gradio-auth-path", "--api-auth", "--ckpt", "--ckpt-dir", "--lora-dir"):
    p.add_argument(name)
p.add_argument("--port", type=int, default=7860)
p.add_argument("--use-cpu", nargs="+", default=[])
args = p.parse_args()
print("Launching Web UI with arguments:", " ".join(sys.argv[1:]), flush=True)

if importlib.util.find_spec("torch") is None:
    sys.exit("Installing torch and torchvision (torch is not visible to this interpreter)")
if not args.skip_install:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links",
                    "wheels", "-r", "requirements_versions.txt"], check=True)

here = os.path.dirname(os.path.abspath(__file__))

def walk(root, exts):
    for folder, _, files in sorted(os.walk(root, followlinks=True)):
        for f in sorted(files):
            if os.path.splitext(f)[1].lower() in exts:
                yield os.path.join(folder, f)

def stem(path):
    return os.path.splitext(os.path.basename(path))[0]

checkpoints = {}
for root in [d for d in (args.ckpt_dir, os.path.join(here, "models", "Stable-diffusion")) if d]:
    for f in walk(root, (".ckpt", ".safetensors")):
        checkpoints.setdefault(os.path.relpath(f, root), f)
selected = next(iter(checkpoints), None)
if args.ckpt and os.path.exists(args.ckpt):
    under = args.ckpt_dir and os.path.abspath(args.ckpt).startswith(os.path.abspath(args.ckpt_dir))
    selected = os.path.relpath(args.ckpt, args.ckpt_dir) if under else os.path.basename(args.ckpt)
    checkpoints[selected] = args.ckpt
loras = [stem(f) for f in walk(args.lora_dir, (".safetensors", ".pt", ".ckpt"))]
controlnets = [stem(f) for f in walk(os.path.join(here, "models", "ControlNet"),
                                     (".pt", ".pth", ".ckpt", ".safetensors", ".bin"))]
routes = {
    "/sdapi/v1/samplers": [{"name": "Euler a"}],
    "/sdapi/v1/sd-models": [{"title": t, "model_name": stem(t), "filename": f}
                            for t, f in checkpoints.items()],
    "/sdapi/v1/options": {"sd_model_checkpoint": selected},
    "/sdapi/v1/loras": [{"name": n} for n in loras],
    "/controlnet/model_list": {"model_list": controlnets},
}
expected = "Basic " + base64.b64encode(args.api_auth.encode()).decode()

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.headers.get("Authorization") != expected or self.path not in routes:
            self.send_response(401 if self.path in routes else 404)
            self.end_headers()
            return
        body = json.dumps(routes[self.path]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass

ThreadingHTTPServer(("0.0.0.0" if args.listen else "127.0.0.1", args.port), Handler).serve_forever()
'''

# What the stand-in's set-up installs: versions other than fastsd's pins, as AUTOMATIC1111's
# and Forge's requirements_versions.txt pin them.
UI_PINS = {"transformers": "4.30.2", "pillow": "9.5.0"}
MODULES = {"transformers": "transformers", "pillow": "PIL"}


def fake_wheel(folder: Path, name: str, version: str) -> Path:
    """A pure-Python wheel of ``name`` whose module only says its version."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{MODULES[name]}/__init__.py", f"__version__ = {version!r}\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: fastsd-tests\n"
                                    "Root-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def standin_repo(path: Path) -> tuple[Path, str]:
    """A git repository holding the stand-in UI, its pins and their wheels, and its commit."""
    (path / "wheels").mkdir(parents=True)
    (path / "launch.py").write_text(STANDIN_UI)
    (path / "requirements_versions.txt").write_text(
        "".join(f"{n}=={v}\n" for n, v in UI_PINS.items()))
    for name, version in UI_PINS.items():
        fake_wheel(path / "wheels", name, version)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(path)]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "stand-in"]):
        subprocess.run(git + args, check=True, capture_output=True)
    return path, subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True,
                                text=True).stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_packages() -> dict[str, int]:
    """Every entry of fastsd's site-packages with its modification time."""
    return {str(p): p.stat().st_mtime_ns for d in external.base_site_dirs()
            for p in Path(d).iterdir()}


def lora_file(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight":
               torch.zeros(4, 8)}, str(path))
    return path


@dataclass
class Launched:
    server: process.Server
    home: Path
    folder: Path  # the UI's clone
    chosen: Path  # the diffusers model named in the notebook
    before: dict[str, int]  # fastsd's site-packages before the launch

    def get(self, route: str):
        r = requests.get(self.server.local_url + route, auth=AUTH, timeout=10)
        r.raise_for_status()
        return r.json()


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_sd1):
    """The notebook's call (start.start with the model field) of AUTOMATIC1111, cloned from
    a local repository holding the stand-in, on a workspace holding everything the old
    checkpoint folder listed wrongly: diffusers parts, LoRAs, a ControlNet, the Hub cache."""
    from fastsd.convert import to_single_file

    base = tmp_path_factory.mktemp("a1111")
    repo, commit = standin_repo(base / "repo")
    home = base / "home"
    ws = Workspace(home)
    dog = sessions.create("dog", home)
    shutil.copytree(tiny_sd1, dog.models / "dog")
    to_single_file(tiny_sd1, dog.models / "dog.safetensors")
    ws.models.mkdir(parents=True)
    shutil.copy(dog.models / "dog.safetensors", ws.models / "other.safetensors")
    chosen = shutil.copytree(tiny_sd1, ws.models / "mine")  # diffusers only
    lora_file(ws.models / "Lora" / "style.safetensors")
    lora_file(ws.models / "loose-lora.safetensors")
    lora_file(dog.loras / "dog.safetensors")  # a LoRA the session trained, named as its model
    cn = ws.models / registry.CONTROLNET_DIR / "sd1-canny"
    shutil.copytree(tiny_sd1 / "unet", cn)  # a diffusers ControlNet's files
    files = {f.name: f.stat().st_size for f in cn.iterdir()}
    (cn / registry.MARKER).write_text(json.dumps({"repo": "lllyasviel/control_v11p_sd15_canny",
                                                  "files": files}))
    shutil.copytree(tiny_sd1 / "unet", ws.hub_cache / "models--a--b" / "snapshots" / "1" / "unet")
    old = base / "local" / "stable-diffusion-webui" / "models" / "Stable-diffusion"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(process.RUN_DIR_ENV, str(base / "run"))
        mp.setattr(process, "_current", None)
        mp.setitem(external.UIS, "a1111", external.ExternalUI(
            "AUTOMATIC1111", str(repo), commit, "stable-diffusion-webui"))
        mp.setattr(external, "local_root", lambda: base / "local")
        external.install("a1111")
        old.mkdir(parents=True)  # what an earlier release linked there
        (old / (external.OLD_LINK + "dog")).symlink_to(dog.models, target_is_directory=True)
        before = base_packages()
        server = start.start(model=str(chosen), ui="a1111", tunnel=None, port=free_port(),
                             user=AUTH[0], password=AUTH[1], home=home, ready_timeout=180)
        try:
            server.wait_ready(180)
            yield Launched(server, home, base / "local" / "stable-diffusion-webui", chosen,
                           before)
        finally:
            server.stop(timeout=10)


def test_the_chosen_diffusers_model_is_one_file_loaded_at_start(launched):
    from fastsd.convert.detect import detect_file

    single = launched.chosen.parent / "mine.safetensors"
    assert detect_file(single).kind == "checkpoint"
    assert launched.get("/sdapi/v1/options")["sd_model_checkpoint"] == "mine.safetensors"
    listed = {m["title"]: m["filename"] for m in launched.get("/sdapi/v1/sd-models")}
    assert Path(listed["mine.safetensors"]).resolve() == single
    stamp = single.stat().st_mtime_ns  # kept: asked again, nothing is converted
    assert external.single_file(launched.chosen, Workspace(launched.home)) == single
    assert single.stat().st_mtime_ns == stamp


def test_the_lists_hold_single_files_loras_and_controlnets_each_in_its_place(launched):
    titles = sorted(m["title"] for m in launched.get("/sdapi/v1/sd-models"))
    assert titles == ["dog.safetensors", "mine.safetensors", "other.safetensors"]
    # the session's LoRA (models/Lora) is a LoRA, never a checkpoint, though it has the name
    # of the session's checkpoint
    assert sorted(lo["name"] for lo in launched.get("/sdapi/v1/loras")) == ["dog", "loose-lora",
                                                                             "style"]
    assert launched.get("/controlnet/model_list")["model_list"] == ["control_v11p_sd15_canny"]


def test_a_session_without_a_model_named_gives_its_trained_file(launched):
    ws = Workspace(launched.home)
    dog = sessions.load("dog", ws)
    model = external.chosen_model(None, dog, ws)
    assert model == dog.models / "dog"
    assert external.single_file(model, ws) == dog.models / "dog.safetensors"
    assert external.chosen_model(None, sessions.create("new", ws), ws) is None


def test_a_hub_model_becomes_a_file_of_the_workspace_listed_from_then_on(tmp_path, tiny_sd1):
    ws = Workspace(tmp_path / "home")
    snapshot = shutil.copytree(tiny_sd1, ws.hub_cache / "models--owner--name" / "snapshots" / "1")
    single = external.single_file(snapshot, ws)
    assert single == ws.models / external.SINGLE_FILES / "owner--name.safetensors"
    assert [p.name for p in snapshot.parent.iterdir()] == ["1"]  # the Hub cache untouched
    view = external.link_models(tmp_path / "ui", ws)
    assert [p.name for p in view.checkpoints.iterdir()] == [single.name]
    assert view.chosen is None


def test_the_ui_installs_its_pins_into_its_own_venv_and_fastsd_keeps_its_own(launched):
    python = launched.folder / external.VENV / "bin" / "python"
    probe = "import json, {0}; print(json.dumps([{0}.__version__, {0}.__file__]))"
    seen = [json.loads(subprocess.run([str(python), "-c", probe.format(MODULES[n])],
                                      check=True, capture_output=True, text=True).stdout)
            for n in UI_PINS]
    assert [v for v, _ in seen] == list(UI_PINS.values())
    assert all(Path(f).is_relative_to(launched.folder / external.VENV) for _, f in seen)
    torch_file = subprocess.run([str(python), "-c", "import importlib.util as u; "
                                 "print(u.find_spec('torch').origin)"],
                                check=True, capture_output=True, text=True).stdout.strip()
    assert any(Path(torch_file).is_relative_to(d) for d in external.base_site_dirs())
    assert base_packages() == launched.before  # nothing written into fastsd's site-packages
    check = ("import json, fastsd, transformers, PIL; from fastsd import deps; "
             "print(json.dumps([deps.missing(deps.read_requirements()), "
             "transformers.__version__, PIL.__version__]))")
    missing, transformers, pillow = json.loads(subprocess.run(
        [sys.executable, "-c", check], check=True, capture_output=True, text=True).stdout)
    pins = dict(r.split("==") for r in deps.read_requirements() if "==" in r)
    assert missing == [] and (transformers, pillow) == (pins["transformers"], pins["pillow"])
    assert "Not uninstalling transformers" in launched.server.log.read_text()


def test_a_conversion_that_does_not_fit_on_drive_is_refused(fuse_drive, tiny_sd1):
    ws = Workspace.current()
    model = shutil.copytree(tiny_sd1, ws.models / "big")
    used = sum(f.stat().st_size for f in standin.backing().rglob("*") if f.is_file())
    standin.set_limits(quota=used + (8 << 20))
    with pytest.raises(DriveError) as e:
        external.single_file(model, ws)
    assert "needs" in str(e.value) and "free" in str(e.value)
    assert not list(ws.models.glob("big.*")) and not (ws.models / external.SINGLE_FILES).exists()
