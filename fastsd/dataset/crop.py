"""Smart crop: the largest square around what matters, resized to the training resolution.

The focal point comes from the first of these that applies: a subject box passed in (the
Kosmos-2 captioner's grounding box, from captions/STEM.json), the largest face OpenCV's
Haar cascade finds, a spectral-residual saliency map, the centre. The originals are kept
and each crop box is recorded in ``instance_images/crops.json``, so a crop can be redone
at another size at any time.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastsd import drive, options
from fastsd.dataset import captions
from fastsd.dataset.originals import originals
from fastsd.errors import DataError

log = logging.getLogger("fastsd")

CROPS = "crops.json"
MIN_SIZE, MAX_SIZE = 64, 1024
Box = tuple[int, int, int, int]


def check_size(size: int) -> int:
    """A training resolution: a multiple of 64 from 64 to 1024 (256 and up for real models)."""
    if not isinstance(size, int) or size % 64 or not MIN_SIZE <= size <= MAX_SIZE:
        raise DataError(f"The crop size {size} is not a multiple of 64 between {MIN_SIZE} and "
                        f"{MAX_SIZE}. Use 512 for SD 1.x, 768 for SD 2.x 768, 1024 for SDXL.")
    if size < 256:
        log.warning("Crop size %d is below 256: only the tiny test models train that small.",
                    size)
    return size


# --------------------------------------------------------------------------- focal points


def detect_face(image) -> Box | None:
    """The largest frontal face (Haar cascade shipped with OpenCV), in image pixels."""
    import cv2
    import numpy as np

    scale = min(1.0, 800 / max(image.size))
    small = image.convert("L")
    if scale < 1.0:
        small = small.resize((round(image.width * scale), round(image.height * scale)))
    gray = cv2.equalizeHist(np.asarray(small))
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades +
                                    "haarcascade_frontalface_default.xml")
    side = max(24, min(small.size) // 20)
    faces = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5,
                                     minSize=(side, side))
    if len(faces) == 0:
        return None
    x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
    return (round(x / scale), round(y / scale), round((x + w) / scale), round((y + h) / scale))


def saliency_point(image) -> tuple[float, float] | None:
    """The centre of the most salient region (spectral residual), or None when flat."""
    import cv2
    import numpy as np

    w0 = 64
    h0 = max(1, round(image.height * w0 / image.width))
    g = np.asarray(image.convert("L").resize((w0, h0)), dtype=np.float64)
    spectrum = np.fft.fft2(g)
    log_amp = np.log(np.abs(spectrum) + 1e-8)
    residual = log_amp - cv2.blur(log_amp, (3, 3))
    sal = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum)))) ** 2
    sal = cv2.GaussianBlur(sal, (0, 0), 2.5)
    if sal.max() <= 0 or sal.std() / (sal.mean() + 1e-12) < 0.2:
        return None
    mask = sal >= np.quantile(sal, 0.9)
    ys, xs = np.nonzero(mask)
    weights = sal[mask]
    cx = float((xs * weights).sum() / weights.sum() + 0.5) * image.width / w0
    cy = float((ys * weights).sum() / weights.sum() + 0.5) * image.height / h0
    return cx, cy


def square_around(width: int, height: int, cx: float, cy: float) -> Box:
    """The largest square in the image, centred on (cx, cy) as far as the edges allow."""
    side = min(width, height)
    x0 = int(round(min(max(cx - side / 2, 0), width - side)))
    y0 = int(round(min(max(cy - side / 2, 0), height - side)))
    return (x0, y0, x0 + side, y0 + side)


def focal_box(image, subject_box=None) -> tuple[Box, str]:
    """The crop box and what decided it: "subject", "face", "saliency" or "center"."""
    w, h = image.size
    if subject_box is not None:
        x0, y0, x1, y1 = subject_box
        return square_around(w, h, (x0 + x1) / 2, (y0 + y1) / 2), "subject"
    if w == h:
        return (0, 0, w, h), "center"
    face = detect_face(image)
    if face is not None:
        x0, y0, x1, y1 = face
        # Centre a little below the face box's middle, so the chin and shoulders stay in.
        return square_around(w, h, (x0 + x1) / 2, (y0 + y1) / 2 + 0.25 * (y1 - y0)), "face"
    point = saliency_point(image)
    if point is not None:
        return square_around(w, h, *point), "saliency"
    return square_around(w, h, w / 2, h / 2), "center"


def smart_crop(image, size: int, subject_box=None):
    """(cropped image of size x size, crop box in the original's pixels, focus)."""
    from PIL import Image

    box, focus = focal_box(image, subject_box)
    return image.crop(box).resize((size, size), Image.Resampling.LANCZOS), box, focus


# --------------------------------------------------------------------------- sessions


def crop_session(session, size: int | None = None, stems=None) -> dict:
    """Crop the originals (all, or ``stems``) into the top-level training images.

    Returns the updated crops.json content: {stem: {"box", "size", "focus"}}.
    """
    from PIL import Image

    size = check_size(int(size or session.settings["resolution"]))
    record_path = session.instance_images / CROPS
    record = drive.read_json(record_path) if record_path.is_file() else {}
    wanted = None if stems is None else set(stems)
    found = originals(session)
    if not found:
        raise DataError(f"Session {session.name!r} has no images to crop: import some first "
                        f"({options.run('images', session.name)}).")
    for path in found:
        if wanted is not None and path.stem not in wanted:
            continue
        with Image.open(path) as im:
            im.load()
            crop, box, focus = smart_crop(im.convert("RGB"), size, captions.subject_box(session,
                                                                              path.stem))
        with drive.atomic_writer(session.instance_images / f"{path.stem}.png") as f:
            crop.save(f, format="PNG")
        record[path.stem] = {"box": list(box), "size": size, "focus": focus}
    drive.atomic_write_json(record_path, record)
    return record


TRAINING_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def training_images(session) -> list[Path]:
    """The training images: the image files at the top level of instance_images/."""
    folder = Path(session.instance_images)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in TRAINING_EXTS
                  and not drive.is_temporary(p))


def forget(session, stems: set[str]) -> int:
    """Delete the training images (crops) of ``stems`` and their crop records."""
    gone = 0
    for p in training_images(session):
        if p.stem in stems:
            drive.delete(p)
            gone += 1
    record_path = session.instance_images / CROPS
    record = drive.read_json(record_path) if record_path.is_file() else {}
    if set(record) & stems:
        drive.atomic_write_json(record_path, {k: v for k, v in record.items()
                                              if k not in stems})
    return gone

