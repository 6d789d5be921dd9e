"""`fastsd captions auto`: Kosmos-2 captions for a session's images."""

from __future__ import annotations

import argparse


def register_auto(captions_sub: argparse._SubParsersAction) -> None:
    """Add `auto` to the `fastsd captions` group (called by fastsd.dataset.cli)."""
