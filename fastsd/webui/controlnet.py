"""ControlNet: the units a request asks for, the preprocessors that make control maps, and
the ControlNet models that follow them.

A request names its units the way AUTOMATIC1111's ControlNet extension takes them::

    "alwayson_scripts": {"controlnet": {"args": [
        {"model": "sd1-canny [1a2b3c4d]", "module": "canny", "image": "<base64>",
         "weight": 1.0, "resize_mode": "Crop and Resize", "guidance_start": 0.0,
         "guidance_end": 1.0, "control_mode": "Balanced"}]}}

:func:`split` takes them out of a body as :class:`Unit` objects (every bad value a 422
that names ``controlnet.args[I].FIELD``). :data:`MODULES` lists the extension's
preprocessors: those that need no model weights (``none``, ``canny``) run here; the others
say what they need, and an already-made map is sent with ``none``. :func:`load` reads a
ControlNet (a diffusers folder or one ``.safetensors`` file) and checks that it fits the
loaded model; :class:`ControlModes` gives each unit its control mode while a pipeline runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastsd.errors import ModelError
from fastsd.webui import imaging
from fastsd.webui.params import InvalidRequest, coerce, decode_image

SCRIPT = "controlnet"  # the extension's name in alwayson_scripts (any case)
API_VERSION = 3  # what the extension's /controlnet/version answers for this API shape
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
HR_OPTIONS = ("Both", "Low res only", "High res only")
RESIZE_ALIASES = {"Inner Fit (Scale to Fit)": 1, "Outer Fit (Shrink to Fit)": 2,
                  "Scale to Fit (Inner Fit)": 1, "Envelope (Outer Fit)": 2}
SOFT_DECAY = 0.825  # "my prompt is more important": layer i of 13 weighs 0.825 ** (12 - i)
MAX_UNITS = 4


@dataclass(frozen=True)
class Slider:
    name: str
    value: float
    min: float
    max: float
    step: float = 1.0

    def to_api(self) -> dict:
        return {"name": self.name, "value": self.value, "min": self.min, "max": self.max,
                "step": self.step}


RESOLUTION = Slider("Resolution", 512, 64, 2048, 8)


@dataclass(frozen=True)
class Module:
    """A preprocessor: what makes a control map from a picture."""

    name: str
    needs: str = ""  # what it needs that fastsd does not run; "" when it runs here
    sliders: tuple[Slider, ...] = ()  # resolution, threshold A, threshold B

    @property
    def runs_here(self) -> bool:
        return not self.needs

    def to_api(self) -> dict:
        return {"model_free": self.runs_here, "sliders": [s.to_api() for s in self.sliders],
                "fastsd_needs": self.needs or None}


def _needs(what: str) -> str:
    return (f"{what}, which fastsd does not run. Make the map elsewhere (the ControlNet "
            "extension's Preview, or controlnet_aux) and send it with module 'none'")


_MIDAS = _needs("the MiDaS depth model's weights")
_POSE = _needs("the OpenPose body, hand and face models' weights")
_LINEART = _needs("the lineart model's weights")
_HED = _needs("the HED edge model's weights")
_PIDINET = _needs("the PiDiNet edge model's weights")
MODULES: dict[str, Module] = {m.name: m for m in (
    Module("none"),
    Module("canny", sliders=(RESOLUTION, Slider("Canny Low Threshold", 100, 1, 255),
                             Slider("Canny High Threshold", 200, 1, 255))),
    Module("depth_midas", _MIDAS), Module("depth", _MIDAS),
    Module("depth_zoe", _needs("the ZoeDepth model's weights")),
    Module("depth_leres", _needs("the LeReS depth model's weights")),
    Module("openpose", _POSE), Module("openpose_full", _POSE), Module("openpose_face", _POSE),
    Module("openpose_hand", _POSE), Module("dw_openpose_full", _needs("the DWPose model's weights")),
    Module("lineart_realistic", _LINEART), Module("lineart_coarse", _LINEART),
    Module("lineart_anime", _needs("the anime lineart model's weights")),
    Module("softedge_hed", _HED), Module("softedge_pidinet", _PIDINET),
    Module("scribble_hed", _HED), Module("scribble_pidinet", _PIDINET),
    Module("mlsd", _needs("the M-LSD line model's weights")),
    Module("normal_bae", _needs("the BAE normal-map model's weights")),
    Module("seg_ofade20k", _needs("the OneFormer segmentation model's weights")),
    Module("inpaint_only", _needs("the masked-inpaint preprocessing of the extension")),
    Module("shuffle", _needs("the extension's random shuffle")),
    Module("tile_resample", _needs("the extension's tile resampler")),
)}
ALIASES = {"depth": "depth_midas", "openpose": "openpose_full"}


def module(name: Any, where: str = "module") -> Module:
    key = str(name or "none").strip().lower()
    found = MODULES.get(key) or MODULES.get(ALIASES.get(key, ""))
    if found is None:
        raise InvalidRequest(f"{where} is {name!r}, not a preprocessor fastsd knows. Known: "
                             f"{', '.join(MODULES)} (GET /controlnet/module_list).")
    return found


# --------------------------------------------------------------------------- units


@dataclass
class Unit:
    """One ControlNet unit of a request, in the extension's field names."""

    model: str
    image: Any = None  # PIL image; None in img2img: the init image is used
    module: str = "none"
    weight: float = 1.0
    resize_mode: int = 1  # 0 Just Resize, 1 Crop and Resize (the extension's default), 2 Fill
    processor_res: int = -1  # -1: the module's default
    threshold_a: float = -1
    threshold_b: float = -1
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: int = 0  # index in CONTROL_MODES
    pixel_perfect: bool = False
    hr_option: str = "Both"
    index: int = 0  # its place in the request, for messages and the infotext

    def where(self, name: str) -> str:
        return f"controlnet.args[{self.index}].{name}"

    def validate(self) -> "Unit":
        if not self.model or str(self.model).strip().lower() == "none":
            raise InvalidRequest(f"{self.where('model')} is empty: name a ControlNet from GET "
                                 "/controlnet/model_list.")
        m = module(self.module, self.where("module"))
        if not m.runs_here:
            raise InvalidRequest(f"{self.where('module')} {m.name!r} needs {m.needs}.")
        for name, lo, hi in (("weight", 0.0, 2.0), ("guidance_start", 0.0, 1.0),
                             ("guidance_end", 0.0, 1.0)):
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise InvalidRequest(f"{self.where(name)} is {v}; it must be from {lo} to {hi}.")
        if self.guidance_start > self.guidance_end:
            raise InvalidRequest(f"{self.where('guidance_start')} ({self.guidance_start}) is "
                                 f"after {self.where('guidance_end')} ({self.guidance_end}).")
        if self.resize_mode not in (0, 1, 2):
            raise InvalidRequest(f"{self.where('resize_mode')} is {self.resize_mode}; it must be "
                                 f"0, 1 or 2 ({', '.join(imaging.RESIZE_MODES)}).")
        if self.control_mode not in (0, 1, 2):
            raise InvalidRequest(f"{self.where('control_mode')} is {self.control_mode}; it must "
                                 f"be 0, 1 or 2 ({', '.join(CONTROL_MODES)}).")
        if self.hr_option not in HR_OPTIONS:
            raise InvalidRequest(f"{self.where('hr_option')} is {self.hr_option!r}; it must be "
                                 f"one of {', '.join(HR_OPTIONS)}.")
        return self

    def settings(self) -> tuple[int, float, float]:
        """(resolution, threshold A, threshold B), each out-of-range one at its module's
        default, as the extension does."""
        sliders = module(self.module).sliders
        out = []
        for value, slider in zip((self.processor_res, self.threshold_a, self.threshold_b),
                                 sliders + (None,) * 3):
            out.append(value if slider is None or slider.min <= value <= slider.max
                       else slider.value)
        return int(out[0]), float(out[1]), float(out[2])

    def in_pass(self, hires: bool) -> bool:
        """Whether the unit acts in the first pass (``hires`` False) or hires fix's second."""
        return self.hr_option == "Both" or self.hr_option == (
            "High res only" if hires else "Low res only")

    def infotext(self, model_title: str) -> str:
        """The extension's ``ControlNet N`` value: ``Module: canny, Model: ..., ...``."""
        res, a, b = self.settings()
        fields = {"Module": module(self.module).name, "Model": model_title,
                  "Weight": self.weight, "Resize Mode": imaging.RESIZE_MODES[self.resize_mode],
                  "Processor Res": res, "Threshold A": a, "Threshold B": b,
                  "Guidance Start": self.guidance_start, "Guidance End": self.guidance_end,
                  "Pixel Perfect": self.pixel_perfect,
                  "Control Mode": CONTROL_MODES[self.control_mode]}
        return ", ".join(f"{k}: {v}" for k, v in fields.items())


# Fields of the extension's unit that ask for nothing here when left at these values; any
# other value is listed as ignored.
_NEUTRAL_UNIT: dict[str, Any] = {
    "mask": None, "mask_image": None, "low_vram": False, "is_ui": False, "input_mode": "simple",
    "batch_images": None, "output_dir": "", "loopback": False, "save_detected_map": True,
    "inpaint_crop_input_image": True, "advanced_weighting": None, "effective_region_mask": None,
    "pulid_mode": "Fidelity", "union_control_type": "Unknown", "ipadapter_input": None,
    "animatediff_batch": False, "batch_modifiers": [], "batch_image_files": [],
    "batch_keyframe_idx": None, "batch_mask_dir": None, "guessmode": None}
_KINDS = {"weight": "float", "guidance_start": "float", "guidance_end": "float",
          "threshold_a": "float", "threshold_b": "float", "processor_res": "int",
          "pixel_perfect": "bool"}


def _choice(value: Any, names: tuple[str, ...], where: str, aliases: dict | None = None) -> int:
    if isinstance(value, bool):
        raise InvalidRequest(f"{where} is {value!r}; give one of {', '.join(names)}.")
    if isinstance(value, int) and 0 <= value < len(names):
        return value
    if isinstance(value, str):
        if value.strip().isdigit() and int(value) < len(names):
            return int(value)
        for i, n in enumerate(names):
            if value.strip().lower() == n.lower():
                return i
        if aliases and value in aliases:
            return aliases[value]
    raise InvalidRequest(f"{where} is {value!r}; give one of {', '.join(names)} (or its "
                         f"number, 0 to {len(names) - 1}).")


def unit_from_args(args: Any, index: int, ignored: list[str]) -> Unit | None:
    """A Unit from one of the extension's ``args`` (a JSON object); None when disabled."""
    where = f"controlnet.args[{index}]"
    if not isinstance(args, dict):
        raise InvalidRequest(f"{where} must be a JSON object with the unit's fields "
                             f"(model, module, image, weight...), not {type(args).__name__}.")
    values = dict(args)
    enabled = coerce(f"{where}.enabled", values.pop("enabled", True), "bool")
    if "guidance" in values:  # the extension's old name
        values.setdefault("guidance_end", values.pop("guidance"))
    if "input_image" in values:
        values.setdefault("image", values.pop("input_image"))
    if not enabled:
        return None
    unit = Unit(model="", index=index)
    for key, value in values.items():
        name = f"{where}.{key}"
        if key in _KINDS:
            setattr(unit, key, coerce(name, value, _KINDS[key]))
        elif key in ("model", "module", "hr_option"):
            if value is not None and not isinstance(value, str):
                raise InvalidRequest(f"{name} must be a string, not {type(value).__name__}.")
            setattr(unit, key, value or ("none" if key == "module" else ""))
        elif key == "image":
            if isinstance(value, dict):  # {"image": ..., "mask": ...}
                if value.get("mask") not in (None, ""):
                    ignored.append(f"{name}.mask")
                value = value.get("image")
            if hasattr(value, "convert"):  # a PIL image (in-process callers)
                unit.image = value
            else:
                unit.image = decode_image(value, name) if value not in (None, "") else None
        elif key == "resize_mode":
            unit.resize_mode = 0 if value == 3 else _choice(value, imaging.RESIZE_MODES, name,
                                                            RESIZE_ALIASES)
        elif key == "control_mode":
            unit.control_mode = _choice(value, CONTROL_MODES, name)
        elif key in _NEUTRAL_UNIT:
            if value not in (_NEUTRAL_UNIT[key], None, "", [], {}):
                ignored.append(name)
        else:
            ignored.append(name)
    if isinstance(unit.hr_option, str):
        unit.hr_option = next((o for o in HR_OPTIONS if o.lower() == unit.hr_option.lower()),
                              unit.hr_option)
    return unit.validate()


def units(items: list, img2img: bool = False) -> list[Unit]:
    """Units from in-process callers (fastsd.webui.generate): Unit objects, or dicts of the
    extension's fields whose image may be a PIL image."""
    ignored: list[str] = []
    out = [u if isinstance(u, Unit) else unit_from_args(u, i, ignored)
           for i, u in enumerate(items or [])]
    out = [u for u in out if u is not None]
    for u in out:
        if u.image is None and not img2img:
            raise InvalidRequest(f"{u.where('image')} is missing: txt2img needs a control "
                                 "image for each unit.")
    return out


def split(body: Any, img2img: bool = False) -> tuple[list[Unit], Any, list[str]]:
    """The ControlNet units of an API body (from ``alwayson_scripts``), the body without
    them, and the unit fields that were ignored."""
    if not isinstance(body, dict):
        return [], body, []
    scripts = body.get("alwayson_scripts")
    if not isinstance(scripts, dict):
        return [], body, []
    key = next((k for k in scripts if isinstance(k, str) and k.strip().lower() == SCRIPT), None)
    if key is None:
        return [], body, []
    script = scripts[key]
    args = script.get("args") if isinstance(script, dict) else script
    if args is None:
        args = []
    if not isinstance(args, list):
        raise InvalidRequest("alwayson_scripts.controlnet.args must be a list of units.")
    ignored: list[str] = []
    units = [u for i, a in enumerate(args) if (u := unit_from_args(a, i, ignored)) is not None]
    if len(units) > MAX_UNITS:
        raise InvalidRequest(f"alwayson_scripts.controlnet.args holds {len(units)} enabled "
                             f"units; the limit is {MAX_UNITS}.")
    for u in units:
        if u.image is None and not img2img:
            raise InvalidRequest(f"{u.where('image')} is missing: txt2img needs a control "
                                 "image (base64) for each unit.")
    rest = {k: v for k, v in scripts.items() if k != key}
    return units, {**body, "alwayson_scripts": rest}, ignored


# --------------------------------------------------------------------------- preprocessing


def _canny(rgb, low: float, high: float):
    import cv2

    return cv2.Canny(rgb, low, high)


def detect(image, unit: Unit, width: int | None = None, height: int | None = None,
           where: str = ""):
    """The control map ``unit``'s module makes of ``image`` (RGB, at the module's
    resolution; with pixel perfect, the resolution the target size needs)."""
    import numpy as np
    from PIL import Image

    where = where or unit.where("module")
    m = module(unit.module, where)
    if not m.runs_here:
        raise InvalidRequest(f"{where} {m.name!r} needs {m.needs}.")
    image = image.convert("RGB")
    if m.name == "none":
        return image
    res, a, b = unit.settings()
    if unit.pixel_perfect and width and height:
        res = pixel_perfect_resolution(image.size, (width, height), unit.resize_mode)
    w, h = image.size
    k = res / min(w, h)
    if abs(k - 1) > 1e-6:
        import cv2

        arr = cv2.resize(np.asarray(image), (max(1, round(w * k)), max(1, round(h * k))),
                         interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    else:
        arr = np.asarray(image)
    edges = _canny(np.ascontiguousarray(arr), a, b)
    return Image.fromarray(edges).convert("RGB")


def detect_request(body: Any) -> list:
    """The maps of a /controlnet/detect body (its images in base64; ``controlnet_images``
    is webuiapi's name for ``controlnet_input_images``)."""
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object: controlnet_module, "
                             "controlnet_input_images and the thresholds.")
    images = body.get("controlnet_input_images", body.get("controlnet_images"))
    if not isinstance(images, list) or not images:
        raise InvalidRequest("controlnet_input_images must be a list of at least one base64 "
                             "image.")
    if len(images) > 8:
        raise InvalidRequest(f"controlnet_input_images holds {len(images)} images; the limit "
                             "is 8.")
    unit = Unit(model="detect", module=str(body.get("controlnet_module") or "none"),
                processor_res=coerce("controlnet_processor_res",
                                     body.get("controlnet_processor_res", -1), "int"),
                threshold_a=coerce("controlnet_threshold_a",
                                   body.get("controlnet_threshold_a", -1), "float"),
                threshold_b=coerce("controlnet_threshold_b",
                                   body.get("controlnet_threshold_b", -1), "float"))
    return [detect(decode_image(x, f"controlnet_input_images[{i}]"), unit,
                   where="controlnet_module") for i, x in enumerate(images)]


def pixel_perfect_resolution(raw: tuple[int, int], target: tuple[int, int], mode: int) -> int:
    """The preprocessor resolution at which the map lands on the target size 1:1."""
    (rw, rh), (tw, th) = raw, target
    k = max(tw / rw, th / rh) if mode == 1 else min(tw / rw, th / rh)
    return int(round(min(rw, rh) * k))


def control_map(unit: Unit, fallback, width: int, height: int):
    """The unit's map at ``width`` x ``height`` (its image, or ``fallback`` in img2img,
    through its module, then fitted by its resize mode)."""
    source = unit.image if unit.image is not None else fallback
    if source is None:
        raise InvalidRequest(f"{unit.where('image')} is missing.")
    made = detect(source, unit, width, height)
    return imaging.resize(made, width, height, unit.resize_mode)


# --------------------------------------------------------------------------- models

SUFFIXES = (".safetensors",)


def _unet_fields(unet_config: dict) -> dict:
    """The ControlNet configuration that matches a UNet's (what from_unet copies)."""
    keep = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
            "only_cross_attention", "block_out_channels", "layers_per_block",
            "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups",
            "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
            "encoder_hid_dim", "encoder_hid_dim_type", "attention_head_dim",
            "num_attention_heads", "use_linear_projection", "class_embed_type",
            "addition_embed_type", "addition_time_embed_dim", "num_class_embeds",
            "upcast_attention", "resnet_time_scale_shift",
            "projection_class_embeddings_input_dim")
    return {k: unet_config[k] for k in keep if k in unet_config}


_FIT = ("block_out_channels", "cross_attention_dim", "addition_embed_type", "layers_per_block",
        "in_channels")


def _fits(config: dict, unet_config: dict) -> str:
    """Where a ControlNet's config differs from the UNet's ("" when it fits)."""
    diffs = []
    for k in _FIT:
        a, b = config.get(k), unet_config.get(k)
        if k == "in_channels" and b == 9:
            b = 4  # an inpainting UNet: its ControlNets see the 4 latent channels
        if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
            a, b = list(a or []), list(b or [])
        if a != b and not (k == "addition_embed_type" and not a and not b):
            diffs.append(f"{k} {a} where the model has {b}")
    return "; ".join(diffs)


def load(path: Path, title: str, unet_config: dict, model_title: str, dtype):
    """A ControlNetModel from a diffusers folder or a single ``.safetensors`` file (the
    A1111 layout or diffusers', configured from the loaded model's UNet), checked to fit
    that UNet: a ControlNet made for another model family is refused by name."""
    from diffusers import ControlNetModel

    def refuse(why: str) -> ModelError:
        return ModelError(f"The ControlNet {title} does not fit {model_title} ({why}). Pick a "
                          "ControlNet made for this model's family (GET /controlnet/model_list), "
                          "or load the model it was made for.")

    path = Path(path)
    if path.is_dir():
        config = ControlNetModel.load_config(path)
        why = _fits(config, unet_config)
        if why:
            raise refuse(why)
        return ControlNetModel.from_pretrained(str(path), dtype=dtype)
    from safetensors.torch import load_file

    state = load_file(str(path))
    config = dict(_unet_fields(unet_config), in_channels=4)
    if any(k.startswith(("control_model.", "input_blocks.", "input_hint_block.")) for k in state):
        from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

        state = convert_controlnet_checkpoint(state, config)
    if "controlnet_cond_embedding.conv_in.weight" not in state:
        raise refuse("it holds no ControlNet weights")
    blocks = sorted((int(k.split(".")[2]), v.shape[0]) for k, v in state.items()
                    if k.startswith("controlnet_cond_embedding.blocks.") and k.endswith("weight"))
    first = state["controlnet_cond_embedding.conv_in.weight"]
    config["conditioning_embedding_out_channels"] = (first.shape[0],) + tuple(
        n for i, n in blocks if i % 2 == 1)
    config["conditioning_channels"] = first.shape[1]
    net = ControlNetModel.from_config(config)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise refuse(str(e).splitlines()[0][:200]) from None
    return net.to(dtype)


@dataclass
class ControlModes:
    """Gives each unit its control mode while a pipeline runs: "My prompt is more
    important" weighs the ControlNet's 13 (SDXL: 10) outputs by 0.825 ** (12 - i), as the
    extension does; "ControlNet is more important" does so too and keeps the control out
    of the unconditional half of the CFG batch. "Balanced" changes nothing."""

    nets: list[Any]  # one ControlNetModel per unit, in the order the pipeline calls them
    modes: list[int]
    cfg: bool  # the pipeline runs classifier-free guidance (batch: uncond, then cond)
    _hooks: list[Any] = field(default_factory=list)
    _calls: int = 0

    def __enter__(self) -> "ControlModes":
        if any(self.modes):
            for net in {id(n): n for n in self.nets}.values():
                self._hooks.append(net.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _hook(self, _module, _args, output):
        mode = self.modes[self._calls % len(self.modes)]
        self._calls += 1
        if mode == 0:
            return None
        down, mid = output[0], output[1]
        outs = [t * s for t, s in zip([*down, mid], soft_scales(len(down) + 1))]
        if mode == 2 and self.cfg:
            for t in outs:
                t[: t.shape[0] // 2] = 0
        down, mid = outs[:-1], outs[-1]
        return (down, mid) if isinstance(output, tuple) else replace_output(output, down, mid)


def replace_output(output, down, mid):
    output.down_block_res_samples, output.mid_block_res_sample = down, mid
    return output


def soft_scales(n: int) -> list[float]:
    """The weights of a ControlNet's ``n`` outputs in the soft control modes (the
    extension's: SD's 13 outputs from 0.825 ** 12 to 1; SDXL's 10 its first ten)."""
    return [SOFT_DECAY ** float(12 - i) for i in range(n)]
