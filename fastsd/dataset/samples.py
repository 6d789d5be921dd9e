"""Real photographs for the demo and the tests, from scikit-image's bundled sample data.

Nothing is downloaded: these images ship inside the scikit-image wheel.
"""

from __future__ import annotations

from pathlib import Path

# name -> scikit-image loader; every one of these is bundled (no pooch download).
SAMPLES = {
    "astronaut": "astronaut",  # a portrait with a face
    "chelsea": "chelsea",  # a cat
    "coffee": "coffee",
    "rocket": "rocket",
    "camera": "camera",  # grey-scale
}


def load(name: str):
    """The sample ``name`` as a PIL image."""
    from PIL import Image
    from skimage import data

    return Image.fromarray(getattr(data, SAMPLES[name])())


def write(dest: str | Path, names: list[str] | tuple[str, ...] = tuple(SAMPLES)) -> list[Path]:
    """Save the named samples as PNG files in ``dest`` and return their paths."""
    from fastsd import drive

    dest = Path(dest)
    out = []
    for name in names:
        path = dest / f"{name}.png"
        with drive.atomic_writer(path) as f:
            load(name).save(f, format="PNG")
        out.append(path)
    return out
