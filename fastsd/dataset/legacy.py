"""Sessions made by fast-stable-diffusion (TheLastBen's notebook), imported into fastsd.

Its sessions live in ``MyDrive/Fast-Dreambooth/Sessions/NAME`` (the same Drive folder as
fastsd's workspace, capital S): ``instance_images/`` with the photos, ``captions/`` with one
``STEM.txt`` per photo, and, once trained, the model as ``NAME.ckpt`` or
``NAME.safetensors`` (sometimes also ``NAME_step_N.ckpt`` saves), or a diffusers folder.

:func:`import_session` makes a fastsd session from one: the photos and their captions go
through the ordinary import (validated, deduplicated, captions paired by stem), and the
trained model, where there is one, becomes the new session's base model, so training
continues from it. The old folder is only read.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from fastsd import options, session as sessions
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
    """The trained model in a fast-stable-diffusion session folder, or None.

    ``NAME.safetensors``/``NAME.ckpt`` first, then a diffusers folder, then the intermediate
    save with the highest step.
    """
    for suffix in MODEL_SUFFIXES:
        if (folder / f"{folder.name}{suffix}").is_file():
            return folder / f"{folder.name}{suffix}"
    for p in sorted(folder.iterdir()):
        if p.is_dir() and (p / "model_index.json").is_file():
            return p
    steps = [(int(m.group(1)), p) for p in folder.iterdir()
             if p.is_file() and p.suffix in MODEL_SUFFIXES and (m := _STEP.search(p.stem))]
    return max(steps)[1] if steps else None


def _files(folder: Path) -> list[tuple[str, Path]]:
    """The photos, and each caption as a ``STEM.txt`` beside them (the import pairs them)."""
    pics = [(p.name, p) for p in sorted((folder / "instance_images").iterdir()) if p.is_file()]
    caps = folder / "captions"
    stems = {p.stem for _, p in pics}
    txt = [(f"captions/{p.name}", p) for p in sorted(caps.glob("*.txt"))
           if p.stem in stems] if caps.is_dir() else []
    return pics + txt


def import_session(source: str | Path, name: str | None = None,
                   root: Workspace | Path | None = None, **settings) -> LegacyImport:
    """Make fastsd session ``name`` (default: the old session's name) from a
    fast-stable-diffusion session folder, or the name of one in ``WORKSPACE/Sessions``."""
    ws = Workspace.current(root)
    folder = Path(source).expanduser()
    if not folder.is_dir() and "/" not in str(source):
        folder = ws.root / LEGACY_DIR / str(source)
    if not (folder / "instance_images").is_dir():
        known = ", ".join(legacy_sessions(ws)) or "none"
        raise DataError(f"{folder} is not a fast-stable-diffusion session: it has no "
                        f"instance_images/ folder (sessions found in {ws.root / LEGACY_DIR}: "
                        f"{known}). Give the session's folder or its name.")
    files = _files(folder)
    if not any(p.suffix.lower() != ".txt" for _, p in files):
        raise DataError(f"{folder / 'instance_images'} holds no files to import.")
    model = find_model(folder)
    if model is not None:
        settings["base_model"] = str(model)
    s = sessions.create(name or folder.name, ws, **settings)
    report = images.import_files(s, files)
    done = LegacyImport(s, report, model)
    log.info("%s", done)
    return done
