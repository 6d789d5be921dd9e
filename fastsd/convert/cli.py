"""`fastsd convert`: diffusers folder <-> single file, and what a file is."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastsd.cli_common import add_home, home, print_json


def _to_single(args) -> None:
    from fastsd.convert import to_single_file

    out = to_single_file(Path(args.model_dir), Path(args.out), fp16=not args.fp32,
                         ckpt=args.ckpt, global_step=args.global_step)
    print(out)


def _to_diffusers(args) -> None:
    from fastsd.convert import to_diffusers

    out = to_diffusers(args.file, Path(args.out), config=args.config,
                       prediction=args.prediction, root=home(args),
                       fp16=True if args.fp16 else False if args.fp32 else None)
    print(out)


def _inspect(args) -> None:
    from fastsd.convert import inspect

    info = inspect(Path(args.file))
    if not args.metadata:
        info.pop("metadata", None)
    print_json(info)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `fastsd convert ...` to the `fastsd` parser."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("convert", help="convert between diffusers folders and single files",
                       description="Convert a diffusers model folder to one .safetensors/.ckpt "
                       "file in the original Stable Diffusion layout (AUTOMATIC1111, Forge, "
                       "ComfyUI), convert such a file back, or say what a file is.")
    csub = p.add_subparsers(dest="convert_cmd", required=True, metavar="COMMAND")

    s = csub.add_parser("to-single-file", formatter_class=fmt,
                        help="diffusers folder -> one .safetensors (or .ckpt) file",
                        description="Stream a diffusers SD 1.x/2.x/XL folder into one file, "
                        "one tensor at a time. SD 2.x gets its inference .yaml beside it.")
    s.add_argument("model_dir", metavar="MODEL_DIR", help="diffusers folder (model_index.json)")
    s.add_argument("out", metavar="OUT", help="the file to write (.safetensors or .ckpt)")
    s.add_argument("--fp32", action="store_true", help="keep fp32 weights (default: fp16)")
    s.add_argument("--ckpt", action="store_true", help="write a .ckpt instead of .safetensors")
    s.add_argument("--global-step", type=int, default=None,
                   help="training step to record in the file")
    s.set_defaults(func=_to_single)

    d = csub.add_parser("to-diffusers", formatter_class=fmt,
                        help="single file (path or link) -> diffusers folder",
                        description="Load a .safetensors/.ckpt file with diffusers' own "
                        "single-file loader (offline, from a local config folder), check every "
                        "tensor and save a diffusers folder. LoRAs, VAEs, ControlNets, "
                        "embeddings and refiners are refused by name.")
    d.add_argument("file", metavar="FILE", help="model file, or an http(s)/Drive link to one")
    d.add_argument("out", metavar="OUT", help="the diffusers folder to write")
    d.add_argument("--config", default=None,
                   help="diffusers folder (or Hub repo id) with the configs to use "
                   "(default: the detected family's, fetched once into the workspace)")
    d.add_argument("--prediction", choices=["epsilon", "v"], default=None,
                   help="override the detected prediction type (SD 2.x files often omit it)")
    prec = d.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true",
                      help="save fp16 weights (default: the file's own precision)")
    prec.add_argument("--fp32", action="store_true",
                      help="save fp32 weights (default: the file's own precision)")
    add_home(d)
    d.set_defaults(func=_to_diffusers)

    i = csub.add_parser("inspect", formatter_class=fmt,
                        help="what a model file is: family, precision, tensors, EMA, kind",
                        description="Read a model file's header (nothing is run or loaded "
                        "whole) and print what it is, as JSON.")
    i.add_argument("file", metavar="FILE", help=".safetensors or .ckpt file")
    i.add_argument("--metadata", action="store_true", help="also print the file's metadata")
    i.set_defaults(func=_inspect)
