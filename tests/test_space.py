"""Free Drive space: sizes of what fastsd keeps, deletion only of what is picked, and only
once confirmed."""

import os

import pytest

from fastsd import session, space
from fastsd.errors import ConfirmationNeeded, DataError


def blob(path, n):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * n)
    return path


@pytest.fixture
def filled(workspace):
    s = session.create("dog", workspace)
    blob(s.checkpoints / "step-000100" / "unet.safetensors", 5000)
    blob(s.checkpoints / "step-000200" / "unet.safetensors", 6000)
    blob(s.models / "dog" / "unet" / "diffusion_pytorch_model.safetensors", 9000)
    blob(s.models / "dog-fp16.safetensors", 4000)
    blob(s.outputs / "samples" / "a.png", 300)
    blob(s.instance_images / "originals" / "a.png", 700)  # the photos are never offered
    hub = workspace / "models" / "hub" / "models--owner--repo"
    target = blob(hub / "blobs" / "abc", 8000)
    (hub / "snapshots" / "1").mkdir(parents=True)
    os.symlink(target, hub / "snapshots" / "1" / "unet.safetensors")  # counted once
    blob(workspace / "models" / "hub" / ".locks" / "x", 10)
    blob(workspace / "models" / "downloads" / "style.safetensors", 7000)
    blob(workspace / "models" / "converted" / "style-0a1b" / "model_index.json", 100)
    blob(workspace / "models" / "tiny-sd1" / "model_index.json", 50)
    blob(workspace / "wheels" / "cp312-linux" / "a.whl", 2000)
    blob(workspace / "sessions" / "dog" / "checkpoints" / ".fastsd-tmp-1-x", 1)
    return s


def test_usage_lists_each_piece_with_its_size_largest_first(filled, workspace):
    items = space.usage(workspace)
    got = [(i.kind, i.session, i.size, i.path.relative_to(workspace).as_posix()) for i in items]
    assert got == [
        ("trained model", "dog", 9000, "sessions/dog/models/dog"),
        ("Hugging Face cache", None, 8000, "models/hub/models--owner--repo"),
        ("download", None, 7000, "models/downloads/style.safetensors"),
        ("checkpoint", "dog", 6000, "sessions/dog/checkpoints/step-000200"),
        ("checkpoint", "dog", 5000, "sessions/dog/checkpoints/step-000100"),
        ("single file", "dog", 4000, "sessions/dog/models/dog-fp16.safetensors"),
        ("wheelhouse", None, 2000, "wheels/cp312-linux"),
        ("outputs (samples, images)", "dog", 300, "sessions/dog/outputs"),
        ("converted model", None, 100, "models/converted/style-0a1b"),
        ("model", None, 50, "models/tiny-sd1"),
    ]
    text = space.table(items, workspace)
    assert text.splitlines()[0].split()[:4] == ["1.", "9.0", "KB", "trained"]
    assert "41.5 KB  in all" in text


def test_nothing_is_deleted_without_confirmation(filled, workspace):
    items = space.usage(workspace)
    with pytest.raises(ConfirmationNeeded, match=r"(?s)2 item\(s\), 11.0 KB.*step-000200.*"
                       r"step-000100.*To delete them: run 'fastsd space --delete 4,5 --yes'.*trash"):
        space.free(["4", 5], workspace)
    assert all(i.path.exists() for i in items)


def test_free_deletes_exactly_the_picked_items_and_mentions_drives_trash(filled, workspace):
    items = space.usage(workspace)
    out = space.free(space.parse_picks("2, 4-5"), workspace, confirm=True)
    assert "Deleted 3 item(s), 19.0 KB" in out and "Google Drive keeps deleted files" in out
    gone = {items[1].path, items[3].path, items[4].path}
    assert all(not p.exists() for p in gone)
    assert all(i.path.exists() for i in items if i.path not in gone)
    assert (filled.instance_images / "originals" / "a.png").is_file()
    assert session.load("dog", workspace).checkpoints.is_dir()


def test_picks_outside_the_list_are_refused(filled, workspace, tmp_path):
    with pytest.raises(DataError, match="no item 99"):
        space.free(["99"], workspace, confirm=True)
    outside = blob(tmp_path / "elsewhere.bin", 5)
    with pytest.raises(DataError, match="not in the list"):
        space.free([outside], workspace, confirm=True)
    with pytest.raises(DataError, match="not in the list"):
        space.free([filled.instance_images], workspace, confirm=True)
    assert outside.is_file()
    # a path that is in the list works too
    space.free([filled.models / "dog-fp16.safetensors"], workspace, confirm=True)
    assert not (filled.models / "dog-fp16.safetensors").exists()


def test_an_empty_workspace_says_so(workspace):
    assert space.table(space.usage(workspace)).startswith("Nothing to free")


def test_cli_lists_then_deletes_only_with_yes(filled, workspace, capsys):
    from fastsd.cli import main

    target = workspace / "models" / "downloads" / "style.safetensors"
    assert main(["space", "--home", str(workspace)]) == 0
    assert "download" in capsys.readouterr().out
    assert main(["space", "--delete", "3", "--home", str(workspace)]) == 2
    assert "To delete them: run 'fastsd space --delete 3 --yes'" in capsys.readouterr().err
    assert target.is_file()
    assert main(["space", "--delete", "3", "--yes", "--home", str(workspace)]) == 0
    assert "Deleted 1 item(s), 7.0 KB" in capsys.readouterr().out and not target.exists()
