"""The ``fastsd`` command: a thin layer over the same functions the notebooks call.

The top of the package: it registers each area's subcommands (each area's ``cli`` module
has a ``register(subparsers)``), and areas share only :mod:`fastsd.cli_common`. A
FastSDError is shown as its message alone and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from fastsd import __version__, session
from fastsd.cli_common import add_home, home, print_json
from fastsd.convert import cli as convert_cli
from fastsd.dataset import cli as dataset_cli
from fastsd.errors import FastSDError
from fastsd.kosmos import cli as kosmos_cli
from fastsd.models import cli as models_cli, registry
from fastsd.train import cli as train_cli
from fastsd.webui import cli as webui_cli


# --------------------------------------------------------------------------- session

def _session_settings(args) -> dict:
    return {k: v for k, v in (("instance_token", args.token), ("class_word", args.cls),
                              ("base_model", args.model), ("resolution", args.resolution),
                              ("temp_storage", args.temp_storage))
            if v is not None}


def _session_create(args) -> None:
    s = session.create(args.name, home(args), **_session_settings(args))
    print(f"Created session {s.name} at {s.path} (base model {s.base_model})")


def _session_set(args) -> None:
    session.load(args.name, home(args))  # an existing one: set never creates
    print(session.open(args.name, home(args), _session_settings(args), change=True))


def _session_list(args) -> None:
    names = session.list_sessions(home(args))
    print("\n".join(names) if names else "No sessions yet: create one with "
          "'fastsd session create NAME'.")


def _session_show(args) -> None:
    from fastsd import space

    s = session.load(args.name, home(args))
    train = s.settings.get("train") or {}
    print_json({**s.summary(), "method": train.get("method", "full") if train else None,
                "bytes": space.session_space(s)})


def _session_delete(args) -> None:
    path = session.delete(args.name, home(args), confirm=args.yes)
    print(f"Deleted {path}")


def _space(args) -> None:
    from fastsd import space
    from fastsd.workspace import Workspace

    ws = Workspace.current(home(args))
    print(space.table(space.usage(ws), ws))
    if args.delete:
        print(space.free(space.parse_picks(args.delete), ws, confirm=args.yes))


def _env(args) -> None:
    from fastsd import env
    from fastsd.workspace import Workspace

    print_json(env.report(Workspace.current(home(args), mount=False).root))


def _demo(args) -> None:
    from fastsd import demo

    demo.run(home(args), family=args.family, name=args.name)


def _doctor(args: argparse.Namespace) -> None:
    from fastsd import deps

    checks = deps.doctor(home(args), deep=args.deep)
    print(deps.format_checks(checks))
    if not all(c.ok for c in checks):
        print("\nSome checks failed; the lines marked BAD say what to do.")


def _install(args: argparse.Namespace) -> None:
    from fastsd import deps

    print(deps.install(home(args), build=not args.offline, installer=args.installer).summary())


def _session_options(c: argparse.ArgumentParser, defaults: dict, model: str | None) -> None:
    """The settings options of `session create` (with the defaults it fills in) and `set`."""
    def said(value) -> str:
        return f" (default: {value})" if value is not None else ""

    c.add_argument("--token", help="instance token" + said(defaults.get("instance_token")))
    c.add_argument("--class", dest="cls", help="class word, e.g. dog"
                   + said(defaults.get("class_word")))
    c.add_argument("--model", default=model, help="base model: a name from 'fastsd models "
                   "list', a Hugging Face repo, a .safetensors/.ckpt file or link"
                   + said(model))
    c.add_argument("--resolution", type=int, help="training resolution"
                   + said(defaults.get("resolution")))
    c.add_argument("--temp-storage", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the base model on this machine's own disk instead of the "
                   "workspace (Drive on Colab): downloaded again in each new runtime"
                   + said(False if defaults else None))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastsd", description="DreamBooth for Stable Diffusion: sessions, images, "
        "captions, training, conversion.")
    parser.add_argument("--version", action="version", version=f"fastsd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("session", help="create, list, show or delete training sessions")
    ss = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    c = ss.add_parser("create", help="create a new session folder")
    c.add_argument("name")
    _session_options(c, session.DEFAULT_SETTINGS, registry.DEFAULT_BASE_MODEL)
    c.set_defaults(func=_session_create)
    c = ss.add_parser("set", help="change an existing session's settings (base model, "
                      "token, class word, resolution)")
    c.add_argument("name")
    _session_options(c, {}, None)
    c.set_defaults(func=_session_set)
    c = ss.add_parser("list", help="list sessions")
    c.set_defaults(func=_session_list)
    c = ss.add_parser("show", help="show a session's settings, training method, file counts "
                      "and the bytes its checkpoints, models and LoRAs take")
    c.add_argument("name")
    c.set_defaults(func=_session_show)
    c = ss.add_parser("delete", help="delete a session folder (needs --yes)")
    c.add_argument("name")
    c.add_argument("--yes", action="store_true", help="really delete it")
    c.set_defaults(func=_session_delete)
    for c in ss.choices.values():
        add_home(c)

    p = sub.add_parser("space", help="what takes room in the workspace; delete picked items "
                       "(with --yes)")
    p.add_argument("--delete", default="", help="numbers from the list, e.g. '2, 4-6'")
    p.add_argument("--yes", action="store_true", help="really delete them")
    add_home(p)
    p.set_defaults(func=_space)

    p = sub.add_parser("env", help="report the runtime: Colab or not, device, VRAM, workspace")
    add_home(p)
    p.set_defaults(func=_env)

    p = sub.add_parser("doctor", help="check the runtime: Python, torch, CUDA, GPU, every "
                       "pin, disk, Drive, wheelhouse, known-bad combinations")
    p.add_argument("--deep", action="store_true", help="ask torch for the GPU too (imports "
                   "torch; finds a torch that cannot use the driver)")
    add_home(p)
    p.set_defaults(func=_doctor)

    p = sub.add_parser("install", help="install every missing or mismatched pin from the "
                       "Drive wheelhouse (built from the index the first time)")
    p.add_argument("--offline", action="store_true", help="never use the index: fail if the "
                   "wheelhouse cannot be used")
    p.add_argument("--installer", choices=("uv", "pip"), help="default: uv when present")
    add_home(p)
    p.set_defaults(func=_install)

    p = sub.add_parser("demo", help="run the whole job end to end on a tiny model, offline")
    p.add_argument("--family", choices=("sd1", "sd2", "sdxl"), default="sd1")
    p.add_argument("--name", default="demo", help="session name (default: demo)")
    add_home(p)
    p.set_defaults(func=_demo)

    kosmos_cli.register_auto(dataset_cli.register(sub))
    train_cli.register(sub)
    convert_cli.register(sub)
    models_cli.register(sub)
    webui_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(message)s")
    try:
        args.func(args)
    except FastSDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
