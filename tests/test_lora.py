"""LoRA training on the tiny models: only the adapters train (both stages, every family),
the kohya-layout file has exactly the keys, shapes and alphas AUTOMATIC1111, Forge and
ComfyUI read, diffusers' load_lora_weights reads it with the very output of the adapters in
memory, the merge into the base model, the web UI serving it through <lora:NAME:WEIGHT>
and the X/Y/Z plot sweeping its weight, the Hub upload, the settings and the CLI.
(Kill-and-resume of a LoRA run: test_train_resume.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hubstandin import hub  # noqa: F401  (the fixture)
from test_train_resume import make_subject_session

from fastsd.train import TrainSettings, train

RANK, ALPHA = 4, 2.0  # alpha != rank: a wrong scale (alpha / rank) shows
PROMPT = "a photo of sks toy"


def link(home: Path, family: str, folder: Path) -> None:
    (home / "models").mkdir(exist_ok=True)
    (home / "models" / f"tiny-{family}").symlink_to(folder)


FAMILIES = ["sd1", "sd2", "sdxl"]
each_family = pytest.mark.parametrize("trained", FAMILIES, indirect=True)
sd1_only = pytest.mark.parametrize("trained", ["sd1"], indirect=True)  # checked once


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory, tiny_root):
    """A LoRA trained in both stages on a tiny family: (family, session, result, the
    model parts as training left them, the base weights before training)."""
    import torch

    from fastsd.models import tiny

    family = request.param
    home = tmp_path_factory.mktemp(f"lora-{family}")
    link(home, family, tiny.ensure(family, tiny_root))
    s = make_subject_session("face", home, family=family, n=2)
    seen: dict = {}

    def keep(event, info):
        if event == "stage_start" and "base" not in seen:
            seen["base"] = {n: {k: v.clone() for k, v in m.state_dict().items()
                                if ".lora_" not in k} for n, m in info["parts"].modules().items()}
        if event == "stage_end":
            seen["parts"] = info["parts"]
    torch.manual_seed(0)
    r = train(s, TrainSettings(method="lora", rank=RANK, alpha=ALPHA, unet_steps=1,
                               text_steps=1, unet_lr=2e-2, text_lr=2e-2, checkpoint_every=0,
                               sample_every=2 if family == "sd1" else 0, sample_steps=2),
              on_event=keep)
    assert [p.name for p in r.samples] == (["step-0000002-0.png"] if family == "sd1" else [])
    return family, s, r, seen["parts"], seen["base"]


def images(pipe, seed: int = 5):
    import torch

    g = torch.Generator().manual_seed(seed)
    return pipe(PROMPT, num_inference_steps=2, height=64, width=64, generator=g,
                output_type="np").images


def base_pipe(folder: Path):
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- training


@each_family
def test_only_the_adapters_train_and_the_checkpoint_keeps_only_them(trained):
    from fastsd.train import checkpoint

    family, s, r, parts, base = trained
    assert r.model_dir is None and r.single_file is None
    assert r.lora == s.loras / "face.safetensors" and r.lora.is_file()
    assert not [p for p in s.models.iterdir() if p.name != "Lora"]  # no model written
    for name, module in parts.modules().items():
        after = {k: v for k, v in module.state_dict().items() if ".lora_" not in k}
        assert after.keys() == base[name].keys()
        assert all(after[k].equal(base[name][k]) for k in after), f"{name}: base changed"
        ups = [p for n, p in module.named_parameters() if ".lora_B." in n]
        assert ups and any(p.abs().sum() > 0 for p in ups), f"{name}: its adapters stayed 0"
        assert not any(p.requires_grad for p in module.parameters())
    ck = checkpoint.latest(s.checkpoints)
    expected = {"unet", "text_encoder"} | ({"text_encoder_2"} if family == "sdxl" else set())
    assert set(ck.tensors) == expected
    for name, sd in ck.tensors.items():
        assert all(".lora_A." in k or ".lora_B." in k for k in sd), name
    assert ck.state["settings"]["method"] == "lora" and ck.state["settings"]["rank"] == RANK


# --------------------------------------------------------------------------- the file


def sgm_blocks(unet) -> dict[str, str]:
    """diffusers' attention blocks -> the original SDXL UNet's, by walking the blocks as
    that UNet numbers them: input_blocks.0 is conv_in, then one index per layer of each
    level and one per downsampler; output_blocks one per layer (the upsampler shares the
    last one); the middle block's attention is its second module."""
    out, idx = {"mid_block.attentions.0": "middle_block.1"}, 1
    for i, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            if getattr(block, "attentions", None):
                out[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{idx}.1"
            idx += 1
        idx += 1 if block.downsamplers else 0
    idx = 0
    for i, block in enumerate(unet.up_blocks):
        for j in range(len(block.resnets)):
            if getattr(block, "attentions", None):
                out[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{idx}.1"
            idx += 1
    return out


def expected_layout(family: str, folder: Path) -> dict[str, tuple]:
    """Every key kohya's layout has for this model, with its shape: derived from the base
    model's own modules and the naming rules, not from the exporter."""
    import torch

    pipe = base_pipe(folder)
    layers: dict[str, torch.nn.Module] = {}
    blocks = sgm_blocks(pipe.unet) if family == "sdxl" else {}
    for path, module in pipe.unet.named_modules():
        if type(module).__name__ != "Transformer2DModel":
            continue
        where = blocks.get(path, path)
        for child, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear) or (isinstance(layer, torch.nn.Conv2d)
                                                      and layer.kernel_size == (1, 1)):
                layers["lora_unet_" + f"{where}.{child}".replace(".", "_")] = layer
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    names = ["lora_te1", "lora_te2"] if family == "sdxl" else ["lora_te"]
    for prefix, enc in zip(names, encoders):
        clip = getattr(enc, "text_model", enc)
        for n, block in enumerate(clip.encoder.layers):
            for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                         "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
                layers[f"{prefix}_text_model_encoder_layers_{n}_{part.replace('.', '_')}"] = \
                    block.get_submodule(part)
    out = {}
    for name, layer in layers.items():
        conv = isinstance(layer, torch.nn.Conv2d)
        i, o = (layer.in_channels, layer.out_channels) if conv else (layer.in_features,
                                                                     layer.out_features)
        tail = (1, 1) if conv else ()
        out[f"{name}.lora_down.weight"] = (RANK, i, *tail)
        out[f"{name}.lora_up.weight"] = (o, RANK, *tail)
        out[f"{name}.alpha"] = ()
    return out


@each_family
def test_the_file_has_kohyas_keys_shapes_alphas_and_metadata(trained, tiny_root):
    from safetensors import safe_open

    from fastsd.convert.detect import detect_file

    family, s, r, parts, _ = trained
    want = expected_layout(family, tiny_root / f"tiny-{family}")
    with safe_open(str(r.lora), "pt") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        alphas = {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}
        meta = f.metadata()
    assert sorted(set(got) - set(want))[:3] == [] and sorted(set(want) - set(got))[:3] == []
    assert got == want
    assert alphas == {ALPHA}
    version = {"sd1": "sd_v1", "sd2": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}[family]  # tiny sd2: v
    assert meta["ss_base_model_version"] == version and meta["ss_v2"] == str(family == "sd2")
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == (
        "networks.lora", str(RANK), f"{ALPHA:g}")
    assert meta["ss_sd_model_name"] == f"tiny-{family}" and meta["ss_resolution"] == "(64, 64)"
    assert meta["modelspec.trigger_phrase"] == "sks toy"
    assert json.loads(meta["ss_tag_frequency"]) == {"face": {"sks toy": 2}}
    assert detect_file(r.lora).kind == "lora"


@each_family
def test_diffusers_load_lora_weights_gives_the_adapters_own_output(trained, tiny_root):
    import torch

    family, s, r, parts, _ = trained
    folder = tiny_root / f"tiny-{family}"
    ours = images(parts.pipe)
    loaded = base_pipe(folder)
    plain = images(loaded)
    loaded.load_lora_weights(str(r.lora.parent), weight_name=r.lora.name)
    theirs = images(loaded)
    assert np.abs(ours - plain).max() > 1e-3, "the LoRA changes the images"
    assert np.abs(ours - theirs).max() < 1e-5
    # the text encoders' adapters were read too: same embeddings as in memory
    for mine, read in zip(parts.encoders, [loaded.text_encoder, getattr(
            loaded, "text_encoder_2", None)]):
        ids = torch.tensor([[1, 5, 9, 2] + [0] * 73])
        with torch.no_grad():
            assert torch.allclose(mine(ids)[0], read(ids)[0], atol=1e-6)


# --------------------------------------------------------------------------- SD 1.x only


@sd1_only
def test_merge_into_the_base_model_and_its_single_file(trained, tiny_root):
    import shutil

    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    from fastsd.convert.detect import detect_file
    from fastsd.train.lora_export import merge_session

    _, s, r, parts, _ = trained
    folder, single = merge_session(s, weight=1.0, precision="fp32")
    assert folder == s.models / "face-merged" and (folder / "model_index.json").is_file()
    det = detect_file(single)
    assert single.is_file() and det.kind == "checkpoint" and det.family == "sd1"
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    te = CLIPTextModel.from_pretrained(folder / "text_encoder")
    shutil.rmtree(folder)  # the later tests see the session as training left it
    single.unlink()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    h, ids = torch.randn(1, 77, 32, generator=g), torch.tensor([[1, 5, 9, 2] + [0] * 73])
    with torch.no_grad():  # the merged model computes what the base with the adapters does
        assert torch.allclose(unet(x, t, h).sample, parts.unet(x, t, h).sample, atol=1e-5)
        assert torch.allclose(te(ids)[0], parts.encoders[0](ids)[0], atol=1e-5)
    base = load_file(tiny_root / "tiny-sd1" / "unet" / "diffusion_pytorch_model.safetensors")
    merged = unet.state_dict()
    changed = [k for k in base if not merged[k].equal(base[k])]
    assert changed and all(".attentions." in k for k in changed)  # the adapted layers only


@sd1_only
def test_the_web_ui_lists_the_lora_and_the_plot_sweeps_its_weight(trained, monkeypatch):
    import requests

    from fastsd.webui import server, xyz
    from fastsd.webui.catalog import Catalog

    _, s, r, _, _ = trained
    ws = s.workspace
    # every server lists the sessions' LoRAs, where they are (not copied)
    names = {lo.name: lo.path for lo in Catalog([ws.models], server.session_loras(ws)).loras()}
    assert names == {"face": r.lora}
    assert server.with_session_lora(PROMPT, s, 0.5) == PROMPT + " <lora:face:0.5>"
    srv = server.serve("face", root=ws.root, port=0)  # the session's server: its base model
    try:
        api = f"{srv.url}/sdapi/v1"
        listed = requests.get(f"{api}/loras", timeout=30).json()
        assert [(lo["name"], lo["path"]) for lo in listed] == [("face", str(r.lora))]
        body = {"prompt": PROMPT + " <lora:face:0>", "width": 64, "height": 64, "steps": 2,
                "seed": 3, "sampler_name": "Euler",
                "script_name": "x/y/z plot",
                "script_args": [xyz.TXT2IMG_AXES.index("Prompt S/R"),
                                "<lora:face:0>, <lora:face:0.5>, <lora:face:1>", [],
                                0, "", [], 0, "", [], "True", "False", "False", "False"]}
        res = requests.post(f"{api}/txt2img", json=body, timeout=600).json()
        plain = requests.post(f"{api}/txt2img", json={k: v for k, v in body.items() if not
                                                      k.startswith("script")} | {
                                                          "prompt": PROMPT}, timeout=600).json()
    finally:
        srv.stop()
        server.shutdown()

    def arr(b64):
        import base64
        import io

        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)
    info = json.loads(res["info"])
    assert info["grids"] == 1 and len(res["images"]) == 4
    w0, w05, w1 = (arr(b) for b in res["images"][1:])
    assert np.abs(w0 - arr(plain["images"][0])).max() <= 1, "weight 0 is the base model"
    assert np.abs(w05 - w0).max() > 2 and np.abs(w1 - w05).max() > 2
    assert ["<lora:face:0.5>" in t for t in info["infotexts"][1:]] == [False, True, False]


@sd1_only
def test_upload_sends_the_lora_with_a_card_naming_the_base(trained, hub, monkeypatch):
    from fastsd.models import registry, upload

    _, s, r, _, _ = trained
    monkeypatch.setenv("HF_TOKEN", "hf_loratoken123")
    upload.upload(s, "me/face")
    sent = hub.repos["me/face"]
    assert sent["face.safetensors"] == r.lora.read_bytes()
    assert not [k for k in sent if k.endswith("model_index.json")]
    card = sent["README.md"].decode()
    assert "A DreamBooth LoRA for `tiny-sd1`" in card and "- lora" in card
    assert "<lora:face:1>" in card and 'weight_name="face.safetensors"' in card
    s.update(base_model="sdxl")  # a registry name: the card names its Hub repo
    try:
        card = upload.plan(s, "me/face").card
    finally:
        s.update(base_model="tiny-sd1")
    assert f"base_model: {registry.get('sdxl').repo}" in card


@sd1_only
def test_a_lora_session_is_chosen_as_its_base_model_and_its_lora(trained, tiny_root):
    """webui.ipynb's model cell: a session that trained a LoRA (no model) gives its base
    model and its LoRA; asked for its trained model, it says how to merge one."""
    from fastsd.errors import ModelError
    from fastsd.models.upload import trained_model
    from fastsd.webui import choice

    _, s, r, _, _ = trained
    c = choice.choose("face", root=s.workspace)
    assert c.model.resolve() == (tiny_root / "tiny-sd1").resolve() and c.lora == r.lora
    assert (c.family, c.model_name) == ("sd1", None)  # the server loads the session's own
    with pytest.raises(ModelError, match="<lora:face:1>.*'fastsd lora merge face'"):
        trained_model(s)


@sd1_only
def test_session_show_and_space_know_the_lora(trained, capsys):
    from fastsd import cli, space

    _, s, r, _, _ = trained
    assert cli.main(["session", "show", "face", "--home", str(s.workspace.root)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["method"] == "lora"
    assert shown["bytes"]["loras"] == {"face.safetensors": r.lora.stat().st_size}
    assert sum(shown["bytes"]["checkpoints"].values()) < 5 * r.lora.stat().st_size
    items = [i for i in space.usage(s.workspace) if i.kind == "LoRA"]
    assert [(i.path, i.session) for i in items] == [(r.lora, "face")]


@sd1_only
def test_more_steps_after_a_lora_say_how_to_train_it_longer(trained):
    """A further segment trains on from a whole trained model, which a LoRA run does not
    write: refused before anything loads, naming the longer run and the merge."""
    from fastsd.errors import DataError
    from fastsd.train import train

    _, s, _, _, _ = trained
    before = sorted(p.name for p in s.checkpoints.iterdir())
    with pytest.raises(DataError, match="trained a LoRA") as e:
        train(s, more_unet_steps=5)
    assert "--restart" in str(e.value) and "fastsd lora merge face" in str(e.value)
    assert sorted(p.name for p in s.checkpoints.iterdir()) == before


# --------------------------------------------------------------------------- settings


def test_lora_settings_rates_estimate_and_cli():
    from fastsd.cli import build_parser
    from fastsd.env import DeviceInfo
    from fastsd.errors import DataError
    from fastsd.train.cli import settings_from_args
    from fastsd.train.settings import drive_plan, estimate_vram_gib, resolve

    # a T4 as torch reports it: 15,828,320,256 bytes
    cpu, t4 = DeviceInfo("cpu", "x86_64"), DeviceInfo("cuda", "Tesla T4", 14.5, 14.74, (7, 5))
    s, _ = resolve(TrainSettings(method="lora"), cpu, 512)
    assert (s.unet_lr, s.text_lr) == (1e-4, 1e-5)  # LoRA's own, where none was given
    s, _ = resolve(TrainSettings(), cpu, 512)
    assert (s.unet_lr, s.text_lr) == (2e-6, 1e-6)
    assert resolve(TrainSettings(method="lora", unet_lr=3e-4), cpu, 512)[0].unet_lr == 3e-4
    with pytest.raises(DataError, match="rank"):
        TrainSettings(method="lora", rank=0)
    with pytest.raises(DataError, match="method"):
        TrainSettings(method="dora")
    args = build_parser().parse_args(["train", "S", "--method", "lora", "--rank", "8",
                                      "--alpha", "4"])
    assert settings_from_args(args) == {"method": "lora", "rank": 8, "alpha": 4.0}
    # the T4 preset: a full SDXL fine-tune does not fit, a LoRA does (an estimate)
    sdxl = {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}
    adapters = {"unet": 50_000_000, "text_encoder": 3_000_000, "text_encoder_2": 8_000_000}
    lora_t4, _ = resolve(TrainSettings(method="lora"), t4, 1024)
    full_t4, _ = resolve(TrainSettings(), t4, 1024)
    assert lora_t4.base_dtype() == "fp16" and full_t4.base_dtype() == "fp32"
    assert max(estimate_vram_gib(full_t4, "sdxl", sdxl).values()) > t4.vram_total_gib
    assert max(estimate_vram_gib(lora_t4, "sdxl", sdxl, adapters).values()) < t4.vram_total_gib
    # Drive: checkpoints of the adapters, one LoRA file, no model folder
    full = drive_plan(full_t4, sdxl, 83_653_863)
    lora = drive_plan(lora_t4, sdxl, 83_653_863, adapters=adapters)
    assert lora.model == lora.single_file == 0 and lora.lora == 61_000_000 * 2
    assert lora.total * 50 < full.total and "LoRA file" in lora.describe()


def test_a_16_bit_base_trains_fp32_adapters(workspace, tiny_sd1):
    """Mixed precision (bf16 here, the CPU's; fp16 on a T4): the frozen base is loaded in
    16 bits, the VAE in fp32, the adapters and their optimizer state in fp32; the class
    images are made by that 16-bit base and fp32 VAE."""
    import torch

    from fastsd.train import checkpoint

    link(workspace, "sd1", tiny_sd1)
    s = make_subject_session("half", workspace, n=2)
    seen = {}

    def keep(event, info):
        if event == "stage_end":
            p = info["parts"]
            seen[info["stage_name"]] = (
                {p_.dtype for n, p_ in p.unet.named_parameters() if ".lora_" not in n},
                {p_.dtype for n, p_ in p.unet.named_parameters() if ".lora_" in n},
                {p_.dtype for p_ in p.vae.parameters()})
    r = train(s, TrainSettings(method="lora", mixed_precision="bf16", rank=RANK, unet_steps=1,
                               text_steps=1, checkpoint_every=0, prior_preservation=True,
                               class_images=1, class_steps=1), on_event=keep)
    assert len(list((s.path / "class_images").rglob("*.png"))) == 1  # by the 16-bit base
    assert seen["unet"] == ({torch.bfloat16}, {torch.float32}, {torch.float32})
    assert all(np.isfinite(r.losses)) and r.lora.is_file()
    opt = checkpoint.latest(s.checkpoints).object("optimizer")
    assert {t.dtype for st in opt["state"].values() for t in st.values() if t.dim()} == {
        torch.float32}
