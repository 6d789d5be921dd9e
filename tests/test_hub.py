"""Base models from the Hugging Face Hub: cached on the workspace, clear errors offline."""

import pytest

from fastsd import models
from fastsd.errors import ModelError, OfflineError
from fastsd.models import hub


def cached_repo(cache, repo_id, files):
    """Lay out a repo in the Hugging Face cache as huggingface_hub itself does."""
    commit = "1" * 40
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    for name, text in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_text(text)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_offline_without_a_cached_copy_names_the_model(workspace):
    with pytest.raises(OfflineError) as e:
        models.resolve("someone/some-sd-model")
    assert "someone/some-sd-model" in str(e.value)
    assert str(workspace / "models" / "hub") in str(e.value)


def test_a_cached_copy_is_used_offline(workspace):
    snap = cached_repo(hub.hub_cache(), "someone/some-sd-model",
                       {"model_index.json": "{}", "unet/config.json": "{}"})
    assert models.resolve("someone/some-sd-model") == snap


def test_a_repo_that_is_not_diffusers_is_refused(workspace):
    cached_repo(hub.hub_cache(), "someone/lora", {"README.md": "a LoRA"})
    with pytest.raises(ModelError, match="not a diffusers model"):
        models.resolve("someone/lora")


def test_offline_flag_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline() and hub.use_cache_only()
