import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from fastsd import models
from fastsd.errors import ModelError
from fastsd.models import tiny


def weights(path):
    out = {}
    for f in sorted(path.rglob("*.safetensors")):
        out.update({f"{f.parent.name}/{k}": v for k, v in load_file(f).items()})
    return out


def test_each_family_generates_a_64px_image(tiny_model):
    family, path = tiny_model
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    image = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0


def test_each_family_is_small_and_has_the_real_layout(tiny_model):
    family, path = tiny_model
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 20 * 1024**2
    w = weights(path)
    # Real SD tensor names, with the real block layout.
    assert "unet/down_blocks.0.resnets.1.conv2.weight" in w
    assert "vae/encoder.down_blocks.3.resnets.1.conv2.weight" in w
    # transformers 5 saves CLIPTextModel without the "text_model." prefix; older ones with it.
    assert any(k.startswith("text_encoder/") and k.endswith(
        "encoder.layers.0.self_attn.q_proj.weight") for k in w)
    index = (path / "model_index.json").read_text()
    if family == "sdxl":
        assert "StableDiffusionXLPipeline" in index
        assert "text_encoder_2/text_projection.weight" in w
        assert "unet/add_embedding.linear_1.weight" in w
        assert "unet/down_blocks.2.attentions.0.transformer_blocks.1.attn2.to_k.weight" in w
    else:
        assert "StableDiffusionPipeline" in index
        assert "unet/down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight" in w
        assert "unet/up_blocks.3.attentions.2.proj_out.weight" in w


@pytest.mark.parametrize("family, prediction, act", [
    ("sd1", "epsilon", "quick_gelu"), ("sd2", "v_prediction", "gelu"),
    ("sdxl", "epsilon", "quick_gelu")])
def test_family_configs(family, prediction, act, tiny_root):
    pipe = DiffusionPipeline.from_pretrained(tiny.ensure(family, tiny_root),
                                             local_files_only=True)
    assert pipe.scheduler.config.prediction_type == prediction
    assert pipe.text_encoder.config.hidden_act == act
    assert pipe.unet.config.use_linear_projection == (family != "sd1")
    if family == "sdxl":
        assert pipe.text_encoder_2.config.hidden_act == "gelu"
        assert pipe.unet.config.cross_attention_dim == (
            pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size)


def test_builds_are_deterministic_from_the_seed(tmp_path):
    a = weights(tiny.build("sd1", tmp_path / "a", seed=3))
    b = weights(tiny.build("sd1", tmp_path / "b", seed=3))
    c = weights(tiny.build("sd1", tmp_path / "c", seed=4))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["unet/conv_in.weight"], c["unet/conv_in.weight"])


def test_tokenizer_works_offline(tiny_sd1):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_sd1 / "tokenizer", local_files_only=True)
    ids = tok("A photo of sks dog, 42 Zebras!").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of sks dog , 4 2 zebras !"
    padded = tok("dog", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77


def test_ensure_reuses_and_resolve_names(tmp_path, workspace):
    first = tiny.ensure("sd2", tmp_path)
    stamp = (first / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert tiny.ensure("sd2", tmp_path) == first
    assert (first / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    assert models.resolve_model(str(first)) == first
    assert models.resolve_model("tiny-sd1") == workspace / "models" / "tiny-sd1"
    with pytest.raises(ModelError, match="diffusers folder"):
        models.resolve_model("not a model")
    with pytest.raises(ModelError, match="Unknown tiny"):
        tiny.build_pipeline("sd3")
