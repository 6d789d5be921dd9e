"""Caption files, the one home of ``captions/``: per image, ``STEM.txt`` (the training
caption, never renamed, never mangled) and ``STEM.json`` (Kosmos-2's grounded record:
caption, entities with boxes, the subject box).

A template puts the instance token and the class word into every caption, e.g.
``"{token} {cls}, {caption}"`` gives "sks dog, a dog sitting on a beach".
"""

from __future__ import annotations

import re
import string
from pathlib import Path

from fastsd import drive
from fastsd.dataset.originals import originals
from fastsd.errors import DataError

DEFAULT_TEMPLATE = "{token} {cls}, {caption}"
FIELDS = {"token", "cls", "caption"}


def check_template(template: str) -> str:
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise DataError(f"The caption template {template!r} is malformed ({e}). Use "
                        "{token}, {cls} and {caption}, e.g. '{token} {cls}, {caption}'.") from e
    unknown = names - FIELDS
    if unknown:
        raise DataError(f"The caption template {template!r} uses {sorted(unknown)}; only "
                        "{token}, {cls} and {caption} are known.")
    return template


def render(template: str, caption: str, token: str, cls: str) -> str:
    """Fill the template; an empty caption leaves no dangling comma or spaces."""
    text = check_template(template).format(token=token, cls=cls, caption=(caption or "").strip())
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:])", r"\1", text)
    return re.sub(r"^[\s,;:]+|[\s,;:]+$", "", text)


def path(session, stem: str) -> Path:
    return session.captions / f"{stem}.txt"


def record_path(session, stem: str) -> Path:
    return session.captions / f"{stem}.json"


def read_record(session, stem: str) -> dict | None:
    """The captions/STEM.json record of an image, or None when it has none."""
    p = record_path(session, stem)
    return drive.read_json(p) if p.is_file() else None


def write_record(session, stem: str, record: dict) -> None:
    drive.atomic_write_json(record_path(session, stem), record)


def subject_box(session, stem: str) -> tuple[int, int, int, int] | None:
    """The subject's box in the original's pixels, from the record, or None."""
    box = (read_record(session, stem) or {}).get("subject_box")
    return tuple(box) if box else None


def read(session, stem: str) -> str | None:
    p = path(session, stem)
    return p.read_text(encoding="utf-8").strip() if p.is_file() else None


def write(session, stem: str, text: str, overwrite: bool = False) -> bool:
    """Write STEM's caption atomically; an existing one is kept unless ``overwrite``."""
    p = path(session, stem)
    if p.exists() and not overwrite:
        return False
    drive.atomic_write_text(p, text.strip())
    return True


def forget(session, stems: set[str]) -> int:
    """Delete the captions (``.txt``) and Kosmos-2 records (``.json``) of ``stems``."""
    gone = 0
    for stem in stems:
        for p in (path(session, stem), record_path(session, stem)):
            if p.is_file():
                drive.delete(p)
                gone += 1
    return gone


def image_stems(session) -> list[str]:
    return [p.stem for p in originals(session)]


def show(session) -> dict[str, str | None]:
    """Every image's caption (None where it has none)."""
    return {stem: read(session, stem) for stem in image_stems(session)}


def set_all(session, template: str | None = None, caption: str = "",
            overwrite: bool = False) -> int:
    """Give every image a caption from the template; returns how many files were written.

    Existing captions are kept unless ``overwrite``.
    """
    template = template or session.settings.get("caption_template") or DEFAULT_TEMPLATE
    token, cls = session.settings["instance_token"], session.settings["class_word"]
    n = 0
    for stem in image_stems(session):
        n += write(session, stem, render(template, caption, token, cls), overwrite)
    return n


def replace(session, find: str, repl: str, regex: bool = False) -> int:
    """Find and replace in every caption; returns how many files changed."""
    if not find:
        raise DataError("Nothing to find: give the text to replace.")
    try:
        pattern = re.compile(find if regex else re.escape(find))
    except re.error as e:
        raise DataError(f"{find!r} is not a valid regular expression ({e}).") from e
    n = 0
    for stem, text in show(session).items():
        if text is None:
            continue
        new = pattern.sub(repl, text)
        if new != text:
            n += write(session, stem, new, overwrite=True)
    return n
