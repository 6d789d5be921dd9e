"""LoRA: checkpoint sizes against full fine-tuning, and the T4 VRAM estimate with its
derivation (SDXL at 1024 px, SD 1.5 at 512 px).

Measured: the checkpoints of tiny SDXL runs of both methods (one UNet and one text encoder
step each, a checkpoint after each). Counted on PyTorch's meta device (the real
architectures built from their configs, no weights, no memory): the parameters of SDXL's and
SD 1.5's parts and of their rank-16 adapters, and the activations autograd keeps in a
LoRA training step. Estimated from those counts: real SDXL's checkpoints and the peak VRAM
(fastsd.train.settings.estimate_vram_gib, in GiB), labelled as estimates, never graded.

Run: .venv/bin/python benchmarks/bench_lora.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import Row, write_result

SD15_UNET = dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
SDXL_UNET = dict(sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                   "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                 cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, hidden_act="quick_gelu", vocab_size=49408,
              max_position_embeddings=77)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, hidden_act="gelu", vocab_size=49408,
              max_position_embeddings=77, projection_dim=1280)
RANK = 16  # TrainSettings' default


def meta_parts(family: str) -> dict:
    """The real UNet and text encoders of ``family`` on the meta device, with rank-16
    adapters where fastsd puts them."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from fastsd.train import lora

    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel(**(SDXL_UNET if family == "sdxl" else SD15_UNET)),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L))}
        if family == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
    for name, m in parts.items():
        m.requires_grad_(False)
        lora.add(m, lora.blocks_of(name), lora.Adapters(RANK, RANK / 2))
    return parts


def counts(parts: dict) -> tuple[dict, dict]:
    from fastsd.train import lora

    base = {k: sum(p.numel() for n, p in m.named_parameters() if not lora.is_adapter(n))
            for k, m in parts.items()}
    return base, {k: lora.count(m) for k, m in parts.items()}


def saved_activations(unet, family: str, res: int) -> dict[str, float]:
    """GiB of what autograd keeps in one fp16 forward of ``unet`` (adapters in place) at
    ``res`` px, counted by a saved-tensors hook: each storage once, views of the (frozen)
    weights not counted (they are not new memory), nor the L x L attention matrices that
    SDPA's memory-efficient kernels never store. With gradient checkpointing (diffusers
    recomputes one transformer or ResNet block at a time), the peak is what is kept (the
    blocks' inputs) plus the largest one block's saved tensors."""
    import torch

    from fastsd.env import GIB
    from fastsd.train import lora

    unet = unet.to(torch.float16).train()
    for p in lora.weights(unet):  # as in the UNet stage: the adapters train
        p.requires_grad_(True)
    units = [m for m in unet.modules() if type(m).__name__ in (
        "BasicTransformerBlock", "ResnetBlock2D", "Downsample2D", "Upsample2D")]
    current: list = [None]
    for i, u in enumerate(units):
        u.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
        u.register_forward_hook(lambda m, a, o: current.__setitem__(0, None))
    seqs: set[int] = set()
    for m in unet.modules():
        if type(m).__name__ == "Attention":
            m.register_forward_pre_hook(
                lambda m, a, kw: seqs.add((a[0] if a else kw["hidden_states"]).shape[1]),
                with_kwargs=True)
    seen: set[int] = set()
    per: dict = {}

    def pack(t):
        b = t._base if t._base is not None else t
        if not isinstance(b, torch.nn.Parameter) and id(b) not in seen:
            seen.add(id(b))
            square = b.dim() >= 3 and b.shape[-1] == b.shape[-2] and b.shape[-1] in seqs
            if not (square and (b.dim() == 3 or b.shape[1] <= 64)):  # not heads x L x L
                per[current[0]] = per.get(current[0], 0) + b.numel() * b.element_size()
        return t

    def forward() -> dict:
        seen.clear()
        per.clear()
        side, width = res // 8, 2048 if family == "sdxl" else 768
        x = torch.randn(1, 4, side, side, device="meta", dtype=torch.float16)
        h = torch.randn(1, 77, width, device="meta", dtype=torch.float16)
        added = ({"text_embeds": torch.randn(1, 1280, device="meta", dtype=torch.float16),
                  "time_ids": torch.randn(1, 6, device="meta", dtype=torch.float16)}
                 if family == "sdxl" else None)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            unet(x, torch.tensor([500], device="meta"), h, added_cond_kwargs=added)
        return dict(per)

    forward()  # learns the sequence lengths of the attentions
    full = forward()
    total = sum(full.values()) / GIB
    largest = max(v for k, v in full.items() if k is not None) / GIB
    unet.enable_gradient_checkpointing()
    kept = sum(forward().values()) / GIB
    return {"saved_gib": total, "kept_gib": kept, "largest_gib": largest,
            "fraction": (kept + largest) / total}


def checkpoint_bytes(method: str, home: Path) -> int:
    """The largest checkpoint of a tiny SDXL run of ``method``."""
    from fastsd import session
    from fastsd.dataset import samples
    from fastsd.train import TrainSettings, checkpoint, train

    s = session.create(method, home, base_model="tiny-sdxl", class_word="cat", resolution=64)
    samples.write(s.instance_images, ["chelsea", "astronaut"])
    train(s, TrainSettings(method=method, unet_steps=1, text_steps=1, checkpoint_every=1,
                           keep_checkpoints=2))
    return max(sum(f.stat().st_size for f in c.path.iterdir())
               for c in checkpoint.listing(s.checkpoints))


def main() -> None:
    import os

    from fastsd.env import GIB, DeviceInfo
    from fastsd.models import registry, tiny
    from fastsd.train import settings as S

    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        home = Path(tmp)
        os.environ["FASTSD_HOME"] = str(home)
        tiny.ensure("sdxl", home / "models")
        tiny_ck = {m: checkpoint_bytes(m, home) for m in ("full", "lora")}

    t4 = DeviceInfo("cuda", "Tesla T4", 14.5, 14.74, (7, 5))  # 15,828,320,256 bytes
    found = {}
    for family, res in (("sdxl", 1024), ("sd1", 512)):
        parts = meta_parts(family)
        base, adapters = counts(parts)
        want = registry.get("sdxl" if family == "sdxl" else "sd15").params
        assert base == want, (base, want)  # the configs are the real models'
        act = saved_activations(parts["unet"], family, res)
        st, _ = S.resolve(S.TrainSettings(method="lora", resolution=res), t4, res)
        full, _ = S.resolve(S.TrainSettings(resolution=res), t4, res)
        found[family] = dict(base=base, adapters=adapters, act=act, st=st,
                             vram=S.estimate_vram_gib(st, family, base, adapters),
                             vram_full=S.estimate_vram_gib(full, family, base),
                             ck=S.drive_plan(st, base, 0, adapters=adapters).checkpoint,
                             ck_full=S.drive_plan(full, base, 0).checkpoint,
                             file=S.drive_plan(st, base, 0, adapters=adapters).lora)
    xl, sd = found["sdxl"], found["sd1"]
    rows = [
        Row("checkpoint, tiny SDXL, LoRA vs full (measured)", "MB",
            round(tiny_ck["lora"] / 1e6, 2), round(tiny_ck["full"] / 1e6, 2),
            higher_is_better=False),
        Row("checkpoint, SDXL, T4 preset, LoRA rank 16 vs full (estimate from parameter "
            "counts)", "MB", round(xl["ck"] / 1e6), round(xl["ck_full"] / 1e6),
            higher_is_better=False),
        Row("LoRA file, SDXL, rank 16, fp16 (estimate from parameter counts)", "MB",
            round(xl["file"] / 1e6)),
        Row("peak VRAM, SDXL LoRA vs full at 1024 px, T4 preset (estimate)", "GiB",
            max(xl["vram"].values()), max(xl["vram_full"].values()),
            higher_is_better=False),
        Row("peak VRAM, SD 1.5 LoRA vs full at 512 px, T4 preset (estimate)", "GiB",
            max(sd["vram"].values()), max(sd["vram_full"].values()),
            higher_is_better=False),
    ]

    def derivation(name: str, f: dict, res: int) -> str:
        st, a, b, act = f["st"], f["adapters"], f["base"], f["act"]
        text = sum(v for k, v in b.items() if k != "unet")
        a_text = sum(v for k, v in a.items() if k != "unet")
        fam = "sdxl" if name == "SDXL" else "sd1"
        acts = (S.LORA_ACTIVATION_BYTES_512[fam] * S.BACKWARD_FACTOR * (res / 512) ** 2
                * S.LORA_CHECKPOINTED_FRACTION[fam]) / GIB
        return (
            f"**{name} at {res} px, T4 preset** (fp16 mixed precision, the frozen base in "
            f"{st.base_dtype()}, fp32 adapters, 8-bit AdamW, gradient checkpointing, batch 1, "
            f"the text encoders and the VAE off the GPU once the latent and embedding caches "
            f"are built): UNet stage **{f['vram']['unet']:.1f} GiB**, text encoder stage "
            f"**{f['vram']['text']:.1f} GiB** (full fine-tuning by the same formula: "
            f"{max(f['vram_full'].values()):.1f} GiB; a T4 has {t4.vram_total_gib} GiB). "
            f"UNet stage = {b['unet'] / 1e6:,.0f} M frozen UNet parameters x 2 B = "
            f"{b['unet'] * 2 / GIB:.2f} GiB + {a['unet'] / 1e6:.1f} M adapter parameters "
            f"(rank {RANK}; counted on the meta device) x (4 B fp32 weights + 4 B gradients + "
            f"2 B 8-bit Adam moments + 2 B fp16 autocast copies) = {a['unet'] * 12 / GIB:.2f} "
            f"GiB + activations {acts:.2f} GiB + {S.CUDA_OVERHEAD_GIB} GiB CUDA context and "
            f"workspace. Activations: autograd keeps {act['saved_gib']:.2f} GiB in a {res} px "
            f"fp16 forward with the adapters in place (measured on the meta device: each "
            f"storage once, not the views of frozen weights it keeps for the input gradients, "
            f"not the L x L attention matrices SDPA's memory-efficient kernel never stores); "
            f"with gradient checkpointing, diffusers keeps the blocks' inputs "
            f"({act['kept_gib']:.2f} GiB) and recomputes one transformer or ResNet block at a "
            f"time (the largest keeps {act['largest_gib']:.2f} GiB): a fraction "
            f"{act['fraction']:.3f}; the estimate uses "
            f"{S.LORA_ACTIVATION_BYTES_512[fam] / GIB:.2f} GiB per 512 px image x "
            f"{(res / 512) ** 2:.0f} (pixels) x {S.LORA_CHECKPOINTED_FRACTION[fam]} (rounded "
            f"up) x {S.BACKWARD_FACTOR} for the backward's temporaries. Text encoder stage: the "
            f"frozen UNet and text encoders ({(b['unet'] + text) / 1e6:,.0f} M) x 2 B + the "
            f"UNet's trained adapters x 4 B + {a_text / 1e6:.1f} M text encoder adapters x "
            f"12 B + the same activations and overhead.")

    notes = (
        "Tiny SDXL runs of each method, one UNet and one text encoder step, a checkpoint "
        "after each; the larger checkpoint of each run (LoRA: the adapters, their AdamW "
        "state, the RNG and the data order; full: the trained modules' weights and their "
        "AdamW state). The tiny model's UNet is small next to its adapters, so its ratio "
        "understates the real one. **Real SDXL, from parameter counts** (the UNet "
        f"{xl['base']['unet']:,}, text encoders {xl['base']['text_encoder']:,} and "
        f"{xl['base']['text_encoder_2']:,} parameters, equal to the registry's; rank-16 "
        f"adapters: UNet {xl['adapters']['unet']:,}, text encoders "
        f"{xl['adapters']['text_encoder']:,} and {xl['adapters']['text_encoder_2']:,}): a "
        "checkpoint holds the trained weights in fp32 (4 B) and their 8-bit AdamW state (2 B; "
        "fastsd.train.settings.drive_plan), the largest being the text encoder stage's "
        "(its weights and state + the UNet's trained weights). An estimate, not a "
        "measurement.\n\n**T4 VRAM estimates for LoRA** (not measured on a T4; "
        "fastsd.train.settings.estimate_vram_gib):\n\n" + derivation("SDXL", xl, 1024) + "\n\n"
        + derivation("SD 1.5", sd, 512))
    write_result("lora", "LoRA: checkpoint sizes and the T4 VRAM estimate", rows,
                 command=".venv/bin/python benchmarks/bench_lora.py", notes=notes)


if __name__ == "__main__":
    main()
