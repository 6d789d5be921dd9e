"""Drive drops, with Drive as the real FUSE stand-in (tests/colab): the passthrough process
is killed at chosen moments, so every path under the mount raises Errno 107 as on Colab.
Each operation completes after fastsd remounts, or fails with a clear message; a re-run
leaves a whole, consistent session and no temporaries."""

from __future__ import annotations

import errno
import os
import sys
import threading
from pathlib import Path

import pytest

from fastsd import drive, models
from fastsd.errors import DriveError
from fastsd.workspace import Workspace

from conftest import COLAB, colab_module as _load  # noqa: E402


standin = _load('standin')


@pytest.fixture
def fuse_drive(tmp_path, monkeypatch):
    """This process is a Colab runtime whose Drive is mounted through the FUSE stand-in."""
    mount = tmp_path / "gdrive"
    monkeypatch.setenv("COLAB_STANDIN_BACKING", str(tmp_path / "backing"))
    monkeypatch.setenv("COLAB_RELEASE_TAG", "standin")
    monkeypatch.setattr(drive, "COLAB_MOUNT", mount)
    monkeypatch.setattr(drive, "DEFAULT_DELAY", 0.05)
    monkeypatch.syspath_prepend(str(COLAB))
    from google.colab import drive as gdrive

    gdrive.mounts.clear()
    drive.mount_drive()
    yield mount
    standin.set_limits()
    standin.unmount(mount)
    for name in [m for m in sys.modules if m.startswith("google.colab")]:
        del sys.modules[name]  # later tests run outside "Colab" again
    google = sys.modules.get("google")
    if google is not None and any(str(COLAB) in p for p in getattr(google, "__path__", [])):
        del sys.modules["google"]
    import importlib

    importlib.invalidate_caches()


def temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob(".fastsd-tmp-*")]


def remounts() -> list:
    from google.colab import drive as gdrive

    return [force for _, force in gdrive.mounts[1:]]


def kill_after_writes(n: int):
    """Kill the passthrough once ``n`` more destination files have been opened for
    writing, in the middle of writing the n-th (after its first chunk)."""
    real = drive._open_dest
    count = [0]

    class Cut:
        def __init__(self, f):
            self.f, self.done = f, False

        def write(self, data):
            out = self.f.write(data[: len(data) // 2])
            self.f.flush()
            if not self.done:
                self.done = True
                standin.kill()
            return out + self.f.write(data[len(data) // 2:])

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            try:
                self.f.close()
            except OSError:
                pass

    def open_dest(path, mode="wb"):
        f = real(path, mode)
        count[0] += 1
        return Cut(f) if count[0] == n else f

    return open_dest


def test_a_dead_mount_counts_as_not_mounted_and_is_remounted(fuse_drive):
    ws = Workspace.current().root
    (ws / "a.txt").write_text("kept")
    standin.kill()
    with pytest.raises(OSError) as e:
        (fuse_drive / "MyDrive").is_dir()
    assert e.value.errno == errno.ENOTCONN  # the real Errno 107, as on Colab
    assert drive.is_mounted() is False
    assert Workspace.current().root == ws  # remounts instead of raising
    assert remounts() == [True], "a dropped mount is remounted with force_remount=True"
    assert (ws / "a.txt").read_text() == "kept"


def test_session_create_during_a_drop_completes(fuse_drive, monkeypatch):
    from fastsd import session

    root = Workspace.current().root
    monkeypatch.setattr(drive, "_open_dest", kill_after_writes(1))
    s = session.create("dropped", root, base_model="tiny-sd1")
    assert session.load("dropped", root).settings["base_model"] == "tiny-sd1"
    assert s.instance_images.is_dir() and remounts() == [True]
    assert temporaries(root) == []


def test_single_file_write_during_a_drop_completes(fuse_drive, monkeypatch):
    root = Workspace.current().root
    data = os.urandom(3 << 20)
    monkeypatch.setattr(drive, "_open_dest", kill_after_writes(1))
    drive.atomic_write_bytes(root / "one.bin", data)
    assert (root / "one.bin").read_bytes() == data
    assert temporaries(root) == [] and remounts() == [True]


def test_checkpoint_copy_during_a_drop_completes_and_keeps_the_local_copy(
        fuse_drive, monkeypatch, tmp_path):
    src = tmp_path / "local-ckpt"
    src.mkdir()
    files = {f"f{i}.bin": os.urandom(1 << 20) for i in range(3)}
    for k, v in files.items():
        (src / k).write_bytes(v)
    dest = Workspace.current().root / "sessions" / "x" / "checkpoints" / "step-0000002"
    monkeypatch.setattr(drive, "_open_dest", kill_after_writes(2))
    drive.copy_tree(src, dest)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == files
    assert {p.name: p.read_bytes() for p in src.iterdir()} == files
    assert temporaries(Workspace.current().root) == []


def test_a_full_drive_says_what_to_delete(fuse_drive):
    from fastsd import session

    root = Workspace.current().root
    session.create("old", root)
    old = root / "sessions" / "old" / "checkpoints" / "step-0000500"
    old.mkdir(parents=True)
    (old / "unet.safetensors").write_bytes(os.urandom(200_000))
    standin.set_limits(quota=300_000)
    with pytest.raises(drive.DriveFull) as e:
        drive.atomic_write_bytes(root / "big.bin", os.urandom(500_000))
    msg = str(e.value)
    assert "no space left" in msg and "trash" in msg
    free = drive.free_bytes(root)  # the one reading of free space, the quota's on Drive
    assert free < 300_000 and f"{drive.gb(free)} free at {root}" in msg
    assert "`fastsd space`" in msg  # where what takes room is listed, largest first:
    from fastsd import space

    assert space.usage(root)[0].path == old
    assert temporaries(root) == [] and not (root / "big.bin").exists()


def test_deleting_on_drive_mentions_the_trash(fuse_drive, caplog):
    from fastsd import session

    root = Workspace.current().root
    session.create("gone", root, base_model="tiny-sd1")
    monkey = drive._trash_noted
    drive._trash_noted = False
    try:
        with caplog.at_level("INFO", logger="fastsd"):
            session.delete("gone", root, confirm=True)
    finally:
        drive._trash_noted = monkey
    assert "trash" in caplog.text and not (root / "sessions" / "gone").exists()


def _photos(tmp_path, n=4):
    from fastsd.dataset import samples

    return samples.write(tmp_path / "photos", ["chelsea", "astronaut", "coffee", "camera"][:n])


def test_image_import_killed_mid_original_then_rerun_gives_each_photo_once(
        fuse_drive, monkeypatch, tmp_path):
    from fastsd import session
    from fastsd.dataset import crop, images

    photos = _photos(tmp_path)
    root = Workspace.current().root
    s = session.create("imp", root, base_model="tiny-sd1", resolution=64)
    real = drive._open_dest
    monkeypatch.setattr(drive, "_open_dest", kill_after_writes(3))  # while an original is written
    report = images.import_images(s, str(photos[0].parent))
    assert sorted(r.outcome for r in report.rows) == ["imported"] * 4
    assert remounts() == [True]
    monkeypatch.setattr(drive, "_open_dest", real)
    again = images.import_images(s, str(photos[0].parent))
    assert sorted(r.outcome for r in again.rows) == ["duplicate"] * 4
    assert sorted(p.stem for p in images.originals(s)) == sorted(p.stem for p in photos)
    crop.crop_session(s)
    assert sorted(p.stem for p in crop.training_images(s)) == sorted(p.stem for p in photos)
    assert temporaries(root) == []


def test_a_temporary_left_by_a_drop_is_never_taken_for_an_image(fuse_drive, tmp_path):
    from fastsd import session
    from fastsd.dataset import crop, images

    photos = _photos(tmp_path, 2)
    s = session.create("tmpimg", Workspace.current().root, base_model="tiny-sd1", resolution=64)
    folder = images.originals_dir(s)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".fastsd-tmp-1234abcd-photo_07.png").write_bytes(b"\x89PNG half")
    assert images.originals(s) == []
    images.import_images(s, str(photos[0].parent))
    crop.crop_session(s)
    assert sorted(p.stem for p in crop.training_images(s)) == sorted(p.stem for p in photos)
    assert temporaries(Workspace.current().root) == [], "the import's recovery removes it"


def test_a_drop_between_an_original_and_the_index_does_not_duplicate_it(
        fuse_drive, monkeypatch, tmp_path):
    from fastsd import session
    from fastsd.dataset import images

    photos = _photos(tmp_path, 3)
    s = session.create("idx", Workspace.current().root, base_model="tiny-sd1", resolution=64)
    real = drive.atomic_write_json

    def runtime_dies_before_the_index(path, obj):
        if Path(path).name == images.INDEX:
            standin.kill()
            raise KeyboardInterrupt("the runtime disconnected")
        return real(path, obj)

    monkeypatch.setattr(drive, "atomic_write_json", runtime_dies_before_the_index)
    with pytest.raises(KeyboardInterrupt):
        images.import_images(s, str(photos[0].parent))
    monkeypatch.setattr(drive, "atomic_write_json", real)
    drive.mount_drive()  # the next runtime's Drive cell
    images.import_images(s, str(photos[0].parent))
    assert sorted(p.stem for p in images.originals(s)) == sorted(p.stem for p in photos), \
        "the photo written before the drop is found again, not added as photo_2"


def test_errors_after_remount_fails_are_messages(fuse_drive, monkeypatch):
    """When Drive cannot come back, the retries end in a DriveError that says what to do."""
    from google.colab import drive as gdrive

    def broken(*a, **k):
        raise ValueError("mount failed")

    monkeypatch.setattr(gdrive, "mount", broken)
    root = Workspace.current().root
    standin.kill()
    with pytest.raises(DriveError, match="failed 2 times.*re-run the Drive cell"):
        drive.retry(lambda: (root / "x").write_text("x"), "Writing x", attempts=2, delay=0)


TRAIN = dict(unet_steps=4, text_steps=2, checkpoint_every=2, keep_checkpoints=2, unet_lr=1e-4,
             text_lr=1e-4, batch_size=2, flip=True, crop="random", prior_preservation=False)


@pytest.mark.timeout(900)
def test_training_with_a_drop_mid_checkpoint_ends_bit_identical(
        fuse_drive, monkeypatch, tmp_path, tiny_sd1):
    from test_train_resume import final_tensors, make_subject_session

    from fastsd import session
    from fastsd.train import TrainSettings, checkpoint, train

    def run(root: Path, name: str):
        (root / "models").mkdir(parents=True, exist_ok=True)
        if not (root / "models" / "tiny-sd1").exists():
            (root / "models" / "tiny-sd1").symlink_to(tiny_sd1)
        make_subject_session(name, root)
        train(session.load(name, root), TrainSettings(**TRAIN))
        return session.load(name, root)

    ref = final_tensors(run(tmp_path / "local", "ref"))
    root = Workspace.current().root
    real = drive._open_dest
    kill = kill_after_writes(2)

    def open_dest(path, mode="wb"):  # the 2nd file of the first checkpoint copy to Drive
        if ".fastsd-tmp-" in Path(path).parent.name and "step-0000002" in Path(path).parent.name:
            return kill(path, mode)
        return real(path, mode)

    monkeypatch.setattr(drive, "_open_dest", open_dest)
    s = run(root, "drop")
    assert remounts() == [True], "the drop happened and Drive was remounted"
    got = final_tensors(s)
    assert got.keys() == ref.keys()
    assert not [k for k in got if not got[k].equal(ref[k])], "not bit-identical after the drop"
    assert checkpoint.latest(s.checkpoints) is not None
    assert temporaries(root) == []


def test_a_streamed_write_to_drive_survives_a_drop(fuse_drive, monkeypatch):
    """The single-file export, sample images and originals stream through atomic_writer:
    staged on local disk, then copied to Drive with remount and retry."""
    target = Workspace.current().root / "models" / "subject.safetensors"
    chunks = [os.urandom(1 << 20) for _ in range(4)]
    monkeypatch.setattr(drive, "_open_dest", kill_after_writes(2))  # 1: local stage, 2: Drive
    with drive.atomic_writer(target) as f:
        for c in chunks:
            f.write(c)
    assert target.read_bytes() == b"".join(chunks)
    assert remounts() == [True] and temporaries(Workspace.current().root) == []


def test_models_are_read_from_a_local_copy_never_mapped_from_drive(fuse_drive, tmp_path):
    import mmap

    model = Workspace.current().root / "models" / "m"
    (model / "unet").mkdir(parents=True)
    data = os.urandom(1 << 20)
    (model / "unet" / "w.safetensors").write_bytes(data)
    local = models.local_copy(model, tmp_path / "stage")
    assert not local.is_relative_to(fuse_drive)
    assert models.local_copy(model, tmp_path / "stage") == local, "reused while files are unchanged"
    standin.kill()  # Drive drops while the model is in use
    with open(local / "unet" / "w.safetensors", "rb") as f, \
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        assert mm[:] == data  # from Drive this read would be a SIGBUS
    assert models.local_copy(tmp_path) == tmp_path, "off Drive, the path itself"


@pytest.mark.timeout(900)
def test_training_with_drops_mid_sample_and_mid_model_export_completes(
        fuse_drive, monkeypatch, tiny_sd1):
    """Drive drops while a sample image is copied to Drive and while the trained model is:
    both are staged on the local disk, so training remounts, goes on and ends with every
    sample and a whole model that diffusers loads."""
    import tempfile

    from PIL import Image

    from test_train_resume import make_subject_session

    from fastsd import session
    from fastsd.train import TrainSettings, train

    root = Workspace.current().root
    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "models" / "tiny-sd1").symlink_to(tiny_sd1)
    make_subject_session("drops", root)
    real, cut_sample, cut_export = drive._open_dest, kill_after_writes(1), kill_after_writes(1)
    seen = []

    def open_dest(path, mode="wb"):
        p = Path(path)
        if p.parent.name == "samples" and "sample" not in seen:
            seen.append("sample")  # the first sample image on its way to Drive
            return cut_sample(path, mode)
        exporting = any(x.startswith(".fastsd-tmp-") and x.endswith("-drops") for x in p.parts)
        if exporting and p.parent.name == "unet" and "export" not in seen:
            seen.append("export")  # the model's UNet weights on their way to Drive
            return cut_export(path, mode)
        return real(path, mode)

    monkeypatch.setattr(drive, "_open_dest", open_dest)
    train(session.load("drops", root), TrainSettings(**{**TRAIN, "sample_every": 3,
                                                         "sample_steps": 2}))
    assert seen == ["sample", "export"] and remounts() == [True, True]
    s = session.load("drops", root)
    samples = sorted((s.outputs / "samples").glob("*.png"))
    assert [p.name for p in samples] == ["step-0000003-0.png", "step-0000006-0.png"]
    for p in samples:
        with Image.open(p) as im:
            im.verify()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(s.models / "drops")
    assert pipe.unet.config.sample_size == StableDiffusionPipeline.from_pretrained(
        tiny_sd1).unet.config.sample_size
    assert temporaries(root) == []
    assert not list(Path(tempfile.gettempdir()).glob(".fastsd-tmp-*-drops")), \
        "the local copy is removed once the Drive copy is whole"


def test_disconnect_after_training_only_once_the_model_is_whole_on_drive(fuse_drive,
                                                                        tiny_sd1, caplog,
                                                                        monkeypatch):
    """Disconnect_After_Training on Colab: a model whose single file is cut short keeps the
    runtime; a whole one is flushed to Drive first, then the runtime is given back. Outside
    Colab it is one line and nothing else."""
    import shutil

    from google import colab

    from fastsd.convert import to_single_file
    from fastsd.train.runner import TrainingFailed, disconnect_when_safe

    models_dir = fuse_drive / "MyDrive" / "Fast-Dreambooth" / "sessions" / "dog" / "models"
    model = shutil.copytree(tiny_sd1, models_dir / "dog")
    single = to_single_file(model, models_dir / "dog.safetensors")
    whole = single.read_bytes()
    single.write_bytes(whole[:-100])  # as a copy cut short by a drop
    colab.events.clear()
    with pytest.raises(TrainingFailed, match=r"Not disconnecting: .*truncated.*stays connected"):
        disconnect_when_safe(model, single)
    assert colab.events == []
    single.write_bytes(whole)
    assert disconnect_when_safe(model, single) is True
    assert colab.events == ["flush_and_unmount", "unassign"]
    backing = Path(os.environ["COLAB_STANDIN_BACKING"]) / "MyDrive" / "Fast-Dreambooth"
    assert (backing / "sessions" / "dog" / "models" / "dog.safetensors").read_bytes() == whole

    monkeypatch.delenv("COLAB_RELEASE_TAG")
    for name in [m for m in sys.modules if m.startswith("google.colab")]:
        sys.modules.pop(name)  # (the fixture's teardown expects them gone or there)
    caplog.clear()
    caplog.set_level("INFO", logger="fastsd")
    assert disconnect_when_safe(model, single) is False
    assert [r.getMessage() for r in caplog.records] == [
        f"Not on Colab: nothing to disconnect (the model is in {model})."]
