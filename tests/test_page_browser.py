"""The web page in a real headless Chromium (Debian's, never a downloaded browser), at a
phone's size, against a real server that webui.ipynb's cells start as a Colab user runs
them (the tiny model, the tiny ControlNet picked in the ControlNet cell, no tunnel): log
in; the ControlNet panel (draw a map, upload a control image, see the preprocessed map,
generate with the ControlNet the notebook chose); the image in the gallery; a 3x1 X/Y plot
whose grid is shown whole and opens full size; and a wrong password refused. A screenshot
is kept in tests/artifacts/."""

from __future__ import annotations

import io
import json
import re
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from fastsd.webui import process
from test_notebooks import NOTEBOOKS, cell

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
USER, PASSWORD = "artist", "a long browser password"
WAIT = 240_000  # ms: a generation on 2 shared CPU cores
PHONE = {"width": 412, "height": 915}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path, monkeypatch, workspace, tiny_sd1):
    """webui.ipynb's cells 2 (model), 3 (ControlNet: tiny-canny) and 4 (launch), run as
    a notebook runs them, with the form filled from FASTSD_FORM."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium.")
    monkeypatch.setenv(process.RUN_DIR_ENV, str(tmp_path / "run"))
    monkeypatch.setattr(process, "_current", None)
    shutil.copytree(tiny_sd1, workspace / "models" / "tiny-sd1")  # as cell 2 would build it
    form = {"Session": "", "Model": "tiny-sd1", "ControlNets": "tiny-canny", "UI": "fastsd",
            "Tunnel": "none", "User": USER, "Port": free_port(), "Password": PASSWORD}
    monkeypatch.setenv("FASTSD_FORM", json.dumps(form))
    notebook: dict = {}
    for number in ("2.", "3.", "4."):
        exec(cell(NOTEBOOKS / "webui.ipynb", number), notebook)
    assert notebook["CONTROLNETS"] == ["sd1-tiny-canny"]
    s = notebook["SERVER"]
    t0 = time.monotonic()
    try:
        yield s.wait_ready(300)
        print(f"server ready in {time.monotonic() - t0:.1f}s")
    finally:
        s.stop()


def fill_number(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Tab")


def whole(page, selector: str) -> dict:
    """Where an image sits and how it is fitted, to tell whether it is shown whole.

    Waits for the image to have loaded: its natural size is 0 x 0 until then."""
    page.wait_for_function("""(sel) => { const i = document.querySelector(sel);
        return i && i.complete && i.naturalWidth > 0; }""", arg=selector, timeout=WAIT)
    return page.evaluate("""(sel) => { const i = document.querySelector(sel);
        const r = i.getBoundingClientRect();
        return {left: r.left, right: r.right, fit: getComputedStyle(i).objectFit,
                natural: [i.naturalWidth, i.naturalHeight], width: innerWidth,
                page: document.documentElement.scrollWidth}; }""", selector)


def test_the_page_in_a_real_browser(server, workspace, tmp_path):
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect, sync_playwright

    url = server.local_url + "/"
    outputs = workspace / "outputs"
    assert httpx.get(url, auth=(USER, "wrong"), timeout=30).status_code == 401
    control = tmp_path / "control.png"
    box = np.zeros((64, 64, 3), np.uint8)
    box[16:48, 20:44] = 255
    Image.fromarray(box).save(control)
    t0 = time.monotonic()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            wrong = browser.new_context(http_credentials={"username": USER,
                                                          "password": "wrong"})
            try:
                status = wrong.new_page().goto(url).status
            except PlaywrightError as e:  # Chromium's page for a 401 with no retry left
                status = 401 if "ERR_HTTP_RESPONSE_CODE_FAILURE" in str(e) or "401" in str(
                    e) else str(e)
            assert status == 401
            wrong.close()

            phone = browser.new_context(
                http_credentials={"username": USER, "password": PASSWORD},
                viewport=PHONE, device_scale_factor=1)
            page = phone.new_page()
            page.set_default_timeout(60_000)
            assert page.goto(url).status == 200
            page.locator("#prompt textarea").fill("a photo of sks dog")
            for elem_id, value in (("steps", "2"), ("width", "64"), ("height", "64")):
                fill_number(page, elem_id, value)

            # the ControlNet panel: the notebook's ControlNet is offered
            page.locator("#controlnet").get_by_text("ControlNet").first.click()
            page.locator("#cn-enable input").check()
            expect(page.locator("#cn-model input")).to_have_value(
                re.compile(r"^sd1-tiny-canny \["))
            # draw on the sketch pad, see the map made of the strokes
            page.locator("#controlnet").get_by_role("tab", name="Draw").click()
            page.locator("#cn-sketch .toolbar-wrap button").first.click()  # the brush
            canvas = page.locator("#cn-sketch canvas").first.bounding_box()
            x, y = canvas["x"] + canvas["width"] * 0.4, canvas["y"] + canvas["height"] * 0.4
            page.mouse.move(x, y)
            page.mouse.down()
            for i in range(20):
                page.mouse.move(x + 4 * i, y + 3 * i)
            page.mouse.up()
            page.locator("#cn-preview").click()
            expect(page.locator("#cn-map img")).to_have_count(1, timeout=WAIT)
            drawn = page.locator("#cn-map img").get_attribute("src")
            # upload a control image instead: its canny map replaces the drawing's
            page.locator("#controlnet").get_by_role("tab", name="Upload").click()
            page.locator("#cn-image input[type=file]").set_input_files(str(control))
            expect(page.locator("#cn-image img")).to_have_count(1)
            page.locator("#cn-preview").click()
            expect(page.locator("#cn-map img")).not_to_have_attribute("src", drawn,
                                                                     timeout=WAIT)
            map_src = page.locator("#cn-map img").get_attribute("src")
            shown = httpx.get(map_src if map_src.startswith("http") else url + map_src,
                              auth=(USER, PASSWORD), timeout=30)
            edges = np.asarray(Image.open(io.BytesIO(shown.content)).convert("L"))
            assert edges.max() == 255 and (edges > 0).mean() < 0.2, "a canny map of the box"
            assert whole(page, "#cn-map img")["page"] <= PHONE["width"], "no sideways scroll"

            page.locator("#generate").click()
            expect(page.locator("#result img")).to_have_count(1, timeout=WAIT)
            expect(page.locator("#info textarea")).to_have_value(re.compile(
                r'Steps: 2,.*ControlNet 0: "Module: canny, Model: sd1-tiny-canny \['))
            saved = list(outputs.rglob("*.png"))
            assert len(saved) == 1

            page.get_by_role("tab", name="Gallery").click()
            page.locator("#gallery-refresh").click()
            expect(page.locator("#gallery img").first).to_be_visible(timeout=WAIT)

            # a grid wider than the screen is shown whole, and opens full size
            page.get_by_role("tab", name="X/Y/Z plot").click()
            page.locator("#x-values textarea, #x-values input").first.fill("1, 2, 3")
            page.locator("#y-type input").fill("Nothing")
            page.locator("#y-type input").press("Enter")
            page.locator("#run-plot").click()
            expect(page.locator("#plot-result img")).to_have_count(1, timeout=WAIT)
            expect(page.locator("#plot-info textarea, #plot-info input").first).to_have_value(
                re.compile(r"\.png$"))
            grid = whole(page, "#plot-result img")
            assert grid["natural"][0] > grid["natural"][1] * 1.5, grid  # a wide grid
            assert grid["fit"] == "contain", "fitted whole into its box, not cropped"
            assert 0 <= grid["left"] and grid["right"] <= PHONE["width"], grid
            page.locator("#plot-result img").first.click()  # a tap: the large view
            assert whole(page, "#plot-result img")["fit"] == "contain"
            link = page.locator("#plot-links a").first
            expect(link).to_have_text("Open the full grid")
            full = httpx.get(url + link.get_attribute("href"), auth=(USER, PASSWORD),
                             timeout=30)
            assert full.status_code == 200
            assert Image.open(io.BytesIO(full.content)).size == tuple(
                grid["natural"])

            print(f"plot checked at {time.monotonic() - t0:.1f}s")
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "page.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot} at {time.monotonic() - t0:.1f}s")
            assert shot.stat().st_size > 10_000
            saved = list(outputs.rglob("*.png"))
            assert len(saved) == 1 + 4  # the first image, the grid and its three cells
        finally:
            browser.close()
    log = server.log.read_text()
    assert PASSWORD not in log and shutil.which("chromium")
