"""What every area's command-line module shares: the ``--home`` option, the workspace it
names, loading the named session, and JSON output. Areas import this, never ``fastsd.cli``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HOME_HELP = "workspace folder (default: Drive on Colab, else $FASTSD_HOME or ~/fastsd)"


def add_home(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", help=HOME_HELP)


def home(args: argparse.Namespace) -> Path | None:
    """The workspace folder the user named with --home, or None for this runtime's."""
    return Path(args.home) if getattr(args, "home", None) else None


def load_session(args: argparse.Namespace):
    """The session named by the command's ``session`` argument."""
    from fastsd import session

    return session.load(args.session, home(args))


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str, ensure_ascii=False))
