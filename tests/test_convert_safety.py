"""fastsd.convert on files that are not whole models, damaged files and unsafe pickles;
family detection; the CLI and the demo step."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastsd import convert
from fastsd.errors import DataError, ModelError
from fastsd.convert import detect


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory, tiny_sd1) -> Path:
    return convert.to_single_file(tiny_sd1, tmp_path_factory.mktemp("f") / "sd1.safetensors")


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory, tiny_sdxl) -> Path:
    return convert.to_single_file(tiny_sdxl, tmp_path_factory.mktemp("f") / "xl.safetensors")


def _t(*shape):
    return torch.zeros(*shape)


# --------------------------------------------------------------------------- detection


def test_family_of_every_tiny_model(tiny_model, tmp_path):
    family, src = tiny_model
    f = convert.to_single_file(src, tmp_path / "m.safetensors")
    info = convert.inspect(f)
    assert (info["kind"], info["family"], info["inpainting"]) == ("checkpoint", family, False)
    # from the tensors alone: without our metadata the answer is the same. The tiny SD 2.x
    # model predicts v, which its file says with the v_pred marker tensor (a tensor, so it
    # survives the metadata being dropped); the others predict noise.
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(f), bare)
    det = detect.detect_file(bare)
    assert (det.kind, det.family) == ("checkpoint", family)
    assert (det.prediction_type, det.prediction_source) == (
        ("v_prediction", "marker") if family == "sd2" else ("epsilon", det.prediction_source))
    assert detect.detect_folder(src).family == family


def test_inpainting_is_detected_from_the_input_conv(sd1_file):
    shapes = {k: tuple(v.shape) for k, v in load_file(sd1_file).items()}
    key = "model.diffusion_model.input_blocks.0.0.weight"
    shapes[key] = (shapes[key][0], 9, *shapes[key][2:])
    det = detect.classify(shapes)
    assert det.convertible and det.inpainting and det.family == "sd1"


def _refusal(path: Path, tmp_path: Path) -> str:
    with pytest.raises(ModelError) as e:
        convert.to_diffusers(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    return str(e.value)


def test_lora_is_refused(tmp_path):
    f = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": _t(4, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": _t(32, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": _t(())}, f)
    assert convert.inspect(f)["kind"] == "lora"
    assert "a LoRA" in _refusal(f, tmp_path)


def test_vae_alone_is_refused(sd1_file, tmp_path):
    f = tmp_path / "vae.safetensors"
    save_file({k.removeprefix("first_stage_model."): v for k, v in load_file(sd1_file).items()
               if k.startswith("first_stage_model.")}, f)
    assert "a VAE alone" in _refusal(f, tmp_path)


def test_controlnet_is_refused(tmp_path):
    f = tmp_path / "cn.safetensors"
    save_file({"control_model.input_hint_block.0.weight": _t(16, 3, 3, 3),
               "control_model.zero_convs.0.0.weight": _t(32, 32, 1, 1),
               "control_model.time_embed.0.weight": _t(128, 32)}, f)
    assert "a ControlNet" in _refusal(f, tmp_path)


def test_embeddings_are_refused(tmp_path):
    f = tmp_path / "emb.safetensors"
    save_file({"emb_params": _t(2, 32)}, f)
    assert "textual-inversion embedding" in _refusal(f, tmp_path)
    pt = tmp_path / "a1111.pt"  # AUTOMATIC1111's own format, a nested dict
    torch.save({"string_to_token": {"*": torch.tensor(265)},
                "string_to_param": {"*": _t(2, 768)}, "name": "sks", "step": 100}, pt)
    assert convert.inspect(pt)["kind"] == "embedding"
    assert "textual-inversion embedding" in _refusal(pt, tmp_path)


def test_sdxl_refiner_is_refused(sdxl_file, tmp_path):
    sd = {}
    for k, v in load_file(sdxl_file).items():
        if k.startswith("conditioner.embedders.0."):
            continue
        sd[k.replace("conditioner.embedders.1.", "conditioner.embedders.0.")] = v
    f = tmp_path / "refiner.safetensors"
    save_file(sd, f)
    assert "an SDXL refiner" in _refusal(f, tmp_path)


def test_unknown_layout_is_refused(tmp_path):
    f = tmp_path / "other.safetensors"
    save_file({"transformer.h.0.attn.weight": _t(8, 8), "lm_head.weight": _t(8, 8)}, f)
    msg = _refusal(f, tmp_path)
    assert "unknown layout" in msg and "cannot be converted" in msg


# --------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_zero_byte_file(tmp_path, suffix):
    f = tmp_path / f"empty{suffix}"
    f.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        convert.inspect(f)
    with pytest.raises(DataError, match="empty"):
        convert.to_diffusers(f, tmp_path / "out")


def test_truncated_safetensors(sd1_file, tmp_path):
    f = tmp_path / "cut.safetensors"
    f.write_bytes(sd1_file.read_bytes()[: sd1_file.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated"):
        convert.inspect(f)


def test_truncated_ckpt(tiny_sd1, tmp_path):
    whole = convert.to_single_file(tiny_sd1, tmp_path / "m.ckpt", ckpt=True)
    f = tmp_path / "cut.ckpt"
    f.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated|could not read"):
        convert.inspect(f)


@pytest.mark.parametrize("name", ["page.safetensors", "page.ckpt", "page.bin"])
def test_wrong_format(tmp_path, name):
    f = tmp_path / name
    f.write_text("<!DOCTYPE html><html><body>Sign in to download</body></html>" * 4)
    with pytest.raises(DataError, match="not a usable model file"):
        convert.inspect(f)


class _Payload:
    """Unpickling this would create a file: the proof that code ran."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_that_runs_code_is_refused_and_not_run(tmp_path):
    payload = _Payload()
    payload.marker = tmp_path / "code-ran"
    f = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": _t(4)},
                "callbacks": payload}, f)
    with pytest.raises(ModelError, match="needs to run code") as e:
        convert.to_diffusers(f, tmp_path / "out")
    assert "safetensors" in str(e.value)
    assert not payload.marker.exists()
    # a plain pickle (not torch's zip format) is refused the same way
    g = tmp_path / "old.ckpt"
    with open(g, "wb") as fh:
        pickle.dump({"x": payload}, fh, protocol=2)
    with pytest.raises((ModelError, DataError)):
        convert.inspect(g)
    assert not payload.marker.exists()


def test_a_folder_that_is_not_diffusers_is_refused(tmp_path):
    with pytest.raises(ModelError, match="model_index.json"):
        convert.to_single_file(tmp_path, tmp_path / "x.safetensors")


# --------------------------------------------------------------------------- CLI and demo


def test_cli(tiny_sd1, tmp_path, capsys):
    import json

    from fastsd.cli import main

    out = tmp_path / "m.ckpt"
    assert main(["convert", "to-single-file", str(tiny_sd1), str(out), "--fp32", "--ckpt"]) == 0
    assert out.is_file()
    capsys.readouterr()
    assert main(["convert", "inspect", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["precision"], info["kind"]) == ("sd1", "fp32", "checkpoint")
    assert main(["convert", "to-diffusers", str(out), str(tmp_path / "d"), "--config",
                 str(tiny_sd1)]) == 0
    assert (tmp_path / "d" / "model_index.json").is_file()
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert main(["convert", "inspect", str(empty)]) != 0
    assert "empty" in capsys.readouterr().err


def test_demo_step_convert(workspace):
    from fastsd import demo

    s = demo.step_session(workspace, "demo", "sd1")
    demo.step_convert(s)
    files = list(s.models.glob("*.safetensors"))
    assert len(files) == 1
    info = convert.inspect(files[0])
    assert (info["family"], info["precision"]) == ("sd1", "fp16")
