"""Conversion at real size: diffusers folder -> single .safetensors -> diffusers folder,
every tensor exact (fp16 stays fp16), and the single file loaded by the engine through
the one model resolver (converted once into the workspace), as a downloaded file is."""

from __future__ import annotations

import numpy as np
import pytest

from realsize import cache_configs, cpu_compute, t4_policy

from fastsd.convert.tensors import open_tensors
from fastsd.models import full

FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2")


def same_tensors(a, b) -> list[str]:
    """Names of the tensors of folder ``a`` that differ in folder ``b`` (one at a time)."""
    bad = []
    for comp in FOLDERS:
        fa, fb = sorted(a.glob(f"{comp}/*.safetensors")), sorted(b.glob(f"{comp}/*.safetensors"))
        if not fa:
            continue
        assert fb, f"{comp} is missing after the round trip"
        with open_tensors(fa[0]) as ta, open_tensors(fb[0]) as tb:
            assert set(tb.keys()) >= set(ta.keys()) - {"text_model.embeddings.position_ids"}
            for k in ta.keys():
                if k in tb:
                    t = tb.read(k)
                    if not ta.read(k).to(t.dtype).equal(t):  # the fp32 VAE went through fp16
                        bad.append(f"{comp}.{k}")
    return bad


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_single_file_round_trip_and_the_engine_loads_the_file(full_models, family, workspace,
                                                               tmp_path):
    from fastsd.convert import inspect, to_diffusers, to_single_file
    from fastsd.webui.catalog import Catalog
    from fastsd.webui.engine import Engine
    from fastsd.webui.params import GenerationParams

    src = full_models[family]
    single = to_single_file(src, workspace / f"{family}.safetensors")  # fp16, like a download
    info = inspect(single)
    assert (info["family"], info["precision"]) == (family, "fp16")
    back = to_diffusers(single, tmp_path / "back", config=src)
    assert same_tensors(src, back) == []
    for f in back.glob("*/*.safetensors"):  # an fp16 file stays fp16
        with open_tensors(f) as tf:
            assert {tf.info(k).dtype for k in tf.keys()} == {"F16"}, f
    del back

    cache_configs(workspace, family, src)  # what a first online run leaves in the Hub cache
    catalog = Catalog([workspace])
    engine = Engine(catalog, t4_policy(src), device="cpu")
    ckpt = engine.load(single.name)
    assert ckpt.file == single and engine.family == family
    cpu_compute(engine.pipeline("txt2img"))
    r = engine.generate(GenerationParams(prompt="sks", width=256, height=256, steps=1,
                                         cfg_scale=1.0, seed=3))
    assert np.asarray(r.images[0], dtype=np.float32).std() > 1.0
