"""Diffusers folder -> one single-file checkpoint (.safetensors or .ckpt), streaming.

The conversion is planned from names, shapes and dtypes alone (file headers and configs),
then executed tensor by tensor: read, rename and reshape through :mod:`keymap`, cast,
write. Peak memory is about one tensor (for .ckpt, see :func:`write_ckpt`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastsd.convert import keymap
from fastsd.convert.tensors import (FLOATS, Info, MemoryTensors, TensorFile, open_tensors,
                                    torch_dtype, write_safetensors)
from fastsd.errors import DriveError, FastSDError, ModelError
from fastsd.convert import detect

if TYPE_CHECKING:
    import torch

log = logging.getLogger("fastsd")

WEIGHT_NAMES = ("diffusion_pytorch_model", "model")


@dataclass
class Source:
    file: TensorFile
    key: str


@dataclass
class Planned:
    """One tensor of the single file: where its data comes from and how it changes."""

    name: str
    info: Info
    sources: list[Source]  # one, or the stacked parts in order
    op: str = ""  # "", "conv1x1", "T", "part"


def weight_files(component_dir: Path) -> list[Path]:
    """The weight files of one diffusers component (sharded or not, safetensors first)."""
    for stem in WEIGHT_NAMES:
        for ext in (".safetensors", ".bin"):
            for variant in ("", ".fp16"):
                index = component_dir / f"{stem}{variant}{ext}.index.json"
                if index.is_file():
                    shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                    return [component_dir / s for s in sorted(set(shards.values()))]
                single = component_dir / f"{stem}{variant}{ext}"
                if single.is_file():
                    return [single]
    raise ModelError(f"{component_dir} holds no weights (no diffusion_pytorch_model or model "
                     ".safetensors/.bin). The diffusers model is incomplete: save it again.")


def _out_dtype(dtype: str, fp16: bool) -> str:
    return ("F16" if fp16 else "F32") if dtype in FLOATS else dtype


def plan(folder: Path, family: str, fp16: bool, stack: contextlib.ExitStack,
         tensors: dict[str, dict] | None = None) -> list[Planned]:
    """Every tensor of the single file, from the diffusers folder's configs and headers;
    the components named in ``tensors`` (folder name -> state dict) from those instead of
    the folder's weight files."""
    parts: dict[str, list[tuple[int, Source, Info]]] = {}
    out: dict[str, Planned] = {}
    tensors = tensors or {}

    def add(component_dir: Path, kmap: keymap.KeyMap, rename=lambda n: n) -> None:
        files = ([MemoryTensors(tensors[component_dir.name])] if component_dir.name in tensors
                 else [stack.enter_context(open_tensors(p)) for p in weight_files(component_dir)])
        for tf in files:
            for key in tf.keys():
                if kmap.dropped(key):  # a buffer, rebuilt by every loader
                    continue
                t = kmap.to_ldm(key)
                name, info = rename(t.ldm), tf.info(key)
                dtype = _out_dtype(info.dtype, fp16)
                if name in out or name in parts and t.op != "part":
                    raise ModelError(f"Two tensors of {folder} map to {name}: the model's "
                                     "layout is not the standard one; it cannot be converted.")
                if t.op == "part":
                    parts.setdefault(name, []).append((t.index, Source(tf, key), info))
                    continue
                shape = info.shape
                if t.op == "conv1x1" and len(shape) == 2:
                    shape = (*shape, 1, 1)
                elif t.op == "T":
                    shape = tuple(reversed(shape))
                out[name] = Planned(name, Info(dtype, shape), [Source(tf, key)],
                                    t.op)

    for component, prefix, kind in keymap.LAYOUTS[family]:
        cdir = folder / component
        add(cdir, keymap.KeyMap.for_component(kind, prefix, _read_config(cdir)))
        if component == "unet" and (folder / keymap.EMA_FOLDER).is_dir() and \
                "unet" not in tensors:  # the folder's EMA is not of the weights given
            ema_dir = folder / keymap.EMA_FOLDER
            add(ema_dir, keymap.KeyMap.for_component(kind, prefix, _read_config(ema_dir)),
                lambda n: keymap.EMA_PREFIX + n.removeprefix("model.").replace(".", ""))
    for name, ps in parts.items():
        ps.sort(key=lambda p: p[0])
        infos = [p[2] for p in ps]
        if [p[0] for p in ps] != list(range(len(ps))) or len({i.shape[1:] for i in infos}) != 1:
            raise ModelError(f"The parts of {name} in {folder} do not fit together (q, k and v "
                             "of a different shape, or one missing); it cannot be converted.")
        shape = (sum(i.shape[0] for i in infos), *infos[0].shape[1:])
        out[name] = Planned(name, Info(_out_dtype(infos[0].dtype, fp16), shape),
                            [p[1] for p in ps], "part")
    return [out[k] for k in sorted(out)]


def _read_config(component_dir: Path) -> dict:
    p = component_dir / "config.json"
    if not p.is_file():
        raise ModelError(f"{p} is missing: the diffusers model is incomplete. Save it again.")
    return json.loads(p.read_text(encoding="utf-8"))


def produce(p: Planned) -> "torch.Tensor":
    """Read, convert and cast one planned tensor."""
    import torch

    dtype = torch_dtype(p.info.dtype)
    if p.op == "marker":
        return torch.empty(p.info.shape, dtype=dtype)
    ts = [s.file.read(s.key, scratch=True).to(dtype, copy=True) for s in p.sources]
    if p.op == "part":
        return torch.cat(ts, 0)
    t = ts[0]
    if p.op == "conv1x1":
        return t.reshape(p.info.shape)
    if p.op == "T":
        return t.t().contiguous()
    return t


def prediction_markers(folder: Path, prediction_type: str | None) -> list[str]:
    """The empty marker tensors a v-prediction single file carries: ``v_pred``, which
    ComfyUI (SDXL) and Forge look for, and ``ztsnr`` when the scheduler is rescaled to zero
    terminal SNR. SD 2.x files get the ``.yaml`` too, which AUTOMATIC1111 reads."""
    if prediction_type != "v_prediction":
        return []
    sched = folder / "scheduler" / "scheduler_config.json"
    zsnr = sched.is_file() and bool(json.loads(sched.read_text(encoding="utf-8"))
                                    .get("rescale_betas_zero_snr"))
    return [detect.V_PRED_MARK] + ([detect.ZTSNR_MARK] if zsnr else [])


def planned_size(src: str | os.PathLike[str], fp16: bool = True) -> int:
    """The bytes of tensor data :func:`to_single_file` writes for ``src`` (the header adds a
    few hundred KB), from its configs and file headers alone."""
    src = Path(src)
    det = detect.detect_folder(src)
    if not det.convertible:
        raise detect.refuse(det, src)
    assert det.family is not None
    with contextlib.ExitStack() as stack:
        return sum(p.info.nbytes for p in plan(src, det.family, fp16, stack))


@contextlib.contextmanager
def _drive_errors(src: Path, dst: Path):
    """The model folder read (from Drive, in a trainer's export) failing mid-way: one
    message. The file is written through drive.atomic_writer, so ``dst`` is untouched."""
    try:
        yield
    except FastSDError:
        raise
    except OSError as e:
        raise DriveError(f"Converting {src} to {dst.name} failed while reading it: {e}. Google "
                         "Drive may have disconnected: re-run the Drive cell, then run this "
                         f"again; {dst.name} was not written.") from e


def to_single_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                   fp16: bool = True, ckpt: bool = False,
                   global_step: int | None = None,
                   tensors: dict[str, dict] | None = None,
                   metadata: dict[str, str] | None = None) -> Path:
    """Convert the diffusers folder ``src`` into the single file ``dst`` (LDM layout).

    ``.safetensors`` unless ``ckpt`` (then the suffix of ``dst`` becomes ``.ckpt``); fp16
    unless ``fp16=False``. ``global_step`` is recorded in the file; EMA weights (a
    ``unet_ema`` folder) are included as LDM's ``model_ema.*``. For SD 2.x the inference
    ``.yaml`` (the v-prediction variant for v models) is written beside the file.
    ``tensors`` (a component's folder name, such as "unet" or "text_encoder" -> its state
    dict) writes those weights, in memory, instead of the folder's: a model being trained,
    whose folder gives the configs and the components it does not train. ``metadata`` is
    added to the file's header. Returns the path of the file written.
    """
    from tqdm.auto import tqdm

    src, dst = Path(src), Path(dst)
    dst = dst.with_suffix(".ckpt" if ckpt else ".safetensors") \
        if dst.suffix.lower() in (".safetensors", ".ckpt", "") else dst
    det = detect.detect_folder(src)
    if not det.convertible:
        raise detect.refuse(det, src)
    family = det.family
    assert family is not None
    meta = {"format": "pt", detect.META_FAMILY: family,
            detect.META_PREDICTION: det.prediction_type or "epsilon",
            "fastsd.precision": "fp16" if fp16 else "fp32"}
    if global_step is not None:
        meta[detect.META_STEP] = str(int(global_step))
    meta.update(metadata or {})
    markers = prediction_markers(src, det.prediction_type)
    with _drive_errors(src, dst), contextlib.ExitStack() as stack:
        planned = plan(src, family, fp16, stack, tensors)
        planned += [Planned(m, Info("F16" if fp16 else "F32", (0,)), [], "marker")
                    for m in markers]
        by_name = {p.name: p for p in planned}
        bar = tqdm(total=len(planned), desc=f"Converting {src.name}", unit="tensor",
                   leave=False)
        stack.callback(bar.close)
        ticks = iter(lambda: bar.update(1), object())
        items = [(p.name, p.info) for p in planned]
        if ckpt:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="fastsd-convert-"))
            staged = write_safetensors(Path(tmp) / "staged.safetensors", items,
                                       lambda n: produce(by_name[n]), meta, ticks)
            write_ckpt(staged, dst, global_step)
        else:
            write_safetensors(dst, items, lambda n: produce(by_name[n]), meta, ticks)
    if family == "sd2":
        from fastsd.convert.ldm_config import write_sd2_yaml

        write_sd2_yaml(src, dst.with_suffix(".yaml"), det.prediction_type == "v_prediction")
    log.info("Wrote %s (%s, %s, %d tensors)", dst, detect.FAMILY_NAMES[family],
             "fp16" if fp16 else "fp32", len(planned))
    return dst


# --------------------------------------------------------------------------- .ckpt


class _DroppingWriter:
    """A file wrapper for torch.save that, every ``every`` bytes written, tells the kernel
    to drop the pages of ``mm`` already read: the mmap'd tensors it saves then never
    accumulate in memory (the pages are clean copies of a file, read again if needed)."""

    def __init__(self, f, mm: mmap.mmap, every: int = 128 << 20) -> None:
        self.f, self.mm, self.every, self._since = f, mm, every, 0

    def write(self, b) -> int:
        n = self.f.write(b)
        self._since += len(memoryview(b))
        if self._since >= self.every:
            self.mm.madvise(mmap.MADV_DONTNEED)
            self._since = 0
        return n

    def flush(self) -> None:
        self.f.flush()


def write_ckpt(staged: Path, dst: Path, global_step: int | None) -> Path:
    """Write ``{"state_dict": ..., "global_step": N}`` with torch.save, in one pass.

    The tensors are views of a private memory map of the staged .safetensors file, so
    torch.save reads them from the page cache and nothing is copied; the pages read are
    dropped as the writing goes on (see :class:`_DroppingWriter`).
    """
    import torch

    from fastsd import drive
    from fastsd.convert.tensors import SafetensorsFile

    with SafetensorsFile(staged) as sf:
        index = {k: sf.index[k] for k in sf.keys()}
        base = sf.base
    with open(staged, "rb") as f, \
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mm:
        sd = {}
        for k, (info, start, stop) in index.items():
            dtype = torch_dtype(info.dtype)
            if stop == start:
                sd[k] = torch.empty(info.shape, dtype=dtype)
            else:
                sd[k] = torch.frombuffer(mm, dtype=dtype, count=(stop - start) //
                                         dtype.itemsize, offset=base + start).view(info.shape)
        obj = {"state_dict": sd, "global_step": int(global_step or 0)}
        with drive.atomic_writer(dst, "wb") as out:
            torch.save(obj, _DroppingWriter(out, mm))
        del sd, obj
    return dst
