"""Loading Kosmos-2 (fp16 on CUDA, 8-bit when asked or short of VRAM, CPU otherwise),
batched greedy generation, and unloading it so its VRAM is free before training.

The weights are cached under ``WORKSPACE/models/hub`` (on Drive in Colab), so a user
downloads them once, not once per runtime.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastsd.env import GIB, DeviceInfo
from fastsd.errors import ModelError, OfflineError
from fastsd.fetch import offline_error, use_cache_only
from fastsd.workspace import Workspace

log = logging.getLogger("fastsd")

DEFAULT_MODEL = "microsoft/kosmos-2-patch14-224"
BRIEF_PROMPT = "<grounding>An image of"
DETAILED_PROMPT = "<grounding> Describe this image in detail:"
QUANTIZE = ("auto", "8bit", "none")
HEADROOM_GIB = 1.5  # CUDA context, activations and KV cache of a batch of 8, fragmentation
OVERHEAD = 1.1  # layer norms, biases and embeddings kept in fp16 by 8-bit loading, etc.


def prompt_for(detailed: bool) -> str:
    return DETAILED_PROMPT if detailed else BRIEF_PROMPT


def prompt_words(prompt: str) -> str:
    """The words of a prompt as they start the generated caption ("An image of")."""
    return prompt.replace("<grounding>", "").strip()


# --------------------------------------------------------------------------- where from


def _offline_error(name: str, cache: Path) -> OfflineError:
    return offline_error(name, cache, "captioning model")


@dataclass(frozen=True)
class Source:
    """Where the model comes from: a folder or a repo id, its cache, and whether only the
    cache may be used (offline, or the Hub unreachable)."""

    path: str
    cache: Path | None = None
    local_only: bool = False

    def kwargs(self) -> dict[str, Any]:
        return {"cache_dir": self.cache, "local_files_only": self.local_only}


def locate(name: str, root: Workspace | Path | None = None) -> Source:
    """Where to load ``name`` from.

    ``tiny-kosmos2`` is built offline on first use; a folder with a config.json is used
    as is; anything else is a Hugging Face repo id, cached in the workspace's Hub cache. When
    the machine is offline (or the Hub unreachable) the cached copy is used, and without
    one an OfflineError is raised at once.
    """
    from fastsd.models import tiny_kosmos

    ws = Workspace.current(root)
    if name == tiny_kosmos.NAME:
        return Source(str(tiny_kosmos.ensure(ws.models)))
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return Source(str(path))
    if path.exists() or name.count("/") != 1:
        raise ModelError(f"{name!r} is neither a Hugging Face model id (owner/name), a model "
                         f"folder with a config.json, nor {tiny_kosmos.NAME!r}. "
                         f"Use {DEFAULT_MODEL!r} (the default).")
    cache = ws.hub_cache
    if use_cache_only():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json", cache_dir=cache), str):
            raise _offline_error(name, cache)
        return Source(name, cache, local_only=True)
    return Source(name, cache)


# --------------------------------------------------------------------------- how


@dataclass(frozen=True)
class LoadPlan:
    """How to load the model: device, dtype and 8-bit, with the reason, for the log."""

    device: str  # "cuda" or "cpu"
    dtype: str  # "float16" or "float32"
    eight_bit: bool
    reason: str


def vram_needed_gib(params: int, eight_bit: bool) -> float:
    """VRAM to load and run a model of ``params`` parameters (fp16, or 8-bit)."""
    return params * (1 if eight_bit else 2) * OVERHEAD / GIB + HEADROOM_GIB


def plan_loading(info: DeviceInfo, params: int, quantize: str = "auto") -> LoadPlan:
    """Choose how to load a model of ``params`` parameters on the device ``info`` describes.

    ``quantize``: "auto" (fp16 when it fits in free VRAM, else 8-bit), "8bit" or "none".
    Without CUDA the model runs on the CPU in float32 (8-bit needs CUDA).
    """
    if quantize not in QUANTIZE:
        raise ModelError(f"quantize={quantize!r} is not one of {QUANTIZE}. Use 'auto' unless "
                         "you have a reason not to.")
    if not info.is_cuda:
        why = "no CUDA GPU" + (" (8-bit loading needs one; using float32)"
                               if quantize == "8bit" else "")
        return LoadPlan("cpu", "float32", False, why)
    if quantize == "8bit":
        return LoadPlan("cuda", "float16", True, "8-bit asked for")
    free = info.vram_free_gib or 0.0
    fp16 = vram_needed_gib(params, False)
    if quantize == "none" or free >= fp16:
        return LoadPlan("cuda", "float16", False, f"{free:.1f} GiB free VRAM, fp16 needs "
                        f"about {fp16:.1f} GiB")
    int8 = vram_needed_gib(params, True)
    if free >= int8:
        return LoadPlan("cuda", "float16", True, f"{free:.1f} GiB free VRAM is less than the "
                        f"{fp16:.1f} GiB fp16 needs; 8-bit needs about {int8:.1f} GiB")
    return LoadPlan("cpu", "float32", False, f"only {free:.1f} GiB free VRAM (8-bit needs "
                    f"about {int8:.1f} GiB): running on the CPU, which is slow. Free VRAM "
                    "(restart the runtime) to caption on the GPU.")


def count_params(source: Source) -> int:
    """Parameters of the model at ``source``, counted from its config without loading it."""
    import torch
    from transformers import AutoConfig, Kosmos2ForConditionalGeneration

    config = AutoConfig.from_pretrained(source.path, **source.kwargs())
    with torch.device("meta"):
        model = Kosmos2ForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- the model


class Captioner:
    """Kosmos-2 loaded for captioning. Use as a context manager, or call :meth:`close`:
    the model is dropped and the CUDA cache emptied on the way out.

    >>> with Captioner("tiny-kosmos2") as cap:
    ...     raw = cap.generate(images, BRIEF_PROMPT)
    """

    def __init__(self, model: str = DEFAULT_MODEL, root: Path | None = None,
                 quantize: str = "auto", device_info: DeviceInfo | None = None) -> None:
        from fastsd import env

        self.name = model
        source = locate(model, root)
        info = device_info or env.device_info()
        params = count_params(source) if info.is_cuda else 0
        self.plan = plan_loading(info, params, quantize)
        log.info("Loading %s on %s (%s%s): %s", model, self.plan.device, self.plan.dtype,
                 ", 8-bit" if self.plan.eight_bit else "", self.plan.reason)
        self.processor, self.model = _load(source, self.plan, model)
        self.processor.tokenizer.padding_side = "left"

    @property
    def device(self) -> str:
        return self.plan.device

    def generate(self, images: list[Any], prompt: str = BRIEF_PROMPT,
                 max_new_tokens: int = 64) -> list[str]:
        """The raw generations (tags included) for ``images`` (PIL), one batch, greedy."""
        import torch

        if self.model is None:
            raise ModelError("This captioner was closed. Create a new Captioner to caption "
                             "more images.")
        inputs = self.processor(images=[im.convert("RGB") for im in images],
                                text=[prompt] * len(images), return_tensors="pt", padding=True)
        dtype = getattr(torch, self.plan.dtype)
        inputs = {k: v.to(self.device, dtype=dtype if k == "pixel_values" else None)
                  for k, v in inputs.items()}
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      num_beams=1, use_cache=True)
        return self.processor.batch_decode(ids, skip_special_tokens=True)

    def close(self) -> None:
        """Drop the model and give its memory back (VRAM too, on CUDA)."""
        if self.model is None:
            return
        self.model = None
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()
            log.info("Unloaded %s; %.1f GiB VRAM in use", self.name,
                     torch.cuda.memory_allocated() / GIB)

    def __enter__(self) -> "Captioner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _load(source: Source, plan: LoadPlan, name: str):
    import torch
    from transformers import AutoProcessor, Kosmos2ForConditionalGeneration

    kwargs: dict[str, Any] = {**source.kwargs(), "dtype": getattr(torch, plan.dtype)}
    if plan.eight_bit:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as e:
            raise ModelError("8-bit loading needs bitsandbytes, which is not installed. Run "
                             "'pip install bitsandbytes', or load in fp16 (quantize='none')."
                             ) from e
        kwargs.update(quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                      device_map={"": 0})
    try:
        model = Kosmos2ForConditionalGeneration.from_pretrained(source.path, **kwargs)
        processor = AutoProcessor.from_pretrained(source.path, **source.kwargs())
    except (OSError, ValueError) as e:  # AutoProcessor turns a missing file into ValueError
        if source.cache is not None and (source.local_only or use_cache_only()
                                         or "connect" in str(e).lower()):
            raise _offline_error(name, source.cache) from e
        raise ModelError(f"Could not load the captioning model {name!r}: {e}. Check the "
                         "name; if the download was interrupted, run again to resume it."
                         ) from e
    if not plan.eight_bit:
        model.to(plan.device)
    return processor, model.eval()
