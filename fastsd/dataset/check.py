"""The set check: what a careful person looks for before paying for a training run.

Import validates files one by one; this looks at the images as a set. Every finding is a
warning, never a refusal, and says what was measured, which threshold (a CheckSettings
field) it crossed and what to do:

- blank: an image that is blank or nearly one colour;
- blurred: an image with much less fine detail than the rest of the set (from 3 images);
- duplicates: near-duplicates by perceptual hash (a burst), with the one to keep (the
  sharpest, then the largest); blank images are left out of this and the blur check;
- small: an image smaller than the training size, which training would upscale;
- subject: a subject (Kosmos-2's subject box, else the largest face) that fills too
  little of the crop;
- too_few: too few images for the planned steps;
- dominated: a set dominated by one near-duplicate group.

Everything is measured on the previews import writes (longest side 768 px) and cached in
``instance_images/previews/measures.json``, so a second check reads numbers only.
"""

from __future__ import annotations

import html
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from fastsd import drive
from fastsd.dataset import captions, crop
from fastsd.dataset.originals import PREVIEWS, originals, preview
from fastsd.session import DEFAULT_UNET_STEPS

log = logging.getLogger("fastsd")

MEASURES = "measures.json"  # in instance_images/previews/
REPORT = "check.json"  # in outputs/
MEASURE_VERSION = 1
CHECKS = ("blank", "blurred", "duplicates", "small", "subject", "too_few", "dominated")


@dataclass
class CheckSettings:
    """The thresholds; each finding names the one it crossed."""

    size: int | None = None  # training size in px; None: the session's resolution
    steps: int = DEFAULT_UNET_STEPS  # planned UNet steps
    blank_spread: float = 6.0  # grey standard deviation (0-255) of a 64 px copy, below: blank
    blur_ratio: float = 0.3  # fine detail below this times the set's median: blurred
    duplicate_distance: int = 10  # perceptual hashes this close (of 64 bits): near-duplicates
    min_subject: float = 0.05  # Kosmos-2 subject box area / crop area, below: too small
    min_face: float = 0.01  # face box (eyes to mouth) area / crop area, below: too small
    min_images: int = 5  # fewer images: too few whatever the steps
    max_steps_per_image: int = 200  # more steps per image: too few for the steps
    max_group_share: float = 0.3  # one near-duplicate group above this share: dominated

    def threshold(self, name: str) -> str:
        return f"{name}={getattr(self, name)}"


@dataclass
class Finding:
    """One warning: the check, the images concerned, the measure and what to do."""

    check: str
    images: list[str]
    message: str
    threshold: str  # "name=value" of the CheckSettings field crossed
    value: float | None = None  # what was measured
    keep: str | None = None  # for near-duplicates: the image to keep


@dataclass
class CheckReport:
    findings: list[Finding] = field(default_factory=list)
    n_images: int = 0
    settings: CheckSettings = field(default_factory=CheckSettings)

    def by(self, check: str) -> list[Finding]:
        return [f for f in self.findings if f.check == check]

    @property
    def checks(self) -> set[str]:
        """The checks that fired."""
        return {f.check for f in self.findings}

    def for_image(self, stem: str) -> list[Finding]:
        return [f for f in self.findings if stem in f.images]

    def summary(self) -> str:
        if not self.findings:
            return f"Set check: {self.n_images} images, no warnings."
        return f"Set check: {self.n_images} images, {len(self.findings)} warning(s)."

    def to_dict(self) -> dict:
        return {"n_images": self.n_images, "settings": asdict(self.settings),
                "findings": [asdict(f) for f in self.findings]}

    def to_text(self) -> str:
        lines = [self.summary()]
        lines += [f"  [{f.check}] {f.message} ({f.threshold})" for f in self.findings]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return self.html()

    def html(self) -> str:
        """The warnings as HTML (escaped), for the notebook."""
        if not self.findings:
            return f"<p style='color:#1a7f37'>{html.escape(self.summary())}</p>"
        items = "".join(
            f"<li><b>{html.escape(f.check)}</b>: {html.escape(f.message)} "
            f"<code>{html.escape(f.threshold)}</code></li>" for f in self.findings)
        return (f"<div><p style='color:#9a6700'><b>{html.escape(self.summary())}</b></p>"
                f"<ul>{items}</ul></div>")


# --------------------------------------------------------------------------- measures


def fine_detail(grey) -> float:
    """Share of the image's detail at the finest scale (blurring removes it first).

    Energy of the image minus a 1 px Gaussian blur, over the energy minus a 4 px blur:
    unlike the variance of the Laplacian, this hardly depends on how much texture the
    scene has, so images of different subjects can be compared.
    """
    import cv2
    import numpy as np

    g = grey.astype(np.float32)
    fine = float(((g - cv2.GaussianBlur(g, (0, 0), 1.0)) ** 2).mean())
    coarse = float(((g - cv2.GaussianBlur(g, (0, 0), 4.0)) ** 2).mean())
    return fine / coarse if coarse > 1e-6 else 0.0


def measure(preview_path: Path, original: Path) -> dict:
    """The per-image measures the checks use, from the preview."""
    import imagehash
    import numpy as np
    from PIL import Image

    with Image.open(original) as im:
        size = list(im.size)  # the header only
    with Image.open(preview_path) as im:
        rgb = im.convert("RGB")
    grey = rgb.convert("L")
    tiny = np.asarray(grey.resize((64, 64), Image.Resampling.BOX), dtype=np.float64)
    return {"version": MEASURE_VERSION, "size": size, "preview": list(rgb.size),
            "spread": float(tiny.std()), "detail": fine_detail(np.asarray(grey)),
            "phash": str(imagehash.phash(rgb))}


def _face(preview_path: Path, m: dict) -> list[int] | None:
    """The largest face in the preview, in the original's pixels."""
    from PIL import Image

    with Image.open(preview_path) as im:
        box = crop.detect_face(im.convert("RGB"))
    if box is None:
        return None
    k = m["size"][0] / m["preview"][0]
    return [round(v * k) for v in box]


def measures(session, paths: list[Path], need_face=frozenset()) -> dict[str, dict]:
    """{stem: measures} of these originals, from the cache where it is up to date."""
    path = session.instance_images / PREVIEWS / MEASURES
    cache = drive.read_json(path) if path.is_file() else {}
    out, changed = {}, False
    for original in paths:
        prev = preview(session, original)
        stamp = prev.stat().st_mtime_ns
        m = cache.get(original.stem)
        if not m or m.get("stamp") != stamp or m.get("version") != MEASURE_VERSION:
            m = {**measure(prev, original), "stamp": stamp}
            changed = True
        if original.stem in need_face and "face" not in m:
            m["face"] = _face(prev, m)
            changed = True
        out[original.stem] = cache[original.stem] = m
    if changed:
        drive.atomic_write_json(path, cache)
    return out


def forget(session, stems: set[str]) -> int:
    """Drop the cached measures of ``stems``; returns how many there were."""
    path = session.instance_images / PREVIEWS / MEASURES
    cache = drive.read_json(path) if path.is_file() else {}
    kept = {k: v for k, v in cache.items() if k not in stems}
    if len(kept) != len(cache):
        drive.atomic_write_json(path, kept)
    return len(cache) - len(kept)


# --------------------------------------------------------------------------- the checks


def _groups(stems: list[str], hashes: dict, distance: int) -> list[list[str]]:
    """Near-duplicate groups (two or more images), joined transitively."""
    parent = {s: s for s in stems}

    def root(s):
        while parent[s] != s:
            parent[s] = parent[parent[s]]
            s = parent[s]
        return s

    for i, a in enumerate(stems):
        for b in stems[i + 1:]:
            if int(hashes[a] - hashes[b]) <= distance:
                parent[root(b)] = root(a)
    groups: dict[str, list[str]] = {}
    for s in stems:
        groups.setdefault(root(s), []).append(s)
    return [g for g in groups.values() if len(g) > 1]


def _subject(session, stem: str, m: dict) -> tuple[list[int] | None, str, str]:
    """(box, what it is, the threshold that applies)."""
    box = captions.subject_box(session, stem)
    if box is not None:
        return list(box), "Kosmos-2's subject box", "min_subject"
    return m.get("face"), "the largest face", "min_face"


def _subject_share(box, crop_box) -> float:
    x0, y0 = max(box[0], crop_box[0]), max(box[1], crop_box[1])
    x1, y1 = min(box[2], crop_box[2]), min(box[3], crop_box[3])
    inside = max(0, x1 - x0) * max(0, y1 - y0)
    return inside / ((crop_box[2] - crop_box[0]) * (crop_box[3] - crop_box[1]))


def check_images(session, paths: list[Path],
                 settings: CheckSettings | None = None) -> CheckReport:
    """Check these originals of the session as a set (the whole set: check_session)."""
    import imagehash

    st = settings or CheckSettings()
    size = int(st.size or session.settings.get("resolution", 512))
    stems = [p.stem for p in paths]
    need_face = {s for s in stems if captions.subject_box(session, s) is None}
    ms = measures(session, paths, need_face)
    report = CheckReport(n_images=len(stems), settings=st)
    add = report.findings.append

    blank = [s for s in stems if ms[s]["spread"] < st.blank_spread]
    for s in blank:
        add(Finding("blank", [s], f"{s} is blank or nearly one colour (contrast "
                    f"{ms[s]['spread']:.1f} of 255 on a 64 px copy). Delete it: it can only "
                    "teach the model a flat colour.", st.threshold("blank_spread"),
                    round(ms[s]["spread"], 2)))
    rest = [s for s in stems if s not in blank]

    if len(rest) >= 3:
        detail = sorted(ms[s]["detail"] for s in rest)
        median = detail[len(detail) // 2] if len(detail) % 2 else (
            detail[len(detail) // 2 - 1] + detail[len(detail) // 2]) / 2
        for s in rest:
            if ms[s]["detail"] < st.blur_ratio * median:
                add(Finding("blurred", [s], f"{s} is blurred next to the rest of the set (fine "
                            f"detail {ms[s]['detail']:.3f}, under {st.blur_ratio} x the set's "
                            f"median {median:.3f}). Replace it with a sharp photo or delete "
                            "it: the model learns the blur.", st.threshold("blur_ratio"),
                            round(ms[s]["detail"], 4)))

    hashes = {s: imagehash.hex_to_hash(ms[s]["phash"]) for s in rest}
    groups = _groups(rest, hashes, st.duplicate_distance)
    for g in groups:
        keep = max(g, key=lambda s: (ms[s]["detail"], ms[s]["size"][0] * ms[s]["size"][1]))
        others = [s for s in g if s != keep]
        far = int(max(hashes[a] - hashes[b] for a in g for b in g))
        add(Finding("duplicates", g, f"{', '.join(g)} are near-duplicates (perceptual hashes "
                    f"at most {far} of 64 bits apart). Keep {keep} (the sharpest) and delete "
                    f"{', '.join(others)}, unless they differ in pose or light.",
                    st.threshold("duplicate_distance"), far, keep))

    for s in stems:
        w, h = ms[s]["size"]
        if min(w, h) < size:
            add(Finding("small", [s], f"{s} is {w}x{h} px, smaller than the training size "
                        f"{size} px: it will be upscaled and look soft. Use a larger photo "
                        "of it.", f"size={size}", min(w, h)))

    record_path = session.instance_images / crop.CROPS
    crops = drive.read_json(record_path) if record_path.is_file() else {}
    for s in rest:
        box, source, limit = _subject(session, s, ms[s])
        if not box:
            continue
        w, h = ms[s]["size"]
        recorded = crops.get(s, {}).get("box")
        crop_box = recorded or crop.square_around(w, h, (box[0] + box[2]) / 2,
                                                  (box[1] + box[3]) / 2)
        share = _subject_share(box, crop_box)
        if share < getattr(st, limit):
            add(Finding("subject", [s], f"In {s} the subject ({source}) fills {share:.1%} of "
                        "the crop: the model will mostly learn the background. Use a closer "
                        "photo, or crop it closer before importing.",
                        st.threshold(limit), round(share, 4)))

    n = len(stems)
    if n and n < st.min_images:
        add(Finding("too_few", stems, f"Only {n} image(s): add photos of the subject in "
                    "varied poses, places and light (10 to 20 is typical).",
                    st.threshold("min_images"), n))
    elif n and st.steps / n > st.max_steps_per_image:
        need = math.ceil(st.steps / st.max_steps_per_image)
        add(Finding("too_few", stems, f"{n} images for {st.steps} steps is "
                    f"{st.steps / n:.0f} steps per image: the model will memorise these "
                    f"photos. Add images (at least {need}) or train fewer steps (at most "
                    f"{n * st.max_steps_per_image}).", st.threshold("max_steps_per_image"),
                    round(st.steps / n, 1)))
    if groups and n:
        big = max(groups, key=len)
        if len(big) / n > st.max_group_share:
            add(Finding("dominated", big, f"{len(big)} of {n} images ({len(big) / n:.0%}) are "
                        f"one near-duplicate group ({', '.join(big)}): the model will learn "
                        "that one shot. Keep one or two of them and add varied photos.",
                        st.threshold("max_group_share"), round(len(big) / n, 3)))
    return report


def check_session(session, settings: CheckSettings | None = None) -> CheckReport:
    """Check every original of the session; the report is also saved to outputs/check.json."""
    report = check_images(session, originals(session), settings)
    drive.atomic_write_json(session.outputs / REPORT, report.to_dict())
    for f in report.findings:
        log.debug("%s: %s", f.check, f.message)
    return report


def settings_fields() -> list[str]:
    """The CheckSettings fields, for the CLI's options."""
    return [f.name for f in fields(CheckSettings)]
