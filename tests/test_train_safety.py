"""What a resume may and may not do, random crop on non-square originals, bf16 on CPU,
background checkpoints, the Drive space check and the leftovers of killed runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import pytest

from test_train import FAST, link_tiny, same
from test_train_resume import final_tensors, make_subject_session

from fastsd.errors import DataError, ModelError
from fastsd.train import checkpoint, train

ONE = dict(FAST, unet_schedule="constant", text_schedule="constant", checkpoint_every=2)


# --------------------------------------------------------------------------- safe resume


def test_extending_the_unet_stage_equals_a_longer_run(workspace, tiny_sd1):
    """--resume --unet-steps 4 after a 2-step run ends bit-identical to a 4-step run (a
    constant schedule: the optimizer state, data order and draws carry on)."""
    link_tiny(workspace, "sd1", tiny_sd1)
    ref = make_subject_session("long", workspace, n=2)
    r_ref = train(ref, dict(ONE, unet_steps=4, text_steps=0))
    s = make_subject_session("short", workspace, n=2)
    train(s, dict(ONE, unet_steps=2, text_steps=0))
    r = train(s, {"unet_steps": 4}, resume=True)
    assert r.global_step == 4 and r.resumed_from == 2 and r.losses == r_ref.losses
    assert same(final_tensors(s), final_tensors(ref))
    assert s.summary()["checkpoints"] == 1  # keep 1 by default, counted as checkpoints


def test_a_stage_cannot_be_extended_after_the_next_one_trained_more_steps_can(workspace,
                                                                              tiny_sd1):
    """A finished stage is extended only while no later stage trained after it. "Train 2
    more UNet steps after testing" is then a new segment on models/NAME: it counts global
    steps on, replaces the earlier checkpoints once set up, leaves the text encoder as the
    trained model had it, and is in the session's history."""
    from fastsd import session
    from fastsd.train import segments

    link_tiny(workspace, "sd1", tiny_sd1)
    s = make_subject_session("both", workspace, n=2)
    with pytest.raises(DataError, match=r"no trained model in .*models/both to train further"):
        train(s, dict(ONE, text_steps=0), more_unet_steps=2)
    train(s, dict(ONE, unet_steps=1, text_steps=1))
    with pytest.raises(DataError, match=r"text encoder stage has trained after it.*Train 2 "
                       r"more UNet steps on the trained model instead, as a new segment: run "
                       r"'fastsd train \w+ --more-unet-steps 2'"):
        train(s, {"unet_steps": 3}, resume=True)
    with pytest.raises(DataError, match=r"cannot change when resuming: --unet-lr"):
        train(s, {"unet_lr": 0.5}, resume=True)
    r = train(s, {"text_steps": 2}, resume=True)  # the last stage: extended
    assert r.global_step == 3

    before = final_tensors(s)
    r = train(s, {"unet_lr": 5e-5}, more_unet_steps=2)
    assert r.global_step == 5 and len(r.losses) == 2
    after = final_tensors(s)
    assert after.keys() == before.keys()
    assert {k.split("/")[0] for k in after if not after[k].equal(before[k])} == {"unet"}
    assert [c.step for c in checkpoint.listing(s.checkpoints)] == [5]
    history = segments.history(session.load("both"))
    assert [(h["base"], h["from_step"], h["to_step"], h["stages"]) for h in history] == [
        ("tiny-sd1", 0, 3, {"unet": {"steps": 1, "lr": ONE["unet_lr"]},
                            "text": {"steps": 2, "lr": ONE["text_lr"]}}),
        (segments.TRAINED, 3, 5, {"unet": {"steps": 2, "lr": 5e-5}})]
    assert all(h["started"] and h["finished"] for h in history)


def test_another_base_model_is_refused_and_changed_data_needs_consent(workspace, tiny_sd1):
    import torch
    from safetensors.torch import load_file, save_file

    link_tiny(workspace, "sd1", tiny_sd1)
    other = workspace / "models" / "other-sd1"
    shutil.copytree(tiny_sd1, other)
    f = other / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    k = sorted(sd)[0]
    sd[k] = sd[k] + torch.ones_like(sd[k])
    save_file(sd, f)
    s = make_subject_session("guard", workspace, n=2)
    train(s, dict(ONE, unet_steps=3, text_steps=0, checkpoint_every=1))
    s.update(base_model=str(other))
    with pytest.raises(ModelError, match=r"trained from the base model 'tiny-sd1'.*--restart"):
        train(s, resume=True)
    s.update(base_model="tiny-sd1")
    (s.captions / "toy1.txt").write_text("sks toy on a beach")
    with pytest.raises(DataError, match=r"changed: toy1.png.*--accept-changed-data"):
        train(s, resume=True)
    r = train(s, resume=True, accept_changed_data=True)
    assert r.global_step == 3


def test_resume_without_anything_stored_is_refused(workspace, tiny_sd1):
    from fastsd import session

    link_tiny(workspace, "sd1", tiny_sd1)
    s = make_subject_session("early", workspace, n=2)
    s.settings.pop("train", None)
    s.save()
    with pytest.raises(DataError, match="no checkpoint and no stored training settings"):
        train(session.load("early", workspace), resume=True)


def test_cli_options_default_to_not_given(workspace, tiny_sd1, capsys):
    from fastsd.cli import build_parser, main
    from fastsd.train.cli import settings_from_args

    assert settings_from_args(build_parser().parse_args(["train", "S"])) == {}
    link_tiny(workspace, "sd1", tiny_sd1)
    make_subject_session("typed", workspace, n=2)
    home = ["--home", str(workspace)]
    assert main(["train", "typed", "--unet-steps", "1", "--text-steps", "0",
                 "--checkpoint-every", "0", "--unet-lr", "1e-4", *home]) == 0
    # the default lr (2e-06) is not "typed": the run's 1e-4 is kept, nothing refused
    assert main(["train", "typed", "--resume", *home]) == 0
    assert main(["train", "typed", "--resume", "--unet-lr", "2e-06", *home]) == 2
    assert "unet-lr: the run uses 0.0001, you gave 2e-06" in capsys.readouterr().err


# --------------------------------------------------------------------------- random crop


def test_random_crop_moves_on_non_square_originals(workspace, tiny_sdxl):
    """Originals of 120x80 and 72x136 px, cropped by the images step to 64 px squares: the
    cached latents keep a margin, the crop offsets vary, stay inside the original, and the
    crop coordinates the SDXL UNet gets are those offsets."""
    import numpy as np
    from PIL import Image

    from fastsd import drive
    from fastsd.dataset import crop

    link_tiny(workspace, "sdxl", tiny_sdxl)
    s = make_subject_session("crop", workspace, family="sdxl", n=0)
    rng = np.random.default_rng(1)
    (s.instance_images / "originals").mkdir()
    for name, (w, h) in {"wide": (120, 80), "tall": (72, 136)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            s.instance_images / "originals" / f"{name}.png")
    crop.crop_session(s, 64)
    boxes = {k: v["box"] for k, v in drive.read_json(s.instance_images / crop.CROPS).items()}
    sizes = {"wide": (80, 120), "tall": (136, 72)}
    seen, time_ids = [], []

    def hook(event, info):
        if event == "stage_start":
            info["parts"].unet.register_forward_pre_hook(
                lambda m, a, kw: time_ids.append(kw["added_cond_kwargs"]["time_ids"].tolist()),
                with_kwargs=True)
        if event == "step":
            seen.append(info["crops"])
    train(s, dict(FAST, unet_steps=8, text_steps=0, crop="random", batch_size=2),
          on_event=hook)
    assert len(time_ids) == 8
    offsets: dict[str, set] = {"wide": set(), "tall": set()}
    for crops, rows in zip(seen, time_ids):
        for (top, left), row in zip(crops, rows):
            h0, w0, t, l, th, tw = (int(v) for v in row)
            assert (t, l, th, tw) == (top, left, 64, 64)  # what the UNet is told
            name = next(k for k, v in sizes.items() if v == (h0, w0))
            side = boxes[name][2] - boxes[name][0]
            scale = 64 / side
            assert 0 <= top and 0 <= left  # inside the original, in its scaled frame
            assert top + 64 <= round(h0 * scale) + 1 and left + 64 <= round(w0 * scale) + 1
            offsets[name].add((top, left))
    assert len(offsets["wide"]) > 1 and len(offsets["tall"]) > 1, offsets


# --------------------------------------------------------------------------- precision


def test_bf16_mixed_precision_runs_on_cpu(workspace, tiny_sd1):
    import torch

    link_tiny(workspace, "sd1", tiny_sd1)
    s = make_subject_session("bf16", workspace, n=2)
    dtypes = []

    def hook(event, info):
        if event == "stage_start" and info["stage_name"] == "unet":
            info["parts"].unet.conv_in.register_forward_hook(
                lambda m, a, out: dtypes.append(out.dtype))
    r = train(s, dict(FAST, unet_steps=2, text_steps=1, mixed_precision="bf16"), on_event=hook)
    assert dtypes == [torch.bfloat16] * 3  # autocast ran the UNet in bf16 (2 + 1 frozen)
    assert s.settings["train"]["mixed_precision"] == "bf16"
    assert all(torch.isfinite(torch.tensor(r.losses)))
    saved = final_tensors(s)
    assert all(v.dtype == torch.float32 for v in saved.values())  # fp32 master weights


def test_t4_preset_as_far_as_a_cpu_goes(workspace, tiny_sd1, monkeypatch):
    """The T4's settings on CPU (bf16 for fp16): the trained weights stay fp32 and the
    optimizer keeps 8-bit (uint8, for tensors of 4096 values and more) or fp32 moments,
    never half-precision ones; class images are made under autocast like the samples (they
    were made in fp32, four times slower on a T4)."""
    import torch

    from fastsd.train import checkpoint, data

    link_tiny(workspace, "sd1", tiny_sd1)
    s = make_subject_session("t4cpu", workspace, n=2)
    made, weights = [], []
    real = data.generate_class_images

    def generate(*a, **kw):
        made.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(*a, **kw)
    monkeypatch.setattr(data, "generate_class_images", generate)

    def hook(event, info):
        if event == "stage_start":
            weights.append(info["parts"])
        if event == "step":
            parts = weights[0]
            weights.append({p.dtype for st in ("unet", "text") for p in parts.parameters(st)})
    r = train(s, dict(FAST, unet_steps=2, text_steps=1, mixed_precision="bf16",
                      adam_8bit=True, gradient_checkpointing=True, prior_preservation=True,
                      class_images=1, class_steps=1, keep_checkpoints=5), on_event=hook)
    assert made == [(True, torch.bfloat16)]
    assert s.settings["train"]["adam_8bit"] is True
    assert all(w == {torch.float32} for w in weights[1:] if isinstance(w, set))
    assert all(torch.isfinite(torch.tensor(r.losses)))

    def moments(d: dict) -> list:  # bitsandbytes nests its quantized state one level down
        return [x for k, v in d.items() for x in (moments(v) if isinstance(v, dict) else
                [v] if isinstance(v, torch.Tensor) and k.startswith(("state", "exp_avg"))
                else [])]
    for ck in checkpoint.listing(s.checkpoints):
        state = checkpoint.Checkpoint(ck.path, ck.step).load().objects["optimizer"]["state"]
        kinds = {v.dtype for v in moments(state)}
        assert kinds <= {torch.uint8, torch.float32}, ck.path.name
        assert torch.uint8 in kinds, ck.path.name  # 8-bit AdamW ran


# --------------------------------------------------------------------------- checkpoints


def test_a_snapshot_is_taken_at_the_step_and_written_exactly_in_the_background(tmp_path):
    import torch

    live = {"w": torch.arange(6.0)}
    opt = {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]}
    snap = checkpoint.capture(5, {"unet": live}, {"optimizer": opt}, {"stage": 0})
    live["w"] += 100  # training goes on while the writer works
    opt["state"][0]["exp_avg"] += 1
    w = checkpoint.Writer(background=True)
    bg = w.submit(tmp_path / "bg", snap, keep=1)
    w.wait()
    sync = checkpoint.write(tmp_path / "sync", snap, keep=1)
    a = checkpoint.Checkpoint(bg, 5).load()
    assert a.tensors["unet"]["w"].equal(torch.arange(6.0))
    assert a.objects["optimizer"]["state"][0]["exp_avg"].equal(torch.ones(3))
    for f in ("unet.safetensors", "optimizer.pt", "state.json", "manifest.json"):
        assert (bg / f).read_bytes() == (sync / f).read_bytes(), f
    # keep 1: the next one replaces it only once it is whole
    w.submit(tmp_path / "bg", checkpoint.capture(6, {"unet": live}, {}, {}), keep=1)
    w.wait()
    assert [c.step for c in checkpoint.listing(tmp_path / "bg")] == [6]


def test_a_checkpoint_is_written_and_read_without_a_second_copy_in_memory(tmp_path):
    """The snapshot is the only copy while it is written (it was serialised whole into
    bytes, then read back whole: three copies of an fp32 UNet at the first checkpoint on a
    T4). tracemalloc sees every Python bytes object; the tensors' own memory is not traced,
    so the traced peak is what the write and the reads add: less than one tensor's size."""
    import tracemalloc

    import torch

    n = 2_000_000  # 8 MB of fp32 per tensor
    weights, moments = {"w": torch.randn(n)}, {"state": {0: {"exp_avg": torch.randn(n)}}}
    snap = checkpoint.capture(3, {"unet": weights}, {"optimizer": moments}, {"stage": 0})
    tracemalloc.start()
    try:
        checkpoint.write(tmp_path, snap, keep=1)
        write_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        ck = checkpoint.latest(tmp_path)
        unet, opt = ck.tensors["unet"], ck.objects["optimizer"]
        read_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert unet["w"].equal(weights["w"])
    assert opt["state"][0]["exp_avg"].equal(moments["state"][0]["exp_avg"])
    assert write_peak < 4 * n / 2 and read_peak < 4 * n / 2, (write_peak, read_peak)


def test_resume_reads_the_weights_when_they_are_used_not_before(tmp_path):
    """latest() checks every file but keeps only the state: the weights are read when the
    trainer copies them into the model (after the model is loaded, not beside it)."""
    import torch

    from fastsd.errors import DataError

    path = checkpoint.save(tmp_path, 4, {"unet": {"w": torch.arange(5.0)}}, {}, {"stage": 1},
                           keep=1)
    ck = checkpoint.latest(tmp_path)
    assert ck.state["stage"] == 1 and ck.step == 4
    assert list(ck.tensors) == ["unet"] and ck.tensors["unet"]["w"].equal(torch.arange(5.0))
    f = path / "unet.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF  # changed after latest() checked it: found when it is read
    f.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="changed after it was checked"):
        ck.tensors["unet"]


def test_the_next_snapshot_is_taken_only_once_the_previous_is_on_drive(tmp_path):
    """Two snapshots never sit in memory together: Writer.save waits for the write under
    way before it captures the next one (the capture used to come first)."""
    import threading

    import torch

    from fastsd import drive

    live = {"w": torch.zeros(4)}
    gate, waiting = threading.Event(), threading.Event()
    real = drive._open_dest

    def slow(path, mode="wb"):  # the first checkpoint's write waits for the gate
        if "step-0000001" in str(path):
            gate.wait(60)
        return real(path, mode)

    class Watched(checkpoint.Writer):
        def wait(self):
            waiting.set()
            return super().wait()

    drive._open_dest = slow
    try:
        w = Watched(background=True)
        w.save(tmp_path, 1, {"unet": live}, {}, {}, keep=2)
        waiting.clear()
        second = threading.Thread(target=w.save, args=(tmp_path, 2, {"unet": live}, {}, {}, 2))
        second.start()
        assert waiting.wait(60)  # the second save is waiting for the first write...
        live["w"] += 7  # ...while training goes on
        gate.set()
        second.join(60)
        w.wait()
    finally:
        drive._open_dest = real
    assert checkpoint.latest(tmp_path).tensors["unet"]["w"].equal(torch.full((4,), 7.0))


def test_a_run_that_does_not_fit_on_drive_stops_before_training(workspace, tiny_sd1):
    """A real small file system (a 6 MB tmpfs, in a private mount namespace) as the Drive."""
    if shutil.which("unshare") is None:
        pytest.fail("util-linux's unshare is needed (apt-get install util-linux)")
    link_tiny(workspace, "sd1", tiny_sd1)
    make_subject_session("full", workspace, n=2)
    code = (
        "import sys, shutil; from pathlib import Path; from fastsd.cli import main; "
        f"h = Path({str(workspace)!r}); "
        "sys.exit(main(['train', 'full', '--unet-steps', '2', '--text-steps', '1', "
        "'--keep-checkpoints', '2', '--save-every', '1', '--save-from', '2', "
        "'--home', str(h)]))")
    sess = workspace / "sessions" / "full"
    script = (f'cp -a "{sess}" /tmp/full-copy-$$ && mount -t tmpfs -o size=6m tmpfs "{sess}" '
              f'&& cp -a /tmp/full-copy-$$/. "{sess}" && rm -rf /tmp/full-copy-$$ '
              f'&& exec "{sys.executable}" -c "$0"')
    p = subprocess.run(["unshare", "-rm", "sh", "-c", script, code], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    err = " ".join(p.stderr.split())
    assert "Not enough free space on Drive for this run" in err, err[-2000:]
    assert "checkpoints 3 x" in err and \
        "keep one checkpoint, not 2 (run 'fastsd train full --keep-checkpoints 1')" in err
    assert "MB is free" in err or "GB is free" in err
    assert "UNet stage:" not in err  # no step ran
    # the intermediate single files (steps 2 and 3) count, each the single file's size
    single = re.search(r"single file (\S+ GB), intermediate single files 2 x (\S+ GB)", err)
    assert single and single[1] == single[2], err[-2000:]
    assert "fewer intermediate single files" in err and \
        "--save-every N --save-from N" in err


def test_leftovers_of_killed_runs_are_removed(workspace, tiny_sd1, tmp_path, monkeypatch):
    import os
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / "fastsd-latents-999999999-x"
    mine = tmp_path / f"fastsd-latents-{os.getpid()}-y"
    old = [tmp_path / "fastsd-ckpt-abc", tmp_path / "fastsd-model-def"]
    for d in [dead, mine, *old]:
        d.mkdir()
        (d / "f").write_bytes(b"x" * 10)
    link_tiny(workspace, "sd1", tiny_sd1)
    s = make_subject_session("left", workspace, n=2)
    half = s.models / ".fastsd-tmp-1234abcd-left"  # an export killed half-way
    half.mkdir(parents=True)
    (half / "unet.bin").write_bytes(b"x" * 100)
    train(s, dict(FAST, unet_steps=1, text_steps=0))
    assert not half.exists() and not dead.exists() and mine.exists()
    assert not any(p.exists() for p in old)
    assert sorted(p.name for p in s.models.iterdir()) == ["left", "left.safetensors"]
