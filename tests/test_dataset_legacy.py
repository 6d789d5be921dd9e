"""Sessions made by fast-stable-diffusion become fastsd sessions: photos, captions, and the
trained model as the base model to continue from."""

import pytest

from fastsd import session
from fastsd.cli import main
from fastsd.dataset import legacy, samples
from fastsd.errors import DataError


def old_session(root, name, photos=("chelsea", "coffee", "rocket")):
    """A folder laid out as fast-stable-diffusion leaves one on Drive."""
    folder = root / "Sessions" / name
    pics = samples.write(folder / "instance_images", list(photos))
    for p in pics[:2]:  # fast-stable-diffusion saved JPEGs; one PNG stays
        from PIL import Image

        Image.open(p).convert("RGB").save(p.with_suffix(".jpg"), quality=95)
        p.unlink()
    (folder / "captions").mkdir()
    (folder / "captions" / "chelsea.txt").write_text("a cat on a rug, looking up\n")
    (folder / "captions" / "rocket.txt").write_text("a rocket on the launch pad")
    (folder / "captions" / "gone.txt").write_text("a caption whose photo was deleted")
    return folder


def test_photos_and_captions_are_imported_without_a_model(workspace):
    folder = old_session(workspace, "kitty")
    done = legacy.import_session("kitty", root=workspace, class_word="cat")
    s = done.session
    assert s.name == "kitty" and s.settings["class_word"] == "cat" and done.model is None
    originals = sorted(p.name for p in (s.instance_images / "originals").iterdir()
                       if p.suffix == ".png")
    assert originals == ["chelsea.png", "coffee.png", "rocket.png"]
    assert (s.captions / "chelsea.txt").read_text() == "a cat on a rug, looking up"
    assert (s.captions / "rocket.txt").read_text() == "a rocket on the launch pad"
    assert not (s.captions / "coffee.txt").exists() and not (s.captions / "gone.txt").exists()
    assert s.settings["base_model"] == session.DEFAULT_SETTINGS["base_model"]
    assert "no trained model found" in str(done)
    assert sorted(p.name for p in (folder / "instance_images").iterdir()) == [
        "chelsea.jpg", "coffee.jpg", "rocket.png"], "the old folder is only read"
    assert legacy.legacy_sessions(workspace) == ["kitty"]


def test_the_trained_ckpt_becomes_the_base_model(workspace, tiny_sd1):
    import torch
    from diffusers import UNet2DConditionModel

    from conftest import cache_family_configs
    from fastsd import convert
    from fastsd.models import resolve_model

    folder = old_session(workspace, "rex", ("chelsea",))
    convert.to_single_file(tiny_sd1, folder / "rex_step_500.ckpt", ckpt=True)
    ckpt = convert.to_single_file(tiny_sd1, folder / "rex.ckpt", fp16=False, ckpt=True)
    cache_family_configs(workspace, "sd1", tiny_sd1)
    done = legacy.import_session(folder, "rex2", workspace)
    assert done.model == ckpt and done.session.settings["base_model"] == str(ckpt)
    model = resolve_model(done.session.settings["base_model"], workspace)
    a = UNet2DConditionModel.from_pretrained(model, subfolder="unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_which_model_file_is_the_trained_one(tmp_path):
    folder = tmp_path / "dog"
    folder.mkdir()
    assert legacy.find_model(folder) is None
    for n in (500, 1500, 1000):
        (folder / f"dog_step_{n}.ckpt").write_bytes(b"x")
    assert legacy.find_model(folder).name == "dog_step_1500.ckpt"
    (folder / "diffusers").mkdir()
    (folder / "diffusers" / "model_index.json").write_text("{}")
    assert legacy.find_model(folder) == folder / "diffusers"
    (folder / "dog.safetensors").write_bytes(b"x")
    assert legacy.find_model(folder).name == "dog.safetensors"


def test_not_a_legacy_session_says_what_it_needs(workspace, tmp_path):
    old_session(workspace, "kitty")
    with pytest.raises(DataError, match=r"no instance_images/ folder .*sessions found .*kitty"):
        legacy.import_session(tmp_path, root=workspace)
    assert session.list_sessions(workspace) == []


def test_cli_import_legacy(workspace, capsys):
    old_session(workspace, "kitty")
    assert main(["images", "import-legacy", "kitty", "--name", "cat2",
                 "--home", str(workspace)]) == 0
    out = capsys.readouterr().out
    assert "Imported into session cat2" in out and "chelsea.jpg" in out
    assert session.list_sessions(workspace) == ["cat2"]


def test_a_shared_session_zip_is_imported_with_its_trained_model(workspace, tmp_path):
    """The .zip of a shared session (here fastsd's own layout: originals, their crops at
    the top, captions, models/): its photos (the originals, once), captions, and its
    trained model, kept in the workspace as the new session's base model."""
    import shutil

    from fastsd.dataset import captions, crop, images

    friend = tmp_path / "friend"
    theirs = session.create("buddy", friend, class_word="dog", resolution=64)
    src = tmp_path / "photos"
    samples.write(src, ["chelsea", "coffee"])
    images.import_images(theirs, src)
    crop.crop_session(theirs)
    captions.write(theirs, "coffee", "sks dog beside a cup")
    (theirs.models / "buddy.safetensors").write_bytes(b"trained weights")
    z = shutil.make_archive(str(tmp_path / "buddy"), "zip", friend / "sessions", "buddy")

    done = legacy.import_session(z, "mine", workspace, class_word="dog")
    s = done.session
    assert sorted(p.stem for p in images.originals(s)) == ["chelsea", "coffee"]
    assert done.report.summary().startswith("2 imported, 0 duplicate")
    assert captions.read(s, "coffee") == "sks dog beside a cup"
    kept = workspace / "models" / "downloads" / "sessions"
    assert done.model.is_relative_to(kept) and done.model.read_bytes() == b"trained weights"
    assert s.settings["base_model"] == str(done.model)


@pytest.mark.timeout(60)
def test_a_shared_session_link_offline_fails_fast(workspace):
    from fastsd.errors import OfflineError

    with pytest.raises(OfflineError, match="give their local path"):
        legacy.import_session("https://drive.google.com/drive/folders/1ZyXwVuTsRqPo",
                              "shared", workspace)
    with pytest.raises(DataError, match="not a Google Drive link"):
        legacy.import_session("https://example.com/buddy.zip", "shared", workspace)
    assert session.list_sessions(workspace) == []
