"""Installing what a Colab runtime lacks, from wheels kept on the user's Drive.

The first runtime builds (or downloads) a wheel of every pinned requirement into
``WORKSPACE/wheels/<python>-<platform>/``; every later runtime installs from there with
``--no-index``, in seconds and without touching the network. The folder is keyed by the
Python version and platform, so when Colab moves to a new Python a fresh wheelhouse is
built instead of a broken install. Colab's own torch is never touched: its installed
version is passed to pip as a constraint.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from fastsd import drive
from fastsd.errors import FastSDError, OfflineError
from fastsd.workspace import Workspace

log = logging.getLogger("fastsd")

REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements-colab.txt"
KEEP = ("torch", "torchvision", "torchaudio")  # Colab's own builds stay


class InstallError(FastSDError):
    """pip could not install the requirements."""


@dataclass
class InstallReport:
    wheelhouse: Path
    needed: list[str] = field(default_factory=list)
    built: bool = False
    installed: bool = False


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ ;\[]", requirement.strip(), maxsplit=1)[0]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: Path = REQUIREMENTS) -> list[str]:
    lines = Path(path).read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


def missing(requirements: list[str]) -> list[str]:
    """The requirements whose pinned version (``name==version``) is not installed."""
    out = []
    for req in requirements:
        name = _name(req)
        pin = req.split("==", 1)[1].strip() if "==" in req else None
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            out.append(req)
            continue
        if pin and version != pin:
            out.append(req)
    return out


def wheelhouse(root: Path | None = None) -> Path:
    """WORKSPACE/wheels/<python tag>-<platform>/, e.g. ``cp312-linux_x86_64``."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    platform = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    return Workspace.current(root).wheels / f"{tag}-{platform}"


def _pip(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    log.debug("running %s", " ".join(cmd))
    return subprocess.run(cmd, capture_output=True, text=True)


def _constraints(folder: Path) -> Path:
    """A constraints file that pins the installed torch family, so pip never replaces it."""
    lines = []
    for name in KEEP:
        try:
            lines.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    path = folder / "keep-constraints.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _has_wheels(house: Path, requirements: list[str]) -> bool:
    present = {_canonical(p.name.split("-")[0]) for p in house.glob("*.whl")}
    return all(_canonical(_name(r)) in present for r in requirements)


def build_wheelhouse(requirements: list[str], house: Path) -> None:
    """Fetch or build a wheel of each requirement (with its dependencies) into ``house``.

    Wheels land in a local temporary folder first and are then copied to Drive one by one
    (each whole or absent), so a dropped Drive never leaves a broken wheel behind.
    """
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        req = tmp_path / "requirements.txt"
        req.write_text("\n".join(requirements) + "\n")
        res = _pip("wheel", "--wheel-dir", str(tmp_path / "wheels"), "-r", str(req),
                   "-c", str(_constraints(tmp_path)))
        if res.returncode:
            tail = "\n".join(res.stderr.strip().splitlines()[-5:])
            if "No matching distribution" in res.stderr or "Could not find" in res.stderr \
                    or "Network is unreachable" in res.stderr:
                raise OfflineError(
                    "Building the wheelhouse needs the network once, and pip could not "
                    f"reach the package index:\n{tail}\nConnect the runtime to the internet "
                    f"and run this cell again, or copy wheels into {house}.")
            raise InstallError(f"pip could not build the wheels:\n{tail}")
        for whl in sorted((tmp_path / "wheels").glob("*.whl")):
            if not (house / whl.name).is_file():
                drive.copy_file(whl, house / whl.name)


def install(root: Path | None = None, requirements: list[str] | None = None,
            target: Path | None = None, build: bool = True) -> InstallReport:
    """Install whatever pinned requirement is missing, from the Drive wheelhouse.

    With ``build`` (the default) a missing wheelhouse is built once, which needs the
    network; with ``build=False`` a missing wheel is an error that says so. ``target``
    installs into a folder instead of the running environment (tests use it).
    """
    requirements = read_requirements() if requirements is None else requirements
    house = wheelhouse(root)
    report = InstallReport(house, requirements if target else missing(requirements))
    if not report.needed:
        log.info("All %d requirements are installed.", len(requirements))
        return report
    house.mkdir(parents=True, exist_ok=True)
    if not _has_wheels(house, report.needed):
        if not build:
            raise OfflineError(
                f"The wheelhouse {house} lacks wheels for: "
                + ", ".join(_name(r) for r in report.needed if not _has_wheels(house, [r]))
                + ". Run the install cell once with internet to build it.")
        log.info("Building the wheelhouse in %s (once per Python version)...", house)
        build_wheelhouse(report.needed, house)
        report.built = True
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text("\n".join(report.needed) + "\n")
        args = ["install", "--no-index", "--find-links", str(house), "-r", str(req),
                "-c", str(_constraints(Path(tmp)))]
        if target:
            args += ["--target", str(target), "--no-deps"]
        res = _pip(*args)
    if res.returncode:
        tail = "\n".join(res.stderr.strip().splitlines()[-5:])
        raise InstallError(
            f"Installing from the wheelhouse {house} failed:\n{tail}\nDelete that folder "
            "and run the install cell again to rebuild it.")
    report.installed = True
    log.info("Installed %d packages from %s", len(report.needed), house)
    return report
