"""The loss curve picture (fastsd.train.curve): where its lines fall, the moving average,
the stage boundary, round ticks, and losses that are not numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastsd.train import curve


def pixels(im) -> np.ndarray:
    return np.asarray(im.convert("RGB")).astype(int)


def has_colour(a: np.ndarray, colour: tuple, box=None, tol: int = 12) -> bool:
    if box is not None:
        x0, y0, x1, y1 = box
        a = a[max(0, y0):y1, max(0, x0):x1]
    return bool((np.abs(a - np.array(colour)).max(axis=-1) <= tol).any())


def plot_xy(n: int, lo: float, hi: float, step: int, value: float) -> tuple[int, int]:
    """Where the picture puts (step, value), from its margins and the padded value range."""
    left, top = curve.MARGIN[0], curve.MARGIN[1]
    right, bottom = curve.SIZE[0] - curve.MARGIN[2], curve.SIZE[1] - curve.MARGIN[3]
    pad = (hi - lo) * 0.05
    lo, hi = lo - pad, hi + pad
    x = left + (step - 1) / (n - 1) * (right - left)
    y = bottom - (value - lo) / (hi - lo) * (bottom - top)
    return round(x), round(y)


def test_the_loss_line_passes_through_each_steps_loss():
    losses = [1.0, 0.2, 0.8, 0.4, 0.6, 0.3, 0.5, 0.1, 0.9, 0.35]
    a = pixels(curve.draw(losses, 0, "UNet"))
    assert a.shape == (curve.SIZE[1], curve.SIZE[0], 3)
    for step, v in enumerate(losses, 1):
        x, y = plot_xy(len(losses), 0.1, 1.0, step, v)
        assert has_colour(a, curve.LOSS, (x - 2, y - 2, x + 3, y + 3)), (step, v)
    # and nowhere far from it: no loss drawn where none is (the top right corner of the plot
    # holds the legend; the bottom left, at step 1, is far below loss 1.0)
    x, y = plot_xy(len(losses), 0.1, 1.0, 1, 0.15)
    assert not has_colour(a, curve.LOSS, (x, y - 3, x + 20, y + 3))


def test_many_steps_get_a_moving_average_few_do_not():
    rng = np.random.default_rng(0)
    many = [1 / (1 + i / 50) + 0.3 * rng.random() for i in range(300)]
    a = pixels(curve.draw(many, 0, "UNet"))
    assert has_colour(a, curve.MEAN) and has_colour(a, curve.LOSS_FAINT)
    # the mean runs through the middle of the noise: at step 150 it is near the noise's mean
    mean = curve.moving_average(many, 6)
    lo, hi = min(many), max(many)
    x, y = plot_xy(300, lo, hi, 150, mean[149])
    assert has_colour(a, curve.MEAN, (x - 2, y - 3, x + 3, y + 4))
    few = pixels(curve.draw(many[:20], 0, "UNet"))
    assert not has_colour(few, curve.MEAN) and has_colour(few, curve.LOSS)


def test_the_moving_average_is_the_mean_of_the_last_k():
    values = [float(v) for v in range(1, 11)]
    assert curve.moving_average(values, 3) == [1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]


def test_the_text_encoder_stage_starts_at_a_dashed_line():
    losses = [0.5 + 0.1 * math.sin(i) for i in range(40)]
    left, top = curve.MARGIN[0], curve.MARGIN[1]
    right, bottom = curve.SIZE[0] - curve.MARGIN[2], curve.SIZE[1] - curve.MARGIN[3]

    def grey_share(im) -> np.ndarray:
        """Per column of the plot area, the share of its height that is the boundary's grey."""
        area = pixels(im)[top + 1:bottom, left + 1:right]
        return (np.abs(area - np.array(curve.BOUNDARY)).max(axis=-1) <= 12).mean(axis=0)

    share = grey_share(curve.draw(losses, 30, "UNet then text encoder"))
    bx = round((30.5 - 1) / 39 * (right - left)) - 1
    assert 0.3 < share[bx - 1:bx + 2].max() < 0.8  # dashed: grey on part of the height
    assert (share > 0.3).sum() <= 2  # and only there
    assert share.max() < 0.3 or (share > 0.3).nonzero()[0].min() >= bx - 1
    for one_stage in (0, 40):  # no boundary, or only one stage ran
        assert grey_share(curve.draw(losses, one_stage, "UNet")).max() < 0.1


@pytest.mark.parametrize("lo,hi", [(0.0, 1.0), (0.0213, 0.0871), (3.0, 1234.0), (-2.5, 2.5)])
def test_ticks_are_round_inside_the_range_and_few(lo, hi):
    t = curve.ticks(lo, hi)
    assert 2 <= len(t) <= 6
    assert all(lo - 1e-12 <= v <= hi + 1e-12 for v in t)
    steps = {round(b - a, 12) for a, b in zip(t, t[1:])}
    assert len(steps) == 1
    step = steps.pop()
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(math.isclose(mantissa, m) for m in (1, 2, 5))
    assert all(math.isclose(v / step, round(v / step), abs_tol=1e-9) for v in t)


def test_losses_that_are_not_numbers_or_one_step_still_draw():
    a = pixels(curve.draw([0.5, float("nan"), 0.4, float("inf"), 0.3], 0, "UNet"))
    assert has_colour(a, curve.LOSS)
    one = pixels(curve.draw([0.25], 0, "UNet"))
    assert has_colour(one, curve.LOSS)
    flat = pixels(curve.draw([0.7] * 10, 0, "UNet"))
    assert has_colour(flat, curve.LOSS)
