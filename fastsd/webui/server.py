"""The web UI's server in this process: the one worker, the API server on it
(:func:`serve`), and the notebook's :func:`generate`. (To run it as its own process, in
the background of a cell: :mod:`fastsd.webui.start`.)

A process has one worker (it owns the device): :func:`worker_for` makes it or reuses it,
so a notebook that runs :func:`generate` and :func:`serve` side by side drives one
pipeline through one queue.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastsd import models, options, session as sessions
from fastsd.errors import FastSDError, ModelError
from fastsd.webui import controlnet
from fastsd.webui.api import ServerInfo, create_app
from fastsd.webui.auth import DEFAULT_PORT, DEFAULT_USER, BasicAuth, generate_password, required
from fastsd.webui.catalog import SINGLE_SUFFIXES, Catalog, Checkpoint
from fastsd.webui.engine import Engine
from fastsd.webui.memory import MemoryPolicy
from fastsd.webui.outputs import Outputs
from fastsd.webui.params import GenerationParams
from fastsd.webui.worker import DEFAULT_MAX_QUEUE, Worker
from fastsd.workspace import Workspace

log = logging.getLogger("fastsd")

_lock = threading.Lock()
_current: dict[str, Any] = {}  # the process's worker, and what it was made for


def _session(session, root: Path | None):
    if session is None or isinstance(session, sessions.Session):
        return session
    return sessions.load(str(session), root)


def trained_model(session: sessions.Session) -> Path | None:
    """The newest diffusers model the trainer wrote under the session's models/."""
    found = sorted((p.parent for p in Path(session.models).glob("*/model_index.json")),
                   key=lambda p: (p / "model_index.json").stat().st_mtime)
    return found[-1] if found else None


def session_loras(ws: Workspace) -> list[Path]:
    """Where the workspace's sessions keep their trained LoRAs (listed by every server)."""
    out = []
    for name in sessions.list_sessions(ws):
        try:
            out.append(sessions.load(name, ws).loras)
        except FastSDError as e:  # a damaged session lists nothing, and says why
            log.warning("Not listing the LoRAs of session %s: %s", name, e)
    return out


def lora_tag(name: str, weight: float = 1.0) -> str:
    """AUTOMATIC1111's prompt syntax for a LoRA at ``weight``."""
    return f"<lora:{name}:{weight:g}>"


def with_session_lora(prompt: str, session, weight: float = 1.0) -> str:
    """``prompt`` with the session's trained LoRA at ``weight`` added (unchanged when the
    session trained no LoRA, or the prompt already names it)."""
    s = _session(session, None)
    lora = s.lora() if s is not None else None
    if lora is None or f"<lora:{lora.stem}:" in prompt:
        return prompt
    return f"{prompt} {lora_tag(lora.stem, weight)}".strip()


def _model_path(model: str, ws: Workspace) -> Path:
    path = Path(model).expanduser()
    if path.is_file() and path.suffix in SINGLE_SUFFIXES:
        return path  # listed as a single file; the engine converts it through the resolver
    return models.resolve_model(model, ws)


def default_checkpoint(catalog: Catalog, session, model: str | None,
                       ws: Workspace) -> Checkpoint:
    """What to load first: ``model`` when given, else the session's trained model, else the
    session's base model."""
    if model:
        try:
            return catalog.find(model)
        except ModelError:
            return catalog.add(_model_path(model, ws))
    if session is None:
        raise ModelError("Name a model (--model) or a session (--session) to generate with.")
    trained = trained_model(session)
    if trained is None:
        lora = session.lora()
        if lora is not None:
            log.info("Session %s trained a LoRA: its base model %s is loaded; put %s in a "
                     "prompt to use it", session.name, session.base_model, lora_tag(lora.stem))
        else:
            log.warning("Session %s has no trained model yet; using its base model %s",
                        session.name, session.base_model)
        return catalog.add(models.base_model(session))
    return catalog.find(trained.name) if any(c.folder == trained for c in
                                              catalog.checkpoints()) else catalog.add(trained)


def worker_for(session=None, model: str | None = None, root: Workspace | Path | None = None,
               policy: MemoryPolicy | None = None,
               max_queue: int = DEFAULT_MAX_QUEUE) -> tuple[Worker, Outputs]:
    """The process's worker, made (or remade for another session) and loaded with the
    default model, and where its images are saved."""
    s = _session(session, root)
    ws = s.workspace if s else Workspace.current(root)
    folders = ([Path(s.models)] if s else []) + [ws.models]
    key = (tuple(folders), policy, max_queue)
    with _lock:
        worker = _current.get("worker")
        if worker is not None and _current.get("key") != key:
            worker.stop()
            worker.engine.unload()
            worker = None
        if worker is None:
            engine = Engine(Catalog(folders, session_loras(ws)), policy, workspace=ws)
            worker = Worker(engine, max_queue)
            _current.update(worker=worker, key=key,
                            outputs=Outputs(Path(s.outputs) if s else ws.root / "outputs"))
        outputs = _current["outputs"]
    engine = worker.engine
    if model or not engine.loaded:
        ckpt = default_checkpoint(engine.catalog, s, model, ws)
        if ckpt is not engine.checkpoint or not engine.loaded:
            worker.run(lambda e, _c: e.load(ckpt), "load model")
    return worker, outputs


def shutdown() -> None:
    """Stop the process's worker and free the device."""
    with _lock:
        worker = _current.pop("worker", None)
        _current.clear()
    if worker is not None:
        worker.stop()
        worker.engine.unload()


# --------------------------------------------------------------------------- server


@dataclass
class Server:
    """A uvicorn server in a background thread. ``url`` once started; :meth:`stop` ends it."""

    app: Any
    host: str
    port: int
    auth: BasicAuth | None = None
    _server: Any = None
    _thread: threading.Thread | None = None

    def start(self, timeout: float = 60.0) -> "Server":
        import uvicorn

        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning",
                                timeout_keep_alive=30, access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fastsd-server",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise FastSDError(f"The server could not start on {self.host}:{self.port} "
                                  f"(is the port in use?). Choose another: "
                                  f"{options.say('port')}.")
            if time.monotonic() > deadline:
                self.stop()
                raise FastSDError(f"The server did not start within {timeout:.0f}s.")
            time.sleep(0.02)
        sock = self._server.servers[0].sockets[0]
        self.port = sock.getsockname()[1]
        return self

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 30.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C stops it)."""
        try:
            while self._thread is not None and self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:
            self.stop()
            raise

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(session=None, model: str | None = None, *, listen: bool = False,
          port: int = DEFAULT_PORT, user: str | None = None, password: str | None = None,
          tunnel: bool = False, root: Workspace | Path | None = None,
          policy: MemoryPolicy | None = None,
          max_queue: int = DEFAULT_MAX_QUEUE, page: bool = False) -> Server:
    """Start the API server in the background and return it (``port=0``: any free port).

    With ``page`` the web page (fastsd.webui.page) is served at / behind the same auth.
    Auth is on whenever ``listen`` (all interfaces) or ``tunnel``, or when a password is
    given; with no password one is generated: read it from ``server.auth.password`` and
    show it to the user (it is never logged).
    """
    s = _session(session, root)
    worker, outputs = worker_for(s, model, root, policy, max_queue)
    host = "0.0.0.0" if listen else "127.0.0.1"
    auth = None
    if required(host, tunnel) or password:
        if user is not None and not user:
            raise FastSDError(f"The user name is empty: {options.say('user')}, or leave it "
                              "out.")
        auth = BasicAuth(user or DEFAULT_USER, password or generate_password())
    app = create_app(worker, outputs=outputs, auth=auth,
                     server=ServerInfo(host, port, s.name if s else None))
    page_api = None
    if page:
        from fastsd.webui import page as web_page

        try:
            api = web_page.Api("", (auth.username, auth.password) if auth else None)
            web_page.mount(app, api, outputs.root, title=f"fastsd: {s.name}" if s else "fastsd")
            page_api = api
        except ImportError as e:
            log.warning("The web page needs gradio (%s); serving the API only. Run the "
                        "install cell to get it.", e)
    server = Server(app, host, port, auth).start()
    if page_api is not None:
        page_api.base = server.url  # the page calls the API through loopback
    log.info("fastsd API on %s/sdapi/v1 (%s)", server.url,
             "HTTP Basic auth on" if auth else "localhost only, no auth")
    return server


# --------------------------------------------------------------------------- notebook


def _show(images: list) -> None:
    from fastsd import env

    if env.runtime() == "script":
        return
    from IPython.display import display

    display(*images)


def generate(prompt: str = "", session=None, model: str | None = None, *,
             root: Workspace | Path | None = None, show: bool = True, save: bool = True,
             **settings: Any) -> list:
    """Generate in-process from a session's trained model (or ``model``) and return the
    PIL images; in a notebook they are shown in the cell.

    ``settings`` are A1111's field names (negative_prompt, width, height, steps,
    cfg_scale, sampler_name, scheduler, seed, batch_size, n_iter, init_images, mask,
    enable_hr, hr_scale, refiner_checkpoint, ...); ``controlnet`` is a list of units, each
    a dict of the ControlNet extension's fields (model, module, image as a PIL image,
    weight, ...).
    Width and height default to the model's native size. Images go to the session's
    outputs/ like the API's. ``images[i].info["parameters"]`` holds each one's infotext.
    """
    from fastsd.webui.api import encode_result

    s = _session(session, root)
    worker, outputs = worker_for(s, model, root)
    size = worker.engine.native_size
    settings.setdefault("width", size)
    settings.setdefault("height", size)
    if settings.get("controlnet"):
        settings["controlnet"] = controlnet.units(settings["controlnet"],
                                                  bool(settings.get("init_images")))
    try:
        params = GenerationParams(prompt=prompt, **settings).validate()
    except TypeError as e:
        raise FastSDError(f"Unknown setting: {e}. Use A1111's field names, e.g. steps, "
                          "cfg_scale, sampler_name, seed, batch_size.") from None
    result = worker.run(lambda e, c: e.generate(params, c), "generate", params.steps,
                        params.n_iter)
    if save:
        encode_result(result, outputs, params.mode)
    for im, text in zip(result.images, result.infotexts):
        im.info["parameters"] = text
    if show:
        _show(result.images)
    return result.images
