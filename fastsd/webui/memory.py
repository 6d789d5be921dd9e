"""How a pipeline sits in memory: precision and the memory savers, chosen from free VRAM.

Every field left at None is chosen by :meth:`MemoryPolicy.resolve`; a field set to True or
False is the user's override and is kept. The rules, for a model whose weights take W GB
on the device in the precision they are loaded in (counted from the files' headers: the
registry's downloads and fastsd's exports are fp16, other files fp32) and F GB free before
it is loaded:

* CUDA: fp16 weights and SDPA attention (PyTorch's fused kernel). CPU/MPS: fp32.
* model CPU offload when F < W + 1 GB: the weights cannot sit on the GPU with room to work;
* attention slicing when F < W + 2.5 GB, VAE slicing (one image decoded at a time) when
  F < W + 4 GB, VAE tiling when F < W + 1.5 GB;
* on CPU none of them (they save no RAM worth their time there).

Whatever the policy, the VAE decodes safely in fp16 (:func:`fastsd.models.vae.guard`):
SDXL's own VAE in fp32, any other one caught and upcast if it makes a black image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from fastsd import drive

OFFLOAD_HEADROOM_GB = 1.0
SLICING_HEADROOM_GB = 2.5
VAE_SLICING_HEADROOM_GB = 4.0
VAE_TILING_HEADROOM_GB = 1.5


@dataclass(frozen=True)
class MemoryPolicy:
    fp16: bool | None = None
    attention_slicing: bool | None = None
    vae_slicing: bool | None = None
    vae_tiling: bool | None = None
    cpu_offload: bool | None = None

    def resolve(self, device, weights: "Weights") -> "MemoryPolicy":
        """Fill every None from ``device`` (fastsd.env.DeviceInfo) and the model's
        :class:`Weights`."""
        cuda = device.device == "cuda"
        fp16 = cuda if self.fp16 is None else self.fp16
        w = weights.fp16_gb if fp16 else weights.fp32_gb
        free = device.vram_free_gb if cuda and device.vram_free_gb is not None else None

        def short(headroom: float) -> bool:
            return free is not None and free < w + headroom

        auto = {"cpu_offload": short(OFFLOAD_HEADROOM_GB),
                "attention_slicing": short(SLICING_HEADROOM_GB),
                "vae_slicing": short(VAE_SLICING_HEADROOM_GB),
                "vae_tiling": short(VAE_TILING_HEADROOM_GB)}
        return replace(self, fp16=fp16, **{k: v if getattr(self, k) is None else getattr(self, k)
                                          for k, v in auto.items()})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass(frozen=True)
class Weights:
    """What a model's weights take in memory once loaded, in GB, in fp16 and in fp32."""

    fp16_gb: float
    fp32_gb: float

    @classmethod
    def of_folder(cls, folder: Path) -> "Weights":
        """Counted from the headers of the weight files of each component the folder's
        model_index.json names (nothing is loaded): floating-point tensors at 2 or 4 bytes
        per value, whatever precision the files store, the rest as stored."""
        from fastsd.convert.tensors import FLOATS, open_tensors

        folder = Path(folder)
        index = drive.read_json(folder / "model_index.json")
        values = other = 0
        for name, spec in index.items():
            if not (isinstance(spec, list) and spec and spec[0]) or not (folder / name).is_dir():
                continue
            files = sorted((folder / name).glob("*.safetensors")) or \
                sorted((folder / name).glob("*.bin"))
            for f in files:
                with open_tensors(f) as tf:
                    for key in tf.keys():
                        info = tf.info(key)
                        if info.dtype in FLOATS:
                            values += _numel(info.shape)
                        else:
                            other += info.nbytes
        return cls((2 * values + other) / 1024**3, (4 * values + other) / 1024**3)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def apply(pipe, policy: MemoryPolicy, device: str) -> None:
    """Put ``pipe`` on ``device`` as ``policy`` (resolved) says; guard its VAE's decode."""
    from fastsd.models import vae as vae_guard

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
    sdxl = "XL" in type(pipe).__name__  # StableDiffusionXL{,Img2Img,Inpaint,...}Pipeline
    vae_guard.guard(pipe.vae, vae_guard.must_upcast(pipe.vae, sdxl))


def free_memory() -> None:
    """Give back what the last model or a failed request held on the device."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
