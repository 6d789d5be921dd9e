"""The model registry: base models and ControlNets, read from ``registry.json``.

The data file says, for each base model, where it lives on the Hub (repo and revision),
its family, prediction type, native resolution, recommended VAE, which components to
fetch (fp16 safetensors where the repo has them; never the safety checker or the feature
extractor), its approximate download and the trainer's VRAM estimate per GPU. The
notebook's model list and ``fastsd models list`` read it; :func:`ensure` turns an entry into
a plain diffusers folder in the workspace's ``models/``, downloaded once.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from fastsd import drive, fetch
from fastsd.errors import ModelError
from fastsd.workspace import Workspace

log = logging.getLogger("fastsd")

MARKER = "fastsd_model.json"  # written last: a folder without it is not whole
PARTIAL = ".partial"  # where a download in progress lives (resumable)
CONTROLNET_DIR = "controlnet"  # in the workspace's models/: one diffusers folder per ControlNet
FP16 = ".fp16."
UNUSED = ("safety_checker", "feature_extractor", "image_encoder")


#: The base model a session gets when none is named (`fastsd session create` without
#: --model; the notebooks' model fields start at it): Stable Diffusion 1.5.
DEFAULT_BASE_MODEL = "sd15"


@lru_cache(maxsize=1)
def data() -> dict[str, Any]:
    """The registry file shipped with the package."""
    return json.loads(resources.files("fastsd.models").joinpath("registry.json")
                      .read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Entry:
    name: str
    title: str
    family: str
    prediction_type: str
    resolution: int
    inpainting: bool = False
    repo: str = ""
    revision: str = "main"
    vae: str | None = None
    fp16: bool = False
    components: tuple[str, ...] = ()
    download_gb: float = 0.0
    params: dict[str, int] = field(default_factory=dict)
    vram_gib: dict[str, float] = field(default_factory=dict)
    tiny: bool = False

    def trains_on(self) -> dict[str, bool]:
        """Whether the trainer's VRAM estimate fits each GPU (T4, L4, A100)."""
        gpus = data()["gpus"]
        return {g: self.tiny or self.vram_gib.get(g, float("inf")) <= gpus[g] for g in gpus}

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "repo": self.repo or None,
                "family": self.family, "prediction_type": self.prediction_type,
                "resolution": self.resolution, "download_gb": self.download_gb,
                "vae": self.vae, "trains_on": self.trains_on()}


def entries() -> dict[str, Entry]:
    out = {}
    for name, e in data()["models"].items():
        e = dict(e)
        e["components"] = tuple(e.get("components", ()))
        out[name] = Entry(name=name, **e)
    return out


def get(name: str) -> Entry | None:
    return entries().get(name)


@dataclass(frozen=True)
class Plan:
    """What to download for an entry: one (repo, revision, patterns, subfolder) per source."""

    parts: tuple[tuple[str, str, tuple[str, ...], str], ...]
    download_gb: float

    def patterns(self) -> list[str]:
        return [p for part in self.parts for p in part[2]]


def plan(entry: Entry) -> Plan:
    """The files to fetch for ``entry``: the listed components' configs and weights
    (``*.fp16.safetensors`` when the repo has an fp16 variant, else ``*.safetensors``),
    with the recommended VAE in place of the repo's own."""
    if entry.tiny:
        return Plan((), 0.0)
    weights = "*.fp16.safetensors" if entry.fp16 else "*.safetensors"
    allow = ["model_index.json"]
    for c in entry.components:
        if c in UNUSED:
            raise ModelError(f"The registry entry {entry.name} lists {c}, which is never "
                             "fetched. Remove it from registry.json.")
        if c == "vae" and entry.vae:
            continue
        allow += [f"{c}/*.json", f"{c}/*.txt"]
        if c not in ("tokenizer", "tokenizer_2", "scheduler"):
            allow.append(f"{c}/{weights}")
    parts = [(entry.repo, entry.revision, tuple(allow), "")]
    if entry.vae:
        vae = data()["vaes"][entry.vae]
        parts.append((vae["repo"], vae["revision"], ("config.json", "diffusion_pytorch_model."
                                                      + ("fp16." if vae["fp16"] else "")
                                                      + "safetensors"), "vae"))
    return Plan(tuple(parts), entry.download_gb)


def folder(entry: Entry, ws: Workspace) -> Path:
    return ws.models / entry.name


def is_whole(path: Path) -> bool:
    """Whether the folder is a finished download: its marker lists every file at its size."""
    marker = path / MARKER
    if not marker.is_file():
        return False
    files = drive.read_json(marker).get("files", {})
    return bool(files) and all((path / f).is_file() and (path / f).stat().st_size == n
                               for f, n in files.items())


def ensure(name: str, ws: Workspace | Path | None = None) -> Path:
    """The local diffusers folder of the registry model ``name``, downloaded once."""
    from fastsd.models import tiny

    ws = Workspace.current(ws)
    entry = get(name)
    if entry is None:
        raise ModelError(f"{name!r} is not in the model registry ({', '.join(entries())}).")
    if entry.tiny:
        return tiny.ensure(name.removeprefix("tiny-"), ws.models)
    out = folder(entry, ws)
    if is_whole(out):
        return out
    partial = ws.models / PARTIAL / entry.name
    token = fetch.hf_token(ws)
    got: dict[str, int] = {}
    commits = {}
    for repo, revision, allow, sub in plan(entry).parts:
        what = f"{entry.title} ({repo})"
        files, commits[repo] = fetch.hf_download(repo, partial / sub if sub else partial,
                                                 list(allow), revision, what, token)
        for f, n in files.items():
            got[f"{sub}/{f}" if sub else f] = n
    finish(partial, out, entry, got, commits)
    shutil.rmtree(ws.models / PARTIAL / entry.name, ignore_errors=True)
    return out


def finish(partial: Path, out: Path, entry: Entry, got: dict[str, int],
           commits: dict[str, str]) -> Path:
    """Move a whole download into ``out`` as a plain diffusers folder: fp16 variant files
    under the plain names every loader reads, model_index.json without the parts left
    out; the marker last."""
    files = {}
    with drive.atomic_folder(out) as tmp:
        for f, n in got.items():
            plain = f.replace(FP16, ".")
            drive.rename(partial / f, tmp / plain)  # within the workspace: a rename
            files[plain] = n
        index_path = tmp / "model_index.json"
        index = drive.read_json(index_path)
        for k in list(index):
            if k in UNUSED or (isinstance(index[k], list) and k not in entry.components
                               and not k.startswith("_")):
                index[k] = [None, None]
        if "requires_safety_checker" in index:
            index["requires_safety_checker"] = False
        drive.atomic_write_json(index_path, index)
        files["model_index.json"] = index_path.stat().st_size
        drive.atomic_write_json(tmp / MARKER, {"name": entry.name, "repo": entry.repo,
                                               "revision": entry.revision, "commits": commits,
                                               "files": files})
    log.info("Downloaded %s into %s", entry.title, out)
    return out


# --------------------------------------------------------------------------- ControlNet


@dataclass(frozen=True)
class ControlNet:
    name: str
    family: str
    preprocessor: str
    repo: str = ""
    note: str = ""
    tiny: bool = False  # built offline (fastsd.models.tiny), for the family's tiny model

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo}" if self.repo else ""


def controlnets(family: str | None = None, tiny: bool = False) -> list[ControlNet]:
    """The ControlNets of the registry (of one base family when given); the tiny test ones
    only with ``tiny`` (for a tiny test model: they fit no other)."""
    return [c for fam, byname in data()["controlnet"].items() if family in (None, fam)
            for c in (ControlNet(name, fam, **e) for name, e in byname.items())
            if tiny or not c.tiny]


def controlnet(name: str, family: str) -> ControlNet:
    found = [c for c in controlnets(family, tiny=True) if c.name == name]
    if len(found) != 1:
        names = ", ".join(c.name for c in controlnets(family)) or "none"
        raise ModelError(f"No ControlNet {name!r} for {family} (there are: {names}). Pick one "
                         "of those, or the base family that matches your model.")
    return found[0]


def ensure_controlnet(name: str, family: str, ws: Workspace | Path | None = None) -> Path:
    """The local diffusers folder of a ControlNet, downloaded once into the workspace's
    shared ``models/controlnet/``."""
    from fastsd.models import tiny

    ws = Workspace.current(ws)
    c = controlnet(name, family)
    out = ws.models / CONTROLNET_DIR / f"{family}-{name}"
    if c.tiny:
        return tiny.ensure_controlnet(family, out)
    if is_whole(out):
        return out
    partial = ws.models / PARTIAL / f"controlnet-{family}-{name}"
    what = f"the {family} ControlNet {name} ({c.repo})"
    token = fetch.hf_token(ws)
    got, commit = fetch.hf_download(c.repo, partial, ["config.json", "*.fp16.safetensors"],
                                    None, what, token)
    if not any(f.endswith(".safetensors") for f in got):  # no fp16 variant in this repo
        got.update(fetch.hf_download(c.repo, partial, ["diffusion_pytorch_model.safetensors"],
                                     None, what, token)[0])
    files = {}
    with drive.atomic_folder(out) as tmp:
        for f, n in got.items():
            plain = f.replace(FP16, ".")
            drive.rename(partial / f, tmp / plain)
            files[plain] = n
        drive.atomic_write_json(tmp / MARKER, {"name": c.name, "repo": c.repo,
                                               "commits": {c.repo: commit}, "files": files})
    shutil.rmtree(partial, ignore_errors=True)
    return out
