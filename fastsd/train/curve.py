"""The loss curve as a picture, drawn with Pillow: the loss per step, a moving average once
there are many steps, and a dashed line where the text encoder's stage begins.

Drawn here rather than with a plotting library because the picture is made at the end of
every training run, and importing one cost about half a second of each run."""

from __future__ import annotations

import math

SIZE = (700, 350)
MARGIN = (64, 34, 16, 44)  # left, top, right, bottom: the plot area's distance from the edge
LOSS = (31, 119, 180)
LOSS_FAINT = (165, 200, 225)  # the per-step loss under a moving average
MEAN = (255, 127, 14)
GRID = (225, 225, 225)
INK = (40, 40, 40)
BOUNDARY = (128, 128, 128)


def ticks(lo: float, hi: float, most: int = 6) -> list[float]:
    """Round values between ``lo`` and ``hi`` for an axis: steps of 1, 2 or 5 times a power of
    ten, at most ``most`` of them."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(1, most - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    count = int(math.floor((hi - first) / step + 1e-9)) + 1
    return [round(first + i * step, 12) for i in range(count)]


def label(value: float, step: float) -> str:
    """A tick's text with as many decimals as its spacing needs."""
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 0
    return f"{value:.{decimals}f}"


def moving_average(values: list[float], k: int) -> list[float]:
    """The mean of each value and the ``k - 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= k:
            total -= values[i - k]
        out.append(total / min(k, i + 1))
    return out


def draw(losses: list[float], boundary: int, title: str):
    """The curve of ``losses`` (one per step) as an RGB image; ``boundary`` is the last step
    of the first stage (0 for none)."""
    from PIL import Image, ImageDraw

    from fastsd.dataset.sheet import font

    im = Image.new("RGB", SIZE, "white")
    d = ImageDraw.Draw(im)
    left, top = MARGIN[0], MARGIN[1]
    right, bottom = SIZE[0] - MARGIN[2], SIZE[1] - MARGIN[3]
    n = len(losses)
    k = n // 50  # a moving average once there are many steps
    mean = moving_average(losses, k) if k > 1 else []
    finite = [v for v in losses if math.isfinite(v)] or [0.0]
    lo, hi = min(finite), max(finite)
    pad = (hi - lo) * 0.05 or max(abs(hi) * 0.05, 1e-3)
    lo, hi = lo - pad, hi + pad
    x_lo, x_hi = 1, max(n, 2)

    def x(step: float) -> float:
        return left + (step - x_lo) / (x_hi - x_lo) * (right - left)

    def y(value: float) -> float:
        value = min(max(value, lo), hi) if math.isfinite(value) else hi
        return bottom - (value - lo) / (hi - lo) * (bottom - top)

    small = font(11)
    yt = ticks(lo, hi)
    for v in yt:
        d.line([(left, y(v)), (right, y(v))], fill=GRID)
        text = label(v, yt[1] - yt[0] if len(yt) > 1 else v)
        d.text((left - 6, y(v)), text, fill=INK, font=small, anchor="rm")
    xt = [v for v in ticks(x_lo, x_hi) if v == int(v)]
    for v in xt:
        d.line([(x(v), top), (x(v), bottom)], fill=GRID)
        d.text((x(v), bottom + 5), str(int(v)), fill=INK, font=small, anchor="mt")
    if 0 < boundary < n:
        bx = x(boundary + 0.5)
        for y0 in range(top, bottom, 8):
            d.line([(bx, y0), (bx, min(y0 + 4, bottom))], fill=BOUNDARY)
    points = [(x(i + 1), y(v)) for i, v in enumerate(losses)]
    if len(points) == 1:
        d.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2],
                  fill=LOSS)
    else:
        d.line(points, fill=LOSS_FAINT if mean else LOSS, width=1 if mean else 2)
    if mean:
        d.line([(x(i + 1), y(v)) for i, v in enumerate(mean)], fill=MEAN, width=2)
    d.rectangle([left, top, right, bottom], outline=INK)
    d.text(((left + right) / 2, top / 2), title, fill=INK, font=font(13), anchor="mm")
    d.text(((left + right) / 2, SIZE[1] - 6), "step", fill=INK, font=small, anchor="md")
    ylabel = Image.new("RGB", (40, 16), "white")
    ImageDraw.Draw(ylabel).text((20, 8), "loss", fill=INK, font=small, anchor="mm")
    im.paste(ylabel.rotate(90, expand=True), (4, int((top + bottom) / 2) - 20))
    legend = [("loss", LOSS_FAINT if mean else LOSS)] + ([(f"mean of {k} steps", MEAN)]
                                                        if mean else [])
    ly = top + 8
    for text, colour in legend:
        width = d.textlength(text, font=small)
        lx = right - 12 - width - 26
        d.line([(lx, ly), (lx + 20, ly)], fill=colour, width=2)
        d.text((lx + 26, ly), text, fill=INK, font=small, anchor="lm")
        ly += 16
    return im
