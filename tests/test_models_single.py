"""Custom models: a single file as a base model (converted once, reused, trained), add-ons
refused by the converter, the v_pred / ztsnr markers, and the `fastsd models` commands."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import cache_family_configs
from fastsd import models
from fastsd.cli import main
from fastsd.errors import ModelError


def save(path, tensors, metadata=None):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("kind,keys,says", [
    ("lora", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8)},
     "a LoRA"),
    ("vae", {"encoder.down.0.block.0.conv1.weight": (8, 3, 3, 3),
             "decoder.up.0.block.0.conv1.weight": (8, 8, 3, 3)}, "a VAE alone"),
    ("controlnet", {"control_model.input_hint_block.0.weight": (16, 3, 3, 3),
                    "control_model.zero_convs.0.0.weight": (8, 8, 1, 1)}, "a ControlNet"),
    ("embedding", {"emb_params": (2, 32)}, "textual-inversion embedding"),
])
def test_an_add_on_given_as_a_base_model_is_refused(tmp_path, workspace, kind, keys, says):
    import torch

    f = save(tmp_path / f"{kind}.safetensors", {k: torch.zeros(s) for k, s in keys.items()})
    with pytest.raises(ModelError) as e:
        models.resolve_model(f)
    assert says in str(e.value) and "not a whole Stable Diffusion model" in str(e.value)
    assert not list(workspace.glob("models/converted/*/model_index.json"))


def test_a_single_file_on_drive_is_converted_once_and_reused(tmp_path, workspace, tiny_sd1):
    from fastsd.convert import to_single_file

    cache_family_configs(workspace, "sd1", tiny_sd1)
    f = to_single_file(tiny_sd1, workspace / "my-model.safetensors")
    first = models.resolve_model(f)
    assert first.parent == workspace / "models" / "converted"
    stamp = (first / "model_index.json").stat().st_mtime_ns
    assert models.resolve_model(str(f)) == first
    assert (first / "model_index.json").stat().st_mtime_ns == stamp
    # Where a single file is wanted (AUTOMATIC1111, Forge), the file it came from is used.
    assert models.source_file(first) == f.resolve()
    os.utime(f, (1, 1))  # changed since: the record no longer answers for it
    assert models.source_file(first) is None


def test_a_single_file_given_as_a_base_model_trains(workspace, tiny_sd1):
    from test_train_resume import make_subject_session

    from fastsd.convert import to_single_file
    from fastsd.train import TrainSettings, train

    cache_family_configs(workspace, "sd1", tiny_sd1)
    f = to_single_file(tiny_sd1, workspace / "base.safetensors", fp16=False)
    s = make_subject_session("fromfile", workspace, n=2)
    s.update(base_model=str(f))
    r = train(s, TrainSettings(unet_steps=2, text_steps=1, checkpoint_every=0, unet_lr=1e-4,
                               text_lr=1e-4, sample_steps=2))
    assert r.global_step == 3
    assert (s.models / "fromfile" / "model_index.json").is_file()


def _strip_metadata(src, dst):
    """The same tensors without our metadata and without a .yaml: only the markers say."""
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(src)), str(dst), metadata={"format": "pt"})
    return dst


def test_v_prediction_single_files_carry_the_marker_and_read_back(tmp_path, workspace,
                                                                  tiny_sd2, tiny_sd1):
    from safetensors import safe_open

    from fastsd.convert import inspect, to_diffusers, to_single_file

    f = to_single_file(tiny_sd2, tmp_path / "sd2v.safetensors")
    with safe_open(str(f), "pt") as sf:
        assert "v_pred" in sf.keys() and "ztsnr" not in sf.keys()
    (tmp_path / "bare").mkdir()
    bare = _strip_metadata(f, tmp_path / "bare" / "sd2v.safetensors")
    info = inspect(bare)
    assert info["prediction_type"] == "v_prediction" and info["prediction_source"] == "marker"
    cache_family_configs(workspace, "sd2", tiny_sd2)
    out = to_diffusers(bare, tmp_path / "back")
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    # An epsilon model gets no marker.
    eps = to_single_file(tiny_sd1, tmp_path / "sd1.safetensors")
    with safe_open(str(eps), "pt") as sf:
        assert "v_pred" not in sf.keys()


def test_sdxl_v_with_zero_terminal_snr_round_trips(tmp_path, workspace, tiny_sdxl):
    from safetensors import safe_open

    from fastsd.convert import inspect, to_diffusers, to_single_file

    model = shutil.copytree(tiny_sdxl, tmp_path / "xl-v")
    cfg = model / "scheduler" / "scheduler_config.json"
    sched = json.loads(cfg.read_text())
    sched.update(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    cfg.write_text(json.dumps(sched))
    f = to_single_file(model, tmp_path / "xlv.safetensors")
    with safe_open(str(f), "pt") as sf:
        assert {"v_pred", "ztsnr"} <= set(sf.keys())
    (tmp_path / "bare").mkdir()
    bare = _strip_metadata(f, tmp_path / "bare" / "xlv.safetensors")
    info = inspect(bare)
    assert info["prediction_type"] == "v_prediction" and info["ztsnr"]
    cache_family_configs(workspace, "sdxl", tiny_sdxl)
    out = to_diffusers(bare, tmp_path / "back")
    back = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert back["prediction_type"] == "v_prediction" and back["rescale_betas_zero_snr"]
    # Without the markers the same file reads as SDXL's default, epsilon.
    from safetensors.torch import load_file, save_file

    sd = load_file(str(bare))
    del sd["v_pred"], sd["ztsnr"]
    save_file(sd, str(tmp_path / "bare" / "plain.safetensors"), metadata={"format": "pt"})
    assert inspect(tmp_path / "bare" / "plain.safetensors")["prediction_type"] == "epsilon"


# --------------------------------------------------------------------------- CLI


def test_cli_models_list_and_controlnets(capsys):
    assert main(["models", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} >= {"sd15", "sd21", "sdxl", "tiny-sd1"}
    assert main(["models", "list"]) == 0
    table = capsys.readouterr().out
    assert "sd15" in table and "T4,L4,A100" in table
    assert main(["models", "controlnet", "list", "--family", "sdxl", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and {r["family"] for r in rows} == {"sdxl"}
    assert "tiny-canny" not in {r["name"] for r in rows}, "the tiny test one, on request only"
    assert main(["models", "controlnet", "list", "--family", "sdxl", "--tiny", "--json"]) == 0
    assert "tiny-canny" in {r["name"] for r in json.loads(capsys.readouterr().out)}


def test_cli_models_get_and_offline_error(capsys, workspace, tiny_sd1):
    (workspace / "models").mkdir(exist_ok=True)
    (workspace / "models" / "tiny-sd1").symlink_to(tiny_sd1)
    assert main(["models", "get", "tiny-sd1"]) == 0
    assert capsys.readouterr().out.strip() == str(workspace / "models" / "tiny-sd1")
    assert main(["models", "get", "sdxl"]) == 2
    assert "Stable Diffusion XL" in capsys.readouterr().err
    assert main(["models", "controlnet", "get", "canny", "--family", "sd2"]) == 2
    assert "canny" in capsys.readouterr().err
    assert main(["models", "build-tiny", "--family", "sd1"]) == 0
