"""Models: the registry, the embedded tiny models, local copies of models on Drive, and
the one resolver from a model name to a folder.

:func:`resolve_model` is the only place that turns what a user names as a model into a
local diffusers folder; the trainer, the converter's callers, the demo and the generation
engine all go through it, then load from :func:`local_copy` (a model on Drive copied to
local disk first).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fastsd import drive, fetch, options
from fastsd.errors import ModelError
from fastsd.models.local import local_copy  # noqa: F401  (models.local_copy(path) -> a local path)
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
                  ws: Workspace | Path | None = None, temp_storage: bool = False) -> Path:
    """The local diffusers folder for a model name.

    Where a model is downloaded (and converted) to is decided here: into the workspace on
    Drive, kept for later runtimes; with ``temp_storage`` onto the runtime's own disk
    (:meth:`Workspace.on_local_disk`; the notebook's Use_Temp_Storage), fetched again in each
    new runtime, Drive untouched. A registry model already whole on Drive is used from there.

    * a registry name (``sd15``, ``sd21``, ``sdxl``, ``tiny-sd1``...; ``fastsd models list``):
      downloaded once (fp16, without the safety checker), tiny ones built offline;
    * a path to a diffusers folder (with a model_index.json): used as it is;
    * a path to a single ``.safetensors``/``.ckpt`` file, or a link to one (Google Drive,
      Hugging Face, civitai or any HTTP(S) URL): downloaded once, converted to diffusers
      once, and the converted folder kept in the workspace for later runtimes;
    * a Hugging Face repo id (owner/name): downloaded once into the workspace's cache.
    """
    from fastsd.models import registry

    if not name:  # a session's unset base model is refused earlier (Session.base_model)
        raise ModelError("No model was named. Give a registry name ('fastsd models list'), "
                         "a Hugging Face repo id, a diffusers folder, or a .safetensors/.ckpt "
                         "file or a link to one.")
    ws = Workspace.current(ws)
    name = os.fspath(name)
    entry = registry.get(name)
    if temp_storage and not (entry is not None and registry.is_whole(registry.folder(entry,
                                                                                     ws))):
        ws = ws.on_local_disk()
    if entry is not None:
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


def base_model(session) -> Path:
    """The local folder of a session's base model, where the session keeps it (its
    ``temp_storage`` setting: Drive, or the runtime's disk)."""
    return resolve_model(session.base_model, session.workspace,
                         temp_storage=bool(session.settings.get("temp_storage")))


def storage_report(name: str, ws: Workspace | Path | None = None,
                   temp_storage: bool = False) -> str:
    """What keeping the base model ``name`` on Drive or on this runtime's disk takes: its
    size (what the registry knows) and the free space of each place."""
    from fastsd.models import registry

    ws = Workspace.current(ws)
    entry = registry.get(name)
    if entry is not None and entry.tiny:
        size = "a few MB"
    elif entry is not None and entry.download_gb:
        size = f"about {entry.download_gb:.1f} GB"
    else:
        size = "its size is known once it is downloaded"
    local = ws.on_local_disk().models
    on_drive = entry is not None and registry.is_whole(registry.folder(entry, ws))
    chosen = "this runtime's disk" if temp_storage and not on_drive else "Drive"
    return (f"Base model {name}: {size}, kept on {chosen}"
            + (" (already there)" if on_drive else "") + ". "
            f"Drive: {drive.gb(drive.free_bytes(ws.root))} free, the model is downloaded "
            f"once and kept for later runtimes. This runtime's disk: "
            f"{drive.gb(drive.free_bytes(local))} free, the model is downloaded again in "
            "each new runtime and Drive is untouched ("
            f"{options.say(('temp_storage', False) if temp_storage else 'temp_storage')}).")


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
