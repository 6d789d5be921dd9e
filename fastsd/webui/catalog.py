"""The checkpoints, LoRAs and ControlNets a server may load: the session's models/ and the
workspace's models/ (and the LoRAs the workspace's sessions trained), nothing else.

Clients name a checkpoint or a LoRA; the name is looked up here and never used as a path,
so no request can make the server read a file outside those folders. A trained session's
models/ holds NAME/ (diffusers) and NAME.safetensors (the same weights as one file): they
are one checkpoint, loaded from the folder. ControlNets live in models/controlnet/ (where
the registry and the notebook put them) or models/ControlNet/ (A1111's name): a diffusers
folder each, or a single ``.safetensors`` file.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from fastsd import options
from fastsd.errors import ModelError
from fastsd.models import tiny

log = logging.getLogger("fastsd")

SINGLE_SUFFIXES = (".safetensors", ".ckpt")
LORA_DIRS = ("Lora", "lora", "loras")
CONTROLNET_DIRS = ("controlnet", "ControlNet")
SKIP_DIRS = {"hub", "downloads", "converted", *LORA_DIRS, *CONTROLNET_DIRS}


def quick_hash(path: Path) -> str:
    """A 10-hex fingerprint from the size and first MiB of a file (or a folder's UNet),
    cheap enough to list a Drive folder of multi-GB models."""
    if path.is_dir():
        weights = sorted((path / "unet").glob("*.safetensors")) or sorted(path.rglob("*.json"))
        path = weights[0] if weights else path / "model_index.json"
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()[:10]


@dataclass
class Checkpoint:
    name: str  # the file or folder name shown to users ("demo.safetensors", "tiny-sd1")
    folder: Path | None  # diffusers folder, when there is one
    file: Path | None  # single file, when there is one
    hash: str

    @property
    def model_name(self) -> str:
        return self.name.rsplit(".", 1)[0] if self.name.endswith(SINGLE_SUFFIXES) else self.name

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]"

    @property
    def path(self) -> Path:
        return self.folder or self.file  # type: ignore[return-value]

    def to_api(self) -> dict:
        return {"title": self.title, "model_name": self.model_name, "hash": self.hash,
                "sha256": None, "filename": str(self.file or self.folder), "config": None}


@dataclass
class Lora:
    name: str
    path: Path

    def to_api(self) -> dict:
        return {"name": self.name, "alias": self.name, "path": str(self.path), "metadata": {}}


@dataclass
class ControlModel:
    """A ControlNet, listed as the ControlNet extension lists them: ``name [hash]``."""

    name: str
    path: Path  # a diffusers folder (config.json and weights) or a .safetensors file
    hash: str
    tiny: bool = False  # a tiny test ControlNet (fastsd.models.tiny): listed for tiny models

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash[:8]}]"

    def to_api(self) -> dict:
        return {"title": self.title, "name": self.name, "path": str(self.path)}


def _controlnet_at(p: Path) -> ControlModel | None:
    if p.name.startswith("."):
        return None
    if p.is_dir():
        config = p / "config.json"
        weights = sorted(p.glob("*.safetensors"))
        if not config.is_file() or not weights:
            return None
        try:
            import json

            data = json.loads(config.read_text(encoding="utf-8"))
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("_class_name") != "ControlNetModel":
            return None
        return ControlModel(p.name, p, quick_hash(weights[0]), tiny.is_tiny(data))
    if p.is_file() and p.suffix == ".safetensors":
        return ControlModel(p.stem, p, quick_hash(p))
    return None


def _is_checkpoint_file(path: Path) -> bool:
    if path.suffix == ".ckpt":
        return True
    from fastsd.convert.detect import detect_file

    try:
        return detect_file(path).kind == "checkpoint"
    except Exception as e:  # an unreadable file is listed as nothing, and said so
        log.warning("Not listing %s: %s", path, e)
        return False


class Catalog:
    """What ``folders`` (searched in order) hold, and the LoRAs in ``lora_folders`` (the
    workspace's sessions' trained LoRAs, read where they are), re-read by :meth:`refresh`."""

    def __init__(self, folders: list[Path], lora_folders: list[Path] = ()):
        self.folders = [Path(f) for f in folders]
        self.lora_folders = [Path(f) for f in lora_folders]
        self.extra: list[Checkpoint] = []  # models the server's owner named on the CLI
        self._checkpoints: list[Checkpoint] = []
        self._loras: list[Lora] = []
        self._controlnets: list[ControlModel] = []
        self.refresh()

    def refresh(self) -> None:
        seen: dict[str, Checkpoint] = {}
        loras: dict[str, Lora] = {}
        controls: dict[str, ControlModel] = {}
        for base in self.folders:
            if not base.is_dir():
                continue
            for d in CONTROLNET_DIRS:
                for p in sorted((base / d).iterdir()) if (base / d).is_dir() else []:
                    c = _controlnet_at(p)
                    if c is not None:
                        controls.setdefault(c.name.lower(), c)
            for d in LORA_DIRS:
                for f in sorted((base / d).glob("*.safetensors")) if (base / d).is_dir() else []:
                    loras.setdefault(f.stem, Lora(f.stem, f))
            for p in sorted(base.iterdir()):
                if p.name.startswith(".") or p.name in SKIP_DIRS:
                    continue
                if p.is_dir() and (p / "model_index.json").is_file():
                    single = next((p.with_suffix(s) for s in SINGLE_SUFFIXES
                                   if p.with_suffix(s).is_file()), None)
                    c = Checkpoint(single.name if single else p.name, p, single, quick_hash(p))
                elif p.is_file() and p.suffix in SINGLE_SUFFIXES and not p.with_suffix("").is_dir():
                    if not _is_checkpoint_file(p):
                        if p.suffix == ".safetensors":
                            loras.setdefault(p.stem, Lora(p.stem, p))
                        continue
                    c = Checkpoint(p.name, None, p, quick_hash(p))
                else:
                    continue
                seen.setdefault(c.name.lower(), c)
        for folder in self.lora_folders:
            for f in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
                loras.setdefault(f.stem, Lora(f.stem, f))
        for c in self.extra:
            seen.setdefault(c.name.lower(), c)
        self._checkpoints = list(seen.values())
        self._loras = list(loras.values())
        self._controlnets = list(controls.values())

    def add(self, path: Path) -> Checkpoint:
        """A model the server's owner named (any folder or file); listed from then on."""
        path = Path(path)
        for c in self._checkpoints:
            if path in (c.folder, c.file):
                return c
        c = Checkpoint(path.name, path if path.is_dir() else None,
                       path if path.is_file() else None, quick_hash(path))
        self.extra.append(c)
        self.refresh()
        return self.find(c.title)

    def checkpoints(self) -> list[Checkpoint]:
        return list(self._checkpoints)

    def loras(self) -> list[Lora]:
        return list(self._loras)

    def find(self, name: str) -> Checkpoint:
        """The checkpoint a client names by title, file name or model name (any case)."""
        key = (name or "").strip().lower()
        for c in self._checkpoints:
            if key in (c.title.lower(), c.name.lower(), c.model_name.lower(),
                       f"{c.model_name} [{c.hash}]".lower()):
                return c
        known = ", ".join(c.title for c in self._checkpoints) or "none"
        raise ModelError(f"Unknown checkpoint {name!r}. Known: {known}. Put models in the "
                         "session's or the workspace's models/ folder and refresh checkpoints.")

    def controlnets(self, tiny: bool = False) -> list[ControlModel]:
        """The ControlNets found; the tiny test ones only with ``tiny`` (a tiny model)."""
        return [c for c in self._controlnets if tiny or not c.tiny]

    def controlnet(self, name: str) -> ControlModel:
        """The ControlNet a client names by title (``name [hash]``) or name (any case)."""
        key = (name or "").strip().lower()
        for c in self._controlnets:
            if key in (c.title.lower(), c.name.lower(), f"{c.name} [{c.hash}]".lower()):
                return c
        known = ", ".join(c.title for c in self._controlnets) or "none"
        raise ModelError(f"Unknown ControlNet {name!r}. Known: {known}. Put ControlNets in the "
                         "session's or the workspace's models/controlnet/ folder; to download "
                         f"one there, {options.run('controlnet')}.")

    def lora(self, name: str) -> Lora | None:
        key = name.strip().lower()
        return next((lo for lo in self._loras if lo.name.lower() == key), None)
