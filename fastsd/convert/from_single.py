"""One single-file checkpoint (path or link) -> a diffusers folder, and what a file is.

The weights are loaded by diffusers' own single-file loader (``from_single_file``) with a
local config folder and ``local_files_only=True``, so it works offline once the config
folder is there. The family is detected from tensor names and shapes
(:mod:`fastsd.convert.detect`), never from the file size, and files that are not whole
models are refused by name. Every tensor diffusers loaded is then checked against the
file through the same key map that writes single files (:mod:`fastsd.convert.keymap`);
a component diffusers' heuristics got wrong is loaded again from the file through that
map, and anything still different is an error.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fastsd import drive, fetch
from fastsd.convert import detect, keymap
from fastsd.convert.tensors import FLOATS, main_float, open_tensors, torch_dtype
from fastsd.errors import ModelError
from fastsd.workspace import Workspace

log = logging.getLogger("fastsd")

# The diffusers repos whose config files (no weights) describe each kind of model.
CONFIG_REPOS = {
    ("sd1", False): "stable-diffusion-v1-5/stable-diffusion-v1-5",
    ("sd1", True): "stable-diffusion-v1-5/stable-diffusion-inpainting",
    ("sd2", False): "stabilityai/stable-diffusion-2-1",
    ("sd2", True): "stabilityai/stable-diffusion-2-inpainting",
    ("sdxl", False): "stabilityai/stable-diffusion-xl-base-1.0",
    ("sdxl", True): "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
}
CONFIG_FILES = ["model_index.json", "*/*.json", "*/*.txt"]
PREDICTIONS = {"v": "v_prediction", "v_prediction": "v_prediction", "eps": "epsilon",
               "epsilon": "epsilon"}


# --------------------------------------------------------------------------- inspect


def inspect(file: str | os.PathLike[str]) -> dict[str, Any]:
    """What a single file is: kind, family, prediction type, precision, tensor count, EMA,
    global step; read from its header (a .ckpt is memory-mapped, never run)."""
    path = Path(file)
    yaml_path = path.with_suffix(".yaml")
    yaml_text = yaml_path.read_text(encoding="utf-8") if yaml_path.is_file() else None
    with open_tensors(path) as tf:
        infos = {k: tf.info(k) for k in tf.keys()}
        det = detect.classify({k: i.shape for k, i in infos.items()}, tf.metadata, yaml_text)
        metadata = dict(tf.metadata)
        extra = dict(tf.pickle_extra)
        fmt = "safetensors" if type(tf).__name__ == "SafetensorsFile" else "pickle"
    dtypes: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    params = 0
    for i in infos.values():
        dtypes[i.dtype] = dtypes.get(i.dtype, 0) + 1
        nbytes[i.dtype] = nbytes.get(i.dtype, 0) + i.nbytes
        n = 1
        for d in i.shape:
            n *= d
        params += n
    floats = {d for d in dtypes if d in FLOATS}
    precision = {"F16": "fp16", "F32": "fp32", "BF16": "bf16", "F64": "fp64"}.get(
        next(iter(floats)), "?") if len(floats) == 1 else ("mixed" if floats else "none")
    step = metadata.get(detect.META_STEP, extra.get("global_step"))
    return {
        "path": str(path), "format": fmt, "size_bytes": path.stat().st_size,
        **det.to_dict(), "precision": precision, "dtypes": dtypes, "bytes_by_dtype": nbytes,
        "tensors": len(infos),
        "parameters": params, "global_step": int(step) if step is not None else None,
        "metadata": metadata,
    }


# --------------------------------------------------------------------------- configs


def config_folder(family: str, inpainting: bool, ws: Workspace) -> Path:
    """A local folder with the diffusers config files (no weights) of the family."""
    return fetch.hf_snapshot(CONFIG_REPOS[(family, inpainting)], ws.hub_cache, CONFIG_FILES,
                             what="config files of")


def pipeline_class(family: str, inpainting: bool):
    import diffusers

    name = {("sd1", False): "StableDiffusionPipeline", ("sd2", False): "StableDiffusionPipeline",
            ("sd1", True): "StableDiffusionInpaintPipeline",
            ("sd2", True): "StableDiffusionInpaintPipeline",
            ("sdxl", False): "StableDiffusionXLPipeline",
            ("sdxl", True): "StableDiffusionXLInpaintPipeline"}[(family, inpainting)]
    return getattr(diffusers, name)


# --------------------------------------------------------------------------- verification


def _configs(pipe, family: str) -> dict[str, dict]:
    out = {}
    for folder in keymap.COMPONENT_PREFIX[family]:
        comp = getattr(pipe, folder, None)
        if comp is not None:
            out[folder] = comp.config.to_dict() if hasattr(comp.config, "to_dict") \
                else dict(comp.config)
    return out


def _undo(t, target: keymap.Target):
    if target.op == "conv1x1" and t.ndim == 4:
        return t[:, :, 0, 0]
    if target.op == "T":
        return t.t()
    if target.op == "part":
        return t.chunk(3, 0)[target.index]
    return t


def _model_name(own: set[str], name: str) -> str:
    """transformers' own name (``own``: the module's names) of a text-encoder tensor
    named without ``text_model.``."""
    return name if name in own or keymap.TEXT_MODEL + name not in own \
        else keymap.TEXT_MODEL + name


def file_tensors(path: Path, pipe, family: str, only: str | None = None):
    """The file's tensors one at a time as (component folder, diffusers name, tensor),
    through the key map (``only``: the tensors of one component). Nothing is kept: each
    tensor is read when it is asked for."""
    fmap = keymap.FamilyMap.build(family, _configs(pipe, family))
    own = {f: set(getattr(pipe, f).state_dict()) for f in fmap.components}
    with open_tensors(path) as tf:
        for key in tf.keys():
            found = fmap.locate(key)
            if found is None or (only is not None and found[0] != only):
                continue
            folder, targets = found
            for target in targets:
                name = _model_name(own[folder], target.name) \
                    if fmap.components[folder].is_text() else target.name
                yield folder, name, _undo(tf.read(key), target)


def verify(path: Path, pipe, family: str, repair: bool = True) -> dict[str, int]:
    """Check every tensor of each component of ``pipe`` against the file, one tensor at a
    time (never a second copy of the model in memory).

    A component that differs (diffusers' loader guessed wrong, for example between two
    text encoders of the same width) is loaded again from the file through the key map
    when ``repair``, tensor by tensor into its own weights. Returns the number of tensors
    compared per component; raises a ModelError when a tensor still differs or is missing.
    """
    bad, counts = _compare(path, pipe, family)
    for folder in [f for f, names in bad.items() if names and repair]:
        log.warning("diffusers loaded %d tensors of the %s differently from the file "
                    "(e.g. %s); loading them from the file through fastsd's key map.",
                    len(bad[folder]), folder, bad[folder][0])
        _load_from_file(path, pipe, family, folder)
        bad[folder] = _compare(path, pipe, family, folder)[0][folder]
    for folder, names in bad.items():
        if names:
            raise ModelError(f"After conversion {len(names)} tensors of the {folder} differ "
                             f"from {path.name} (e.g. {names[0]}). The file's layout is not a "
                             "standard one; it cannot be converted faithfully.")
    return counts


def _compare(path: Path, pipe, family: str, only: str | None = None
             ) -> tuple[dict[str, list[str]], dict[str, int]]:
    """({component: names that differ from the file or are missing}, {component: tensors
    compared}). Tensors of the file the model has no use for (SD 2.x text_projection) are
    fine; a weight the file lacks is bad only when the loader left it empty (meta)."""
    import torch

    params = {f: getattr(pipe, f).state_dict()
              for f in keymap.COMPONENT_PREFIX[family] if getattr(pipe, f, None) is not None
              and (only is None or f == only)}
    bad: dict[str, list[str]] = {f: [] for f in params}
    counts: dict[str, int] = {f: 0 for f in params}
    seen: dict[str, set[str]] = {f: set() for f in params}
    for folder, name, t in file_tensors(path, pipe, family, only):
        if folder not in params:
            continue
        counts[folder] += 1
        v = params[folder].get(name)
        if v is None or name.endswith("position_ids"):
            continue
        seen[folder].add(name)
        if v.is_meta or v.shape != t.shape or not torch.equal(v, t.to(v.dtype)):
            bad[folder].append(name)
    for folder, sd in params.items():
        bad[folder] += [k for k, v in sd.items() if k not in seen[folder] and v.is_meta
                        and not k.endswith("position_ids")]
    return bad, counts


def _load_from_file(path: Path, pipe, family: str, folder: str) -> None:
    """Load one component's weights from the file through the key map, one tensor at a
    time: copied into weights the loader made, assigned where it left them empty."""
    import torch

    module = getattr(pipe, folder)
    params = module.state_dict()
    for _, name, t in file_tensors(path, pipe, family, folder):
        v = params.get(name)
        if v is None:
            continue
        if v.is_meta or v.shape != t.shape:
            module.load_state_dict({name: t.to(v.dtype)}, strict=False, assign=True)
        else:
            with torch.no_grad():
                v.copy_(t)


def _precision(info: dict[str, Any]):
    """The dtype to load a file in: the one most of its floating-point values are stored
    in (an fp16 file stays fp16, not twice its size in fp32)."""
    import torch

    name = main_float(info["bytes_by_dtype"])
    return torch.float32 if name is None else torch_dtype(name)


# --------------------------------------------------------------------------- to diffusers


def to_diffusers(src: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                 config: str | os.PathLike[str] | None = None, prediction: str | None = None,
                 fp16: bool | None = None, root: Workspace | Path | None = None) -> Path:
    """Convert a single-file checkpoint (a path or a link) into a diffusers folder.

    ``config``: a local diffusers folder (or Hub repo id) whose config files describe the
    model; by default the config files of the detected family are fetched once into the
    workspace's Hub cache. ``prediction``: "epsilon" or "v" to override the detection (SD
    2.x files often do not say). ``fp16``: True or False to save fp16 or fp32 weights; by
    default the precision most of the file's weights have (an fp16 file is loaded and saved
    in fp16: half the memory and the disk of fp32). The free space for the folder is
    checked first; the folder is written whole or not at all.
    """
    import torch

    out_dir = Path(out_dir)
    ws = Workspace.current(root)
    src_s = os.fspath(src)
    path = fetch.link_file(src_s, ws.downloads, ws.hub_cache) if fetch.is_link(src_s) \
        else Path(src_s)
    info = inspect(path)
    det = detect.Detection(**{k: info[k] for k in (
        "kind", "family", "inpainting", "prediction_type", "prediction_source", "ema",
        "notes", "ztsnr")})
    if not det.convertible:
        raise detect.refuse(det, path)
    family = det.family
    assert family is not None
    pred = PREDICTIONS.get(prediction or "", None) if prediction else det.prediction_type
    if prediction and pred is None:
        raise ModelError(f"Unknown prediction type {prediction!r}: use 'epsilon' or 'v'.")
    if pred is None:
        pred = "v_prediction"
        log.warning("%s is a Stable Diffusion 2.x model that does not say whether it predicts "
                    "v (768 px models) or noise (512 px base models); assuming v. Pass "
                    "prediction='epsilon' (--prediction epsilon) for a 512 px base model.",
                    path.name)
    if config is None:
        cfg = config_folder(family, det.inpainting, ws)
    elif Path(config).is_dir():
        cfg = Path(config)
    else:  # a Hub repo id
        cfg = fetch.hf_snapshot(os.fspath(config), ws.hub_cache, CONFIG_FILES,
                                what="config files of")
    dtype = _precision(info) if fp16 is None else torch.float16 if fp16 else torch.float32
    drive.require_space(out_dir.parent, info["parameters"] * dtype.itemsize,
                        f"Converting {path.name} to a diffusers folder")
    cls = pipeline_class(family, det.inpainting)
    log.info("Loading %s (%s) in %s with diffusers' single-file loader", path.name,
             det.describe(), str(dtype).removeprefix("torch."))
    try:
        pipe = cls.from_single_file(str(path), config=str(cfg), local_files_only=True,
                                    dtype=dtype)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise ModelError(f"diffusers could not load {path.name} as {det.describe()} with the "
                         f"configs of {cfg}: {str(e).splitlines()[0][:300]}. Check that the "
                         "config folder matches the model's family.") from e
    zsnr = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} \
        if det.ztsnr else {}
    if getattr(pipe.scheduler.config, "prediction_type", pred) != pred or zsnr:
        pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config,
                                                              prediction_type=pred, **zsnr)
    counts = verify(path, pipe, family)
    log.info("Checked %d tensors against the file: all equal", sum(counts.values()))
    with drive.folder_writer(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    log.info("Wrote the diffusers model %s", out_dir)
    return out_dir
