"""The web UI's parts that need no server: sampler names, the memory policy, infotexts,
request parsing, auth rules, the `fastsd serve` command, and CUDA out-of-memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from fastsd.env import DeviceInfo
from fastsd.webui import infotext, samplers
from fastsd.webui.auth import BasicAuth, required
from fastsd.webui.memory import MemoryPolicy
from fastsd.webui.params import GenerationParams, InvalidRequest, from_request

# --------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("name,scheduler,cls,kwargs,schedule", [
    ("Euler", None, "EulerDiscreteScheduler", {}, "Automatic"),
    ("Euler a", "automatic", "EulerAncestralDiscreteScheduler", {}, "Automatic"),
    ("DPM++ 2M", None, "DPMSolverMultistepScheduler",
     {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}, "Karras"),
    ("DPM++ 2M Karras", None, "DPMSolverMultistepScheduler", {"use_karras_sigmas": True},
     "Karras"),
    ("DPM++ 2M", "Exponential", "DPMSolverMultistepScheduler",
     {"use_exponential_sigmas": True}, "Exponential"),
    ("DPM++ SDE Karras", None, "DPMSolverSDEScheduler", {"use_karras_sigmas": True}, "Karras"),
    ("DDIM", None, "DDIMScheduler", {}, "Automatic"),
    ("UniPC", "SGM Uniform", "UniPCMultistepScheduler", {"timestep_spacing": "trailing"},
     "SGM Uniform"),
    ("k_lms", None, "LMSDiscreteScheduler", {}, "Automatic"),
    ("heun", "KARRAS", "HeunDiscreteScheduler", {"use_karras_sigmas": True}, "Karras"),
])
def test_sampler_names_map_to_diffusers_schedulers(tiny_sd1, name, scheduler, cls, kwargs,
                                                   schedule):
    from diffusers import PNDMScheduler

    base = PNDMScheduler.from_pretrained(tiny_sd1, subfolder="scheduler").config
    sampler, sched = samplers.resolve(name, scheduler)
    built = samplers.build(base, sampler, sched)
    assert type(built).__name__ == cls and sched.label == schedule
    for k, v in kwargs.items():
        assert built.config[k] == v, k
    assert built.config.beta_schedule == "scaled_linear", "the model's betas are kept"


def test_v_prediction_is_kept_across_samplers(tiny_sd2):
    from diffusers import DDIMScheduler

    base = DDIMScheduler.from_pretrained(tiny_sd2, subfolder="scheduler").config
    for name in samplers.sampler_names():
        built = samplers.build(base, *samplers.resolve(name))
        assert built.config.prediction_type == "v_prediction", name


def test_unknown_sampler_or_schedule_names_the_known_ones():
    with pytest.raises(Exception, match="Unknown sampler 'Euler z'. Known: DPM\\+\\+ 2M"):
        samplers.resolve("Euler z")
    with pytest.raises(Exception, match="Unknown scheduler 'wavy'"):
        samplers.resolve("Euler", "wavy")
    with pytest.raises(Exception, match="has no Karras schedule"):
        samplers.resolve("DDIM Karras")  # DDIM has no Karras sigmas in diffusers


def test_dpmpp_sde_needs_torchsde_and_it_is_installed():
    import importlib.util

    assert importlib.util.find_spec("torchsde") is not None
    assert "torchsde" in open("requirements-colab.txt").read()


def test_api_lists_come_from_the_one_table():
    assert [s["name"] for s in samplers.api_samplers()] == samplers.sampler_names()
    assert {s["label"] for s in samplers.api_schedulers()} >= {"Automatic", "Karras"}


# --------------------------------------------------------------------------- memory


def gpu(free: float, total: float = 15.0) -> DeviceInfo:
    return DeviceInfo("cuda", "Tesla T4", free, total, (7, 5))


@pytest.mark.parametrize("free,weights,expect", [
    (14.5, 4.0, set()),  # SD 1.5 on a free T4: fp16 only
    (14.5, 13.0, set()),  # SDXL (6.5 GiB fp16) on a free T4: fits
    (8.0, 13.0, {"attention_slicing", "vae_slicing"}),
    (7.2, 13.0, {"attention_slicing", "vae_slicing", "vae_tiling", "cpu_offload"}),
    (3.5, 4.0, {"attention_slicing", "vae_slicing"}),
])
def test_memory_policy_from_free_vram(free, weights, expect):
    p = MemoryPolicy().resolve(gpu(free), weights)
    on = {k for k, v in p.to_dict().items() if v and k != "fp16"}
    assert p.fp16 is True and on == expect


def on(policy: MemoryPolicy) -> set[str]:
    return {k for k, v in policy.to_dict().items() if v and k != "fp16"}


# fp32 sizes in GiB, from the parameter counts: SD 1.5 (UNet, text encoder, VAE) 4.0,
# SD 1.5 ControlNet 1.35; SDXL 9.6 + 0.46 + 2.6 + 0.31 = 12.9, SDXL ControlNet 4.66,
# SDXL refiner 8.5
SD15, SD15_CN, SDXL, SDXL_CN, REFINER = 4.0, 1.35, 12.9, 4.66, 8.5


@pytest.mark.parametrize("what,weights,work,expect", [
    ("SD 1.5 + ControlNet, 512", SD15 + SD15_CN, ("sd1", 512, 512, 1, 1), set()),
    ("SD 1.5 + 2 ControlNets, hires 2x to 1024, batch 8", SD15 + SD15_CN,
     ("sd1", 1024, 1024, 8, 2), {"vae_slicing"}),
    ("SDXL + ControlNet, 1024", SDXL + SDXL_CN, ("sdxl", 1024, 1024, 1, 1), set()),
    ("SDXL + ControlNet, hires 2x to 2048", SDXL + SDXL_CN, ("sdxl", 2048, 2048, 1, 1),
     {"vae_slicing", "vae_tiling"}),
    ("SDXL + 2 ControlNets + refiner, 1024", SDXL + 2 * SDXL_CN + REFINER,
     ("sdxl", 1024, 1024, 1, 2), {"cpu_offload", "attention_slicing", "vae_slicing",
                                  "vae_tiling"}),
])
def test_controlnet_and_hires_fix_on_a_t4_follow_the_estimate(what, weights, work, expect):
    """The estimate of a request's working memory (a denoising step with its ControlNets,
    the VAE's decode) raises the headroom the policy asks for: on a free T4 (14.5 GiB) SDXL
    with a ControlNet fits at 1024 but needs the tiled VAE at 2048 (hires fix's second
    pass), and with two ControlNets and the refiner its weights need offload."""
    from fastsd.webui import memory

    est = memory.work_gib(*work)
    assert on(MemoryPolicy().resolve(gpu(14.5), weights, est)) == expect, (what, est)
    # the same weights at the model's native size ask for no more than before
    plain = MemoryPolicy().resolve(gpu(14.5), weights)
    assert on(plain) <= expect


def test_the_work_estimate_grows_with_pixels_batch_and_controlnets():
    from fastsd.webui import memory

    one = memory.work_gib("sd1", 512, 512)
    assert memory.work_gib("sd1", 1024, 1024)["step"] == pytest.approx(4 * one["step"], 0.01)
    assert memory.work_gib("sd1", 512, 512, 3)["decode"] == pytest.approx(3 * one["decode"], 0.01)
    assert memory.work_gib("sd1", 512, 512, 3)["decode_one"] == one["decode_one"]
    assert memory.work_gib("sd1", 512, 512, controlnets=2)["step"] > one["step"]


def test_weights_are_counted_from_the_tensor_headers(tiny_sd1, tmp_path):
    """fp16 files count as their fp32 size (the policy halves it for fp16 itself)."""
    import torch
    from safetensors.torch import save_file

    from fastsd.webui import memory

    save_file({"w": torch.zeros(1024, 256, dtype=torch.float16)}, tmp_path / "a.safetensors")
    assert memory.weights_gib(tmp_path / "a.safetensors") == 1024 * 256 * 4 / 1024**3
    files = sum(p.stat().st_size for p in tiny_sd1.rglob("*.safetensors"))
    assert memory.weights_gib(tiny_sd1) == pytest.approx(files / 1024**3, rel=0.01)


def test_memory_policy_on_cpu_and_overrides():
    cpu = DeviceInfo("cpu", "x86")
    assert MemoryPolicy().resolve(cpu, 4.0) == MemoryPolicy(False, False, False, False, False)
    forced = MemoryPolicy(attention_slicing=True, cpu_offload=False).resolve(gpu(2.0), 13.0)
    assert forced.attention_slicing is True and forced.cpu_offload is False
    assert forced.vae_tiling is True  # the rest still chosen from free VRAM
    assert MemoryPolicy(fp16=False).resolve(gpu(14.5), 4.0).fp16 is False


# --------------------------------------------------------------------------- infotext


def test_infotext_round_trip_with_quotes_commas_and_newlines():
    text = infotext.format("a cat, sitting\nsecond line", "ugly, \"bad\"",
                           {"Steps": 20, "Sampler": "DPM++ 2M", "Seed": 5,
                            "Model": "my, model: v2", "Skipped": None})
    assert "Skipped" not in text
    got = infotext.parse(text)
    assert got["Prompt"] == "a cat, sitting\nsecond line"
    assert got["Negative prompt"] == "ugly, \"bad\""
    assert (got["Steps"], got["Sampler"], got["Seed"], got["Model"]) == (
        "20", "DPM++ 2M", "5", "my, model: v2")


def test_parse_reads_an_a1111_infotext():
    a1111 = ("masterpiece, 1girl\nNegative prompt: lowres\nSteps: 28, Sampler: DPM++ 2M, "
             "Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: "
             "6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: \"a: 1, b: 2\", "
             "Version: v1.10.1")
    got = infotext.parse(a1111)
    assert got["Prompt"] == "masterpiece, 1girl" and got["Negative prompt"] == "lowres"
    assert got["Lora hashes"] == "a: 1, b: 2" and got["Size"] == "512x768"
    assert got["Version"] == "v1.10.1"


# --------------------------------------------------------------------------- params


def test_request_fields_and_defaults():
    p, ignored = from_request({"prompt": "x", "steps": "12", "cfg_scale": 5, "seed": 3.0,
                               "width": 64, "height": 128, "sampler_index": "Euler",
                               "save_images": True, "hr_scale": 2, "tiling": True}, False)
    assert (p.steps, p.cfg_scale, p.seed, p.width, p.height) == (12, 5.0, 3, 64, 128)
    assert ignored == ["tiling"] and p.mode == "txt2img"
    with pytest.raises(InvalidRequest, match="must be an integer, not True"):
        from_request({"steps": True}, False)
    with pytest.raises(InvalidRequest, match="A mask needs init_images"):
        GenerationParams(mask=object()).validate()


# --------------------------------------------------------------------------- auth


def test_auth_needed_beyond_localhost_or_with_a_tunnel():
    assert not required("127.0.0.1") and not required("localhost") and not required("::1")
    assert required("0.0.0.0") and required("192.168.1.5")
    assert required("127.0.0.1", tunnel=True)


def test_basic_auth_checks_and_slows_repeated_failures():
    import base64

    auth = BasicAuth("me", "pw:with:colons")
    good = "Basic " + base64.b64encode(b"me:pw:with:colons").decode()
    assert auth.check(good) and not auth.check(None) and not auth.check("Basic %%%")
    assert not auth.check("Basic " + base64.b64encode(b"me:pw").decode())
    assert not auth.check("Bearer " + base64.b64encode(b"me:pw:with:colons").decode())
    delays = [auth.failed("1.2.3.4") for _ in range(6)]
    assert delays[:3] == [0, 0, 0] and delays[3:] == [0.5, 1.0, 2.0]
    assert auth.failed("5.6.7.8") == 0, "one address's failures do not slow another"
    assert "pw:with" not in repr(auth), "the password never shows in a repr or log"


# --------------------------------------------------------------------------- CLI


def test_fastsd_serve_command(workspace, tiny_sd1):
    """`fastsd serve --model M --port 0` starts, answers, and stops on Ctrl-C."""
    import json
    import urllib.request

    env = {**os.environ, "FASTSD_HOME": str(workspace), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fastsd.cli", "serve", "--model",
                             str(tiny_sd1), "--port", "0", "--password", "pw"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C" in line:
                break
        out = "".join(lines)
        assert "fastsd API: http://127.0.0.1:" in out, out + proc.stderr.read()
        assert "password (the one you gave)" in out and "pw\n" not in out
        base = out.split("fastsd API: ")[1].split()[0]
        req = urllib.request.Request(f"{base}/options")
        token = __import__("base64").b64encode(b"fastsd:pw").decode()
        req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read())["sd_model_checkpoint"].startswith("tiny-sd1 [")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    assert proc.returncode in (0, 130)


# --------------------------------------------------------------------------- CUDA


def test_after_out_of_memory_the_activations_are_gone_before_the_cache_is_emptied(
        tiny_sd1, monkeypatch):
    """The CUDA cache can only give back what nothing holds: the memory is freed once the
    exception, whose traceback holds the pipeline's frames and their activations, is gone
    (it was freed inside the except block, with all of it still held). On CPU: an
    out-of-memory error raised mid-generation, and a probe of what is alive when the
    engine frees memory."""
    import gc
    import weakref

    import torch

    from fastsd.webui import memory
    from fastsd.webui.catalog import Catalog
    from fastsd.webui.engine import Control, Engine, OutOfMemory

    engine = Engine(Catalog([tiny_sd1.parent]))
    engine.load("tiny-sd1")
    held, alive_at_free = [], []

    def step(i, total, latents):
        held.append(weakref.ref(latents))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    real = memory.free_memory

    def free():
        gc.collect()
        alive_at_free.append([r() is not None for r in held])
        real()
    monkeypatch.setattr(memory, "free_memory", free)
    with pytest.raises(OutOfMemory, match="Out of GPU memory making 1 image"):
        engine.generate(GenerationParams(width=64, height=64, steps=3), Control(on_step=step))
    assert alive_at_free == [[False]]
    assert len(engine.generate(GenerationParams(width=64, height=64, steps=2)).images) == 1


def test_cuda_out_of_memory_is_one_requests_error(tiny_sd1, tmp_path):
    """A request too big for the GPU fails alone, with a clear message; memory is freed and
    the next request works. Needs a CUDA GPU (none here: skipped, and said so)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: out-of-memory can only happen on one")
    from fastsd.webui.catalog import Catalog
    from fastsd.errors import OutOfMemory
    from fastsd.webui.engine import Engine

    engine = Engine(Catalog([tiny_sd1.parent]), MemoryPolicy(attention_slicing=False,
                                                             vae_tiling=False,
                                                             vae_slicing=False))
    engine.load("tiny-sd1")
    assert engine.applied.fp16 is True
    before = torch.cuda.memory_allocated()
    with pytest.raises(OutOfMemory, match="Out of GPU memory making 8 image"):
        engine.generate(GenerationParams(width=2048, height=2048, batch_size=8, steps=1))
    assert torch.cuda.memory_allocated() <= before * 1.1 + (64 << 20)
    ok = engine.generate(GenerationParams(width=64, height=64, steps=2))
    assert len(ok.images) == 1
