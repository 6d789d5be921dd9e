"""Exact resume: a run SIGKILLed (or SIGTERMed) anywhere and resumed ends bit-identical to an
uninterrupted run with the same seed, for full fine-tuning and for LoRA.

Each run is a separate process. To keep this fast, processes are forked from a
multiprocessing forkserver that has already imported torch and diffusers. The kill itself
is test-only fault injection living in this file: the child passes an ``on_event`` hook to
``fastsd.train.train`` that SIGKILLs the process at a given event, or wraps
``fastsd.drive._open_dest`` (the documented test seam of every write) to SIGKILL it while a
checkpoint is being copied into the session. Resumed runs go through the real CLI,
``fastsd train NAME --resume``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

SETTINGS = dict(unet_steps=4, text_steps=3, checkpoint_every=2, keep_checkpoints=1,
                unet_lr=1e-4, text_lr=1e-4, batch_size=2, flip=True, crop="random",
                offset_noise=0.1, min_snr_gamma=5.0, prior_preservation=True,
                class_images=2, class_steps=2)
STEPS = SETTINGS["unet_steps"] + SETTINGS["text_steps"]
# LoRA: adapters on the frozen base, with dropout (draws from the global RNG) on
LORA = {**SETTINGS, "method": "lora", "rank": 4, "alpha": 2.0, "lora_dropout": 0.2,
        "unet_lr": 1e-3, "text_lr": 1e-3}
# What the forkserver imports once, so that each run starts in a fraction of a second.
PRELOAD = ["torch", "accelerate.accelerator", "diffusers.optimization",
           "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
           "transformers.models.clip.modeling_clip", "fastsd.train.trainer"]


def make_subject_session(name: str, root: Path, family: str = "sd1", n: int = 4,
                         size: int = 80):
    """A session with ``n`` pictures of one distinct subject: a red disc with a yellow
    square on it, at different places on a grey, lightly textured background."""
    import numpy as np
    from PIL import Image, ImageDraw

    from fastsd import session

    s = session.create(name, root, base_model=f"tiny-{family}", instance_token="sks",
                       class_word="toy", resolution=64)
    rng = np.random.default_rng(0)
    for i in range(n):
        bg = (200 + rng.normal(0, 6, (size, size, 3))).clip(0, 255).astype("uint8")
        im = Image.fromarray(bg)
        d = ImageDraw.Draw(im)
        x, y = 8 + 5 * i, 12 + 3 * (i % 2)
        d.ellipse((x, y, x + 44, y + 44), fill=(210, 30, 40))
        d.rectangle((x + 14, y + 14, x + 30, y + 30), fill=(250, 220, 30))
        im.save(s.instance_images / f"toy{i}.png")
    return s


# --------------------------------------------------------------------------- child process


def _wait_for_checkpoint(folder: Path, step: int) -> None:
    """Checkpoints are written in the background: a kill meant to land after checkpoint
    ``step`` waits until it is on disk."""
    done = folder / f"step-{step:07d}" / "manifest.json"
    deadline = time.monotonic() + 60
    while not done.is_file() and time.monotonic() < deadline:
        time.sleep(0.02)


def _install_kill(kill: str, checkpoints: Path, start: int) -> object:
    """Test-only fault injection: returns an on_event hook (or None) for ``kill``."""
    what, _, arg = kill.partition(":")
    me = os.getpid()
    if what == "write":  # SIGKILL while the 2nd file of checkpoint step-ARG is being written
        from fastsd import drive

        target, opened = f"step-{int(arg):07d}", []
        real = drive._open_dest

        def open_dest(path, mode="wb"):
            if Path(path).parent.name.endswith(target):
                opened.append(path)
                if len(opened) == 2:
                    os.kill(me, signal.SIGKILL)
            return real(path, mode)

        drive._open_dest = open_dest
        return None
    if what == "export":  # SIGKILL while the trained model is being saved into models/
        import safetensors.torch

        real_save = safetensors.torch.save_file

        def save_file(tensors, filename, *a, **kw):
            if "/models/.fastsd-tmp-" in str(filename):
                _wait_for_checkpoint(checkpoints, start)
                os.kill(me, signal.SIGKILL)
            return real_save(tensors, filename, *a, **kw)

        safetensors.torch.save_file = save_file
        return None

    def hook(event: str, info: dict) -> None:
        hit = ((what in ("step", "sigterm") and event == "step"
                and info["global_step"] == int(arg))
               or (what == "stage_start" and event == "stage_start"
                   and info["stage_name"] == arg))
        if hit and what != "sigterm":
            _wait_for_checkpoint(checkpoints, start)
            os.kill(me, signal.SIGKILL)
        if hit and what == "sigterm":
            os.kill(me, signal.SIGTERM)  # handled: finish the step, checkpoint, exit 143

    return hook


def _child(home: str, name: str, kill: str | None, resume: bool, start: int,
           lora: bool) -> None:
    import sys

    import torch

    torch.set_num_threads(1)  # on a busy machine, threads that wait for each other crawl

    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)d %(levelname)s %(message)s",
                        filename=str(Path(home) / f"{name}.log"))
    os.environ["FASTSD_HOME"] = home
    if resume:
        from fastsd import cli

        sys.exit(cli.main(["train", name, "--resume", "--home", home]))
    from fastsd import session
    from fastsd.train import TrainSettings, train

    s = session.load(name, Path(home))
    hook = _install_kill(kill, s.checkpoints, start) if kill else None
    train(s, TrainSettings(**(LORA if lora else SETTINGS)), on_event=hook)


def run_child(home: Path, name: str, kill: str | None = None, resume: bool = False,
              start: int = 0, lora: bool = False) -> int:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD + [__name__])
    p = ctx.Process(target=_child, args=(str(home), name, kill, resume, start, lora))
    p.start()
    p.join()
    return p.exitcode


# --------------------------------------------------------------------------- checks


def final_tensors(s) -> dict:
    """The tensors of what the run wrote: the model folder (full) or the LoRA file."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted([*(s.models / s.name).rglob("*.safetensors"), *s.loras.glob("*")]):
        for k, v in load_file(f).items():
            out[f"{f.parent.name}/{k}"] = v
    return out


def final_state(s) -> dict:
    from fastsd import drive
    from fastsd.train import checkpoint

    return drive.read_json(checkpoint.latest(s.checkpoints).path / "state.json")


@pytest.fixture(scope="module", params=["full", "lora"])
def reference(request, tmp_path_factory, tiny_root):
    """An uninterrupted run of each method: final weights and final trainer state."""
    from fastsd.models import tiny

    home = tmp_path_factory.mktemp(f"ref-home-{request.param}")
    (home / "models").mkdir()
    (home / "models" / "tiny-sd1").symlink_to(tiny.ensure("sd1", tiny_root))
    s = make_subject_session("ref", home)
    assert run_child(home, "ref", lora=request.param == "lora") == 0
    return final_tensors(s), final_state(s)


CASES = {
    # name: (kill, expected exit code, checkpoint the resume starts from)
    "stage1": ("step:3", -signal.SIGKILL, 2),
    "boundary": ("stage_start:text", -signal.SIGKILL, 4),
    "stage2": ("step:7", -signal.SIGKILL, 6),
    "checkpoint_write": ("write:4", -signal.SIGKILL, 2),
    "sigterm": ("sigterm:3", 128 + signal.SIGTERM, 3),
    "export": ("export", -signal.SIGKILL, 7),
}


LORA_CASES = ["stage2", "checkpoint_write"]  # adapters of both stages; the boundary crossed


@pytest.mark.parametrize("reference,case", [("full", c) for c in CASES]
                         + [("lora", c) for c in LORA_CASES], indirect=["reference"])
def test_killed_run_resumes_bit_identical(case, reference, workspace, tiny_sd1, request):
    from fastsd.train import checkpoint

    lora = request.node.callspec.params["reference"] == "lora"
    kill, code, start = CASES[case]
    (workspace / "models").mkdir()
    (workspace / "models" / "tiny-sd1").symlink_to(tiny_sd1)
    s = make_subject_session(case, workspace)
    assert run_child(workspace, case, kill, start=start, lora=lora) == code
    assert not (s.models / case).exists(), "a killed run must not have exported a model"
    assert not s.loras.exists(), "a killed run must not have written its LoRA"
    if case == "checkpoint_write":  # the half-written checkpoint is there, but not as one
        leftovers = [p.name for p in s.checkpoints.iterdir() if p.name.startswith(".fastsd-tmp")]
        assert leftovers and all("step-0000004" in n for n in leftovers)
    if case == "export":  # the half-written model folder is there, and goes on resume
        assert [p for p in s.models.iterdir() if p.name.startswith(".fastsd-tmp-")]
    if case == "sigterm":
        assert f"'fastsd train {case} --resume'" in (workspace / f"{case}.log").read_text()
    ck = checkpoint.latest(s.checkpoints)
    assert ck.step == start
    if lora:  # a LoRA checkpoint holds the adapters only, and the base model's fingerprint
        from fastsd import models
        from fastsd.train.parts import load_parts
        from fastsd.train.resume import model_fingerprint

        assert all(".lora_A." in k or ".lora_B." in k for sd in ck.tensors.values()
                   for k in sd)
        base = models.stage(models.resolve_model("tiny-sd1", s.workspace))
        assert ck.state["base_model"]["fingerprint"] == model_fingerprint(
            load_parts(base).unet)

    assert run_child(workspace, case, resume=True) == 0
    log = (workspace / f"{case}.log").read_text()
    assert f"Resuming from step-{start:07d}" in log
    if case == "export":
        assert "both stages done; only the export is left" in log
    assert not [p for p in s.models.iterdir() if p.name.startswith(".fastsd-tmp-")]
    ref_tensors, ref_state = reference
    got = final_tensors(s)
    assert got.keys() == ref_tensors.keys()
    different = [k for k in got if not got[k].equal(ref_tensors[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"
    state = final_state(s)
    assert state["global_step"] == ref_state["global_step"] == STEPS
    assert state["losses"] == ref_state["losses"]
    assert state["data_order"] == ref_state["data_order"]
    assert state["class_order"] == ref_state["class_order"]
    assert not [p for p in s.checkpoints.iterdir() if p.name.startswith(".fastsd-tmp")]
    assert len(checkpoint.listing(s.checkpoints)) <= SETTINGS["keep_checkpoints"]
