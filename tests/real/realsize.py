"""Helpers of the real-size tier (a plain module: the tests import it by name)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def t4_policy(folder: Path):
    """The memory options the engine chooses for this model on Colab's T4."""
    from fastsd import env
    from fastsd.webui import memory

    return memory.MemoryPolicy().resolve(env.COLAB_T4, memory.weights_gib(folder))


def cache_configs(home: Path, family: str, model: Path) -> Path:
    """The family's config files in the workspace's Hub cache, as a first online run leaves
    them (tests/conftest.py's helper, loaded by path: from here `conftest` is this tier's)."""
    spec = importlib.util.spec_from_file_location("fastsd_tests_conftest", TESTS / "conftest.py")
    shared = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shared)
    return shared.cache_family_configs(home, family, model)


def cpu_compute(pipe) -> None:
    """The T4's fp16 UNet and text encoders in bf16 for this CPU, whose fp16 arithmetic is
    three times slower than its bf16 (the VAE stays as loaded)."""
    import torch

    for name in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(torch.bfloat16)


def subject_session(name: str, root: Path, model: Path, resolution: int, n: int = 2):
    """A session on the full-size ``model`` with ``n`` photos of one subject (a red disc
    with a yellow square, at different places on a textured grey background), each a
    little larger than ``resolution``."""
    import numpy as np
    from PIL import Image, ImageDraw

    from fastsd import session

    s = session.create(name, root, base_model=str(model), instance_token="sks",
                       class_word="toy", resolution=resolution)
    rng = np.random.default_rng(0)
    size = resolution + resolution // 4
    for i in range(n):
        im = Image.fromarray((200 + rng.normal(0, 6, (size, size, 3))).clip(0, 255)
                            .astype("uint8"))
        d = ImageDraw.Draw(im)
        x, y, r = size // 8 + i * size // 10, size // 6, size // 2
        d.ellipse((x, y, x + r, y + r), fill=(210, 30, 40))
        d.rectangle((x + r // 3, y + r // 3, x + 2 * r // 3, y + 2 * r // 3), fill=(250, 220, 30))
        im.save(s.instance_images / f"toy{i}.png")
    return s


#: The T4 preset as far as a CPU goes: bf16 autocast where the T4 runs fp16, 8-bit AdamW
#: (bitsandbytes' CPU kernels), gradient checkpointing, batch 1, fp16 export; no samples.
T4_ON_CPU = dict(preset="t4", mixed_precision="bf16", adam_8bit=True, sample_every=0)


def optimizer_moments(state: dict) -> list:
    """The moment tensors of an optimizer's state (bitsandbytes nests its quantized ones)."""
    import torch

    return [x for k, v in state.items() for x in (
        optimizer_moments(v) if isinstance(v, dict) else
        [v] if isinstance(v, torch.Tensor) and k.startswith(("state", "exp_avg")) else [])]
