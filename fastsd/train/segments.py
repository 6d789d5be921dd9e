"""A session's training history: one segment per run, and further segments on the trained
model ("train 200 more UNet steps after testing").

A segment is a run of the two-stage loop from one base: the first (and every ``--restart``)
from the session's base model; a further one, asked for with ``more`` steps
(``fastsd train S --more-unet-steps 200``, More_UNet_Steps in the train cell), from the
model the session's last segment exported into ``models/NAME``, even after its text encoder
stage ran. A further segment:

* takes the last run's settings, with the options given and the new step counts (only the
  stages asked for run);
* goes on counting global steps from where the last segment ended, so its checkpoints,
  samples and intermediate files never take the names of earlier ones;
* records ``models/NAME``'s fingerprint as its base, so a resume checks that the trained
  model is still the one it started from (it changes only at the segment's own export);
* replaces the last segment's checkpoints, once the set-up has succeeded: they hold that
  segment's run from its own base, which the new segment no longer continues. The trained
  model they led to is what the new segment starts from.

The history is the list ``session.settings["history"]``: per segment its id, its base, the
stages it runs (steps, learning rate), the global steps it spans and when it started and
finished. A checkpoint records its segment (``lineage``), so a resume knows which base to
load and which history entry it continues.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastsd import drive, options
from fastsd.errors import DataError
from fastsd.train.resume import STAGE_TITLES
from fastsd.train.settings import TrainSettings

log = logging.getLogger("fastsd")

HISTORY = "history"  # the key of the list in session.settings
TRAINED = "trained model"  # the base of a further segment, as the history names it


@dataclass
class Lineage:
    """The segment a run belongs to: its history id, whether its base is the session's
    trained model, and the global step it started from."""

    id: str
    on_trained_model: bool = False
    first_step: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "on_trained_model": self.on_trained_model,
                "first_step": self.first_step}

    def base_name(self, session, settings: TrainSettings) -> str:
        """The base as a checkpoint records it: the session's base model, or for a
        further segment its trained model's folder (relative to the session)."""
        if self.on_trained_model:
            return f"models/{trained_model(session, settings).name}"
        return session.base_model

    def base_folder(self, session, settings: TrainSettings) -> Path | None:
        """The trained model's folder for a further segment; None: the session's base
        model (through the resolver)."""
        return trained_model(session, settings) if self.on_trained_model else None


def trained_model(session, settings: TrainSettings) -> Path:
    """The folder the session's runs export their model into (``models/NAME``)."""
    return Path(session.models) / (settings.model_name or session.name)


def history(session) -> list[dict[str, Any]]:
    return list(session.settings.get(HISTORY) or [])


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _stages(settings: TrainSettings) -> dict[str, dict[str, float]]:
    return {st: {"steps": settings.stage(st)["steps"], "lr": settings.stage(st)["lr"]}
            for st in settings.stage_order if settings.stage(st)["steps"]}


def _unfinished(session) -> dict[str, Any] | None:
    last = (history(session) or [None])[-1]
    return last if last is not None and not last.get("finished") else None


def more_steps(unet: int = 0, text: int = 0) -> dict[str, int]:
    """The ``more`` of :func:`wants_new`: the steps per stage a further segment runs."""
    more = {"unet": int(unet or 0), "text": int(text or 0)}
    if any(v < 0 for v in more.values()):
        raise DataError("More steps must be 0 or more.")
    return {k: v for k, v in more.items() if v}


def wants_new(session, more: dict[str, int], *, resume: bool, restart: bool) -> bool:
    """Whether this run starts a further segment on the trained model. With ``resume`` an
    unfinished segment is resumed instead (a notebook cell run again with the same form);
    an unfinished run without ``resume`` must be finished (or restarted) first."""
    if not more:
        return False
    name = session.name
    if restart:
        raise DataError("Restart trains again from the base model, more steps train on from "
                        "the trained model: choose one (to train on: "
                        f"{options.say(('restart', False), session=name)}).")
    if _unfinished(session) is not None:
        if resume:
            log.info("Resuming the unfinished training run; the more steps asked for start "
                     "a new segment once it is done, when asked again.")
            return False
        raise DataError(f"Session {name}'s last training run has not finished. Finish it "
                        f"first ({options.say('resume', session=name)}); then train more.")
    return True


def new_segment(session, given: dict[str, Any], more: dict[str, int]) -> tuple[TrainSettings,
                                                                              Lineage]:
    """The settings and lineage of a further segment: the last run's settings, the options
    given, the new step counts; refused when the session has no trained model."""
    stored = dict(session.settings.get("train") or {})
    settings = TrainSettings.from_dict({**stored, **given, "unet_steps": more.get("unet", 0),
                                        "text_steps": more.get("text", 0)})
    if settings.lora:
        longer = int(stored.get("unet_steps") or 0) + more.get("unet", 0)
        again = options.say("restart", ("unet_steps", longer), session=session.name)
        raise DataError(
            f"Session {session.name} trained a LoRA: more steps train on from a whole trained "
            f"model, which a LoRA run does not write. Train the LoRA again with more steps "
            f"({again}), or merge it into its base model "
            f"({options.run('lora_merge', session.name)}) and train a new session on that.")
    folder = trained_model(session, settings)
    if not (folder / "model_index.json").is_file():
        raise DataError(f"Session {session.name} has no trained model in {folder} to train "
                        f"further. Train it first: {options.run('train', session.name)}.")
    done = history(session)
    first = int(done[-1].get("to_step") or 0) if done else _last_step(session)
    asked = ", ".join(f"{n} more {STAGE_TITLES[st]} steps" for st, n in more.items())
    log.info("A new training segment on the trained model %s: %s, from global step %d.",
             folder.name, asked, first)
    return settings, Lineage(_next_id(session), True, first)


def _last_step(session) -> int:
    """The global step of the newest checkpoint (a session trained before the history)."""
    from fastsd.train import checkpoint

    newest = (checkpoint.listing(session.checkpoints) or [None])[-1]
    if newest is None or not (newest.path / checkpoint.STATE).is_file():
        return 0
    return int(drive.read_json(newest.path / checkpoint.STATE).get("global_step", 0))


def _next_id(session) -> str:
    """The id of a new segment: its number in the history (every process of a multi-GPU
    run reads the same history, so all give it the same id)."""
    return str(len(history(session)) + 1)


def fresh(session) -> Lineage:
    """The lineage of a run from the session's base model (a first run, or a restart)."""
    return Lineage(_next_id(session))


def resumed(session, ckpt_state: dict[str, Any] | None) -> tuple[Lineage, bool]:
    """The lineage a resume continues, and whether the checkpoint found belongs to it.

    From the checkpoint when it records one; a checkpoint of an earlier segment while the
    history's last segment is unfinished (it was stopped before its first checkpoint) is
    not its: that segment starts again from its first step."""
    pending = _unfinished(session)
    recorded = (ckpt_state or {}).get("lineage")
    if recorded and (pending is None or pending["id"] == recorded["id"]):
        return Lineage(recorded["id"], recorded["on_trained_model"],
                       recorded["first_step"]), True
    if pending is not None and (recorded or pending.get("base") == TRAINED):
        return Lineage(pending["id"], pending.get("base") == TRAINED,
                       int(pending.get("from_step") or 0)), ckpt_state is None
    # a checkpoint of a fastsd without the history, or none at all
    return Lineage(pending["id"] if pending else _next_id(session)), True


def record_start(session, lineage: Lineage, settings: TrainSettings, base: str) -> None:
    """Add the segment to the history, or update its stages when it is resumed."""
    done = history(session)
    entry = next((e for e in done if e.get("id") == lineage.id), None)
    if entry is None:
        entry = {"id": lineage.id, "base": TRAINED if lineage.on_trained_model else base,
                 "from_step": lineage.first_step, "started": _now()}
        done.append(entry)
    entry.update(stages=_stages(settings), to_step=None, finished=None)
    session.update(**{HISTORY: done})


def record_finish(session, lineage: Lineage, step: int) -> None:
    """Mark the segment done, at global step ``step``, once its model is exported."""
    done = history(session)
    for entry in done:
        if entry.get("id") == lineage.id:
            entry.update(to_step=step, finished=_now())
    session.update(**{HISTORY: done})


def describe(session) -> str:
    """The history as lines a user reads: one per segment."""
    lines = []
    for i, e in enumerate(history(session), start=1):
        stages = ", ".join(f"{STAGE_TITLES[st]} {v['steps']} steps at {v['lr']:g}"
                           for st, v in e.get("stages", {}).items())
        end = (f"to step {e['to_step']}, finished {e['finished']}" if e.get("finished")
               else "not finished")
        lines.append(f"{i}. from {e['base']} at step {e.get('from_step', 0)}: {stages}; "
                     f"started {e.get('started')}, {end}")
    return "\n".join(lines) or "No training yet."

