"""The web UI's server side: a generation engine with one job queue, and an
AUTOMATIC1111-compatible HTTP API (FastAPI + uvicorn).

* :func:`generate` makes images in-process (a notebook cell) through the same engine.
* :func:`serve` starts the API server on a session's trained model (or any model).
* :func:`with_session_lora` adds a session's trained LoRA to a prompt
  (``<lora:NAME:WEIGHT>``, which both read).
* :func:`fastsd.webui.api.create_app` builds the FastAPI app around a worker;
  :class:`fastsd.webui.auth.BasicAuth` and :class:`~fastsd.webui.auth.AuthMiddleware`
  guard it and anything mounted on it.

Heavy imports (torch, diffusers, fastapi) happen on first use.
"""

from __future__ import annotations

__all__ = ["generate", "serve", "shutdown", "with_session_lora"]


def __getattr__(name: str):
    if name in __all__:
        from fastsd.webui import server

        return getattr(server, name)
    raise AttributeError(name)
