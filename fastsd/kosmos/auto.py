"""Caption a session's images with Kosmos-2 and crop them around the grounded subject.

For each original image ``instance_images/originals/STEM.EXT``:

* ``captions/STEM.json``: the caption, its grounded entities (boxes in pixels of the
  original) and the subject box (the class word's phrase, else the largest box);
* ``captions/STEM.txt``: the caption through the session's caption template (token and
  class word added), kept when it exists unless ``overwrite``;
* then, with the model unloaded, the images with a subject box are cropped again around it.

An image whose .txt and .json both exist is skipped unless ``overwrite``, so a run cut
short by a Colab timeout picks up where it stopped.

In a notebook kernel on a GPU machine the captioning runs in a child process (``fastsd
captions auto``): a model run on CUDA in the kernel leaves a CUDA context there (hundreds of
MB of VRAM) for as long as the runtime lives, which the trainer's own child process then
lacks.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence, TypeVar

from fastsd import env, options
from fastsd.dataset import captions, crop, images
from fastsd.errors import DataError, FastSDError
from fastsd.kosmos import grounding
from fastsd.kosmos.model import DEFAULT_MODEL, Captioner, prompt_for, prompt_words
from fastsd.session import Session
from fastsd.workspace import Workspace

log = logging.getLogger("fastsd")

T = TypeVar("T")


@dataclass
class CaptionSettings:
    """What `fastsd captions auto` and the captions cell let the user choose."""

    model: str = DEFAULT_MODEL
    detailed: bool = False  # "<grounding> Describe this image in detail:" instead of brief
    overwrite: bool = False  # replace existing captions (.txt and .json)
    batch_size: int = 8
    max_new_tokens: int | None = None  # None: 64 brief, 256 detailed
    quantize: str = "auto"  # "auto", "8bit" or "none"
    crop: bool = True  # re-crop the captioned images around their subject boxes

    @property
    def prompt(self) -> str:
        return prompt_for(self.detailed)

    @property
    def tokens(self) -> int:
        return self.max_new_tokens or (256 if self.detailed else 64)


@dataclass
class ImageCaption:
    """The result for one image."""

    stem: str
    caption: str
    text: str  # what the template made of it
    subject_box: list[int] | None
    txt_written: bool
    record: dict = field(repr=False, default_factory=dict)


def batches(items: Sequence[T], size: int) -> Iterator[list[T]]:
    for i in range(0, len(items), max(1, size)):
        yield list(items[i:i + max(1, size)])


def record(raw: str, prompt: str, image_size: tuple[int, int], class_word: str) -> dict:
    """The captions/STEM.json record of one raw generation (boxes in pixels of the image)."""
    parsed = grounding.drop_prefix(grounding.parse(raw), prompt_words(prompt))
    entities = [{"phrase": e.phrase, "span": list(e.span),
                 "boxes": [grounding.to_pixels(b, image_size) for b in e.boxes]}
                for e in parsed.entities]
    return {"caption": parsed.caption, "entities": entities,
            "subject_box": grounding.subject_box(entities, class_word),
            "image_size": list(image_size)}


def pending(session: Session, overwrite: bool = False) -> list[Path]:
    """The originals still to caption: all of them when ``overwrite``, else those
    lacking their .txt or .json."""
    todo = []
    for p in images.originals(session):
        done = captions.path(session, p.stem).is_file() and \
            captions.record_path(session, p.stem).is_file()
        if overwrite or not done:
            todo.append(p)
    return todo


class CaptioningFailed(FastSDError):
    """The captioning process ended with an error."""


def kernel_with_gpu() -> bool:
    """Whether this is a notebook kernel on a machine with an NVIDIA GPU (asked of the
    driver: torch is not imported here)."""
    return env.runtime() in ("colab", "jupyter") and bool(env.driver_gpus())


def child_command(session: Session, settings: CaptionSettings, root: Path) -> list[str]:
    """``fastsd captions auto`` with ``settings``, for a child process."""
    cmd = [sys.executable, "-m", "fastsd.cli", "captions", "auto", session.name,
           "--home", str(root), "--model", settings.model, "--batch-size",
           str(settings.batch_size), "--quantize", settings.quantize]
    if settings.max_new_tokens:
        cmd += ["--max-new-tokens", str(settings.max_new_tokens)]
    cmd += [flag for flag, on in (("--detailed", settings.detailed),
                                  ("--overwrite", settings.overwrite),
                                  ("--no-crop", not settings.crop)) if on]
    return cmd


def _caption_in_child(session: Session, settings: CaptionSettings, root: Path,
                      todo: list[Path]) -> list[ImageCaption]:
    """Run ``fastsd captions auto`` in a child process, its output shown here; the results
    read back from the records it wrote."""
    had_txt = {p.stem for p in todo if captions.path(session, p.stem).is_file()}
    proc = subprocess.Popen(child_command(session, settings, root), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    tail: deque[str] = deque(maxlen=20)
    assert proc.stdout is not None
    for line in proc.stdout:
        tail.append(line.rstrip("\n"))
        sys.stdout.write(line)  # the child's progress and log, shown in the cell
    if proc.wait():
        errors = [ln for ln in tail if ln.startswith("error: ")]
        raise CaptioningFailed(errors[-1][len("error: "):] if errors else
                               f"Captioning stopped with exit code {proc.returncode}. The "
                               "last lines it wrote:\n" + "\n".join(list(tail)[-8:]) +
                               "\nThe captions written so far are kept: run it again.")
    results = []
    for p in todo:
        rec = captions.read_record(session, p.stem)
        if rec is not None:
            results.append(ImageCaption(p.stem, rec["caption"],
                                        captions.read(session, p.stem) or "",
                                        rec["subject_box"],
                                        settings.overwrite or p.stem not in had_txt, rec))
    return results


def caption_session(session: Session, settings: CaptionSettings | None = None,
                    root: Workspace | Path | None = None, captioner: Captioner | None = None,
                    in_child: bool | None = None) -> list[ImageCaption]:
    """Caption the session's images with Kosmos-2, then crop them around their subjects.

    ``root`` is the workspace whose models/hub caches the model (default: the current
    one). Pass an open ``captioner`` to reuse a loaded model (it is then left open);
    otherwise the model is loaded here and unloaded, VRAM freed, before the crop.
    ``in_child``: caption in a child process (default: in a notebook kernel on a GPU
    machine, when no captioner is given), so that no CUDA context stays in this process.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    settings = settings or CaptionSettings()
    if not images.originals(session):
        raise DataError(f"Session {session.name!r} has no images to caption. Import the "
                        f"instance images first ({options.run('images', session.name)}).")
    todo = pending(session, settings.overwrite)
    if not todo:
        log.info("Every image of %s has its captions already; pass overwrite to redo them.",
                 session.name)
        return []
    if in_child if in_child is not None else captioner is None and kernel_with_gpu():
        return _caption_in_child(session, settings, Workspace.current(root).root, todo)
    cls = session.settings.get("class_word", "")
    token = session.settings.get("instance_token", "")
    template = session.settings.get("caption_template") or captions.DEFAULT_TEMPLATE

    own = captioner is None
    cap = captioner or Captioner(settings.model, root, settings.quantize)
    results: list[ImageCaption] = []
    try:
        with tqdm(total=len(todo), desc="Captioning", unit="image") as bar:
            for group in batches(todo, settings.batch_size):
                pics = []
                for p in group:
                    with Image.open(p) as im:
                        pics.append(im.convert("RGB"))
                raws = cap.generate(pics, settings.prompt, settings.tokens)
                for p, pic, raw in zip(group, pics, raws):
                    rec = record(raw, settings.prompt, pic.size, cls)
                    captions.write_record(session, p.stem, rec)
                    text = captions.render(template, rec["caption"], token, cls)
                    written = captions.write(session, p.stem, text, overwrite=settings.overwrite)
                    results.append(ImageCaption(p.stem, rec["caption"], text,
                                                rec["subject_box"], written, rec))
                    log.debug("%s: %r subject %s", p.stem, rec["caption"], rec["subject_box"])
                bar.update(len(group))
    finally:
        if own:
            cap.close()
    kept = sum(not r.txt_written for r in results)
    log.info("Captioned %d images of %s%s", len(results), session.name,
             f" ({kept} existing .txt captions kept)" if kept else "")
    boxed = [r.stem for r in results if r.subject_box]
    if settings.crop and boxed:
        crop.crop_session(session, stems=boxed)
        log.info("Cropped %d images around their subject boxes", len(boxed))
    return results
