"""Models: the registry, the embedded tiny models, staging to local disk, and the one
resolver from a model name to a folder.

:func:`resolve_model` is the only place that turns what a user names as a model into a
local diffusers folder; the trainer, the converter's callers, the demo and the generation
engine all go through it, then load from :func:`stage` (a local copy of a model on Drive).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fastsd import drive, fetch
from fastsd.errors import ModelError
from fastsd.models.staging import stage  # noqa: F401  (models.stage(path) -> local path)
from fastsd.workspace import Workspace

TINY_PREFIX = "tiny-"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")

# What a diffusers repo needs; the big single-file checkpoints and fp16/EMA variants that
# sit beside the folders in many repos are left out.
DIFFUSERS_FILES = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"]
DIFFUSERS_SKIP = ["*.fp16.*", "*non_ema*", "*.ckpt", "*/*.bin", "*.onnx", "*.msgpack"]
# In a folder converted from a single file: that file, so it is used as it is where a
# single file is wanted (AUTOMATIC1111, Forge) instead of being converted back.
SOURCE_RECORD = "fastsd_source.json"


def resolve_model(name: str | os.PathLike[str],
                  ws: Workspace | Path | None = None) -> Path:
    """The local diffusers folder for a model name.

    * a registry name (``sd15``, ``sd21``, ``sdxl``, ``tiny-sd1``...; ``fastsd models list``):
      downloaded once (fp16, without the safety checker), tiny ones built offline;
    * a path to a diffusers folder (with a model_index.json): used as it is;
    * a path to a single ``.safetensors``/``.ckpt`` file, or a link to one (Google Drive,
      Hugging Face, civitai or any HTTP(S) URL): downloaded once, converted to diffusers
      once, and the converted folder kept in the workspace for later runtimes;
    * a Hugging Face repo id (owner/name): downloaded once into the workspace's cache.
    """
    from fastsd.models import registry

    if not name:
        raise ModelError("No base model is chosen for this session yet. Choose one in the "
                         "notebook's base model cell (or 'fastsd session create NAME --model').")
    ws = Workspace.current(ws)
    name = os.fspath(name)
    if registry.get(name) is not None:
        return registry.ensure(name, ws)
    if fetch.is_link(name):
        return converted(fetch.link_file(name, ws.downloads, ws.hub_cache), ws)
    path = Path(name).expanduser()
    if (path / "model_index.json").is_file():
        return path
    if path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return converted(path, ws)
    if not path.exists() and name.count("/") == 1 and not name.startswith(("/", ".", "~")):
        folder = fetch.hf_snapshot(name, ws.hub_cache, DIFFUSERS_FILES, DIFFUSERS_SKIP,
                                   what="base model")
        if not (folder / "model_index.json").is_file():
            raise ModelError(f"{name!r} on the Hugging Face Hub is not a diffusers model (it "
                             "has no model_index.json). For a single .safetensors file, give "
                             "its link (…/resolve/main/FILE.safetensors) instead.")
        return folder
    raise ModelError(
        f"Model {name!r} is neither a registry model ({', '.join(registry.entries())}), "
        "a Hugging Face repo id (owner/name), a diffusers folder with a model_index.json, nor "
        "a .safetensors/.ckpt file or a link to one. Give one of those.")


def converted(file: Path, ws: Workspace) -> Path:
    """The diffusers folder made from the single file ``file``, converted once.

    The folder is named after the file and a digest of its name, size and modification
    time, so a changed file is converted again and an unchanged one never twice.
    """
    from fastsd.convert import to_diffusers

    st = file.stat()
    digest = hashlib.sha256(f"{file.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()
                            ).hexdigest()[:10]
    out = ws.converted / f"{file.stem}-{digest}"
    if not (out / "model_index.json").is_file():
        to_diffusers(file, out, root=ws)
    if not (out / SOURCE_RECORD).is_file():  # folders converted before the record existed too
        drive.atomic_write_json(out / SOURCE_RECORD, {"file": str(file.resolve()),
                                                      "size": st.st_size,
                                                      "mtime": int(st.st_mtime)})
    return out


def source_file(folder: Path) -> Path | None:
    """The single file the converted ``folder`` was made from, while it is still there
    unchanged; None for any other folder."""
    record = Path(folder) / SOURCE_RECORD
    if not record.is_file():
        return None
    src = drive.read_json(record)
    file = Path(src["file"])
    if not file.is_file():
        return None
    st = file.stat()
    return file if (st.st_size, int(st.st_mtime)) == (src["size"], src["mtime"]) else None
