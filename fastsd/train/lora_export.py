"""The trained LoRA as one ``.safetensors`` file in kohya-ss' layout, which AUTOMATIC1111,
Forge, ComfyUI and diffusers' ``load_lora_weights`` all read (:func:`write`); and its merge
into the base model, as a whole diffusers model and its single file (:func:`merge`).

The layout (sd-scripts networks/lora.py; AUTOMATIC1111's extensions-builtin/Lora and
ComfyUI's comfy/lora.py map the same names). Each adapted layer is named
``PREFIX_PATH`` with the dots of its module path as ``_``, and holds three tensors:
``NAME.lora_down.weight`` (A, rank x in), ``NAME.lora_up.weight`` (B, out x rank; 1x1
convolutions keep their two trailing 1s) and ``NAME.alpha`` (a scalar: the update is B A x
times alpha / rank). Prefixes: ``lora_unet`` for the UNet; ``lora_te`` for the text encoder
of SD 1.x and 2.x, ``lora_te1`` and ``lora_te2`` for SDXL's two. Paths:

* text encoders: transformers' CLIP names, ``text_model.encoder.layers.N.self_attn.q_proj``
  (``k_proj``, ``v_proj``, ``out_proj``, ``mlp.fc1``, ``mlp.fc2``);
* the UNet of SD 1.x/2.x: diffusers' names, which kohya's own SD UNet keeps
  (``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``, ``mid_block.…``,
  ``up_blocks.…``, ``…proj_in``, ``…ff.net.0.proj``, ``…attn2.to_out.0``);
* the UNet of SDXL: the original (sgm) UNet's names, which kohya trains SDXL on:
  ``down_blocks.i.attentions.j`` is ``input_blocks.(1 + i (L+1) + j).1``,
  ``mid_block.attentions.0`` is ``middle_block.1`` and ``up_blocks.i.attentions.j`` is
  ``output_blocks.(i (L+1) + j).1``, with L the UNet's layers per block (2).

The metadata are kohya's ``ss_*`` keys (network module, rank, alpha, base model and its
version, resolution, the caption tags and their counts) and the ModelSpec keys
(``modelspec.architecture``, ``modelspec.trigger_phrase``...), as strings.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

from fastsd import drive, options
from fastsd.errors import ModelError
from fastsd.train import lora

log = logging.getLogger("fastsd")

NETWORK_MODULE = "networks.lora"  # kohya's name of a plain LoRA
#: kohya's ss_base_model_version (library/model_util.py, sdxl_model_util.py)
BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
#: ModelSpec architecture ids (sd-scripts library/sai_model_spec.py)
ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
                "sdxl": "stable-diffusion-xl-v1-base"}


def prefixes(family: str) -> dict[str, str]:
    """The kohya prefix of each part of a ``family`` model."""
    if family == "sdxl":
        return {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    return {"unet": "lora_unet", "text_encoder": "lora_te"}


def sgm_path(path: str, layers_per_block: int) -> str:
    """An SDXL UNet attention block's diffusers path in the original UNet's numbering."""
    step = layers_per_block + 1
    for pattern, to in ((r"down_blocks\.(\d+)\.attentions\.(\d+)\.",
                         lambda i, j: f"input_blocks.{1 + i * step + j}.1."),
                        (r"mid_block\.attentions\.(0)\.()", lambda i, j: "middle_block.1."),
                        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.",
                         lambda i, j: f"output_blocks.{i * step + j}.1.")):
        m = re.match(pattern, path)
        if m:
            return to(int(m[1]), int(m[2] or 0)) + path[m.end():]
    raise ModelError(f"{path} is not inside an attention block of an SDXL UNet.")


def layer_name(part: str, path: str, family: str, layers_per_block: int) -> str:
    """The kohya name of the layer at ``path`` of ``part`` ("unet", "text_encoder"...)."""
    if part == "unet":
        path = sgm_path(path, layers_per_block) if family == "sdxl" else path
    else:  # transformers 5 drops the text_model level of CLIPTextModel; kohya keeps it
        path = "text_model." + path.removeprefix("text_model.")
    return f"{prefixes(family)[part]}_{path.replace('.', '_')}"


def _layers_per_block(unet) -> int:
    lpb = unet.config.layers_per_block
    if isinstance(lpb, int):
        return lpb
    if len(set(lpb)) == 1:
        return int(lpb[0])
    raise ModelError(f"This UNet has {lpb} layers per block; the SDXL LoRA layout needs the "
                     "same number in every block.")


def kohya_tensors(parts, names: list[str], dtype) -> dict[str, Any]:
    """The adapters of the parts ``names`` (those trained) as kohya's tensors, in ``dtype``."""
    import torch

    if parts.adapters is None:
        raise ModelError("This run trained no LoRA: there is nothing to write as one.")
    lpb = _layers_per_block(parts.unet)
    out: dict[str, Any] = {}
    for part, module in parts.modules().items():
        if part not in names:
            continue
        for key, t in lora.state(module).items():
            layer, _, which = key.rpartition(".lora_")
            name = layer_name(part, layer, parts.family, lpb)
            side = "down" if which.startswith("A.") else "up"
            out[f"{name}.lora_{side}.weight"] = t.detach().to("cpu", dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(parts.adapters.alpha), dtype=dtype)
    return out


def metadata(parts, settings, *, title: str, base_model: str, trigger: str,
             captions: list[str], steps: int) -> dict[str, str]:
    """kohya's ss_* metadata and the ModelSpec keys, as strings."""
    from fastsd.convert.detect import META_FAMILY, META_PREDICTION

    fam, a = parts.family, parts.adapters
    res = settings.resolution
    version = BASE_VERSION[fam] + ("_v" if parts.v_prediction else "")
    tags = Counter(t.strip() for c in captions for t in c.split(",") if t.strip())
    meta = {
        "ss_network_module": NETWORK_MODULE, "ss_network_dim": str(a.rank),
        "ss_network_alpha": f"{a.alpha:g}", "ss_network_dropout": f"{a.dropout:g}",
        "ss_base_model_version": version, "ss_v2": str(fam == "sd2"),
        "ss_sd_model_name": base_model, "ss_output_name": title,
        "ss_resolution": f"({res}, {res})", "ss_num_train_images": str(len(captions)),
        "ss_max_train_steps": str(steps), "ss_seed": str(settings.seed),
        "ss_unet_lr": f"{settings.unet_lr:g}", "ss_text_encoder_lr": f"{settings.text_lr:g}",
        "ss_mixed_precision": str(settings.mixed_precision),
        "ss_tag_frequency": json.dumps({title: dict(tags)}),
        "ss_training_comment": f"fastsd DreamBooth LoRA; trigger: {trigger}",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ("stable-diffusion-v2-768-v" if fam == "sd2"
                                   and parts.v_prediction else ARCHITECTURE[fam]) + "/lora",
        "modelspec.implementation": "diffusers", "modelspec.title": title,
        "modelspec.resolution": f"{res}x{res}", "modelspec.trigger_phrase": trigger,
        "modelspec.prediction_type": "v" if parts.v_prediction else "epsilon",
        META_FAMILY: fam,
        META_PREDICTION: "v_prediction" if parts.v_prediction else "epsilon",
    }
    return meta


def write(parts, settings, dest: Path, names: list[str], meta: dict[str, str]) -> Path:
    """Write the LoRA of the parts ``names`` to ``dest``, whole or not at all, at the
    run's save precision."""
    import torch
    from safetensors.torch import save

    dtype = torch.float16 if settings.save_precision == "fp16" else torch.float32
    tensors = kohya_tensors(parts, names, dtype)
    drive.atomic_write_bytes(dest, save(tensors, metadata=meta))
    log.info("LoRA: %s (%d layers, %.1f MB)", dest, len(tensors) // 3,
             dest.stat().st_size / 1e6)
    return dest


# --------------------------------------------------------------------------- merge


def merge(lora_file: Path, base_dir: Path, dest: Path, weight: float = 1.0,
          precision: str = "fp16") -> tuple[Path, Path]:
    """The base model with the LoRA's update added to its weights (times ``weight``):
    written as a diffusers folder ``dest`` and its single file beside it. The base is
    loaded once, in ``precision``, and changed in place."""
    from fastsd.convert import to_single_file
    from fastsd.train.parts import load_parts

    lora_file = Path(lora_file)
    parts = load_parts(base_dir, precision)
    pipe = parts.pipe
    try:
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name,
                               adapter_name="merge")
    except (ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"{lora_file.name} does not fit the base model {base_dir} "
                         f"({str(e).splitlines()[0][:200]}). Merge it into the model it was "
                         "trained on.") from e
    pipe.fuse_lora(lora_scale=weight, adapter_names=["merge"])
    pipe.unload_lora_weights()
    with drive.folder_writer(dest) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    single = to_single_file(dest, dest.parent / f"{dest.name}.safetensors",
                            fp16=precision != "fp32")
    log.info("Merged %s (weight %g) into %s: %s and %s", lora_file.name, weight, base_dir,
             dest, single)
    return dest, single


def session_lora(session, name: str | None = None) -> Path:
    """The session's trained LoRA file (the newest, or the one named)."""
    found = session.lora(name)
    if found is None:
        raise ModelError(f"Session {session.name!r} has no trained LoRA"
                         + (f" named {name!r}" if name else "") + f" in {session.loras}. "
                         "Train one first: "
                         f"{options.say(('method', 'lora'), session=session.name)}.")
    return found


def merge_session(session, weight: float = 1.0, name: str | None = None,
                  precision: str = "fp16") -> tuple[Path, Path]:
    """Merge the session's LoRA into the session's base model, as the session's trained
    model ``models/NAME-merged`` and its single file."""
    from fastsd import models

    lora_file = session_lora(session, name)
    base = models.local_copy(models.resolve_model(session.base_model, session.workspace))
    return merge(lora_file, base, Path(session.models) / f"{lora_file.stem}-merged", weight,
                 precision)
