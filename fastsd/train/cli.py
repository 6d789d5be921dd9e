"""`fastsd train SESSION [--resume] ...`: one option per field of TrainSettings.

Every option defaults to "not given" (None), so that a resume can tell the options the user
typed from the defaults (which the help text shows)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from fastsd.cli_common import add_home, load_session
from fastsd.train.settings import TrainSettings


def add_settings_options(p: argparse.ArgumentParser) -> None:
    """Add a --flag for each TrainSettings field, with its help, choices and default (shown
    in the help; the parsed value is None when the option is not given)."""
    hints = typing.get_type_hints(TrainSettings)
    for f in dataclasses.fields(TrainSettings):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        union = typing.get_origin(kind) in (typing.Union, types.UnionType)
        base = [a for a in typing.get_args(kind) if a is not type(None)] if union else [kind]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f.metadata["help"]
        if "(default:" not in text:
            text += f" (default: {default})"
        kw: dict = {"dest": f.name, "help": text.replace("%", "%%"), "default": None}
        if base[0] is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(base[0]) is list:
            p.add_argument(flag.rstrip("s"), action="append", metavar="TEXT", **kw)
        else:
            choices = f.metadata.get("choices")
            metavar = ("{" + " | ".join(choices) + "}") if choices and any(
                "," in c for c in choices) else None
            p.add_argument(flag, type=base[0], choices=choices, metavar=metavar, **kw)


def settings_from_args(args: argparse.Namespace) -> dict:
    """The training options given on the command line (and only those)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSettings)
            if getattr(args, f.name) is not None}


def _train(args: argparse.Namespace) -> None:
    from fastsd.train.trainer import train

    hook = None
    if args.events:
        from fastsd.train.runner import event_printer as hook
    result = train(load_session(args), settings_from_args(args), resume=args.resume,
                   restart=args.restart, accept_changed_data=args.accept_changed_data,
                   on_event=hook, more_unet_steps=args.more_unet_steps,
                   more_text_steps=args.more_text_steps)
    if result.lora:
        print(f"Trained {result.global_step} steps. LoRA: {result.lora} (in a prompt: "
              f"<lora:{result.lora.stem}:1>)")
    else:
        print(f"Trained {result.global_step} steps. Model: {result.model_dir}"
              + (f"; single file: {result.single_file}" if result.single_file else ""))
    if args.disconnect:
        from fastsd.train.runner import disconnect_when_safe

        disconnect_when_safe(result.model_dir, result.single_file, result.lora)


def _lora_merge(args: argparse.Namespace) -> None:
    from fastsd.train.lora_export import merge_session

    folder, single = merge_session(load_session(args), args.weight, args.name, args.precision)
    print(f"Merged model: {folder}; single file: {single}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `fastsd train` and `fastsd lora` to the `fastsd` parser."""
    p = sub.add_parser(
        "train", help="train a session's subject: UNet, then text encoder; resumable",
        description="Two-stage DreamBooth training of the session's base model on its images "
        "and captions: the whole model, or with --method lora small LoRA adapters on the "
        "frozen base (--rank, --alpha; a .safetensors LoRA in the session's models/Lora that "
        "AUTOMATIC1111, Forge, ComfyUI and diffusers load, used as <lora:NAME:WEIGHT>). "
        "Checkpoints go to the session's checkpoints/; after a dead runtime, "
        "run 'fastsd train SESSION --resume' to continue exactly where it stopped, with the "
        "run's settings; --resume --unet-steps N extends a finished UNet stage (when no "
        "text encoder stage has trained after it; the learning-rate schedule is rebuilt for "
        "the new total and continues from the step reached). --more-unet-steps N trains N "
        "more UNet steps on the session's trained model, even after the text encoder stage "
        "ran: a new segment of the session's history, resumable like the others. Options "
        "left at 'from the "
        "preset' are chosen for the detected GPU (T4, L4, A100) or CPU. Before training, the "
        "space the run needs on Drive is checked against the free space. Ctrl-C or SIGTERM "
        "finishes the step, saves a checkpoint and exits.")
    p.add_argument("session", help="session name")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest whole checkpoint, with the settings the run "
                   "started with")
    p.add_argument("--restart", action="store_true",
                   help="delete the session's checkpoints and start over")
    p.add_argument("--events", action="store_true",
                   help="also print each training event as a JSON line (for the notebook)")
    p.add_argument("--more-unet-steps", type=int, default=0, metavar="N",
                   help="train N more UNet steps on the session's trained model (models/NAME) "
                   "as a new segment, with the last run's settings and the options given; "
                   "also after the text encoder stage ran")
    p.add_argument("--more-text-steps", type=int, default=0, metavar="N",
                   help="the same for the text encoder (after the UNet steps when both)")
    p.add_argument("--disconnect", action="store_true",
                   help="on Colab, give the runtime back once the model and its single file "
                   "are whole on Drive (elsewhere: nothing)")
    p.add_argument("--accept-changed-data", action="store_true",
                   help="resume although the training images or captions changed since the "
                   "checkpoint (the run then differs from an uninterrupted one)")
    add_settings_options(p)
    add_home(p)
    p.set_defaults(func=_train)

    g = sub.add_parser("lora", help="a session's trained LoRA: merge it into its base model")
    gs = g.add_subparsers(dest="lora_command", required=True)
    m = gs.add_parser("merge", help="the base model with the LoRA merged in: a diffusers "
                      "folder and its single file in the session's models/",
                      description="Add the session's LoRA (times --weight) to the weights of "
                      "its base model and write the result as models/NAME-merged (diffusers) "
                      "and models/NAME-merged.safetensors (AUTOMATIC1111, Forge, ComfyUI).")
    m.add_argument("session", help="session name")
    m.add_argument("--weight", type=float, default=1.0, help="the LoRA's weight (default: 1)")
    m.add_argument("--name", help="which LoRA of the session (default: the newest)")
    m.add_argument("--precision", choices=("fp16", "fp32"), default="fp16",
                   help="precision of the merged model (default: fp16, which SDXL needs to "
                   "fit Colab's memory)")
    add_home(m)
    m.set_defaults(func=_lora_merge)
