"""Stand-in for ``google.colab.userdata`` (Colab secrets): ``$COLAB_STANDIN_SECRETS`` is a
JSON file of name -> value."""

from __future__ import annotations

import json
import os


class SecretNotFoundError(Exception):
    pass


class NotebookAccessError(Exception):
    pass


def get(key: str) -> str:
    path = os.environ.get("COLAB_STANDIN_SECRETS")
    secrets = json.load(open(path)) if path and os.path.exists(path) else {}
    if key not in secrets:
        raise SecretNotFoundError(f"Secret {key} does not exist.")
    return secrets[key]
