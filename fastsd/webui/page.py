"""The web page: Gradio, mounted on the same FastAPI app as the API, behind the same auth.

The page speaks to the server through its own AUTOMATIC1111-compatible API on the
loopback address, so the page, the API's clients and the notebook share one queue and
one engine, and the page has no second way to generate. It fits a phone screen: one
column that widens into two on a larger one.

Tabs: Generate (txt2img; img2img and inpainting with a mask drawn on the image; model
picker; sampler, steps, CFG, size, seed, batch; a ControlNet panel whose control image is
uploaded or drawn, with a preview of the preprocessed map; hires fix; the SDXL refiner;
progress with a live preview; interrupt), X/Y/Z plot, and Gallery (the session's outputs
with their parameters and "reuse these settings"). Images and grids are shown whole at a
phone's width; a tap opens one large, and a link opens the full-size file.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from fastsd.webui import xyz
from fastsd.webui.controlnet import CONTROL_MODES
from fastsd.webui.imaging import RESIZE_MODES
from fastsd.webui.params import LATENT_UPSCALERS, PIXEL_UPSCALERS

log = logging.getLogger("fastsd")
logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per progress poll

PAGE_PATH = "/"
GALLERY_LIMIT = 120
POLL = 0.5  # seconds between progress polls
CSS = """
.fastsd-progress {height: 14px; background: #e5e7eb; border-radius: 7px; overflow: hidden}
.fastsd-progress > div {height: 100%; background: #f97316; transition: width .3s}
.fastsd-links a {display: inline-block; margin: 2px 8px 2px 0}
@media (max-width: 640px) { .gradio-container {padding: 4px !important} }
"""
# Galleries show each picture whole (a wide X/Y/Z grid too), never cropped to a square.
WHOLE = {"object_fit": "contain", "height": "auto"}
HR_UPSCALERS = (*LATENT_UPSCALERS, *PIXEL_UPSCALERS)


# --------------------------------------------------------------------------- the API


class ApiError(Exception):
    """The server answered a page request with an error; the message is the server's."""


@dataclass
class Api:
    """The server's A1111-compatible API, seen from the page (over loopback)."""

    base: str
    auth: tuple[str, str] | None = None
    timeout: float = 3600.0

    def _client(self):
        import httpx

        return httpx.Client(base_url=self.base, auth=self.auth, timeout=self.timeout)

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        """``path`` under /sdapi/v1/, or from the root when it starts with "/"."""
        with self._client() as c:
            r = c.request(method, path if path.startswith("/") else "/sdapi/v1/" + path,
                          json=body)
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ApiError(f"{r.status_code}: {detail if isinstance(detail, str) else json.dumps(detail)}")
        return r.json() if r.content else None

    def models(self) -> list[str]:
        return [m["title"] for m in self.call("GET", "sd-models")]

    def current_model(self) -> str | None:
        return self.call("GET", "options").get("sd_model_checkpoint")

    def set_model(self, title: str) -> None:
        self.call("POST", "options", {"sd_model_checkpoint": title})

    def samplers(self) -> list[str]:
        return [s["name"] for s in self.call("GET", "samplers")]

    def progress(self) -> dict:
        return self.call("GET", "progress")

    def controlnets(self) -> list[str]:
        return self.call("GET", "/controlnet/model_list")["model_list"]

    def preprocessors(self) -> list[str]:
        """The preprocessors that run on the server (the others need model weights)."""
        detail = self.call("GET", "/controlnet/module_list")["module_detail"]
        return [name for name, d in detail.items() if d.get("model_free")]

    def detect(self, module: str, image, resolution: int, low: float, high: float):
        body = {"controlnet_module": module, "controlnet_input_images": [image_b64(image)],
                "controlnet_processor_res": int(resolution), "controlnet_threshold_a": low,
                "controlnet_threshold_b": high}
        return b64_image(self.call("POST", "/controlnet/detect", body)["images"][0])

    def interrupt(self) -> None:
        self.call("POST", "interrupt")


def b64_image(data: str):
    from PIL import Image

    if "," in data[:64]:
        data = data.split(",", 1)[1]
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def image_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# --------------------------------------------------------------------------- requests


def request_body(prompt: str, negative: str, sampler: str, steps: float, cfg: float,
                 width: float, height: float, seed: float, batch_size: float,
                 batch_count: float) -> dict:
    return {"prompt": prompt or "", "negative_prompt": negative or "",
            "sampler_name": sampler, "steps": int(steps), "cfg_scale": float(cfg),
            "width": int(width), "height": int(height),
            "seed": int(seed) if seed is not None else -1,
            "batch_size": int(batch_size), "n_iter": int(batch_count)}


def strokes(editor: Any):
    """Where anything was drawn on an image editor's layers (any opaque brush stroke):
    white on black ("L"), or None when nothing was drawn."""
    from PIL import ImageChops

    drawn = None
    for layer in (editor.get("layers") or []) if isinstance(editor, dict) else []:
        if layer is None:
            continue
        alpha = layer.convert("RGBA").getchannel("A").point(lambda a: 255 if a > 0 else 0)
        if alpha.getbbox():
            drawn = alpha if drawn is None else ImageChops.lighter(drawn, alpha.resize(
                drawn.size))
    return drawn


def editor_inputs(editor: Any) -> tuple[Any, Any]:
    """(image, mask) from the image editor's value; the mask is None when nothing was
    drawn. Drawn pixels become white in the mask."""
    if not editor:
        return None, None
    background = editor.get("background") if isinstance(editor, dict) else editor
    if background is None:
        return None, None
    image = background.convert("RGB")
    mask = strokes(editor)
    if mask is not None and mask.size != image.size:
        mask = mask.resize(image.size)
    return image, mask


def add_image_inputs(body: dict, editor: Any, denoise: float, mask_blur: float,
                     only_masked: bool) -> str:
    """Fill in img2img/inpainting fields from the editor; returns the API route."""
    image, mask = editor_inputs(editor)
    if image is None:
        return "txt2img"
    body.update(init_images=[image_b64(image)], denoising_strength=float(denoise))
    if mask is not None:
        body.update(mask=image_b64(mask.convert("RGB")), mask_blur=int(mask_blur),
                    inpaint_full_res=bool(only_masked), inpainting_fill=1)
    return "img2img"


def control_image(upload: Any, sketch: Any = None):
    """The ControlNet panel's control image: the uploaded picture, else what was drawn on
    the sketch pad as a map, every stroke white on black (as scribble and edge maps are),
    else None."""
    if upload is not None:
        return upload.convert("RGB")
    drawn = strokes(sketch)
    return None if drawn is None else drawn.convert("RGB")


def controlnet_unit(enabled: bool, model: str, module: str, upload: Any, sketch: Any,
                    weight: float, start: float, end: float, mode: str, resize: str,
                    low: float, high: float) -> dict | None:
    """The ControlNet extension's unit the panel asks for (None when it is off). The
    preprocessor works at the size of the image to make (pixel perfect)."""
    if not enabled:
        return None
    unit = {"enabled": True, "model": model or "", "module": module or "none",
            "weight": float(weight), "guidance_start": float(start),
            "guidance_end": float(end), "control_mode": mode or CONTROL_MODES[0],
            "resize_mode": resize or RESIZE_MODES[1], "threshold_a": float(low),
            "threshold_b": float(high), "pixel_perfect": True}
    image = control_image(upload, sketch)
    if image is not None:
        unit["image"] = image_b64(image)
    return unit


def add_extras(body: dict, unit: dict | None, hires: bool, upscaler: str, scale: float,
               hr_steps: float, hr_denoise: float, hr_x: float, hr_y: float,
               refiner: str | None, switch_at: float) -> None:
    """The ControlNet unit, hires fix and refiner fields of a request, as A1111 takes them."""
    if unit is not None:
        body["alwayson_scripts"] = {"controlnet": {"args": [unit]}}
    if hires:
        body.update(enable_hr=True, hr_upscaler=upscaler or HR_UPSCALERS[0],
                    hr_scale=float(scale), hr_second_pass_steps=int(hr_steps or 0),
                    denoising_strength=float(hr_denoise), hr_resize_x=int(hr_x or 0),
                    hr_resize_y=int(hr_y or 0))
    if refiner:
        body.update(refiner_checkpoint=refiner, refiner_switch_at=float(switch_at))


def links_html(paths: list[str], label: str = "Open the full image") -> str:
    """Links that open each saved image at full size (the page serves the outputs folder)."""
    import html
    from urllib.parse import quote

    return "".join(f'<a href="gradio_api/file={quote(p)}" target="_blank">'
                   f"{html.escape(label)}{f' {i + 1}' if len(paths) > 1 else ''}</a>"
                   for i, p in enumerate(paths))


def progress_html(fraction: float, text: str) -> str:
    import html

    pct = max(0.0, min(1.0, fraction)) * 100
    return (f'<div class="fastsd-progress"><div style="width:{pct:.0f}%"></div></div>'
            f"<div>{html.escape(text)}</div>")


def run_with_progress(api: Api, route: str, body: dict) -> Iterator[tuple]:
    """Send one request in a thread and yield (progress HTML, preview, result) while it
    runs; the last yield has the response (or raises ApiError)."""
    box: dict = {}

    def work() -> None:
        try:
            box["result"] = api.call("POST", route, body)
        except Exception as e:  # shown on the page as it is
            box["error"] = e

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    started = time.monotonic()
    while thread.is_alive():
        thread.join(POLL)
        try:
            p = api.progress()
        except Exception:  # a missed poll only delays the bar
            continue
        state = p.get("state") or {}
        step, steps = state.get("sampling_step", 0), state.get("sampling_steps", 0)
        text = (f"Step {step}/{steps}" if steps else "Waiting in the queue") + (
            f", about {p.get('eta_relative', 0):.0f}s left" if p.get("eta_relative") else "")
        preview = b64_image(p["current_image"]) if p.get("current_image") else None
        yield progress_html(p.get("progress", 0.0), text), preview, None
    if "error" in box:
        raise box["error"]
    yield progress_html(1.0, f"Done in {time.monotonic() - started:.1f}s"), None, box["result"]


# --------------------------------------------------------------------------- gallery


def gallery_items(outputs: Path, limit: int = GALLERY_LIMIT) -> list[tuple[str, str]]:
    """The session's newest images (grids included) as (path, caption), newest first."""
    if not outputs.is_dir():
        return []
    files = sorted((p for p in outputs.rglob("*.png") if not p.name.startswith(".")),
                   key=lambda p: p.stat().st_mtime, reverse=True)[:limit]
    return [(str(p), p.name) for p in files]


def png_parameters(path: str | Path) -> str:
    from PIL import Image

    with Image.open(path) as im:
        return im.info.get("parameters", "") if hasattr(im, "info") else ""


def reuse_values(text: str) -> list:
    """The Generate tab's prompt, negative prompt, sampler, steps, CFG, width, height and
    seed from an image's parameters text (None where it does not say)."""
    from fastsd.webui import infotext

    p = infotext.parse(text)
    size = str(p.get("Size", "")).split("x")
    w, h = (int(size[0]), int(size[1])) if len(size) == 2 and all(
        v.strip().isdigit() for v in size) else (None, None)

    def number(key: str, kind=float):
        try:
            return kind(p[key])
        except (KeyError, TypeError, ValueError):
            return None

    return [p.get("Prompt", ""), p.get("Negative prompt", ""), p.get("Sampler"),
            number("Steps", int), number("CFG scale"), w, h, number("Seed", int)]


# --------------------------------------------------------------------------- the page


def build(api: Api, outputs: Path, title: str = "fastsd"):
    """The Gradio Blocks of the page."""
    import gradio as gr

    def models_update(rescan: bool = False):
        try:
            if rescan:  # models copied into the session or workspace since the start
                api.call("POST", "refresh-checkpoints")
            choices, value = api.models(), api.current_model()
        except Exception as e:
            raise gr.Error(f"Could not list the models: {e}")
        return gr.update(choices=choices, value=value)

    def pick_model(title_: str):
        if not title_:
            return "No model chosen."
        try:
            api.set_model(title_)
        except ApiError as e:
            raise gr.Error(f"Could not load {title_}: {e}")
        return f"Loaded {title_}."

    def generate(prompt, negative, sampler, steps, cfg, width, height, seed, bsize, bcount,
                 editor, denoise, blur, only_masked, *extras):
        body = request_body(prompt, negative, sampler, steps, cfg, width, height, seed,
                            bsize, bcount)
        route = add_image_inputs(body, editor, denoise, blur, only_masked)
        add_extras(body, controlnet_unit(*extras[:12]), *extras[12:])
        try:
            for bar, preview, result in run_with_progress(api, route, body):
                if result is None:
                    yield bar, preview, gr.update(), gr.update(), gr.update()
                    continue
                images = [b64_image(i) for i in result.get("images", [])]
                info = json.loads(result.get("info") or "{}")
                text = "\n\n".join(info.get("infotexts", []))
                yield bar, None, images, text, links_html(info.get("saved_files", []))
        except ApiError as e:
            raise gr.Error(str(e))

    def preview_map(module, upload, sketch, low, high, width, height):
        image = control_image(upload, sketch)
        if image is None:
            raise gr.Error("Upload or draw a control image first.")
        try:
            return api.detect(module or "none", image, min(int(width), int(height)), low, high)
        except ApiError as e:
            raise gr.Error(str(e))

    def controlnet_lists():
        try:
            names, modules = api.controlnets(), api.preprocessors()
        except Exception as e:
            raise gr.Error(f"Could not list the ControlNets: {e}")
        return (gr.update(choices=names, value=names[0] if names else None),
                gr.update(choices=modules))

    def run_plot(prompt, negative, sampler, steps, cfg, width, height, seed, xt, xv, yt, yv,
                 zt, zv):
        body = request_body(prompt, negative, sampler, steps, cfg, width, height, seed, 1, 1)
        body.update(script_name=xyz.SCRIPT_NAME,
                    script_args=[xt, xv, yt or "Nothing", yv or "", zt or "Nothing", zv or "",
                                 "True", "False", "False", "False"])
        try:
            for bar, preview, result in run_with_progress(api, "txt2img", body):
                if result is None:
                    yield bar, preview, gr.update(), gr.update(), gr.update()
                    continue
                info = json.loads(result.get("info") or "{}")
                n = int(info.get("grids") or 0)
                grids = [b64_image(i) for i in result.get("images", [])[:n]]
                saved = info.get("saved_files", [])[:n]
                yield bar, None, grids, "\n".join(saved), links_html(saved, "Open the full grid")
        except ApiError as e:
            raise gr.Error(str(e))

    def interrupt():
        try:
            api.interrupt()
        except ApiError as e:
            raise gr.Error(str(e))
        return progress_html(0.0, "Interrupting…")

    def refresh_gallery():
        return gallery_items(outputs), None, ""

    def select(items, evt: gr.SelectData):
        try:
            path = items[evt.index][0]
            path = path if isinstance(path, str) else path.get("path")
        except (IndexError, TypeError, KeyError, AttributeError):
            return None, ""
        return path, png_parameters(path)

    select.__annotations__["evt"] = gr.SelectData  # gradio reads it to pass the event

    def reuse(text):
        if not text:
            raise gr.Error("Pick an image with parameters first.")
        out = [gr.update(value=v) if v not in (None, "") else gr.update()
               for v in reuse_values(text)]
        return [*out, gr.update(selected="generate")]

    with gr.Blocks(title=title) as page:
        gr.Markdown(f"## {title}")
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate"):
                with gr.Row(equal_height=False):
                    with gr.Column(min_width=300):
                        with gr.Row():
                            model = gr.Dropdown(label="Model", choices=[], allow_custom_value=True,
                                                elem_id="model", scale=4)
                            model_refresh = gr.Button("↻", elem_id="model-refresh", scale=1,
                                                      min_width=40)
                        model_status = gr.Markdown()
                        prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt")
                        negative = gr.Textbox(label="Negative prompt", lines=2,
                                              elem_id="negative")
                        with gr.Row():
                            sampler = gr.Dropdown(label="Sampler", choices=[], value=None,
                                                  allow_custom_value=True, elem_id="sampler")
                            steps = gr.Slider(1, 150, value=20, step=1, label="Steps",
                                              elem_id="steps")
                            cfg = gr.Slider(0, 30, value=7, step=0.5, label="CFG scale",
                                            elem_id="cfg")
                        with gr.Row():
                            width = gr.Slider(64, 2048, value=512, step=8, label="Width",
                                              elem_id="width")
                            height = gr.Slider(64, 2048, value=512, step=8, label="Height",
                                               elem_id="height")
                        with gr.Row():
                            seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)",
                                             elem_id="seed")
                            bsize = gr.Slider(1, 8, value=1, step=1, label="Batch size",
                                              elem_id="batch-size")
                            bcount = gr.Slider(1, 16, value=1, step=1, label="Batch count",
                                               elem_id="batch-count")
                        with gr.Accordion("Image to image / inpaint", open=False):
                            editor = gr.ImageEditor(label="Image (paint over it to inpaint)",
                                                    type="pil", layers=False,
                                                    elem_id="editor")
                            with gr.Row():
                                denoise = gr.Slider(0, 1, value=0.75, step=0.05,
                                                    label="Denoising strength")
                                blur = gr.Slider(0, 64, value=4, step=1, label="Mask blur")
                                only_masked = gr.Checkbox(label="Inpaint only the masked area")
                        with gr.Accordion("ControlNet", open=False, elem_id="controlnet"):
                            cn_enable = gr.Checkbox(label="Enable", elem_id="cn-enable")
                            with gr.Tabs():
                                with gr.Tab("Upload", id="cn-upload"):
                                    cn_image = gr.Image(label="Control image", type="pil",
                                                        sources=["upload", "clipboard"],
                                                        elem_id="cn-image")
                                with gr.Tab("Draw", id="cn-draw"):
                                    cn_sketch = gr.Sketchpad(
                                        label="Draw the control map (strokes become white "
                                        "lines on black)", type="pil", layers=False,
                                        canvas_size=(512, 512),
                                        brush=gr.Brush(colors=["#000000"],
                                                       default_color="#000000"),
                                        elem_id="cn-sketch")
                            with gr.Row():
                                cn_model = gr.Dropdown(label="ControlNet", choices=[],
                                                       allow_custom_value=True,
                                                       elem_id="cn-model")
                                cn_module = gr.Dropdown(label="Preprocessor",
                                                        choices=["none", "canny"],
                                                        value="canny", elem_id="cn-module")
                            with gr.Row():
                                cn_low = gr.Slider(1, 255, value=100, step=1,
                                                   label="Canny low threshold", elem_id="cn-low")
                                cn_high = gr.Slider(1, 255, value=200, step=1,
                                                    label="Canny high threshold",
                                                    elem_id="cn-high")
                            cn_preview = gr.Button("Preview the map", elem_id="cn-preview")
                            cn_map = gr.Image(label="Preprocessed map", interactive=False,
                                              elem_id="cn-map")
                            with gr.Row():
                                cn_weight = gr.Slider(0, 2, value=1, step=0.05, label="Weight",
                                                      elem_id="cn-weight")
                                cn_start = gr.Slider(0, 1, value=0, step=0.01,
                                                     label="Starting control step",
                                                     elem_id="cn-start")
                                cn_end = gr.Slider(0, 1, value=1, step=0.01,
                                                   label="Ending control step", elem_id="cn-end")
                            cn_mode = gr.Radio(list(CONTROL_MODES), value=CONTROL_MODES[0],
                                               label="Control mode", elem_id="cn-mode")
                            cn_resize = gr.Radio(list(RESIZE_MODES), value=RESIZE_MODES[1],
                                                 label="Resize mode", elem_id="cn-resize")
                        with gr.Accordion("Hires fix", open=False, elem_id="hires"):
                            hr_enable = gr.Checkbox(label="Enable (txt2img)", elem_id="hr-enable")
                            with gr.Row():
                                hr_upscaler = gr.Dropdown(list(HR_UPSCALERS),
                                                          value=HR_UPSCALERS[0],
                                                          label="Upscaler",
                                                          elem_id="hr-upscaler")
                                hr_scale = gr.Slider(1, 4, value=2, step=0.05, label="Upscale by",
                                                     elem_id="hr-scale")
                            with gr.Row():
                                hr_steps = gr.Slider(0, 150, value=0, step=1,
                                                     label="Hires steps (0: as many)",
                                                     elem_id="hr-steps")
                                hr_denoise = gr.Slider(0, 1, value=0.7, step=0.05,
                                                       label="Denoising strength",
                                                       elem_id="hr-denoise")
                            with gr.Row():
                                hr_x = gr.Slider(0, 2048, value=0, step=8,
                                                 label="Resize width to (0: by the scale)",
                                                 elem_id="hr-x")
                                hr_y = gr.Slider(0, 2048, value=0, step=8,
                                                 label="Resize height to", elem_id="hr-y")
                        with gr.Accordion("Refiner (SDXL)", open=False, elem_id="refiner"):
                            with gr.Row():
                                refiner = gr.Dropdown(label="Refiner checkpoint (empty: none)",
                                                      choices=[], value=None,
                                                      allow_custom_value=True,
                                                      elem_id="refiner-model")
                                switch_at = gr.Slider(0.01, 1, value=0.8, step=0.01,
                                                      label="Switch at", elem_id="refiner-switch")
                        with gr.Row():
                            go = gr.Button("Generate", variant="primary", elem_id="generate")
                            stop = gr.Button("Interrupt", variant="stop", elem_id="interrupt")
                    with gr.Column(min_width=300):
                        bar = gr.HTML(progress_html(0, "Idle"), elem_id="progress")
                        preview = gr.Image(label="Preview", interactive=False, height=256,
                                           elem_id="preview")
                        result = gr.Gallery(label="Images", columns=2, elem_id="result",
                                            **WHOLE)
                        result_links = gr.HTML(elem_id="result-links",
                                               elem_classes=["fastsd-links"])
                        info = gr.Textbox(label="Parameters", lines=4, elem_id="info")
            with gr.Tab("X/Y/Z plot", id="xyz"):
                gr.Markdown("Uses the prompt and settings of the Generate tab.")
                axis_names = [a for a in xyz.SUPPORTED]
                with gr.Row():
                    xt = gr.Dropdown(axis_names, value="Seed", label="X type", elem_id="x-type")
                    xv = gr.Textbox(label="X values", value="1, 2", elem_id="x-values")
                with gr.Row():
                    yt = gr.Dropdown(axis_names, value="Steps", label="Y type", elem_id="y-type")
                    yv = gr.Textbox(label="Y values", value="10, 20", elem_id="y-values")
                with gr.Row():
                    zt = gr.Dropdown(axis_names, value="Nothing", label="Z type",
                                     elem_id="z-type")
                    zv = gr.Textbox(label="Z values", elem_id="z-values")
                plot_go = gr.Button("Run the plot", variant="primary", elem_id="run-plot")
                plot_bar = gr.HTML(progress_html(0, "Idle"))
                plot_preview = gr.Image(label="Preview", interactive=False, height=192)
                plot_out = gr.Gallery(label="Grid", columns=1, elem_id="plot-result", **WHOLE)
                plot_links = gr.HTML(elem_id="plot-links", elem_classes=["fastsd-links"])
                plot_info = gr.Textbox(label="Saved as", elem_id="plot-info")
            with gr.Tab("Gallery", id="gallery"):
                gallery_refresh = gr.Button("Refresh", elem_id="gallery-refresh")
                gallery = gr.Gallery(label="Session outputs", columns=3, elem_id="gallery",
                                     allow_preview=True, **WHOLE)
                picked = gr.Image(label="Picked", interactive=False, visible=False)
                params = gr.Textbox(label="Parameters", lines=4, elem_id="gallery-params")
                reuse_btn = gr.Button("Reuse these settings", elem_id="reuse")

        settings = [prompt, negative, sampler, steps, cfg, width, height, seed]
        page.load(models_update, None, model)
        page.load(lambda: gr.update(choices=api.samplers(), value=api.samplers()[0]), None,
                  sampler)
        page.load(refresh_gallery, None, [gallery, picked, params])
        page.load(controlnet_lists, None, [cn_model, cn_module])
        page.load(lambda: gr.update(choices=["", *api.models()]), None, refiner)
        model_refresh.click(lambda: models_update(True), None, model)
        model.change(pick_model, model, model_status)
        cn_preview.click(preview_map, [cn_module, cn_image, cn_sketch, cn_low, cn_high, width,
                                       height], cn_map)
        extras = [cn_enable, cn_model, cn_module, cn_image, cn_sketch, cn_weight, cn_start,
                  cn_end,
                  cn_mode, cn_resize, cn_low, cn_high, hr_enable, hr_upscaler, hr_scale,
                  hr_steps, hr_denoise, hr_x, hr_y, refiner, switch_at]
        gen = go.click(generate, [*settings, bsize, bcount, editor, denoise, blur, only_masked,
                                  *extras], [bar, preview, result, info, result_links])
        gen.then(refresh_gallery, None, [gallery, picked, params])
        stop.click(interrupt, None, bar)
        plot = plot_go.click(run_plot, [*settings, xt, xv, yt, yv, zt, zv],
                             [plot_bar, plot_preview, plot_out, plot_info, plot_links])
        plot.then(refresh_gallery, None, [gallery, picked, params])
        gallery_refresh.click(refresh_gallery, None, [gallery, picked, params])
        gallery.select(select, gallery, [picked, params])
        reuse_btn.click(reuse, params, [prompt, negative, sampler, steps, cfg, width, height,
                                        seed, tabs])
    return page


def mount(app, api: Api, outputs: Path, path: str = PAGE_PATH, title: str = "fastsd"):
    """Mount the page on ``app`` (the API's FastAPI app) at ``path``. The app's own auth
    covers it, as it covers every route."""
    import gradio as gr

    page = build(api, outputs, title)
    page.queue(default_concurrency_limit=4)
    return gr.mount_gradio_app(app, page, path=path, ssr_mode=False, css=CSS,
                               allowed_paths=[str(outputs)], footer_links=[])
