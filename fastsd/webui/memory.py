"""How a pipeline sits in memory: precision and the memory savers, chosen from free VRAM.

Every field left at None is chosen by :meth:`MemoryPolicy.resolve`; a field set to True or
False is the user's override and is kept. The rules, for weights that take W GiB on the
device (the model, its ControlNets and a refiner) and F GiB free before any was loaded
(VRAM is in GiB throughout: fastsd.env):

* CUDA: fp16 weights and SDPA attention (PyTorch's fused kernel). CPU/MPS: fp32.
* model CPU offload when F < W + 1 GiB, or W + a denoising step's working memory: the
  weights cannot sit on the GPU with room to work;
* attention slicing when F < W + 2.5 GiB; VAE slicing (one image decoded at a time) when
  F < W + 4 GiB or W + the whole batch's decode; VAE tiling when F < W + 1.5 GiB or W + one
  image's decode;
* on CPU none of them (they save no RAM worth their time there).

The working memory of a request is estimated by :func:`work_gib` from its size, batch and
ControlNet units, so a hires fix pass at twice the size or a ControlNet is planned for
before it runs (the engine resolves the policy again for each request).

Whatever the policy, the VAE decodes safely in fp16 (:func:`fastsd.models.vae.guard`):
SDXL's own VAE in fp32, any other one caught and upcast if it makes a black image.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from fastsd.env import GIB
from fastsd.train.settings import CUDA_OVERHEAD_GIB

OFFLOAD_HEADROOM_GIB = 1.0
SLICING_HEADROOM_GIB = 2.5
VAE_SLICING_HEADROOM_GIB = 4.0
VAE_TILING_HEADROOM_GIB = 1.5

#: Working memory beside the weights, fp16, in GiB per megapixel (10^6 pixels) of each
#: image: the tensors alive at the peak of one denoising step of a CFG batch (the prompt and
#: the negative prompt), of one ControlNet's part of that step, and of the VAE decoding one
#: image. Measured by benchmarks/bench_webui.py on the real SD 1.5, SD 2.1 and SDXL
#: architectures (random weights on PyTorch's meta device, no memory used), less the L x L
#: attention scores that SDPA's fused kernels never store: 0.484, 0.484 and 0.293 for the
#: step, 0.134, 0.134 and 0.107 for a ControlNet, 1.431 for the decode (rounded up here).
#: A measurement of the architectures, not of a GPU: a real run adds the allocator's
#: fragmentation, counted in CUDA_OVERHEAD_GIB (the trainer's figure).
STEP_GIB_PER_MP = {"sd1": 0.49, "sd2": 0.49, "sdxl": 0.30}
CONTROLNET_GIB_PER_MP = {"sd1": 0.14, "sd2": 0.14, "sdxl": 0.11}
VAE_DECODE_GIB_PER_MP = 1.44


def work_gib(family: str, width: int, height: int, batch: int = 1,
            controlnets: int = 0) -> dict[str, float]:
    """The estimated working memory of a request at ``width`` x ``height``: ``step``, one
    denoising step of the whole batch (with its ControlNets), ``decode``, the VAE decoding
    the whole batch at once, and ``decode_one``, decoding one image."""
    mp = width * height / 1e6
    fam = family if family in STEP_GIB_PER_MP else "sd1"
    step = batch * mp * (STEP_GIB_PER_MP[fam] + controlnets * CONTROLNET_GIB_PER_MP[fam])
    one = mp * VAE_DECODE_GIB_PER_MP
    return {"step": round(step, 3), "decode": round(batch * one, 3),
            "decode_one": round(one, 3)}


@dataclass(frozen=True)
class MemoryPolicy:
    fp16: bool | None = None
    attention_slicing: bool | None = None
    vae_slicing: bool | None = None
    vae_tiling: bool | None = None
    cpu_offload: bool | None = None

    def resolve(self, device, weights_gib: float,
                work: dict[str, float] | None = None) -> "MemoryPolicy":
        """Fill every None from ``device`` (fastsd.env.DeviceInfo, its free VRAM before
        anything was loaded), the weights' size in fp32 and a request's ``work``
        (:func:`work_gib`; the size of a plain request at the model's native size when
        None)."""
        cuda = device.device == "cuda"
        fp16 = cuda if self.fp16 is None else self.fp16
        w = weights_gib / 2 if fp16 else weights_gib
        free = device.vram_free_gib if cuda and device.vram_free_gib is not None else None
        work = {k: v * (1 if fp16 else 2) for k, v in (work or {}).items()}

        def short(headroom: float, need: str = "") -> bool:
            if need in work:
                headroom = max(headroom, work[need] + CUDA_OVERHEAD_GIB)
            return free is not None and free < w + headroom

        auto = {"cpu_offload": short(OFFLOAD_HEADROOM_GIB, "step"),
                "attention_slicing": short(SLICING_HEADROOM_GIB),
                "vae_slicing": short(VAE_SLICING_HEADROOM_GIB, "decode"),
                "vae_tiling": short(VAE_TILING_HEADROOM_GIB, "decode_one")}
        return replace(self, fp16=fp16, **{k: v if getattr(self, k) is None else getattr(self, k)
                                          for k, v in auto.items()})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def weights_gib(path: Path) -> float:
    """The size in GiB of the weights of a diffusers folder (or of one weights file) at 4
    bytes a parameter, whatever precision they are stored in: parameters are counted from
    the .safetensors headers (a .bin file by its size)."""
    from fastsd.convert.tensors import open_tensors
    from fastsd.errors import DataError

    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    total = 0
    for f in files:
        if f.suffix == ".safetensors":
            try:
                with open_tensors(f) as t:
                    total += 4 * sum(math.prod(t.info(k).shape) for k in t.keys())
            except DataError:  # a damaged file: its size; loading it says what is wrong
                total += f.stat().st_size
        elif f.suffix == ".bin":
            total += f.stat().st_size
    return total / GIB


def apply(pipe, policy: MemoryPolicy, device: str) -> None:
    """Put ``pipe`` on ``device`` as ``policy`` (resolved) says; guard its VAE's decode."""
    from fastsd.models import vae as vae_guard

    sdxl = "XL" in type(pipe).__name__  # StableDiffusionXL{,Img2Img,Inpaint,...}Pipeline
    vae_guard.guard(pipe.vae, vae_guard.must_upcast(pipe.vae, sdxl))
    if policy.cpu_offload and device == "cuda":
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    if device == "cuda" and not policy.attention_slicing:
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())
        pipe.vae.set_attn_processor(AttnProcessor2_0())
    adjust(pipe, policy)


def adjust(pipe, policy: "MemoryPolicy") -> None:
    """Turn the VAE and attention savers of ``pipe`` on or off as a request's ``policy``
    says (offload is set where the pipeline is made, fastsd.webui.engine)."""
    (pipe.vae.enable_slicing if policy.vae_slicing else pipe.vae.disable_slicing)()
    (pipe.vae.enable_tiling if policy.vae_tiling else pipe.vae.disable_tiling)()
    if policy.attention_slicing:
        pipe.enable_attention_slicing()


def free_memory() -> None:
    """Give back what the last model or a failed request held on the device."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
