"""The Hugging Face Hub: one cache on the workspace (Drive on Colab), offline detection,
and failing fast with a clear message when a model must be downloaded but cannot be.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fastsd.errors import OfflineError

log = logging.getLogger("fastsd")

# What a diffusers repo needs; the big single-file checkpoints and fp16/EMA variants that
# sit beside the folders in many repos are left out.
DIFFUSERS_FILES = ["model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors"]
DIFFUSERS_SKIP = ["*.fp16.*", "*non_ema*", "*.ckpt", "*/*.bin", "*.onnx", "*.msgpack"]


def hub_cache(root: Path | None = None) -> Path:
    """The Hugging Face cache folder on the workspace (Drive on Colab)."""
    from fastsd.models import models_root

    return models_root(root) / "hub"


def offline() -> bool:
    """Whether the user asked for offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(
        (f or "").strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub answers a TCP connection within ``timeout`` seconds.

    Without this, an offline machine that lacks HF_HUB_OFFLINE=1 spends half a minute in
    huggingface_hub's retries before failing.
    """
    from urllib.parse import urlparse

    from huggingface_hub import constants

    from fastsd.env import reachable

    url = urlparse(constants.ENDPOINT)
    return reachable(url.hostname or "", url.port or (443 if url.scheme == "https" else 80),
                     timeout)


def offline_error(name: str, cache: Path, what: str = "model") -> OfflineError:
    return OfflineError(
        f"The {what} {name!r} is not in the model cache ({cache}) and this machine is "
        "offline (or cannot reach the Hugging Face Hub), so it cannot be downloaded. Connect "
        "to the internet (and unset HF_HUB_OFFLINE) and run this once: the model is then kept "
        "on Drive for later runtimes.")


def use_cache_only() -> bool:
    return offline() or not hub_reachable()


def snapshot(repo_id: str, root: Path | None = None, what: str = "base model") -> Path:
    """A local folder with the diffusers repo ``repo_id``, downloaded once into the cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache(root)
    local_only = use_cache_only()
    try:
        path = snapshot_download(repo_id, cache_dir=cache, allow_patterns=DIFFUSERS_FILES,
                                 ignore_patterns=DIFFUSERS_SKIP, local_files_only=local_only)
    except LocalEntryNotFoundError:
        raise offline_error(repo_id, cache, what) from None
    return Path(path)
