"""What a resume may change, and what it must refuse.

A checkpoint records the settings the run started with, the base model (the name the user
gave and a fingerprint of its weights), the resolution and a fingerprint of the training
images and captions. On ``--resume``:

* options the user typed are told from defaults (the CLI's options default to "not
  given"); those that cannot change mid-run (learning rates, resolution, batch size, ...)
  are refused with a message when they differ from the run's, never silently dropped;
* another base model is refused, saying what changed;
* changed images or captions are reported and need ``--restart`` or
  ``accept_changed_data`` (``--accept-changed-data``) to go on;
* a stage's step count may grow: a finished stage is extended when it was the last stage
  trained (``fastsd train S --resume --unet-steps 2500``). The learning-rate schedule is
  then rebuilt for the new total and continues from the step reached, as if the run had
  been planned with the new total from the start: a constant schedule goes on unchanged; a
  linear one resumes at the rate the longer plan has at that step (1500 of 2500 steps:
  40% of the base rate) and decays to zero at the new end. The optimizer state
  (AdamW moments) carries on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any

from fastsd import options
from fastsd.errors import DataError, ModelError
from fastsd.train.settings import TrainSettings

log = logging.getLogger("fastsd")

STAGE_TITLES = {"unet": "UNet", "text": "text encoder"}
#: Options a resume may change; every other one is fixed for the run.
CHANGEABLE = frozenset({"unet_steps", "text_steps", "checkpoint_every", "keep_checkpoints",
                        "sample_every", "sample_prompts", "sample_steps", "model_name",
                        "save_precision", "latent_cache_mb", "background_checkpoints",
                        "save_every", "save_from"})


def given_options(settings: TrainSettings | dict | None) -> dict[str, Any]:
    """The options the caller chose. A dict (what the CLI passes) holds exactly the options
    typed; of a TrainSettings object, the fields that differ from their defaults."""
    if settings is None:
        return {}
    if isinstance(settings, dict):
        names = {f.name for f in dataclasses.fields(TrainSettings)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise DataError(f"Unknown training options: {', '.join(unknown)}.")
        return {k: v for k, v in settings.items() if v is not None}
    defaults = TrainSettings().to_dict()
    return {k: v for k, v in settings.to_dict().items() if v != defaults[k]}


def fresh_settings(given: dict[str, Any]) -> TrainSettings:
    return TrainSettings(**given)


def resumed_settings(stored: dict[str, Any], given: dict[str, Any]) -> TrainSettings:
    """The run's settings with the typed options a resume may change; the others must
    equal the run's, else a DataError names them."""
    fixed = {k: v for k, v in given.items() if k not in CHANGEABLE and stored.get(k) != v}
    if fixed:
        raise DataError(
            "These options cannot change when resuming: "
            + "; ".join(f"{options.name(k)}: the run uses {stored.get(k)!r}, you gave "
                        f"{v!r}" for k, v in sorted(fixed.items()))
            + f". Resume without them, or start over to use them: {options.say('restart')}.")
    return TrainSettings.from_dict({**stored, **{k: v for k, v in given.items()
                                                 if k in CHANGEABLE}})


def apply_step_changes(state, old: TrainSettings, new: TrainSettings) -> str | None:
    """Check a resume's step counts against the position ``state`` (a TrainState) and
    move the position back into a finished stage that is extended. Returns the stage
    whose step count changed while it is (again) in progress, or None."""
    order = new.stage_order
    changed = None
    for i, stage in enumerate(order):
        before, after = old.stage(stage)["steps"], new.stage(stage)["steps"]
        if before == after:
            continue
        title = STAGE_TITLES[stage]
        steps = f"{stage}_steps"
        flag = options.name(steps)
        if i < state.stage:  # finished
            later = [t for t in order[i + 1:] if state.stage_steps.get(t, 0) > 0]
            if after < before:
                raise DataError(f"The {title} stage already finished its {before} steps; "
                                f"{flag} {after} cannot undo them. Resume with {before} "
                                f"or more ({options.say((steps, before), 'resume')}), or "
                                f"start over: {options.say('restart')}.")
            if later:
                raise DataError(
                    f"The {title} stage cannot be extended to {after} steps: the "
                    f"{STAGE_TITLES[later[0]]} stage has trained after it "
                    f"({state.stage_steps[later[0]]} steps), and going back would train the "
                    f"{title} against a changed model. Train {after - before} more {title} "
                    "steps on the trained model instead, as a new segment: "
                    f"{options.say(('resume', False), (f'more_{stage}_steps', after - before))}"
                    f"; or start over with the longer stage: "
                    f"{options.say('restart', (steps, after))}.")
            state.stage, state.stage_step = i, state.stage_steps.get(stage, 0)
            log.info("Extending the %s stage from %d to %d steps.", title, before, after)
            changed = stage
        elif i == state.stage and state.stage_step > 0:
            if after < state.stage_step:
                raise DataError(f"The {title} stage has already trained {state.stage_step} "
                                f"steps, more than {flag} {after}. Give at least "
                                f"{state.stage_step} ("
                                f"{options.say((steps, state.stage_step), 'resume')}), or "
                                f"start over: {options.say('restart')}.")
            changed = stage
    return changed


# --------------------------------------------------------------------------- fingerprints

#: How :func:`model_fingerprint` is computed; the fingerprint starts with it ("2:..."). A
#: recorded fingerprint without that prefix was made by an earlier fastsd (scheme 1), which
#: also hashed where the model was loaded from and the diffusers version that loaded it.
FINGERPRINT_SCHEME = 2
_SAMPLE = 1024  # values hashed per tensor, spread evenly from its first to its last
_scheme1: dict[str, str] = {}  # fingerprint -> the scheme-1 value of the same UNet object


def structural_config(unet) -> dict[str, Any]:
    """The entries of a UNet's config that shape the model: none of those that say where or
    by which version it was loaded (``_name_or_path``, ``_diffusers_version``, every
    ``_``-prefixed key), and none that equal the class's default (a newer diffusers adds
    options with a default that keeps the old behaviour)."""
    import inspect

    def plain(v: Any) -> Any:
        return json.loads(json.dumps(v, default=str))

    params = inspect.signature(type(unet).__init__).parameters
    defaults = {k: plain(p.default) for k, p in params.items()
                if p.default is not inspect.Parameter.empty}
    out = {"class": type(unet).__name__}
    for k, v in dict(unet.config).items():
        if not k.startswith("_") and (k not in defaults or plain(v) != defaults[k]):
            out[k] = plain(v)
    return out


def model_fingerprint(unet) -> str:
    """A short hash of a UNet's weights and structural config (:func:`structural_config`):
    the same weights give the same fingerprint wherever they are loaded from (another
    staging folder, Drive mounted at another path, another diffusers), other weights give
    another. Each tensor's name, shape and 1024 values spread over it (the first and the
    last among them) are hashed."""
    import torch

    h = hashlib.sha256(json.dumps(structural_config(unet), sort_keys=True).encode())
    sd = unet.state_dict()
    for k in sorted(sd):
        flat = sd[k].detach().reshape(-1)
        # float64: in float32 the last index of a tensor over 2**24 values rounds past
        # its end (SDXL's UNet has such tensors)
        at = torch.linspace(0, flat.numel() - 1, min(flat.numel(), _SAMPLE),
                            dtype=torch.float64).long()
        h.update(f"{k}{tuple(sd[k].shape)}".encode())
        h.update(flat[at.to(flat.device)].float().cpu().contiguous().numpy().tobytes())
    fingerprint = f"{FINGERPRINT_SCHEME}:{h.hexdigest()[:16]}"
    _scheme1[fingerprint] = _scheme1_fingerprint(unet)
    return fingerprint


def _scheme1_fingerprint(unet) -> str:
    """The fingerprint of fastsd before scheme 2, to check a checkpoint it wrote: the whole
    config (with the load folder and diffusers version) and the start of five tensors."""
    h = hashlib.sha256(json.dumps(dict(unet.config), sort_keys=True, default=str).encode())
    sd = unet.state_dict()
    keys = sorted(sd)
    for k in keys[:2] + keys[len(keys) // 2:len(keys) // 2 + 1] + keys[-2:]:
        t = sd[k].detach().flatten()[:4096].float().cpu().contiguous()
        h.update(k.encode() + t.numpy().tobytes())
    return h.hexdigest()[:16]


def _scheme(fingerprint: str) -> int:
    head, sep, _ = fingerprint.partition(":")
    return int(head) if sep and head.isdigit() else 1


def check_base_model(recorded: dict[str, str] | None, name: str, fingerprint: str) -> None:
    """Refuse to resume a run on other base weights than it was trained from.

    ``fingerprint`` is :func:`model_fingerprint` of the base model loaded now. A checkpoint
    of an earlier fastsd (scheme 1) is checked the old way against the same UNet; when that
    differs only because the model was loaded from another folder or by another diffusers
    (the old scheme counted both) nothing can tell, and the run goes on when the base model's
    name is the same, saying so in the log."""
    if not recorded:
        return
    same_name = recorded["name"] == name
    scheme = _scheme(recorded["fingerprint"])
    if scheme == 1:
        if recorded["fingerprint"] == _scheme1.get(fingerprint):
            log.info("This checkpoint was written by an earlier fastsd; its base model "
                     "fingerprint matches when computed the old way. Resuming; the next "
                     "checkpoint records the new fingerprint (%s).", fingerprint)
        elif same_name:
            log.warning(
                "This checkpoint was written by an earlier fastsd, whose base model "
                "fingerprint also counted the folder the model was loaded from and the "
                "diffusers version, so it cannot be compared here. The base model has the "
                "same name (%r): resuming on it. The next checkpoint records a fingerprint of "
                "the weights alone (%s).", name, fingerprint)
            return
        else:
            raise ModelError(
                f"This run was trained from the base model {recorded['name']!r}, and the "
                f"session now names {name!r}. The checkpoint was written by an earlier fastsd "
                "whose fingerprint cannot tell whether they hold the same weights. To resume, "
                "set the session's base model back: "
                f"{options.say(('base_model', recorded['name']), 'change_base_model')}; or "
                f"start a new run on the new model: {options.say('restart')}.")
    elif scheme != FINGERPRINT_SCHEME:
        raise ModelError(
            f"This checkpoint's base model fingerprint ({recorded['fingerprint']}) was made by "
            "a newer fastsd. Update fastsd (run the install cell again) to resume it, or start "
            f"over: {options.say('restart')}.")
    elif recorded["fingerprint"] != fingerprint:
        what = (f"the session now names {name!r}" if not same_name else
                f"{name!r} now holds other weights")
        raise ModelError(
            f"This run was trained from the base model {recorded['name']!r} (fingerprint "
            f"{recorded['fingerprint']}), but {what} (fingerprint {fingerprint}). Resuming "
            "would mix the two. To resume, set the session's base model back: "
            f"{options.say(('base_model', recorded['name']), 'change_base_model')}; or start "
            f"a new run on the new model: {options.say('restart')}.")
    if not same_name:
        log.info("The base model is now named %r (was %r); same weights, resuming.", name,
                 recorded["name"])


def check_data(recorded: dict[str, str] | None, current: dict[str, str],
               accept_changed: bool) -> bool:
    """True when the training images and captions changed since the checkpoint (and the
    caller accepts it); a DataError when they changed and it does not."""
    from fastsd.train import data

    changes = data.fingerprint_changes(recorded or {}, current) if recorded is not None else []
    if not changes:
        return False
    what = "; ".join(changes)
    if not accept_changed:
        raise DataError(
            f"The training images or captions changed since this run's checkpoint ({what}). "
            f"Put them back to resume exactly; or start over: {options.say('restart')}; or "
            f"go on with the new ones: {options.say('accept_changed_data', 'resume')} (the "
            "run then no longer matches an uninterrupted one).")
    log.warning("Going on with changed training images or captions (%s).", what)
    return True
