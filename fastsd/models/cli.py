"""`fastsd models ...`: the registry, downloads, ControlNets, the Hub upload, tiny models."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastsd.cli_common import add_home, home, load_session, print_json


def _list(args) -> None:
    from fastsd.models import registry

    rows = [e.summary() for e in registry.entries().values()]
    if args.json:
        print_json(rows)
        return
    print(f"{'name':<16} {'family':<6} {'px':>5} {'GB':>5}  {'trains on':<14} title")
    for r in rows:
        fits = ",".join(g.upper() for g, ok in r["trains_on"].items() if ok) or "-"
        print(f"{r['name']:<16} {r['family']:<6} {r['resolution']:>5} "
              f"{r['download_gb']:>5.1f}  {fits:<14} {r['title']}")


def _get(args) -> None:
    from fastsd import models

    print(models.resolve_model(args.model, home(args)))


def _controlnet_list(args) -> None:
    from fastsd.models import registry

    rows = [{"name": c.name, "family": c.family, "preprocessor": c.preprocessor,
             "url": c.url} for c in registry.controlnets(args.family, tiny=args.tiny)]
    if args.json:
        print_json(rows)
        return
    for r in rows:
        print(f"{r['family']:<5} {r['name']:<14} {r['preprocessor']:<18} {r['url']}")


def _controlnet_get(args) -> None:
    from fastsd.models import registry

    print(registry.ensure_controlnet(args.name, args.family, home(args)))


def _upload(args) -> None:
    from fastsd.models import upload

    s = load_session(args)
    if args.dry_run:
        p = upload.plan(s, args.repo, args.name)
        print(p.card)
        for r, f in p.files:
            print(f"{r}  <-  {f}")
        return
    print(upload.upload(s, args.repo, private=not args.public, name=args.name))


def _build_tiny(args) -> None:
    from fastsd.models import tiny
    from fastsd.workspace import Workspace

    families = tiny.FAMILIES if args.family == "all" else (args.family,)
    for fam in families:
        out = Path(args.out) / f"tiny-{fam}" if args.out else None
        path = tiny.build(fam, out, args.seed) if out else tiny.ensure(
            fam, Workspace.current(home(args)).models, args.seed)
        print(f"tiny-{fam}: {path}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `fastsd models ...` to the `fastsd` parser."""
    p = sub.add_parser("models", help="base models: list, download, ControlNets, upload, tiny")
    ms = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    c = ms.add_parser("list", help="the registry's base models (family, size, GPUs it trains on)")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=_list)
    c = ms.add_parser("get", help="download (or find) a model and print its local folder")
    c.add_argument("model", metavar="NAME|REPO|URL|PATH",
                   help="a registry name, a Hub repo id, a link or a local folder/file")
    c.set_defaults(func=_get)
    cn = ms.add_parser("controlnet", help="ControlNets by base family: list, get")
    cs = cn.add_subparsers(dest="cn_verb", metavar="VERB", required=True)
    c = cs.add_parser("list", help="the ControlNets of the registry")
    c.add_argument("--family", choices=("sd1", "sd2", "sdxl"), help="only this base family")
    c.add_argument("--tiny", action="store_true",
                   help="also the tiny test ControlNets (they fit the tiny test models only)")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=_controlnet_list)
    c = cs.add_parser("get", help="download a ControlNet into the workspace's models/controlnet")
    c.add_argument("name")
    c.add_argument("--family", choices=("sd1", "sd2", "sdxl"), default="sd1",
                   help="base family of the model it guides (default: sd1)")
    add_home(c)
    c.set_defaults(func=_controlnet_get)
    c = ms.add_parser("upload", help="upload a session's trained model to the Hub (private)")
    c.add_argument("session")
    c.add_argument("repo", metavar="REPO", help="USER/NAME on the Hugging Face Hub")
    c.add_argument("--public", action="store_true", help="make the repo public")
    c.add_argument("--name", help="which trained model of the session (default: newest)")
    c.add_argument("--dry-run", action="store_true",
                   help="print the model card and the files, upload nothing")
    c.set_defaults(func=_upload)
    c = ms.add_parser("build-tiny", help="build tiny random SD models offline")
    c.add_argument("--family", choices=("sd1", "sd2", "sdxl", "all"), default="all")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", help="folder to build into (default: WORKSPACE/models)")
    c.set_defaults(func=_build_tiny)
    for c in [*ms.choices.values(), *cs.choices.values()]:
        if not any(a.dest == "home" for a in c._actions):
            add_home(c)
