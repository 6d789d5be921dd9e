"""A training run for ``accelerate launch`` (test_train_multiprocess.py): trains a session
with the given options and, as test-only fault injection, SIGKILLs the whole launch (the
launcher, then each worker's process group) once checkpoint ``--kill-after`` is on disk
and step ``--kill-at`` has run."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
from pathlib import Path

from fastsd import session
from fastsd.train import train
from test_train_resume import wait_for_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("home")
    ap.add_argument("name")
    ap.add_argument("options", help="training options as JSON")
    ap.add_argument("--kill-after", type=int, default=0)
    ap.add_argument("--kill-at", type=int, default=0)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, filename=str(Path(a.home) / f"{a.name}.log"))
    s = session.load(a.name, Path(a.home))

    def hook(event: str, info: dict) -> None:
        if a.kill_at and event == "step" and info["global_step"] == a.kill_at:
            wait_for_checkpoint(s.checkpoints, a.kill_after)  # written in the background
            os.kill(os.getppid(), signal.SIGKILL)  # the launcher (torchrun's agent)
            os.killpg(os.getpgid(0), signal.SIGKILL)  # this worker (its own group)

    train(s, json.loads(a.options), on_event=hook)


if __name__ == "__main__":
    main()
