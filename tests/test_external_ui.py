"""AUTOMATIC1111 / Forge: command building, the offline clone failure and a failed start."""

from __future__ import annotations

import sys
import time

import pytest

from fastsd.errors import LaunchError
from fastsd.webui import background, external
from tunnel_helpers import AUTH


@pytest.fixture(autouse=True)
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(background.RUN_DIR_ENV, str(tmp_path / "run"))
    monkeypatch.setattr(background, "_current", None)
    yield
    server = background.current()
    if server is not None:
        server.stop(timeout=5)


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_flags_point_at_the_workspace_and_the_password_file(tmp_path, workspace):
    folder = tmp_path / "webui"
    folder.mkdir()
    auth_file = external.write_auth_file(folder, AUTH)
    assert auth_file.read_text() == f"{AUTH[0]}:{AUTH[1]}\n"
    assert auth_file.stat().st_mode & 0o777 == 0o600
    args = external.ui_args(folder, 7861, workspace / "models", auth_file, cpu=True)
    assert "--api" in args and flag(args, "--port") == "7861"
    assert flag(args, "--ckpt-dir") == str(workspace / "models")
    assert flag(args, "--lora-dir") == str(workspace / "models" / "Lora")
    assert flag(args, "--gradio-auth-path") == str(auth_file)
    assert "--skip-torch-cuda-test" in args and "--listen" not in args
    assert AUTH[1] not in " ".join(args)
    cmd = external.command(folder, AUTH[0], args)
    assert cmd[:3] == [sys.executable, "-m", "fastsd.webui.external"]
    assert flag(cmd, "--folder") == str(folder) and flag(cmd, "--user") == AUTH[0]
    assert AUTH[1] not in " ".join(cmd)
    gpu = external.ui_args(folder, 7861, workspace / "models", auth_file, cpu=False)
    assert "--skip-torch-cuda-test" not in gpu and "--use-cpu" not in gpu


def test_session_models_are_linked_into_the_checkpoint_folder(tmp_path, workspace):
    folder, models = tmp_path / "webui", workspace / "sessions" / "dog" / "models"
    models.mkdir(parents=True)
    (models / "dog.safetensors").write_bytes(b"x")
    link = external.link_models(folder, models, "dog")
    assert link == folder / "models" / "Stable-diffusion" / "fastsd-session-dog"
    assert (link / "dog.safetensors").read_bytes() == b"x"
    assert external.link_models(folder, models, "dog") == link  # idempotent


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
    assert "--ckpt-dir " + str(workspace / "models") in text
