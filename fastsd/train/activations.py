"""What the VRAM estimate assumes, counted on PyTorch's meta device (no memory, no time on
real tensors): the full-size UNet of each family (fastsd.models.full) runs one training
forward at a resolution, and a saved-tensors hook adds up what autograd keeps for the
backward, block by block.

The L x L attention matrices (square tensors saved inside an attention module; a square
feature map outside one is an activation like any other) are counted apart: PyTorch's
memory-efficient and flash SDPA kernels (what a T4, an L4 and an A100 run) never store them. With gradient checkpointing
only each block's input is kept, plus one block's activations while it is recomputed in
the backward: the largest block's.

:data:`fastsd.train.settings.ACTIVATION_BYTES_512` records :func:`measure`'s ``saved_gib``
at 512 px for each family, in bytes; tests/real checks the two agree, and benchmarks/gpu_check.py sets
the estimate against ``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

from typing import Any


def meta_unet(family: str):
    """The family's full-size UNet on the meta device, in fp16, in training mode."""
    import torch
    from diffusers import UNet2DConditionModel

    from fastsd.models import full

    with torch.device("meta"):
        unet = UNet2DConditionModel(**full.CONFIGS[family]["unet"])
    return unet.to(torch.float16).train()


def conditioning(family: str, batch: int, resolution: int, device="meta") -> dict[str, Any]:
    """The UNet's inputs for a batch at ``resolution``: noisy latents, timesteps, text
    states (and SDXL's pooled embedding and size ids)."""
    import torch

    from fastsd.models import full

    cfg = full.CONFIGS[family]["unet"]
    side = resolution // 8
    kw: dict[str, Any] = dict(
        sample=torch.randn(batch, 4, side, side, device=device, dtype=torch.float16),
        timestep=torch.full((batch,), 500, device=device),
        encoder_hidden_states=torch.randn(batch, 77, cfg["cross_attention_dim"], device=device,
                                          dtype=torch.float16))
    if family == "sdxl":
        pooled = full.CONFIGS["sdxl"]["text_encoder_2"][1]["projection_dim"]
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, device=device, dtype=torch.float16),
            "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]]
                                     * batch, device=device, dtype=torch.float16)}
    return kw


def measure(family: str, resolution: int = 512, batch: int = 1) -> dict[str, float]:
    """GiB that one fp16 training forward of ``family``'s UNet keeps for the backward.

    Returns ``params`` (the UNet's parameter count), ``saved_gib`` (without the L x L
    attention matrices), ``attn_matrices_gib`` (those), ``ckpt_inputs_gib`` (what gradient
    checkpointing keeps: the blocks' inputs) and ``largest_block_gib`` (the block
    recomputed at the peak)."""
    import torch
    from diffusers.models.attention_processor import Attention

    from fastsd.env import GIB

    unet = meta_unet(family)
    params = sum(p.numel() for p in unet.parameters())
    inside = [0]  # how deep in attention modules the forward is
    for m in unet.modules():
        if isinstance(m, Attention):
            m.register_forward_pre_hook(lambda *a: inside.__setitem__(0, inside[0] + 1))
            m.register_forward_hook(lambda *a: inside.__setitem__(0, inside[0] - 1))
    blocks = {**{f"down{i}": b for i, b in enumerate(unet.down_blocks)}, "mid": unet.mid_block,
              **{f"up{i}": b for i, b in enumerate(unet.up_blocks)}}
    current = ["outside"]
    for name, b in blocks.items():
        b.register_forward_pre_hook(lambda m, a, n=name: current.__setitem__(0, n))
        b.register_forward_hook(lambda m, a, o: current.__setitem__(0, "outside"))
    attn = [0]
    seen: set[int] = set()
    kept: list[dict[str, int]] = [{}]

    def pack(t):
        weight = isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)
        if not weight and id(t) not in seen:  # a view of a weight (linear's W^T) is no memory
            seen.add(id(t))
            n = t.numel() * t.element_size()
            if inside[0] and t.dim() >= 3 and t.shape[-1] == t.shape[-2]:
                attn[0] += n  # self-attention scores or probabilities: L x L
            else:
                kept[0][current[0]] = kept[0].get(current[0], 0) + n
        return t

    def forward() -> dict[str, int]:
        seen.clear()
        attn[0] = 0
        kept[0] = {}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unet(**conditioning(family, batch, resolution))
        return kept[0]

    full_pass = forward()
    attn_gib = attn[0] / GIB
    unet.enable_gradient_checkpointing()
    inputs = sum(forward().values()) / GIB
    return {"params": params, "saved_gib": sum(full_pass.values()) / GIB,
            "attn_matrices_gib": attn_gib, "ckpt_inputs_gib": inputs,
            "largest_block_gib": max(v for k, v in full_pass.items() if k != "outside") / GIB}
