"""Upload a trained session model to the Hugging Face Hub: private unless asked otherwise.

What goes up: the diffusers folder of the session's trained model and its single
``.safetensors`` file, or for a session trained with LoRA its LoRA file; sample images
from the session's ``outputs/``; and a model card (README.md) written from the session:
base model (as the Hub's ``base_model``, so the Hub links the two), instance token,
training settings.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from fastsd import fetch, options
from fastsd.errors import DataError, ModelError, OfflineError
from fastsd.session import Session

log = logging.getLogger("fastsd")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
MAX_SAMPLES = 8


@dataclass
class UploadPlan:
    """Every file of the upload as (path in the repo, local path), and the model card."""

    repo_id: str
    model_dir: Path  # the trained model folder, or the LoRA file
    files: list[tuple[str, Path]] = field(default_factory=list)
    card: str = ""


def trained_model(session: Session, name: str | None = None) -> Path:
    """The session's trained diffusers folder (the newest one, or the one named)."""
    folders = sorted((p.parent for p in session.models.glob("*/model_index.json")),
                     key=lambda p: p.stat().st_mtime)
    if name:
        folders = [p for p in folders if p.name == name]
    if not folders:
        lora = session.lora()
        raise ModelError(f"Session {session.name!r} has no trained model"
                         + (f" named {name!r}" if name else "") + f" in {session.models}. "
                         + (f"It trained a LoRA ({lora.name}): use it with its base model "
                            f"(<lora:{lora.stem}:1> in a prompt), or merge it into one: "
                            f"{options.run('lora_merge', session.name)}." if lora else
                            f"Train it first: {options.run('train', session.name)}."))
    return folders[-1]


def hub_base_model(base: str) -> str | None:
    """The Hub repo id of a session's base model (a registry name is looked up), or None
    for a file or a link."""
    from fastsd.models import registry

    entry = registry.get(base) if isinstance(base, str) else None
    if entry is not None:
        return entry.repo or None
    if isinstance(base, str) and base.count("/") == 1 and \
            not base.startswith(("/", ".", "~", "http")):
        return base
    return None


def model_card(session: Session, model_dir: Path, samples: list[str],
               repo_id: str = "USER/REPO") -> str:
    """The README.md of the uploaded model (``model_dir``: its folder, or the LoRA file)."""
    s = session.settings
    base = s.get("base_model", "?")
    token = s.get("instance_token", "sks")
    cls = s.get("class_word", "")
    train = s.get("train", {})
    is_lora = model_dir.suffix == ".safetensors"
    front = ["---", "library_name: diffusers", "license: creativeml-openrail-m"]
    repo = hub_base_model(base)
    if repo:
        front.append(f"base_model: {repo}")
    prompt = f"photo of {token} {cls}".strip()
    name = model_dir.stem if is_lora else model_dir.name
    if is_lora:
        what = f"A DreamBooth LoRA for `{repo or base}`"
        files = [f"- `{model_dir.name}`: the LoRA (kohya's layout, rank "
                 f"{train.get('rank', '?')}, alpha {train.get('alpha', '?')}). "
                 f"AUTOMATIC1111 and Forge: put it in `models/Lora` and add "
                 f"`<lora:{name}:1>` to the prompt; ComfyUI: a LoraLoader node; diffusers: "
                 f"`pipe.load_lora_weights(\"{repo_id}\", weight_name=\"{model_dir.name}\")` "
                 f"on a pipeline of the base model"]
    else:
        what = f"A DreamBooth fine-tune of `{base}`"
        files = ["- the diffusers folders (`model_index.json`, `unet/`, `text_encoder/`, ...): "
                 "`StableDiffusionPipeline.from_pretrained(...)`",
                 f"- `{model_dir.name}.safetensors`: one file for AUTOMATIC1111, Forge or "
                 "ComfyUI"]
    lines = [*front, "tags:", "- stable-diffusion", "- dreambooth", "- fastsd",
             *(["- lora"] if is_lora else []),
             f"instance_prompt: {prompt}", "---", "", f"# {name}", "",
             f"{what} trained with fastsd on the subject `{token}`"
             + (f" ({cls})" if cls else "") + ".", "",
             f"Prompt with **{token}**, for example: `{prompt}`.", "",
             "## Files", "", *files,
             "", "## Training settings", "", "```json",
             json.dumps(train, indent=2, sort_keys=True, default=str), "```", ""]
    if samples:
        lines += ["## Samples", ""] + [f"![{Path(p).stem}]({p})" for p in samples] + [""]
    return "\n".join(lines) + "\n"


def plan(session: Session, repo_id: str, name: str | None = None) -> UploadPlan:
    """What an upload of the session's model to ``repo_id`` sends."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise DataError(f"{repo_id!r} is not a Hub repo id: give USER/NAME (or ORG/NAME).")
    lora = session.lora(name) if (session.settings.get("train") or {}).get(
        "method") == "lora" else None
    if lora is not None:
        out = UploadPlan(repo_id, lora, [(lora.name, lora)])
        out.card = model_card(session, lora, _samples(session, out), repo_id)
        return out
    model_dir = trained_model(session, name)
    out = UploadPlan(repo_id, model_dir)
    for p in sorted(model_dir.rglob("*")):
        if p.is_file() and not any(x.startswith(".") for x in p.relative_to(model_dir).parts):
            out.files.append((p.relative_to(model_dir).as_posix(), p))
    single = model_dir.parent / f"{model_dir.name}.safetensors"
    if single.is_file():
        out.files.append((single.name, single))
        yaml = single.with_suffix(".yaml")
        if yaml.is_file():
            out.files.append((yaml.name, yaml))
    else:
        log.warning("%s has no single file beside it; uploading the diffusers folder only.",
                    model_dir)
    out.card = model_card(session, model_dir, _samples(session, out))
    return out


def _samples(session: Session, out: UploadPlan) -> list[str]:
    """Add the newest images of the session's outputs to the upload; their repo paths."""
    images = sorted((p for p in session.outputs.rglob("*") if p.suffix.lower() in IMAGE_EXTS),
                    key=lambda p: p.stat().st_mtime)[-MAX_SAMPLES:]
    samples = []
    for p in images:
        samples.append(f"samples/{p.name}")
        out.files.append((samples[-1], p))
    return samples


def upload(session: Session, repo_id: str, private: bool = True, name: str | None = None,
           token: str | None = None) -> str:
    """Create ``repo_id`` on the Hub (private by default) and upload the session's model
    to it in one commit; returns the repo's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    p = plan(session, repo_id, name)
    token = token or fetch.hf_token(session.workspace)
    if not token:
        raise DataError("Uploading needs a Hugging Face token with write access: set HF_TOKEN, "
                        "add it to Colab's secrets as HF_TOKEN, or put it in the workspace's "
                        f"{fetch.TOKEN_FILE} file.")
    if fetch.hf_offline() or not fetch.hub_reachable():
        raise OfflineError(f"Cannot reach the Hugging Face Hub, so {repo_id} cannot be "
                           "uploaded. Check the connection (and unset HF_HUB_OFFLINE), then "
                           "run this again.")
    api = HfApi(token=token)
    ops = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=p.card.encode())]
    ops += [CommitOperationAdd(path_in_repo=r, path_or_fileobj=str(f)) for r, f in p.files]
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.create_commit(repo_id, ops, commit_message=f"fastsd: {p.model_dir.name} from "
                          f"session {session.name}", repo_type="model")
    except HfHubHTTPError as e:
        code = getattr(e.response, "status_code", "?")
        raise OfflineError(f"Uploading to {repo_id} failed (HTTP {code}: "
                           f"{fetch.redact(str(e).splitlines()[0])}). Check that the token has "
                           "write access to that name, then run this again.") from None
    log.info("Uploaded %s to %s (%s)", p.model_dir.name, url, "private" if private
             else "public")
    return str(url)
