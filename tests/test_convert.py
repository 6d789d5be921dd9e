"""fastsd.convert: diffusers <-> single file on the tiny SD 1.x, 2.x and XL models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastsd import convert
from fastsd.convert import keymap
from fastsd.convert.tensors import open_tensors
from fastsd.errors import DataError, ModelError


def _pipe_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _state_dicts(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return {c: getattr(pipe, c).state_dict() for c in COMPONENTS
            if getattr(pipe, c, None) is not None}


def _differing(a, b, cast=None) -> list[str]:
    bad = []
    for comp, sd in a.items():
        other = b[comp]
        for k, v in sd.items():
            w = other.get(k)
            if cast is not None:
                v = v.to(cast)
            if w is None or w.is_meta or w.shape != v.shape or not torch.equal(v, w.to(v.dtype)):
                bad.append(f"{comp}.{k}")
    return bad


def _image(pipe) -> torch.Tensor:
    out = pipe("a photo of sks cat", num_inference_steps=2, height=64, width=64,
               guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="pt")
    return out.images


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with open_tensors(path) as tf:
        return {k: tf.read(k).clone() for k in tf.keys()}


@pytest.fixture(scope="module")
def singles(tmp_path_factory, tiny_sd1, tiny_sd2, tiny_sdxl) -> dict[str, Path]:
    """Each tiny family converted once to an fp32 .safetensors."""
    out = tmp_path_factory.mktemp("singles")
    return {f: convert.to_single_file(src, out / f"{f}.safetensors", fp16=False, global_step=42)
            for f, src in (("sd1", tiny_sd1), ("sd2", tiny_sd2), ("sdxl", tiny_sdxl))}


def _src(family, tiny_sd1, tiny_sd2, tiny_sdxl) -> Path:
    return {"sd1": tiny_sd1, "sd2": tiny_sd2, "sdxl": tiny_sdxl}[family]


# --------------------------------------------------------------------------- the key map


def test_key_map_serves_both_directions(tiny_model):
    family, src = tiny_model
    seen = 0
    for folder, prefix in keymap.COMPONENT_PREFIX[family].items():
        config = json.loads((src / folder / "config.json").read_text())
        km = keymap.component_map(family, folder, config)
        names = load_file(next((src / folder).glob("*.safetensors"))).keys()
        ldm = {}
        for name in names:
            t = km.to_ldm(name)
            assert t.name.startswith(prefix)
            back = {x.name for x in km.to_diffusers(t.name)}
            assert keymap.strip_text_model(name) in back, (name, t.name, back)
            ldm.setdefault(t.name, []).append(name)
            seen += 1
        # one LDM name per diffusers name, except the stacked q/k/v of OpenCLIP
        assert all(len(v) in (1, 3) for v in ldm.values())
    assert seen > 500


def test_unmapped_tensor_is_refused():
    km = keymap.KeyMap.for_component("unet", keymap.UNET_PREFIX, {
        "down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"],
        "layers_per_block": 1})
    with pytest.raises(ModelError, match="no place in the single-file layout"):
        km.to_ldm("some_adapter.weight")


# --------------------------------------------------------------------------- to single file


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_round_trip_through_diffusers_loader_is_exact(family, singles, tiny_sd1, tiny_sd2,
                                                     tiny_sdxl):
    src = _src(family, tiny_sd1, tiny_sd2, tiny_sdxl)
    cls = _pipe_class(family)
    ref = cls.from_pretrained(src)
    got = cls.from_single_file(str(singles[family]), config=str(src), local_files_only=True)
    a, b = _state_dicts(ref), _state_dicts(got)
    assert sum(len(v) for v in a.values()) > 900
    assert _differing(a, b) == []
    assert torch.equal(_image(ref), _image(got))


def test_sdxl_round_trip(singles, tiny_sdxl, tmp_path):
    """diffusers' loader picks the text encoder by width; the tiny SDXL's two encoders are
    both 32 wide, so it fills text_encoder_2 from the first one. Everything else must be
    exact, and fastsd's to_diffusers (which checks and repairs) gives the exact model."""
    cls = _pipe_class("sdxl")
    ref = cls.from_pretrained(tiny_sdxl)
    got = cls.from_single_file(str(singles["sdxl"]), config=str(tiny_sdxl), local_files_only=True)
    a, b = _state_dicts(ref), _state_dicts(got)
    assert _differing({k: a[k] for k in ("unet", "vae", "text_encoder")}, b) == []
    out = convert.to_diffusers(singles["sdxl"], tmp_path / "back", config=tiny_sdxl)
    back = cls.from_pretrained(out)
    assert _differing(a, _state_dicts(back)) == []
    assert torch.equal(_image(ref), _image(back))


def test_sdxl_with_distinct_encoder_widths_is_exact_in_diffusers_loader(tmp_path):
    """The real SDXL's encoders differ in width (768 vs 1280); so does this variant."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from fastsd.models import tiny

    p = tiny.build_pipeline("sdxl")
    cfg = p.text_encoder_2.config.to_dict()
    cfg.update(hidden_size=48, intermediate_size=96)
    torch.manual_seed(5)
    p.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    p.unet = UNet2DConditionModel.from_config({**p.unet.config, "cross_attention_dim": 80})
    src = tmp_path / "sdxl48"
    p.save_pretrained(src)
    f = convert.to_single_file(src, tmp_path / "sdxl48.safetensors", fp16=False)
    assert load_file(f)["conditioner.embedders.1.model.text_projection"].shape == (48, 48)
    got = _pipe_class("sdxl").from_single_file(str(f), config=str(src), local_files_only=True)
    assert _differing(_state_dicts(p), _state_dicts(got)) == []


def test_fp16_is_within_fp16_rounding(tiny_sd1, tmp_path):
    f = convert.to_single_file(tiny_sd1, tmp_path / "m.safetensors")
    info = convert.inspect(f)
    assert info["precision"] == "fp16" and info["dtypes"] == {"F16": info["tensors"]}
    cls = _pipe_class("sd1")
    ref = cls.from_pretrained(tiny_sd1)
    got = cls.from_single_file(str(f), config=str(tiny_sd1), local_files_only=True,
                               torch_dtype=torch.float16)
    assert _differing(_state_dicts(ref), _state_dicts(got), cast=torch.float16) == []


def test_an_fp16_file_becomes_an_fp16_folder_unless_asked(tiny_sd1, tmp_path):
    """A downloaded fp16 file stays fp16 (it was always loaded and saved in fp32: an SDXL
    file took 14 GB of RAM and twice its size on Drive); fp16=False still gives fp32."""
    f = convert.to_single_file(tiny_sd1, tmp_path / "m.safetensors")  # fp16
    half = convert.to_diffusers(f, tmp_path / "half", config=tiny_sd1)
    full = convert.to_diffusers(f, tmp_path / "full", config=tiny_sd1, fp16=False)

    def dtypes(folder: Path) -> set[str]:
        out = set()
        for w in folder.glob("*/*.safetensors"):
            with open_tensors(w) as tf:
                out |= {tf.info(k).dtype for k in tf.keys()}
        return out

    def size(folder: Path) -> int:
        return sum(w.stat().st_size for w in folder.glob("*/*.safetensors"))

    assert dtypes(half) == {"F16"} and dtypes(full) == {"F32"}
    assert size(half) == pytest.approx(size(full) / 2, rel=0.01)
    ref = _pipe_class("sd1").from_pretrained(full)
    assert _differing(_state_dicts(ref), _state_dicts(_pipe_class("sd1").from_pretrained(
        half, torch_dtype=torch.float32))) == []  # the same fp16 values either way


def test_to_diffusers_checks_the_free_space_before_loading(tiny_sd1, tmp_path):
    """A file whose weights would not fit in the destination's free space is refused with
    the numbers, before anything is loaded or written. The file announces one more tensor
    than the disk holds (its bytes a hole: a sparse file)."""
    import struct

    from fastsd.errors import DriveError

    f = convert.to_single_file(tiny_sd1, tmp_path / "m.safetensors")
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    free = shutil.disk_usage(tmp_path).free
    count = free // 2 + 1  # F16 values: more bytes than the disk has free
    header["model.diffusion_model.extra"] = {"dtype": "F16", "shape": [count],
                                             "data_offsets": [len(data), len(data) + 2 * count]}
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as out:
        out.write(struct.pack("<Q", len(head)) + head + data)
        out.truncate(8 + len(head) + len(data) + 2 * count)
    with pytest.raises(DriveError, match="needs .* GB but .* free"):
        convert.to_diffusers(big, tmp_path / "out", config=tiny_sd1)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_to_diffusers_to_single_is_identical(family, singles, tiny_sd1, tiny_sd2,
                                                    tiny_sdxl, tmp_path):
    src = _src(family, tiny_sd1, tiny_sd2, tiny_sdxl)
    out = convert.to_diffusers(singles[family], tmp_path / "d", config=src)
    again = convert.to_single_file(out, tmp_path / "again.safetensors", fp16=False)
    a, b = _tensors(singles[family]), _tensors(again)
    assert sorted(a) == sorted(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_ckpt_holds_the_same_tensors_and_global_step(singles, tiny_sd1, tmp_path):
    f = convert.to_single_file(tiny_sd1, tmp_path / "m.ckpt", fp16=False, ckpt=True,
                               global_step=42)
    assert f.suffix == ".ckpt"
    obj = torch.load(f, weights_only=True)
    assert obj["global_step"] == 42
    ref = _tensors(singles["sd1"])
    assert sorted(obj["state_dict"]) == sorted(ref)
    assert all(torch.equal(obj["state_dict"][k], ref[k]) for k in ref)
    info = convert.inspect(f)
    assert (info["format"], info["family"], info["global_step"]) == ("pickle", "sd1", 42)
    assert not list(tmp_path.glob(".fastsd-tmp-*"))


def test_global_step_family_and_tensor_count_recorded(singles):
    info = convert.inspect(singles["sdxl"])
    assert info["kind"] == "checkpoint" and info["family"] == "sdxl"
    assert info["global_step"] == 42 and info["precision"] == "fp32" and not info["ema"]
    assert info["tensors"] == len(load_file(singles["sdxl"]))


def test_ema_weights_are_included(tiny_sd1, tmp_path):
    src = tmp_path / "model"
    shutil.copytree(tiny_sd1, src)
    shutil.copytree(src / "unet", src / "unet_ema")
    ema_file = src / "unet_ema" / "diffusion_pytorch_model.safetensors"
    ema = {k: v + 1 for k, v in load_file(ema_file).items()}
    save_file(ema, ema_file)
    f = convert.to_single_file(src, tmp_path / "m.safetensors", fp16=False)
    sd = load_file(f)
    unet_keys = [k for k in sd if k.startswith(keymap.UNET_PREFIX)]
    ema_keys = [k for k in sd if k.startswith(keymap.EMA_PREFIX)]
    assert len(ema_keys) == len(unet_keys) == len(ema)
    k = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(sd["model_ema.diffusion_modelinput_blocks00weight"], sd[k] + 1)
    assert convert.inspect(f)["ema"]


def test_sd2_yaml_is_written_beside_the_file(singles, tiny_sd2, tmp_path):
    import yaml

    text = singles["sd2"].with_suffix(".yaml").read_text()
    cfg = yaml.safe_load(text)["model"]["params"]
    assert cfg["parameterization"] == "v"  # the tiny SD 2.x is a v-prediction model
    unet = cfg["unet_config"]["params"]
    assert unet["use_linear_in_transformer"] is True and unet["context_dim"] == 32
    assert unet["model_channels"] == 32 and unet["channel_mult"] == [1, 1, 2, 2]
    assert "FrozenOpenCLIPEmbedder" in text
    assert not singles["sd1"].with_suffix(".yaml").exists()
    # an epsilon SD 2.x model gets the plain v2-inference.yaml
    src = tmp_path / "eps"
    shutil.copytree(tiny_sd2, src)
    sched = src / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": "epsilon"}))
    f = convert.to_single_file(src, tmp_path / "eps.safetensors")
    assert "parameterization" not in yaml.safe_load(f.with_suffix(".yaml").read_text())[
        "model"]["params"]
    assert convert.inspect(f)["prediction_type"] == "epsilon"
