"""The AUTOMATIC1111-compatible HTTP API, under /sdapi/v1, as a FastAPI app.

:func:`create_app` builds the app around a :class:`~fastsd.webui.worker.Worker` (which
owns the engine and the device). Field names and response shapes are A1111's, so its
clients (the ``webuiapi`` package, Krita and Photoshop plugins, bots) work unchanged.

Another part of fastsd (the web page) mounts itself on the same app, behind the same auth::

    app = create_app(worker, outputs=Outputs(session.outputs), auth=BasicAuth("me", "pw"))
    gr.mount_gradio_app(app, blocks, path="/")   # guarded by the same AuthMiddleware

Bodies are parsed here, not by pydantic, so that every bad value gets a 422 whose
``detail`` names the field (fastsd.webui.params holds the rules) and unknown fields are
accepted and listed in ``info["ignored_fields"]``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from fastsd import __version__
from fastsd.errors import FastSDError, ModelError, OutOfMemory
from fastsd.webui import controlnet, infotext, samplers, xyz
from fastsd.webui.auth import DEFAULT_PORT, AuthMiddleware, BasicAuth
from fastsd.webui.engine import GenerationFailed, Result
from fastsd.webui.memory import MemoryPolicy
from fastsd.webui.outputs import Outputs
from fastsd.webui.params import GenerationParams, InvalidRequest, decode_image, from_request
from fastsd.webui.worker import QueueFull, Worker

log = logging.getLogger("fastsd")

PREFIX = "/sdapi/v1"
MAX_BODY = 64 << 20  # bytes
MEMORY_OPTIONS = {f"fastsd_{k}": k for k in MemoryPolicy.field_names()}


@dataclass
class ServerInfo:
    """What /cmd-flags reports about how the server was started (never a secret)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    session: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _error(status: int, e: BaseException | str, kind: str | None = None):
    msg = str(e)
    return JSONResponse({"error": kind or type(e).__name__, "detail": msg, "body": "",
                         "errors": msg}, status_code=status)


def status_of(e: BaseException) -> int:
    """The HTTP status a fastsd error maps to."""
    if isinstance(e, InvalidRequest):
        return 422
    if isinstance(e, QueueFull):
        return 503
    if isinstance(e, (OutOfMemory, GenerationFailed)):
        return 500
    if isinstance(e, ModelError):
        return 422
    return 500


def encode_result(result: Result, outputs: Outputs | None, mode: str) -> tuple[list[str],
                                                                              list[str]]:
    """PNG bytes (with infotext) of each image, saved under ``outputs`` (atomically, before
    the response), and their base64. Returns (base64 images, saved paths)."""
    pngs = [infotext.png_bytes(im, text) for im, text in zip(result.images, result.infotexts)]
    saved: list[str] = []
    if outputs is not None and pngs:
        paths = outputs.reserve(mode, result.seeds)
        saved = [str(p) for p in outputs.write(paths, pngs)]
    return [base64.b64encode(b).decode() for b in pngs], saved


def create_app(worker: Worker, *, outputs: Outputs | None = None, auth: BasicAuth | None = None,
               server: ServerInfo | None = None):
    """The FastAPI app of the API; every route needs ``auth`` when it is given."""
    server = server or ServerInfo()
    app = FastAPI(title="fastsd", version=__version__,
                  description="AUTOMATIC1111-compatible API of fastsd's generation engine.")
    app.state.worker = worker
    app.state.outputs = outputs
    app.state.auth = auth
    options: dict[str, Any] = {"samples_format": "png", "CLIP_stop_at_last_layers": 1,
                               "sd_vae": "Automatic", "live_previews_enable": True,
                               "outdir_samples": str(outputs.root) if outputs else ""}
    app.state.options = options
    engine = worker.engine

    async def body_of(request: Request) -> Any:
        size = int(request.headers.get("content-length") or 0)
        if size > MAX_BODY:
            raise InvalidRequest(f"The request body is {size:,} bytes; the limit is "
                                 f"{MAX_BODY:,}.")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise InvalidRequest(f"The request body is over the limit of {MAX_BODY:,} bytes.")
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidRequest(f"The request body is not valid JSON: {e}.") from None

    async def wait(future) -> Any:
        return await asyncio.wrap_future(future)

    async def generate(request: Request, img2img: bool):
        try:
            body = await body_of(request)
            plot, body = await run_in_threadpool(xyz.script_of, body, img2img)
            units, body, cn_ignored = await run_in_threadpool(controlnet.split, body, img2img)
            params, ignored = await run_in_threadpool(from_request, body, img2img)
            params.controlnet = units
            ignored = sorted(ignored + cn_ignored)
            if plot is None:
                job = worker.submit(lambda e, c: e.generate(params, c),
                                    "img2img" if img2img else "txt2img", params.steps,
                                    params.n_iter)
            else:
                job = worker.submit(lambda e, c: xyz.run_job(e, c, plot, params),
                                    xyz.SCRIPT_NAME, params.steps, xyz.count(plot))
            result: Result = await wait(job)
            images, saved = await run_in_threadpool(encode_result, result, outputs, params.mode)
        except FastSDError as e:
            return _error(status_of(e), e)
        info = {**result.info, "ignored_fields": ignored, "warnings": result.warnings,
                "interrupted": result.interrupted, "saved_files": saved}
        echo = {k: v for k, v in body.items() if k not in ("init_images", "mask")}
        if units:
            echo["alwayson_scripts"] = {**echo.get("alwayson_scripts", {}), "controlnet": {
                "args": [{**u.__dict__, "image": None} for u in units]}}
        if img2img:
            echo.update(init_images=None, mask=None)
        return {"images": images, "parameters": echo, "info": json.dumps(info)}

    @app.post(f"{PREFIX}/txt2img")
    async def txt2img(request: Request):
        return await generate(request, False)

    @app.post(f"{PREFIX}/img2img")
    async def img2img(request: Request):
        return await generate(request, True)

    @app.get(f"{PREFIX}/progress")
    async def progress(skip_current_image: bool = False):
        return await run_in_threadpool(worker.progress, not skip_current_image)

    @app.post(f"{PREFIX}/interrupt")
    async def interrupt():
        worker.interrupt()
        return {}

    @app.post(f"{PREFIX}/skip")
    async def skip():
        worker.skip()
        return {}

    def current_options() -> dict[str, Any]:
        ck = engine.checkpoint
        policy = engine.applied.to_dict() if engine.applied else {}
        return {**options, "sd_model_checkpoint": ck.title if ck else None,
                "sd_checkpoint_hash": ck.hash if ck else None,
                **{k: policy.get(v, getattr(engine.policy, v)) for k, v in MEMORY_OPTIONS.items()}}

    @app.get(f"{PREFIX}/options")
    async def get_options():
        return current_options()

    @app.post(f"{PREFIX}/options")
    async def set_options(request: Request):
        try:
            body = await body_of(request)
            if not isinstance(body, dict):
                raise InvalidRequest("The options must be a JSON object.")
            memory = {}
            for key, field_name in MEMORY_OPTIONS.items():
                if key in body:
                    v = body[key]
                    if v is not None and not isinstance(v, bool):
                        raise InvalidRequest(f"{key} must be true, false or null (automatic).")
                    memory[field_name] = v
            name = body.get("sd_model_checkpoint")
            target = None
            if name is not None:
                if not isinstance(name, str):
                    raise InvalidRequest("sd_model_checkpoint must be a string.")
                target = engine.catalog.find(name)  # a name from the list, never a path
            current = engine.checkpoint
            if memory or (target is not None and target is not current):
                def switch(e, _c):
                    if memory:
                        from dataclasses import replace

                        e.policy = replace(e.policy, **memory)
                    return e.load(target or current)
                await wait(worker.submit(switch, "load model"))
        except FastSDError as e:
            return _error(status_of(e), e)
        options.update({k: v for k, v in body.items()
                        if k not in MEMORY_OPTIONS and k not in ("sd_model_checkpoint",
                                                                 "sd_checkpoint_hash")})
        return None

    @app.get(f"{PREFIX}/sd-models")
    async def sd_models():
        return [c.to_api() for c in engine.catalog.checkpoints()]

    @app.post(f"{PREFIX}/refresh-checkpoints")
    async def refresh_checkpoints():
        await run_in_threadpool(engine.catalog.refresh)
        return None

    @app.get(f"{PREFIX}/loras")
    async def loras():
        return [lo.to_api() for lo in engine.catalog.loras()]

    @app.post(f"{PREFIX}/refresh-loras")
    async def refresh_loras():
        await run_in_threadpool(engine.catalog.refresh)
        return None

    @app.get(f"{PREFIX}/samplers")
    async def get_samplers():
        return samplers.api_samplers()

    @app.get(f"{PREFIX}/schedulers")
    async def get_schedulers():
        return samplers.api_schedulers()

    @app.get(f"{PREFIX}/cmd-flags")
    async def cmd_flags():
        return {"listen": server.host not in ("127.0.0.1", "localhost", "::1"),
                "port": server.port, "api": True, "api_auth": auth is not None,
                "session": server.session, "max_queue": worker.max_queue,
                "fastsd": __version__, **server.extra}

    @app.get(f"{PREFIX}/memory")
    async def get_memory():
        return await run_in_threadpool(memory_report, engine)

    @app.post(f"{PREFIX}/png-info")
    async def png_info(request: Request):
        try:
            body = await body_of(request)
            if not isinstance(body, dict) or "image" not in body:
                raise InvalidRequest("png-info needs {\"image\": base64 PNG}.")
            img = await run_in_threadpool(decode_image, body["image"], "image")
        except FastSDError as e:
            return _error(status_of(e), e)
        text, items = infotext.read_png(img)
        return {"info": text, "items": items, "parameters": infotext.parse(text) if text else {}}

    @app.get(f"{PREFIX}/scripts")
    async def scripts():
        # "controlnet m2m" is how clients (webuiapi) tell that the ControlNet extension is
        # there; webuiapi then clears its units between calls, as it must.
        listed = [xyz.SCRIPT_NAME, controlnet.SCRIPT, "controlnet m2m", "refiner"]
        return {"txt2img": listed, "img2img": listed}

    # ------------------------------------------------------------ the ControlNet extension's

    @app.get("/controlnet/version")
    async def controlnet_version():
        return {"version": controlnet.API_VERSION}

    @app.get("/controlnet/model_list")
    async def controlnet_models(update: bool = True):
        if update:
            await run_in_threadpool(engine.catalog.refresh)
        return {"model_list": [c.title for c in engine.catalog.controlnets(engine.tiny)]}

    @app.get("/controlnet/module_list")
    async def controlnet_modules(alias_names: bool = False):
        return {"module_list": list(controlnet.MODULES),
                "module_detail": {n: m.to_api() for n, m in controlnet.MODULES.items()}}

    @app.get("/controlnet/settings")
    async def controlnet_settings():
        return {"control_net_unit_count": controlnet.MAX_UNITS}

    @app.post("/controlnet/detect")
    async def controlnet_detect(request: Request):
        try:
            body = await body_of(request)
            maps = await run_in_threadpool(controlnet.detect_request, body)
        except FastSDError as e:
            return _error(status_of(e), e)
        return {"images": [base64.b64encode(infotext.png_bytes(m, None)).decode()
                           for m in maps], "info": "Success"}

    @app.get(f"{PREFIX}/sd-vae")
    async def sd_vae():
        return []

    @app.get(f"{PREFIX}/embeddings")
    async def embeddings():
        return {"loaded": {}, "skipped": {}}

    @app.exception_handler(FastSDError)
    async def fastsd_error(_request, e: FastSDError):
        return _error(status_of(e), e)

    @app.exception_handler(Exception)
    async def any_error(_request, e: Exception):
        log.exception("Request failed")
        return JSONResponse({"error": type(e).__name__, "detail": str(e)[:500]}, 500)

    if auth is not None:
        app.add_middleware(AuthMiddleware, auth=auth)
    return app


def memory_report(engine) -> dict[str, Any]:
    """/sdapi/v1/memory: RAM, and CUDA's when there is a GPU."""
    import psutil

    vm = psutil.virtual_memory()
    out: dict[str, Any] = {"ram": {"free": vm.available, "used": vm.total - vm.available,
                                   "total": vm.total}}
    try:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            s = torch.cuda.memory_stats()
            out["cuda"] = {
                "system": {"free": free, "used": total - free, "total": total},
                "active": {"current": s.get("active_bytes.all.current", 0),
                           "peak": s.get("active_bytes.all.peak", 0)},
                "allocated": {"current": s.get("allocated_bytes.all.current", 0),
                              "peak": s.get("allocated_bytes.all.peak", 0)},
                "reserved": {"current": s.get("reserved_bytes.all.current", 0),
                             "peak": s.get("reserved_bytes.all.peak", 0)},
                "events": {"retries": s.get("num_alloc_retries", 0),
                           "oom": s.get("num_ooms", 0)}}
        else:
            out["cuda"] = {"error": "no CUDA device"}
    except ImportError:
        out["cuda"] = {"error": "torch is not installed"}
    return out


__all__ = ["create_app", "BasicAuth", "AuthMiddleware", "ServerInfo", "GenerationParams",
           "encode_result"]
