"""A model on Drive copied to local disk: one sequential copy, reused while the Drive
copy keeps its sizes and modification times, copied again when it changes."""

from __future__ import annotations

import os
import shutil

import pytest

from fastsd import models
from fastsd.errors import DriveError
from fastsd import drive


def test_a_model_not_on_drive_is_loaded_where_it_is(tiny_sd1):
    assert not drive.on_drive(tiny_sd1)
    assert models.local_copy(tiny_sd1) == tiny_sd1


def test_the_local_copy_is_made_once_and_reuses_while_the_drive_copy_is_unchanged(tmp_path, tiny_sd1):
    drive_copy = shutil.copytree(tiny_sd1, tmp_path / "drive" / "tiny")
    root = tmp_path / "local"
    local = models.local_copy(drive_copy, root, force=True)
    assert local != drive_copy and local.is_relative_to(root)
    files = sorted(p.relative_to(drive_copy) for p in drive_copy.rglob("*") if p.is_file())
    assert sorted(p.relative_to(local) for p in local.rglob("*") if p.is_file()) == files
    for f in files:
        assert (local / f).read_bytes() == (drive_copy / f).read_bytes()
    unet = local / "unet" / "diffusion_pytorch_model.safetensors"
    inode = unet.stat().st_ino
    assert models.local_copy(drive_copy, root, force=True) == local
    assert unet.stat().st_ino == inode  # reused, not copied again

    # The Drive copy changes (same size, new mtime): copied again.
    src = drive_copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(src.read_bytes())
    data[-1] ^= 1
    src.write_bytes(bytes(data))
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = models.local_copy(drive_copy, root, force=True)
    assert (again / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == bytes(data)

    # A damaged local copy (wrong size) is not reused either.
    (again / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"short")
    third = models.local_copy(drive_copy, root, force=True)
    assert (third / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == bytes(data)


def test_a_single_file_is_copied_too(tmp_path):
    f = tmp_path / "drive" / "model.safetensors"
    f.parent.mkdir()
    f.write_bytes(os.urandom(3 << 20))
    local = models.local_copy(f, tmp_path / "local", force=True)
    assert local.name == "model.safetensors" and local.read_bytes() == f.read_bytes()


def test_a_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(DriveError, match="does not exist"):
        models.local_copy(tmp_path / "nope", tmp_path / "local", force=True)


def test_fuse_mounts_count_as_drive(tmp_path):
    # /proc/mounts decides: a path under a fuse mount is on "Drive", the temp dir is not.
    fuse_points = [ln.split()[1] for ln in open("/proc/mounts") if ln.split()[2].startswith("fuse")]
    assert not drive.on_drive(tmp_path)
    for point in fuse_points[:1]:
        assert drive.on_drive(point)
