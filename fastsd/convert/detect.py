"""What a model is, from its tensor names and shapes (or its diffusers configs), never its size.

:func:`detect_file` reads only a single file's header (names, shapes, dtypes) and answers
the family (``sd1``, ``sd2``, ``sdxl``), whether it is an inpainting model, and the
prediction type where it can be known. It names what the file is when it is not a whole
Stable Diffusion checkpoint: a LoRA, a VAE alone, a ControlNet, a textual-inversion
embedding, an SDXL refiner, or an unknown layout.

:func:`detect_folder` answers the same for a diffusers folder, from its config files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from fastsd.convert.tensors import open_tensors
from fastsd.errors import ModelError

FAMILIES = ("sd1", "sd2", "sdxl")
FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x",
                "sdxl": "Stable Diffusion XL"}

# Names that tell the kinds apart (LDM single-file layout).
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
UNET_ATTN2_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
SD1_TEXT = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SD2_TEXT = "cond_stage_model.model.token_embedding.weight"
SDXL_TEXT1 = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
SDXL_TEXT2 = "conditioner.embedders.1.model.token_embedding.weight"
REFINER_TEXT = "conditioner.embedders.0.model.token_embedding.weight"
SDXL_LABEL = "model.diffusion_model.label_emb.0.0.weight"
VAE_KEY = "first_stage_model.decoder.conv_out.weight"
# ComfyUI's and others' marker of a v-prediction model: an (empty) tensor of this name.
V_PRED_MARK = "v_pred"
# ... and of a model trained with zero terminal SNR (rescaled betas), beside v_pred.
ZTSNR_MARK = "ztsnr"
# Our own metadata keys in files we write.
META_FAMILY, META_PREDICTION, META_STEP = "fastsd.family", "fastsd.prediction_type", \
    "global_step"


@dataclass
class Detection:
    """What a model file or folder is."""

    kind: str  # "checkpoint" or what it is instead: lora, vae, controlnet, embedding, ...
    family: str | None = None  # sd1, sd2, sdxl
    inpainting: bool = False
    prediction_type: str | None = None  # epsilon, v_prediction, or None when unknown
    prediction_source: str = ""  # metadata, marker, yaml, family default
    ema: bool = False
    notes: list[str] = field(default_factory=list)
    ztsnr: bool = False  # zero terminal SNR (the "ztsnr" marker)

    @property
    def convertible(self) -> bool:
        return self.kind == "checkpoint" and self.family in FAMILIES

    def describe(self) -> str:
        if self.kind != "checkpoint":
            return KIND_NAMES.get(self.kind, self.kind)
        name = FAMILY_NAMES.get(self.family or "", "unknown family")
        if self.inpainting:
            name += " inpainting"
        if self.prediction_type == "v_prediction":
            name += " (v-prediction)"
        return name + " checkpoint"

    def to_dict(self) -> dict:
        return {**asdict(self), "what": self.describe()}


KIND_NAMES = {
    "lora": "a LoRA (a small add-on to a base model, not a whole model)",
    "vae": "a VAE alone (the image decoder, without UNet or text encoder)",
    "controlnet": "a ControlNet (a guidance add-on, not a whole model)",
    "embedding": "a textual-inversion embedding (a few learned token vectors)",
    "refiner": "an SDXL refiner (it only refines a base model's output)",
    "unet": "a UNet alone (no VAE or text encoder in the file)",
    "unknown": "a file of unknown layout",
}
WHAT_TO_DO = {
    "lora": "Load it in the web UI as a LoRA on top of its base model.",
    "vae": "Use it as the VAE setting of the web UI, next to a whole model.",
    "controlnet": "Use it with the ControlNet extension of the web UI.",
    "embedding": "Put it in the web UI's embeddings folder and use its name in prompts.",
    "refiner": "Use it as the refiner of an SDXL base model in the web UI.",
}


def _prediction(names: Mapping, metadata: Mapping[str, str], family: str | None,
                yaml_text: str | None) -> tuple[str | None, str]:
    meta = metadata.get(META_PREDICTION) or metadata.get("modelspec.prediction_type")
    if meta:
        meta = {"v": "v_prediction", "eps": "epsilon"}.get(meta, meta)
        return meta, "metadata"
    if V_PRED_MARK in names:
        return "v_prediction", "marker"
    if yaml_text is not None:
        v = "parameterization" in yaml_text and '"v"' in yaml_text.replace("'", '"')
        return ("v_prediction" if v else "epsilon"), "yaml"
    if family in ("sd1", "sdxl"):
        return "epsilon", "family default"
    return None, ""  # SD 2.x: 768 models are v, 512 base models epsilon; same shapes


def classify(shapes: Mapping[str, Sequence[int]], metadata: Mapping[str, str] | None = None,
             yaml_text: str | None = None) -> Detection:
    """What a single file is, from its tensor names and shapes (and metadata, for v/eps)."""
    names = shapes
    metadata = metadata or {}
    n = len(names)
    has = names.__contains__

    def any_prefix(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in names)

    if n == 0:
        return Detection("unknown", notes=["the file holds no tensors"])
    unet = any_prefix("model.diffusion_model.")
    ema = sum(k.startswith("model_ema.") for k in names) > 100
    if any(".lora_down." in k or ".lora_up." in k or ".lora_A." in k or ".lora_B." in k
           or k.startswith(("lora_unet_", "lora_te")) for k in names):
        return Detection("lora")
    if any_prefix("control_model.", "controlnet_cond_embedding.", "input_hint_block.") or \
            any(".zero_convs." in k or k.startswith("zero_convs.") for k in names):
        return Detection("controlnet")
    if not unet and (has("string_to_param.*") or has("emb_params") or
                     (n <= 4 and set(names) <= {"clip_l", "clip_g", "emb_params",
                                                "string_to_param.*", "string_to_token.*"})):
        return Detection("embedding")
    if not unet and (any_prefix("encoder.down.", "decoder.up.", "encoder.down_blocks.",
                                "decoder.up_blocks.", "first_stage_model.")):
        return Detection("vae")
    if not unet and any_prefix("input_blocks.", "down_blocks.", "mid_block.",
                               "middle_block."):
        return Detection("unet")
    if not unet:
        return Detection("unknown", notes=[f"{n} tensors, none of a Stable Diffusion UNet"])
    if has(REFINER_TEXT) and not has(SDXL_TEXT2):
        return Detection("refiner")
    in_shape = tuple(shapes.get(UNET_IN, ()))
    inpainting = len(in_shape) == 4 and in_shape[1] == 9
    if has(SDXL_TEXT1) and has(SDXL_TEXT2) and has(SDXL_LABEL):
        family = "sdxl"
    elif has(SD2_TEXT):
        family = "sd2"
    elif has(SD1_TEXT):
        family = "sd1"
    else:
        return Detection("unet", notes=["UNet weights without a text encoder"])
    missing = [what for what, key in (("VAE", VAE_KEY),) if not has(key)]
    if missing:
        return Detection("unknown", family=family, notes=[
            f"a {FAMILY_NAMES[family]} UNet and text encoder without a {missing[0]}"])
    pred, source = _prediction(names, metadata, family, yaml_text)
    return Detection("checkpoint", family, inpainting, pred, source, ema,
                     ztsnr=has(ZTSNR_MARK))


def refuse(det: Detection, path: Path) -> ModelError:
    """The error for a file that is not a whole SD 1.x/2.x/XL checkpoint."""
    what = KIND_NAMES.get(det.kind, det.describe())
    todo = WHAT_TO_DO.get(det.kind, "Only whole Stable Diffusion 1.x, 2.x and XL checkpoints "
                          "(UNet, VAE and text encoder in one file) can be converted.")
    notes = f" ({'; '.join(det.notes)})" if det.notes else ""
    return ModelError(f"{path.name} is {what}{notes}, not a whole Stable Diffusion model, so "
                      f"it cannot be converted to a diffusers folder. {todo}")


def detect_file(path: str | Path) -> Detection:
    """Read a single file's header (not its weights) and say what it is."""
    path = Path(path)
    yaml_path = path.with_suffix(".yaml")
    yaml_text = yaml_path.read_text(encoding="utf-8") if yaml_path.is_file() else None
    with open_tensors(path) as tf:
        shapes = {k: tf.info(k).shape for k in tf.keys()}
        return classify(shapes, tf.metadata, yaml_text)


# --------------------------------------------------------------------------- diffusers folders


def _config(folder: Path, component: str) -> dict:
    p = folder / component / "config.json"
    if not p.is_file():
        raise ModelError(f"{folder} has no {component}/config.json: it is not a whole diffusers "
                         "Stable Diffusion model. Point to the folder that holds "
                         "model_index.json, unet/, vae/ and text_encoder/.")
    return json.loads(p.read_text(encoding="utf-8"))


def detect_folder(folder: str | Path) -> Detection:
    """The family of a diffusers Stable Diffusion folder, from its config files."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ModelError(f"{folder} is not a diffusers model folder (no model_index.json). "
                         "Give the folder that holds model_index.json, unet/, vae/ and "
                         "text_encoder/.")
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    unet = _config(folder, "unet")
    _config(folder, "vae")
    if index.get("text_encoder_2") and (folder / "text_encoder_2").is_dir():
        if not (folder / "text_encoder").is_dir():
            return Detection("refiner")
        family = "sdxl"
    else:
        text = _config(folder, "text_encoder")
        # SD 2.x has OpenCLIP's text encoder (plain gelu); SD 1.x OpenAI CLIP (quick_gelu).
        family = "sd2" if text.get("hidden_act") == "gelu" else "sd1"
    sched = folder / "scheduler" / "scheduler_config.json"
    pred = json.loads(sched.read_text(encoding="utf-8")).get("prediction_type", "epsilon") \
        if sched.is_file() else "epsilon"
    zsnr = json.loads(sched.read_text(encoding="utf-8")).get("rescale_betas_zero_snr", False) \
        if sched.is_file() else False
    return Detection("checkpoint", family, int(unet.get("in_channels", 4)) == 9, pred,
                     "scheduler config", (folder / "unet_ema").is_dir(), ztsnr=bool(zsnr))
