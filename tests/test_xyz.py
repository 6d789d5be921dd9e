"""X/Y/Z plot: A1111's script_args, the cells, the labelled grid and its saved parameters."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from fastsd.webui import infotext, xyz
from webui_server import server  # noqa: F401 (a fixture)


@dataclass
class Params:  # AUTOMATIC1111's field names, as the engine's settings have them
    prompt: str = "a photo of sks dog"
    negative_prompt: str = "blurry dog"
    seed: int = -1
    steps: int = 20
    cfg_scale: float = 7.0
    sampler_name: str = "Euler a"
    width: int = 64
    height: int = 64


def paint(p: Params):
    """An image whose colour encodes the settings, so each cell can be told apart."""
    colour = (p.steps * 5 % 256, int(p.cfg_scale * 20) % 256, len(p.prompt) * 7 % 256)
    return Image.new("RGB", (p.width, p.height), colour), f"{p.prompt}, Steps: {p.steps}"


def test_script_args_current_layout_by_index():
    # webuiapi / A1111 1.6+: [x_type, x_values, x_dropdown, y_type, y_values, y_dropdown, ...]
    args = [4, "10, 20", [], 6, "5,7.5", [], 0, "", [], "True", "False", "False", "False",
            "False", "False", "False", 0, False]
    plot = xyz.from_script_args(args)
    assert (plot.x.kind, plot.x.values) == ("Steps", [10, 20])
    assert (plot.y.kind, plot.y.values) == ("CFG Scale", [5.0, 7.5])
    assert plot.z is None and plot.draw_legend and plot.fixed_seeds


def test_script_args_old_layout_by_name_and_img2img_indices():
    plot = xyz.from_script_args(["Sampler", "Euler a, DDIM", "Seed", "1-3", "Nothing", "",
                                 "False", "False", "False", "True", 0])
    assert plot.x.values == ["Euler a", "DDIM"] and plot.y.values == [1, 2, 3]
    assert not plot.draw_legend and not plot.fixed_seeds
    assert xyz.from_script_args([5, "3,4"], mode="img2img").x.kind == "CFG Scale"
    with pytest.raises(xyz.PlotError, match="Hires steps"):  # index 5 in txt2img's list
        xyz.from_script_args([5, "3,4"], mode="txt2img")


def test_ranges_and_dropdown_values():
    assert xyz.make_axis("Steps", "10-30 (+10)").values == [10, 20, 30]
    assert xyz.make_axis("Seed", "1-9 [3]").values == [1, 5, 9]
    assert xyz.make_axis("Sampler", ["Euler", "DDIM"]).values == ["Euler", "DDIM"]
    plot = xyz.from_script_args([9, "", ["Euler", "UniPC"], 0, "", [], 0, "", [],
                                 "True", "False", "False", "False"])
    assert plot.x.values == ["Euler", "UniPC"]


@pytest.mark.parametrize("args,message", [
    ([11, "0.1,0.2"], "Sigma Churn' is not supported"),
    ([99, "1"], "out of range"),
    (["Wobble", "1"], "Unknown axis type"),
    ([4, "ten"], "not a whole number"),
    ([6, "high"], "must be numbers"),
    ([4, ""], "has no values"),
    ([4, "1-100", [], 1, "1-100", []] + [0, "", [], "True"], "the limit is 64"),
    ([4, "1,2", 4, "3,4"], "same setting"),
    ("not a list", "must be a list"),
])
def test_bad_script_args_say_what_is_wrong(args, message):
    with pytest.raises(xyz.PlotError, match=message):
        xyz.from_script_args(args)


def test_cells_vary_each_axis_and_share_one_seed():
    plot = xyz.Plot(x=xyz.make_axis("Steps", "10,20"), y=xyz.make_axis("Prompt S/R", "dog,cat"))
    cells = xyz.cells(plot, Params())
    assert [(c.params.steps, c.params.prompt) for c in cells] == [
        (10, "a photo of sks dog"), (20, "a photo of sks dog"),
        (10, "a photo of sks cat"), (20, "a photo of sks cat")]
    assert cells[2].params.negative_prompt == "blurry cat"
    assert len({c.params.seed for c in cells}) == 1 and cells[0].params.seed != -1
    assert cells[3].labels == ("Steps: 20", "cat", "")
    free = xyz.Plot(x=xyz.make_axis("Steps", "10,20"), fixed_seeds=False)
    assert {c.params.seed for c in xyz.cells(free, Params())} == {-1}


def test_grid_is_laid_out_and_labelled():
    plot = xyz.Plot(x=xyz.make_axis("Steps", "10,20"), y=xyz.make_axis("CFG Scale", "3,9"))
    done = []
    result = xyz.run(plot, Params(seed=5), paint, progress=lambda i, n: done.append((i, n)))
    assert done[-1] == (4, 4) and len(result.images) == 4 and len(result.grids) == 1
    grid = result.grids[0]
    unlabelled = xyz.grid_image(result.images, 2, 2, [], [])
    assert unlabelled.size == (128, 128)
    assert grid.width > 128 and grid.height > 128  # room for the labels
    left, top = grid.width - 128, grid.height - 128
    for k, image in enumerate(result.images):  # each cell sits where its axes put it
        x, y = k % 2, k // 2
        assert grid.getpixel((left + x * 64 + 32, top + y * 64 + 32)) == image.getpixel((0, 0))
    label_band = grid.crop((left, 0, grid.width, top)).convert("L")
    assert min(label_band.getdata()) < 128  # text was drawn above the columns
    row_band = grid.crop((0, top, left, grid.height)).convert("L")
    assert min(row_band.getdata()) < 128  # and left of the rows


def test_a_z_axis_makes_one_grid_per_value():
    plot = xyz.Plot(x=xyz.make_axis("Steps", "1,2"), z=xyz.make_axis("Sampler", "Euler,DDIM"))
    result = xyz.run(plot, Params(seed=1), paint)
    assert len(result.grids) == 2 and len(result.images) == 4


def test_the_api_runs_a_plot_as_automatic1111s_script(server, workspace):
    """The webuiapi client (a real AUTOMATIC1111 client) asks for a 2x2 plot."""
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    api.set_auth("artist", "pw")
    args = [xyz.TXT2IMG_AXES.index("Seed"), "1, 2", [], xyz.TXT2IMG_AXES.index("Steps"),
            "1, 2", [], 0, "", [], "True", "False", "False", "False"]
    r = api.txt2img(prompt="a photo of sks dog", width=64, height=64, steps=2, seed=7,
                    sampler_name="Euler", script_name="X/Y/Z plot", script_args=args)
    assert r.info["grids"] == 1 and len(r.images) == 5  # the grid, then the four cells
    grid, cells = r.images[0], r.images[1:]
    assert grid.width > 128 and grid.height > 128 and all(c.size == (64, 64) for c in cells)
    texts = r.info["infotexts"]
    assert [("Seed: 1" in t, "Steps: 1," in t) for t in texts[1:]] == [
        (True, True), (False, True), (True, False), (False, False)]
    assert "Seed: 2" in texts[2] and "Steps: 2," in texts[3]
    saved = [Path(p) for p in r.info["saved_files"]]
    assert len(saved) == 5 and all(p.is_file() for p in saved)
    assert saved[0].is_relative_to(workspace)
    with Image.open(saved[0]) as png:
        plot = json.loads(infotext.parse(png.text["parameters"])["X/Y/Z plot"])
    assert plot["x"] == {"type": "Seed", "values": [1, 2]}
    assert plot["y"] == {"type": "Steps", "values": [1, 2]}
    assert api.get_scripts()["txt2img"][0] == "x/y/z plot"


def test_a_bad_plot_through_the_api_is_a_422(server):
    import httpx

    body = {"prompt": "x", "width": 64, "height": 64, "steps": 1,
            "script_name": "x/y/z plot", "script_args": [11, "0.1,0.2"]}
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, auth=("artist", "pw"),
                   timeout=60)
    assert r.status_code == 422 and "Sigma Churn" in r.json()["detail"]
    body["script_name"] = "outpainting mk2"
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, auth=("artist", "pw"),
                   timeout=60)
    assert r.status_code == 422 and "Unknown script" in r.json()["detail"]
