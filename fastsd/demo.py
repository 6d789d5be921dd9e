"""`fastsd demo`: the main job end to end on an embedded tiny model, offline.

It walks the same steps a notebook user walks, through the same functions, on a tiny
random model and scikit-image's bundled photographs. Each step is one function below.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from fastsd import models, session
from fastsd.dataset import samples
from fastsd.workspace import Workspace

log = logging.getLogger("fastsd")

DEMO_SUBJECT = ("chelsea", "astronaut", "coffee", "rocket")


def step_session(root: Workspace | Path, name: str, family: str) -> session.Session:
    if name in session.list_sessions(root):
        session.delete(name, root, confirm=True)
    s = session.create(name, root, base_model=f"tiny-{family}", instance_token="sks",
                       class_word="cat", resolution=64)
    log.info("Session %s at %s", s.name, s.path)
    return s


def step_images(s: session.Session, source: Path) -> None:
    """Import the photographs, crop them to the session's resolution and give each a
    template caption ("sks cat"), so the later steps have captions (dataset)."""
    from fastsd.dataset import captions, crop, images

    report = images.import_images(s, source)
    log.info("Import report:\n%s", report.to_text())
    record = crop.crop_session(s)
    log.info("Cropped %d images to %d px (%s)", len(record), s.settings["resolution"],
             ", ".join(f"{k}: {v['focus']}" for k, v in record.items()))
    log.info("Wrote %d template captions", captions.set_all(s))


def step_captions(s: session.Session) -> None:
    """Caption the images with a tiny Kosmos-2 and re-crop around the subject boxes (caption).

    The tiny model is random, so its captions are gibberish (the template still adds the
    token and class word) and it rarely grounds a phrase; the real model's boxes drive
    the crop through this same call.
    """
    from fastsd.kosmos import CaptionSettings, caption_session
    from fastsd.models import tiny_kosmos

    results = caption_session(s, CaptionSettings(model=tiny_kosmos.NAME, max_new_tokens=16),
                              s.workspace)
    boxed = sum(r.subject_box is not None for r in results)
    log.info("Captioned %d images (%d with a subject box), e.g. %r", len(results), boxed,
             results[0].text if results else "")


def step_train(s: session.Session) -> None:
    """Train a few steps of each stage on the tiny model (train)."""
    from fastsd.train import TrainSettings, train

    r = train(s, TrainSettings(unet_steps=4, text_steps=2, unet_lr=1e-4, text_lr=5e-5,
                               checkpoint_every=2, sample_every=6, sample_steps=4,
                               flip=True))
    log.info("Trained %d steps (final loss %.3f): model %s, loss curve %s, samples %s",
             r.global_step, r.losses[-1], r.model_dir, r.loss_curve,
             ", ".join(p.name for p in r.samples))


def step_convert(s: session.Session) -> None:
    """Check the trainer's single file and load it back through diffusers (convert)."""
    from fastsd.convert import inspect, to_diffusers, to_single_file

    trained = sorted((p.parent for p in s.models.glob("*/model_index.json")),
                     key=lambda p: p.stat().st_mtime)
    # The trainer writes NAME/ and NAME.safetensors under session.models/; without them
    # (training skipped), the session's base model is converted instead.
    src = trained[-1] if trained else models.resolve_model(s.base_model, s.workspace)
    single = s.models / f"{src.name}.safetensors"
    if not single.is_file():
        single = to_single_file(src, single)
    info = inspect(single)
    log.info("Single file %s: %s, %s, %d tensors", single, info["what"], info["precision"],
             info["tensors"])
    with tempfile.TemporaryDirectory() as tmp:
        to_diffusers(single, Path(tmp) / "back", config=src)
    log.info("diffusers' single-file loader reads it back, every tensor checked")


def step_serve(s: session.Session) -> dict:
    """Serve the trained model through the AUTOMATIC1111-compatible API, make one txt2img
    request through it as any A1111 client would, and stop the server (webui)."""
    import base64
    import json
    import urllib.request

    from fastsd.webui.server import serve, shutdown

    server = serve(s, port=0)
    try:
        body = json.dumps({"prompt": "a photo of sks cat", "steps": 4, "width": 64,
                           "height": 64, "seed": 1, "sampler_name": "Euler a"}).encode()
        req = urllib.request.Request(f"{server.url}/sdapi/v1/txt2img", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            answer = json.loads(r.read())
    finally:
        server.stop()
        shutdown()
    info = json.loads(answer["info"])
    png = base64.b64decode(answer["images"][0])
    log.info("The API at %s answered txt2img with a %d-byte PNG (seed %d, model %s), saved "
             "as %s", server.url, len(png), info["seed"], info["sd_model_name"],
             info["saved_files"][0])
    return info


def run(root: Workspace | Path | None = None, family: str = "sd1",
        name: str = "demo") -> session.Session:
    root = Workspace.current(root)
    model = models.resolve_model(f"tiny-{family}", root)
    log.info("Tiny %s model at %s", family, model)
    s = step_session(root, name, family)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "photos"
        samples.write(src, DEMO_SUBJECT)
        step_images(s, src)
    step_captions(s)
    step_train(s)
    step_convert(s)
    step_serve(s)
    print(f"Demo finished: session {s.name} at {s.path}")
    return s
