"""The page's logic against a real server on the tiny model: progress with a live preview
and interrupt, img2img and inpainting from the drawn mask, the gallery and "reuse these
settings", and the page behind the API's auth."""

from __future__ import annotations

import json
import re

import httpx
from PIL import Image, ImageDraw

from fastsd.webui import page
from webui_server import PASSWORD, USER, server  # noqa: F401 (a fixture)


def api_of(server) -> page.Api:
    return page.Api(server.url, (USER, PASSWORD), timeout=300)


def test_progress_shows_a_live_preview_and_interrupt_stops_the_job(server):
    api = api_of(server)
    body = page.request_body("a photo of sks dog", "", "Euler", 150, 7, 64, 64, 3, 1, 16)
    previews, steps, result = [], [], None
    for bar, preview, result in page.run_with_progress(api, "txt2img", body):
        if result is None:
            steps.extend(int(n) for n in re.findall(r"Step (\d+)/150", bar))
            if preview is not None:
                previews.append(preview)
                api.interrupt()  # as the Interrupt button does
    info = json.loads(result["info"])
    assert previews and previews[0].size[0] > 0  # a live preview was shown
    assert steps and max(steps) > 0  # the bar counted the steps
    assert info["interrupted"] is True
    assert len(result["images"]) < 16  # it stopped before the 16 batches were done


def test_a_drawn_mask_makes_an_inpainting_request(server, workspace):
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(layer).rectangle((8, 16, 31, 47), fill=(255, 255, 255, 255))
    editor = {"background": image, "layers": [layer], "composite": image}
    got_image, mask = page.editor_inputs(editor)
    assert mask.getbbox() == (8, 16, 32, 48)
    body = page.request_body("sks dog", "", "Euler", 2, 7, 64, 64, 5, 1, 1)
    assert page.add_image_inputs(body, editor, 0.6, 4, True) == "img2img"
    assert body["mask"] and body["inpaint_full_res"] is True and body["denoising_strength"] == 0.6
    r = api_of(server).call("POST", "img2img", body)
    out = page.b64_image(r["images"][0])
    assert out.size == (64, 64)
    assert out.getpixel((60, 2)) == (200, 30, 30)  # outside the mask the image is kept
    plain = {"background": image, "layers": [Image.new("RGBA", (64, 64))], "composite": image}
    body = page.request_body("sks dog", "", "Euler", 2, 7, 64, 64, 5, 1, 1)
    assert page.add_image_inputs(body, plain, 0.6, 4, False) == "img2img" and "mask" not in body
    assert page.add_image_inputs({}, None, 0.6, 4, False) == "txt2img"


def test_the_gallery_lists_outputs_and_reuses_their_settings(server, workspace):
    api = api_of(server)
    body = page.request_body("a photo of sks dog", "blurry", "DDIM", 3, 6.5, 64, 72, 1234,
                             1, 1)
    api.call("POST", "txt2img", body)
    body.update(prompt="second")
    api.call("POST", "txt2img", body)
    items = page.gallery_items(workspace / "outputs")
    assert len(items) == 2 and items[0][0].endswith(".png")
    text = page.png_parameters(items[-1][0])
    assert page.reuse_values(text) == ["a photo of sks dog", "blurry", "DDIM", 3, 6.5, 64, 72,
                                       1234]
    assert page.reuse_values(page.png_parameters(items[0][0]))[0] == "second"


def test_the_page_is_behind_the_apis_auth(server):
    ok = httpx.get(server.url + "/", auth=(USER, PASSWORD), timeout=60)
    assert ok.status_code == 200 and "gradio" in ok.text.lower()
    assert httpx.get(server.url + "/", timeout=60).status_code == 401
    assert httpx.get(server.url + "/config", auth=(USER, "nope"), timeout=60).status_code == 401


def test_the_controlnet_panel_and_hires_fix_make_a_request_the_server_takes(server, workspace,
                                                                            tiny_controlnet_sd1):
    """A drawing on the sketch pad becomes a white-on-black map; the panel's unit and the
    hires fix settings make a request the server runs (the ControlNet copied into the
    workspace after the server started is found)."""
    import shutil

    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    ImageDraw.Draw(layer).line((8, 8, 56, 40), fill=(0, 0, 0, 255), width=3)
    sketch = {"background": Image.new("RGB", (64, 64), "white"), "layers": [layer],
              "composite": None}
    drawn = page.control_image(None, sketch)
    assert drawn.mode == "RGB" and drawn.getpixel((8, 8)) == (255, 255, 255)
    assert drawn.getpixel((60, 4)) == (0, 0, 0), "black where nothing was drawn"
    assert page.control_image(None, {"layers": [Image.new("RGBA", (64, 64))]}) is None
    upload = Image.new("RGB", (64, 64), (9, 9, 9))
    assert page.control_image(upload, sketch).getpixel((8, 8)) == (9, 9, 9), "upload wins"
    assert page.controlnet_unit(False, "x", "none", upload, None, 1, 0, 1, "Balanced",
                                "Just Resize", 100, 200) is None

    shutil.copytree(tiny_controlnet_sd1, workspace / "models" / "controlnet" / "sd1-tiny-canny")
    unit = page.controlnet_unit(True, "sd1-tiny-canny", "none", None, sketch, 0.9, 0.0, 0.8,
                                "My prompt is more important", "Just Resize", 100, 200)
    body = page.request_body("sks dog", "", "Euler", 2, 7, 64, 64, 5, 1, 1)
    page.add_extras(body, unit, True, "Latent (bicubic)", 1.5, 2, 0.6, 0, 0, None, 0.8)
    r = api_of(server).call("POST", "txt2img", body)
    info = json.loads(r["info"])
    assert page.b64_image(r["images"][0]).size == (96, 96)
    text = info["infotexts"][0]
    assert "Control Mode: My prompt is more important" in text and "Weight: 0.9" in text
    assert "Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent (bicubic)" in text
    assert info["ignored_fields"] == []
    assert page.links_html(info["saved_files"]).startswith(
        '<a href="gradio_api/file=' + info["saved_files"][0])
