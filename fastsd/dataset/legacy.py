"""Sessions made by fast-stable-diffusion (TheLastBen's notebook), imported into fastsd.

Its sessions live in ``MyDrive/Fast-Dreambooth/Sessions/NAME`` (the same Drive folder as
fastsd's workspace, capital S): ``instance_images/`` with the photos, ``captions/`` with one
``STEM.txt`` per photo, and, once trained, the model as ``NAME.ckpt`` or
``NAME.safetensors`` (sometimes also ``NAME_step_N.ckpt`` saves), or a diffusers folder.

:func:`import_session` makes a fastsd session from one: the photos and their captions go
through the ordinary import (validated, deduplicated, captions paired by stem), and the
trained model, where there is one, becomes the new session's base model, so training
continues from it. The old folder is only read.

A session shared with you comes the same way: a Google Drive share link to its folder, or
to a ``.zip`` of it (downloaded by :mod:`fastsd.fetch`, offline it fails at once), or such a
``.zip`` on Drive. Its folder may be fast-stable-diffusion's or fastsd's own (photos in
``instance_images/originals/``, the trained model in ``models/``); its trained model is
copied into the workspace's ``models/downloads/sessions/`` to stay the base model.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fastsd import drive, fetch, options, session as sessions
from fastsd.dataset import images
from fastsd.errors import DataError
from fastsd.workspace import Workspace

log = logging.getLogger("fastsd")

LEGACY_DIR = "Sessions"  # under the workspace: Fast-Dreambooth/Sessions/NAME
MODEL_SUFFIXES = (".safetensors", ".ckpt")
_STEP = re.compile(r"_step_(\d+)$")


@dataclass
class LegacyImport:
    session: sessions.Session
    report: images.ImportReport
    model: Path | None

    def __str__(self) -> str:
        base = self.session.settings.get("base_model")
        model = (f"base model: the trained model {self.model}" if self.model else
                 f"no trained model found: the session's base model is {base}" if base else
                 "no trained model found: choose the base model next ("
                 f"{options.say('base_model', session=self.session.name)})")
        return (f"Imported into session {self.session.name}: {self.report.summary()}\n"
                f"{model}")


def legacy_sessions(root: Workspace | Path | None = None) -> list[str]:
    """Names of fast-stable-diffusion sessions in the workspace's ``Sessions/`` folder."""
    folder = Workspace.current(root).root / LEGACY_DIR
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / "instance_images").is_dir())


def find_model(folder: Path) -> Path | None:
    """The trained model in a session folder (fast-stable-diffusion's, or fastsd's with its
    ``models/``), or None.

    ``NAME.safetensors``/``NAME.ckpt`` first, then a diffusers folder, then the intermediate
    save with the highest step.
    """
    places = [folder] + ([folder / "models"] if (folder / "models").is_dir() else [])
    for where in places:
        for suffix in MODEL_SUFFIXES:
            if (where / f"{folder.name}{suffix}").is_file():
                return where / f"{folder.name}{suffix}"
    for where in places:
        for p in sorted(where.iterdir()):
            if p.is_dir() and (p / "model_index.json").is_file():
                return p
    steps = [(int(m.group(1)), p) for p in folder.iterdir()
             if p.is_file() and p.suffix in MODEL_SUFFIXES and (m := _STEP.search(p.stem))]
    return max(steps)[1] if steps else None


def _files(folder: Path) -> list[tuple[str, Path]]:
    """The photos, and each caption as a ``STEM.txt`` beside them (the import pairs them).
    A fastsd session's photos are its originals (the top level holds their crops)."""
    photos = folder / "instance_images"
    if (photos / "originals").is_dir():
        photos = photos / "originals"
    pics = [(p.name, p) for p in sorted(photos.iterdir())
            if p.is_file() and p.suffix.lower() in images.IMAGE_EXTS]
    caps = folder / "captions"
    stems = {p.stem for _, p in pics}
    txt = [(f"captions/{p.name}", p) for p in sorted(caps.glob("*.txt"))
           if p.stem in stems] if caps.is_dir() else []
    return pics + txt


def _session_in(path: Path, tmp: Path) -> Path:
    """The session folder (the one holding ``instance_images/``) in a downloaded or given
    folder or ``.zip``, the shallowest there is (zips inside a folder are unpacked too)."""
    if path.is_file() and path.suffix.lower() == ".zip":
        images.extract_zip(path, tmp / path.stem)
        path = tmp / path.stem
    elif path.is_dir():
        for z in sorted(path.rglob("*.zip")):
            images.extract_zip(z, tmp / "unzipped" / z.stem)
    found = sorted((p.parent for base in (path, tmp) if base.is_dir()
                    for p in [base / "instance_images", *base.rglob("instance_images")]
                    if p.is_dir()), key=lambda p: (len(p.parts), str(p)))
    if not found:
        raise DataError(f"{path.name} holds no session: no folder in it has an "
                        "instance_images/ folder. Share the session's folder itself, or a "
                        ".zip of it.")
    return found[0]


def _keep_model(model: Path, source: str, ws: Workspace) -> Path:
    """A copy of a shared session's trained model in the workspace, where it stays the
    new session's base model (the download it came in is temporary)."""
    key = hashlib.sha256(source.encode()).hexdigest()[:10]
    dest = ws.downloads / "sessions" / key / model.name
    if model.is_dir():
        return drive.copy_tree(model, dest)
    return drive.copy_file(model, dest)


def import_session(source: str | Path, name: str | None = None,
                   root: Workspace | Path | None = None, **settings) -> LegacyImport:
    """Make fastsd session ``name`` (default: the old session's name) from a
    fast-stable-diffusion session folder, the name of one in ``WORKSPACE/Sessions``, a
    Google Drive share link to a shared session (its folder, or a ``.zip`` of it), or such
    a ``.zip``."""
    ws = Workspace.current(root)
    text = str(source).strip()
    shared = fetch.is_link(text) or text.lower().endswith(".zip")
    if shared:
        with tempfile.TemporaryDirectory(prefix="fastsd-shared-") as tmp:
            got = Path(text).expanduser() if not fetch.is_link(text) else None
            if got is None:
                if not fetch.is_drive_link(text):
                    raise DataError(f"{fetch.shown(text)} is not a Google Drive link. Share "
                                    "the session's folder (or a .zip of it) on Drive and give "
                                    "that link.")
                got = fetch.drive_link(text, Path(tmp) / "download")
            elif not got.is_file():
                raise DataError(f"{got} does not exist. Give the .zip of a session, its "
                                "folder, or a Drive share link to either.")
            folder = _session_in(got, Path(tmp))
            model = find_model(folder)
            if model is not None:
                model = _keep_model(model, text, ws)
            return _import(folder, name, ws, model, settings)
    folder = Path(source).expanduser()
    if not folder.is_dir() and "/" not in str(source):
        folder = ws.root / LEGACY_DIR / str(source)
    if not (folder / "instance_images").is_dir():
        known = ", ".join(legacy_sessions(ws)) or "none"
        raise DataError(f"{folder} is not a fast-stable-diffusion session: it has no "
                        f"instance_images/ folder (sessions found in {ws.root / LEGACY_DIR}: "
                        f"{known}). Give the session's folder or its name.")
    return _import(folder, name, ws, find_model(folder), settings)


def _import(folder: Path, name: str | None, ws: Workspace, model: Path | None,
            settings: dict) -> LegacyImport:
    """The new session from the session folder ``folder``, its trained model ``model``
    (kept where it is) the base model."""
    files = _files(folder)
    if not any(p.suffix.lower() != ".txt" for _, p in files):
        raise DataError(f"{folder / 'instance_images'} holds no files to import.")
    if model is not None:
        settings["base_model"] = str(model)
    s = sessions.create(name or folder.name, ws, **settings)
    done = LegacyImport(s, images.import_files(s, files), model)
    log.info("%s", done)
    return done
