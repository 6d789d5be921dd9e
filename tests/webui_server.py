"""A real API server in this process on the tiny SD 1.x model, for the page and plot tests."""

from __future__ import annotations

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
