"""What one generation asks for, in AUTOMATIC1111's field names, and the one place its
values are checked.

:func:`from_request` turns an A1111 JSON body (``/sdapi/v1/txt2img`` or ``img2img``) into
:class:`GenerationParams` and the list of fields it ignored; the in-process
:func:`fastsd.webui.generate` builds the same dataclass and runs the same
:meth:`GenerationParams.validate`. A bad value raises :class:`InvalidRequest`, whose
message names the field, what was wrong and what is allowed (the API answers it with 422).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass, field, fields
from typing import Any

from fastsd.errors import DataError
from fastsd.webui import samplers

MIN_SIZE, MAX_SIZE, SIZE_STEP = 64, 2048, 8
MAX_STEPS = 150
MAX_BATCH_SIZE, MAX_BATCH_COUNT = 8, 16
MAX_CFG = 30.0
MAX_PROMPT = 20_000  # characters
MAX_SEED = 2**32 - 1
MAX_INPUT_PIXELS = 4096 * 4096  # a decoded init image or mask
MAX_MASK_BLUR, MAX_PADDING = 64, 512
MAX_HR_SCALE = 4.0

# Hires fix's upscalers, by A1111's names. Latent ones resize the first pass's latents
# (torch's interpolate mode, antialias); the others resize its decoded image (a PIL filter).
LATENT_UPSCALERS = {"Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
                    "Latent (bicubic)": ("bicubic", False),
                    "Latent (bicubic antialiased)": ("bicubic", True),
                    "Latent (nearest)": ("nearest", False),
                    "Latent (nearest-exact)": ("nearest-exact", False)}
PIXEL_UPSCALERS = {"None": "lanczos", "Lanczos": "lanczos", "Nearest": "nearest"}
DEFAULT_UPSCALER = "Latent"  # A1111's when hr_upscaler is not given
DEFAULT_SWITCH_AT = 0.8  # A1111's refiner "Switch at"


class InvalidRequest(DataError):
    """A generation request with a missing, malformed or out-of-range value."""


@dataclass
class GenerationParams:
    prompt: str = ""
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg_scale: float = 7.0
    sampler_name: str = samplers.DEFAULT_SAMPLER
    scheduler: str = "automatic"
    seed: int = -1  # -1: random; the seeds used are reported
    batch_size: int = 1
    n_iter: int = 1  # batch count
    # img2img and inpainting
    init_images: list[Any] = field(default_factory=list)  # PIL images
    denoising_strength: float = 0.75
    resize_mode: int = 0  # 0 resize, 1 crop and resize, 2 resize and fill
    mask: Any = None  # PIL image: white is repainted
    mask_blur: int = 4
    inpainting_fill: int = 1  # 0 fill with the colours around, 1 original
    inpaint_full_res: bool = False  # inpaint only the masked area, at full resolution
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: int = 0
    # ControlNet: fastsd.webui.controlnet.Unit objects
    controlnet: list[Any] = field(default_factory=list)
    # hires fix (txt2img): a second img2img pass at a larger size
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_resize_x: int = 0  # 0: from hr_scale (or from the other side's ratio)
    hr_resize_y: int = 0
    hr_upscaler: str = ""  # "": A1111's default, Latent
    hr_second_pass_steps: int = 0  # 0: as many as the first pass
    # the SDXL refiner: a second model takes over at refiner_switch_at of the steps
    refiner_checkpoint: str = ""
    refiner_switch_at: float = DEFAULT_SWITCH_AT

    @property
    def mode(self) -> str:
        if not self.init_images:
            return "txt2img"
        return "inpaint" if self.mask is not None else "img2img"

    @property
    def hires(self) -> bool:
        return self.enable_hr and self.mode == "txt2img"

    @property
    def upscaler(self) -> str:
        return self.hr_upscaler or DEFAULT_UPSCALER

    def hires_size(self) -> tuple[int, int, int, int]:
        """Hires fix's (upscaled width, height, then the width and height kept after the
        centred crop that a given hr_resize_x and hr_resize_y of another ratio need), as
        A1111 computes them, each a multiple of 8."""
        W, H, x, y = self.width, self.height, self.hr_resize_x, self.hr_resize_y
        if x == 0 and y == 0:
            to_w, to_h = int(W * self.hr_scale), int(H * self.hr_scale)
            keep_w, keep_h = to_w, to_h
        elif y == 0:
            to_w, to_h = x, x * H // W
            keep_w, keep_h = to_w, to_h
        elif x == 0:
            to_w, to_h = y * W // H, y
            keep_w, keep_h = to_w, to_h
        else:
            if W / H < x / y:
                to_w, to_h = x, x * H // W
            else:
                to_w, to_h = y * W // H, y
            keep_w, keep_h = x, y
        to_w, to_h = to_w // SIZE_STEP * SIZE_STEP, to_h // SIZE_STEP * SIZE_STEP
        return to_w, to_h, min(to_w, keep_w // SIZE_STEP * SIZE_STEP), \
            min(to_h, keep_h // SIZE_STEP * SIZE_STEP)

    @property
    def hr_steps(self) -> int:
        return self.hr_second_pass_steps or self.steps

    @property
    def output_size(self) -> tuple[int, int]:
        if self.hires:
            return self.hires_size()[2:]
        return self.width, self.height

    def validate(self) -> "GenerationParams":
        """Check every value; raise InvalidRequest naming the first bad one."""
        for name in ("width", "height"):
            v = getattr(self, name)
            if not (MIN_SIZE <= v <= MAX_SIZE and v % SIZE_STEP == 0):
                raise InvalidRequest(f"{name} is {v}; it must be a multiple of {SIZE_STEP} "
                                     f"from {MIN_SIZE} to {MAX_SIZE}.")
        _in_range("steps", self.steps, 1, MAX_STEPS)
        _in_range("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _in_range("n_iter", self.n_iter, 1, MAX_BATCH_COUNT)
        _in_range("cfg_scale", self.cfg_scale, 0.0, MAX_CFG)
        if self.seed != -1 and not 0 <= self.seed <= MAX_SEED:
            raise InvalidRequest(f"seed is {self.seed}; use -1 for a random seed or a number "
                                 f"from 0 to {MAX_SEED}.")
        for name in ("prompt", "negative_prompt"):
            if len(getattr(self, name)) > MAX_PROMPT:
                raise InvalidRequest(f"{name} is {len(getattr(self, name))} characters long; "
                                     f"the limit is {MAX_PROMPT}.")
        try:
            samplers.resolve(self.sampler_name, self.scheduler)
        except DataError as e:
            raise InvalidRequest(str(e)) from None
        if self.init_images:
            _in_range("denoising_strength", self.denoising_strength, 0.0, 1.0)
            if int(self.steps * self.denoising_strength) < 1:
                raise InvalidRequest(
                    f"denoising_strength {self.denoising_strength} of {self.steps} steps leaves "
                    "no step to run; raise denoising_strength or steps.")
            _in_range("resize_mode", self.resize_mode, 0, 2)
            if len(self.init_images) > MAX_BATCH_SIZE:
                raise InvalidRequest(f"init_images holds {len(self.init_images)} images; the "
                                     f"limit is {MAX_BATCH_SIZE}.")
        if self.mask is not None:
            if not self.init_images:
                raise InvalidRequest("A mask needs init_images: the image to inpaint.")
            _in_range("mask_blur", self.mask_blur, 0, MAX_MASK_BLUR)
            _in_range("inpaint_full_res_padding", self.inpaint_full_res_padding, 0, MAX_PADDING)
            _in_range("inpainting_fill", self.inpainting_fill, 0, 3)
        if self.hires:
            self._validate_hires()
        if self.refiner_checkpoint:
            if not 0.0 < self.refiner_switch_at <= 1.0 or math.isnan(self.refiner_switch_at):
                raise InvalidRequest(f"refiner_switch_at is {self.refiner_switch_at}; it must be "
                                     "above 0 and at most 1 (the fraction of the steps after "
                                     "which the refiner takes over).")
            if self.mode == "inpaint":
                raise InvalidRequest("refiner_checkpoint works with txt2img and img2img; "
                                     "inpainting has no refiner stage here. Leave it out.")
        for unit in self.controlnet:
            unit.validate()
        return self

    def _validate_hires(self) -> None:
        _in_range("hr_scale", self.hr_scale, 1.0, MAX_HR_SCALE)
        for name in ("hr_resize_x", "hr_resize_y"):
            v = getattr(self, name)
            if v != 0 and not MIN_SIZE <= v <= MAX_SIZE:
                raise InvalidRequest(f"{name} is {v}; use 0 (from hr_scale) or a size from "
                                     f"{MIN_SIZE} to {MAX_SIZE}.")
        _in_range("hr_second_pass_steps", self.hr_second_pass_steps, 0, MAX_STEPS)
        _in_range("denoising_strength", self.denoising_strength, 0.0, 1.0)
        if int(self.hr_steps * self.denoising_strength) < 1:
            raise InvalidRequest(
                f"denoising_strength {self.denoising_strength} of {self.hr_steps} hires steps "
                "leaves no step to run; raise denoising_strength or hr_second_pass_steps.")
        if self.upscaler not in LATENT_UPSCALERS and self.upscaler not in PIXEL_UPSCALERS:
            raise InvalidRequest(
                f"hr_upscaler is {self.hr_upscaler!r}, which fastsd does not have (it runs no "
                "upscaling model such as ESRGAN). Choose one of "
                f"{', '.join([*LATENT_UPSCALERS, *PIXEL_UPSCALERS])}.")
        to_w, to_h, w, h = self.hires_size()
        if not (MIN_SIZE <= w <= MAX_SIZE and MIN_SIZE <= h <= MAX_SIZE and to_w <= MAX_SIZE
                and to_h <= MAX_SIZE):
            raise InvalidRequest(f"Hires fix would make {to_w}x{to_h} images; sizes must be "
                                 f"from {MIN_SIZE} to {MAX_SIZE}. Lower hr_scale or "
                                 "hr_resize_x/hr_resize_y.")


def _in_range(name: str, v: float, lo: float, hi: float) -> None:
    if not (lo <= v <= hi) or (isinstance(v, float) and math.isnan(v)):
        raise InvalidRequest(f"{name} is {v}; it must be from {lo} to {hi}.")


# --------------------------------------------------------------------------- A1111 bodies

# A1111 fields fastsd accepts but does not act on, with the value that asks for nothing:
# a request that leaves them so is served exactly; any other value is listed as ignored.
NEUTRAL: dict[str, Any] = {
    "restore_faces": False, "tiling": False, "styles": [],
    "subseed": -1, "subseed_strength": 0, "seed_resize_from_h": 0, "seed_resize_from_w": 0,
    "eta": None, "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1,
    "override_settings": {}, "override_settings_restore_afterwards": True,
    "script_name": None, "script_args": [], "alwayson_scripts": {}, "send_images": True,
    "save_images": None, "do_not_save_samples": False, "do_not_save_grid": False,
    "sampler_index": None, "firstphase_width": 0, "firstphase_height": 0,
    "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None,
    "hr_prompt": "", "hr_negative_prompt": "", "image_cfg_scale": None,
    "initial_noise_multiplier": 1, "include_init_images": False,
    "disable_extra_networks": False, "comments": None,
    "latent_mask": None, "force_task_id": None, "infotext": None, "firstpass_image": None,
}
# Always neutral whatever their value: they only say how A1111 should save, and fastsd
# always saves every image to the session's outputs/.
_SAVING = {"save_images", "do_not_save_samples", "do_not_save_grid", "send_images",
           "sampler_index", "image_cfg_scale", "eta"}
# Hires fix's fields: used in txt2img; an img2img body (which has no hires fix in A1111)
# may carry them at any value.
_HIRES = {"enable_hr", "hr_scale", "hr_resize_x", "hr_resize_y", "hr_upscaler",
          "hr_second_pass_steps"}

_TYPES = {f.name: f.type for f in fields(GenerationParams)}


def coerce(name: str, value: Any, kind: str) -> Any:
    bad = InvalidRequest(f"{name} must be {'an integer' if kind == 'int' else 'a ' + kind}, "
                         f"not {value!r}.")
    if kind == "int":
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise bad
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad
        try:
            out = float(value)
        except ValueError:
            raise bad from None
        if not math.isfinite(out):
            raise bad
        return out
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise bad
    if kind == "str":
        if value is None:
            return ""
        if not isinstance(value, str):
            raise InvalidRequest(f"{name} must be a string, not {type(value).__name__}.")
        return value
    raise AssertionError(kind)


def decode_image(data: Any, what: str):
    """A PIL image from base64 (plain or a data: URL). URLs are refused, never fetched."""
    from PIL import Image

    if not isinstance(data, str) or not data:
        raise InvalidRequest(f"{what} must be a base64-encoded image (a string).")
    text = data.strip()
    if text.lower().startswith(("http://", "https://", "file:", "ftp://")):
        raise InvalidRequest(f"{what} is a URL. Images are accepted as base64 only; fastsd "
                             "never fetches a URL a client gives. Send the image's bytes in "
                             "base64.")
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise InvalidRequest(f"{what} is a data: URL that is not base64.")
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{what} is not valid base64.") from None
    try:
        img = Image.open(io.BytesIO(raw))
        if img.width * img.height > MAX_INPUT_PIXELS:
            raise InvalidRequest(f"{what} is {img.width}x{img.height} pixels; the limit is "
                                 f"{MAX_INPUT_PIXELS:,} pixels.")
        img.load()
    except InvalidRequest:
        raise
    except Exception as e:  # PIL raises many kinds for bad data
        raise InvalidRequest(f"{what} is base64 but not an image PIL can read "
                             f"({type(e).__name__}).") from None
    return img


def from_request(body: Any, img2img: bool) -> tuple[GenerationParams, list[str]]:
    """The parameters of an A1111 txt2img/img2img body, validated, and the fields ignored."""
    if not isinstance(body, dict):
        raise InvalidRequest(f"The request body must be a JSON object, not "
                             f"{type(body).__name__}.")
    values: dict[str, Any] = {}
    ignored: list[str] = []
    image_fields = {"init_images", "mask"}
    for key, value in body.items():
        if key in ("refiner_checkpoint", "hr_upscaler") and value is None:
            continue
        if key in ("refiner_switch_at", "hr_scale") and value is None:
            continue
        if key in _TYPES and key not in image_fields and key != "controlnet" and (
                img2img and key not in _HIRES or key in _TXT2IMG):
            kind = str(_TYPES[key]).replace("'", "")
            values[key] = coerce(key, value, kind)
        elif key in image_fields and img2img:
            continue
        elif key in _SAVING or (key in NEUTRAL and value == NEUTRAL[key]) or (
                key in _HIRES and img2img):
            continue
        elif key == "alwayson_scripts" and isinstance(value, dict):
            values.update(_refiner_script(value, ignored))
        else:
            ignored.append(key)
    if img2img:
        images = body.get("init_images")
        if not isinstance(images, list) or not images:
            raise InvalidRequest("init_images must be a list of at least one base64 image.")
        if len(images) > MAX_BATCH_SIZE:
            raise InvalidRequest(f"init_images holds {len(images)} images; the limit is "
                                 f"{MAX_BATCH_SIZE}.")
        values["init_images"] = [decode_image(x, f"init_images[{i}]")
                                 for i, x in enumerate(images)]
        if body.get("mask") not in (None, ""):
            values["mask"] = decode_image(body["mask"], "mask")
        values.setdefault("inpaint_full_res", True)  # A1111's API default
        values.setdefault("inpaint_full_res_padding", 0)
    return GenerationParams(**values).validate(), sorted(ignored)


def _refiner_script(scripts: dict, ignored: list[str]) -> dict[str, Any]:
    """Refiner fields from A1111's built-in "Refiner" script (``alwayson_scripts``:
    ``{"Refiner": {"args": [enabled, checkpoint, switch_at]}}``); every other script with
    arguments is listed as ignored (ControlNet's are taken out before, by
    fastsd.webui.controlnet.split)."""
    out: dict[str, Any] = {}
    for name, script in scripts.items():
        args = script.get("args") if isinstance(script, dict) else script
        if str(name).strip().lower() == "refiner" and isinstance(args, list):
            if args and coerce("alwayson_scripts.Refiner.args[0]", args[0], "bool") \
                    and len(args) > 1 and args[1] not in (None, "", "None"):
                out["refiner_checkpoint"] = coerce("alwayson_scripts.Refiner.args[1]",
                                                   args[1], "str")
                if len(args) > 2 and args[2] is not None:
                    out["refiner_switch_at"] = coerce("alwayson_scripts.Refiner.args[2]",
                                                      args[2], "float")
        elif args:
            ignored.append(f"alwayson_scripts.{name}")
    return out


# Fields of GenerationParams a txt2img body may set; the img2img ones are ignored there
# unless left at a neutral value.
_TXT2IMG = {"prompt", "negative_prompt", "width", "height", "steps", "cfg_scale",
            "sampler_name", "scheduler", "seed", "batch_size", "n_iter", "denoising_strength",
            *_HIRES, "refiner_checkpoint", "refiner_switch_at"}
