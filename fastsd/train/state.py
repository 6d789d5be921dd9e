"""Where a run is (:class:`TrainState`), the global RNG states a checkpoint saves and
a resume restores, and the signals that stop a run at a step boundary (:class:`StopSignals`)."""

from __future__ import annotations

import logging
import random
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastsd import options
from fastsd.train import data
from fastsd.train.resume import STAGE_TITLES
from fastsd.train.settings import TrainSettings

log = logging.getLogger("fastsd")


# --------------------------------------------------------------------------- stopping


class StopSignals:
    """SIGTERM and Ctrl-C (SIGINT) ask the loop to stop after the current step, so the
    checkpoint it saves is consistent. A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("Got %s: stopping after this step and saving a checkpoint "
                    "(press Ctrl-C again to stop at once, without one).",
                    signal.Signals(signum).name)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)

    def raise_stop(self, step: int, where: Path, session: str = "SESSION") -> None:
        log.warning("Stopped at step %d; the checkpoint is in %s. To resume: %s.", step,
                    where, options.say("resume", session=session))
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + int(self.signum or signal.SIGTERM))


# --------------------------------------------------------------------------- state


def rng_states() -> dict[str, Any]:
    import numpy as np
    import torch

    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": [version, list(state), gauss],
           "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this process's GPU: each process has its own
        out["cuda_device"] = torch.cuda.get_rng_state()
    return out


def set_rng_states(states: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available():
        if "cuda_device" in states:
            torch.cuda.set_rng_state(states["cuda_device"])
        elif len(states.get("cuda") or []) > torch.cuda.current_device():  # older checkpoints
            torch.cuda.set_rng_state(states["cuda"][torch.cuda.current_device()])


def stages_left(settings: TrainSettings, stage: int) -> list[str]:
    """The stages with steps from index ``stage`` of the order on: none once a run has
    trained them all (only its export may be left)."""
    return [st for st in settings.stage_order[stage:] if settings.stage(st)["steps"]]


@dataclass
class TrainState:
    """Where a run is: saved whole in each checkpoint (``state.json`` and ``rng.pt``) and
    loaded whole on resume."""

    order: data.DataOrder
    class_order: data.DataOrder
    stage: int = 0  # index in the stage order of the stage in progress
    stage_step: int = 0
    global_step: int = 0
    losses: list[float] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)  # modules that differ from the base
    stage_steps: dict[str, int] = field(default_factory=dict)  # steps each stage trained
    optimizer_stage: str | None = None  # whose optimizer state the checkpoint holds
    rng: dict[str, Any] | None = None

    def advance(self, stage: str) -> None:
        """One step of ``stage`` done; its loss joins ``losses`` when it is read off the
        device (:class:`fastsd.train.trainer.StepReport`)."""
        self.stage_step += 1
        self.global_step += 1
        self.stage_steps[stage] = self.stage_steps.get(stage, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "stage_step": self.stage_step,
                "global_step": self.global_step, "losses": self.losses,
                "modified": self.modified, "stage_steps": self.stage_steps,
                "optimizer_stage": self.optimizer_stage, "data_order": self.order.state(),
                "class_order": self.class_order.state()}

    @classmethod
    def load(cls, saved: dict[str, Any], rng, n: int, n_class: int,
             allow_change: bool = False) -> "TrainState":
        order, class_order = data.DataOrder(n, 0), data.DataOrder(n_class, 0)
        order.load(saved["data_order"], allow_change)
        class_order.load(saved["class_order"], allow_change)
        return cls(order, class_order, saved["stage"], saved["stage_step"],
                   saved["global_step"], list(saved["losses"]), list(saved["modified"]),
                   dict(saved["stage_steps"]), saved["optimizer_stage"], rng)

    def describe(self, settings: TrainSettings) -> str:
        left = stages_left(settings, self.stage)
        if not left:
            return (f"global step {self.global_step}, both stages done; only the export is "
                    "left")
        return (f"global step {self.global_step}, {STAGE_TITLES[left[0]]} stage "
                f"step {self.stage_step if left[0] == settings.stage_order[self.stage] else 0}")
