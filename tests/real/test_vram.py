"""The VRAM estimate (fastsd.train.settings.estimate_vram_gib) against counts on PyTorch's
meta device (no memory, no time): the full-size UNets' parameters and the activations a
training forward keeps (fastsd.train.activations). On a GPU, benchmarks/gpu_check.py sets
it against torch.cuda.max_memory_allocated."""

from __future__ import annotations

import pytest

from fastsd.models import full, registry
from fastsd.train import activations
from fastsd.env import GIB
from fastsd.train.settings import ACTIVATION_BYTES_512, CHECKPOINTED_FRACTION


@pytest.mark.parametrize("family", full.FAMILIES)
def test_the_estimates_activation_figures_are_the_meta_device_measure(family):
    at_512 = activations.measure(family, 512)
    native = full.CONFIGS[family]["resolution"]
    assert at_512["params"] == registry.get(full.NAMES[family]).params["unet"]
    assert ACTIVATION_BYTES_512[family] == pytest.approx(at_512["saved_gib"] * GIB, rel=0.01)
    # checkpointing keeps the blocks' inputs and recomputes one block at a time
    kept = (at_512["ckpt_inputs_gib"] + at_512["largest_block_gib"]) / at_512["saved_gib"]
    assert kept <= CHECKPOINTED_FRACTION
    if native != 512:  # the estimate scales with the pixel count: within 5% at native size
        at_native = activations.measure(family, native)
        scaled = ACTIVATION_BYTES_512[family] / GIB * (native / 512) ** 2
        assert at_native["saved_gib"] == pytest.approx(scaled, rel=0.05)
