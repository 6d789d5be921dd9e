"""Models: the embedded tiny models and resolving a model name to a local folder."""

from __future__ import annotations

from pathlib import Path

from fastsd.errors import ModelError

TINY_PREFIX = "tiny-"


def models_root(root: Path | None = None) -> Path:
    from fastsd import drive

    return (root or drive.workspace()) / "models"


def resolve(name: str, root: Path | None = None) -> Path:
    """The local diffusers folder for a model name.

    ``tiny-sd1``, ``tiny-sd2`` and ``tiny-sdxl`` are built offline on first use; a path to
    an existing diffusers folder is used as it is.
    """
    from fastsd.models import tiny

    if name.startswith(TINY_PREFIX) and name[len(TINY_PREFIX):] in tiny.FAMILIES:
        return tiny.ensure(name[len(TINY_PREFIX):], models_root(root))
    path = Path(name).expanduser()
    if (path / "model_index.json").is_file():
        return path
    raise ModelError(
        f"Model {name!r} is neither a tiny model ({', '.join('tiny-' + f for f in tiny.FAMILIES)}) "
        "nor a diffusers folder with a model_index.json. Give the path of a diffusers model "
        "folder, or convert a single .safetensors file first with 'fastsd convert to-diffusers'.")
