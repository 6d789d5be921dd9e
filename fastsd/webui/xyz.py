"""X/Y/Z plot: one generation per combination of up to three varied settings, laid out as
a labelled grid image and saved with its parameters.

The axes are seed, steps, CFG scale, sampler and prompt search/replace. The page builds a
:class:`Plot` from its fields; the API takes AUTOMATIC1111's script form
(``"script_name": "x/y/z plot"`` and ``script_args``, the axis types given by their index
in AUTOMATIC1111's list or by name), through :func:`from_script_args`.

:func:`run` works on any dataclass of generation settings with AUTOMATIC1111's field
names (``prompt``, ``negative_prompt``, ``seed``, ``steps``, ``cfg_scale``,
``sampler_name``); :func:`run_job` runs a plot as one job of the server's queue, and its
grids and cells are saved like any generated image, each PNG with its parameters (a grid's
also name its axes).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import random
import re
from dataclasses import dataclass
from typing import Any, Callable

from fastsd.webui.params import InvalidRequest

SCRIPT_NAME = "x/y/z plot"
MAX_CELLS = 64  # a grid larger than this is refused: it would hold the GPU for long

# AUTOMATIC1111's axis lists, in its order (clients send the index); "Nothing" is 0.
TXT2IMG_AXES = ["Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "Hires steps",
                "CFG Scale", "Prompt S/R", "Prompt order", "Sampler", "Checkpoint name",
                "Sigma Churn", "Sigma min", "Sigma max", "Sigma noise", "Eta", "Clip skip",
                "Denoising", "Hires upscaler", "VAE", "Styles"]
IMG2IMG_AXES = ["Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "CFG Scale",
                "Image CFG Scale", "Prompt S/R", "Prompt order", "Sampler", "Checkpoint name",
                "Sigma Churn", "Sigma min", "Sigma max", "Sigma noise", "Eta", "Clip skip",
                "Denoising", "Cond. Image Mask Weight", "VAE", "Styles"]
SUPPORTED = ("Nothing", "Seed", "Steps", "CFG Scale", "Prompt S/R", "Sampler")


class PlotError(InvalidRequest):
    """An X/Y/Z plot that cannot be run as given (the API answers 422)."""


@dataclass
class Axis:
    kind: str  # one of SUPPORTED, not "Nothing"
    values: list[Any]

    def label(self, value: Any) -> str:
        if self.kind == "Prompt S/R":
            return str(value)
        name = {"CFG Scale": "CFG"}.get(self.kind, self.kind)
        return f"{name}: {value}"

    def apply(self, params: Any, value: Any) -> Any:
        if self.kind == "Seed":
            return dataclasses.replace(params, seed=value)
        if self.kind == "Steps":
            return dataclasses.replace(params, steps=value)
        if self.kind == "CFG Scale":
            return dataclasses.replace(params, cfg_scale=value)
        if self.kind == "Sampler":
            return dataclasses.replace(params, sampler_name=value)
        search = self.values[0]
        return dataclasses.replace(
            params, prompt=params.prompt.replace(search, value),
            negative_prompt=params.negative_prompt.replace(search, value))


@dataclass
class Plot:
    x: Axis | None = None
    y: Axis | None = None
    z: Axis | None = None
    draw_legend: bool = True
    fixed_seeds: bool = True  # a random seed (-1) is drawn once and shared by every cell

    def axes(self) -> list[Axis | None]:
        return [self.x, self.y, self.z]

    def shape(self) -> tuple[int, int, int]:
        return tuple(len(a.values) if a else 1 for a in (self.x, self.y, self.z))  # type: ignore[return-value]

    def to_dict(self) -> dict:
        return {name: ({"type": a.kind, "values": a.values} if a else None)
                for name, a in zip("xyz", self.axes())}


# --------------------------------------------------------------------------- parsing


def _split(text: str) -> list[str]:
    rows = list(csv.reader(io.StringIO(text.strip()), skipinitialspace=True))
    return [v.strip() for row in rows for v in row if v.strip()]


_RANGE = re.compile(r"^\s*(-?\d+)\s*-\s*(-?\d+)\s*(?:\(\s*([+-]\d+)\s*\))?\s*$")
_COUNT = re.compile(r"^\s*(-?\d+)\s*-\s*(-?\d+)\s*\[\s*(\d+)\s*\]\s*$")


def _ints(values: list[str], kind: str) -> list[int]:
    out: list[int] = []
    for v in values:
        m, c = _RANGE.match(v), _COUNT.match(v)
        try:
            if c:
                a, b, n = int(c[1]), int(c[2]), int(c[3])
                out += [round(a + (b - a) * i / max(1, n - 1)) for i in range(n)]
            elif m:
                a, b = int(m[1]), int(m[2])
                step = int(m[3]) if m[3] else (1 if b >= a else -1)
                if step == 0 or (b - a) * step < 0:
                    raise ValueError(v)
                out += list(range(a, b + (1 if step > 0 else -1), step))
            else:
                out.append(int(v))
        except ValueError:
            raise PlotError(f"{kind} value {v!r} is not a whole number or a range such as "
                            "'10-30 (+10)' or '1-9 [3]'.") from None
    return out


def _floats(values: list[str], kind: str) -> list[float]:
    try:
        return [float(v) for v in values]
    except ValueError as e:
        raise PlotError(f"{kind} values must be numbers ({e}).") from None


def axis_kind(type_: Any, mode: str = "txt2img") -> str:
    """The axis name for ``type_``: AUTOMATIC1111's index for ``mode``, or the name."""
    names = IMG2IMG_AXES if mode == "img2img" else TXT2IMG_AXES
    if isinstance(type_, bool):
        raise PlotError(f"Axis type {type_!r} is not an axis.")
    if isinstance(type_, int) or (isinstance(type_, str) and type_.strip().isdigit()):
        index = int(type_)
        if not 0 <= index < len(names):
            raise PlotError(f"Axis type {index} is out of range (0..{len(names) - 1}).")
        kind = names[index]
    else:
        wanted = str(type_ or "Nothing").strip().lower()
        kind = next((n for n in names if n.lower() == wanted), "")
        if not kind:
            raise PlotError(f"Unknown axis type {type_!r}. Supported: {', '.join(SUPPORTED)}.")
    if kind not in SUPPORTED:
        raise PlotError(f"The axis {kind!r} is not supported here. Supported: "
                        f"{', '.join(SUPPORTED)}.")
    return kind


def make_axis(type_: Any, values: Any, mode: str = "txt2img") -> Axis | None:
    """An axis from a type and its values (text as AUTOMATIC1111 takes it, or a list)."""
    kind = axis_kind(type_, mode)
    if kind == "Nothing":
        return None
    raw = [str(v).strip() for v in values] if isinstance(values, (list, tuple)) else _split(
        str(values or ""))
    raw = [v for v in raw if v]
    if not raw:
        raise PlotError(f"The {kind} axis has no values.")
    if kind in ("Seed", "Steps"):
        parsed: list[Any] = _ints(raw, kind)
    elif kind == "CFG Scale":
        parsed = _floats(raw, kind)
    else:
        parsed = raw
    return Axis(kind, parsed)


def _flag(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("true", "1", "yes")


def from_script_args(args: list[Any], mode: str = "txt2img") -> Plot:
    """A Plot from AUTOMATIC1111's ``script_args`` for its X/Y/Z plot script.

    Both layouts are read: the current one with a dropdown list after each axis's values
    ``[x_type, x_values, x_dropdown, y_type, ..., z_dropdown, draw_legend,
    include_lone_images, include_sub_grids, no_fixed_seeds, ...]`` and the older one
    without the dropdowns ``[x_type, x_values, y_type, y_values, z_type, z_values,
    draw_legend, ...]``. A non-empty dropdown list is used for the values.
    """
    if not isinstance(args, list) or len(args) < 2:
        raise PlotError("script_args for the X/Y/Z plot must be a list starting with the X "
                        "axis type and its values.")
    with_dropdowns = len(args) >= 9 and (args[2] is None or isinstance(args[2], list))
    stride = 3 if with_dropdowns else 2
    axes = []
    for i in range(3):
        at = i * stride
        if at + 1 >= len(args):
            axes.append(None)
            continue
        values = args[at + 1]
        if with_dropdowns and args[at + 2]:
            values = args[at + 2]
        axes.append(make_axis(args[at], values, mode))
    rest = args[3 * stride:]
    draw_legend = _flag(rest[0]) if len(rest) > 0 else True
    no_fixed = _flag(rest[3]) if len(rest) > 3 else False
    plot = Plot(*axes, draw_legend=draw_legend, fixed_seeds=not no_fixed)
    check(plot)
    return plot


def check(plot: Plot) -> Plot:
    nx, ny, nz = plot.shape()
    if nx * ny * nz > MAX_CELLS:
        raise PlotError(f"The plot has {nx}x{ny}x{nz} = {nx * ny * nz} images; the limit is "
                        f"{MAX_CELLS}. Use fewer values.")
    kinds = [a.kind for a in plot.axes() if a]
    if len(kinds) != len(set(kinds)):
        raise PlotError("Two axes vary the same setting; give each axis its own.")
    return plot


# --------------------------------------------------------------------------- running


@dataclass
class Cell:
    x: int
    y: int
    z: int
    params: Any
    labels: tuple[str, str, str]


def cells(plot: Plot, base: Any) -> list[Cell]:
    """Every combination, z outermost, with its settings."""
    check(plot)
    if plot.fixed_seeds and base.seed == -1:
        base = dataclasses.replace(base, seed=random.randrange(2**32))
    out = []
    nx, ny, nz = plot.shape()
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                params, labels = base, []
                for axis, i in zip(plot.axes(), (x, y, z)):
                    if axis:
                        params = axis.apply(params, axis.values[i])
                        labels.append(axis.label(axis.values[i]))
                    else:
                        labels.append("")
                out.append(Cell(x, y, z, params, tuple(labels)))  # type: ignore[arg-type]
    return out


@dataclass
class PlotResult:
    grids: list[Any]  # one PIL image per z value
    images: list[Any]  # every cell's image, in cells() order
    infotexts: list[str]
    plot: Plot


def run(plot: Plot, base: Any, generate: Callable[[Any], tuple[Any, str]],
        progress: Callable[[int, int], None] | None = None) -> PlotResult:
    """Generate every cell through ``generate(params) -> (image, infotext)`` and lay the
    images out as grids (one per Z value)."""
    todo = cells(plot, base)
    images, infotexts = [], []
    for i, cell in enumerate(todo):
        image, info = generate(cell.params)
        images.append(image)
        infotexts.append(info)
        if progress:
            progress(i + 1, len(todo))
    nx, ny, nz = plot.shape()
    grids = []
    for z in range(nz):
        block = images[z * nx * ny:(z + 1) * nx * ny]
        xl = [plot.x.label(v) for v in plot.x.values] if plot.x else []
        yl = [plot.y.label(v) for v in plot.y.values] if plot.y else []
        title = plot.z.label(plot.z.values[z]) if plot.z else ""
        grids.append(grid_image(block, nx, ny, xl if plot.draw_legend else [],
                                yl if plot.draw_legend else [],
                                title if plot.draw_legend else ""))
    return PlotResult(grids, images, infotexts, plot)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without sized default fonts
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def grid_image(images: list[Any], nx: int, ny: int, xlabels: list[str], ylabels: list[str],
               title: str = ""):
    """``images`` (row by row) in an ``nx`` by ``ny`` grid, with column labels on top,
    row labels on the left and a title above, in dark text on white."""
    from PIL import Image, ImageDraw

    w = max(im.width for im in images)
    h = max(im.height for im in images)
    size = max(12, min(48, w // 10))
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = size + size // 3
    col_lines = [_wrap(probe, t, font, w - 8) for t in xlabels]
    top = (max((len(ls) for ls in col_lines), default=0) * line_h + size // 2) if xlabels else 0
    left = (max(int(probe.textlength(t, font=font)) for t in ylabels) + size
            if ylabels else 0)
    left = min(left, w * 2)
    head = line_h + size // 2 if title else 0
    grid = Image.new("RGB", (left + nx * w, head + top + ny * h), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((left + nx * w // 2, size // 4), title, fill="black", font=font, anchor="ma")
    for i, lines in enumerate(col_lines):
        for j, line in enumerate(lines):
            draw.text((left + i * w + w // 2, head + size // 4 + j * line_h), line,
                      fill="black", font=font, anchor="ma")
    for j, text in enumerate(ylabels):
        draw.text((left - size // 2, head + top + j * h + h // 2), text, fill="black",
                  font=font, anchor="rm")
    for k, im in enumerate(images):
        x, y = k % nx, k // nx
        grid.paste(im.convert("RGB"), (left + x * w, head + top + y * h))
    return grid


SCRIPT_NAMES = (SCRIPT_NAME, "xyz plot", "x/y/z", "xyz")


def script_of(body: Any, img2img: bool = False) -> tuple[Plot | None, Any]:
    """The plot an API body asks for through ``script_name``/``script_args`` (or None),
    and the body without those two fields."""
    if not isinstance(body, dict) or not body.get("script_name"):
        return None, body
    name = str(body["script_name"]).strip().lower()
    if name not in SCRIPT_NAMES:
        raise PlotError(f"Unknown script {body['script_name']!r}: the only script is "
                        f"{SCRIPT_NAME!r}.")
    rest = {k: v for k, v in body.items() if k not in ("script_name", "script_args")}
    return from_script_args(body.get("script_args"), "img2img" if img2img else "txt2img"), rest


def count(plot: Plot) -> int:
    nx, ny, nz = plot.shape()
    return nx * ny * nz


def run_job(engine: Any, control: Any, plot: Plot, base: Any):
    """Run ``plot`` on ``engine`` as one job: every cell (one image each), then the grids.

    Returns the engine's Result with the grids first, then the cells (as AUTOMATIC1111
    answers); ``info["grids"]`` says how many grids lead. An interrupted plot returns the
    cells made so far and no grid.
    """
    from fastsd.webui import infotext
    from fastsd.webui.engine import Result

    one = dataclasses.replace(base, batch_size=1, n_iter=1)
    seeds: list[int] = []

    def generate(params):
        if control.interrupt:
            raise _Interrupted
        r = engine.generate(params, control)
        if not r.images:
            raise _Interrupted
        seeds.append(r.seeds[0])
        return r.images[0], r.infotexts[0]

    made: list[tuple[Any, str]] = []

    def keep(params):
        out = generate(params)
        made.append(out)
        return out

    try:
        result = run(plot, one, keep)
    except _Interrupted:
        info = {"infotexts": [t for _, t in made], "all_seeds": seeds, "grids": 0,
                "xyz": plot.to_dict()}
        return Result([im for im, _ in made], seeds, [t for _, t in made], info, base,
                      interrupted=True)
    axes = json.dumps(plot.to_dict(), separators=(",", ":"))
    first = infotext.parse(result.infotexts[0])
    settings = {k: v for k, v in first.items() if k not in ("Prompt", "Negative prompt")}
    grid_text = infotext.format(first.get("Prompt", ""), first.get("Negative prompt", ""),
                                {**settings, "X/Y/Z plot": axes})
    n = len(result.grids)
    info = {"infotexts": [grid_text] * n + result.infotexts, "all_seeds": seeds[:1] * n + seeds,
            "grids": n, "xyz": plot.to_dict(), "prompt": base.prompt}
    return Result([*result.grids, *result.images], seeds[:1] * n + seeds,
                  [grid_text] * n + result.infotexts, info, base)


class _Interrupted(Exception):
    pass
