"""The tiny Kosmos-2, loading plans, batched generation, unloading, offline errors."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest

from fastsd import fetch
from fastsd.kosmos import model as cm
from fastsd.workspace import Workspace
from fastsd.env import DeviceInfo
from fastsd.errors import ModelError, OfflineError
from fastsd.models import tiny_kosmos

REAL_PARAMS = 1_664_000_000  # microsoft/kosmos-2-patch14-224, about 1.66B


@pytest.fixture(scope="module")
def tiny_kosmos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_kosmos.ensure(tmp_path_factory.mktemp("kosmos"))


@pytest.fixture(scope="module")
def captioner(tiny_kosmos_dir: Path):
    with cm.Captioner(str(tiny_kosmos_dir)) as cap:
        yield cap


def _pictures(n: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(80, 60), (40, 90), (64, 64), (120, 50), (33, 47), (70, 70), (90, 30), (50, 50)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for w, h in sizes[:n]]


# --------------------------------------------------------------------------- tiny model


def test_tiny_kosmos_tokenizer_and_config(tiny_kosmos_dir: Path):
    from transformers import AutoProcessor, Kosmos2ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_kosmos_dir)
    model = Kosmos2ForConditionalGeneration.from_pretrained(tiny_kosmos_dir)
    tok = processor.tokenizer
    assert type(processor).__name__ == "Kosmos2Processor"
    # Built as an XLMRobertaTokenizerFast; transformers 5 loads Kosmos-2's saved
    # tokenizer.json through its generic backend, as it does the real model's.
    from transformers import XLMRobertaTokenizerFast

    built = tiny_kosmos.build_processor().tokenizer
    assert isinstance(built, XLMRobertaTokenizerFast)
    text = "<grounding> An image of<phrase> a dog</phrase><object><patch_index_0044>"
    assert built(text).input_ids == tok(text).input_ids
    assert len(built) == len(tok)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<s>", "<pad>", "</s>", "<unk>"]
    ordinary = tok.convert_ids_to_tokens(list(range(4, 4 + 64)))
    assert not any(t.startswith("<") for t in ordinary)  # room for the 64 image tokens
    # The processor added the grounding tags and the 1024 patch-index tokens.
    for t in ("<grounding>", "<phrase>", "</phrase>", "<object>", "</object>",
              "</delimiter_of_multi_objects/>", "<patch_index_0000>", "<patch_index_1023>"):
        assert tok.convert_tokens_to_ids(t) != tok.unk_token_id, t
    assert model.config.text_config.vocab_size == len(tok)
    assert model.config.latent_query_num == 64
    assert tok.tokenize("<phrase> a dog</phrase><object><patch_index_0044>")[::2] == [
        "<phrase>", "▁dog", "<object>"]
    # Small: a few MB at most.
    size = sum(p.stat().st_size for p in tiny_kosmos_dir.iterdir())
    assert size < 5 * 2**20


def test_tiny_kosmos_is_deterministic_and_cached(tmp_path: Path, tiny_kosmos_dir: Path):
    from safetensors.torch import load_file

    ref = load_file(tiny_kosmos_dir / "model.safetensors")
    again = load_file(tiny_kosmos.build(tmp_path / "again", seed=0) / "model.safetensors")
    other = load_file(tiny_kosmos.build(tmp_path / "other", seed=1) / "model.safetensors")
    assert ref.keys() == again.keys()
    assert all((ref[k] == again[k]).all() for k in ref)
    assert any(not (ref[k] == other[k]).all() for k in ref if ref[k].dtype.is_floating_point)
    marker = tiny_kosmos_dir / tiny_kosmos.MARKER
    before = marker.stat().st_mtime_ns
    assert tiny_kosmos.ensure(tiny_kosmos_dir.parent) == tiny_kosmos_dir
    assert marker.stat().st_mtime_ns == before  # not rebuilt


# --------------------------------------------------------------------------- plans


def _cuda(free: float) -> DeviceInfo:
    return DeviceInfo("cuda", "Tesla T4", vram_free_gib=free, vram_total_gib=15.0,
                      capability=(7, 5))


def test_loading_plan():
    fp16, int8 = cm.vram_needed_gib(REAL_PARAMS, False), cm.vram_needed_gib(REAL_PARAMS, True)
    assert 4.0 < fp16 < 6.0 and 2.5 < int8 < fp16
    assert cm.plan_loading(_cuda(14.5), REAL_PARAMS) == cm.LoadPlan(
        "cuda", "float16", False, cm.plan_loading(_cuda(14.5), REAL_PARAMS).reason)
    p = cm.plan_loading(_cuda(fp16 - 0.1), REAL_PARAMS)
    assert (p.device, p.dtype, p.eight_bit) == ("cuda", "float16", True)
    assert "8-bit" in p.reason
    p = cm.plan_loading(_cuda(14.5), REAL_PARAMS, "8bit")
    assert (p.device, p.eight_bit) == ("cuda", True)
    p = cm.plan_loading(_cuda(int8 - 0.1), REAL_PARAMS)
    assert (p.device, p.dtype, p.eight_bit) == ("cpu", "float32", False)
    assert "restart the runtime" in p.reason
    cpu = DeviceInfo("cpu", "x86_64")
    for q in cm.QUANTIZE:
        p = cm.plan_loading(cpu, REAL_PARAMS, q)
        assert (p.device, p.dtype, p.eight_bit) == ("cpu", "float32", False)
    with pytest.raises(ModelError, match="quantize="):
        cm.plan_loading(cpu, REAL_PARAMS, "4bit")


def test_real_model_parameter_count_from_its_config():
    # The real model's architecture is the default Kosmos2Config: count it on the meta
    # device (no weights), as the loader does before choosing fp16 or 8-bit.
    import torch
    from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration

    with torch.device("meta"):
        model = Kosmos2ForConditionalGeneration(Kosmos2Config())
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - REAL_PARAMS) / REAL_PARAMS < 0.01, n


# --------------------------------------------------------------------------- generation


def test_batched_equals_one_at_a_time(captioner):
    pics = _pictures(5)
    batched = captioner.generate(pics, cm.BRIEF_PROMPT, max_new_tokens=12)
    single = [captioner.generate([p], cm.BRIEF_PROMPT, max_new_tokens=12)[0] for p in pics]
    assert batched == single
    assert len(set(batched)) > 1  # the images do steer the (random) model
    for raw in batched:
        assert "</image>" in raw and "<grounding> An image of" in raw


def test_detailed_prompt_and_token_limit(captioner):
    from fastsd.kosmos import grounding

    raw = captioner.generate(_pictures(1), cm.DETAILED_PROMPT, max_new_tokens=5)[0]
    caption = grounding.parse(raw).caption
    assert caption.startswith("Describe this image in detail:")
    tok = captioner.processor.tokenizer
    prompt_len = len(tok(raw.split("</image>")[-1].split("detail:")[0] + "detail:").input_ids)
    assert len(tok(raw.split("</image>")[-1]).input_ids) <= prompt_len + 5


def test_close_releases_the_model(tiny_kosmos_dir: Path):
    cap = cm.Captioner(str(tiny_kosmos_dir))
    ref = weakref.ref(cap.model)
    cap.generate(_pictures(2), max_new_tokens=3)
    with cap:
        pass
    gc.collect()
    assert ref() is None
    with pytest.raises(ModelError, match="closed"):
        cap.generate(_pictures(1))


def test_tiny_model_by_name_builds_under_the_workspace(workspace: Path):
    with cm.Captioner(tiny_kosmos.NAME, workspace) as cap:
        assert cap.device == "cpu"
    assert (workspace / "models" / tiny_kosmos.NAME / tiny_kosmos.MARKER).is_file()


# --------------------------------------------------------------------------- offline


def test_offline_without_cache_names_the_model(workspace: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError) as e:
        cm.Captioner(cm.DEFAULT_MODEL, workspace)
    msg = str(e.value)
    assert cm.DEFAULT_MODEL in msg and str(workspace / "models" / "hub") in msg
    assert "internet" in msg
    assert Workspace.current(workspace).hub_cache == workspace / "models" / "hub"


def test_offline_error_from_the_loader_too(workspace: Path, monkeypatch):
    # A cache holding the config but not the weights: locate() lets it through, the
    # loader fails offline, and that too is an OfflineError naming the model.
    from huggingface_hub import try_to_load_from_cache

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = workspace / "models" / "hub" / "models--microsoft--kosmos-2-patch14-224"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text('{"model_type": "kosmos-2"}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    assert isinstance(try_to_load_from_cache(cm.DEFAULT_MODEL, "config.json",
                                             cache_dir=workspace / "models" / "hub"), str)
    with pytest.raises(OfflineError, match="kosmos-2-patch14-224"):
        cm._load(cm.locate(cm.DEFAULT_MODEL, workspace), cm.LoadPlan("cpu", "float32", False, "test"), cm.DEFAULT_MODEL)


def test_unreachable_hub_fails_fast_without_retries(workspace: Path, monkeypatch):
    # Not flagged offline, but the Hub does not answer (here: a closed local port). The
    # loader must not sit in huggingface_hub's half-minute of retries.
    import socket

    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    assert not fetch.hub_reachable()
    with pytest.raises(OfflineError, match="kosmos-2-patch14-224"):
        cm.locate(cm.DEFAULT_MODEL, workspace)


def test_bad_model_name(workspace: Path):
    with pytest.raises(ModelError, match="neither"):
        cm.locate("not a model", workspace)
