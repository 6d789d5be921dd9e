"""Stand-in for ``google.colab.runtime``: ``unassign()`` gives the runtime back on Colab;
here it is recorded in ``google.colab.events`` (with Drive's flushes), and in the file
``$COLAB_STANDIN_UNASSIGNED`` when set, for a test in another process."""

from __future__ import annotations

import os

from google import colab


def unassign() -> None:
    colab.events.append("unassign")
    path = os.environ.get("COLAB_STANDIN_UNASSIGNED")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write("unassign\n")
