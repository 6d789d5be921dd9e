"""UNet-stage steps/s: fastsd's trainer against a plain diffusers DreamBooth loop, with the
gain attributed.

The baseline does what diffusers' examples/dreambooth/train_dreambooth.py does with the text
encoder frozen: at every step it loads and transforms the batch's images, tokenizes the
prompts, encodes the pixels with the VAE and the prompts with the text encoder, then runs
the UNet forward and backward and an AdamW step. fastsd encodes each image once and each
caption once before the loop. Four loop variants at the tiny model's native 64 px, same
model, images, batch size and step count:

* baseline, plain AdamW (torch's default implementation: a loop over the tensors on the
  CPU, for-each kernels on CUDA);
* baseline with the fused AdamW kernel: the optimizer alone;
* fastsd with plain AdamW: caching alone;
* fastsd with the fused AdamW kernel: both;
* fastsd with the fused kernel stepping each tensor, not one flat buffer.

fastsd with and without the fused kernel is the optimizer alone in fastsd's own loop: the
measurement behind ``fused_adam``'s default (wall and CPU time of the loop; CPU time counts
only the time the process ran, steadier on a shared machine). fastsd with and without the
flat buffer (fastsd.train.flat: the UNet's weights, gradients and moments each one tensor)
is the buffer alone.

Plus the whole process, from the command to a trained model on disk, for the same number
of steps: ``fastsd train`` (the fused kernel; model load, caches, training, export of the
diffusers folder and the single file) against the baseline script (model load, training,
``save_pretrained`` of the pipeline). Each run is its own process, alternately; best of
the repeats. CPU here; both sides use accelerate the same way.

The notes carry a T4 VRAM estimate for SD 1.5 at 512 px with the T4 preset, with its
derivation: an estimate, until a T4 measures it.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Row, child_result, write_result

STEPS = 20
BATCH = 2
RES = 64  # the tiny model's native resolution
N_IMAGES = 8
REPEATS = 3
LR = 1e-5
SD15_UNET = dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64)


def make_session(home: Path, res: int = RES):
    """A session with N_IMAGES crops of the scikit-image samples, on the tiny SD 1.x."""
    from fastsd import session
    from fastsd.dataset import samples

    s = session.create("bench", home, base_model="tiny-sd1", class_word="cat", resolution=res)
    base = [samples.load(n).convert("RGB") for n in ("chelsea", "astronaut", "coffee", "rocket")]
    for i in range(N_IMAGES):
        im, d = base[i % len(base)], 6 * (i // len(base))
        im.crop((d, d, im.width - d, im.height - d)).resize((96, 96)).save(
            s.instance_images / f"img{i}.png")
    return s


# --------------------------------------------------------------------------- the two sides


def run_ours(home: Path, fused: bool, flat: bool = True) -> dict:
    from diffusers import StableDiffusionPipeline  # noqa: F401  (imported before the clock)

    from fastsd import session
    from fastsd.train import flat as flat_buffer
    from fastsd.train import TrainSettings
    from fastsd.train.trainer import train

    if not flat:  # torch's AdamW on each tensor: no trained weights are small enough
        flat_buffer.MAX_BYTES = 0
    s = session.load("bench", home)
    marks: dict[str, float] = {}
    t0 = time.perf_counter()

    def hook(event: str, info: dict) -> None:
        if event == "stage_start":
            marks["start"], marks["start_cpu"] = time.perf_counter(), time.process_time()
        if event == "step" and info["stage_step"] == STEPS:
            marks["end"], marks["end_cpu"] = time.perf_counter(), time.process_time()

    train(s, TrainSettings(unet_steps=STEPS, text_steps=0, unet_lr=LR, unet_schedule="constant",
                           batch_size=BATCH, resolution=RES, checkpoint_every=0,
                           fused_adam=fused), restart=True, on_event=hook)
    return {"loop_s": marks["end"] - marks["start"], "setup_s": marks["start"] - t0,
            "loop_cpu_s": marks["end_cpu"] - marks["start_cpu"]}


def run_baseline(home: Path, fused: bool, save: Path | None = None) -> dict:
    """A plain diffusers DreamBooth loop (UNet trained, text encoder frozen); ``save``: the
    trained pipeline is saved there at the end, as the example script does."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    from fastsd import models, session

    t0 = time.perf_counter()
    res = RES
    s = session.load("bench", home)
    model = models.resolve_model("tiny-sd1", home)
    tokenizer = CLIPTokenizer.from_pretrained(model / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model / "text_encoder")
    vae = AutoencoderKL.from_pretrained(model / "vae")
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    noise_scheduler = DDPMScheduler.from_pretrained(model / "scheduler")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LR, weight_decay=1e-2, fused=fused)
    lr_scheduler = get_scheduler("constant", optimizer)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    paths = sorted(s.instance_images.glob("*.png"))
    prompt = "sks cat"
    torch.manual_seed(42)

    def example(i: int) -> dict:  # DreamBoothDataset.__getitem__: open, resize, crop, tokenize
        im = Image.open(paths[i % len(paths)]).convert("RGB")
        w, h = im.size
        sc = res / min(w, h)
        im = im.resize((round(w * sc), round(h * sc)), Image.Resampling.BILINEAR)
        left, top = (im.width - res) // 2, (im.height - res) // 2
        im = im.crop((left, top, left + res, top + res))
        px = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)
        ids = tokenizer(prompt, truncation=True, padding="max_length",
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        return {"pixel_values": px / 127.5 - 1, "input_ids": ids}

    start, start_cpu = time.perf_counter(), time.process_time()
    for step in range(STEPS):
        batch = [example(step * BATCH + k) for k in range(BATCH)]
        pixel_values = torch.stack([b["pixel_values"] for b in batch])
        input_ids = torch.cat([b["input_ids"] for b in batch])
        latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps,
                                  (latents.shape[0],))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(input_ids)[0]
        pred = unet(noisy, timesteps, encoder_hidden_states).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    out = {"loop_s": time.perf_counter() - start, "setup_s": start - t0,
           "loop_cpu_s": time.process_time() - start_cpu}
    if save is not None:
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.from_pretrained(model, unet=accelerator.unwrap_model(unet),
                                                text_encoder=text_encoder, vae=vae
                                                ).save_pretrained(save)
    return out


#: the loop variants: (side, fused AdamW, and for fastsd one flat buffer)
VARIANTS = {"baseline": ("baseline", False, False), "baseline_fused": ("baseline", True, False),
            "ours_plain": ("ours", False, True), "ours_tensors": ("ours", True, False),
            "ours": ("ours", True, True)}


def child(kind: str, home: Path) -> None:
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # the same on every side; steadier on a shared machine
    if kind == "baseline_whole":
        out = run_baseline(home, True, save=home / "baseline-model")
    else:
        side, fused, flat = VARIANTS[kind]
        out = run_ours(home, fused, flat) if side == "ours" else run_baseline(home, fused)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def run_child(kind: str, home: Path) -> dict:
    return child_result(__file__, kind, str(home))


def whole_process(kind: str, home: Path) -> float:
    """Seconds from the command to a trained model on disk."""
    cmd = ([sys.executable, "-m", "fastsd.cli", "train", "bench", "--restart", "--unet-steps",
            str(STEPS), "--text-steps", "0", "--unet-lr", str(LR), "--unet-schedule",
            "constant", "--batch-size", str(BATCH), "--resolution", str(RES),
            "--checkpoint-every", "0", "--home", str(home)] if kind == "ours"
           else [sys.executable, __file__, "--child", "baseline_whole", str(home)])
    t0 = time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- VRAM estimate


def measure_sd15_activations() -> dict[str, float]:
    """GiB of tensors autograd saves in one 512 px forward of the SD 1.5 UNet (16-bit),
    without and with gradient checkpointing' peak, on the meta device."""
    from fastsd.train import activations

    return activations.measure("sd1", 512)


def t4_estimate(act: dict) -> tuple[float, str]:
    from fastsd.env import GIB, DeviceInfo
    from fastsd.train import settings as S

    st, preset = S.resolve(S.TrainSettings(), DeviceInfo("cuda", "Tesla T4", 14.7, 15.0,
                                                         (7, 5)), 512)
    te = 123_060_480  # SD 1.5's CLIP ViT-L/14 text encoder
    est = S.estimate_vram_gib(st, "sd1", {"unet": act["params"], "text_encoder": te})
    u = act["params"]
    acts = (S.ACTIVATION_BYTES_512["sd1"] / GIB * S.BACKWARD_FACTOR * S.CHECKPOINTED_FRACTION)
    note = (
        f"**T4 VRAM estimate, SD 1.5 at 512 px, T4 preset** ({preset}: fp16 mixed precision, "
        f"8-bit AdamW, gradient checkpointing, batch 1; VAE and text encoder leave the GPU "
        f"once the caches are built): UNet stage **{est['unet']:.1f} GiB**, text encoder "
        f"stage {est['text']:.1f} GiB, under the T4's 15 GiB. Derivation, UNet stage: "
        f"{u / 1e6:.1f} M UNet parameters (counted on the meta device) x (4 B fp32 weights + "
        f"4 B fp32 gradients + 2 B 8-bit Adam moments + 2 B fp16 autocast copies) = "
        f"{u * 12 / GIB:.2f} GiB; activations: autograd keeps {act['saved_gib']:.2f} GiB in a "
        f"512 px fp16 forward (measured on the meta device by a saved-tensors hook, without "
        f"the {act['attn_matrices_gib']:.1f} GiB of L x L attention matrices that SDPA's "
        f"memory-efficient kernel does not store, nor views of the weights); with "
        f"checkpointing, block inputs {act['ckpt_inputs_gib']:.2f} GiB + the largest block "
        f"recomputed {act['largest_block_gib']:.2f} GiB, a fraction "
        f"{(act['ckpt_inputs_gib'] + act['largest_block_gib']) / act['saved_gib']:.2f} of it "
        f"(the estimate uses {S.CHECKPOINTED_FRACTION}, for margin, on its stored "
        f"{S.ACTIVATION_BYTES_512['sd1'] / GIB:.2f} GiB), "
        f"x {S.BACKWARD_FACTOR} for backward temporaries = {acts:.2f} GiB; plus "
        f"{S.CUDA_OVERHEAD_GIB} GiB CUDA context and workspace. Text encoder stage: the frozen "
        f"UNet in fp32 ({u * 4 / GIB:.2f} GiB) + {te / 1e6:.0f} M text encoder parameters x 12 B "
        f"+ the same activations and overhead. An estimate, not a measurement on a T4.")
    return est["unet"], note


def sd15_flop_shares() -> dict[str, float]:
    """What caching can save on the real SD 1.5 at 512 px, counted in FLOPs on the meta
    device: the VAE encode and the text encoder against the UNet's forward and backward."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    def flops(fn) -> float:
        with FlopCounterMode(display=False) as m:
            fn()
        return m.get_total_flops() / 1e12

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                          num_hidden_layers=12, num_attention_heads=12))
    m = {"device": "meta"}
    with torch.no_grad():
        u = flops(lambda: unet(torch.randn(1, 4, 64, 64, **m), torch.tensor([500], **m),
                               torch.randn(1, 77, 768, **m)))
        v = flops(lambda: vae.encode(torch.randn(1, 3, 512, 512, **m)))
        t = flops(lambda: te(torch.zeros(1, 77, dtype=torch.long, **m)))
    return {"unet_fwd": u, "vae": v, "te": t, "ideal": (3 * u + v + t) / (3 * u),
            "ideal_ckpt": (4 * u + v + t) / (4 * u)}


def main() -> None:
    from fastsd.models import tiny

    runs: dict[str, list[dict]] = {k: [] for k in VARIANTS}
    whole: dict[str, list[float]] = {"ours": [], "baseline": []}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        home = Path(tmp)
        tiny.ensure("sd1", home / "models")
        make_session(home)
        for _ in range(REPEATS):
            for kind in VARIANTS:
                runs[kind].append(run_child(kind, home))
                print(kind, runs[kind][-1], flush=True)
            for kind in whole:
                whole[kind].append(whole_process(kind, home))
                print("whole", kind, whole[kind][-1], flush=True)

    def sps(kind: str, clock: str = "loop_s") -> float:
        return STEPS / min(r[clock] for r in runs[kind])

    rss = {k: max(r["peak_rss_mb"] for r in runs[k]) for k in ("ours", "baseline_fused")}
    setup = {k: min(r["setup_s"] for r in runs[k]) for k in ("ours", "baseline_fused")}
    act = measure_sd15_activations()
    est, note = t4_estimate(act)
    fl = sd15_flop_shares()
    rows = [
        Row(f"caching alone (plain AdamW both sides), {RES} px", "steps/s",
            round(sps("ours_plain"), 2), round(sps("baseline"), 2)),
        Row(f"fused AdamW alone (re-encoding both sides), {RES} px", "steps/s",
            round(sps("baseline_fused"), 2), round(sps("baseline"), 2)),
        Row(f"fused AdamW alone in fastsd's loop (caching both sides), {RES} px", "steps/s",
            round(sps("ours"), 2), round(sps("ours_plain"), 2)),
        Row(f"fused AdamW alone in fastsd's loop, CPU time of the loop, {RES} px", "steps/CPU s",
            round(sps("ours", "loop_cpu_s"), 2), round(sps("ours_plain", "loop_cpu_s"), 2)),
        Row(f"one flat buffer alone in fastsd's loop (fused AdamW both sides), {RES} px",
            "steps/s", round(sps("ours"), 2), round(sps("ours_tensors"), 2)),
        Row(f"caching with fused AdamW on both sides, {RES} px", "steps/s",
            round(sps("ours"), 2), round(sps("baseline_fused"), 2)),
        Row(f"both (fastsd) vs neither (plain baseline), {RES} px", "steps/s",
            round(sps("ours"), 2), round(sps("baseline"), 2)),
        Row(f"whole process, command to trained model on disk, {STEPS} steps", "s",
            round(min(whole["ours"]), 2), round(min(whole["baseline"]), 2),
            higher_is_better=False),
        Row(f"peak RSS, {RES} px (fused both sides)", "MB", round(rss["ours"]),
            round(rss["baseline_fused"]), higher_is_better=False),
        Row("setup before the first step (model load; ours: + caches)", "s",
            round(setup["ours"], 2), round(setup["baseline_fused"], 2), higher_is_better=False),
    ]
    notes = (
        f"Tiny SD 1.x model at its native {RES} px, {N_IMAGES} images, batch {BATCH}, {STEPS} "
        f"UNet steps, CPU; best of {REPEATS} alternating runs per variant, each in its own "
        "process. Each row compares two variants that differ in one thing, named in the row: "
        "caching (fastsd encodes each image and caption once; the baseline re-reads, "
        "re-encodes with the VAE and re-embeds with the text encoder every batch, as "
        "diffusers' train_dreambooth.py does), the optimizer (torch's fused AdamW kernel "
        "against its default AdamW, a loop over the tensors on the CPU) or fastsd's flat "
        "buffer (the UNet's weights, gradients and AdamW moments each one tensor, so that "
        "clipping, the step and zeroing are a call each, not one per tensor; fastsd's loop "
        "uses it in every variant but the one named). The whole-process row times `fastsd train` "
        "(load, caches, training, diffusers folder and single file written) against the "
        "baseline script (load, training, save_pretrained), each from its command to its "
        "exit. At 64 px every tensor of the tiny UNet is small, so a step is mostly "
        "per-operation overhead, unlike a real model on a GPU.\n\n"
        "**What caching can give on SD 1.5 at 512 px** (FLOPs counted on the meta device): the "
        f"UNet forward is {fl['unet_fwd']:.2f} TFLOP, the VAE encode {fl['vae']:.2f} and the "
        f"text encoder {fl['te']:.3f} per image, so not re-encoding saves at most "
        f"{fl['ideal']:.2f}x (forward + backward = 3 forwards), {fl['ideal_ckpt']:.2f}x with "
        "gradient checkpointing (4 forwards). The tiny model's VAE is large next to its UNet, "
        "so the tiny ratio overstates the gain on the real model.\n\n" + note)
    write_result("train", "DreamBooth UNet stage: caching and the fused optimizer, each "
                 "measured alone and together", rows, "python benchmarks/bench_train.py", notes)
    print(f"both vs neither {sps('ours') / sps('baseline'):.2f}x, T4 estimate {est} GiB")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]))
    else:
        main()
