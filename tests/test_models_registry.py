"""The model registry: schema and consistency, download plans (fp16, no safety checker),
the VRAM figures against the trainer's estimate, ControlNets, and a registry download
through the real huggingface_hub client from a Hub stand-in on localhost."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import time
import zipfile

import pytest

from fastsd import fetch, models
from fastsd.errors import DriveError, ModelError, OfflineError
from fastsd.models import registry
from hubstandin import Hub, hub  # noqa: F401  (the fixture)

FAMILIES = {"sd1", "sd2", "sdxl"}


# --------------------------------------------------------------------------- schema


def test_the_issue_models_are_all_there_with_every_field():
    es = registry.entries()
    repos = {e.repo for e in es.values()}
    assert {"stable-diffusion-v1-5/stable-diffusion-v1-5",
            "stable-diffusion-v1-5/stable-diffusion-inpainting",
            "stabilityai/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2-1",
            "stabilityai/stable-diffusion-xl-base-1.0"} <= repos
    assert "runwayml/stable-diffusion-v1-5" not in repos  # deleted upstream
    assert {"tiny-sd1", "tiny-sd2", "tiny-sdxl"} <= set(es)
    for e in es.values():
        assert e.family in FAMILIES and e.prediction_type in ("epsilon", "v_prediction")
        assert e.resolution % 64 == 0 and e.title
        if e.tiny:
            continue
        assert e.repo.count("/") == 1 and e.revision and e.download_gb > 0
        assert "unet" in e.components and "scheduler" in e.components
        assert e.vae is None or e.vae in registry.data()["vaes"]
        assert set(e.vram_gib) == set(registry.data()["gpus"])
    assert es["sd15"].vae == "sd-vae-ft-mse"
    assert es["sd21"].prediction_type == "v_prediction" and es["sd21"].resolution == 768
    assert es["sd21-base"].prediction_type == "epsilon" and es["sd21-base"].resolution == 512
    assert es["sd15-inpainting"].inpainting


def test_vram_figures_are_the_trainers_estimate():
    # The registry copies the trainer's estimate (models sits below train); recompute it.
    from fastsd.train.settings import PRESETS, TrainSettings, estimate_vram_gib

    for e in registry.entries().values():
        if e.tiny:
            continue
        for gpu in registry.data()["gpus"]:
            s = dataclasses.replace(TrainSettings(), resolution=e.resolution, **PRESETS[gpu])
            assert e.vram_gib[gpu] == max(estimate_vram_gib(s, e.family, e.params).values()), \
                (e.name, gpu)
    fits = registry.get("sd15").trains_on()
    assert fits == {"t4": True, "l4": True, "a100": True}
    assert not any(registry.get("sdxl").trains_on().values())  # full fine-tune, estimate


def test_every_plan_is_fp16_safetensors_without_the_safety_checker():
    listing = ["model_index.json", "safety_checker/model.safetensors",
               "safety_checker/model.fp16.safetensors", "safety_checker/config.json",
               "feature_extractor/preprocessor_config.json", "v1-5-pruned.ckpt",
               "v1-5-pruned-emaonly.safetensors", "unet/diffusion_pytorch_model.bin",
               "unet/diffusion_pytorch_model.safetensors",
               "unet/diffusion_pytorch_model.fp16.safetensors", "unet/config.json",
               "unet/diffusion_pytorch_model.non_ema.safetensors",
               "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
               "text_encoder/config.json", "text_encoder/pytorch_model.fp16.bin",
               "vae/diffusion_pytorch_model.fp16.safetensors", "vae/config.json",
               "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json"]
    for e in registry.entries().values():
        p = registry.plan(e)
        if e.tiny:
            assert p.parts == ()
            continue
        main = p.parts[0]
        assert (main[0], main[1]) == (e.repo, e.revision)
        got = [f for f in listing if any(fnmatch.fnmatch(f, pat) for pat in main[2])]
        weights = [f for f in got if f.endswith((".safetensors", ".bin", ".ckpt"))]
        assert weights and all(f.endswith(".fp16.safetensors") for f in weights), e.name
        assert not any(f.startswith(("safety_checker", "feature_extractor")) for f in got)
        assert "unet/diffusion_pytorch_model.fp16.safetensors" in got
        assert ("vae/diffusion_pytorch_model.fp16.safetensors" in got) == (e.vae is None)
        if e.vae:
            vae = registry.data()["vaes"][e.vae]
            assert p.parts[1][0] == vae["repo"] and p.parts[1][3] == "vae"


def test_the_registry_ships_in_a_regular_wheel(tmp_path):
    # The Colab install is a plain pip install: registry.json must be inside the wheel.
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(root)], check=True)
    wheel = next(tmp_path.glob("fastsd-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        data = json.loads(z.read("fastsd/models/registry.json"))
    assert data == registry.data()


# --------------------------------------------------------------------------- ControlNet


def test_controlnet_names_map_to_one_entry_of_their_family():
    for family in FAMILIES:
        offered = [c.name for c in registry.controlnets(family, tiny=True)]
        assert offered, family
        assert len(offered) == len(set(offered))
        for name in offered:
            c = registry.controlnet(name, family)
            assert c.family == family and c.name == name
            if c.tiny:  # built offline for the family's tiny model
                assert not c.repo and not c.url and name.startswith("tiny-")
            else:
                assert c.url.startswith("https://huggingface.co/") and c.repo.count("/") == 1
            assert c.preprocessor
    sd15 = {c.name for c in registry.controlnets("sd1")}
    assert {"canny", "depth", "openpose", "lineart", "softedge", "scribble", "tile",
            "inpaint"} <= sd15
    assert "tiny-canny" not in sd15, "the tiny test ControlNet is offered for tiny models only"
    assert registry.controlnet("tiny-canny", "sd1").tiny  # still found by name
    real = registry.controlnets()
    assert real and not any(c.tiny for c in real)
    assert all("sd15" in c.repo for c in real if c.family == "sd1")
    assert all("sd21" in c.repo for c in real if c.family == "sd2")
    assert all("sdxl" in c.repo for c in real if c.family == "sdxl")
    with pytest.raises(ModelError, match="No ControlNet 'tile' for sdxl"):
        registry.controlnet("tile", "sdxl")


# --------------------------------------------------------------------------- resolving


def test_registry_names_resolve_through_the_one_resolver(workspace, tiny_sd1):
    (workspace / "models").mkdir(exist_ok=True)
    (workspace / "models" / "tiny-sd1").symlink_to(tiny_sd1)
    assert models.resolve_model("tiny-sd1") == workspace / "models" / "tiny-sd1"


def test_offline_registry_download_fails_fast_naming_the_model(workspace):
    t0 = time.monotonic()
    with pytest.raises(OfflineError) as e:
        models.resolve_model("sd15")
    assert time.monotonic() - t0 < 5
    assert "Stable Diffusion 1.5" in str(e.value) and "Connect" in str(e.value)
    assert not (workspace / "models" / "sd15").exists()


def test_an_unreachable_hub_fails_fast_too(workspace, monkeypatch):
    import socket

    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(OfflineError, match="Stable Diffusion 2.1"):
        models.resolve_model("sd21")
    assert time.monotonic() - t0 < fetch.CONNECT_TIMEOUT + 1





def publish_tiny_as(hub: Hub, repo: str, tiny_dir, fp16_names: bool = True) -> None:
    """Put the tiny model's files in the stand-in as an SD repo with fp16 variant files, a
    safety checker and a single-file checkpoint beside them."""
    files = {}
    for p in tiny_dir.rglob("*"):
        if p.is_file() and p.name != "fastsd_tiny.json":
            rel = p.relative_to(tiny_dir).as_posix()
            if fp16_names and rel.endswith(".safetensors"):
                rel = rel.replace(".safetensors", ".fp16.safetensors")
            files[rel] = p.read_bytes()
    index = json.loads(files["model_index.json"])
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    files["model_index.json"] = json.dumps(index).encode()
    files["safety_checker/model.fp16.safetensors"] = b"x" * 5000
    files["safety_checker/config.json"] = b"{}"
    files["v1-5-pruned.safetensors"] = b"y" * 7000
    hub.repos[repo] = files


def test_a_registry_model_downloads_as_a_plain_fp16_folder_once(hub, workspace, tiny_sd1,
                                                               monkeypatch):
    import torch
    from diffusers import StableDiffusionPipeline

    entry = registry.get("sd21-base")  # no VAE override: one repo
    publish_tiny_as(hub, entry.repo, tiny_sd1)
    out = models.resolve_model("sd21-base")
    assert out == workspace / "models" / "sd21-base" and registry.is_whole(out)
    marker = json.loads((out / registry.MARKER).read_text())
    assert marker["commits"] == {entry.repo: "a" * 40}  # the commit the Hub served
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert "unet/diffusion_pytorch_model.safetensors" in names  # the fp16 file, plain name
    assert not any("safety_checker" in n or "pruned" in n or ".fp16." in n for n in names)
    index = json.loads((out / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    pipe = StableDiffusionPipeline.from_pretrained(out, torch_dtype=torch.float32)
    assert pipe.safety_checker is None and pipe.unet.dtype == torch.float32
    assert not (workspace / "models" / registry.PARTIAL / "sd21-base").exists()
    # Once whole, it is reused without asking the Hub again.
    hub.repos.clear()
    assert models.resolve_model("sd21-base") == out
    # A truncated file makes the folder not whole: it is fetched again.
    f = out / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    assert not registry.is_whole(out)


def test_a_vae_override_replaces_the_repos_vae(hub, workspace, tiny_sd1, tiny_sd2):
    entry = registry.get("sd15")
    publish_tiny_as(hub, entry.repo, tiny_sd1)
    vae_repo = registry.data()["vaes"][entry.vae]["repo"]
    hub.repos[vae_repo] = {"config.json": (tiny_sd2 / "vae/config.json").read_bytes(),
                           "diffusion_pytorch_model.safetensors":
                               (tiny_sd2 / "vae/diffusion_pytorch_model.safetensors").read_bytes()}
    out = models.resolve_model("sd15")
    assert (out / "vae/diffusion_pytorch_model.safetensors").read_bytes() == \
        (tiny_sd2 / "vae/diffusion_pytorch_model.safetensors").read_bytes()


def test_a_download_bigger_than_the_free_space_is_refused_before_it_starts(hub, workspace,
                                                                          tiny_sd1):
    entry = registry.get("sd21-base")
    publish_tiny_as(hub, entry.repo, tiny_sd1)
    hub.repos[entry.repo]["unet/diffusion_pytorch_model.fp16.safetensors"] = b""
    import shutil

    free = shutil.disk_usage(workspace).free
    # A sparse file of more than the free space, announced by the Hub listing.
    big = type("Big", (bytes,), {"__len__": lambda self: free * 2})(b"")
    hub.repos[entry.repo]["unet/diffusion_pytorch_model.fp16.safetensors"] = big
    with pytest.raises(DriveError, match="Free up space"):
        models.resolve_model("sd21-base")
    assert not (workspace / "models" / registry.PARTIAL / "sd21-base" / "unet").exists()


def test_the_token_goes_in_a_header_and_never_in_logs_or_errors(hub, workspace, caplog,
                                                               monkeypatch):
    secret = "hf_SECRETtoken1234567890"
    (workspace / fetch.TOKEN_FILE).write_text(secret + "\n")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert fetch.hf_token() == secret
    # The stand-in echoes the Authorization header in its error, as a proxy might.
    hub.fail_with = (403, '{"error": "forbidden for {auth}"}')
    caplog.set_level(logging.DEBUG, logger="fastsd")
    with pytest.raises(OfflineError) as e:
        models.resolve_model("sd21-base")
    assert hub.auth and hub.auth[0] == f"Bearer {secret}"
    assert secret not in str(e.value) and "403" in str(e.value)
    logging.getLogger("fastsd").warning("token is %s", secret)
    assert secret not in caplog.text and "***" in caplog.text


def test_token_from_the_environment_first(workspace, monkeypatch):
    (workspace / fetch.TOKEN_FILE).write_text("hf_fromfile123456")
    monkeypatch.setenv("HF_TOKEN", "hf_fromenv1234567")
    assert fetch.hf_token() == "hf_fromenv1234567"
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert fetch.hf_token() == "hf_fromfile123456"
    assert fetch.redact("a hf_fromfile123456 b") == "a *** b"



def test_fast_stable_diffusions_token_txt_is_a_token_source(workspace, monkeypatch, caplog):
    """Fast-Dreambooth/token.txt, where fast-stable-diffusion kept the token: read after
    fastsd's own hf_token file, never shown."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert fetch.hf_token(workspace) is None
    (workspace / "token.txt").write_text("hf_fromlegacy12345\n")
    assert fetch.hf_token(workspace) == "hf_fromlegacy12345"
    caplog.set_level(logging.INFO, logger="fastsd")
    logging.getLogger("fastsd").info("using hf_fromlegacy12345")
    assert "hf_fromlegacy12345" not in caplog.text and "***" in caplog.text
    (workspace / fetch.TOKEN_FILE).write_text("hf_fromfile123456")
    assert fetch.hf_token(workspace) == "hf_fromfile123456"


def test_a_controlnet_downloads_into_the_shared_models_folder(hub, workspace, tiny_sd1):
    c = registry.controlnet("canny", "sd1")
    unet = tiny_sd1 / "unet"
    hub.repos[c.repo] = {"config.json": (unet / "config.json").read_bytes(),
                         "diffusion_pytorch_model.safetensors":
                             (unet / "diffusion_pytorch_model.safetensors").read_bytes(),
                         "diffusion_pytorch_model.bin": b"pickle"}
    out = registry.ensure_controlnet("canny", "sd1")
    assert out == workspace / "models" / "controlnet" / "sd1-canny"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("fastsd")) == [
        "config.json", "diffusion_pytorch_model.safetensors"]
    assert registry.is_whole(out)


def test_the_notebooks_model_list_is_the_registry():
    import re
    from pathlib import Path

    nb = json.loads((Path(__file__).resolve().parent.parent / "notebooks" /
                     "fast_dreambooth.ipynb").read_text())
    line = next(ln for c in nb["cells"] for ln in c["source"] if ln.startswith("Base_Model ="))
    options = json.loads(re.search(r"#@param (\[.*?\])", line).group(1))
    names = registry.entries()
    assert set(options) <= set(names)
    assert {n for n, e in names.items() if not e.tiny} <= set(options)
    assert json.loads(line.split("=", 1)[1].split("#")[0]) in options


def test_an_interrupted_download_resumes_without_fetching_whole_files_again(hub, workspace,
                                                                           tiny_sd1):
    entry = registry.get("sd21-base")
    publish_tiny_as(hub, entry.repo, tiny_sd1)
    unet = "unet/diffusion_pytorch_model.fp16.safetensors"
    hub.missing = {unet}  # listed, but the connection fails on it
    with pytest.raises(OfflineError, match="run this again to resume"):
        models.resolve_model("sd21-base")
    out = workspace / "models" / "sd21-base"
    assert not out.exists()  # never taken for whole
    partial = workspace / "models" / registry.PARTIAL / "sd21-base"
    assert (partial / "text_encoder" / "model.fp16.safetensors").is_file()
    hub.missing, hub.gets = set(), []
    assert models.resolve_model("sd21-base") == out and registry.is_whole(out)
    assert [g for g in hub.gets if g.endswith(".safetensors")] == [unet]  # only the missing one


def test_the_token_from_colab_secrets(workspace, monkeypatch):
    import sys
    import types

    colab = types.ModuleType("google.colab")
    userdata = types.ModuleType("google.colab.userdata")
    userdata.get = lambda key: {"HF_TOKEN": "hf_fromsecrets12345"}[key]
    colab.userdata = userdata
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.userdata", userdata)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert fetch.hf_token(workspace) == "hf_fromsecrets12345"


def test_use_temp_storage_keeps_the_base_model_on_the_runtimes_disk(hub, workspace, tiny_sd1,
                                                                   tmp_path, monkeypatch):
    """Use_Temp_Storage (the session's temp_storage): the resolver downloads the base model
    onto the runtime's own disk, never into the workspace on Drive (whose token it still
    uses); the report shows the model's size and each place's free space. A model already
    whole on Drive is used from there."""
    from fastsd import drive, session

    local = tmp_path / "runtime-disk"
    monkeypatch.setenv("FASTSD_LOCAL_MODELS", str(local))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    (workspace / fetch.TOKEN_FILE).write_text("hf_fromdrive1234567")
    entry = registry.get("sd21-base")
    publish_tiny_as(hub, entry.repo, tiny_sd1)
    s = session.create("dog", workspace, base_model="sd21-base", temp_storage=True)
    report = models.storage_report("sd21-base", workspace, temp_storage=True)
    assert f"Base model sd21-base: about {entry.download_gb:.1f} GB, kept on this runtime's " \
        "disk." in report
    assert f"Drive: {drive.gb(drive.free_bytes(workspace))} free" in report
    assert f"This runtime's disk: {drive.gb(drive.free_bytes(local))} free" in report
    assert report.endswith("(run 'fastsd session set SESSION --no-temp-storage').")
    out = models.base_model(s)
    assert out == local / "sd21-base" and registry.is_whole(out)
    assert not (workspace / "models" / "sd21-base").exists()
    assert hub.auth[-1] == "Bearer hf_fromdrive1234567"
    on_drive = models.resolve_model("sd21-base", workspace)  # Drive, as without the box
    assert on_drive == workspace / "models" / "sd21-base" and registry.is_whole(on_drive)
    hub.repos.clear()
    assert models.base_model(s) == on_drive  # already on Drive: no second download
    assert "kept on Drive (already there)" in models.storage_report("sd21-base", workspace,
                                                                    temp_storage=True)
    from fastsd.cli import main

    assert main(["session", "set", "dog", "--no-temp-storage", "--home", str(workspace)]) == 0
    assert session.load("dog", workspace).settings["temp_storage"] is False
