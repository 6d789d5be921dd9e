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
    an existing diffusers folder is used as it is; a Hugging Face repo id (owner/name) is
    downloaded once into the workspace's cache (on Drive in Colab).
    """
    from fastsd.models import tiny

    if name.startswith(TINY_PREFIX) and name[len(TINY_PREFIX):] in tiny.FAMILIES:
        return tiny.ensure(name[len(TINY_PREFIX):], models_root(root))
    path = Path(name).expanduser()
    if (path / "model_index.json").is_file():
        return path
    if not path.exists() and name.count("/") == 1 and not name.startswith(("/", ".", "~")):
        from fastsd.models import hub

        folder = hub.snapshot(name, root)
        if not (folder / "model_index.json").is_file():
            raise ModelError(f"{name!r} on the Hugging Face Hub is not a diffusers model (it "
                             "has no model_index.json). For a single .safetensors file, "
                             "download it and use 'fastsd convert to-diffusers'.")
        return folder
    raise ModelError(
        f"Model {name!r} is neither a tiny model ({', '.join('tiny-' + f for f in tiny.FAMILIES)}), "
        "a Hugging Face repo id (owner/name) nor a diffusers folder with a model_index.json. "
        "Give one of those, or convert a single .safetensors file first with "
        "'fastsd convert to-diffusers'.")
