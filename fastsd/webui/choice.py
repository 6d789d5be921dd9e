"""The model webui.ipynb's model cell chose, for the cells after it.

The model cell calls :func:`choose`; the launch cell asks :func:`chosen`, which in a new or
restarted runtime says which cell to run first instead of failing on a missing variable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastsd import options, session as sessions
from fastsd.convert.detect import detect_folder
from fastsd.errors import FastSDError, ModelError
from fastsd.models import resolve_model, tiny
from fastsd.models.upload import trained_model
from fastsd.workspace import Workspace


@dataclass(frozen=True)
class Choice:
    """A session's trained model (``session`` set) or any other model, as a folder; for a
    session that trained a LoRA (and has no trained model), its base model and ``lora``."""

    root: Workspace
    session: str | None
    model: Path
    family: str
    lora: Path | None = None

    @property
    def tiny(self) -> bool:
        """Whether it is a tiny test model (fastsd.models.tiny), which only tiny ControlNets
        fit."""
        return tiny.is_tiny_model(self.model)

    @property
    def model_name(self) -> str | None:
        """What the launcher takes as ``model``: None for a session (its own model)."""
        return None if self.session else str(self.model)


_chosen: Choice | None = None


def choose(session: str = "", model: str = "", root: Workspace | Path | None = None) -> Choice:
    """The trained model of ``session`` when one is named (its base model when it trained
    a LoRA and no model), else ``model`` (any name :func:`fastsd.models.resolve_model`
    takes), remembered for :func:`chosen`."""
    global _chosen
    ws = Workspace.current(root)
    lora = None
    if session:
        s = sessions.load(session, ws)
        try:
            folder = trained_model(s)
        except ModelError:
            lora = s.lora()
            if lora is None:
                raise
            folder = resolve_model(s.base_model, ws)  # the server loads it too
    else:
        folder = resolve_model(model, ws)
    _chosen = Choice(ws, sessions.validate_name(session) if session else None, folder,
                     detect_folder(folder).family, lora)
    return _chosen


def chosen() -> Choice:
    """What :func:`choose` chose last in this process, or a FastSDError saying which cell
    to run first."""
    if _chosen is None:
        raise FastSDError("No model is chosen in this runtime (a new or restarted one): "
                          f"{options.run('model')} first.")
    return _chosen
