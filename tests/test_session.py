import json
import logging
from pathlib import Path

import pytest

from fastsd import env, session
from fastsd.errors import (ConfirmationNeeded, DataError, InvalidName, SchemaError, SessionExists,
                           SessionNotFound)


@pytest.mark.parametrize("name, why", [
    ("", "empty"),
    ("   ", "empty"),
    ("a/b", "path separator"),
    ("a\\b", "path separator"),
    ("/abs", "path separator"),
    ("..", ".."),
    ("a..b", ".."),
    ("new\nline", "control characters"),
    ("tab\there", "control characters"),
    ("nul\x00", "control characters"),
    ("x" * 65, "limit is 64"),
])
def test_bad_names_are_refused_with_the_reason(name, why, workspace):
    with pytest.raises(InvalidName, match=why):
        session.create(name, workspace)
    assert not (workspace / "sessions").exists() or not any((workspace / "sessions").iterdir())


def test_good_names_and_the_64_character_limit():
    assert session.validate_name("my-dog_2") == "my-dog_2"
    assert session.validate_name("x" * 64) == "x" * 64
    assert session.validate_name("émilie") == "émilie"


def test_spaces_become_underscores_and_the_user_is_told(workspace, caplog):
    with caplog.at_level(logging.WARNING, logger="fastsd"):
        s = session.create("my  dog photos", workspace)
    assert s.name == "my_dog_photos"
    assert s.path == workspace / "sessions" / "my_dog_photos"
    assert "my_dog_photos" in caplog.text and "spaces" in caplog.text


def test_create_lays_out_the_template_and_settings(workspace):
    s = session.create("dog", workspace, class_word="dog", resolution=768)
    template = Path(__file__).resolve().parent.parent / "sessions_template"
    folders = sorted(p.name for p in template.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == sorted(session.FOLDERS)  # what the code expects is what it copies
    assert sorted(p.name for p in s.path.iterdir()) == sorted([*folders, "README.txt",
                                                               "session.json"])
    assert (s.path / "README.txt").read_text() == (template / "README.txt").read_text()
    for folder in session.FOLDERS:
        assert list((s.path / folder).iterdir()) == [], "the .keep files stay in git"
    data = json.loads(s.file.read_text())
    assert data["schema_version"] == session.SCHEMA_VERSION
    assert data["settings"]["class_word"] == "dog"
    assert data["settings"]["resolution"] == 768
    assert data["settings"]["instance_token"] == "sks"
    assert [p.name for p in s.path.parent.iterdir()] == ["dog"]


def test_create_refuses_an_existing_session(workspace):
    session.create("dog", workspace)
    with pytest.raises(SessionExists, match="already exists"):
        session.create("dog", workspace)


def test_load_list_show_update(workspace):
    session.create("b", workspace)
    session.create("a", workspace, class_word="cat")
    assert session.list_sessions(workspace) == ["a", "b"]
    s = session.load("a", workspace)
    assert s.settings["class_word"] == "cat"
    s.update(resolution=256)
    assert session.load("a", workspace).settings["resolution"] == 256
    (s.instance_images / "x.png").write_bytes(b"x")
    summary = s.summary()
    assert summary["instance_images"] == 1 and summary["captions"] == 0


def test_load_missing_names_the_known_sessions(workspace):
    session.create("dog", workspace)
    with pytest.raises(SessionNotFound, match="sessions: dog"):
        session.load("cat", workspace)


def test_workspace_defaults_to_fastsd_home(workspace):
    s = session.create("dog")
    assert s.path == workspace / "sessions" / "dog"


def test_delete_needs_confirmation_and_stays_inside(workspace):
    s = session.create("dog", workspace)
    neighbour = session.create("dog2", workspace)
    outside = workspace / "precious.txt"
    outside.write_text("keep me")
    with pytest.raises(ConfirmationNeeded, match="confirm=True"):
        session.delete("dog", workspace)
    assert s.path.is_dir()
    session.delete("dog", workspace, confirm=True)
    assert not s.path.exists()
    assert neighbour.file.is_file() and outside.read_text() == "keep me"
    with pytest.raises(SessionNotFound):
        session.delete("dog", workspace, confirm=True)


def test_delete_refuses_a_link_to_a_folder_elsewhere(workspace, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "session.json").write_text("{}")
    (target / "photo.jpg").write_bytes(b"irreplaceable")
    (workspace / "sessions").mkdir()
    (workspace / "sessions" / "linked").symlink_to(target)
    with pytest.raises(InvalidName, match="link"):
        session.delete("linked", workspace, confirm=True)
    assert (target / "photo.jpg").read_bytes() == b"irreplaceable"


def test_a_newer_schema_is_refused_clearly(workspace):
    s = session.create("dog", workspace)
    data = json.loads(s.file.read_text())
    data["schema_version"] = session.SCHEMA_VERSION + 1
    s.file.write_text(json.dumps(data))
    with pytest.raises(SchemaError, match="newer fastsd"):
        session.load("dog", workspace)
    assert json.loads(s.file.read_text())["schema_version"] == session.SCHEMA_VERSION + 1


def test_an_older_schema_is_migrated_and_saved(workspace):
    path = workspace / "sessions" / "old"
    path.mkdir(parents=True)
    (path / "session.json").write_text(json.dumps(
        {"version": 1, "name": "old", "token": "ohwx", "class_name": "dog", "resolution": 640}))
    s = session.load("old", workspace)
    assert s.settings["instance_token"] == "ohwx"
    assert s.settings["class_word"] == "dog"
    assert s.settings["resolution"] == 640
    saved = json.loads((path / "session.json").read_text())
    assert saved["schema_version"] == session.SCHEMA_VERSION
    assert saved["settings"]["instance_token"] == "ohwx"
    assert "token" not in saved["settings"]
    for folder in session.FOLDERS:
        assert (path / folder).is_dir()


def test_a_session_given_the_test_model_by_the_old_default_gets_the_forms_model(workspace):
    """Schema 2 filled in the tiny test model for a session made without a base model (the
    notebook's session cell); the base model cell then kept it. Loaded now, such a session
    has none, so the base model cell's choice is taken without ticking Change."""
    path = workspace / "sessions" / "bitten"
    path.mkdir(parents=True)
    (path / "session.json").write_text(json.dumps(
        {"schema_version": 2, "name": "bitten", "created": 1.0,
         "settings": {"base_model": "tiny-sd1", "instance_token": "sks",
                      "class_word": "person", "resolution": 512}}))
    opened = session.open("bitten", workspace, {"base_model": "sd15"})
    assert opened.session.settings["base_model"] == "sd15"
    assert opened.changed == {"base_model": (None, "sd15")} and not opened.kept
    saved = json.loads((path / "session.json").read_text())
    assert saved["schema_version"] == 3 and saved["settings"]["base_model"] == "sd15"
    # a base model the user named is kept, as before
    chosen = session.create("chosen", workspace, base_model="tiny-sd1")
    assert session.load("chosen", workspace).settings["base_model"] == "tiny-sd1"
    assert chosen.settings["base_model"] == "tiny-sd1"


def test_corrupt_session_json_gives_a_clear_error(workspace):
    s = session.create("dog", workspace)
    s.file.write_text('{"schema_version": 2, "sett')
    with pytest.raises(SchemaError, match="not valid JSON"):
        session.load("dog", workspace)


def test_open_loads_an_existing_session_without_changing_its_settings(workspace, monkeypatch):
    first = session.open("dog", workspace, {"class_word": "dog", "resolution": 512})
    assert first.created and first.session.settings["class_word"] == "dog"
    before = (workspace / "sessions" / "dog" / "session.json").read_bytes()

    again = session.open("dog", workspace, {"class_word": "person", "resolution": 768,
                                            "instance_token": "sks"})
    assert not again.created and not again.changed
    assert again.kept == {"class_word": ("dog", "person"), "resolution": (512, 768)}
    assert again.session.settings["class_word"] == "dog"
    assert (workspace / "sessions" / "dog" / "session.json").read_bytes() == before
    assert session.load("dog", workspace).settings["resolution"] == 512
    text = str(again)
    assert text.startswith("Loaded session dog") and "class_word: 'dog' (the form says 'person')" \
        in text
    # how to change them, on the command line, then in the notebook's session cell
    assert "to change them, run 'fastsd session set dog --class person --resolution 768'" \
        in text, text
    monkeypatch.setenv(env.CALLER_ENV, "2. Drive and session")
    assert "to change them, set Class_Word to 'person', set Resolution to 768 and tick " \
        "Change_Settings in cell 2 (Drive and session)" in str(again), str(again)


def test_open_with_change_says_what_it_changed(workspace):
    session.open("cat", workspace, {"class_word": "cat", "resolution": 512})
    opened = session.open("cat", workspace, {"class_word": "kitten", "resolution": 512},
                          change=True)
    assert opened.changed == {"class_word": ("cat", "kitten")} and not opened.kept
    assert session.load("cat", workspace).settings["class_word"] == "kitten"
    assert "changed class_word: 'cat' -> 'kitten'" in str(opened)


def test_open_fills_in_a_setting_not_chosen_yet(workspace):
    session.create("new", workspace, base_model=None)
    opened = session.open("new", workspace, {"base_model": "tiny-sd1"})
    assert opened.changed == {"base_model": (None, "tiny-sd1")}
    assert session.load("new", workspace).settings["base_model"] == "tiny-sd1"
    again = session.open("new", workspace, {"base_model": "tiny-sd2"})
    assert again.kept == {"base_model": ("tiny-sd1", "tiny-sd2")}


def test_a_new_session_has_no_base_model_until_one_is_chosen(workspace, monkeypatch):
    """The notebook's session cell opens a session without a base model; the base model
    cell's choice then becomes it without ticking Change. Never a model nobody chose."""
    cell2 = session.open("my_subject", workspace, dict(instance_token="sks", class_word="person",
                                                       resolution=512, base_model=None))
    assert cell2.created and cell2.session.settings["base_model"] is None
    with pytest.raises(DataError, match="has no base model yet. Choose one: run 'fastsd "
                       "session set my_subject --model MODEL'"):
        cell2.session.base_model
    monkeypatch.setenv(env.CALLER_ENV, "6. Train")
    with pytest.raises(DataError, match=r"Choose one: set Base_Model in cell 3 \(Base model\)"):
        session.load("my_subject", workspace).base_model
    cell3 = session.open("my_subject", workspace, {"base_model": "sdxl"})  # Change unticked
    assert cell3.changed == {"base_model": (None, "sdxl")} and not cell3.kept
    assert session.load("my_subject", workspace).base_model == "sdxl"


def test_current_is_the_session_opened_last_read_again(workspace, monkeypatch):
    monkeypatch.setattr(session, "_current", None)  # a fresh runtime
    monkeypatch.setenv(env.CALLER_ENV, "3. Base model")
    with pytest.raises(SessionNotFound, match=r"No session is open in this runtime .*: run "
                       r"cell 2 \(Drive and session\) first\.$"):
        session.current()
    session.open("dog", workspace, {"class_word": "dog"})
    session.load("dog", workspace).update(class_word="terrier")  # saved by another cell
    now = session.current()
    assert now.name == "dog" and now.settings["class_word"] == "terrier"
