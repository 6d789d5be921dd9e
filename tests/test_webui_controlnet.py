"""ControlNet, hires fix and the SDXL refiner through the A1111-compatible API, on a real
uvicorn server driven by webuiapi (its ControlNetUnit, enable_hr, the Refiner script) and
plain HTTP, on the tiny models and tiny ControlNets at 64x64. Each output is checked
against the diffusers pipelines called directly with the same seed.

One server (one worker) serves the module; the SDXL tests switch its model and back.
"""

from __future__ import annotations

import gc
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import requests
import webuiapi  # a dev requirement (setup.py): the API suite never skips for want of it
from PIL import Image

from fastsd.webui import controlnet, server as webserver
from webui_server import arr, b64png, one_thread  # noqa: F401 (a fixture)

SIZE = 64


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_sd1, tiny_sdxl, tiny_refiner, tiny_controlnet_sd1,
         tiny_controlnet_sdxl) -> Path:
    """A workspace whose models/ hold the tiny SD 1.x and SDXL, the tiny refiner, and the
    tiny ControlNets in models/controlnet/ (where the notebook's ControlNet cell puts them)."""
    root = tmp_path_factory.mktemp("cn-home")
    models = root / "models"
    for src in (tiny_sd1, tiny_sdxl, tiny_refiner):
        shutil.copytree(src, models / src.name)
    for src in (tiny_controlnet_sd1, tiny_controlnet_sdxl):
        shutil.copytree(src, models / "controlnet" / src.name)
    return root


@pytest.fixture(scope="module")
def server(home, one_thread):
    srv = webserver.serve(model="tiny-sd1", root=home, port=0)
    yield srv
    srv.stop()
    webserver.shutdown()


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", sampler="Euler a", steps=3)


def same(a, b) -> bool:
    return int(np.abs(arr(a) - arr(b)).max()) <= 1


def edges(seed: int = 0) -> Image.Image:
    """A ready-made control map: white strokes on black."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.integers(0, 2, (SIZE, SIZE)) * 255).astype(np.uint8)).convert("RGB")


def photo(seed: int = 0) -> Image.Image:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rng = np.random.default_rng(seed)
    img = np.stack([(x * 4) % 256, (y * 4) % 256, rng.integers(0, 255, (SIZE, SIZE))], -1)
    img[16:48, 20:44] = 255  # a white box: edges a canny map finds
    return Image.fromarray(img.astype(np.uint8))


def title_of(api, name: str) -> str:
    (found,) = [t for t in api.controlnet_model_list() if t.startswith(name + " [")]
    return found


def diffusers_pipe(kind, model: Path, net: Path | None = None):
    import diffusers

    extra = {"controlnet": diffusers.ControlNetModel.from_pretrained(str(net))} if net else {}
    pipe = getattr(diffusers, kind).from_pretrained(str(model), **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def euler_a(pipe):
    from diffusers import EulerAncestralDiscreteScheduler

    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


def gen(seed: int):
    import torch

    return torch.Generator("cpu").manual_seed(seed)


# --------------------------------------------------------------------------- SD 1.x


def test_controlnet_txt2img_equals_the_diffusers_controlnet_pipeline(api, tiny_sd1,
                                                                    tiny_controlnet_sd1):
    cn = title_of(api, "sd1-tiny-canny")
    unit = webuiapi.ControlNetUnit(image=edges(1), module="none", model=cn, weight=0.8,
                                   resize_mode="Just Resize", guidance_start=0.0,
                                   guidance_end=0.7)
    kw = dict(prompt="a photo of a cat", negative_prompt="blurry", width=SIZE, height=SIZE,
              seed=5, cfg_scale=6)
    r = api.txt2img(controlnet_units=[unit], **kw)
    # webuiapi keeps its units in a shared default dict; it clears them between calls once
    # it sees the extension in /scripts, as it does here
    assert api.has_controlnet
    plain = api.txt2img(**kw)
    assert r.image.size == (SIZE, SIZE) and r.info["ignored_fields"] == []
    assert not same(r.image, plain.image), "the ControlNet changes the image"

    pipe = euler_a(diffusers_pipe("StableDiffusionControlNetPipeline", tiny_sd1,
                                  tiny_controlnet_sd1))
    ref = pipe("a photo of a cat", image=edges(1), negative_prompt="blurry", width=SIZE,
               height=SIZE, num_inference_steps=3, guidance_scale=6, generator=gen(5),
               controlnet_conditioning_scale=0.8, control_guidance_start=0.0,
               control_guidance_end=0.7).images[0]
    assert same(r.image, ref), "the API's ControlNet image is diffusers' for the same seed"

    text = r.info["infotexts"][0]
    assert f'ControlNet 0: "Module: none, Model: {cn}, Weight: 0.8, Resize Mode: Just Resize,' \
        in text
    parsed = api.png_info(r.image).json["parameters"]
    assert parsed["ControlNet 0"].startswith("Module: none, Model: " + cn)
    assert "Guidance End: 0.7" in parsed["ControlNet 0"]


def test_controlnet_img2img_uses_the_init_image_when_a_unit_has_none(api):
    cn = title_of(api, "sd1-tiny-canny")
    kw = dict(images=[photo(2)], prompt="a cat", width=SIZE, height=SIZE, seed=3, steps=4,
              denoising_strength=0.75)
    plain = api.img2img(**kw)
    canny = dict(module="canny", model=cn, threshold_a=50, threshold_b=150, processor_res=SIZE)
    from_init = api.img2img(controlnet_units=[webuiapi.ControlNetUnit(**canny)], **kw)
    given = api.img2img(controlnet_units=[webuiapi.ControlNetUnit(image=photo(2), **canny)],
                        **kw)
    other = api.img2img(controlnet_units=[webuiapi.ControlNetUnit(
        image=photo(9).rotate(90), **canny)], **kw)
    assert not same(from_init.image, plain.image)
    assert np.array_equal(arr(from_init.image), arr(given.image)), \
        "a unit without an image takes the init image"
    assert not same(other.image, given.image), "the control image is used"
    assert "Module: canny" in from_init.info["infotexts"][0]
    assert "Threshold A: 50.0, Threshold B: 150.0" in from_init.info["infotexts"][0]


def test_two_units_and_the_control_modes(api, server):
    cn = title_of(api, "sd1-tiny-canny")
    kw = dict(prompt="a cat", width=SIZE, height=SIZE, seed=8, steps=2)

    def unit(img, mode=0, weight=1.0):
        return webuiapi.ControlNetUnit(image=img, module="none", model=cn, control_mode=mode,
                                       weight=weight, resize_mode="Just Resize")

    one = api.txt2img(controlnet_units=[unit(edges(1))], **kw)
    two = api.txt2img(controlnet_units=[unit(edges(1)), unit(edges(2))], **kw)
    off = api.txt2img(controlnet_units=[unit(edges(1)), unit(edges(2), weight=0.0)], **kw)
    prompt_first = api.txt2img(controlnet_units=[unit(edges(1), mode=1)], **kw)
    assert not same(two.image, one.image)
    assert np.abs(arr(off.image) - arr(one.image)).max() <= 2, "a unit of weight 0 adds nothing"
    assert not same(prompt_first.image, one.image)
    assert "ControlNet 1:" in two.info["infotexts"][0]
    assert "Control Mode: My prompt is more important" in prompt_first.info["infotexts"][0]


def test_control_modes_weigh_the_controlnet_outputs_as_the_extension_does(tiny_sd1,
                                                                          tiny_controlnet_sd1):
    """Balanced leaves the ControlNet's 13 outputs alone; "my prompt is more important"
    weighs output i by 0.825 ** (12 - i); "ControlNet is more important" also keeps the
    control out of the CFG batch's unconditional half."""
    import torch
    from diffusers import ControlNetModel

    net = ControlNetModel.from_pretrained(str(tiny_controlnet_sd1))
    args = dict(sample=torch.randn(2, 4, 8, 8), timestep=torch.tensor([500, 500]),
                encoder_hidden_states=torch.randn(2, 77, 32),
                controlnet_cond=torch.rand(2, 3, SIZE, SIZE), return_dict=False)
    with torch.no_grad():
        plain = net(**args)
        outs = {}
        for mode in (0, 1, 2):
            with controlnet.ControlModes([net], [mode], cfg=True):
                outs[mode] = net(**args)
    flat = [*plain[0], plain[1]]
    assert len(flat) == 13
    for got, want in zip([*outs[0][0], outs[0][1]], flat):
        assert torch.equal(got, want)
    for i, (got, want) in enumerate(zip([*outs[1][0], outs[1][1]], flat)):
        torch.testing.assert_close(got, want * 0.825 ** (12 - i))
    for got, want in zip([*outs[2][0], outs[2][1]], [*outs[1][0], outs[1][1]]):
        assert torch.count_nonzero(got[:1]) == 0 and torch.equal(got[1:], want[1:])
    with torch.no_grad():  # the hooks are gone after the pipeline call
        assert torch.equal(net(**args)[1], plain[1])


def test_the_extensions_routes(api, server):
    names = api.controlnet_model_list()
    assert any(n.startswith("sd1-tiny-canny [") for n in names)
    assert any(n.startswith("sdxl-tiny-canny [") for n in names)
    modules = requests.get(f"{server.url}/controlnet/module_list", timeout=30).json()
    assert {"none", "canny", "depth_midas", "openpose_full"} <= set(modules["module_list"])
    canny = modules["module_detail"]["canny"]
    assert canny["model_free"] is True and [s["value"] for s in canny["sliders"]] == [512, 100,
                                                                                        200]
    assert "MiDaS" in modules["module_detail"]["depth_midas"]["fastsd_needs"]
    assert requests.get(f"{server.url}/controlnet/version", timeout=30).json()["version"] == 3

    import cv2

    r = api.controlnet_detect([photo(4)], module="canny", processor_res=SIZE, threshold_a=60,
                              threshold_b=120)
    got = np.asarray(r.image.convert("L"))
    want = cv2.Canny(np.asarray(photo(4)), 60, 120)
    assert got.shape == (SIZE, SIZE) and np.array_equal(got, want)
    # at another resolution the image is scaled first (short side = processor_res)
    big = api.controlnet_detect([photo(4)], module="canny", processor_res=128)
    assert big.image.size == (128, 128)
    bad = requests.post(f"{server.url}/controlnet/detect", timeout=30, json={
        "controlnet_module": "depth_midas", "controlnet_input_images": [b64png(photo())]})
    assert bad.status_code == 422 and "MiDaS" in bad.json()["detail"]
    assert "module 'none'" in bad.json()["detail"]


def test_tiny_controlnets_are_listed_with_a_tiny_model_only(api, server, home):
    """The tiny test ControlNets are listed (model_list, which the page's picker shows) while
    a tiny test model is loaded, and left out beside a real model: the real architectures'
    UNets (SD 1.5/2.1: 320-1280 channels, SDXL: 320-1280) are not tiny."""
    from fastsd.models import tiny

    engine = server.app.state.worker.engine
    assert engine.tiny and tiny.is_tiny_model(home / "models" / "tiny-sd1")
    tiny_nets = {"sd1-tiny-canny", "sdxl-tiny-canny"}
    assert tiny_nets <= {c.name for c in engine.catalog.controlnets(tiny=True) if c.tiny}
    assert not tiny_nets & {c.name for c in engine.catalog.controlnets()}
    assert not tiny.is_tiny({"block_out_channels": [320, 640, 1280, 1280]})
    assert not tiny.is_tiny({"block_out_channels": [320, 640, 1280]})
    assert not tiny.is_tiny({}) and not tiny.is_tiny_model(home / "models")
    listed = api.controlnet_model_list()
    assert {t.split(" [")[0] for t in listed} >= tiny_nets


def test_every_registry_preprocessor_is_listed():
    """The notebook's ControlNets name their preprocessor; each is one of the module list's
    (run here, or listed with what it needs)."""
    from fastsd.models import registry

    for c in registry.controlnets():
        assert controlnet.module(c.preprocessor).name in controlnet.MODULES, c


GOOD_UNIT = {"model": "sd1-tiny-canny", "module": "none", "image": "IMG"}
BAD_UNITS = [
    ({"weight": 3}, "controlnet.args[0].weight is 3.0; it must be from 0.0 to 2.0"),
    ({"weight": "heavy"}, "controlnet.args[0].weight must be a float"),
    ({"model": "nowhere"}, "controlnet.args[0].model: Unknown ControlNet 'nowhere'"),
    ({"model": "None"}, "controlnet.args[0].model is empty"),
    ({"module": "blur"}, "controlnet.args[0].module is 'blur', not a preprocessor"),
    ({"module": "openpose_full"}, "controlnet.args[0].module 'openpose_full' needs"),
    ({"guidance_start": 0.8, "guidance_end": 0.2}, "controlnet.args[0].guidance_start (0.8) "
     "is after controlnet.args[0].guidance_end (0.2)"),
    ({"resize_mode": "Stretch"}, "controlnet.args[0].resize_mode is 'Stretch'"),
    ({"control_mode": 5}, "controlnet.args[0].control_mode is 5"),
    ({"hr_option": "Sometimes"}, "controlnet.args[0].hr_option is 'Sometimes'"),
    ({"image": "https://example.com/edges.png"}, "controlnet.args[0].image is a URL"),
    ({"image": "@@@"}, "controlnet.args[0].image is not valid base64"),
    ({"image": None}, "controlnet.args[0].image is missing: txt2img needs a control image"),
    ({"model": "sdxl-tiny-canny"}, "does not fit tiny-sd1"),
]


@pytest.mark.parametrize("change,message", BAD_UNITS)
def test_every_invalid_unit_is_a_422_naming_its_field(server, change, message):
    unit = {**GOOD_UNIT, **change}
    if unit["image"] == "IMG":
        unit["image"] = b64png(edges())
    body = {"prompt": "a cat", "width": SIZE, "height": SIZE, "steps": 2,
            "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    r = requests.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]


def test_units_that_are_off_or_not_objects(server):
    url = f"{server.url}/sdapi/v1/txt2img"
    base = {"prompt": "a cat", "width": SIZE, "height": SIZE, "steps": 2, "seed": 4}
    off = {**GOOD_UNIT, "image": b64png(edges()), "enabled": False}
    a = requests.post(url, timeout=120, json={**base, "alwayson_scripts": {
        "ControlNet": {"args": [off]}, "Some Script": {"args": [1]}}}).json()
    b = requests.post(url, timeout=120, json=base).json()
    assert a["images"] == b["images"], "a disabled unit does nothing"
    assert "alwayson_scripts.Some Script" in __import__("json").loads(a["info"])[
        "ignored_fields"]
    r = requests.post(url, timeout=60, json={**base, "alwayson_scripts": {
        "controlnet": {"args": ["canny"]}}})
    assert r.status_code == 422 and "controlnet.args[0] must be a JSON object" in r.text


def test_a_single_file_controlnet_and_switching_frees_the_previous_one(
        api, server, home, tiny_controlnet_sd1):
    """A ControlNet as one .safetensors file (as users download them) loads, configured
    from the loaded model; switching to it frees the one loaded before."""
    single = home / "models" / "ControlNet" / "my-canny.safetensors"
    single.parent.mkdir()
    shutil.copy(tiny_controlnet_sd1 / "diffusion_pytorch_model.safetensors", single)
    engine = server.app.state.worker.engine
    first, second = title_of(api, "sd1-tiny-canny"), title_of(api, "my-canny")
    kw = dict(prompt="a cat", width=SIZE, height=SIZE, seed=2, steps=2)
    a = api.txt2img(controlnet_units=[webuiapi.ControlNetUnit(image=edges(), model=first)],
                    **kw)
    assert list(engine._nets) == [first]
    old = weakref.ref(engine._nets[first])
    b = api.txt2img(controlnet_units=[webuiapi.ControlNetUnit(image=edges(), model=second)],
                    **kw)
    gc.collect()
    assert list(engine._nets) == [second] and old() is None, "the first one was freed"
    assert np.array_equal(arr(a.image), arr(b.image)), "the same weights from one file"
    shutil.rmtree(single.parent)


def test_in_process_generate_takes_controlnet_units(api, server, home):
    """The notebook's fastsd.webui.generate, on the server's own worker: units as dicts of
    the extension's fields, the image a PIL image."""
    kw = dict(width=SIZE, height=SIZE, seed=7, steps=2, show=False, save=False,
              model="tiny-sd1")
    plain = webserver.generate("a cat", root=home, **kw)
    with_cn = webserver.generate("a cat", root=home, controlnet=[
        {"model": "sd1-tiny-canny", "image": edges(4), "module": "none"}], **kw)
    assert server.app.state.worker is webserver._current["worker"]
    assert not same(plain[0], with_cn[0])
    assert "ControlNet 0: " in with_cn[0].info["parameters"]
    with pytest.raises(controlnet.InvalidRequest, match=r"controlnet.args\[0\].weight"):
        webserver.generate("a cat", root=home, controlnet=[
            {"model": "sd1-tiny-canny", "image": edges(4), "weight": 5}], **kw)


# --------------------------------------------------------------------------- hires fix


def test_hires_fix_equals_diffusers_txt2img_upscale_img2img(api, tiny_sd1):
    import torch

    r = api.txt2img(prompt="a cat", width=SIZE, height=SIZE, seed=6, steps=3, enable_hr=True,
                    hr_scale=1.5, hr_upscaler=webuiapi.HiResUpscaler.Latent,
                    hr_second_pass_steps=4, denoising_strength=0.5)
    assert r.image.size == (96, 96)
    text = r.info["infotexts"][0]
    assert "Size: 64x64," in text and "Denoising strength: 0.5" in text
    assert "Hires upscale: 1.5, Hires steps: 4, Hires upscaler: Latent" in text
    p = api.png_info(r.image).json["parameters"]
    assert (p["Hires upscale"], p["Hires steps"], p["Hires upscaler"],
            p["Denoising strength"]) == ("1.5", "4", "Latent", "0.5")

    base = euler_a(diffusers_pipe("StableDiffusionPipeline", tiny_sd1))
    lat = base("a cat", negative_prompt="", width=SIZE, height=SIZE, num_inference_steps=3,
               guidance_scale=7, generator=gen(6), output_type="latent").images
    lat = torch.nn.functional.interpolate(lat, size=(12, 12), mode="bilinear")
    from diffusers import AutoPipelineForImage2Image

    i2i = euler_a(AutoPipelineForImage2Image.from_pipe(base))
    ref = i2i("a cat", negative_prompt="", image=lat, strength=0.5, num_inference_steps=4,
              guidance_scale=7, generator=gen(6)).images[0]
    assert same(r.image, ref)


def test_hires_fix_to_a_size_with_a_plain_upscaler_and_a_controlnet(api):
    cn = title_of(api, "sd1-tiny-canny")
    kw = dict(prompt="a cat", width=SIZE, height=SIZE, seed=6, steps=2, enable_hr=True,
              hr_resize_x=128, hr_resize_y=96, hr_upscaler="Lanczos", denoising_strength=0.6)
    r = api.txt2img(**kw)
    assert r.image.size == (128, 96)
    assert "Hires resize: 128x96" in r.info["infotexts"][0]
    low_only = api.txt2img(controlnet_units=[webuiapi.ControlNetUnit(
        image=edges(3), model=cn, hr_option="Low res only")], **kw)
    both = api.txt2img(controlnet_units=[webuiapi.ControlNetUnit(image=edges(3), model=cn)],
                       **kw)
    assert both.image.size == (128, 96) and not same(both.image, r.image)
    assert not same(low_only.image, both.image), "hr_option keeps a unit out of a pass"


def test_bad_hires_values_get_422(server):
    url = f"{server.url}/sdapi/v1/txt2img"
    base = {"prompt": "a cat", "width": SIZE, "height": SIZE, "steps": 2, "enable_hr": True}
    for change, message in (
            ({"hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler is 'R-ESRGAN 4x+', which fastsd "
             "does not have"),
            ({"hr_scale": 9}, "hr_scale is 9.0; it must be from 1.0 to 4.0"),
            ({"denoising_strength": 0.01}, "leaves no step to run"),
            ({"width": 1024, "height": 1024, "hr_scale": 2.5}, "Hires fix would make 2560x2560")):
        r = requests.post(url, json={**base, **change}, timeout=60)
        assert r.status_code == 422 and message in r.json()["detail"], r.text


# --------------------------------------------------------------------------- SDXL


@pytest.fixture
def sdxl(api):
    first = api.util_get_current_model()
    api.set_options({"sd_model_checkpoint": "tiny-sdxl"})
    yield
    api.set_options({"sd_model_checkpoint": first})


def test_sdxl_controlnet_with_the_refiner_equals_diffusers(api, sdxl, tiny_sdxl, tiny_refiner,
                                                          tiny_controlnet_sdxl):
    cn = title_of(api, "sdxl-tiny-canny")
    unit = webuiapi.ControlNetUnit(image=edges(5), module="none", model=cn,
                                   resize_mode="Just Resize")
    refiner = {"Refiner": {"args": [True, "tiny-sdxl-refiner", 0.5]}}
    kw = dict(prompt="a cat", width=SIZE, height=SIZE, seed=1, steps=4, sampler_name="Euler",
              cfg_scale=5)
    r = api.txt2img(controlnet_units=[unit], alwayson_scripts=refiner, **kw)
    no_refiner = api.txt2img(controlnet_units=[unit], **kw)
    assert not same(r.image, no_refiner.image)
    text = r.info["infotexts"][0]
    assert "Refiner: tiny-sdxl-refiner [" in text and "Refiner switch at: 0.5" in text
    p = api.png_info(r.image).json["parameters"]
    assert p["Refiner switch at"] == "0.5" and p["Refiner"].startswith("tiny-sdxl-refiner [")
    # the top-level fields (A1111's API) do the same as the Refiner script
    top = requests.post(f"{api.baseurl}/txt2img", timeout=300, json={
        **kw, "refiner_checkpoint": "tiny-sdxl-refiner", "refiner_switch_at": 0.5,
        "alwayson_scripts": {"controlnet": {"args": [unit.to_dict()]}}}).json()
    assert top["images"][0] == r.json["images"][0]

    from diffusers import EulerDiscreteScheduler

    base = diffusers_pipe("StableDiffusionXLControlNetPipeline", tiny_sdxl,
                          tiny_controlnet_sdxl)
    ref_pipe = diffusers_pipe("StableDiffusionXLImg2ImgPipeline", tiny_refiner)
    for pipe in (base, ref_pipe):
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    lat = base("a cat", image=edges(5), negative_prompt="", width=SIZE, height=SIZE,
               num_inference_steps=4, guidance_scale=5, generator=gen(1), denoising_end=0.5,
               output_type="latent").images
    ref = ref_pipe("a cat", negative_prompt="", image=lat, num_inference_steps=4,
                   denoising_start=0.5, guidance_scale=5, generator=gen(1)).images[0]
    assert same(r.image, ref)


def test_refiner_and_sdxl_mismatches_are_refused(api, server):
    url = f"{server.url}/sdapi/v1/txt2img"
    base = {"prompt": "a cat", "width": SIZE, "height": SIZE, "steps": 2}
    r = requests.post(url, json={**base, "refiner_checkpoint": "tiny-sdxl-refiner"}, timeout=60)
    assert r.status_code == 422 and "refiner_checkpoint needs an SDXL model" in r.text
    r = requests.post(url, json={**base, "refiner_checkpoint": "tiny-sdxl-refiner",
                                 "refiner_switch_at": 1.5}, timeout=60)
    assert r.status_code == 422 and "refiner_switch_at is 1.5" in r.text
