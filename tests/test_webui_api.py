"""The A1111-compatible API on a real uvicorn server on localhost, driven by the real
AUTOMATIC1111 client (`webuiapi`) and by plain HTTP, on the tiny SD 1.x model at 64x64.

One server (and one worker) serves the whole module; the auth and bounded-queue servers
are apps on the same worker or a second small engine.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import webuiapi  # a dev requirement (setup.py): the API suite never skips for want of it
from PIL import Image

from fastsd import session as sessions
from fastsd.webui.api import create_app
from fastsd.webui.auth import BasicAuth
from fastsd.webui.catalog import Catalog
from fastsd.webui.engine import Engine
from fastsd.webui.server import Server, generate, serve, shutdown
from fastsd.webui.worker import Worker
from webui_server import arr, b64png, one_thread  # noqa: F401 (a fixture)

SIZE = 64


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_sd1, tiny_sd2, tiny_sdxl) -> Path:
    """A workspace with a session whose trained model is the tiny SD 1.x, and tiny SD 2.x
    and SDXL in the workspace's models/ to switch to."""
    root = tmp_path_factory.mktemp("webui-home")
    s = sessions.create("subject", root, base_model="tiny-sd1", resolution=64)
    shutil.copytree(tiny_sd1, s.models / "subject")  # as the trainer writes it
    shutil.copytree(tiny_sd2, root / "models" / "tiny-sd2")
    shutil.copytree(tiny_sdxl, root / "models" / "tiny-sdxl")
    return root


@pytest.fixture(scope="module")
def server(home, one_thread):
    srv = serve("subject", root=home, port=0)
    yield srv
    srv.stop()
    shutdown()


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", sampler="Euler", steps=3)


def url(server, path: str) -> str:
    return f"{server.url}/sdapi/v1/{path}"


def close(a, b) -> bool:
    """Equal up to float rounding (a batch of 2 and a batch of 1 round differently)."""
    return int(np.abs(arr(a) - arr(b)).max()) <= 3


def gradient(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))


# --------------------------------------------------------------------------- generation


def test_txt2img_batches_seeds_saved_files_and_infotext(api, server, home):
    r = api.txt2img(prompt="a photo of sks cat, sitting", negative_prompt="blurry",
                    width=SIZE, height=SIZE, seed=100, batch_size=2, n_iter=2)
    assert len(r.images) == 4 and all(im.size == (SIZE, SIZE) for im in r.images)
    assert r.info["all_seeds"] == [100, 101, 102, 103] and r.info["seed"] == 100
    assert r.info["sd_model_name"] == "subject", "the session's trained model by default"
    assert r.info["ignored_fields"] == []
    saved = [Path(p) for p in r.info["saved_files"]]
    assert len(set(saved)) == 4
    outputs = home / "sessions" / "subject" / "outputs"
    for path, b64, text in zip(saved, r.json["images"], r.info["infotexts"]):
        assert path.is_relative_to(outputs) and path.read_bytes() == base64.b64decode(b64)
        assert Image.open(path).info["parameters"] == text
    assert "Negative prompt: blurry" in r.info["infotexts"][1]
    assert "Seed: 101," in r.info["infotexts"][1]
    # each reported seed makes its image again on its own
    again = api.txt2img(prompt="a photo of sks cat, sitting", negative_prompt="blurry",
                        width=SIZE, height=SIZE, seed=103)
    assert close(again.image, r.images[3]) and not close(again.image, r.images[2])
    assert not close(r.images[0], r.images[1])


def test_random_seed_is_reported_and_reproduces(api):
    r = api.txt2img(prompt="a dog", width=SIZE, height=SIZE, seed=-1)
    seed = r.info["seed"]
    assert isinstance(seed, int) and seed >= 0
    again = api.txt2img(prompt="a dog", width=SIZE, height=SIZE, seed=seed)
    assert np.array_equal(arr(again.image), arr(r.image))


def test_img2img_uses_the_init_image_and_strength(api):
    kw = dict(prompt="a cat", width=SIZE, height=SIZE, seed=7, steps=4)
    a = api.img2img(images=[gradient(1)], denoising_strength=0.6, **kw)
    b = api.img2img(images=[gradient(2)], denoising_strength=0.6, **kw)
    c = api.img2img(images=[gradient(1)], denoising_strength=0.3, **kw)
    assert a.image.size == (SIZE, SIZE)
    assert not np.array_equal(arr(a.image), arr(b.image)), "the init image is used"
    assert not np.array_equal(arr(a.image), arr(c.image)), "the strength is used"
    assert "Denoising strength: 0.6" in a.info["infotexts"][0]


@pytest.mark.parametrize("only_masked", [False, True])
def test_inpainting_repaints_the_mask_only(api, only_masked):
    init = gradient(3)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (24, 24, 48, 48))
    r = api.img2img(images=[init], mask_image=mask, mask_blur=2, inpainting_fill=1,
                    inpaint_full_res=only_masked, inpaint_full_res_padding=4,
                    denoising_strength=1.0, prompt="a cat", width=SIZE, height=SIZE, seed=3)
    out, orig = arr(r.image), arr(init)
    far = np.ones((SIZE, SIZE), bool)
    far[16:56, 16:56] = False  # beyond the blurred edge
    assert np.array_equal(out[far], orig[far]), "unmasked pixels stay as they were"
    assert (out[28:44, 28:44] != orig[28:44, 28:44]).mean() > 0.5, "the masked area changed"
    assert "Mask blur: 2" in r.info["infotexts"][0]
    assert ("Inpaint area: Only masked" in r.info["infotexts"][0]) == only_masked
    # inverted: the area outside the mask is repainted, the inside kept
    inv = api.img2img(images=[init], mask_image=mask, mask_blur=0, inpainting_mask_invert=1,
                      inpaint_full_res=False, denoising_strength=1.0, prompt="a cat",
                      width=SIZE, height=SIZE, seed=3)
    out = arr(inv.image)
    assert np.array_equal(out[24:48, 24:48], orig[24:48, 24:48])
    assert (out[far] != orig[far]).mean() > 0.5


@pytest.mark.parametrize("name", ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras",
                                  "DPM++ SDE Karras", "DDIM", "UniPC", "LMS", "Heun"])
def test_every_required_sampler_generates(api, name):
    r = api.txt2img(prompt="a cat", width=SIZE, height=SIZE, seed=11, steps=3,
                    sampler_name=name)
    sampler, _, schedule = name.partition(" Karras")
    assert r.info["sampler_name"] == sampler.strip()
    assert f"Sampler: {sampler.strip()}," in r.info["infotexts"][0]
    if name.endswith("Karras"):
        assert "Schedule type: Karras" in r.info["infotexts"][0]


def test_samplers_change_the_image(api):
    imgs = [arr(api.txt2img(prompt="a cat", width=SIZE, height=SIZE, seed=11, steps=3,
                            sampler_name=n).image) for n in ("Euler", "DDIM", "DPM++ 2M")]
    assert not np.array_equal(imgs[0], imgs[1]) and not np.array_equal(imgs[0], imgs[2])


def test_lists_samplers_schedulers_models_loras_flags_memory(api, server):
    names = api.util_get_sampler_names()
    for n in ("Euler", "Euler a", "DPM++ 2M", "DPM++ SDE", "DDIM", "UniPC", "LMS", "Heun"):
        assert n in names
    assert "Karras" in [s["label"] for s in api.get_schedulers()]
    titles = api.util_get_model_names()
    assert any(t.startswith("subject [") for t in titles)
    assert any(t.startswith("tiny-sd2 [") for t in titles)
    flags = api.get_cmd_flags()
    assert flags["api"] is True and flags["api_auth"] is False and flags["session"] == "subject"
    mem = api.get_memory()
    assert mem["ram"]["total"] > 0 and "cuda" in mem
    assert api.get_loras() == []
    assert requests.post(url(server, "refresh-checkpoints"), timeout=30).status_code == 200


def test_unknown_fields_are_accepted_and_listed_as_ignored(server):
    body = {"prompt": "a cat", "width": SIZE, "height": SIZE, "steps": 2, "seed": 1,
            "tiling": True, "my_plugin_field": {"x": 1}, "restore_faces": False}
    r = requests.post(url(server, "txt2img"), json=body, timeout=120)
    assert r.status_code == 200
    info = json.loads(r.json()["info"])
    assert info["ignored_fields"] == ["my_plugin_field", "tiling"]
    assert r.json()["parameters"]["my_plugin_field"] == {"x": 1}


def test_png_info_reads_back_prompt_and_settings(api):
    r = api.txt2img(prompt='sks cat, "quoted": yes', negative_prompt="ugly, blurry",
                    width=SIZE, height=SIZE, seed=42, steps=2, sampler_name="DPM++ 2M Karras")
    got = api.png_info(r.image).json
    assert got["info"] == r.info["infotexts"][0]
    p = got["parameters"]
    assert p["Prompt"] == 'sks cat, "quoted": yes' and p["Negative prompt"] == "ugly, blurry"
    assert (p["Seed"], p["Steps"], p["Sampler"], p["Schedule type"], p["Size"]) == (
        "42", "2", "DPM++ 2M", "Karras", "64x64")
    assert p["Model"] == "subject"
    plain = api.png_info(gradient()).json
    assert plain["info"] == "" and plain["parameters"] == {}


# --------------------------------------------------------------------------- progress


def _until(cond, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def _in_background(fn):
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn()), daemon=True)
    t.start()
    return t, out


def test_progress_and_interrupt(api):
    t, out = _in_background(lambda: api.txt2img(prompt="a cat", width=SIZE, height=SIZE,
                                                seed=5, steps=150, n_iter=3))
    p = _until(lambda: (lambda q: q if q["state"]["sampling_step"] >= 2 else None)(
        api.get_progress()))
    assert 0 < p["progress"] < 1 and p["eta_relative"] > 0
    assert p["state"]["sampling_steps"] == 150 and p["state"]["job"] == "txt2img"
    preview = Image.open(io.BytesIO(base64.b64decode(p["current_image"])))
    assert preview.size[0] > 0
    assert api.interrupt() == {}
    t.join(120)
    r = out["r"]
    assert r.info["interrupted"] is True
    assert len(r.images) == 1, "the batches after the interrupt did not run"
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def test_skip_ends_the_current_batch_only(api):
    kw = dict(prompt="a cat", width=SIZE, height=SIZE, seed=9, steps=60)
    full = api.txt2img(**kw)
    t, out = _in_background(lambda: api.txt2img(n_iter=2, **kw))
    _until(lambda: api.get_progress()["state"]["sampling_step"] >= 2)
    api.skip()
    t.join(120)
    r = out["r"]
    assert len(r.images) == 2 and r.info["interrupted"] is False
    assert not np.array_equal(arr(r.images[0]), arr(full.image)), "batch 1 was cut short"
    assert r.info["all_seeds"] == [9, 10]


# --------------------------------------------------------------------------- models


def test_options_switch_models_and_refuse_unknown_names(api, server):
    first = api.util_get_current_model()
    assert first.startswith("subject [")
    api.util_set_model("tiny-sd2")
    assert api.util_get_current_model().startswith("tiny-sd2 [")
    r = api.txt2img(prompt="a cat", width=SIZE, height=SIZE, seed=1, steps=2)
    assert r.info["sd_model_name"] == "tiny-sd2"
    for bad in ("../../../etc/passwd", "/etc/passwd", "nope"):
        res = requests.post(url(server, "options"), json={"sd_model_checkpoint": bad},
                            timeout=30)
        assert res.status_code == 422 and "Unknown checkpoint" in res.json()["detail"]
    assert api.util_get_current_model().startswith("tiny-sd2 [")
    api.set_options({"sd_model_checkpoint": first})
    assert api.util_get_current_model() == first


def test_sdxl_txt2img_img2img_and_inpainting(api, server):
    first = api.util_get_current_model()
    try:
        api.util_set_model("tiny-sdxl")
        assert api.util_get_current_model().startswith("tiny-sdxl [")
        kw = dict(prompt="a cat", width=SIZE, height=SIZE, seed=2, steps=2)
        t = api.txt2img(**kw)
        assert t.image.size == (SIZE, SIZE) and t.info["sd_model_name"] == "tiny-sdxl"
        i = api.img2img(images=[gradient(5)], denoising_strength=0.5, **kw)
        assert not np.array_equal(arr(i.image), arr(t.image))
        mask = Image.new("L", (SIZE, SIZE), 0)
        mask.paste(255, (0, 0, 32, SIZE))
        m = api.img2img(images=[gradient(5)], mask_image=mask, mask_blur=0,
                        inpaint_full_res=False, denoising_strength=1.0, **kw)
        assert np.array_equal(arr(m.image)[:, 40:], arr(gradient(5))[:, 40:])
    finally:
        api.set_options({"sd_model_checkpoint": first})


def test_memory_options_reload_the_model_with_them(api, server):
    engine = server.app.state.worker.engine
    try:
        r = requests.post(url(server, "options"), json={"fastsd_attention_slicing": True,
                                                        "fastsd_vae_tiling": True}, timeout=120)
        assert r.status_code == 200, r.text
        got = api.get_options()
        assert got["fastsd_attention_slicing"] is True and got["fastsd_vae_tiling"] is True
        procs = {type(p).__name__ for p in engine.pipeline().unet.attn_processors.values()}
        assert procs == {"SlicedAttnProcessor"} and engine.pipeline().vae.use_tiling
        assert len(api.txt2img(prompt="x", width=SIZE, height=SIZE, steps=2).images) == 1
        bad = requests.post(url(server, "options"), json={"fastsd_cpu_offload": "yes"},
                            timeout=30)
        assert bad.status_code == 422 and "true, false or null" in bad.json()["detail"]
    finally:
        requests.post(url(server, "options"), json={"fastsd_attention_slicing": None,
                                                    "fastsd_vae_tiling": None}, timeout=120)
    assert api.get_options()["fastsd_attention_slicing"] is False  # automatic, on CPU: off


def test_old_model_leaves_memory_on_switch(server):
    import gc
    import weakref

    engine = server.app.state.worker.engine
    before = weakref.ref(engine.pipeline().unet)
    title = engine.checkpoint.title
    other = next(c.title for c in engine.catalog.checkpoints() if c.title != title)
    for name in (other, title):
        assert requests.post(url(server, "options"), json={"sd_model_checkpoint": name},
                             timeout=120).status_code == 200
    gc.collect()
    assert before() is None, "nothing holds the unloaded pipeline"


def test_a_broken_model_fails_clearly_and_the_old_one_stays(api, server, home, tiny_sd1):
    broken = home / "models" / "broken"
    shutil.copytree(tiny_sd1, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    try:
        api.refresh_checkpoints()
        before = api.util_get_current_model()
        res = requests.post(url(server, "options"), json={"sd_model_checkpoint": "broken"},
                            timeout=120)
        assert res.status_code == 422 and "Could not load broken" in res.json()["detail"]
        assert api.util_get_current_model() == before
        assert len(api.txt2img(prompt="x", width=SIZE, height=SIZE, steps=2).images) == 1
    finally:
        shutil.rmtree(broken)
        api.refresh_checkpoints()


def test_single_file_model_is_converted_once_and_loads(api, server, home, tiny_sd2):
    from conftest import cache_family_configs

    from fastsd.convert import to_single_file

    cache_family_configs(home, "sd2", tiny_sd2)  # as a first online run fetched them
    to_single_file(tiny_sd2, home / "models" / "single.safetensors", fp16=False)
    api.refresh_checkpoints()
    first = api.util_get_current_model()
    try:
        r = requests.post(url(server, "options"), timeout=300,
                          json={"sd_model_checkpoint": "single.safetensors"})
        assert r.status_code == 200, r.text
        assert api.util_get_current_model().startswith("single.safetensors [")
        r = api.txt2img(prompt="a cat", width=SIZE, height=SIZE, seed=1, steps=2)
        assert r.info["sd_model_name"] == "single"
        assert list((home / "models" / "converted").glob("single-*/model_index.json"))
    finally:
        api.set_options({"sd_model_checkpoint": first})


def test_lora_by_weight(api, server, home, tiny_sd1):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd1))
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora_dir = home / "sessions" / "subject" / "models" / "Lora"
    StableDiffusionPipeline.save_lora_weights(
        lora_dir, unet_lora_layers=convert_state_dict_to_diffusers(
            get_peft_model_state_dict(pipe.unet)), weight_name="style.safetensors")
    assert requests.post(url(server, "refresh-loras"), timeout=30).status_code == 200
    assert [lo["name"] for lo in api.get_loras()] == ["style"]
    kw = dict(width=SIZE, height=SIZE, seed=21, steps=3)
    plain = arr(api.txt2img(prompt="a cat", **kw).image)
    full = api.txt2img(prompt="a cat <lora:style:1>", **kw)
    half = arr(api.txt2img(prompt="a cat <lora:style:0.5>", **kw).image)
    off = arr(api.txt2img(prompt="a cat <lora:style:0>", **kw).image)
    assert not np.array_equal(arr(full.image), plain)
    assert not np.array_equal(half, arr(full.image)) and not np.array_equal(half, plain)
    assert np.abs(off - plain).max() <= 1, "weight 0 is the model alone"
    assert "<lora:style:1>" in full.info["infotexts"][0]
    missing = api.txt2img(prompt="a cat <lora:nowhere:1>", **kw)
    assert any("nowhere" in w for w in missing.info["warnings"])
    assert np.array_equal(arr(missing.image), plain)


# --------------------------------------------------------------------------- validation

GOOD = {"prompt": "a cat", "width": SIZE, "height": SIZE, "steps": 2, "seed": 1}
CASES = [
    ("txt2img", {"width": 65}, "width is 65; it must be a multiple of 8 from 64 to 2048"),
    ("txt2img", {"height": 2056}, "height is 2056; it must be a multiple of 8"),
    ("txt2img", {"width": 56}, "width is 56"),
    ("txt2img", {"steps": 0}, "steps is 0; it must be from 1 to 150"),
    ("txt2img", {"steps": 151}, "steps is 151; it must be from 1 to 150"),
    ("txt2img", {"batch_size": 9}, "batch_size is 9; it must be from 1 to 8"),
    ("txt2img", {"n_iter": 0}, "n_iter is 0; it must be from 1 to 16"),
    ("txt2img", {"sampler_name": "Euler b"}, "Unknown sampler 'Euler b'"),
    ("txt2img", {"scheduler": "zigzag"}, "Unknown scheduler 'zigzag'"),
    ("txt2img", {"cfg_scale": "lots"}, "cfg_scale must be a float, not 'lots'"),
    ("txt2img", {"cfg_scale": 31}, "cfg_scale is 31.0; it must be from 0.0 to 30.0"),
    ("txt2img", {"steps": "ten"}, "steps must be an integer, not 'ten'"),
    ("txt2img", {"seed": -7}, "seed is -7; use -1 for a random seed"),
    ("txt2img", {"prompt": 5}, "prompt must be a string"),
    ("img2img", {}, "init_images must be a list of at least one base64 image"),
    ("img2img", {"init_images": ["@@not base64@@"]}, "init_images[0] is not valid base64"),
    ("img2img", {"init_images": [base64.b64encode(b"hello world").decode()]},
     "init_images[0] is base64 but not an image"),
    ("img2img", {"init_images": ["http://169.254.169.254/latest/meta-data"]},
     "never fetches a URL"),
    ("img2img", {"init_images": ["IMG"], "mask": "file:///etc/passwd"}, "mask is a URL"),
    ("img2img", {"init_images": ["IMG"], "denoising_strength": 1.5},
     "denoising_strength is 1.5; it must be from 0.0 to 1.0"),
    ("img2img", {"init_images": ["IMG"], "denoising_strength": 0.01},
     "leaves no step to run"),
    ("img2img", {"init_images": ["IMG"] * 9}, "init_images holds 9 images; the limit is 8"),
]


@pytest.mark.parametrize("endpoint,change,message", CASES)
def test_bad_values_get_422_with_a_message(server, endpoint, change, message):
    img = b64png(gradient())
    body = {**GOOD, **{k: ([img if x == "IMG" else x for x in v] if isinstance(v, list) else v)
                       for k, v in change.items()}}
    r = requests.post(url(server, endpoint), json=body, timeout=60)
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]


@pytest.mark.parametrize("raw,message", [
    (b'{"prompt": "a cat", "width": 64', "not valid JSON"),
    (b"\xff\xfe garbage", "not valid JSON"),
    (b'["a", "list"]', "must be a JSON object"),
])
def test_malformed_bodies_get_422_and_the_server_keeps_serving(server, raw, message):
    for endpoint in ("txt2img", "img2img", "png-info", "options"):
        r = requests.post(url(server, endpoint), data=raw, timeout=30,
                          headers={"content-type": "application/json"})
        assert r.status_code == 422, (endpoint, r.text)
        if endpoint in ("txt2img", "img2img") or message != "must be a JSON object":
            assert message in r.json()["detail"] or "JSON object" in r.json()["detail"]
    ok = requests.post(url(server, "txt2img"), json=GOOD, timeout=120)
    assert ok.status_code == 200 and len(ok.json()["images"]) == 1


def test_png_info_refuses_bad_images(server):
    r = requests.post(url(server, "png-info"), json={"image": "%%%"}, timeout=30)
    assert r.status_code == 422 and "not valid base64" in r.json()["detail"]
    r = requests.post(url(server, "png-info"), json={"image": "https://example.com/a.png"},
                      timeout=30)
    assert r.status_code == 422 and "never fetches a URL" in r.json()["detail"]


def test_no_route_serves_files(server):
    for path in ("../../etc/passwd", "file=/etc/passwd", "outputs/../../session.json"):
        r = requests.get(f"{server.url}/{path}", timeout=30)
        assert r.status_code == 404


# --------------------------------------------------------------------------- queue


def test_full_queue_gets_503_and_nothing_else_breaks(server, tiny_sd1):
    engine = Engine(Catalog([tiny_sd1.parent]))
    engine.load("tiny-sd1")
    worker = Worker(engine, max_queue=1)
    small = Server(create_app(worker), "127.0.0.1", 0).start()
    try:
        def post(steps):
            return requests.post(f"{small.url}/sdapi/v1/txt2img", timeout=300,
                                 json={**GOOD, "steps": steps})
        t1, o1 = _in_background(lambda: post(150))
        _until(lambda: worker.progress(False)["state"]["sampling_step"] >= 1)
        t2, o2 = _in_background(lambda: post(2))
        _until(lambda: worker.waiting == 1)
        r3 = post(2)
        assert r3.status_code == 503 and "busy" in r3.json()["detail"]
        worker.interrupt()
        t1.join(120)
        t2.join(120)
        assert o1["r"].status_code == 200 and o2["r"].status_code == 200
        assert post(2).status_code == 200
    finally:
        small.stop()
        worker.stop()


def test_load_32_concurrent_txt2img(server, home, record_property, capsys):
    outputs = home / "sessions" / "subject" / "outputs"
    before = set(outputs.rglob("*.png"))

    def one(i: int):
        start = time.perf_counter()
        r = requests.post(url(server, "txt2img"), timeout=600,
                          json={**GOOD, "seed": 1000 + i, "steps": 2})
        return r, time.perf_counter() - start

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert all(r.status_code == 200 for r, _ in results), [r.text for r, _ in results
                                                           if r.status_code != 200]
    saved = [json.loads(r.json()["info"])["saved_files"][0] for r, _ in results]
    seeds = [json.loads(r.json()["info"])["seed"] for r, _ in results]
    assert sorted(seeds) == list(range(1000, 1032)), "every request answered with its own seed"
    assert len(set(saved)) == 32 and set(map(Path, saved)) == set(outputs.rglob("*.png")) - before
    for (r, _), path in zip(results, saved):
        assert Path(path).read_bytes() == base64.b64decode(r.json()["images"][0])
    lat = sorted(t for _, t in results)
    p50, p95 = statistics.median(lat), lat[int(0.95 * (len(lat) - 1))]
    record_property("p50_s", round(p50, 3))
    record_property("p95_s", round(p95, 3))
    with capsys.disabled():
        print(f"\n32 concurrent txt2img (2 steps, 64x64): p50 {p50:.2f}s, p95 {p95:.2f}s")


# --------------------------------------------------------------------------- auth


def test_auth_on_every_route(server):
    auth = BasicAuth("artist", "s3cret-pw")
    from starlette.responses import PlainTextResponse

    app = create_app(server.app.state.worker, auth=auth)
    # a page mounted later on the same app (as the web page is) is behind the same auth
    app.mount("/page", PlainTextResponse("the page"))
    guarded = Server(app, "127.0.0.1", 0).start()
    try:
        base = f"{guarded.url}/sdapi/v1"
        for method, path in (("get", "options"), ("get", "progress"), ("post", "txt2img"),
                             ("get", "sd-models"), ("post", "interrupt"), ("get", "/docs"),
                             ("get", "/page")):
            r = requests.request(method, f"{base}/{path}" if path[0] != "/" else
                                 guarded.url + path, json=GOOD, timeout=30)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"].startswith("Basic")
        r = requests.get(f"{base}/options", auth=("artist", "wrong"), timeout=30)
        assert r.status_code == 401
        client = webuiapi.WebUIApi(baseurl=base, username="artist", password="s3cret-pw",
                                   sampler="Euler", steps=2)
        assert len(client.txt2img(prompt="x", width=SIZE, height=SIZE).images) == 1
        page = requests.get(f"{guarded.url}/page", auth=("artist", "s3cret-pw"), timeout=30)
        assert page.status_code == 200 and page.text == "the page"
        # repeated failures from one address are answered more and more slowly
        hdr = {"X-Forwarded-For": "203.0.113.9"}
        for _ in range(3):
            requests.get(f"{base}/options", auth=("artist", "guess"), headers=hdr, timeout=30)
        start = time.perf_counter()
        r = requests.get(f"{base}/options", auth=("artist", "guess"), headers=hdr, timeout=30)
        assert r.status_code == 401 and time.perf_counter() - start >= 0.45
        assert auth.failures("203.0.113.9") == 4
        assert requests.get(f"{base}/options", auth=("artist", "s3cret-pw"), headers=hdr,
                            timeout=30).status_code == 200
        assert auth.failures("203.0.113.9") == 0
    finally:
        guarded.stop()


def test_auth_off_on_localhost_and_on_with_a_tunnel(server, home):
    assert requests.get(url(server, "options"), timeout=30).status_code == 200
    tunnelled = serve("subject", root=home, port=0, tunnel=True)
    try:
        assert tunnelled.auth is not None and len(tunnelled.auth.password) >= 12
        r = requests.get(f"{tunnelled.url}/sdapi/v1/options", timeout=30)
        assert r.status_code == 401
        r = requests.get(f"{tunnelled.url}/sdapi/v1/options", timeout=30,
                         auth=("fastsd", tunnelled.auth.password))
        assert r.status_code == 200
    finally:
        tunnelled.stop()


# --------------------------------------------------------------------------- notebook


def test_generate_in_process_shares_the_worker(server, home):
    worker = server.app.state.worker
    done = worker.jobs_done
    images = generate("a photo of sks cat", "subject", root=home, steps=2, seed=4,
                      batch_size=2, show=False)
    assert len(images) == 2 and images[0].size == (SIZE, SIZE)
    assert "Seed: 4," in images[0].info["parameters"]
    assert worker.jobs_done == done + 1 and server.app.state.worker is worker
    r = requests.post(url(server, "txt2img"), timeout=60,
                      json={"prompt": "a photo of sks cat", "steps": 2, "seed": 4,
                            "width": SIZE, "height": SIZE})
    from_api = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert close(from_api, images[0]) and not close(from_api, images[1])


def test_an_inpainting_model_serves_every_mode(api, server, home, tiny_sd1):
    """A 9-channel inpainting UNet (as in SD 1.5 inpainting) does txt2img, img2img and
    inpainting through its own pipeline."""
    from diffusers import UNet2DConditionModel

    folder = home / "models" / "tiny-inpaint"
    shutil.copytree(tiny_sd1, folder)
    config = dict(UNet2DConditionModel.load_config(folder / "unet"), in_channels=9)
    UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    api.refresh_checkpoints()
    first = api.util_get_current_model()
    try:
        api.set_options({"sd_model_checkpoint": "tiny-inpaint"})
        assert api.util_get_current_model().startswith("tiny-inpaint [")
        kw = dict(prompt="a cat", width=SIZE, height=SIZE, seed=2, steps=2)
        t = api.txt2img(**kw)
        assert t.image.size == (SIZE, SIZE) and t.info["is_using_inpainting_conditioning"]
        i = api.img2img(images=[gradient(6)], denoising_strength=0.5, **kw)
        assert i.image.size == (SIZE, SIZE)
        mask = Image.new("L", (SIZE, SIZE), 0)
        mask.paste(255, (0, 0, 32, SIZE))
        m = api.img2img(images=[gradient(6)], mask_image=mask, mask_blur=0,
                        inpaint_full_res=False, denoising_strength=1.0, **kw)
        assert np.array_equal(arr(m.image)[:, 40:], arr(gradient(6))[:, 40:])
        assert (arr(m.image)[:, :24] != arr(gradient(6))[:, :24]).mean() > 0.5
    finally:
        api.set_options({"sd_model_checkpoint": first})
        shutil.rmtree(folder)
        api.refresh_checkpoints()
