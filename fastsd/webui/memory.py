"""How a pipeline sits in memory: precision and the memory savers, chosen from free VRAM.

Every field left at None is chosen by :meth:`MemoryPolicy.resolve`; a field set to True or
False is the user's override and is kept. The rules, for a model whose weights take W GiB
on the device and F GiB free before it is loaded (VRAM is in GiB throughout: fastsd.env):

* CUDA: fp16 weights and SDPA attention (PyTorch's fused kernel). CPU/MPS: fp32.
* model CPU offload when F < W + 1 GiB: the weights cannot sit on the GPU with room to work;
* attention slicing when F < W + 2.5 GiB, VAE slicing (one image decoded at a time) when
  F < W + 4 GiB, VAE tiling when F < W + 1.5 GiB;
* on CPU none of them (they save no RAM worth their time there).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from fastsd.env import GIB

OFFLOAD_HEADROOM_GIB = 1.0
SLICING_HEADROOM_GIB = 2.5
VAE_SLICING_HEADROOM_GIB = 4.0
VAE_TILING_HEADROOM_GIB = 1.5


@dataclass(frozen=True)
class MemoryPolicy:
    fp16: bool | None = None
    attention_slicing: bool | None = None
    vae_slicing: bool | None = None
    vae_tiling: bool | None = None
    cpu_offload: bool | None = None

    def resolve(self, device, weights_gib: float) -> "MemoryPolicy":
        """Fill every None from ``device`` (fastsd.env.DeviceInfo) and the fp32 weight size."""
        cuda = device.device == "cuda"
        fp16 = cuda if self.fp16 is None else self.fp16
        w = weights_gib / 2 if fp16 else weights_gib
        free = device.vram_free_gib if cuda and device.vram_free_gib is not None else None

        def short(headroom: float) -> bool:
            return free is not None and free < w + headroom

        auto = {"cpu_offload": short(OFFLOAD_HEADROOM_GIB),
                "attention_slicing": short(SLICING_HEADROOM_GIB),
                "vae_slicing": short(VAE_SLICING_HEADROOM_GIB),
                "vae_tiling": short(VAE_TILING_HEADROOM_GIB)}
        return replace(self, fp16=fp16, **{k: v if getattr(self, k) is None else getattr(self, k)
                                          for k, v in auto.items()})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def weights_gib(folder: Path) -> float:
    """The size of a diffusers folder's weights as stored, in GiB (fp32 for our models)."""
    total = sum(p.stat().st_size for p in Path(folder).rglob("*")
                if p.suffix in (".safetensors", ".bin") and p.is_file())
    return total / GIB


def apply(pipe, policy: MemoryPolicy, device: str) -> None:
    """Put ``pipe`` on ``device`` as ``policy`` (resolved) says."""
    if policy.cpu_offload and device == "cuda":
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    if device == "cuda" and not policy.attention_slicing:
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())
        pipe.vae.set_attn_processor(AttnProcessor2_0())
    if policy.attention_slicing:
        pipe.enable_attention_slicing()
    (pipe.vae.enable_slicing if policy.vae_slicing else pipe.vae.disable_slicing)()
    (pipe.vae.enable_tiling if policy.vae_tiling else pipe.vae.disable_tiling)()


def free_memory() -> None:
    """Give back what the last model or a failed request held on the device."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
