"""Uploading a trained session model to the Hub, through the real huggingface_hub client
against a Hub stand-in on localhost: private by default, the diffusers folder, the single
file, the samples and a model card that names the base model, token and settings."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from fastsd import session
from fastsd.errors import DataError, ModelError
from fastsd.models import upload
from hubstandin import Hub, hub  # noqa: F401  (the fixture)


@pytest.fixture
def hub_token(hub, monkeypatch):
    """The Hub stand-in, and a write token in HF_TOKEN."""
    monkeypatch.setenv("HF_TOKEN", "hf_uploadtoken12345")
    return hub


def trained_session(workspace, tiny_sd1):
    s = session.create("dog", workspace, instance_token="zwx", class_word="dog",
                       base_model="stable-diffusion-v1-5/stable-diffusion-v1-5")
    s.update(train={"unet_steps": 400, "unet_lr": 2e-6, "resolution": 512})
    shutil.copytree(tiny_sd1, s.models / "dog")
    (s.models / "dog.safetensors").write_bytes(b"single file bytes")
    s.outputs.mkdir(exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(s.outputs / "sample-1.png")
    return s


def test_the_plan_and_the_card(workspace, tiny_sd1):
    s = trained_session(workspace, tiny_sd1)
    p = upload.plan(s, "me/dog")
    paths = [r for r, _ in p.files]
    assert "model_index.json" in paths and "unet/diffusion_pytorch_model.safetensors" in paths
    assert "dog.safetensors" in paths and "samples/sample-1.png" in paths
    assert "base_model: stable-diffusion-v1-5/stable-diffusion-v1-5" in p.card
    assert "zwx" in p.card and '"unet_steps": 400' in p.card
    assert "![sample-1](samples/sample-1.png)" in p.card
    with pytest.raises(DataError, match="not a Hub repo id"):
        upload.plan(s, "dog")


def test_no_trained_model_is_a_clear_error(workspace):
    s = session.create("empty", workspace)
    with pytest.raises(ModelError, match="Train it first"):
        upload.plan(s, "me/empty")


def test_upload_is_private_by_default_and_sends_every_file(hub_token, workspace, tiny_sd1):
    hub = hub_token
    s = trained_session(workspace, tiny_sd1)
    url = upload.upload(s, "user/dog")
    assert "user/dog" in url
    assert hub.private["user/dog"] is True
    got = hub.repos["user/dog"]
    assert got["dog.safetensors"] == b"single file bytes"
    assert got["unet/diffusion_pytorch_model.safetensors"] == \
        (tiny_sd1 / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    assert "zwx" in got["README.md"].decode()
    assert got["samples/sample-1.png"][:4] == b"\x89PNG"
    assert json.loads(got["model_index.json"])["_class_name"] == "StableDiffusionPipeline"
    assert "Bearer hf_uploadtoken12345" in hub.auth


def test_upload_without_a_token_says_how_to_give_one(hub_token, workspace, tiny_sd1,
                                                     monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    s = trained_session(workspace, tiny_sd1)
    with pytest.raises(DataError, match="HF_TOKEN"):
        upload.upload(s, "user/dog")
