"""Sessions: one Drive folder per subject, the only state that outlives a Colab runtime.

A new session folder is a copy of ``sessions_template/`` (at the top of the repository,
installed inside the package as ``fastsd.sessions_template``): a README.txt that says what is
where and the folders instance_images/, captions/, checkpoints/, models/, outputs/ (the
``.keep`` files that hold them in git are not copied), plus ``session.json``, the schema
version and settings.
"""

from __future__ import annotations

import logging
import re
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastsd import drive, options
from fastsd.errors import (ConfirmationNeeded, DataError, InvalidName, SchemaError,
                           SessionExists, SessionNotFound)
from fastsd.workspace import Workspace

Root = Workspace | Path | None  # a workspace, its folder, or None for this runtime's

log = logging.getLogger("fastsd")

SCHEMA_VERSION = 3
SESSION_FILE = "session.json"
MAX_NAME = 64
TEMPLATE = "fastsd.sessions_template"  # sessions_template/, installed as package data
NOT_COPIED = {".keep", "__init__.py", "__pycache__"}  # what makes the template a package in git
FOLDERS = ("instance_images", "captions", "checkpoints", "models", "outputs")

DEFAULT_SETTINGS: dict[str, Any] = {
    # None until the user chooses one (the notebook's base model cell, or --model): a
    # session never trains a model it was not given.
    "base_model": None,
    "instance_token": "sks",
    "class_word": "person",
    "resolution": 512,
}
# How long each training stage runs unless told otherwise, in steps: TrainSettings'
# defaults, and the plan the image check measures a set of photos against before a run.
DEFAULT_UNET_STEPS = 1500
DEFAULT_TEXT_STEPS = 350


def validate_name(name: str) -> str:
    """Return the folder name for ``name``, or raise InvalidName saying why it can't be one.

    Spaces become underscores (logged, so the user is told); everything else that can't be
    a single, safe folder name on Drive is refused.
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidName("The session name is empty. Give it a name such as 'my_dog'.")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise InvalidName(f"The session name {name!r} contains control characters "
                          "(such as a newline or tab). Use letters, digits, '-' and '_'.")
    if "/" in name or "\\" in name:
        raise InvalidName(f"The session name {name!r} contains a path separator ('/' or '\\'). "
                          "A session name is one folder name: use '-' or '_' instead.")
    clean = name.strip()
    if clean in (".", "..") or ".." in clean:
        raise InvalidName(f"The session name {name!r} contains '..', which would point "
                          "outside the sessions folder. Choose another name.")
    if " " in clean:
        fixed = re.sub(r" +", "_", clean)
        log.warning("Session name %r has spaces; using %r instead.", name, fixed)
        clean = fixed
    if len(clean) > MAX_NAME:
        raise InvalidName(f"The session name is {len(clean)} characters long; the limit is "
                          f"{MAX_NAME}. Choose a shorter name.")
    return clean


# --------------------------------------------------------------------------- schema

def _migrate_1_to_2(data: dict) -> dict:
    # Version 1 kept the settings at the top level beside the name, and named the token
    # and class "token" and "class_name".
    renames = {"token": "instance_token", "class_name": "class_word"}
    settings = {renames.get(k, k): v for k, v in data.items()
                if k not in ("version", "name", "created")}
    return {"schema_version": 2, "name": data.get("name"),
            "created": data.get("created", time.time()), "settings": settings}


TEST_MODEL = "tiny-sd1"


def _migrate_2_to_3(data: dict) -> dict:
    # Version 2 filled in the tiny random test model as the base model of every session
    # created without one (the notebook's session cell), and the base model cell then kept
    # it. No user chose it: unset it, so the base model cell (or --model) names the real one.
    settings = dict(data.get("settings", {}))
    if settings.get("base_model") == TEST_MODEL:
        settings["base_model"] = None
        log.warning("Session %s had the tiny test model as its base model, set by an earlier "
                    "fastsd by mistake; it now has none: choose one (%s).", data.get("name"),
                    options.say("base_model", session=str(data.get("name"))))
    return {**data, "schema_version": 3, "settings": settings}


MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: _migrate_1_to_2, 2: _migrate_2_to_3}


def _schema_version(data: dict) -> int:
    return int(data.get("schema_version", data.get("version", 1)))


def migrate(data: dict) -> dict:
    """Bring ``data`` from session.json up to SCHEMA_VERSION."""
    version = _schema_version(data)
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"This session was written by a newer fastsd (schema {version}; this one reads up "
            f"to {SCHEMA_VERSION}). Update fastsd (re-run the install cell) to open it.")
    while version < SCHEMA_VERSION:
        data = MIGRATIONS[version](data)
        version = _schema_version(data)
    return data


# --------------------------------------------------------------------------- Session

@dataclass
class Session:
    name: str
    path: Path
    workspace: Workspace
    settings: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0

    # folders -------------------------------------------------------------
    @property
    def instance_images(self) -> Path:
        return self.path / "instance_images"

    @property
    def captions(self) -> Path:
        return self.path / "captions"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def models(self) -> Path:
        return self.path / "models"

    @property
    def loras(self) -> Path:
        """The session's trained LoRAs (models/Lora, AUTOMATIC1111's folder name): the web
        UI lists them and reads them from here."""
        return self.models / "Lora"

    def lora(self, name: str | None = None) -> Path | None:
        """The newest trained LoRA file in :attr:`loras` (or the one named), else None."""
        found = sorted(self.loras.glob("*.safetensors"), key=lambda p: p.stat().st_mtime) \
            if self.loras.is_dir() else []
        found = [p for p in found if not name or p.stem == name]
        return found[-1] if found else None

    @property
    def outputs(self) -> Path:
        return self.path / "outputs"

    @property
    def file(self) -> Path:
        return self.path / SESSION_FILE

    @property
    def base_model(self) -> str:
        """The name of the base model (what :func:`fastsd.models.resolve_model` takes), or
        a DataError that says how to choose one."""
        name = self.settings.get("base_model")
        if not name:
            raise DataError(f"Session {self.name} has no base model yet. Choose one: "
                            f"{options.say('base_model', session=self.name)}.")
        return str(name)

    # persistence ---------------------------------------------------------
    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "name": self.name, "created": self.created,
                "settings": self.settings}

    def save(self) -> None:
        drive.atomic_write_json(self.file, self.to_dict())

    def update(self, **settings: Any) -> "Session":
        """Change settings and save them at once."""
        self.settings.update(settings)
        self.save()
        return self

    def summary(self) -> dict:
        def count(folder: Path) -> int:
            """Files, or for checkpoints/ the checkpoint folders (temporaries left out)."""
            if not folder.is_dir():
                return 0
            want_dirs = folder.name == "checkpoints"
            return sum(1 for p in folder.iterdir() if not drive.is_temporary(p)
                       and not p.name.startswith(".")
                       and (p.is_dir() if want_dirs else p.is_file()))

        return {"name": self.name, "path": str(self.path), "settings": self.settings,
                **{f: count(self.path / f) for f in FOLDERS}}


def _session_path(name: str, ws: Workspace) -> Path:
    return ws.sessions / validate_name(name)


def create(name: str, root: Root = None, **settings: Any) -> Session:
    """Create a session (its folders and README) with the given settings."""
    ws = Workspace.current(root)
    path = _session_path(name, ws)
    if path.exists():
        raise SessionExists(f"A session named {path.name!r} already exists at {path}. "
                            "Load it, or choose another name.")
    with drive.folder_writer(path) as tmp:
        for rel, entry in template():
            if entry.is_dir():
                (tmp / rel).mkdir(parents=True, exist_ok=True)
            else:
                (tmp / rel).write_bytes(entry.read_bytes())
        for f in FOLDERS:  # an install built from a copy without dotfiles (as the install
            (tmp / f).mkdir(exist_ok=True)  # cell makes) lacks the .keep files that hold them
        session = Session(path.name, tmp, ws, {**DEFAULT_SETTINGS, **settings}, time.time())
        session.save()
    session.path = path
    return session


def template() -> list[tuple[str, Any]]:
    """What a new session is made of: (relative path, entry) of every folder and file of the
    session template, each folder before what it holds (:data:`NOT_COPIED` left out)."""
    from importlib import resources

    out: list[tuple[str, Any]] = []

    def walk(node, prefix: str) -> None:
        for child in sorted(node.iterdir(), key=lambda c: c.name):
            rel = f"{prefix}{child.name}"
            if child.name in NOT_COPIED:
                continue
            out.append((rel, child))
            if child.is_dir():
                walk(child, rel + "/")

    walk(resources.files(TEMPLATE), "")
    return out


def load(name: str, root: Root = None) -> Session:
    """Load a session, migrating an older session.json in place."""
    ws = Workspace.current(root)
    path = _session_path(name, ws)
    file = path / SESSION_FILE
    if not file.is_file():
        known = ", ".join(list_sessions(ws)) or "none yet"
        raise SessionNotFound(f"No session named {path.name!r} in {path.parent} "
                              f"(sessions: {known}). Create it first.")
    try:
        raw = drive.read_json(file)
    except ValueError as e:
        raise SchemaError(f"{file} is not valid JSON ({e}). Restore it from Drive's version "
                          "history, or delete the session and create it again.") from e
    data = migrate(raw)
    session = Session(path.name, path, ws, {**DEFAULT_SETTINGS, **data.get("settings", {})},
                      data.get("created", 0.0))
    if _schema_version(raw) != SCHEMA_VERSION:
        log.info("Migrated session %s from schema %s to %s", session.name,
                 _schema_version(raw), SCHEMA_VERSION)
        session.save()
    for f in FOLDERS:
        if not (path / f).is_dir():
            drive.make_folder(path / f)
    return session


_current: tuple[str, Workspace] | None = None  # what open() opened last in this process


@dataclass
class Opened:
    """What :func:`open` did: the session, whether it was created, and each setting it
    changed (``changed``) or kept against the caller's wish (``kept``), as (old, new)."""

    session: Session
    created: bool = False
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    kept: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def __str__(self) -> str:
        s = self.session
        lines = [f"{'Created' if self.created else 'Loaded'} session {s.name}: {s.path}"]
        lines += [f"  changed {k}: {old!r} -> {new!r}" for k, (old, new) in self.changed.items()]
        if self.kept:
            change = [(k, new) for k, (_, new) in self.kept.items() if k in options.OPTIONS]
            ticks = sorted({"change_base_model" if k == "base_model" else "change_settings"
                            for k in self.kept})
            lines.append("  kept the session's settings (the form differs; to change them, "
                         f"{options.say(*change, *ticks, session=s.name)}):")
            lines += [f"    {k}: {old!r} (the form says {new!r})"
                      for k, (old, new) in self.kept.items()]
        return "\n".join(lines)


def open(name: str, root: Root = None, settings: dict[str, Any] | None = None,
         change: bool = False) -> Opened:
    """Open session ``name``, creating it with ``settings`` when it does not exist.

    Loading an existing session never changes its settings: a setting that differs from
    ``settings`` is kept and reported in ``kept``. With ``change=True`` those settings are
    changed and reported in ``changed``. A setting the session has not chosen yet (None)
    is filled in from ``settings`` without ``change``.
    """
    global _current
    settings = {k: v for k, v in (settings or {}).items() if v is not None}
    try:
        session = load(name, root)
    except SessionNotFound:
        session = create(name, root, **settings)
        _current = (session.name, session.workspace)
        return Opened(session, created=True)
    _current = (session.name, session.workspace)
    opened = Opened(session)
    for key, new in settings.items():
        old = session.settings.get(key)
        if old == new:
            continue
        if old is None or change:
            opened.changed[key] = (old, new)
        else:
            opened.kept[key] = (old, new)
    if opened.changed:
        session.update(**{k: new for k, (_, new) in opened.changed.items()})
        log.info("Changed %s of session %s", ", ".join(opened.changed), session.name)
    return opened


def current() -> Session:
    """The session this process opened last with :func:`open` (a notebook's session
    cell), loaded again from its folder, so a later cell sees what the earlier ones
    saved. In a runtime that opened none (a restarted one), a FastSDError that says which
    cell to run first."""
    if _current is None:
        raise SessionNotFound("No session is open in this runtime (a new or restarted one): "
                              f"{options.run('session')} first.")
    return load(*_current)


def list_sessions(root: Root = None) -> list[str]:
    base = Workspace.current(root).sessions
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if (p / SESSION_FILE).is_file())


def delete(name: str, root: Root = None, confirm: bool = False) -> Path:
    """Delete a session folder. ``confirm=True`` is required; nothing outside it is touched."""
    ws = Workspace.current(root)
    path = _session_path(name, ws)
    if not confirm:
        raise ConfirmationNeeded(f"Deleting {path.name!r} removes its images, checkpoints and models. "
                          "Pass confirm=True (CLI: --yes) to delete it.")
    if not (path / SESSION_FILE).is_file():
        raise SessionNotFound(f"No session named {path.name!r} in {path.parent}.")
    base = ws.sessions.resolve()
    real = path.resolve()
    if real.parent != base or path.is_symlink():
        raise InvalidName(f"{path} is a link or lies outside {base}; not deleting it. "
                          "Remove it by hand if you are sure.")
    drive.delete(real)
    return real
