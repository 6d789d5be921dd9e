"""A real API server in this process on the tiny SD 1.x model, for the page and plot tests,
and what the API tests share: one torch thread, images as arrays and as base64 PNG."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

USER, PASSWORD = "artist", "pw"


@pytest.fixture
def server(tiny_sd1, workspace):
    from fastsd.webui.server import serve, shutdown

    s = serve(model=str(tiny_sd1), port=0, user=USER, password=PASSWORD,
              root=workspace, page=True)
    yield s
    s.stop()
    shutdown()


@pytest.fixture(scope="module")
def one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the 2 shared cores: threads fight and run 10x slower
    yield
    torch.set_num_threads(n)


def arr(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def b64png(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
