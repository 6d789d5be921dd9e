"""Staging: loading a model from a Drive-speed mount directly, against copying it to local
disk first (fastsd.models.local_copy) and loading the copy.

Drive stand-in: benchmarks/throttled_mount.py, a read-only FUSE passthrough whose reads
pay a round trip and Drive's bandwidth (the FUSE Drive stand-in of the Colab-runtime work
is not on main yet, so this one is self-contained). Each "direct" load starts from a fresh
mount, so nothing comes from the kernel's cache of an earlier read, as after Colab evicts
it. The first staged load reads the copy right after writing it, as a runtime does (what
the page cache still holds of it counts); the reload first drops the copy from the page
cache (posix_fadvise), so it reads the local disk, not RAM.

Models: the tiny SD 1.x pipeline, and a full-size SD 1.5 UNet (randomly initialised from
its config, nothing downloaded; fp16 safetensors, about 1.7 GB, as the registry fetches it).
Rows: the first load (direct, against copy + load) and a reload in the same runtime
(direct again, against the reused copy). The ratio is direct time / staged time.

Run: .venv/bin/python benchmarks/bench_models.py  (needs /dev/fuse and libfuse3, about
4 GB of free disk and 4 GB of RAM)
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Row, write_result
from bench_convert import SD15_UNET

HERE = Path(__file__).resolve().parent
DRIVE_BPS = 100e6  # bytes/s: Drive's read speed in Colab, roughly
LATENCY_MS = 1.0  # per read request of the mount (FUSE reads are at most 128 KB)
RUNS = {"tiny": 3, "sd15-unet": 1}  # the full-size one takes minutes per run


class Mount:
    """The throttled mount of ``backing`` at ``point`` while in the ``with`` block."""

    def __init__(self, backing: Path, point: Path) -> None:
        self.backing, self.point = backing, point

    def __enter__(self) -> Path:
        self.point.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, str(HERE / "throttled_mount.py"),
                                      str(self.backing), str(self.point), str(DRIVE_BPS),
                                      str(LATENCY_MS)])
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.point):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the throttled FUSE mount did not start")
            time.sleep(0.1)
        return self.point

    def __exit__(self, *exc) -> None:
        subprocess.run(["fusermount3", "-u", str(self.point)], check=True)
        self.proc.wait(timeout=30)


def drop_cache(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def loader(kind: str):
    """Load the model and read every weight once, as moving it to the GPU does (diffusers
    may leave the weights memory-mapped, unread, until they are used)."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    def touch(modules) -> float:
        return sum(float(p.detach().float().sum()) for m in modules for p in m.parameters())

    if kind == "tiny":
        def load(p):
            pipe = StableDiffusionPipeline.from_pretrained(p, dtype=torch.float32)
            return touch([pipe.unet, pipe.vae, pipe.text_encoder])
        return load
    return lambda p: touch([UNet2DConditionModel.from_pretrained(p, dtype=torch.float16)])


def build(root: Path) -> dict[str, Path]:
    import torch
    from diffusers import UNet2DConditionModel

    from fastsd.models import tiny

    out = {"tiny": tiny.build("sd1", root / "tiny-sd1")}
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).to(torch.float16)
    unet.save_pretrained(root / "sd15-unet", safe_serialization=True)
    del unet
    out["sd15-unet"] = root / "sd15-unet"
    return out


def main() -> None:
    from fastsd import models

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        tmp = Path(tmp)
        built = build(tmp / "drive")
        for kind, folder in built.items():
            load = loader("tiny" if kind == "tiny" else "unet")
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            times: dict[str, list[float]] = {k: [] for k in ("direct1", "staged1", "direct2",
                                                              "staged2")}
            for run in range(RUNS[kind]):
                local_root = tmp / f"local-{kind}-{run}"
                with Mount(tmp / "drive", tmp / "mnt") as mnt:  # first load, direct
                    t0 = time.perf_counter()
                    load(mnt / folder.name)
                    times["direct1"].append(time.perf_counter() - t0)
                with Mount(tmp / "drive", tmp / "mnt") as mnt:  # first load, staged
                    t0 = time.perf_counter()
                    local = models.local_copy(mnt / folder.name, local_root)
                    assert local.is_relative_to(local_root), "the mount was not staged"
                    load(local)  # right after the copy, as in a runtime: pages still cached
                    times["staged1"].append(time.perf_counter() - t0)
                with Mount(tmp / "drive", tmp / "mnt") as mnt:  # reload, same runtime
                    t0 = time.perf_counter()
                    load(mnt / folder.name)
                    times["direct2"].append(time.perf_counter() - t0)
                    drop_cache(local)
                    t0 = time.perf_counter()
                    again = models.local_copy(mnt / folder.name, local_root)
                    load(again)
                    times["staged2"].append(time.perf_counter() - t0)
                    assert again == local
            med = {k: round(statistics.median(v), 2) for k, v in times.items()}
            print(kind, f"{size / 1e6:.0f} MB", med, flush=True)
            rows += [Row(f"{kind} ({size / 1e6:.0f} MB): first load, staged (copy + load) "
                         "vs direct from the mount", "s", med["staged1"], med["direct1"],
                         higher_is_better=False),
                     Row(f"{kind}: reload in the same runtime, staged copy vs direct", "s",
                         med["staged2"], med["direct2"], higher_is_better=False)]
    write_result(
        "models", "Staging a model from a Drive-speed mount to local disk before loading",
        rows, command=".venv/bin/python benchmarks/bench_models.py",
        notes=f"Drive stand-in: benchmarks/throttled_mount.py, a read-only FUSE passthrough "
        f"throttled to {DRIVE_BPS / 1e6:.0f} MB/s plus {LATENCY_MS:g} ms per read request, "
        "one request at a time (the Colab-runtime FUSE stand-in is not on main yet). Direct "
        "loads start from a fresh mount (no kernel cache of earlier reads); the first staged "
        "load reads the copy just written (as a runtime does), a reload reads it after "
        "dropping it from the page cache. The sd15-unet model is a "
        "randomly initialised full-size SD 1.5 UNet in fp16 (nothing downloaded); load = "
        "diffusers' from_pretrained (the tiny one: the whole pipeline), then one read of "
        "every weight, as moving the model to the GPU does. Median of "
        f"{RUNS['tiny']} runs for tiny, {RUNS['sd15-unet']} for sd15-unet. What the "
        "ratio comes from: on the first load both sides read the same bytes over the same "
        "mount once (the copy's large sequential reads against the loader's memory-mapped "
        "page faults), and staging adds the local write and read; the reload measures the "
        "reuse of the local copy against reading Drive again.")


if __name__ == "__main__":
    main()
