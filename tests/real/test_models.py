"""The full-size models are the real architectures, stored as a user's download is."""

from __future__ import annotations

import pytest

from fastsd.convert.detect import detect_folder
from fastsd.convert.tensors import open_tensors
from fastsd.models import full, registry

PREDICTION = {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon"}


@pytest.mark.parametrize("family", full.FAMILIES)
def test_every_parameter_count_is_the_registrys(full_models, family):
    """The registry's parameter counts were taken from the real models; a full-size model
    built from the configs written in models/full.py has exactly as many, per component,
    and is stored as the registry downloads it (fp16, the VAE override fp32)."""
    folder = full_models[family]
    entry = registry.get(full.NAMES[family])
    counts, dtypes = {}, {}
    for comp in entry.params:
        for f in folder.glob(f"{comp}/*.safetensors"):
            with open_tensors(f) as tf:
                counts[comp] = sum(_numel(tf.info(k).shape) for k in tf.keys())
                dtypes[comp] = {tf.info(k).dtype for k in tf.keys()}
    assert counts == entry.params
    assert all(d == {"F16"} for d in dtypes.values()), dtypes
    det = detect_folder(folder)
    assert (det.family, det.prediction_type, det.kind) == (family, PREDICTION[family],
                                                           "checkpoint")
    meta = full.record(folder)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert meta["bytes"] == pytest.approx(size, rel=0.001)
    assert size == pytest.approx(entry.download_gb * 1e9, rel=0.12)  # as big as the download
    print(f"\n{family}: built in {meta['build_s']} s, {meta['bytes'] / 1e9:.2f} GB on disk")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
