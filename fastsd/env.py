"""Runtime facts: Colab, plain Jupyter or a script; the device and its memory; the workspace."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

# Device memory (VRAM) is counted in GiB (2**30 bytes) everywhere in fastsd: what the driver
# and torch report, what Colab's resource panel shows as "GB", and what every VRAM estimate
# and threshold (web UI, Kosmos-2, trainer) is written in. Disk and download sizes are GB.
GIB = 1024**3


#: Libraries whose log notices call for nothing from the user or from fastsd (torchvision
#: missing, an optional kernel package, a cast's note): only their errors are shown.
QUIET_LIBRARIES = {"transformers": "TRANSFORMERS_VERBOSITY",
                   "diffusers": "DIFFUSERS_VERBOSITY", "bitsandbytes": None}


def quiet_libraries() -> None:
    """Keep the libraries' chatter out of notebook cells, the CLI and the demo: their loggers
    show errors only (``TRANSFORMERS_VERBOSITY`` / ``DIFFUSERS_VERBOSITY`` set by the user
    win). Progress bars are not logs and stay; Python's warnings are not touched, so a
    deprecated call of ours still shows (tests/test_demo.py fails on one). Called by
    ``import fastsd``."""
    import logging

    for name, variable in QUIET_LIBRARIES.items():
        level = os.environ.setdefault(variable, "error") if variable else "error"
        logging.getLogger(name).setLevel(level.upper())


def runtime() -> str:
    """``"colab"``, ``"jupyter"`` or ``"script"``."""
    if "google.colab" in sys.modules or os.environ.get("COLAB_RELEASE_TAG"):
        return "colab"
    ipython = sys.modules.get("IPython")
    if ipython is not None:
        shell = getattr(ipython, "get_ipython", lambda: None)()
        if shell is not None and hasattr(shell, "kernel"):
            return "jupyter"
    return "script"


def reachable(host: str, port: int = 443, timeout: float = 5.0) -> bool:
    """Whether ``host:port`` accepts a TCP connection within ``timeout`` seconds."""
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class DeviceInfo:
    device: str  # "cuda", "mps" or "cpu"
    name: str
    vram_free_gib: float | None = None
    vram_total_gib: float | None = None
    capability: tuple[int, int] | None = None

    @property
    def is_cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def memory(self) -> str:
        """Its free and total memory, as a report shows them."""
        if self.vram_total_gib is None:
            return "memory not reported"
        return f"{self.vram_free_gib} of {self.vram_total_gib} GiB free"


#: The free Colab GPU as torch reports it (15 GB card, 14.74 GiB total, ~14.6 GiB free once
#: a context is open): what the estimates, benchmarks and real-size tests plan for.
COLAB_T4 = DeviceInfo("cuda", "Tesla T4", 14.6, 14.74, (7, 5))
#: Colab's free runtime: system RAM in GB; the kernel is killed above it.
COLAB_RAM_GB = 12.7


def _gib(mib: str) -> float | None:
    """nvidia-smi's MiB figure in GiB; None for "[N/A]" (some GPUs, MIG slices)."""
    try:
        return round(float(mib) / 1024, 2)
    except ValueError:
        return None


def cuda_index(count: int) -> int:
    """The GPU this process uses: LOCAL_RANK's under ``accelerate launch`` or torchrun (one
    process per GPU), else the first."""
    rank = os.environ.get("LOCAL_RANK", "")
    return int(rank) if rank.isdigit() and int(rank) < count else 0


def device_info() -> DeviceInfo:
    """The best device torch can use here, with its free and total memory on CUDA.

    Asked before accelerate has picked the process's GPU, so it asks about that GPU by
    index (:func:`cuda_index`): reading the free memory opens a CUDA context on the GPU
    asked about, and every process asking about GPU 0 left one there each."""
    import torch

    if torch.cuda.is_available():
        i = cuda_index(torch.cuda.device_count())
        free, total = torch.cuda.mem_get_info(i)
        return DeviceInfo("cuda", torch.cuda.get_device_name(i), round(free / GIB, 2),
                          round(total / GIB, 2), torch.cuda.get_device_capability(i))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return DeviceInfo("mps", "Apple GPU")
    import platform

    return DeviceInfo("cpu", platform.processor() or platform.machine() or "CPU")


def driver_gpus(timeout: float = 10.0) -> list[DeviceInfo] | None:
    """The NVIDIA GPUs as the driver reports them (``nvidia-smi``), without importing torch:
    a kernel that asked torch instead would hold a CUDA context (several hundred MB of VRAM
    that training in its child process then lacks) until the runtime restarts. None when
    there is no NVIDIA driver; an empty list when it lists no GPU."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.free,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode:
        return None
    gpus = []
    for line in out.stdout.strip().splitlines():
        name, free, total = (x.strip() for x in line.rsplit(",", 2))
        gpus.append(DeviceInfo("cuda", name, _gib(free), _gib(total)))
    return gpus


def report(workspace: Path) -> dict:
    """What a user (or a bug report) needs to know about this runtime."""
    import platform
    from importlib import metadata

    info: dict = {
        "fastsd": metadata.version("fastsd"),  # (this module is below the package's __init__)
        "python": platform.python_version(),
        "runtime": runtime(),
        "workspace": str(workspace),
    }
    for name in ("torch", "diffusers", "transformers", "accelerate"):
        try:
            mod = __import__(name)
            info[name] = getattr(mod, "__version__", "?")
        except ImportError:
            info[name] = None
    if info["torch"]:
        info.update({k: v for k, v in asdict(device_info()).items()})
    return info


FORM_ENV = "FASTSD_FORM"
CALLER_ENV = "FASTSD_CALLER"  # the notebook cell a child process works for
NOTEBOOK = "notebook"  # caller() of a notebook whose running cell has no #@title line
_caller: str | None = None


def caller() -> str | None:
    """The notebook cell this process works for: its title (``"6. Train"``), ``NOTEBOOK``
    when a notebook cell without a title called :func:`form`, or None on the command line.
    A notebook cell says so by calling :func:`form`; a child process it starts (the train
    cell's) is told through ``$FASTSD_CALLER`` (:func:`caller_env`)."""
    return _caller or os.environ.get(CALLER_ENV) or None


def caller_env() -> dict[str, str]:
    """What a child process's environment needs to work for the same notebook cell."""
    who = caller()
    return {CALLER_ENV: who} if who else {}


def _cell_title(namespace: dict) -> str:
    """The ``#@title`` of the cell running now (IPython keeps it last in ``_ih``)."""
    history = namespace.get("_ih") or [""]
    first = str(history[-1]).lstrip().split("\n", 1)[0]
    return first[len("#@title"):].strip() if first.startswith("#@title") else ""


def form(namespace: dict) -> dict:
    """Fill a notebook cell's form fields from ``$FASTSD_FORM``, where it is set.

    ``$FASTSD_FORM`` is a JSON object (or the path of a JSON file) of field name -> value.
    Each field of it that ``namespace`` (the cell's ``globals()``) holds is replaced, so the
    same cells a Colab user runs can run in CI on the tiny models. Unset (on Colab), it
    does nothing. Returns the fields it replaced.

    It also records that a notebook cell is the caller (:func:`caller`), so that messages
    name its form fields rather than command-line flags (:mod:`fastsd.options`).
    """
    import json

    global _caller
    _caller = _cell_title(namespace) or NOTEBOOK
    raw = os.environ.get(FORM_ENV, "").strip()
    if not raw:
        return {}
    values = json.loads(raw if raw.startswith("{") else Path(raw).read_text(encoding="utf-8"))
    replaced = {k: v for k, v in values.items() if k in namespace}
    namespace.update(replaced)
    return replaced
