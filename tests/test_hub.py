"""Base models from the Hugging Face Hub: cached on the workspace, clear errors offline."""

import pytest

from fastsd import models
from fastsd.errors import ModelError, OfflineError
from fastsd import fetch
from fastsd.workspace import Workspace
from conftest import cached_repo


def test_offline_without_a_cached_copy_names_the_model(workspace):
    with pytest.raises(OfflineError) as e:
        models.resolve_model("someone/some-sd-model")
    assert "someone/some-sd-model" in str(e.value)
    assert str(workspace / "models" / "hub") in str(e.value)


def test_a_cached_copy_is_used_offline(workspace):
    snap = cached_repo(Workspace.current().hub_cache, "someone/some-sd-model",
                       {"model_index.json": "{}", "unet/config.json": "{}"})
    assert models.resolve_model("someone/some-sd-model") == snap


def test_a_repo_that_is_not_diffusers_is_refused(workspace):
    cached_repo(Workspace.current().hub_cache, "someone/lora", {"README.md": "a LoRA"})
    with pytest.raises(ModelError, match="not a diffusers model"):
        models.resolve_model("someone/lora")


def test_offline_flag_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetch.hf_offline() and fetch.use_cache_only()
