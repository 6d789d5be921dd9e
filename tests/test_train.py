"""The trainer in-process: it learns, the frozen part stays frozen, every family trains,
the caches compute each thing once, checkpoints are verified, settings, presets and CLI.
(Kill-and-resume in separate processes: test_train_resume.py.)"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest

from test_train_resume import make_subject_session

from fastsd.errors import DataError
from fastsd.train import TrainSettings, train
from fastsd.train.settings import DEFAULT_LR, rate_text

FAST = dict(checkpoint_every=0, unet_lr=1e-4, text_lr=1e-4, class_steps=2, sample_steps=2)


def link_tiny(workspace: Path, family: str, folder: Path) -> None:
    (workspace / "models").mkdir(exist_ok=True)
    (workspace / "models" / f"tiny-{family}").symlink_to(folder)


def snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def recorder(snaps: dict):
    def hook(event: str, info: dict) -> None:
        if event in ("stage_start", "stage_end"):
            snaps[event, info["stage_name"]] = {
                n: snapshot(m) for n, m in info["parts"].modules().items()}
    return hook


# --------------------------------------------------------------------------- it learns


def eval_loss(model_dir: Path, unet_state: dict, images: list[Path], prompt: str) -> float:
    """Mean denoising loss of a UNet on the images, fixed noise and timesteps (independent
    of the trainer's code: plain diffusers calls)."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.unet.load_state_dict(unet_state)
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize(
        (64, 64), Image.Resampling.BICUBIC), dtype=np.float32).copy()).permute(2, 0, 1)
        for p in images]) / 127.5 - 1
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        lat = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        hid = pipe.text_encoder(ids)[0]
        losses = []
        for t in range(50, 1000, 100):
            noise = torch.randn(lat.shape, generator=g)
            ts = torch.full((len(lat),), t)
            noisy = pipe.scheduler.add_noise(lat, noise, ts)
            pred = pipe.unet(noisy, ts, hid.expand(len(lat), -1, -1)).sample
            losses.append(torch.nn.functional.mse_loss(pred, noise).item())
    return float(np.mean(losses))


def test_it_learns_and_the_frozen_part_stays_frozen(workspace, tiny_sd1):
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    link_tiny(workspace, "sd1", tiny_sd1)
    s = make_subject_session("learn", workspace)
    snaps: dict = {}
    r = train(s, TrainSettings(unet_steps=25, text_steps=8, unet_lr=2e-3, text_lr=1e-4,
                               unet_schedule="constant", text_schedule="constant",
                               batch_size=2, checkpoint_every=0),
              on_event=recorder(snaps))
    unet0, unet1 = snaps["stage_start", "unet"]["unet"], snaps["stage_end", "unet"]["unet"]
    te0, te1 = (snaps["stage_start", "text"]["text_encoder"],
                snaps["stage_end", "text"]["text_encoder"])
    # frozen part of each stage unchanged, bit for bit; the trained part changed
    assert same(snaps["stage_start", "unet"]["text_encoder"],
                snaps["stage_end", "unet"]["text_encoder"])
    assert same(snaps["stage_start", "text"]["unet"], snaps["stage_end", "text"]["unet"])
    assert same(unet1, snaps["stage_start", "text"]["unet"])
    assert not same(unet0, unet1) and not same(te0, te1)
    # the UNet stage lowers the denoising loss on the subject's images by 20% or more
    images = sorted(s.instance_images.glob("*.png"))
    base = eval_loss(tiny_sd1, unet0, images, "sks toy")
    trained = eval_loss(tiny_sd1, unet1, images, "sks toy")
    assert trained <= 0.8 * base, (base, trained)
    # the text encoder stage changes the instance prompt's embeddings
    tok = CLIPTokenizer.from_pretrained(tiny_sd1 / "tokenizer")
    ids = tok(["sks toy"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    before = CLIPTextModel.from_pretrained(tiny_sd1 / "text_encoder")
    after = CLIPTextModel.from_pretrained(r.model_dir / "text_encoder")
    with torch.no_grad():
        e0, e1 = before(ids)[0], after(ids)[0]
    assert (e0 - e1).abs().max() > 1e-3
    # what was saved is what was trained
    from safetensors.torch import load_file

    saved = load_file(r.model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert same(saved, unet1)
    assert r.loss_curve and r.loss_curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(r.losses) == 33


# --------------------------------------------------------------------------- families


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_family_trains_through_both_stages(family, workspace, request):
    from fastsd.train.parts import load_parts

    folder = request.getfixturevalue(f"tiny_{family}")
    link_tiny(workspace, family, folder)
    s = make_subject_session(family, workspace, family=family, n=2)
    snaps: dict = {}
    r = train(s, TrainSettings(unet_steps=2, text_steps=2, sample_every=4, flip=True,
                               crop="random", **FAST), on_event=recorder(snaps))
    parts = load_parts(r.model_dir)
    assert parts.family == family and parts.v_prediction == (family == "sd2")
    encoders = ["text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    base = load_parts(folder)
    assert not same(snapshot(parts.unet), snapshot(base.unet))
    for i, name in enumerate(encoders):  # both encoders trained in the text stage
        assert not same(snapshot(parts.encoders[i]), snapshot(base.encoders[i])), name
        assert same(snaps["stage_start", "unet"][name], snaps["stage_end", "unet"][name])
    assert same(snaps["stage_start", "text"]["unet"], snaps["stage_end", "text"]["unet"])
    assert [p.name for p in r.samples] == ["step-0000004-0.png"]
    assert r.samples[0].is_file()


def test_text_encoder_first_then_unet_on_fresh_embeddings(workspace, tiny_sd1):
    link_tiny(workspace, "sd1", tiny_sd1)
    s = make_subject_session("order", workspace, n=2)
    snaps: dict = {}
    r = train(s, TrainSettings(unet_steps=2, text_steps=2, order="text,unet", **FAST),
              on_event=recorder(snaps))
    assert same(snaps["stage_start", "text"]["unet"], snaps["stage_end", "text"]["unet"])
    assert same(snaps["stage_start", "unet"]["text_encoder"],
                snaps["stage_end", "unet"]["text_encoder"])
    assert not same(snaps["stage_start", "text"]["text_encoder"],
                    snaps["stage_end", "text"]["text_encoder"])
    # the UNet stage embeds the captions once, with the text encoder trained just before
    assert r.stats["prompt_encodes"] == 1 and r.global_step == 4


# --------------------------------------------------------------------------- caches, data


def test_each_image_and_caption_is_encoded_once(workspace, tiny_sd1):
    link_tiny(workspace, "sd1", tiny_sd1)
    s = make_subject_session("cache", workspace, n=4)
    (s.captions / "toy0.txt").write_text("a photo of sks toy on the table\n")
    (s.captions / "toy1.txt").write_text("sks toy in the grass")
    # toy2, toy3: no caption -> the instance prompt "sks toy"
    r = train(s, TrainSettings(unet_steps=6, text_steps=0, flip=True, batch_size=2,
                               prior_preservation=True, class_images=2, **FAST))
    # 4 instance + 2 class images, each twice (flipped or not): 12 VAE encodes for 6 steps
    assert r.stats["vae_encodes"] == (4 + 2) * 2
    # 3 distinct instance captions + the class prompt, each encoded once while frozen
    assert r.stats["prompt_encodes"] == 4
    class_dir = s.path / "class_images" / "photo_of_a_toy"
    assert sorted(p.name for p in class_dir.iterdir()) == ["00000.png", "00001.png"]
    mtimes = [p.stat().st_mtime_ns for p in sorted(class_dir.iterdir())]
    train(s, TrainSettings(unet_steps=1, text_steps=0, prior_preservation=True,
                           class_images=2, **FAST), restart=True)
    assert [p.stat().st_mtime_ns for p in sorted(class_dir.iterdir())] == mtimes


def test_latent_cache_spills_to_disk():
    import torch

    from fastsd.train.data import LatentCache

    cache = LatentCache(limit_bytes=2 * 4 * 8 * 8 * 4)  # room for one entry
    a, b = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    cache.put("a", a)
    cache.put("b", b)
    assert "a" in cache.mem and "b" in cache.files and cache.files["b"].is_file()
    assert cache.get("a").equal(a) and cache.get("b").equal(b)
    spill = cache.files["b"].parent
    cache.close()
    assert not spill.exists()


def test_data_order_continues_from_its_position():
    from fastsd.train.data import DataOrder

    whole = DataOrder(5, seed=3)
    seq = [whole.take(2) for _ in range(6)]
    part = DataOrder(5, seed=3)
    first = [part.take(2) for _ in range(2)]
    again = DataOrder(5, seed=3)
    again.load(part.state())
    assert first + [again.take(2) for _ in range(4)] == seq
    assert sorted(sum(seq[:5], [])[:5]) == [0, 1, 2, 3, 4]  # each epoch is a permutation
    with pytest.raises(DataError, match="images"):
        DataOrder(6, seed=3).load(part.state())


def test_captions_fall_back_to_the_instance_prompt(workspace):
    from fastsd.train.data import instance_examples

    s = make_subject_session("caps", workspace, n=2)
    (s.instance_images / "originals").mkdir()
    (s.instance_images / "originals" / "big.png").write_bytes(b"not read")
    (s.captions / "toy1.txt").write_text("  sks toy, close up \n")
    ex = instance_examples(s)
    assert [(e.image.name, e.caption) for e in ex] == [("toy0.png", "sks toy"),
                                                        ("toy1.png", "sks toy, close up")]


def test_no_images_is_a_clear_error(workspace):
    from conftest import tiny_session

    s = tiny_session("empty", workspace)
    with pytest.raises(DataError, match="No training images"):
        train(s, TrainSettings(**FAST))


# --------------------------------------------------------------------------- checkpoints


def test_damaged_checkpoint_falls_back_to_the_previous_one(workspace, tiny_sd1, caplog):
    from fastsd.train import checkpoint

    link_tiny(workspace, "sd1", tiny_sd1)
    opts = dict(unet_steps=3, text_steps=2, checkpoint_every=1, keep_checkpoints=3,
                unet_lr=1e-4, text_lr=1e-4, flip=True)
    ref = make_subject_session("whole", workspace, n=2)
    r_ref = train(ref, TrainSettings(**opts))
    s = make_subject_session("damaged", workspace, n=2)
    stop_at = 4

    def stop(event, info):
        if event == "step" and info["global_step"] == stop_at:
            raise KeyboardInterrupt  # a hard interrupt: no checkpoint of this step
    with pytest.raises(KeyboardInterrupt):
        train(s, TrainSettings(**opts), on_event=stop)
    assert [c.step for c in checkpoint.listing(s.checkpoints)] == [1, 2, 3]
    f = s.checkpoints / "step-0000003" / "unet.safetensors"
    f.write_bytes(f.read_bytes()[:-100])  # truncated, as by a dropped Drive copy
    with caplog.at_level(logging.WARNING, logger="fastsd"):
        r = train(s, resume=True)
    assert "step-0000003 is damaged" in caplog.text and "previous checkpoint" in caplog.text
    assert r.resumed_from == 2
    from test_train_resume import final_tensors

    a, b = final_tensors(ref), final_tensors(s)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert r.losses == r_ref.losses


def test_checkpoint_manifest_detects_every_kind_of_damage(tmp_path):
    import torch

    from fastsd.train import checkpoint

    def fresh(step):
        return checkpoint.save(tmp_path, step, {"unet": {"w": torch.ones(3)}},
                               {"optimizer": {"x": torch.zeros(2)}}, {"stage": 0}, keep=9)
    p = fresh(1)
    ck = checkpoint.Checkpoint(p, 1)
    assert checkpoint.verify(ck) is None and ck.load().tensors["unet"]["w"].equal(torch.ones(3))
    (p / "optimizer.pt").write_bytes(b"x" * (p / "optimizer.pt").stat().st_size)
    assert "sha256" in checkpoint.verify(ck)
    p = fresh(2)
    (p / "unet.safetensors").unlink()
    assert "missing" in checkpoint.verify(checkpoint.Checkpoint(p, 2))
    p = fresh(3)
    (p / "manifest.json").unlink()
    assert "manifest" in checkpoint.verify(checkpoint.Checkpoint(p, 3))
    fresh(4)
    assert checkpoint.latest(tmp_path).step == 4
    for step in (5, 6):
        fresh(step)
    checkpoint.prune(tmp_path, keep=2)
    assert [c.step for c in checkpoint.listing(tmp_path)] == [5, 6]


def test_a_session_with_checkpoints_needs_resume_or_restart(workspace, tiny_sd1):
    link_tiny(workspace, "sd1", tiny_sd1)
    s = make_subject_session("again", workspace, n=2)
    assert train(s, TrainSettings(unet_steps=0, text_steps=1, **FAST)).global_step == 1
    with pytest.raises(DataError, match="--resume"):
        train(s, TrainSettings(unet_steps=1, text_steps=1, **FAST))
    r = train(s, TrainSettings(unet_steps=2, text_steps=0, **FAST), restart=True)
    assert r.global_step == 2 and r.resumed_from is None
    r = train(s, resume=True)  # finished: nothing left to train, the model is exported again
    assert r.global_step == 2 and r.resumed_from == 2 and (r.model_dir / "unet").is_dir()


def test_ctrl_c_finishes_the_step_saves_a_checkpoint_and_resumes(workspace, tiny_sd1,
                                                                   caplog):
    from fastsd.train import checkpoint

    link_tiny(workspace, "sd1", tiny_sd1)
    s = make_subject_session("ctrlc", workspace, n=2)
    before = signal.getsignal(signal.SIGINT)

    def interrupt(event, info):
        if event == "step" and info["global_step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), caplog.at_level(logging.WARNING, logger="fastsd"):
        train(s, TrainSettings(unet_steps=3, text_steps=2, **FAST), on_event=interrupt)
    assert "Stopped at step 2" in caplog.text
    assert "'fastsd train ctrlc --resume'" in caplog.text
    assert signal.getsignal(signal.SIGINT) is before
    assert checkpoint.latest(s.checkpoints).step == 2
    assert s.settings["train"]["unet_steps"] == 3  # stored for the resume
    r = train(s, resume=True)
    assert r.resumed_from == 2 and r.global_step == 5


def test_step_events_carry_each_loss_read_at_once_or_in_batches(workspace, tiny_sd1, capsys,
                                                                 monkeypatch):
    """What the train cell reads: one "step" event per step, in order, with its loss (the
    cell's bar and curve), its step numbers and the batch's crops, and no more (not the
    whole state with its growing loss list). The same when losses are read off the device
    in batches, as on a GPU: the events come after their steps, none is lost, and a
    checkpoint in between holds every loss so far."""
    import json

    from fastsd.train import checkpoint, runner
    from fastsd.train.trainer import StepReport

    link_tiny(workspace, "sd1", tiny_sd1)
    s = make_subject_session("events", workspace, n=2)

    def run(**opts) -> tuple:
        events, forwards = [], []

        def hook(name: str, info: dict) -> None:
            if name == "stage_start" and info["stage_name"] == "unet":
                info["parts"].unet.register_forward_pre_hook(lambda m, a: forwards.append(1))
            events.append((name, info, len(forwards)))  # forwards run when it arrived
            runner.event_printer(name, info)  # what the child writes for the cell
        r = train(s, TrainSettings(**dict(FAST, unet_steps=3, text_steps=2, **opts)),
                  restart=True, on_event=hook)
        printed = [json.loads(ln[len(runner.EVENT_MARK):])
                   for ln in capsys.readouterr().out.splitlines()
                   if ln.startswith(runner.EVENT_MARK)]
        return r, events, printed

    r, events, printed = run()
    steps = [(info, ran) for name, info, ran in events if name == "step"]
    assert all(info.keys() == {"stage_name", "global_step", "stage_step", "loss", "crops"}
               for info, _ in steps)
    assert [ran for _, ran in steps] == [1, 2, 3, 4, 5]  # on the CPU: right after the step
    cell = [(e["stage_name"], e["stage_step"], e["global_step"]) for e in printed
            if e["event"] == "step"]
    assert cell == [("unet", 1, 1), ("unet", 2, 2), ("unet", 3, 3), ("text", 1, 4),
                    ("text", 2, 5)]
    assert [e["loss"] for e in printed if e["event"] == "step"] == r.losses
    assert len(r.losses) == 5 and r.loss_curve.is_file()

    monkeypatch.setitem(StepReport.READ_EVERY_S, "cpu", 3600.0)  # in batches, as on a GPU
    r2, events2, printed2 = run(checkpoint_every=2, keep_checkpoints=5)
    order = [(name, info["global_step"], ran) for name, info, ran in events2
             if name in ("step", "checkpoint")]
    assert order == [("step", 1, 2), ("step", 2, 2), ("checkpoint", 2, 2),
                     ("step", 3, 3), ("checkpoint", 3, 3),
                     ("step", 4, 4), ("checkpoint", 4, 4), ("step", 5, 5), ("checkpoint", 5, 5)]
    assert r2.losses == r.losses
    assert [e["loss"] for e in printed2 if e["event"] == "step"] == r.losses
    for ck in checkpoint.listing(s.checkpoints):
        assert ck.load().state["losses"] == r.losses[:ck.step]


# --------------------------------------------------------------------------- outputs


def test_single_file_export(workspace, tiny_sd1):
    link_tiny(workspace, "sd1", tiny_sd1)
    s = make_subject_session("single", workspace, n=2)
    r = train(s, TrainSettings(unet_steps=1, text_steps=1, **FAST))
    assert r.single_file == s.models / "single.safetensors" and r.single_file.is_file()


# --------------------------------------------------------------------------- settings, CLI


def test_presets_follow_the_gpu():
    from fastsd.env import DeviceInfo
    from fastsd.train.settings import choose_preset, resolve

    t4 = DeviceInfo("cuda", "Tesla T4", 14.5, 15.0, (7, 5))
    assert choose_preset(t4) == "t4"
    assert choose_preset(DeviceInfo("cuda", "NVIDIA L4", 22, 22.5, (8, 9))) == "l4"
    assert choose_preset(DeviceInfo("cuda", "NVIDIA A100-SXM4-40GB", 39, 40, (8, 0))) == "a100"
    assert choose_preset(DeviceInfo("cuda", "Some GPU", 11, 12, (8, 6))) == "t4"
    assert choose_preset(DeviceInfo("cpu", "x86_64")) == "cpu"
    s, preset = resolve(TrainSettings(batch_size=3), t4, 512)
    assert preset == "t4" and s.mixed_precision == "fp16" and s.adam_8bit
    assert s.gradient_checkpointing and s.batch_size == 3 and s.resolution == 512
    s, _ = resolve(TrainSettings(preset="a100"), DeviceInfo("cpu", "x86_64"), 64)
    assert s.mixed_precision == "no" and not s.adam_8bit  # no mixed precision on CPU


def test_vram_estimate_for_sd15_on_a_t4():
    from fastsd.env import DeviceInfo
    from fastsd.train.settings import describe, estimate_vram_gib, resolve

    s, preset = resolve(TrainSettings(), DeviceInfo("cuda", "Tesla T4", 14.5, 15, (7, 5)), 512)
    sd15 = {"unet": 859_520_964, "text_encoder": 123_060_480}
    vram = estimate_vram_gib(s, "sd1", sd15)
    assert 8 < vram["unet"] < 15 and vram["text"] < vram["unet"]
    no_tricks = estimate_vram_gib(TrainSettings(resolution=512, batch_size=1,
                                               mixed_precision="no", adam_8bit=False,
                                               gradient_checkpointing=False), "sd1", sd15)
    assert no_tricks["unet"] > 15  # why the T4 preset needs its tricks
    assert "Estimated peak VRAM" in describe(s, preset, vram)


def test_vram_is_counted_in_gib_on_both_sides_of_the_comparison():
    from fastsd.env import GIB, DeviceInfo
    from fastsd.train.parts import placement_policy
    from fastsd.train.settings import ROOMY_GIB, choose_preset, estimate_vram_gib

    # fp32 weights + gradients + AdamW moments: 16 B a parameter. GIB / 4 more UNet
    # parameters are 4 GiB more, the unit the device's total is read in (4.3 in 10^9 bytes).
    plain = TrainSettings(resolution=512, batch_size=1, mixed_precision="no", adam_8bit=False)
    small = estimate_vram_gib(plain, "sd1", {"unet": GIB // 16, "text_encoder": 0})
    large = estimate_vram_gib(plain, "sd1", {"unet": GIB // 16 + GIB // 4, "text_encoder": 0})
    assert round(large["unet"] - small["unet"], 1) == 4.0
    # One threshold says both that a GPU is of an A100's class and that it has room to keep
    # every part of the model on it.
    import torch

    for total in (ROOMY_GIB - 0.5, ROOMY_GIB + 0.5):
        info = DeviceInfo("cuda", "Some GPU", total - 1, total, (8, 6))
        roomy = not placement_policy(torch.device("cuda"), info).offload
        assert roomy == (choose_preset(info) == "a100") == (total >= ROOMY_GIB)


def test_settings_are_checked():
    with pytest.raises(DataError, match="multiple of 8"):
        TrainSettings(resolution=500)
    with pytest.raises(DataError, match="unet_steps"):
        TrainSettings(unet_steps=-1)
    with pytest.raises(DataError, match="order"):
        TrainSettings(order="text")
    assert TrainSettings(order="text,unet").stage_order == ("text", "unet")
    d = TrainSettings(unet_steps=7).to_dict()
    assert TrainSettings.from_dict({**d, "gone": 1}).unet_steps == 7


def test_cli_help_lists_every_option_with_its_default(capsys):
    import dataclasses

    from fastsd.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainSettings):
        flag = "--" + f.name.replace("_", "-").rstrip("s" if f.name == "sample_prompts" else "")
        assert flag in text, flag
    d = TrainSettings()
    assert "--resume" in text and f"(default: {d.unet_steps})" in text
    assert f"(default: {d.text_steps})" in text
    for stage in ("unet", "text"):  # no rate of its own: the method's, named in the help
        assert getattr(d, f"{stage}_lr") is None
        full, lora = (rate_text(DEFAULT_LR[m][stage]) for m in ("full", "lora"))
        assert f"(default: {full} for full" in text and f"{lora} for LoRA" in text
    assert text.count("(default:") >= len(dataclasses.fields(TrainSettings))
    args = build_parser().parse_args(["train", "S", "--unet-steps", "5", "--flip",
                                      "--sample-prompt", "a", "--sample-prompt", "b"])
    from fastsd.train.cli import settings_from_args

    assert settings_from_args(args) == {"unet_steps": 5, "flip": True,
                                        "sample_prompts": ["a", "b"]}


def test_cli_trains_a_session(workspace, tiny_sd1, capsys):
    from fastsd.cli import main

    link_tiny(workspace, "sd1", tiny_sd1)
    make_subject_session("cli", workspace, n=2)
    assert main(["train", "cli", "--unet-steps", "1", "--text-steps", "1",
                 "--checkpoint-every", "0", "--home", str(workspace)]) == 0
    assert "Trained 2 steps" in capsys.readouterr().out
    assert main(["train", "cli", "--home", str(workspace)]) == 2  # has checkpoints
    assert "--resume" in capsys.readouterr().err


def test_offset_noise_shifts_each_channel_of_the_noise_and_reaches_the_loss(workspace,
                                                                           tiny_sd1):
    """Offset_Noise adds one draw per example and latent channel, the same over the whole
    image, to the noise the UNet learns to predict; the loss of a step sees it."""
    import dataclasses

    import torch

    from fastsd.train import data
    from fastsd.train.parts import denoise_loss, encode_text, load_parts, tokenize
    from fastsd.train.state import TrainState

    s = make_subject_session("offset", workspace, n=2)
    parts = load_parts(tiny_sd1)
    examples = data.instance_examples(s)
    base = TrainSettings(batch_size=2, resolution=64)
    latents = data.encode_latents(parts.vae, examples, [], None, base, "cpu")

    def batch(offset: float):
        state = TrainState(data.DataOrder(len(examples), base.seed),
                           data.DataOrder(1, base.seed + 1))
        return data.sample_batch(state, latents, dataclasses.replace(base, offset_noise=offset),
                                 examples, [], 0, 1, 1000, parts.vae.config.scaling_factor)

    plain, shifted = batch(0.0), batch(0.1)
    assert plain.latents.equal(shifted.latents) and plain.captions == shifted.captions
    shift = shifted.noise - plain.noise
    per_channel = shift[:, :, :1, :1]
    assert torch.allclose(shift, per_channel.expand_as(shift), atol=1e-6)
    assert per_channel.abs().min() > 0 and per_channel.abs().max() < 0.1 * 5
    assert len(set(per_channel.flatten().tolist())) == per_channel.numel()  # each its own
    hidden, _ = encode_text(parts, tokenize(parts, plain.captions), "cpu")
    with torch.no_grad():
        losses = [denoise_loss(parts, parts.unet, b.latents, b.noise, plain.timesteps, hidden)
                  for b in (plain, shifted)]
    assert not torch.allclose(losses[0], losses[1])


def test_parts_stored_in_one_precision_train_in_another_with_the_files_values(tiny_sd1):
    """A part stored in fp32 and trained in bf16 (loaded as stored, then converted in place):
    the file's values cast to bf16, the VAE fp32; the stored type is read from the headers.
    (That the part is never in memory twice is measured at real size: bench_real_ram.py's
    SDXL LoRA rows.)"""
    import torch
    from safetensors.torch import load_file

    from fastsd.train.parts import load_parts, stored_dtype

    assert stored_dtype(tiny_sd1 / "unet") == torch.float32
    assert stored_dtype(tiny_sd1 / "no-such-part") is None
    parts = load_parts(tiny_sd1, "bf16")
    assert parts.unet.dtype == parts.encoders[0].dtype == torch.bfloat16
    assert parts.vae.dtype == torch.float32
    stored = load_file(next((tiny_sd1 / "unet").glob("*.safetensors")))
    loaded = parts.unet.state_dict()
    assert stored.keys() == loaded.keys()
    assert all(loaded[k].equal(v.to(torch.bfloat16)) for k, v in stored.items())
