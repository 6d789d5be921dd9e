"""Checkpoints to a Drive-speed folder: background writer against the synchronous write.

Same tiny SD 1.x run on both sides (UNet stage, batch 1, 64 px, fused AdamW, a checkpoint
every N steps); the only difference is TrainSettings.background_checkpoints. Every write
into the session goes through a writer throttled to Drive's speed (60 MB/s, a token
bucket around fastsd.drive's file opener), so a checkpoint of the tiny model (~29 MB:
fp32 UNet weights + AdamW moments) takes about half a second to land, as ~6.9 GB of
SD 1.5 with 8-bit Adam (~5.1 GB) takes about 85 s on Colab's Drive.

Measured: steps/s over the whole UNet stage (checkpoints included) and the time the
training loop stands still per checkpoint (snapshot to CPU memory, plus waiting for the
previous write; with the synchronous write: the whole write). A run without checkpoints
gives the ceiling. Each side runs in its own process, alternately; best of the repeats.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import Row, child_result, write_result

STEPS = 30
EVERY = 10
RATE = 60e6  # bytes/s, Google Drive's sustained write speed from Colab, roughly
REPEATS = 2


class Throttle:
    """A token bucket shared by every file written: RATE bytes per second in all."""

    def __init__(self, rate: float) -> None:
        self.rate, self.lock, self.next = rate, threading.Lock(), time.monotonic()

    def wait(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            self.next = max(self.next, now) + n / self.rate
            delay = self.next - now
        time.sleep(max(0.0, delay))


class ThrottledFile:
    def __init__(self, f, throttle: Throttle) -> None:
        self.f, self.throttle = f, throttle

    def write(self, data) -> int:
        view = memoryview(data)
        for i in range(0, len(view), 1 << 20):
            self.throttle.wait(len(view[i:i + (1 << 20)]))
            self.f.write(view[i:i + (1 << 20)])
        return len(view)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


def child(kind: str, home: Path) -> None:
    import logging

    import torch

    from fastsd import drive, session
    from fastsd.train.trainer import train

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # the same on both sides; steadier on a shared machine
    throttle = Throttle(RATE)
    real = drive._open_dest  # the documented seam of every write fastsd makes
    drive._open_dest = lambda path, mode="wb": ThrottledFile(real(path, mode), throttle)
    s = session.load("bench", home)
    marks: dict[str, float] = {}

    def hook(event: str, info: dict) -> None:
        if event == "stage_start":
            marks["start"] = time.perf_counter()
        if event == "stage_end":
            marks["end"] = time.perf_counter()

    r = train(s, dict(unet_steps=STEPS, text_steps=0, unet_lr=1e-5, unet_schedule="constant",
                      batch_size=1, resolution=64, checkpoint_every=EVERY if kind != "none" else 0,
                      background_checkpoints=kind == "background"), restart=True,
              on_event=hook)
    stalls = r.stats["checkpoint_stalls"]
    ckpt = next(s.checkpoints.iterdir())
    print("RESULT " + json.dumps({
        "loop_s": marks["end"] - marks["start"], "stalls": stalls,
        "ckpt_mb": sum(f.stat().st_size for f in ckpt.iterdir()) / 1e6}))


def run_child(kind: str, home: Path) -> dict:
    return child_result(__file__, kind, str(home))


def main() -> None:
    from bench_train import make_session
    from fastsd.models import tiny

    runs: dict[str, list[dict]] = {"none": [], "sync": [], "background": []}
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        home = Path(tmp)
        tiny.ensure("sd1", home / "models")
        make_session(home, 64)
        for _ in range(REPEATS):
            for kind in runs:
                runs[kind].append(run_child(kind, home))
                print(kind, runs[kind][-1], flush=True)

    best = {k: min(runs[k], key=lambda r: r["loop_s"]) for k in runs}
    sps = {k: STEPS / best[k]["loop_s"] for k in runs}

    def stall(kind: str) -> float:  # mean over the periodic checkpoints (not the stage end)
        return sum(best[kind]["stalls"][:-1]) / max(1, len(best[kind]["stalls"]) - 1)

    mb = best["sync"]["ckpt_mb"]
    rows = [
        Row(f"UNet stage speed, checkpoint every {EVERY} steps to a {RATE / 1e6:.0f} MB/s "
            "folder (background vs synchronous write)", "steps/s",
            round(sps["background"], 2), round(sps["sync"], 2)),
        Row("training loop idle per checkpoint (background vs synchronous)", "s",
            round(stall("background"), 3), round(stall("sync"), 3), higher_is_better=False),
        Row("UNet stage speed, background writer vs no checkpoints at all", "steps/s",
            round(sps["background"], 2), round(sps["none"], 2)),
    ]
    notes = (
        f"Tiny SD 1.x, 8 images, batch 1, 64 px, {STEPS} UNet steps, CPU (the training loop's "
        f"'GPU'); a checkpoint every {EVERY} steps, {mb:.1f} MB each (fp32 UNet + AdamW "
        f"state); every file write throttled to {RATE / 1e6:.0f} MB/s. Best of {REPEATS} "
        "alternating runs per side, each in its own process. The idle time is what the loop "
        "spends in the checkpoint call: with the background writer, the copy of the weights "
        "and optimizer state to CPU memory (and any wait for the previous write); "
        "synchronously, serialising, hashing and writing the whole checkpoint. On this "
        "2-core CPU the writer thread's serialising and hashing compete with the training "
        "for the same cores; on a GPU they do not.")
    write_result("checkpoint", "Checkpoints to a Drive-speed folder: background writer vs "
                 "synchronous write", rows, "python benchmarks/bench_checkpoint.py", notes)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]))
    else:
        main()
