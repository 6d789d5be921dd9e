"""Training at real size on the CPU, with the T4 preset as far as a CPU goes (bf16 autocast
where the T4 runs fp16, 8-bit AdamW, gradient checkpointing, the latent and prompt caches):
a full training step of each stage for SD 1.5, a UNet step for SD 2.1 (v, 768 px), a LoRA
UNet step for SDXL at 1024 px (how SDXL trains on a T4), and a checkpoint written, the
process killed and the run resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from realsize import T4_ON_CPU, optimizer_moments, subject_session

from fastsd.train import TrainSettings, checkpoint, train


def watch(record: list):
    """An on_event hook that records, at each step, the dtypes of the trained weights, of the
    frozen ones (the other parts, and a LoRA's frozen base) and whether gradient
    checkpointing is on."""
    import torch

    parts = []

    def hook(event, info):
        if event == "stage_start":
            parts[:] = [info["parts"]]
            info["parts"].unet.conv_in.register_forward_hook(
                lambda m, a, out: record.append(("unet_compute", out.dtype)))
        if event == "step":
            p, stage = parts[0], info["stage_name"]
            trained = {x.dtype for x in p.parameters(stage)}
            frozen = {x.dtype for m in (p.vae, *p.modules().values()) for x in m.parameters()
                      if not x.requires_grad}
            record.append((stage, trained, frozen, p.unet.is_gradient_checkpointing,
                           info["loss"]))
    return hook, torch


@pytest.mark.parametrize("family,stages", [("sd1", (1, 1)), ("sd2", (1, 0))])
def test_training_steps_with_the_t4_preset(full_models, workspace, family, stages):
    """fp32 trained weights (never fp16 ones), 8-bit or fp32 optimizer moments, compute in
    the 16-bit type, checkpointing on, every image encoded once, the model exported in fp16
    with its single file."""
    from fastsd.convert import inspect

    res = {"sd1": 512, "sd2": 768}[family]
    s = subject_session(f"real-{family}", workspace, full_models[family], res, n=1)
    record: list = []
    hook, torch = watch(record)
    r = train(s, TrainSettings(unet_steps=stages[0], text_steps=stages[1], checkpoint_every=0,
                               keep_checkpoints=2, **T4_ON_CPU), on_event=hook)
    steps = [x for x in record if x[0] in ("unet", "text")]
    assert [x[0] for x in steps] == ["unet"] * stages[0] + ["text"] * stages[1]
    for stage, trained, frozen, gc_on, loss in steps:
        assert trained == {torch.float32}, stage  # fp32 master weights
        assert frozen <= {torch.float32, torch.float16, torch.bfloat16}
        assert gc_on and loss == loss and loss < 10  # checkpointing on, a finite loss
    assert {dt for name, dt in [x for x in record if x[0] == "unet_compute"]} == \
        {torch.bfloat16}
    assert r.stats["vae_encodes"] == 1  # the latent cache: each image once
    for ck in checkpoint.listing(s.checkpoints):  # each stage's optimizer, as saved
        state = checkpoint.Checkpoint(ck.path, ck.step).load().objects["optimizer"]["state"]
        kinds = {v.dtype for v in optimizer_moments(state)}
        assert kinds <= {torch.uint8, torch.float32} and torch.uint8 in kinds, ck.path.name
    assert s.settings["train"]["save_precision"] == "fp16"
    info = inspect(r.single_file)
    assert (info["family"], info["precision"]) == (family, "fp16")


def test_sdxl_lora_step_with_the_t4_preset(full_models, workspace):
    """SDXL trains on a T4 as a LoRA: the adapters and their optimizer in fp32, the frozen
    base in the 16-bit type (half its fp32 memory), the VAE fp32; a LoRA file at the end.
    (A full SDXL fine-tune's fp32 UNet, gradients and 8-bit AdamW alone need about 41 GB.)"""
    from fastsd.convert.tensors import open_tensors

    s = subject_session("real-sdxl-lora", workspace, full_models["sdxl"], 1024, n=1)
    record: list = []
    hook, torch = watch(record)
    r = train(s, TrainSettings(method="lora", unet_steps=1, text_steps=0, checkpoint_every=0,
                               **T4_ON_CPU), on_event=hook)
    (stage, trained, frozen, gc_on, loss), = [x for x in record if x[0] == "unet"]
    assert trained == {torch.float32} and gc_on and loss == loss
    assert frozen == {torch.bfloat16, torch.float32}  # the base in bf16, the VAE fp32
    ckpt = checkpoint.latest(s.checkpoints)
    kinds = {v.dtype for v in optimizer_moments(ckpt.objects["optimizer"]["state"])}
    assert kinds <= {torch.uint8, torch.float32} and torch.uint8 in kinds
    assert r.lora.is_file() and r.model_dir is None
    with open_tensors(r.lora) as tf:  # kohya's layout: lora_unet_* down/up pairs
        keys = tf.keys()
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)


def test_a_checkpoint_written_killed_and_resumed(full_models, workspace):
    """SD 1.5 at 256 px: `fastsd train` in a child process is killed (SIGKILL) once its
    step-1 checkpoint is on disk; the resumed run starts from it with its very weights and
    goes on to the end, its first loss the one the killed run reported."""
    import torch

    s = subject_session("killed", workspace, full_models["sd1"], 256, n=1)
    cmd = [sys.executable, "-m", "fastsd.cli", "train", s.name, "--events", "--home",
           str(workspace), "--unet-steps", "2", "--text-steps", "0", "--checkpoint-every", "1",
           "--preset", "t4", "--mixed-precision", "bf16", "--adam-8bit", "--sample-every", "0"]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "TQDM_DISABLE": "1"})
    losses, tail, written = [], [], threading.Event()

    def read() -> None:  # all along: a child whose output pipe is full stops writing
        for line in child.stdout:
            tail.append(line)
            if not line.startswith("@@fastsd-event "):
                continue
            ev = json.loads(line.split(" ", 1)[1])
            if ev["event"] == "step":
                losses.append(ev["loss"])
            if ev["event"] == "checkpoint" and ev["global_step"] == 1:
                written.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    manifest = s.checkpoints / "step-0000001" / checkpoint.MANIFEST
    deadline = time.monotonic() + 900
    while not (written.is_set() and manifest.is_file()):
        assert child.poll() is None, "the run ended before its step-1 checkpoint:\n" + \
            "".join(tail[-20:])
        assert time.monotonic() < deadline, "no step-1 checkpoint in 15 minutes:\n" + \
            "".join(tail[-20:])
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    assert child.wait(120) == -signal.SIGKILL, "".join(tail[-20:])
    reader.join(30)
    ckpt = checkpoint.latest(s.checkpoints)
    assert ckpt.step == 1 and len(losses) >= 1
    seen = {}

    def hook(event, info):
        if event == "stage_start":
            saved = ckpt.tensors["unet"]
            own = info["parts"].unet.state_dict()
            seen["same"] = all(own[k].equal(v) for k, v in saved.items())
    r = train(s, resume=True, on_event=hook)
    assert seen == {"same": True}  # the weights the killed run had at step 1
    assert r.resumed_from == 1 and r.global_step == 2
    assert r.losses[:1] == pytest.approx(losses[:1], rel=1e-6)
    assert torch.isfinite(torch.tensor(r.losses)).all()
