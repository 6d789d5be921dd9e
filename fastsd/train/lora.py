"""LoRA adapters on a frozen base model: where they go, what a stage trains of them, and
what a checkpoint keeps (with peft, which diffusers itself trains LoRAs with).

The adapters sit where kohya-ss' sd-scripts (networks/lora.py) puts them, so that the
exported file has the layout AUTOMATIC1111, Forge and ComfyUI read
(:mod:`fastsd.train.lora_export`): on every ``nn.Linear`` and 1x1 ``nn.Conv2d`` inside the
UNet's ``Transformer2DModel`` blocks (proj_in, the attentions' q/k/v/out, the feed-forward,
proj_out), and on every ``nn.Linear`` of the text encoders' ``CLIPAttention`` and
``CLIPMLP`` modules (q/k/v/out_proj, fc1, fc2). An adapter adds ``alpha / rank * B(A(x))``
to its layer's output; B starts at zero, so an untrained adapter changes nothing.

The adapters' weights stay fp32 (they are trained) whatever the precision of the base.
They are made from the run's seed alone, so a resumed run makes the very same ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastsd import options
from fastsd.errors import DataError

#: kohya's target blocks: the UNet's transformer blocks, the text encoders' attention and
#: MLP (sd-scripts networks/lora.py UNET_TARGET_REPLACE_MODULE and
#: TEXT_ENCODER_TARGET_REPLACE_MODULE).
UNET_BLOCKS = ("Transformer2DModel",)
TEXT_BLOCKS = ("CLIPAttention", "CLIPMLP")
ADAPTER = "fastsd"  # the adapters' name inside peft


@dataclass(frozen=True)
class Adapters:
    """The shape of the LoRA a run trains."""

    rank: int
    alpha: float
    dropout: float = 0.0

    @classmethod
    def of(cls, settings) -> "Adapters":
        return cls(settings.rank, settings.alpha, settings.lora_dropout)


def blocks_of(name: str) -> tuple[str, ...]:
    """The block classes that hold the adapters of the part ``name``."""
    return UNET_BLOCKS if name == "unet" else TEXT_BLOCKS


def target_modules(model, blocks: tuple[str, ...]) -> list[str]:
    """The names of the layers that get an adapter: each linear (or 1x1 convolution) layer
    inside a module whose class is one of ``blocks``."""
    import torch

    out = []
    for name, module in model.named_modules():
        if type(module).__name__ not in blocks:
            continue
        for child, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear) or (
                    isinstance(layer, torch.nn.Conv2d) and tuple(layer.kernel_size) == (1, 1)):
                out.append(f"{name}.{child}" if name else child)
    return out


def add(model, blocks: tuple[str, ...], adapters: Adapters) -> int:
    """Put an adapter on each target layer of ``model`` (frozen, trainable adapters stay
    off until a stage turns them on); returns how many layers got one."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    targets = target_modules(model, blocks)
    if not targets:
        raise DataError(f"{type(model).__name__} has none of the layers a LoRA trains "
                        f"(inside {', '.join(blocks)}); train the whole model: "
                        f"{options.say(('method', 'full'))}.")
    config = LoraConfig(r=adapters.rank, lora_alpha=adapters.alpha,
                        lora_dropout=adapters.dropout, target_modules=targets,
                        init_lora_weights=True)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for p in weights(model):
        p.data = p.data.to(torch.float32)
        p.requires_grad_(False)
    return len(targets)


def add_to_parts(parts, adapters: Adapters, seed: int) -> None:
    """Adapters on the UNet and every text encoder of ``parts``, drawn from ``seed`` alone
    (the global random state is left as it was)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, module in parts.modules().items():
            add(module, blocks_of(name), adapters)
            module.eval()  # the new adapters too: their dropout only in a stage that trains


def is_adapter(name: str) -> bool:
    """Whether a parameter name is an adapter's (peft's lora_A / lora_B)."""
    return ".lora_A." in name or ".lora_B." in name


def weights(model) -> list:
    """The adapters' parameters of ``model``."""
    return [p for n, p in model.named_parameters() if is_adapter(n)]


def count(model) -> int:
    return sum(p.numel() for p in weights(model))


def state(model) -> dict[str, Any]:
    """The adapters' weights of ``model``, by layer name (``LAYER.lora_A.weight``)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER)


def load_state(model, tensors: dict[str, Any]) -> None:
    """Put back what :func:`state` returned; every adapter must be there."""
    from peft.utils import set_peft_model_state_dict

    want = set(state(model))
    if set(tensors) != want:
        missing, extra = sorted(want - set(tensors)), sorted(set(tensors) - want)
        raise DataError(
            f"The checkpoint's LoRA does not fit this model ({len(missing)} adapters "
            f"missing, e.g. {missing[:1]}; {len(extra)} unknown, e.g. {extra[:1]}). Resume "
            f"with the settings the run started with, or start over: {options.say('restart')}.")
    set_peft_model_state_dict(model, tensors, adapter_name=ADAPTER)
