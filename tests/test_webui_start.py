"""The notebook's one call: the saved password, the UI choice and the offline failure."""

from __future__ import annotations

import logging

import pytest

from fastsd import session
from fastsd.errors import LaunchError
from fastsd.webui import external, process, start


@pytest.fixture(autouse=True)
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(process.RUN_DIR_ENV, str(tmp_path / "run"))
    monkeypatch.setattr(process, "_current", None)
    monkeypatch.setattr(external, "local_root", lambda: tmp_path / "local")
    monkeypatch.delenv(process.PASSWORD_ENV, raising=False)


def test_a_password_is_generated_once_kept_private_and_never_logged(workspace, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    first = start.saved_password(workspace)
    assert len(first) >= 12 and start.saved_password(workspace) == first
    path = workspace / start.PASSWORD_FILE
    assert path.read_text().strip() == first and path.stat().st_mode & 0o777 == 0o600
    assert first not in caplog.text
    start.show_password(workspace)  # the user name beside it, always
    shown = "The web UI's login: user {!r}, password " + first
    assert capsys.readouterr().out.strip() == shown.format("fastsd")
    start.show_password(workspace, "artist")
    assert capsys.readouterr().out.strip() == shown.format("artist")


def test_serve_command_has_no_password(workspace):
    cmd = start.serve_command(7860, "fastsd", "dog", "tiny-sd1", workspace)
    assert cmd[1:4] == ["-m", "fastsd.cli", "serve"]
    assert cmd[cmd.index("--session") + 1] == "dog" and cmd[cmd.index("--port") + 1] == "7860"
    assert "--password" not in cmd


def test_unknown_ui_is_refused(workspace):
    with pytest.raises(LaunchError, match="Unknown web UI 'comfy'"):
        start.start(ui="comfy", home=workspace)


def test_forge_offline_fails_fast_with_the_reason(workspace, tmp_path):
    session.create("dog", workspace)
    with pytest.raises(LaunchError, match="Could not get Forge"):
        start.start("dog", ui="forge", home=workspace, tunnel=None)
    assert process.current() is None
    assert not (tmp_path / "local" / "stable-diffusion-webui-forge").exists()
