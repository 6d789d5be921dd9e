"""The API's overhead, without and with a ControlNet unit, and the working memory the
memory policy plans with.

1. A 10-step 64x64 txt2img through the HTTP API against calling the same diffusers
   pipeline directly (target: the API adds at most 10%).
2. The same with one ControlNet unit (the tiny ControlNet, a ready map sent with module
   "none") against calling the same diffusers ControlNet pipeline directly with that map
   (target: at most 10%).

Each pair uses the same loaded pipeline (tiny SD 1.x), sampler (Euler a), seed, CFG and
torch threads; the API side adds what a client pays for: HTTP and JSON, base64 images in
and out, the unit's parsing and its map's resize, the queue and its worker thread, the
step callback (progress, interrupt), PNG encoding with the infotext, the atomic save of
the image to outputs/ (fsync). Runs alternate; the target is graded on the median of the
paired ratios.

3. The working memory of generation (fastsd.webui.memory's constants), measured on the
   real SD 1.5, SD 2.1 and SDXL architectures on PyTorch's meta device (no memory used):
   the tensors alive at the peak of a denoising step of a CFG batch, of the same step with
   a ControlNet, and of the VAE's decode, less the L x L attention scores that SDPA's fused
   kernels never store. From them, what ControlNet and hires fix need on a T4: an
   estimate, reported as one.

Run: .venv/bin/python benchmarks/bench_webui.py
"""

from __future__ import annotations

import base64
import io
import json
import os
import statistics
import tempfile
import time
import urllib.request
import weakref
from pathlib import Path

from common import Row, write_result

from fastsd.env import GIB

RUNS, WARMUP = 25, 2
STEPS, SIZE = 10, 64

# The real architectures' UNet configs (diffusers' names; nothing downloaded).
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SD21_UNET = dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True)
SDXL_UNET = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
ARCHS = {"sd1": (SD15_UNET, 768), "sd2": (SD21_UNET, 1024), "sdxl": (SDXL_UNET, 2048)}
T4_FREE_GIB = 14.5  # a free T4 after the CUDA context (of its 15 GiB, as the driver says)


def _paired(api, direct) -> tuple[dict, dict]:
    times: dict[str, list[float]] = {"api": [], "direct": []}
    cpu: dict[str, list[float]] = {"api": [], "direct": []}
    for i in range(WARMUP + RUNS):
        for name, fn in (("api", api), ("direct", direct)) if i % 2 else \
                (("direct", direct), ("api", api)):
            t, c = fn(i)
            if i >= WARMUP:
                times[name].append(t)
                cpu[name].append(c)
    return times, cpu


def _rows(label: str, times: dict, cpu: dict) -> tuple[list[Row], float, str]:
    ours, base = statistics.median(times["api"]), statistics.median(times["direct"])
    paired = statistics.median(a / d for a, d in zip(times["api"], times["direct"]))
    cpu_ours, cpu_base = statistics.median(cpu["api"]), statistics.median(cpu["direct"])
    print(f"{label}: API {ours * 1000:.1f} ms, direct {base * 1000:.1f} ms; paired ratio "
          f"{paired:.3f}; CPU {cpu_ours * 1000:.1f} vs {cpu_base * 1000:.1f} ms")
    rows = [Row(f"{label}: wall time per request, median of runs", "ms", round(ours * 1000, 1),
                round(base * 1000, 1), higher_is_better=False),
            Row(f"{label}: wall time, median of the paired ratios API/direct", "x",
                round(paired, 3), 1.0, target="<= 1.10 (API adds <= 10%)",
                higher_is_better=False, passed=paired <= 1.10),
            Row(f"{label}: CPU time per request (process, both sides in one process)", "ms",
                round(cpu_ours * 1000, 1), round(cpu_base * 1000, 1), higher_is_better=False)]
    raw = (f"{label}: API {[round(t * 1000) for t in times['api']]} ms, direct "
           f"{[round(t * 1000) for t in times['direct']]} ms.")
    return rows, paired, raw


def overhead() -> tuple[list[Row], list[str]]:
    import torch
    from PIL import Image

    from fastsd.models import registry, tiny
    from fastsd.webui import samplers
    from fastsd.webui.server import serve, shutdown

    torch.set_num_threads(1)  # this machine's 2 cores are shared: threads fight otherwise
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["FASTSD_HOME"] = tmp
        tiny.ensure_controlnet("sd1", root / "models" / registry.CONTROLNET_DIR / "sd1-tiny-canny")
        server = serve(model="tiny-sd1", root=root, port=0)
        engine = server.app.state.worker.engine
        body = {"prompt": "a photo of sks cat", "negative_prompt": "", "steps": STEPS,
                "width": SIZE, "height": SIZE, "cfg_scale": 7, "sampler_name": "Euler a"}
        edges = Image.new("RGB", (SIZE, SIZE))
        edges.paste((255, 255, 255), (16, 16, 48, 20))
        edges.paste((255, 255, 255), (16, 16, 20, 48))
        buf = io.BytesIO()
        edges.save(buf, format="PNG")
        unit = {"model": "sd1-tiny-canny", "module": "none", "weight": 1.0,
                "resize_mode": "Just Resize", "image": base64.b64encode(buf.getvalue()).decode()}

        def api(seed: int, units: list | None = None):
            extra = {"alwayson_scripts": {"controlnet": {"args": units}}} if units else {}
            data = json.dumps({**body, "seed": seed, **extra}).encode()
            req = urllib.request.Request(f"{server.url}/sdapi/v1/txt2img", data=data,
                                         headers={"Content-Type": "application/json"})
            start, cpu = time.perf_counter(), time.process_time()
            with urllib.request.urlopen(req, timeout=300) as r:
                answer = json.loads(r.read())
            elapsed = time.perf_counter() - start, time.process_time() - cpu
            assert len(answer["images"]) == 1
            return elapsed

        def direct_with(pipe, **extra):
            def run(seed: int):
                start, cpu = time.perf_counter(), time.process_time()
                pipe.scheduler = samplers.build(pipe.scheduler.config,
                                                *samplers.resolve("Euler a"))
                with torch.inference_mode():
                    image = pipe(body["prompt"], negative_prompt="", num_inference_steps=STEPS,
                                 width=SIZE, height=SIZE, guidance_scale=7,
                                 generator=torch.Generator("cpu").manual_seed(seed),
                                 **extra).images[0]
                elapsed = time.perf_counter() - start, time.process_time() - cpu
                assert image.size == (SIZE, SIZE)
                return elapsed
            return run

        try:
            plain = _paired(api, direct_with(engine.pipeline("txt2img")))
            api(0, [unit])  # loads the ControlNet into the engine, once
            (title,) = engine._nets
            cn_pipe = engine.pipeline("txt2img", (title,))
            assert type(cn_pipe).__name__ == "StableDiffusionControlNetPipeline"
            with_cn = _paired(lambda s: api(s, [unit]),
                              direct_with(cn_pipe, image=edges, controlnet_conditioning_scale=1.0))
        finally:
            server.stop()
            shutdown()
    rows1, _, raw1 = _rows(f"{STEPS}-step {SIZE}x{SIZE} txt2img, tiny SD 1.x on CPU", *plain)
    rows2, _, raw2 = _rows("the same with one ControlNet unit (tiny ControlNet, a ready map)",
                           *with_cn)
    return rows1 + rows2, [raw1, raw2]


# --------------------------------------------------------------------------- memory


def _peak_gib(fn) -> float:
    """The peak, in GiB, of the bytes held by live tensors while ``fn`` runs (on the meta
    device), leaving out the L x L attention scores (self-attention's square score
    tensors)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    scores = {"bmm", "baddbmm", "_safe_softmax", "_softmax", "_unsafe_view", "view",
              "expand", "_to_copy"}

    class Peak(TorchDispatchMode):
        live = peak = 0
        seen: dict = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if str(func).split(".")[1] in scores and isinstance(out, torch.Tensor) \
                    and out.ndim >= 3 and out.shape[-1] == out.shape[-2] >= 256:
                return out
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if not isinstance(t, torch.Tensor):
                    continue
                key = t.untyped_storage()._cdata
                if key in self.seen:
                    continue
                n = t.untyped_storage().nbytes()
                self.seen[key] = n
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, key, n)
            return out

        def _free(self, key, n):
            if self.seen.pop(key, None) is not None:
                self.live -= n

    mode = Peak()
    mode.seen = {}
    with torch.no_grad(), mode:
        fn()
    return mode.peak / GIB


def working_memory() -> dict[str, dict[str, float]]:
    """GiB per megapixel of one image (CFG batch of 2), fp16: step, ControlNet, VAE decode;
    and the UNet's parameter count (a check of the configs against the registry's)."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    dt, px = torch.float16, 1024
    mp = px * px / 1e6
    out: dict[str, dict[str, float]] = {}
    with torch.device("meta"):
        for family, (config, ctx) in ARCHS.items():
            unet = UNet2DConditionModel(**config).to(dt)
            net = ControlNetModel.from_unet(unet, load_weights_from_unet=False).to(dt)
            x = torch.randn(2, 4, px // 8, px // 8, dtype=dt)
            t = torch.tensor([500, 500])
            e = torch.randn(2, 77, ctx, dtype=dt)
            add = {}
            if family == "sdxl":
                add = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 1280, dtype=dt),
                                             "time_ids": torch.randn(2, 6, dtype=dt)}}
            hint = torch.randn(2, 3, px, px, dtype=dt)

            def with_control():
                down, mid = net(x, t, e, controlnet_cond=hint, return_dict=False, **add)
                unet(x, t, e, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid, **add)

            step = _peak_gib(lambda: unet(x, t, e, **add))
            both = _peak_gib(with_control)
            out[family] = {"step": round(step / mp, 3), "controlnet": round((both - step) / mp, 3),
                           "unet_params": sum(p.numel() for p in unet.parameters()),
                           "controlnet_params": sum(p.numel() for p in net.parameters())}
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4).to(dt)
        z = torch.randn(1, 4, px // 8, px // 8, dtype=dt)
        out["vae"] = {"decode": round(_peak_gib(lambda: vae.decode(z)) / mp, 3)}
    return out


def t4_notes(measured: dict) -> str:
    """What ControlNet and hires fix need on a free T4, from the policy's own estimate."""
    from fastsd.env import DeviceInfo
    from fastsd.webui import memory

    t4 = DeviceInfo("cuda", "Tesla T4", T4_FREE_GIB, 15.0, (7, 5))
    gib = 4 / GIB  # fp32 bytes per parameter, in GiB
    # fp32 GiB of the whole models: UNet + text encoders + VAE (83.7 M), and ControlNets
    sd15 = (859.5e6 + 123.1e6 + 83.7e6) * gib
    sdxl = (2567.5e6 + 123.1e6 + 694.7e6 + 83.7e6) * gib
    cn15 = measured["sd1"]["controlnet_params"] * gib
    cnxl = measured["sdxl"]["controlnet_params"] * gib
    refiner = (2.3e9 + 694.7e6 + 83.7e6) * gib
    cases = [("SD 1.5 + 1 ControlNet, 512x512", "sd1", sd15 + cn15, 512, 1, 1),
             ("SD 1.5 + 1 ControlNet, hires fix 2x to 1024x1024", "sd1", sd15 + cn15, 1024, 1,
              1),
             ("SD 1.5 + 2 ControlNets, hires fix 2x to 1024x1024, batch 4", "sd1",
              sd15 + 2 * cn15, 1024, 4, 2),
             ("SDXL + 1 ControlNet, 1024x1024", "sdxl", sdxl + cnxl, 1024, 1, 1),
             ("SDXL + 1 ControlNet, hires fix 2x to 2048x2048", "sdxl", sdxl + cnxl, 2048, 1,
              1),
             ("SDXL + 2 ControlNets + the refiner (its UNet taken as 2.3 B parameters), "
              "1024x1024", "sdxl",
              sdxl + 2 * cnxl + refiner, 1024, 1, 2)]
    parts = []
    for what, family, weights, px, batch, units in cases:
        work = memory.work_gib(family, px, px, batch, units)
        policy = memory.MemoryPolicy().resolve(t4, weights, work)
        on = [k.replace("_", " ") for k, v in policy.to_dict().items() if v and k != "fp16"]
        parts.append(f"{what}: fp16 weights {weights / 2:.1f} GiB, a step {work['step']:.2f} "
                     f"GiB, the decode {work['decode']:.2f} GiB -> "
                     f"{', '.join(on) or 'nothing to turn on'}")
    return ("**T4 estimate (not measured on a T4)**, from the policy's own estimate "
            f"(fastsd.webui.memory, {T4_FREE_GIB} GiB free): " + "; ".join(parts) + ".")


def main() -> None:
    measured = working_memory()
    print("working memory, GiB per megapixel:", measured)
    rows, raw = overhead()
    from fastsd.webui import memory

    consts = {f: (memory.STEP_GIB_PER_MP[f], memory.CONTROLNET_GIB_PER_MP[f])
              for f in ("sd1", "sd2", "sdxl")}
    mem_rows = []
    for family, name in (("sd1", "SD 1.5"), ("sd2", "SD 2.1"), ("sdxl", "SDXL")):
        m = measured[family]
        mem_rows += [
            Row(f"{name}: working memory of a denoising step (CFG batch of 2), per megapixel, "
                "fp16, measured on the meta device (fastsd.webui.memory uses "
                f"{consts[family][0]})", "GiB/MP", m["step"]),
            Row(f"{name}: what a ControlNet adds to that step, per megapixel (memory uses "
                f"{consts[family][1]})", "GiB/MP", m["controlnet"])]
    mem_rows.append(Row("VAE decode of one image, per megapixel, fp16 (memory uses "
                        f"{memory.VAE_DECODE_GIB_PER_MP})", "GiB/MP", measured["vae"]["decode"]))
    params = ", ".join(f"{f} UNet {measured[f]['unet_params'] / 1e6:.1f} M, ControlNet "
                       f"{measured[f]['controlnet_params'] / 1e6:.1f} M" for f in ARCHS)
    write_result(
        "webui", "A1111-compatible API: HTTP request vs calling the pipeline, without and with "
        "a ControlNet; the working memory the memory policy plans with", rows + mem_rows,
        command=".venv/bin/python benchmarks/bench_webui.py",
        notes=f"{RUNS} alternating pairs of runs after {WARMUP} warm-up pairs per comparison; "
        "the target is graded on the median of each pair's ratio, which cancels the drift of "
        "a shared machine's load. One torch thread on both sides. Same loaded pipeline, "
        "sampler (Euler a), CFG 7 and seeds; the API side adds HTTP+JSON, base64 in and out, "
        "the unit's parsing and its map's fitting, the queue and worker thread, the step "
        "callback, PNG encoding with the infotext, the atomic (fsynced) save to outputs/ and "
        "base64. With the ControlNet, both sides run the same StableDiffusionControlNetPipeline "
        "(the engine's, with the tiny ControlNet) on the same 64x64 map. Wall times: "
        + " ".join(raw) + "\n\nWorking memory: tensors alive at the peak, at 1024x1024, "
        "on PyTorch's meta device (no memory used) with the real architectures' configs "
        f"(parameters: {params}); the L x L attention scores are left out, as SDPA's fused "
        "kernels never store them. A measurement of the architectures, not of a GPU (a real "
        "run adds the allocator's fragmentation, which the policy counts as "
        f"{memory.CUDA_OVERHEAD_GIB} GiB of CUDA overhead). GiB: 2^30 bytes; MP: 10^6 "
        "pixels.\n\n" + t4_notes(measured))


if __name__ == "__main__":
    main()
