"""Installing what a Colab runtime lacks, from wheels kept on the user's Drive, and the
environment report (`fastsd doctor`).

The first runtime resolves the pins against what the runtime already has, fetches a wheel
of each package it lacks (and nothing else) and keeps them on Drive in
``WORKSPACE/wheels/<fingerprint>/``. Every later runtime with the same fingerprint installs
from there with ``--no-index``, in seconds and without the network.

The fingerprint names what makes wheels fit: Python, platform, torch (with its local label
such as ``+cu126``), CUDA, and a hash of the pins. Colab's torch, torchvision and torchaudio
are never downloaded, upgraded or kept: their installed versions, local label included, are
passed to the installer as constraints. Packages Colab preinstalls that we do not pin stay as
they are, because the resolver runs against the installed runtime.

A wheelhouse is used only when its manifest (written last) matches the fingerprint and
every wheel in it is whole; otherwise it is rebuilt in a temporary folder and renamed into
place. ``uv`` installs when the runtime has it (Colab does), pip otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from fastsd import drive
from fastsd.errors import FastSDError, OfflineError
from fastsd.workspace import Workspace

log = logging.getLogger("fastsd")

KEEP = ("torch", "torchvision", "torchaudio")  # Colab's own builds stay
MANIFEST = "manifest.json"
INSTALL_CELL = "1. Install"


class InstallError(FastSDError):
    """pip or uv could not install the requirements."""


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ ;\[]", requirement.strip(), maxsplit=1)[0]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pin(requirement: str) -> str | None:
    return requirement.split("==", 1)[1].split(";")[0].strip() if "==" in requirement else None


def read_requirements() -> list[str]:
    """The pins of requirements-colab.txt, read one way in a regular install and in the
    source tree's editable one (``make venv``) alike: from the installed fastsd's metadata,
    which setup.py makes from that file (torch and the dev extras left out)."""
    try:
        reqs = metadata.requires("fastsd") or []
    except metadata.PackageNotFoundError:
        raise InstallError("fastsd is not installed, so its pins are unknown. Install it "
                           "(`pip install -e .` in its folder, or run the install cell).") from None
    return [r.split(";")[0].strip() for r in reqs
            if "extra ==" not in r and _canonical(_name(r)) not in KEEP]


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def missing(requirements: list[str]) -> list[str]:
    """The requirements whose pinned version (``name==version``) is not installed."""
    out = []
    for req in requirements:
        version, pin = _version(_name(req)), _pin(req)
        if version is None or (pin and version != pin):
            out.append(req)
    return out


# --------------------------------------------------------------------------- fingerprint


def torch_cuda() -> str | None:
    """The CUDA version the installed torch was built for, read from its files (importing
    torch here would load numpy into the kernel before the install can upgrade it)."""
    try:
        text = metadata.distribution("torch").locate_file("torch/version.py").read_text()
    except (metadata.PackageNotFoundError, OSError):
        return None
    m = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
    return m.group(1) if m else None


@dataclass(frozen=True)
class Fingerprint:
    python: str
    platform: str
    torch: str | None
    cuda: str | None
    pins: str

    @classmethod
    def here(cls, requirements: list[str]) -> "Fingerprint":
        pins = hashlib.sha256("\n".join(sorted(requirements)).encode()).hexdigest()[:12]
        return cls(f"cp{sys.version_info.major}{sys.version_info.minor}",
                   sysconfig.get_platform().replace("-", "_").replace(".", "_"),
                   _version("torch"), torch_cuda(), pins)

    @property
    def key(self) -> str:
        torch = re.sub(r"[^A-Za-z0-9.]+", "_", self.torch or "none")
        return (f"{self.python}-{self.platform}-torch{torch}-cuda{self.cuda or 'none'}"
                f"-pins{self.pins}")


def wheelhouse(root: Path | None = None, fingerprint: Fingerprint | None = None) -> Path:
    """WORKSPACE/wheels/<fingerprint>/."""
    fp = fingerprint or Fingerprint.here(read_requirements())
    return Workspace.current(root).wheels / fp.key


def problem(house: Path, fingerprint: Fingerprint) -> str | None:
    """Why the wheelhouse cannot be used (missing, foreign, incomplete), or None."""
    try:
        man = drive.read_json(house / MANIFEST)
    except FileNotFoundError:
        return "it has not been built yet" if not house.exists() else "it has no manifest"
    except (ValueError, drive.DriveError) as e:
        return f"its manifest is unreadable ({e})"
    if man.get("fingerprint") != asdict(fingerprint):
        return "it was built for another runtime"
    for name, size in man.get("wheels", {}).items():
        whl = house / name
        try:
            if whl.stat().st_size != size:
                return f"{name} is truncated"
            with zipfile.ZipFile(whl) as z:
                z.getinfo(f"{name.split('-')[0]}-{name.split('-')[1]}.dist-info/RECORD")
        except FileNotFoundError:
            return f"{name} is missing"
        except (OSError, zipfile.BadZipFile, KeyError) as e:
            return f"{name} is damaged ({e})"
    return None


# --------------------------------------------------------------------------- running pip/uv


def _run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    log.debug("running %s", " ".join(cmd))
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def _pip(*args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args])


def find_uv() -> str | None:
    """The uv binary beside this Python or on PATH (Colab preinstalls it)."""
    local = Path(sys.executable).parent / "uv"
    return str(local) if local.is_file() else shutil.which("uv")


def _constraints(folder: Path) -> Path:
    """Pins of the installed torch family, local label included (``2.6.0+cu124``), so the
    installer never replaces Colab's builds."""
    lines = [f"{name}=={v}" for name in KEEP if (v := _version(name))]
    path = folder / "keep-constraints.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _tail(text: str, n: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def _explain(res: subprocess.CompletedProcess, doing: str, house: Path) -> FastSDError:
    err = res.stderr + res.stdout
    keep = ", ".join(f"{n} {v}" for n in KEEP if (v := _version(n)))
    if "ResolutionImpossible" in err or "conflict" in err.lower() or "unsatisfiable" in err:
        return InstallError(
            f"{doing}: the pins conflict with this runtime's own packages ({keep}); they are "
            f"kept as they are, so a pin that needs another version cannot be installed.\n"
            f"{_tail(err)}\nRun `fastsd doctor` to see which pin differs, or use a runtime "
            "whose torch matches.")
    if re.search(r"No matching distribution|Could not find|Network is unreachable|"
                 r"Failed to establish|Connection refused|Temporary failure in name|"
                 r"Failed to fetch|error sending request", err):
        return OfflineError(
            f"{doing} needs the package index once, and it could not be reached:\n{_tail(err)}"
            f"\nConnect the runtime to the internet and run this cell again; later runtimes "
            f"install from {house} without the network.")
    return InstallError(f"{doing} failed:\n{_tail(err)}")


def build_wheelhouse(requirements: list[str], house: Path, fingerprint: Fingerprint) -> list[str]:
    """Resolve ``requirements`` against this runtime and keep a wheel of every package it
    lacks in ``house`` (replaced whole). Returns the wheel names."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        req = tmp_path / "requirements.txt"
        req.write_text("\n".join(requirements) + "\n")
        cons = _constraints(tmp_path)
        report = tmp_path / "report.json"
        res = _pip("install", "--dry-run", "--quiet", "--report", str(report), "-r", str(req),
                   "-c", str(cons))
        if res.returncode:
            raise _explain(res, "Resolving the pins", house)
        plan = [f"{i['metadata']['name']}=={i['metadata']['version']}"
                for i in json.loads(report.read_text())["install"]
                if _canonical(i["metadata"]["name"]) not in KEEP]
        wheels = tmp_path / "wheels"
        wheels.mkdir()
        if plan:
            res = _pip("wheel", "--no-deps", "--wheel-dir", str(wheels), *plan)
            if res.returncode:
                raise _explain(res, "Fetching the wheels", house)
        names = sorted(p.name for p in wheels.glob("*.whl"))
        with drive.atomic_folder(house) as out:
            for name in names:
                drive.copy_file(wheels / name, out / name)
            drive.atomic_write_json(out / MANIFEST, {
                "fingerprint": asdict(fingerprint), "requirements": requirements,
                "wheels": {n: (wheels / n).stat().st_size for n in names}})
    log.info("Kept %d wheels in %s", len(names), house)
    return names


def _install_from(house: Path, requirements: list[str], installer: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text("\n".join(requirements) + "\n")
        cons = _constraints(Path(tmp))
        if installer == "uv":
            uv = find_uv()
            if uv is None:
                raise InstallError("uv was asked for but is not installed; use pip.")
            cmd = [uv, "pip", "install", "--python", sys.executable, "--no-index",
                   "--find-links", str(house), "-r", str(req), "-c", str(cons)]
        else:
            cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "install",
                   "--no-index", "--find-links", str(house), "-r", str(req), "-c", str(cons)]
        res = _run(cmd)
    if res.returncode:
        raise _explain(res, f"Installing from the wheelhouse {house}", house)


# --------------------------------------------------------------------------- install


@dataclass
class InstallReport:
    wheelhouse: Path
    installer: str = "pip"
    needed: list[str] = field(default_factory=list)
    built: bool = False
    rebuilt_because: str | None = None
    installed: bool = False
    restart_needed: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.needed:
            return "All pinned packages are installed."
        how = "built the wheelhouse, then installed" if self.built else "installed"
        lines = [f"{how} {len(self.needed)} packages with {self.installer} from {self.wheelhouse}"]
        if self.rebuilt_because:
            lines.append(f"(the old wheelhouse was rebuilt: {self.rebuilt_because})")
        if self.restart_needed:
            lines.append(restart_message(self.restart_needed))
        return "\n".join(lines)


def restart_message(packages: list[str]) -> str:
    return (f"Upgraded packages this runtime had already imported: {', '.join(packages)}. "
            "Restart the session (Runtime > Restart session), then run the cells again from "
            f"cell {INSTALL_CELL!r} (it will be instant); or tick Restart_If_Needed there.")


def _imported_files() -> dict[str, tuple[int, int]]:
    """The (inode, mtime) of the file of every imported top-level module. An install that
    replaces a package writes new files, so these change; reading them is a stat each, where
    reading every distribution's metadata takes a second on Colab's ~700 packages."""
    out = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if "." in name or not path:
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue
        out[name] = (st.st_ino, st.st_mtime_ns)
    return out


def _replaced(before: dict[str, tuple[int, int]]) -> list[str]:
    """The distributions (canonical names) whose imported modules the install replaced."""
    changed = []
    for name, sig in before.items():
        try:
            st = os.stat(sys.modules[name].__file__)
            if (st.st_ino, st.st_mtime_ns) == sig:
                continue
        except (OSError, KeyError, AttributeError, TypeError):
            pass
        changed.append(name)
    if not changed:
        return []
    owners = metadata.packages_distributions()
    return sorted({_canonical(d) for name in changed for d in owners.get(name, [name])})


def restart_kernel() -> None:
    """Restart the notebook's kernel: on Colab the runtime restarts a kernel that exits."""
    log.warning("Restarting the runtime to load the upgraded packages...")
    os.kill(os.getpid(), 9)


def install(root: Path | None = None, requirements: list[str] | None = None,
            build: bool = True, installer: str | None = None,
            restart: bool = False) -> InstallReport:
    """Install every pin that is missing or at another version, from the Drive wheelhouse.

    A wheelhouse that is missing, built for another runtime or damaged is (re)built once,
    which needs the network; with ``build=False`` that is an OfflineError instead. When an
    upgraded package was already imported, the report says a restart is needed (and with
    ``restart`` the kernel is restarted).
    """
    requirements = read_requirements() if requirements is None else requirements
    fp = Fingerprint.here(requirements)
    house = wheelhouse(root, fp)
    installer = installer or ("uv" if find_uv() else "pip")
    report = InstallReport(house, installer, missing(requirements))
    if not report.needed:
        log.info("All %d pinned packages are installed.", len(requirements))
        return report
    why = problem(house, fp)
    if why and not build:
        raise OfflineError(f"The wheelhouse {house} cannot be used: {why}. Run the install "
                           "cell once with internet to build it.")
    before = _imported_files()
    if why:
        log.info("Building the wheelhouse in %s (%s; once per runtime kind)...", house, why)
        report.rebuilt_because = why if why != "it has not been built yet" else None
        build_wheelhouse(requirements, house, fp)
        report.built = True
    try:
        _install_from(house, report.needed, installer)
    except (InstallError, OfflineError):
        if report.built or not build:
            raise
        log.warning("The wheelhouse lacks something this runtime needs; rebuilding it.")
        report.rebuilt_because = "it lacked a wheel this runtime needs"
        build_wheelhouse(requirements, house, fp)
        report.built = True
        _install_from(house, report.needed, installer)
    import importlib

    importlib.invalidate_caches()
    report.installed = True
    report.restart_needed = _replaced(before)
    log.info("Installed %d packages from %s", len(report.needed), house)
    if report.restart_needed:
        log.warning("%s", restart_message(report.restart_needed))
        if restart:
            restart_kernel()
    return report


# --------------------------------------------------------------------------- doctor

# Known-bad combinations: (what, test on the facts, what to do). Data, not code paths.
KNOWN_BAD = [
    ("ipywidgets 8 on Colab", lambda f: f["runtime"] == "colab"
     and (f["versions"].get("ipywidgets") or "").startswith("8."),
     "Colab's front end renders ipywidgets 7: install ipywidgets==7.7.1 (the pin) and restart."),
    ("bitsandbytes without CUDA", lambda f: bool(f["versions"].get("bitsandbytes"))
     and not f["cuda"], "8-bit Adam needs a GPU: pick a GPU runtime or turn 8-bit Adam off."),
    ("Python older than 3.10", lambda f: sys.version_info < (3, 10),
     "fastsd needs Python 3.10 or newer."),
    ("torch older than 2.1", lambda f: bool(f["torch"]) and tuple(
        int(x) for x in re.findall(r"\d+", f["torch"])[:2]) < (2, 1),
     "Use a runtime with torch 2.1 or newer."),
]


@dataclass
class Check:
    name: str
    value: str
    ok: bool = True
    advice: str = ""


def doctor(root: Path | None = None, requirements: list[str] | None = None,
           deep: bool = False) -> list[Check]:
    """Python, torch, CUDA, GPU and VRAM, every pin against what is installed, free local
    disk, Drive and its free space, the wheelhouse in use, and known-bad combinations.

    The GPU comes from the NVIDIA driver, so the kernel never imports torch (which takes
    seconds and keeps a CUDA context in the kernel's GPU memory); ``deep`` asks torch
    itself, which also finds a torch that cannot use the driver."""
    import platform

    from fastsd import env

    requirements = read_requirements() if requirements is None else requirements
    checks = [Check("python", platform.python_version(), sys.version_info >= (3, 10),
                    "" if sys.version_info >= (3, 10) else "fastsd needs Python 3.10+."),
              Check("runtime", env.runtime())]
    torch_v, cuda = _version("torch"), torch_cuda()
    checks.append(Check("torch", torch_v or "not installed", bool(torch_v),
                        "" if torch_v else "Install torch (Colab has it preinstalled)."))
    checks.append(Check("CUDA", cuda or "none (CPU build)"))
    no_gpu = ("No GPU: training will be very slow. On Colab choose Runtime > Change runtime "
              "type > T4 GPU.")
    if torch_v and deep:
        try:
            d = env.device_info()
            vram = f", {d.memory}" if d.is_cuda else ""
            checks.append(Check("GPU", f"{d.name} ({d.device}){vram}", d.is_cuda,
                                "" if d.is_cuda else no_gpu))
        except Exception as e:  # a broken CUDA install is exactly what doctor reports
            checks.append(Check("GPU", f"torch cannot query the device: {e}", False,
                                "Restart the runtime; if it persists, pick another runtime."))
    else:
        gpus = env.driver_gpus()
        if gpus:
            for i, d in enumerate(gpus):
                checks.append(Check("GPU" if i == 0 else f"GPU {i}", f"{d.name}, {d.memory}"))
            if torch_v and not cuda:
                checks.append(Check("known problem", "a GPU but a CPU-only torch", False,
                                    "Use Colab's own torch (do not reinstall torch), or "
                                    "install a CUDA build of torch."))
        else:
            checks.append(Check("GPU", "none (no NVIDIA driver answers)", False, no_gpu))
    versions = {}
    for req in requirements:
        name, pin, have = _name(req), _pin(req), _version(_name(req))
        versions[_canonical(name)] = have
        ok = have is not None and (pin is None or have == pin)
        checks.append(Check(f"pin {name}", f"{have or 'missing'} (pinned {pin})", ok,
                            "" if ok else "Run the install cell (or `fastsd install`)."))
    free = drive.free_bytes(tempfile.gettempdir()) / 1e9
    checks.append(Check("local disk free", f"{free:.1f} GB", free > 5,
                        "" if free > 5 else "Less than 5 GB free locally: delete files under "
                        "/content or /tmp."))
    if env.runtime() == "colab":
        if drive.is_mounted():
            dfree = drive.free_bytes(drive.COLAB_MOUNT / "MyDrive") / 1e9
            checks.append(Check("Drive", f"mounted at {drive.COLAB_MOUNT}, {dfree:.1f} GB free",
                                dfree > 5, "" if dfree > 5 else "Drive is nearly full: delete "
                                "old checkpoints and empty Drive's trash."))
        else:
            checks.append(Check("Drive", "not mounted", False, "Run the Drive cell."))
    try:
        fp = Fingerprint.here(requirements)
        house = Workspace.current(root, mount=False).wheels / fp.key
        why = problem(house, fp)
        checks.append(Check("wheelhouse", f"{house}" + (f" (not usable: {why})" if why else ""),
                            why is None, "" if why is None else "The install cell rebuilds it."))
    except FastSDError as e:
        checks.append(Check("wheelhouse", f"unknown: {e}", False))
    facts = {"runtime": env.runtime(), "versions": versions, "torch": torch_v, "cuda": cuda}
    for what, test, advice in KNOWN_BAD:
        if test(facts):
            checks.append(Check("known problem", what, False, advice))
    return checks


def format_checks(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'ok ' if c.ok else 'BAD'} {c.name:<{width}}  {c.value}"
             + (f"\n    -> {c.advice}" if c.advice else "") for c in checks]
    return "\n".join(lines)
