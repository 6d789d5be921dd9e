"""`fastsd train SESSION [--resume] ...`: one option per field of TrainSettings."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from fastsd.cli_common import add_home, load_session
from fastsd.train.settings import TrainSettings


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default; options whose default is not a plain value say it themselves."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if "(default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def add_settings_options(p: argparse.ArgumentParser) -> None:
    """Add a --flag for each TrainSettings field, with its help, choices and default."""
    hints = typing.get_type_hints(TrainSettings)
    for f in dataclasses.fields(TrainSettings):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        union = typing.get_origin(kind) in (typing.Union, types.UnionType)
        base = [a for a in typing.get_args(kind) if a is not type(None)] if union else [kind]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw: dict = {"dest": f.name, "help": f.metadata["help"]}
        if base[0] is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, **kw)
        elif typing.get_origin(base[0]) is list:
            p.add_argument(flag.rstrip("s"), action="append", default=None, metavar="TEXT",
                           **kw)
        else:
            choices = f.metadata.get("choices")
            metavar = ("{" + " | ".join(choices) + "}") if choices and any(
                "," in c for c in choices) else None
            p.add_argument(flag, type=base[0], default=default, choices=choices,
                           metavar=metavar, **kw)


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSettings)}
    values["sample_prompts"] = values["sample_prompts"] or []
    return TrainSettings(**values)


def _train(args: argparse.Namespace) -> None:
    from fastsd.train.trainer import train

    hook = None
    if args.events:
        from fastsd.train.runner import event_printer as hook
    result = train(load_session(args), settings_from_args(args), resume=args.resume,
                   restart=args.restart, on_event=hook)
    print(f"Trained {result.global_step} steps. Model: {result.model_dir}"
          + (f"; single file: {result.single_file}" if result.single_file else ""))


def register(sub: argparse._SubParsersAction) -> None:
    """Add `fastsd train` to the `fastsd` parser."""
    p = sub.add_parser(
        "train", help="train a session's subject: UNet, then text encoder; resumable",
        formatter_class=_Formatter,
        description="Two-stage DreamBooth training of the session's base model on its images "
        "and captions. Checkpoints go to the session's checkpoints/; after a dead runtime, "
        "run the same command with --resume to continue exactly where it stopped. Options "
        "left at 'from the preset' are chosen for the detected GPU (T4, L4, A100) or CPU.")
    p.add_argument("session", help="session name")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest whole checkpoint, with the settings the run "
                   "started with")
    p.add_argument("--restart", action="store_true",
                   help="delete the session's checkpoints and start over")
    p.add_argument("--events", action="store_true",
                   help="also print each training event as a JSON line (for the notebook)")
    add_settings_options(p)
    add_home(p)
    p.set_defaults(func=_train)
