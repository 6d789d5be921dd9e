"""Kosmos-2's grounded output: parse it, convert its boxes to pixels, pick the subject.

Kosmos-2 writes a caption with location tags, e.g. (one line)::

    <grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044>
    <patch_index_0863></object> warming himself by<phrase> a fire</phrase><object>
    <patch_index_0005><patch_index_0911></object>.

A ``<phrase>`` is followed by an ``<object>`` holding one or more boxes, separated by
``</delimiter_of_multi_objects/>``. A box is two patch indices on a 32x32 grid laid over
the (square-resized, uncropped) image, counted row by row from the top left: the patch of
the top-left corner and the patch of the bottom-right corner.

Where the two patches share a row or a column, the box covers both patches whole;
otherwise it runs from the centre of the first patch to the centre of the second. This is
the convention of Kosmos-2's own decoder (``patch_index_to_coordinate`` in transformers'
processing_kosmos2.py), so our boxes agree with the model's published demo.

Pure Python: nothing here imports torch or transformers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

GRID = 32  # patches per side (Kosmos-2's 1024 patch-index tokens)
IMAGE_END = "</image>"
_TAG = re.compile(r"(<[^<>]*>)")
_PATCH = re.compile(r"<patch_index_(\d+)>")

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Entity:
    """A grounded phrase: its text, its [start, end) span in the caption, its boxes.

    ``boxes`` are normalised (x0, y0, x1, y1) in 0..1. A box the model wrote without a
    phrase has ``phrase == ""`` and an empty span where it stood.
    """

    phrase: str
    span: tuple[int, int]
    boxes: tuple[Box, ...]


@dataclass(frozen=True)
class Grounded:
    caption: str
    entities: tuple[Entity, ...] = field(default_factory=tuple)


def patch_box(first: int, last: int, grid: int = GRID) -> Box:
    """The normalised box of the patch pair (``first``, ``last``) on a ``grid``x``grid`` grid."""
    cell = 1.0 / grid
    c0, r0 = first % grid, first // grid
    c1, r1 = last % grid, last // grid
    if r0 == r1 or c0 == c1:  # one row or one column of patches: whole patches
        x0, y0, x1, y1 = c0 * cell, r0 * cell, (c1 + 1) * cell, (r1 + 1) * cell
    else:  # patch centre to patch centre
        x0, y0, x1, y1 = ((c0 + 0.5) * cell, (r0 + 0.5) * cell,
                          (c1 + 0.5) * cell, (r1 + 0.5) * cell)
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def to_pixels(box: Box, size: tuple[int, int]) -> list[int]:
    """A normalised box in whole pixels of an image of ``size`` (w, h).

    The pixel box covers the normalised one: left and top edges round down, right and
    bottom edges round up, all clamped to the image.
    """
    w, h = size
    x0, y0, x1, y1 = (round(v * s, 6) for v, s in zip(box, (w, h, w, h)))
    return [max(0, math.floor(x0)), max(0, math.floor(y0)),
            min(w, math.ceil(x1)), min(h, math.ceil(y1))]


def parse(raw: str, grid: int = GRID) -> Grounded:
    """The caption (tags removed, ends stripped) and grounded entities of a raw generation.

    ``raw`` is the decoded text, with or without the image prefix (everything up to the
    last ``</image>`` is dropped). Tolerant of a truncated generation: a phrase without a
    following object is plain text, an unclosed object is dropped, an out-of-range patch
    index is ignored.
    """
    text = raw.rsplit(IMAGE_END, 1)[-1]
    out: list[str] = []
    length = 0
    phrase_start: int | None = None
    pending: tuple[int, int] | None = None  # span of a closed phrase awaiting its object
    in_object = False
    indices: list[int] = []
    boxes: list[Box] = []
    found: list[tuple[tuple[int, int], tuple[Box, ...]]] = []

    def close_pair() -> None:
        if len(indices) >= 2 and all(0 <= i < grid * grid for i in indices[:2]):
            boxes.append(patch_box(indices[0], indices[1], grid))
        indices.clear()

    for piece in _TAG.split(text):
        if not piece:
            continue
        if not _TAG.fullmatch(piece):
            if in_object:
                continue  # stray text inside <object>: not part of the caption
            if pending is not None and piece.strip():
                pending = None  # words between </phrase> and <object>: not grounded
            out.append(piece)
            length += len(piece)
        elif piece == "<phrase>":
            phrase_start, pending = length, None
        elif piece == "</phrase>":
            if phrase_start is not None:
                pending, phrase_start = (phrase_start, length), None
        elif piece == "<object>":
            in_object, indices, boxes = True, [], []
        elif piece == "</delimiter_of_multi_objects/>":
            if in_object:
                close_pair()
        elif piece == "</object>":
            if in_object:
                close_pair()
                if boxes:
                    found.append((pending or (length, length), tuple(boxes)))
            in_object, pending = False, None
        elif (m := _PATCH.fullmatch(piece)) and in_object:
            indices.append(int(m.group(1)))
        # every other tag (<grounding>, </s>, ...) is dropped

    joined = "".join(out)
    lead = len(joined) - len(joined.lstrip())
    caption = joined.strip()
    entities = []
    for (start, end), bxs in found:
        chunk = joined[start:end]
        phrase = chunk.strip()
        s = max(0, start + len(chunk) - len(chunk.lstrip()) - lead)
        entities.append(Entity(phrase, (s, s + len(phrase)), bxs))
    return Grounded(caption, tuple(entities))


def drop_prefix(grounded: Grounded, prefix: str) -> Grounded:
    """``grounded`` with the caption's leading ``prefix`` (the prompt's words) removed.

    Spans are shifted to match; an entity inside the prefix is dropped (its boxes stay
    out of the caption's entities). Returned unchanged when the caption doesn't start with
    ``prefix``.
    """
    prefix = prefix.strip()
    if not prefix or not grounded.caption.startswith(prefix):
        return grounded
    rest = grounded.caption[len(prefix):]
    cut = len(prefix) + len(rest) - len(rest.lstrip())
    entities = tuple(Entity(e.phrase, (e.span[0] - cut, e.span[1] - cut), e.boxes)
                     for e in grounded.entities if e.span[0] >= cut)
    return Grounded(rest.strip(), entities)


# --------------------------------------------------------------------------- the subject

# Words a caption uses for a class word's subject, beyond the word itself and its plural.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("man", "men", "woman", "women", "boy", "girl", "child", "children", "kid",
               "people", "lady", "guy", "baby", "person"),
    "man": ("man", "men", "guy", "boy", "person"),
    "woman": ("woman", "women", "lady", "girl", "person"),
    "dog": ("dog", "puppy", "puppies"),
    "cat": ("cat", "kitten", "kitty"),
}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def matches_class(phrase: str, class_word: str) -> bool:
    """Whether ``phrase`` names the class (``class_word``, its plural or a synonym)."""
    cls = _words(class_word)
    if not cls:
        return False
    words = _words(phrase)
    if len(cls) > 1:  # "teddy bear": the words in a row, last one maybe plural
        n = len(cls)
        return any(words[i:i + n - 1] == cls[:-1] and words[i + n - 1] in _forms(cls[-1])
                   for i in range(len(words) - n + 1))
    names = set(_forms(cls[0])) | set(SYNONYMS.get(cls[0], ()))
    return any(w in names for w in words)


def _forms(word: str) -> tuple[str, ...]:
    return (word, word + "s", word + "es")


def _area(box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def subject_box(entities: list[dict], class_word: str) -> list[int] | None:
    """The subject's box: the largest box of a phrase naming ``class_word``, else the
    largest box of any phrase, else None. ``entities`` are the json's entity dicts."""
    named = [b for e in entities if matches_class(e["phrase"], class_word) for b in e["boxes"]]
    pool = named or [b for e in entities for b in e["boxes"]]
    return list(max(pool, key=_area)) if pool else None
