"""System RAM at real size, against Colab's 12.7 GB: the peak RSS of each operation that
handles a whole full-size model, each in its own process.

Models: random full-size SD 1.5 and SDXL (fastsd.models.full, built once into
$FASTSD_FULL_CACHE from the official configs; fp16 UNets and text encoders as the registry
downloads them). Each operation runs through fastsd's own code in a child process, which
reports its peak resident set (ru_maxrss: every page it touched, the pages of memory-mapped
files included), so the figure is what Colab's memory monitor sees at worst.

Operations: load for generation (the engine with the memory options it chooses on a T4,
every weight read once as moving it to the GPU does) from the diffusers folder and from a
single .safetensors (converted once by the one resolver, then loaded); SDXL to a single file
and back; staging the SDXL folder from a Drive-speed FUSE mount to local disk; training
start-up through the first step and the export at the end (SD 1.5, the T4 preset as far
as a CPU goes: bf16 autocast for fp16, 8-bit AdamW, gradient checkpointing, the caches).
On this CPU the training process is also the "GPU": its peak holds the weights, gradients,
optimizer state and activations a T4 would hold in VRAM, so the row also gives the RSS at
the first step's start (the loaded model and the caches: what stays in system RAM on Colab).

Run: .venv/bin/python benchmarks/bench_real_ram.py [OP ...]  (about 15 minutes; needs
about 20 GB of free disk and 12 GB of free RAM; builds the full-size models on first use)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import Row, child_result, peak_rss_mb, write_result

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

LIMIT_GB = 12.7  # fastsd.env.COLAB_RAM_GB
SDXL_BAR_GB = 11.0  # what the issue holds SDXL to: room for the kernel and the notebook
GB = 1e9


def rss_gb() -> float:
    return peak_rss_mb() * 2**20 / GB


def current_rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / GB


def touch(pipe) -> None:
    """Read every weight once, as pipe.to("cuda") does (loaders leave them memory-mapped)."""
    import torch

    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, name, None)
        if m is not None:
            with torch.no_grad():
                for p in m.parameters():
                    p.float().sum()


def workspace(work: Path, family: str, model: Path):
    """A workspace whose Hub cache holds the family's config files (as a first online run
    leaves it), so single files convert offline."""
    from conftest import cache_family_configs

    from fastsd.workspace import Workspace

    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    cache_family_configs(home, family, model)
    return Workspace(home)


def single_file(work: Path, family: str, model: Path) -> Path:
    """The full-size model as one fp16 .safetensors (made once per run, in the parent)."""
    from fastsd.convert import to_single_file

    out = work / f"{family}.safetensors"
    if not out.is_file():
        to_single_file(model, out, fp16=True)
    return out


# --------------------------------------------------------------------------- child side


def child(op: str, family: str, work: str) -> dict:
    from fastsd import env
    from fastsd.models import full

    work_dir = Path(work)
    model = full.ensure(family)
    t0 = time.perf_counter()
    extra: dict = {}
    if op in ("load-folder", "load-single"):
        from fastsd.webui import memory
        from fastsd.webui.catalog import Catalog
        from fastsd.webui.engine import Engine

        ws = workspace(work_dir, family, model)
        src = model if op == "load-folder" else work_dir / f"{family}.safetensors"
        if op == "load-single":  # converted once by the one resolver, as the engine does
            from fastsd import models

            models.resolve_model(src, ws)
            extra["converted_peak_gb"] = rss_gb()
        policy = memory.MemoryPolicy().resolve(env.COLAB_T4, memory.weights_gib(model))
        catalog = Catalog([])
        engine = Engine(catalog, policy, device="cpu", workspace=ws)
        engine.load(catalog.add(src))
        touch(engine._pipes["base"])
        extra["policy"] = {k: v for k, v in engine.applied.to_dict().items() if v}
    elif op == "to-single":
        from fastsd.convert import to_single_file

        to_single_file(model, work_dir / "out.safetensors", fp16=True)
    elif op == "train":
        extra.update(train_child(family, work_dir, model))
    elif op == "merge":
        extra.update(merge_child(work_dir))
    elif op == "checkpoint":
        extra.update(checkpoint_child(work_dir, model))
    elif op == "resume":
        extra.update(resume_child(model, work_dir.parent / "checkpoints"))
    elif op == "export":
        from fastsd.train.export import export_model, export_single_file
        from fastsd.train.parts import load_parts

        parts = load_parts(model)  # the trained pipeline in fp32, as at the end of a run
        extra["before_gb"] = current_rss_gb()
        export_single_file(export_model(parts, work_dir / "model", "fp16"), 1)
    elif op == "stage":
        from bench_models import Mount

        from fastsd import models

        with Mount(model.parent, work_dir / "mnt") as mnt:
            local = models.local_copy(mnt / model.name, work_dir / "stage", force=True)
        extra["bytes"] = sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
    else:
        raise SystemExit(f"unknown operation {op}")
    return {"peak_gb": rss_gb(), "seconds": time.perf_counter() - t0, **extra}


def train_child(family: str, work: Path, model: Path) -> dict:
    """SD 1.5: training start-up through the first step, stopped there. SDXL (a LoRA): the
    whole run of one step per stage, a checkpoint after each step, and the LoRA file at the
    end (kept for the merge row). Reports the peak and the RSS when the first stage started
    (the model and the caches: what stays in system RAM when a GPU holds the training)."""
    sys.path.insert(0, str(HERE.parent / "tests" / "real"))
    from realsize import T4_ON_CPU, subject_session

    from fastsd.train import TrainSettings, train

    lora = family == "sdxl"  # SDXL trains on a T4 as a LoRA
    home = lora_home(work) if lora else work / "home"
    s = subject_session("ram", home, model, full_resolution(family), n=1)
    out: dict = {}

    def hook(event, info):
        if event == "stage_start":
            out.setdefault("stage_start_gb", current_rss_gb())
            out.setdefault("peak_before_step_gb", rss_gb())  # the load and the caches
        elif event == "step" and not lora:
            finish(out)
    steps = dict(unet_steps=1, text_steps=1, checkpoint_every=1) if lora else \
        dict(unet_steps=2, text_steps=0, checkpoint_every=0)
    r = train(s, TrainSettings(method="lora" if lora else "full", **steps, **T4_ON_CPU),
              on_event=hook)
    if not lora:
        raise SystemExit("the run ended before its first step was measured")
    out["lora_mb"] = r.lora.stat().st_size / 1e6
    return out


def lora_home(work: Path) -> Path:
    """Where the SDXL LoRA row trains, for the merge row after it."""
    return work.parent / "sdxl-lora"


def merge_child(work: Path) -> dict:
    """`fastsd lora merge SESSION --precision fp16` on the session the SDXL LoRA row trained:
    the base loaded in fp16, the LoRA fused in, a diffusers folder and its single file."""
    from fastsd import session
    from fastsd.train.lora_export import merge_session

    folder, single = merge_session(session.load("ram", lora_home(work)), precision="fp16")
    return {"single_gb": single.stat().st_size / GB}


def trained_state(model: Path):
    """An fp32 UNet and its 8-bit AdamW after one step, as the UNet stage holds them at its
    first checkpoint (on a GPU they are in VRAM; here in RAM, counted in the baseline)."""
    import bitsandbytes as bnb
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet",
                                                torch_dtype=torch.float32)
    opt = bnb.optim.AdamW8bit(unet.parameters(), lr=1e-6)
    for p in unet.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return unet, opt


def checkpoint_child(work: Path, model: Path) -> dict:
    """The first checkpoint of the SD 1.5 UNet stage: snapshot, write, read-back check."""
    from fastsd.train import checkpoint

    unet, opt = trained_state(model)
    before = current_rss_gb()
    writer = checkpoint.Writer(background=True)
    writer.save(work.parent / "checkpoints", 1, {"unet": unet.state_dict()},
                {"optimizer": opt.state_dict()}, {"stage": 0}, keep=1)
    writer.wait()
    return {"before_gb": before}


def resume_child(model: Path, checkpoints: Path) -> dict:
    """What a resume holds: the checkpoint found and checked, the fp32 pipeline loaded, the
    checkpoint's weights put into it, the optimizer's state read."""
    from fastsd.train import checkpoint
    from fastsd.train.parts import load_parts

    ckpt = checkpoint.latest(checkpoints)
    parts = load_parts(model)
    parts.load_checkpoint_tensors(ckpt.tensors)
    state = ckpt.objects["optimizer"]
    return {"optimizer_tensors": len(state["state"])}


def full_resolution(family: str) -> int:
    from fastsd.models import full

    return full.CONFIGS[family]["resolution"]


def finish(out: dict) -> None:
    """Report from inside the training loop and leave at once (the rest of the run is not
    what is measured)."""
    print("RESULT " + json.dumps({"peak_gb": rss_gb(), "seconds": 0, **out}), flush=True)
    os._exit(0)


# --------------------------------------------------------------------------- parent side

OPS = [  # (operation, family, what the row says)
    ("load-folder", "sd1", "SD 1.5: load for generation from the diffusers folder"),
    ("load-single", "sd1", "SD 1.5: load for generation from a single .safetensors "
                           "(converted once, then loaded)"),
    ("load-folder", "sdxl", "SDXL: load for generation from the diffusers folder"),
    ("load-single", "sdxl", "SDXL: load for generation from a single .safetensors "
                            "(converted once, then loaded)"),
    ("to-single", "sdxl", "SDXL: diffusers folder to a single file"),
    ("stage", "sdxl", "SDXL: staging the folder from Drive (FUSE, Drive's speed) to local disk"),
    ("train", "sd1", "SD 1.5: training start-up through the first step (T4 preset as far as "
                     "a CPU goes, 512 px; the CPU is the device)"),
    ("train", "sdxl", "SDXL LoRA: a whole run (T4 preset as far as a CPU goes, 1024 px; the "
                      "CPU is the device): load, caches, a UNet and a text-encoder step, a "
                      "checkpoint after each, the LoRA file"),
    ("merge", "sdxl", "SDXL: the LoRA merged into the base (fastsd lora merge, fp16 folder "
                      "and single file)"),
    ("checkpoint", "sd1", "SD 1.5: the UNet stage's first checkpoint (fp32 UNet and 8-bit "
                          "AdamW: snapshot, write, read-back check)"),
    ("resume", "sd1", "SD 1.5: resuming from that checkpoint (fp32 pipeline loaded, the "
                      "checkpoint's weights and optimizer state read)"),
    ("export", "sd1", "SD 1.5: export at the end (fp16 diffusers folder and single file, "
                      "from the fp32 pipeline)"),
]


def main(argv: list[str]) -> None:
    from fastsd.models import full

    only = set(argv)
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="bench-real-ram-") as tmp:
        for op, family, title in OPS:
            if only and op not in only and f"{op}:{family}" not in only:
                continue
            work = Path(tmp) / f"{op}-{family}"
            work.mkdir()
            model = full.ensure(family)
            if op == "load-single":
                os.link(single_file(Path(tmp), family, model), work / f"{family}.safetensors")
            r = child_result(__file__, op, family, str(work))
            shutil.rmtree(work, ignore_errors=True)
            if op == "load-single":  # the only user of the single file: its disk back
                (Path(tmp) / f"{family}.safetensors").unlink()
            if op == "resume":
                shutil.rmtree(Path(tmp) / "checkpoints", ignore_errors=True)
            if op == "merge":
                shutil.rmtree(lora_home(work), ignore_errors=True)
            bar = SDXL_BAR_GB if family == "sdxl" else LIMIT_GB
            # a training row's peak, with the CPU as the device, also holds what a GPU holds
            # in VRAM (the step's activations): held to Colab's limit, not SDXL's margin
            row_bar = LIMIT_GB if op == "train" else bar
            print(f"{title}: {r['peak_gb']:.2f} GB peak RSS, {r['seconds']:.0f} s", flush=True)
            if "converted_peak_gb" in r:  # the conversion alone, before the load
                name = {"sd1": "SD 1.5", "sdxl": "SDXL"}[family]
                rows.append(Row(f"{name}: single file to a diffusers folder (fastsd's "
                                "resolver, the first time a file is loaded)", "GB peak RSS",
                                round(r["converted_peak_gb"], 2), target=f"< {bar:g} GB",
                                higher_is_better=False, passed=r["converted_peak_gb"] < bar))
            if "peak_before_step_gb" in r:  # what a GPU machine's RAM holds at most
                rows.append(Row(f"{title.split(':')[0]}: the load and the caches, up to the "
                                "first step (bounds system RAM on a GPU machine)", "GB peak RSS",
                                round(r["peak_before_step_gb"], 2), target=f"< {bar:g} GB",
                                higher_is_better=False, passed=r["peak_before_step_gb"] < bar))
            rows.append(Row(title, "GB peak RSS", round(r["peak_gb"], 2),
                            target=f"< {row_bar:g} GB", higher_is_better=False,
                            passed=r["peak_gb"] < row_bar))
            if r.get("policy"):
                notes.append(f"{title}: memory options {', '.join(r['policy'])}")
            if "stage_start_gb" in r:
                notes.append(f"{title}: {r['stage_start_gb']:.2f} GB when the stage started "
                             "(the model and the caches; on a GPU the weights, gradients, "
                             "optimizer state and activations counted in the peak are in VRAM)")
            if "lora_mb" in r:
                notes.append(f"{title}: the LoRA file {r['lora_mb']:.0f} MB")
            if "single_gb" in r:
                notes.append(f"{title}: the merged single file {r['single_gb']:.2f} GB")
            if "before_gb" in r:
                notes.append(f"{title}: {r['before_gb']:.2f} GB before it began (the process "
                             "with the weights and optimizer state a GPU would hold), so it "
                             f"adds {r['peak_gb'] - r['before_gb']:.2f} GB")
    write_result(
        "real_ram", "System RAM at real size against Colab's 12.7 GB (peak RSS per operation)",
        rows, command=".venv/bin/python benchmarks/bench_real_ram.py",
        notes="Random full-size models from the official configs (fastsd.models.full), fp16 "
        "as the registry downloads them; each operation in its own process through fastsd's "
        "code; peak RSS = ru_maxrss (pages of memory-mapped files included: an upper bound, as "
        "the kernel can drop those clean file pages instead of killing the process). Colab's free "
        f"runtime has {LIMIT_GB} GB and kills the kernel above it; SDXL is held to "
        f"{SDXL_BAR_GB} GB. Training rows run with this CPU as the device, so their peak "
        "also holds what a GPU holds in VRAM (the step's activations and gradients): they are "
        f"held to {LIMIT_GB} GB, and the row before each (the load and the caches, up to the "
        "first step) bounds what system RAM holds on a GPU machine (here the caches' VAE and "
        "text encoders also run in it). They use bf16 autocast where "
        "a T4 runs fp16 (fp16 autocast of an SDXL step at 1024 px on this CPU went over 22 GB "
        "and was killed), so their base is converted from the fp16 files while a T4's is "
        "not. SDXL trains on a T4 as a "
        "LoRA (a full SDXL fine-tune's fp32 UNet, "
        "gradients and 8-bit AdamW alone take about 41 GB); its export is the adapters' file "
        "alone, written from the adapters in memory. No GPU was lent for this "
        "measurement: benchmarks/gpu_check.py's GPU figures are still to be measured (its "
        "dry run runs in make test). " + "; ".join(notes))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print("RESULT " + json.dumps(child(*sys.argv[2:5])), flush=True)
    else:
        main(sys.argv[1:])
