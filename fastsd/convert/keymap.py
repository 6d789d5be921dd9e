"""The one map between diffusers tensor names and the original (LDM) single-file names.

The map is data: a few tables of renamed module paths (below) and, for the UNet and the
VAE, the block layout that numbers LDM's ``input_blocks``/``output_blocks``/``down``/``up``
from a diffusers config. :class:`KeyMap` turns them into prefix rules that serve both
directions: :meth:`KeyMap.to_ldm` (diffusers -> single file) and :meth:`KeyMap.to_diffusers`
(single file -> diffusers, used to verify what diffusers' loader produced).

A rule is ``(diffusers_prefix, ldm_prefix, op)``. The longest matching prefix wins and the
rest of the name is kept. ``op`` says how the tensor changes on the way to LDM:

- ``""``: unchanged;
- ``"conv1x1"``: a linear weight [o, i] becomes a 1x1 convolution [o, i, 1, 1] (VAE attention);
- ``"T"``: OpenCLIP's ``text_projection`` is the transpose of transformers' weight;
- ``"part"``: three diffusers tensors (q, k, v: :attr:`Target.index` 0, 1, 2) are stacked
  into OpenCLIP's ``in_proj_weight``/``in_proj_bias``.

Text-encoder names are compared without transformers' ``text_model.`` prefix, which
transformers 5 leaves out for CLIPTextModel and keeps for CLIPTextModelWithProjection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from fastsd.errors import ModelError

# --------------------------------------------------------------------------- the tables

# Where each diffusers component lives in a single file, per family. "clip" is a
# transformers CLIPTextModel kept as is under ``...transformer.text_model.``; "openclip" is
# OpenCLIP's own layout.
LAYOUTS: dict[str, list[tuple[str, str, str]]] = {
    # family: [(diffusers folder, ldm prefix, kind)]
    "sd1": [("unet", "model.diffusion_model.", "unet"),
            ("vae", "first_stage_model.", "vae"),
            ("text_encoder", "cond_stage_model.transformer.text_model.", "clip")],
    "sd2": [("unet", "model.diffusion_model.", "unet"),
            ("vae", "first_stage_model.", "vae"),
            ("text_encoder", "cond_stage_model.model.", "openclip")],
    "sdxl": [("unet", "model.diffusion_model.", "unet"),
             ("vae", "first_stage_model.", "vae"),
             ("text_encoder", "conditioner.embedders.0.transformer.text_model.", "clip"),
             ("text_encoder_2", "conditioner.embedders.1.model.", "openclip")],
}

# folder -> ldm prefix, per family
COMPONENT_PREFIX: dict[str, dict[str, str]] = {
    family: {folder: prefix for folder, prefix, _ in parts} for family, parts in LAYOUTS.items()}
COMPONENT_KIND: dict[str, dict[str, str]] = {
    family: {folder: kind for folder, _, kind in parts} for family, parts in LAYOUTS.items()}

# EMA copies of the UNet: diffusers training scripts save them as a ``unet_ema`` folder; LDM
# keeps them as ``model_ema.`` + the UNet key without its dots.
EMA_FOLDER = "unet_ema"
EMA_PREFIX = "model_ema."
UNET_PREFIX = "model.diffusion_model."

UNET_TOP = [("time_embedding.linear_1.", "time_embed.0."),
            ("time_embedding.linear_2.", "time_embed.2."),
            ("add_embedding.linear_1.", "label_emb.0.0."),
            ("add_embedding.linear_2.", "label_emb.0.2."),
            ("conv_in.", "input_blocks.0.0."),
            ("conv_norm_out.", "out.0."),
            ("conv_out.", "out.2.")]
UNET_RESNET = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."),
               ("time_emb_proj.", "emb_layers.1."), ("norm2.", "out_layers.0."),
               ("conv2.", "out_layers.3."), ("conv_shortcut.", "skip_connection.")]

VAE_TOP = [("conv_in.", "conv_in."), ("conv_out.", "conv_out."),
           ("conv_norm_out.", "norm_out.")]
VAE_RESNET = [("conv_shortcut.", "nin_shortcut.")]
VAE_ATTENTION = [("group_norm.", "norm.", ""), ("to_q.", "q.", "conv1x1"),
                 ("to_k.", "k.", "conv1x1"), ("to_v.", "v.", "conv1x1"),
                 ("to_out.0.", "proj_out.", "conv1x1")]

OPENCLIP_TOP = [("embeddings.token_embedding.", "token_embedding.", ""),
                ("embeddings.position_embedding.weight", "positional_embedding", ""),
                ("final_layer_norm.", "ln_final.", ""),
                ("text_projection.weight", "text_projection", "T")]
OPENCLIP_LAYER = [("layer_norm1.", "ln_1.", ""), ("layer_norm2.", "ln_2.", ""),
                  ("mlp.fc1.", "mlp.c_fc.", ""), ("mlp.fc2.", "mlp.c_proj.", ""),
                  ("self_attn.out_proj.", "attn.out_proj.", ""),
                  ("self_attn.q_proj.", "attn.in_proj_", "q"),
                  ("self_attn.k_proj.", "attn.in_proj_", "k"),
                  ("self_attn.v_proj.", "attn.in_proj_", "v")]
QKV = ("q", "k", "v")

# Buffers some transformers versions save that a single file does not need.
DROPPED = ("embeddings.position_ids",)

TEXT_MODEL = "text_model."

# --------------------------------------------------------------------------- rules


Rule = tuple[str, str, str]


def _has_attention(block_type: str) -> bool:
    return "CrossAttn" in block_type or "Attn" in block_type


def _per_block(value: Any, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * n


def unet_rules(config: Mapping[str, Any]) -> list[Rule]:
    """Rules of a UNet2DConditionModel with ``config`` (SD 1.x, 2.x, XL layouts)."""
    rules: list[Rule] = [(d, l, "") for d, l in UNET_TOP]

    def resnet(d: str, l: str) -> None:
        rules.extend((d + a, l + b, "") for a, b in UNET_RESNET)

    down, up = config["down_block_types"], config["up_block_types"]
    n = len(down)
    layers = _per_block(config["layers_per_block"], n)
    idx = 1
    for i, kind in enumerate(down):
        for j in range(layers[i]):
            resnet(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{idx}.0.")
            if _has_attention(kind):
                rules.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{idx}.1.", ""))
            idx += 1
        if i < n - 1:
            rules.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{idx}.0.op.", ""))
            idx += 1
    resnet("mid_block.resnets.0.", "middle_block.0.")
    rules.append(("mid_block.attentions.0.", "middle_block.1.", ""))
    resnet("mid_block.resnets.1.", "middle_block.2.")
    idx = 0
    for i, kind in enumerate(up):
        attn = _has_attention(kind)
        n_layers = list(reversed(layers))[i] + 1
        for j in range(n_layers):
            resnet(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{idx}.0.")
            if attn:
                rules.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{idx}.1.", ""))
            if j == n_layers - 1 and i < n - 1:
                rules.append((f"up_blocks.{i}.upsamplers.0.conv.",
                              f"output_blocks.{idx}.{2 if attn else 1}.conv.", ""))
            idx += 1
    return rules


def vae_rules(config: Mapping[str, Any]) -> list[Rule]:
    """Rules of an AutoencoderKL with ``config``."""
    n = len(config["block_out_channels"])
    layers = int(config["layers_per_block"])
    rules: list[Rule] = [(p, p, "") for p in ("quant_conv.", "post_quant_conv.")]

    def resnet(d: str, l: str) -> None:
        rules.append((d, l, ""))
        rules.extend((d + a, l + b, "") for a, b in VAE_RESNET)

    for part in ("encoder.", "decoder."):
        rules.extend((part + d, part + l, "") for d, l in VAE_TOP)
        resnet(part + "mid_block.resnets.0.", part + "mid.block_1.")
        resnet(part + "mid_block.resnets.1.", part + "mid.block_2.")
        rules.extend((part + "mid_block.attentions.0." + d, part + "mid.attn_1." + l, op)
                     for d, l, op in VAE_ATTENTION)
    for i in range(n):
        for j in range(layers):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.")
        if i < n - 1:
            rules.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.",
                          f"encoder.down.{i}.downsample.conv.", ""))
        b = n - 1 - i
        for j in range(layers + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{b}.block.{j}.")
        if i < n - 1:
            rules.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.",
                          f"decoder.up.{b}.upsample.conv.", ""))
    return rules


def clip_rules(config: Mapping[str, Any]) -> list[Rule]:
    """transformers' CLIP text model is stored under its own names."""
    return [("", "", "")]


def openclip_rules(config: Mapping[str, Any]) -> list[Rule]:
    rules: list[Rule] = list(OPENCLIP_TOP)
    for n in range(int(config["num_hidden_layers"])):
        d, l = f"encoder.layers.{n}.", f"transformer.resblocks.{n}."
        rules.extend((d + a, l + b, op) for a, b, op in OPENCLIP_LAYER)
    return rules


RULES = {"unet": unet_rules, "vae": vae_rules, "clip": clip_rules, "openclip": openclip_rules}

# --------------------------------------------------------------------------- the map


def _candidates(name: str) -> Iterable[str]:
    """``name`` and its prefixes that end at a '.' or '_', longest first, then ''."""
    yield name
    for i in range(len(name) - 1, 0, -1):
        if name[i - 1] in "._":
            yield name[:i]
    yield ""


def _target(name: str, op: str) -> Target:
    return Target(name, "part", QKV.index(op)) if op in QKV else Target(name, op)


def strip_text_model(name: str) -> str:
    return name[len(TEXT_MODEL):] if name.startswith(TEXT_MODEL) else name


@dataclass
class Target:
    """Where one tensor goes: its new name and what happens to it on the way.

    ``op`` is "", "conv1x1", "T" or "part" (then ``index`` is 0, 1, 2 for q, k, v).
    """

    name: str
    op: str = ""
    index: int = 0

    @property
    def ldm(self) -> str:
        return self.name


@dataclass
class KeyMap:
    """The rules of one component (unet, vae, clip or openclip) under one LDM prefix."""

    kind: str
    ldm_prefix: str
    rules: list[Rule]
    _fwd: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)
    _back: dict[str, list[tuple[str, str]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for d, l, op in self.rules:
            self._fwd[d] = (l, op)
            self._back.setdefault(l, []).append((d, op))

    @classmethod
    def for_component(cls, kind: str, ldm_prefix: str, config: Mapping[str, Any]) -> "KeyMap":
        return cls(kind, ldm_prefix, RULES[kind](config))

    def is_text(self) -> bool:
        return self.kind in ("clip", "openclip")

    def dropped(self, diffusers_name: str) -> bool:
        return self.is_text() and strip_text_model(diffusers_name) in DROPPED

    def to_ldm(self, diffusers_name: str) -> Target:
        """The single-file name of a diffusers tensor name (ModelError when none fits)."""
        name = strip_text_model(diffusers_name) if self.is_text() else diffusers_name
        for c in _candidates(name):
            if c in self._fwd:
                l, op = self._fwd[c]
                return _target(self.ldm_prefix + l + name[len(c):], op)
        raise ModelError(f"The tensor {diffusers_name!r} of the {self.kind} has no place in "
                         "the single-file layout: the model is not a standard Stable "
                         "Diffusion 1.x/2.x/XL one, so it cannot be converted.")

    def to_diffusers(self, ldm_name: str) -> list[Target]:
        """The diffusers name(s) of a single-file tensor (three for a stacked q/k/v).

        Text-encoder names come without ``text_model.``; a target op says how to undo
        the change (``conv1x1``: squeeze; ``T``: transpose; ``part``: which third).
        """
        if not ldm_name.startswith(self.ldm_prefix):
            return []
        name = ldm_name[len(self.ldm_prefix):]
        for c in _candidates(name):
            if c in self._back:
                rest = name[len(c):]
                return [_target(d + rest, op) for d, op in self._back[c]]
        return []


@dataclass
class FamilyMap:
    """The key maps of every component of one family, given the diffusers configs."""

    family: str
    components: dict[str, KeyMap]  # diffusers folder -> map

    @classmethod
    def build(cls, family: str, configs: Mapping[str, Mapping[str, Any]]) -> "FamilyMap":
        comps = {}
        for folder, prefix, kind in LAYOUTS[family]:
            if folder in configs:
                comps[folder] = KeyMap.for_component(kind, prefix, configs[folder])
        return cls(family, comps)

    def locate(self, ldm_name: str) -> tuple[str, list[Target]] | None:
        """The diffusers folder and names of a single-file tensor, or None if outside."""
        for folder, km in self.components.items():
            if ldm_name.startswith(km.ldm_prefix):
                return folder, km.to_diffusers(ldm_name)
        return None


def component_map(family: str, folder: str, config: Mapping[str, Any]) -> KeyMap:
    """The key map of the diffusers component ``folder`` of ``family`` with ``config``."""
    return KeyMap.for_component(COMPONENT_KIND[family][folder], COMPONENT_PREFIX[family][folder],
                                config)

