"""Exact resume: a run SIGKILLed (or SIGTERMed) anywhere and resumed ends bit-identical to an
uninterrupted run with the same seed, for full fine-tuning and for LoRA; so does a further
segment ("more UNet steps" on the trained model), and the intermediate files are the same
and are not written again.

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
                class_images=2, class_steps=2, save_every=3)
STEPS = SETTINGS["unet_steps"] + SETTINGS["text_steps"]
# each method's settings over SETTINGS; LoRA: adapters on the frozen base, with dropout
# (draws from the global RNG) on
METHODS = {"full": {}, "lora": {"method": "lora", "rank": 4, "alpha": 2.0,
                                "lora_dropout": 0.2, "unet_lr": 1e-3, "text_lr": 1e-3}}
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

    from conftest import tiny_session

    s = tiny_session(name, root, family, instance_token="sks", class_word="toy", resolution=64)
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


def wait_for_checkpoint(folder: Path, step: int, timeout: float = 60.0) -> None:
    """Checkpoints are written in the background: a kill meant to land after checkpoint
    ``step`` waits until it is on disk. When it is not there by the deadline the kill would
    land somewhere else, so this raises (and logs) instead of going on."""
    done = folder / f"step-{step:07d}" / "manifest.json"
    deadline = time.monotonic() + timeout
    while not done.is_file():
        if time.monotonic() > deadline:
            message = (f"checkpoint step-{step:07d} was not on disk {timeout:.0f}s after it "
                       f"was due ({done} is missing): the kill would not land where the "
                       "test means it to")
            logging.getLogger("fastsd").error(message)
            raise TimeoutError(message)
        time.sleep(0.02)


def _install_kill(kill: str, checkpoints: Path, start: int) -> object:
    """Test-only fault injection: returns an on_event hook (or None) for ``kill``."""
    what, _, arg = kill.partition(":")
    me = os.getpid()
    if what == "drop":  # Drive (the FUSE stand-in) drops mid-copy of the file named ARG
        from test_colab_drive import kill_after_writes

        from fastsd import drive

        real, cut = drive._open_dest, kill_after_writes(1)

        def open_dest(path, mode="wb"):
            hit = drive.is_temporary(path) and Path(path).name.endswith("-" + arg)
            return cut(path, mode) if hit and drive.on_drive(path) else real(path, mode)

        drive._open_dest = open_dest
        drive.DEFAULT_DELAY = 0.05  # Drive stays down: give up after 5 quick tries
        return None
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
                wait_for_checkpoint(checkpoints, start)
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
            wait_for_checkpoint(checkpoints, start)
            os.kill(me, signal.SIGKILL)
        if hit and what == "sigterm":
            os.kill(me, signal.SIGTERM)  # handled: finish the step, checkpoint, exit 143

    return hook


def _child(home: str, name: str, kill: str | None, resume: bool, start: int,
           logs: str, env: dict, settings: dict, more: int = 0) -> None:
    import sys

    import torch

    torch.set_num_threads(1)  # on a busy machine, threads that wait for each other crawl

    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)d %(levelname)s %(message)s",
                        filename=str(Path(logs) / f"{name}.log"))
    os.environ["FASTSD_HOME"] = home
    for k, v in env.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    hook = _install_kill(kill, Path(home) / "sessions" / name / "checkpoints", start) \
        if kill else None
    if resume:
        from fastsd import cli

        sys.stderr = open(Path(logs) / f"{name}.err", "a")  # what the user reads
        sys.exit(cli.main(["train", name, "--resume", "--home", home]))
    from fastsd import session
    from fastsd.errors import FastSDError
    from fastsd.train import TrainSettings, train

    s = session.load(name, Path(home))
    try:
        train(s, TrainSettings(**{**SETTINGS, **settings}), on_event=hook,
              more_unet_steps=more)
    except FastSDError as e:  # shown as its message, as the notebook and the CLI do
        (Path(logs) / f"{name}.err").write_text(f"error: {e}\n")
        sys.exit(2)


def run_child(home: Path, name: str, kill: str | None = None, resume: bool = False,
              start: int = 0, logs: Path | None = None, env: dict | None = None,
              settings: dict | None = None, more: int = 0) -> int:
    """Train (or resume) session ``name`` in a child process, with ``settings`` over
    :data:`SETTINGS` (``more``: that many more UNet steps on its trained model); its log and
    the message of a FastSDError go to ``logs`` (default ``home``): NAME.log, NAME.err."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD + [__name__])
    p = ctx.Process(target=_child, args=(str(home), name, kill, resume, start,
                                         str(logs or home), env or {}, settings or {}, more))
    p.start()
    p.join()
    return p.exitcode


def log_tail(home: Path, name: str, lines: int = 20) -> str:
    """The end of a child's log, for the message of a failed exit-code check."""
    log = home / f"{name}.log"
    return "\n".join(log.read_text().splitlines()[-lines:]) if log.is_file() else "(no log)"


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


def intermediate_files(s) -> list[Path]:
    """The intermediate files of a session: single files of its model, or LoRA files."""
    return sorted([*s.models.glob(f"{s.name}-step*.safetensors"),
                   *s.loras.glob(f"{s.name}-step*.safetensors")])


def single_files(s) -> dict[str, object]:
    """The intermediate files of a session, by step: a single file's bytes; a LoRA file's
    tensors (its metadata names the session)."""
    from safetensors.torch import load_file

    def content(p: Path):
        if p.parent == s.models:
            return p.read_bytes()
        return {k: v.numpy().tobytes() for k, v in load_file(p).items()}
    return {p.name.rsplit("-", 1)[1]: content(p) for p in intermediate_files(s)}


@pytest.fixture(scope="module")
def references(tmp_path_factory, tiny_root):
    """Uninterrupted runs, one per method (made when first asked for): (workspace, final
    weights, final trainer state, the single file (full fine-tuning; None for LoRA), the
    intermediate files)."""
    from fastsd.models import tiny

    made = {}

    def of(method: str) -> tuple:
        if method not in made:
            home = tmp_path_factory.mktemp(f"ref-home-{method}")
            (home / "models").mkdir()
            (home / "models" / "tiny-sd1").symlink_to(tiny.ensure("sd1", tiny_root))
            s = make_subject_session("ref", home)
            assert run_child(home, "ref", settings=METHODS[method]) == 0, log_tail(home, "ref")
            made[method] = (home, final_tensors(s), final_state(s),
                            single_file(s) if method == "full" else None, single_files(s))
        return made[method]

    return of


@pytest.fixture(scope="module")
def reference_home(references) -> Path:
    """The workspace of the uninterrupted full fine-tuning run (session "ref")."""
    return references("full")[0]


@pytest.fixture(scope="module")
def reference(references):
    """The uninterrupted full run: final weights, final trainer state, its single file,
    intermediate files."""
    return references("full")[1:]


def single_file(s) -> dict:
    from safetensors.torch import load_file

    return load_file(s.models / f"{s.name}.safetensors")


CASES = {
    # name: (kill, expected exit code, checkpoint the resume starts from)
    "stage1": ("step:3", -signal.SIGKILL, 2),  # resumed with the workspace at another path
    "boundary": ("stage_start:text", -signal.SIGKILL, 4),
    "stage2": ("step:7", -signal.SIGKILL, 6),
    "checkpoint_write": ("write:4", -signal.SIGKILL, 2),
    "sigterm": ("sigterm:3", 128 + signal.SIGTERM, 3),
    "export": ("export", -signal.SIGKILL, 7),
}


LORA_CASES = ["stage2", "checkpoint_write"]  # adapters of both stages; the boundary crossed


@pytest.mark.parametrize("method,case", [("full", c) for c in CASES]
                         + [("lora", c) for c in LORA_CASES])
def test_killed_run_resumes_bit_identical(method, case, references, workspace, tiny_sd1):
    from fastsd import session
    from fastsd.train import checkpoint

    lora = method == "lora"
    kill, code, start = CASES[case]
    kept = {}  # an intermediate file written before the kill, and what it was then
    (workspace / "models").mkdir()
    (workspace / "models" / "tiny-sd1").symlink_to(tiny_sd1)
    s = make_subject_session(case, workspace)
    assert run_child(workspace, case, kill, start=start, settings=METHODS[method]) == code, \
        log_tail(workspace, case)
    assert not (s.models / case).exists(), "a killed run must not have exported a model"
    assert not (s.loras / f"{case}.safetensors").exists(), \
        "a killed run must not have written its LoRA"
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
        base = models.local_copy(models.resolve_model("tiny-sd1", s.workspace))
        assert ck.state["base_model"]["fingerprint"] == model_fingerprint(
            load_parts(base).unet)
    for p in intermediate_files(s):  # written after the checkpoint resumed
        if int(p.stem.rsplit("step", 1)[1]) > start:
            kept[p] = p.stat().st_mtime_ns, p.stat().st_ino

    if case == "stage1":  # a new runtime: Drive mounted at another path, the model loaded
        moved = workspace.with_name("moved-home")  # from a folder of another name
        workspace = workspace.rename(moved)
        s = session.load(case, workspace)
    assert run_child(workspace, case, resume=True) == 0, log_tail(workspace, case)
    log = (workspace / f"{case}.log").read_text()
    assert f"Resuming from step-{start:07d}" in log
    if case == "export":
        assert "both stages done; only the export is left" in log
    assert not [p for p in s.models.iterdir() if p.name.startswith(".fastsd-tmp-")]
    ref_tensors, ref_state, _, ref_files = references(method)[1:]
    assert single_files(s) == ref_files and sorted(ref_files) == ["step3.safetensors",
                                                                   "step6.safetensors"]
    assert {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in kept} == kept, \
        "an intermediate file written before the kill was written again"
    if case == "checkpoint_write":  # step 3 ran after checkpoint 2 and before the kill
        assert [p.name for p in kept] == [f"{case}-step3.safetensors"]
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


# --------------------------------------------------------------------------- segments

MORE = 3  # more UNet steps on the trained model, after both stages ran


def copy_session(home: Path, src: str, dst: str) -> object:
    """A copy of session ``src`` as ``dst``, its trained model named after it."""
    import shutil

    from fastsd import session

    shutil.copytree(home / "sessions" / src, home / "sessions" / dst, symlinks=True)
    models = home / "sessions" / dst / "models"
    (models / src).rename(models / dst)
    (models / f"{src}.safetensors").rename(models / f"{dst}.safetensors")
    for p in models.glob(f"{src}-step*.safetensors"):
        p.rename(models / p.name.replace(src, dst, 1))
    return session.load(dst, home)


@pytest.fixture(scope="module")
def segment_reference(reference_home):
    """The reference run, then MORE UNet steps on its trained model, uninterrupted."""
    s = copy_session(reference_home, "ref", "more_ref")
    assert run_child(reference_home, "more_ref", more=MORE) == 0, \
        log_tail(reference_home, "more_ref")
    return final_tensors(s), final_state(s), single_files(s)


def test_a_further_segment_killed_and_resumed_is_bit_identical(segment_reference, reference,
                                                               reference_home):
    """A segment of MORE UNet steps after the text encoder stage: SIGKILLed mid-segment
    (after its first checkpoint) and resumed with `fastsd train NAME --resume`, it ends
    bit-identical to the uninterrupted segment; the checkpoints and files it writes go on
    from the run's last global step; the text encoder stays the trained model's."""
    from fastsd import session
    from fastsd.train import checkpoint, segments

    s = copy_session(reference_home, "ref", "more_kill")
    first = STEPS + 1  # the segment's first checkpoint (steps STEPS+1 .. STEPS+MORE)
    assert run_child(reference_home, "more_kill", f"step:{first + 1}", start=first,
                     more=MORE) == -signal.SIGKILL, log_tail(reference_home, "more_kill")
    assert [c.step for c in checkpoint.listing(s.checkpoints)] == [first]
    assert run_child(reference_home, "more_kill", resume=True) == 0, \
        log_tail(reference_home, "more_kill")
    assert f"Resuming from step-{first:07d}" in (reference_home / "more_kill.log").read_text()

    ref_tensors, ref_state, ref_files = segment_reference
    got = final_tensors(s)
    assert got.keys() == ref_tensors.keys()
    assert not [k for k in got if not got[k].equal(ref_tensors[k])]
    state = final_state(s)
    assert state["global_step"] == ref_state["global_step"] == STEPS + MORE
    assert state["losses"] == ref_state["losses"] and len(state["losses"]) == MORE
    assert single_files(s) == ref_files
    assert sorted(ref_files) == ["step3.safetensors", "step6.safetensors", "step9.safetensors"]
    before = reference[0]  # the trained model the segment started from
    assert {k.split("/")[0] for k in got if not got[k].equal(before[k])} == {"unet"}
    history = segments.history(session.load("more_kill", reference_home))
    assert [(h["base"], h["from_step"], h["to_step"]) for h in history] == [
        ("tiny-sd1", 0, STEPS), (segments.TRAINED, STEPS, STEPS + MORE)]


def test_drive_drops_mid_sample_and_mid_single_file_end_in_a_message_then_resume(
        references, tmp_path, monkeypatch, tiny_sd1):
    """Drive (the real FUSE stand-in, mounted where fastsd did not mount it: a local Jupyter's
    Drive, or Colab's at another path, which fastsd cannot remount) drops while a sample
    image is copied to it, then, in the resumed run, while the single .safetensors is: each
    run ends in one message, the next run after Drive is back goes on, leaves no temporary
    on Drive and ends bit-identical to an uninterrupted run."""
    from PIL import Image

    from conftest import colab_module
    from fastsd import session

    standin = colab_module("standin")
    monkeypatch.setenv("COLAB_STANDIN_BACKING", str(tmp_path / "backing"))
    mount, logs = tmp_path / "drive", tmp_path / "logs"
    logs.mkdir()
    env = {"COLAB_STANDIN_BACKING": str(tmp_path / "backing"), "COLAB_RELEASE_TAG": None}
    standin.start(mount)
    try:
        home = mount / "MyDrive" / "Fast-Dreambooth"
        (home / "models").mkdir(parents=True)
        (home / "models" / "tiny-sd1").symlink_to(tiny_sd1)
        make_subject_session("drops", home)
        samples = {"sample_every": 3, "sample_steps": 2}

        def run(kill, resume):
            code = run_child(home, "drops", kill, resume=resume, logs=logs, env=env,
                             settings=samples)
            out = (logs / "drops.err").read_text() if (logs / "drops.err").exists() else ""
            (logs / "drops.err").unlink(missing_ok=True)  # (progress bars are there too)
            assert "Traceback" not in out, out
            err = "\n".join(ln for ln in out.splitlines() if ln.startswith("error:"))
            if kill:  # the next run: Drive is back
                standin.unmount(mount)
                standin.start(mount)
            return code, err

        code, err = run("drop:step-0000003-0.png", resume=False)
        assert code == 2 and err.count("error:") == 1, err  # a FastSDError, not a traceback
        assert "step-0000003-0.png" in err and "re-run the Drive cell" in err, err
        code, err = run("drop:drops.safetensors", resume=True)
        assert code == 2 and err.count("error:") == 1, err
        assert "drops.safetensors" in err and "re-run the Drive cell" in err, err
        assert run(None, resume=True) == (0, "")
        s = session.load("drops", home)
        assert [p for p in home.rglob(".fastsd-tmp-*")] == [], "temporaries left on Drive"
        ref_tensors, ref_state, ref_single, _ = references("full")[1:]
        got = final_tensors(s)
        assert got.keys() == ref_tensors.keys()
        assert not [k for k in got if not got[k].equal(ref_tensors[k])], "not bit-identical"
        single = single_file(s)
        assert single.keys() == ref_single.keys()
        assert all(single[k].equal(ref_single[k]) for k in single)
        assert final_state(s)["losses"] == ref_state["losses"]
        shots = sorted((s.outputs / "samples").glob("*.png"))
        assert [p.name for p in shots] == ["step-0000003-0.png", "step-0000006-0.png"]
        for p in shots:
            with Image.open(p) as im:
                im.verify()
    finally:
        standin.unmount(mount)


# --------------------------------------------------------------------------- base model


def _unet_copy(src: Path, dest: Path, **config):
    """The UNet of ``src`` loaded from a copy in ``dest`` whose config.json has ``config``
    merged in (a value of None removes the key)."""
    import json
    import shutil

    from diffusers import UNet2DConditionModel

    shutil.copytree(src / "unet", dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(config)
    (dest / "config.json").write_text(json.dumps({k: v for k, v in cfg.items()
                                                  if v is not None}))
    return UNet2DConditionModel.from_pretrained(dest)


def test_the_base_model_fingerprint_is_its_weights_not_where_it_was_loaded(tiny_sd1,
                                                                            tmp_path):
    import torch

    from fastsd.train import resume

    a = _unet_copy(tiny_sd1, tmp_path / "staged-a")
    # another folder, another diffusers (which lacks an option whose default it has)
    b = _unet_copy(tiny_sd1, tmp_path / "gdrive-b", _diffusers_version="0.30.0", dropout=None)
    assert a.config._name_or_path != b.config._name_or_path
    assert resume._scheme1_fingerprint(a) != resume._scheme1_fingerprint(b), \
        "the earlier fingerprint counted the folder and the version"
    fa, fb = resume.model_fingerprint(a), resume.model_fingerprint(b)
    assert fa == fb and fa.startswith(f"{resume.FINGERPRINT_SCHEME}:")
    with torch.no_grad():  # other weights: one layer fine-tuned
        b.conv_out.weight += 1e-3 * torch.randn_like(b.conv_out.weight)
    assert resume.model_fingerprint(b) != fa
    c = _unet_copy(tiny_sd1, tmp_path / "c", upcast_attention=True)  # another structure
    assert resume.model_fingerprint(c) != fa


def test_the_fingerprint_of_a_tensor_over_2_24_values():
    """SDXL's UNet has tensors of more than 2**24 values, past float32's exact integers:
    the sampled indices stay inside the tensor, and its last value still counts."""
    import torch

    from fastsd.train import resume

    class Big(torch.nn.Module):
        config = {"sample_size": 128}

        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.zeros(2**24 * 7 // 4, dtype=torch.int8))

    m = Big()
    before = resume.model_fingerprint(m)
    m.w[-1] = 1
    assert resume.model_fingerprint(m) != before


def test_a_checkpoint_of_the_earlier_fingerprint_resumes(tiny_sd1, tmp_path, caplog):
    from fastsd.errors import ModelError
    from fastsd.train import resume

    then = _unet_copy(tiny_sd1, tmp_path / "then")  # loaded by the earlier fastsd
    now = _unet_copy(tiny_sd1, tmp_path / "now")
    old = {"name": "tiny-sd1", "fingerprint": resume._scheme1_fingerprint(then)}
    fingerprint = resume.model_fingerprint(now)
    with caplog.at_level(logging.INFO, logger="fastsd"):
        resume.check_base_model(old, "tiny-sd1", fingerprint)
    assert "written by an earlier fastsd" in caplog.text and "cannot be compared" in caplog.text
    caplog.clear()
    same_place = {"name": "tiny-sd1", "fingerprint": resume._scheme1_fingerprint(now)}
    with caplog.at_level(logging.INFO, logger="fastsd"):
        resume.check_base_model(same_place, "tiny-sd1", fingerprint)
    assert "matches when computed the old way" in caplog.text
    with pytest.raises(ModelError, match="now names 'other'.*earlier fastsd"):
        resume.check_base_model(old, "other", fingerprint)
    with pytest.raises(ModelError, match="'tiny-sd1' now holds other weights"):
        resume.check_base_model({"name": "tiny-sd1", "fingerprint": "2:0123456789abcdef"},
                                "tiny-sd1", fingerprint)
    with pytest.raises(ModelError, match="newer fastsd"):
        resume.check_base_model({"name": "tiny-sd1", "fingerprint": "9:0123456789abcdef"},
                                "tiny-sd1", fingerprint)
