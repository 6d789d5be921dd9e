import errno
import os
from pathlib import Path

import pytest

from fastsd import drive
from fastsd.errors import DriveError
from fastsd.workspace import Workspace


class DropsHalfway:
    """A destination file whose writes fail with Errno 107 (Drive's FUSE dropping) once
    ``limit`` bytes have been written, like Colab's Drive disconnecting mid-copy."""

    def __init__(self, f, limit):
        self._f, self._left = f, limit

    def write(self, data):
        if len(data) > self._left:
            self._f.write(data[: self._left])
            self._f.flush()
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
        self._left -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.fixture
def flaky_drive(monkeypatch):
    """Make the next ``failures`` destination files drop after ``limit`` bytes."""
    state = {"failures": 0, "limit": 0, "opened": 0}
    real_open = drive._open_dest

    def open_dest(path, mode="wb"):
        f = real_open(path, mode)
        state["opened"] += 1
        if state["failures"] > 0:
            state["failures"] -= 1
            return DropsHalfway(f, state["limit"])
        return f

    monkeypatch.setattr(drive, "_open_dest", open_dest)
    monkeypatch.setattr(drive, "DEFAULT_DELAY", 0.0)
    monkeypatch.setattr(drive, "_CHUNK", 1000)
    return state


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(drive._TMP_MARK)]


def test_atomic_write_replaces_whole(tmp_path):
    target = tmp_path / "sub" / "a.json"
    drive.atomic_write_json(target, {"x": 1})
    assert drive.read_json(target) == {"x": 1}
    drive.atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert leftovers(target.parent) == []


def test_atomic_write_failing_halfway_leaves_the_old_file(tmp_path, flaky_drive):
    target = tmp_path / "model.bin"
    old = os.urandom(5000)
    target.write_bytes(old)
    flaky_drive.update(failures=1, limit=2500)
    with pytest.raises(OSError):
        with drive.atomic_writer(target) as f:
            for i in range(0, 10000, 1000):
                f.write(b"n" * 1000)
    assert target.read_bytes() == old
    assert leftovers(tmp_path) == []


def test_copy_retries_after_drive_drops_and_ends_whole(tmp_path, flaky_drive):
    src = tmp_path / "local.bin"
    data = os.urandom(10_000)
    src.write_bytes(data)
    dst = tmp_path / "drive" / "local.bin"
    dst.parent.mkdir()
    dst.write_bytes(b"old version")
    flaky_drive.update(failures=2, limit=4000)
    drive.copy_file(src, dst)
    assert dst.read_bytes() == data
    assert flaky_drive["opened"] == 3
    assert leftovers(dst.parent) == []


def test_copy_gives_up_clearly_and_keeps_both_sides(tmp_path, flaky_drive):
    src = tmp_path / "ckpt.bin"
    data = os.urandom(10_000)
    src.write_bytes(data)
    dst = tmp_path / "drive" / "ckpt.bin"
    dst.parent.mkdir()
    dst.write_bytes(b"previous checkpoint")
    flaky_drive.update(failures=99, limit=5000)
    with pytest.raises(DriveError, match="failed 3 times.*re-run the Drive cell"):
        drive.move_file(src, dst, attempts=3, delay=0)
    assert src.read_bytes() == data, "the local copy must survive a failed move"
    assert dst.read_bytes() == b"previous checkpoint"
    assert leftovers(dst.parent) == []


def test_move_removes_the_source_only_after_a_whole_copy(tmp_path, flaky_drive):
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(3000))
    data = src.read_bytes()
    flaky_drive.update(failures=1, limit=1500)
    dst = drive.move_file(src, tmp_path / "out" / "a.bin")
    assert dst.read_bytes() == data and not src.exists()


def test_copy_tree_is_whole_or_absent(tmp_path, flaky_drive):
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    files = {"a.bin": os.urandom(3000), "sub/b.bin": os.urandom(3000)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    dst = tmp_path / "drive" / "ckpt"
    flaky_drive.update(failures=99, limit=1000)
    with pytest.raises(DriveError):
        drive.copy_tree(src, dst, attempts=2, delay=0)
    assert not dst.exists()
    assert leftovers(dst.parent) == []
    flaky_drive.update(failures=1, limit=1000)
    drive.copy_tree(src, dst)
    assert {p.relative_to(dst).as_posix(): p.read_bytes()
            for p in dst.rglob("*") if p.is_file()} == files


def test_copy_tree_replaces_an_existing_folder(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    (src / "new.txt").write_text("new")
    (dst / "stale.txt").write_text("stale")
    drive.copy_tree(src, dst)
    assert [p.name for p in dst.iterdir()] == ["new.txt"]
    assert leftovers(tmp_path) == []


def test_retry_does_not_retry_a_missing_file(tmp_path):
    with pytest.raises(DriveError, match="does not exist"):
        drive.copy_file(tmp_path / "nope", tmp_path / "x")


def test_clean_temporaries(tmp_path):
    tmp_path = tmp_path / "folder"
    tmp_path.mkdir()
    (tmp_path / f"{drive._TMP_MARK}abc-x.bin").write_bytes(b"half")
    (tmp_path / "keep.bin").write_bytes(b"whole")
    assert drive.clean_temporaries(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["keep.bin"]


def test_workspace_is_fastsd_home_off_colab(workspace):
    assert Workspace.current().root == workspace


def test_workspace_on_colab_is_my_drive_or_a_shared_drive(tmp_path, monkeypatch):
    mount = tmp_path / "gdrive"
    (mount / "MyDrive").mkdir(parents=True)
    (mount / "Shareddrives" / "Team").mkdir(parents=True)
    monkeypatch.setattr(drive, "COLAB_MOUNT", mount)
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-test")
    assert Workspace.current().root == mount / "MyDrive" / "Fast-Dreambooth"
    assert Workspace.current(shared_drive="Team").root == \
        mount / "Shareddrives" / "Team" / "Fast-Dreambooth"
    with pytest.raises(DriveError, match="Shared Drive"):
        Workspace.current(shared_drive="Nope")


def test_mount_outside_colab_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(drive, "COLAB_MOUNT", tmp_path / "none")
    with pytest.raises(DriveError, match="FASTSD_HOME"):
        drive.mount_drive()


def test_a_write_removes_what_dead_writers_left_in_its_folder(tmp_path):
    import subprocess
    import sys

    tmp_path = tmp_path / "folder"
    tmp_path.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)
    left = {  # a killed process's, another runtime's, an earlier fastsd's
        f"{drive._TMP_MARK}{drive._BOOT}.{dead_pid}.abcdef-a.bin": b"half",
        f"{drive._TMP_MARK}00000000.1.abcdef-b.bin": b"half",
        f"{drive._TMP_MARK}1a2b3c4d-c.bin": b"half"}
    live = f"{drive._TMP_MARK}{drive._BOOT}.{os.getpid()}.abcdef-d.bin"  # being written now
    for name in [*left, live]:
        (tmp_path / name).write_bytes(b"half")
    (tmp_path / f"{drive._TMP_MARK}00000000.1.abcdef-folder").mkdir()
    drive.atomic_write_bytes(tmp_path / "new.bin", b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live, "new.bin"])


def test_copy_tree_keeps_empty_folders(tmp_path):
    src = tmp_path / "src"
    (src / "empty" / "deeper").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    dst = drive.copy_tree(src, tmp_path / "dst")
    assert (dst / "empty" / "deeper").is_dir() and (dst / "a.txt").read_text() == "a"


def test_a_folder_replaced_by_atomic_folder_comes_back_when_the_swap_fails(tmp_path,
                                                                         monkeypatch):
    tmp_path = tmp_path / "folder"
    dst = tmp_path / "model"
    dst.mkdir(parents=True)
    (dst / "old.bin").write_bytes(b"previous")
    real = os.replace

    def replace(a, b):  # the old folder moves aside, then the new one never moves in
        if (Path(a) / "new.bin").exists():
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
        return real(a, b)

    monkeypatch.setattr(drive, "DEFAULT_DELAY", 0.0)
    monkeypatch.setattr(drive.os, "replace", replace)
    with pytest.raises(DriveError):
        with drive.atomic_folder(dst) as tmp:
            (tmp / "new.bin").write_bytes(b"new")
    monkeypatch.setattr(drive.os, "replace", real)
    assert [p.name for p in dst.iterdir()] == ["old.bin"]
    assert leftovers(tmp_path) == []


def test_free_space_has_one_reading_and_a_shortfall_is_one_message(tmp_path):
    import shutil

    later = tmp_path / "not" / "made" / "yet"
    assert abs(drive.free_bytes(later) - shutil.disk_usage(tmp_path).free) < 1 << 30
    with pytest.raises(drive.DriveFull, match=r"Copying x needs 1000000000\.00 GB but .* free"):
        drive.require_space(later, 10**18, "Copying x")
    drive.require_space(later, 1, "Copying x")  # fits: nothing raised


def test_paths_under_colab_mount_are_on_drive(tmp_path, monkeypatch):
    monkeypatch.setattr(drive, "COLAB_MOUNT", tmp_path / "gdrive")
    assert drive.on_drive(tmp_path / "gdrive" / "MyDrive" / "x")
    assert not drive.on_drive(tmp_path / "gdrive-other" / "x")
    assert not drive.on_drive(tmp_path)
