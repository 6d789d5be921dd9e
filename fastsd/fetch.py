"""The one downloader: Hugging Face repos and files, Google Drive links, HTTP(S) URLs.

Every download here:

* fails within seconds when the machine is offline (a TCP check with a short timeout
  before any client library starts its own long retries), naming what could not be
  fetched and what to do;
* shows a ``tqdm`` progress bar;
* writes into a ``.part`` file and renames it only when it is whole (its size matches what
  the server announced), so a partial download is never taken for a whole one; an
  interrupted HTTP download resumes from its ``.part`` with a Range request;
* checks the size it is about to write against the free space of the destination first
  (:func:`fastsd.drive.require_space`);
* sends the Hugging Face token (:func:`hf_token`: ``$HF_TOKEN``, Colab's secrets, the
  workspace's ``hf_token`` file or fast-stable-diffusion's ``token.txt`` beside it) in a
  header only, and scrubs it (:func:`redact`) from every log line and error message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlparse

from fastsd import drive, env
from fastsd.errors import DataError, DriveError, FastSDError, OfflineError
from fastsd.workspace import Workspace

log = logging.getLogger("fastsd")

CONNECT_TIMEOUT = 5.0  # seconds to reach a host before it counts as offline
READ_TIMEOUT = 60.0  # seconds without a byte before a download is abandoned
PART = ".part"
_DRIVE_ID = re.compile(r"^[A-Za-z0-9_-]{10,}$")
TOKEN_FILE = "hf_token"  # in the workspace folder: one line, the Hugging Face token
LEGACY_TOKEN_FILE = "token.txt"  # fast-stable-diffusion's, in the same Fast-Dreambooth folder
TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


# --------------------------------------------------------------------------- secrets

_SECRETS: set[str] = set()


def redact(text: str) -> str:
    """``text`` with every secret fastsd has read replaced by ``***``."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


class _Redactor(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _SECRETS:
            record.msg = redact(record.getMessage())
            record.args = None
        return True


log.addFilter(_Redactor())


def remember_secret(secret: str) -> str:
    """Note ``secret`` so that :func:`redact` and the "fastsd" log hide it; returns it."""
    if secret and len(secret) >= 6:
        _SECRETS.add(secret)
    return secret


def hf_token(ws: Workspace | Path | None = None) -> str | None:
    """The Hugging Face token: ``$HF_TOKEN``, else Colab's secret ``HF_TOKEN``, else the
    workspace's ``hf_token`` file, else the ``token.txt`` fast-stable-diffusion kept in the
    same folder (``Fast-Dreambooth/``); None when there is none (public models need none).
    The one place fastsd reads it; it is never printed (:func:`remember_secret`)."""
    for name in TOKEN_ENV:
        if os.environ.get(name, "").strip():
            return remember_secret(os.environ[name].strip())
    if env.runtime() == "colab":
        try:
            from google.colab import userdata  # type: ignore[import-not-found]

            value = (userdata.get("HF_TOKEN") or "").strip()
        except Exception as e:  # noqa: BLE001 - secret missing or notebook access not granted
            log.debug("No HF_TOKEN in Colab's secrets (%s)", type(e).__name__)
            value = ""
        if value:
            return remember_secret(value)
    if ws is not None or os.environ.get("FASTSD_HOME"):
        root = Workspace.current(ws, mount=False).root
        for file in (root / TOKEN_FILE, root / LEGACY_TOKEN_FILE):
            value = file.read_text(encoding="utf-8").strip() if file.is_file() else ""
            if value:
                return remember_secret(value)
    return None


# --------------------------------------------------------------------------- offline


def hf_offline() -> bool:
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
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    return env.reachable(url.hostname or "", url.port or (443 if url.scheme == "https" else 80),
                         timeout)


def use_cache_only() -> bool:
    return hf_offline() or not hub_reachable()


def offline_error(name: str, cache: Path, what: str = "model") -> OfflineError:
    return OfflineError(
        f"The {what} {name!r} is not in the model cache ({cache}) and this machine is "
        "offline (or cannot reach the Hugging Face Hub), so it cannot be downloaded. Connect "
        "to the internet (and unset HF_HUB_OFFLINE) and run this once: the model is then kept "
        "on Drive for later runtimes.")


def check_online(host: str, what: str) -> None:
    """Raise an OfflineError at once when ``host`` cannot be reached."""
    if not env.reachable(host, 443, CONNECT_TIMEOUT):
        raise OfflineError(f"Cannot reach {host}, so {what} cannot be downloaded. Check the "
                           "runtime's internet connection, or download the files yourself "
                           "and give their local path (or upload them).")


# --------------------------------------------------------------------------- Hugging Face


def hf_snapshot(repo_id: str, cache: Path, allow: list[str] | None = None,
                ignore: list[str] | None = None, what: str = "model",
                revision: str | None = None) -> Path:
    """A local folder with (the allowed files of) the Hub repo ``repo_id``, kept in ``cache``.

    Offline, or with the Hub unreachable, only the cache is used; without a cached copy an
    OfflineError says so at once.
    """
    from huggingface_hub import snapshot_download

    with _hub_errors(repo_id, cache, what):
        offline = use_cache_only()
        return Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=allow,
                                      ignore_patterns=ignore, revision=revision,
                                      local_files_only=offline,
                                      token=None if offline else hf_token()))


@contextlib.contextmanager
def _hub_errors(name: str, cache: Path, what: str) -> Iterator[None]:
    """The Hub's client writing into ``cache`` (on Drive): a file missing offline, the
    network failing or Drive dropping mid-write each end in one message."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        yield
    except LocalEntryNotFoundError:
        raise offline_error(name, cache, what) from None
    except (*network_errors(), OSError) as e:
        if isinstance(e, FastSDError):
            raise
        raise OfflineError(f"Downloading {what} ({name}) failed ({redact(str(e))[:300]}). "
                           "Check the connection and that Drive is mounted (run the Drive "
                           "cell again), then run this again to resume.") from None


def network_errors() -> tuple[type[BaseException], ...]:
    """The connection errors of the HTTP clients huggingface_hub and gdown use."""
    out: list[type[BaseException]] = []
    for module, name in (("requests", "RequestException"), ("httpx2", "HTTPError"),
                         ("httpx", "HTTPError")):
        try:
            out.append(getattr(__import__(module), name))
        except ImportError:
            continue
    return tuple(out)


def hf_download(repo_id: str, dest: Path, allow: list[str], revision: str | None = None,
                what: str = "model", token: str | None = None) -> tuple[dict[str, int], str]:
    """Download the files of the Hub repo ``repo_id`` that match ``allow`` into the plain
    folder ``dest`` (no cache symlinks, which Drive lacks); returns ({file: size}, the
    commit they come from).

    The total size is checked against the free space of ``dest`` before anything is
    fetched; an interrupted download resumes from what ``dest`` already holds; a file is
    counted only once its size is the Hub's. Offline it fails at once, naming ``what``.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    if use_cache_only():
        raise offline_error(what, dest, "model")
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True,
                                  token=token or False)
        sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
        wanted = {f: sizes[f] for f in filter_repo_objects(sizes, allow_patterns=allow)}
        if not wanted:
            raise DataError(f"{repo_id} has no files matching {allow}: the registry entry of "
                            f"{what} is out of date. Report it, or give another model.")
        have = sum(min((dest / f).stat().st_size, n) for f, n in wanted.items()
                   if (dest / f).is_file())
        drive.require_space(dest, sum(wanted.values()) - have, f"Downloading {what}")
        snapshot_download(repo_id, revision=info.sha or revision, allow_patterns=list(wanted),
                          local_dir=dest, token=token or False)
    except LocalEntryNotFoundError as e:  # the Hub answered the listing, then a file failed
        raise OfflineError(f"Downloading {what} ({repo_id}) stopped: "
                           f"{redact(str(e).splitlines()[0])[:300]}. Check the connection and "
                           "run this again to resume where it stopped.") from None
    except HfHubHTTPError as e:
        code = getattr(e.response, "status_code", "?")
        raise OfflineError(f"Downloading {what} ({repo_id}) from the Hugging Face Hub failed "
                           f"(HTTP {code}: {redact(str(e).splitlines()[0])}). For a gated or "
                           "private model accept its licence on its Hub page and set HF_TOKEN; "
                           "else run this again to resume.") from None
    except (*network_errors(), OSError) as e:
        if isinstance(e, FastSDError):
            raise
        raise OfflineError(f"Downloading {what} ({repo_id}) failed ({redact(str(e))[:300]}). "
                           "Run this again to resume where it stopped.") from None
    short = [f for f, n in wanted.items()
             if not (dest / f).is_file() or (dest / f).stat().st_size != n]
    if short:
        raise OfflineError(f"Downloading {what} stopped before {short[0]} was whole. Run this "
                           "again to resume.")
    return wanted, info.sha or revision or ""


def hf_file(repo_id: str, filename: str, cache: Path, revision: str | None = None,
            what: str = "model file") -> Path:
    """One file of a Hub repo, kept in ``cache``."""
    from huggingface_hub import hf_hub_download

    with _hub_errors(f"{repo_id}/{filename}", cache, what):
        offline = use_cache_only()
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache,
                                    local_files_only=offline,
                                    token=None if offline else hf_token()))


def parse_hf_url(url: str) -> tuple[str, str, str] | None:
    """(repo id, revision, file path) of a Hub file URL (``/resolve/`` or ``/blob/``)."""
    parsed = urlparse(url)
    if (parsed.hostname or "").lower() not in ("huggingface.co", "hf.co"):
        return None
    parts = parsed.path.strip("/").split("/")
    if len(parts) < 5 or parts[2] not in ("resolve", "blob"):
        return None
    return f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])


# --------------------------------------------------------------------------- Google Drive


def is_drive_link(link: str) -> bool:
    host = (urlparse(str(link).strip()).hostname or "").lower()
    return host.endswith(("drive.google.com", "docs.google.com"))


def parse_drive_link(link: str) -> tuple[str, str]:
    """("file" or "folder", id) of a Google Drive share link."""
    link = link.strip()
    for pattern, kind in ((r"/folders/([A-Za-z0-9_-]+)", "folder"),
                          (r"/file/d/([A-Za-z0-9_-]+)", "file"),
                          (r"[?&]id=([A-Za-z0-9_-]+)", "file")):
        m = re.search(pattern, link)
        if m:
            return kind, m.group(1)
    if _DRIVE_ID.match(link):
        return "file", link
    raise DataError(f"{link!r} is not a Google Drive share link. Use the link from Drive's "
                    "'Share' > 'Copy link' (a file or a folder), shared with 'Anyone with "
                    "the link'.")


def drive_link(link: str, dest: Path) -> Path:
    """Download a shared Drive file or folder into the folder ``dest`` with gdown."""
    kind, file_id = parse_drive_link(link)
    check_online("drive.google.com", "the shared link")
    import gdown
    from gdown.exceptions import DownloadError
    from requests import RequestException

    drive.make_folder(dest)
    try:
        if kind == "folder":
            got = gdown.download_folder(id=file_id, output=str(dest), quiet=False,
                                        timeout=READ_TIMEOUT, retries=2)
        else:
            got = gdown.download(id=file_id, output=str(dest) + "/", quiet=False,
                                 timeout=READ_TIMEOUT, retries=2, resume=True)
    except DownloadError as e:
        raise DataError(f"Downloading {link} from Google Drive failed: {e}. Check that it is "
                        "shared with 'Anyone with the link' and run the cell again, or "
                        "download the files yourself and give their local path.") from e
    except RequestException as e:
        raise OfflineError(f"Downloading {link} failed ({e}). Check the connection and run "
                           "the cell again, or download the files yourself and give "
                           "their local path (or upload them).") from e
    except OSError as e:  # writing into dest: Drive dropped or is full
        raise DriveError(f"Downloading {link} into {dest} failed: {e}. Check that Google Drive "
                         "is mounted and has room (run the Drive cell again), then run this "
                         "cell again.") from e
    if not got:
        raise DataError(f"Google Drive gave nothing for {link}. Make sure it is shared with "
                        "'Anyone with the link', then run the cell again.")
    return dest


# --------------------------------------------------------------------------- HTTP(S)


def http_file(url: str, dest: Path, headers: dict[str, str] | None = None) -> Path:
    """Download ``url`` to the file ``dest`` (kept if already whole), resuming a ``.part``.

    ``headers`` (an Authorization header, say) are sent but never logged or shown.
    """
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    host = urlparse(url).hostname or ""
    if not env.reachable(host, urlparse(url).port or (443 if url.startswith("https") else 80),
                         CONNECT_TIMEOUT):
        raise OfflineError(f"Cannot reach {host}, so {shown(url)} cannot be downloaded. Check "
                           "the link and the internet connection, or download the file "
                           "yourself and give its path.")
    part = dest.with_name(dest.name + PART)
    drive.make_folder(dest.parent)
    # A drop of Drive mid-download is retried (Drive remounted on Colab), resuming from the
    # .part; the network's errors end the download with a message.
    drive.retry(lambda: _http_to_part(url, part, dest.name, headers),
                f"Downloading {dest.name}", where=dest.parent)
    drive.rename(part, dest)
    return dest


def _http_to_part(url: str, part: Path, name: str, headers: dict[str, str] | None) -> None:
    """Append the rest of ``url`` to ``part`` (from its size, with a Range request), which
    stays on Drive so that a later runtime resumes it; errors of the network and the server
    end as OfflineError or DataError."""
    import urllib.error
    import urllib.request

    from tqdm.auto import tqdm

    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={**(headers or {}),
                                                   **({"Range": f"bytes={have}-"} if have else {})})
    try:
        with urllib.request.urlopen(request, timeout=READ_TIMEOUT) as r:
            if have and r.status != 206:  # the server ignored the Range: start again
                have = 0
            length = r.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            if length is not None:
                drive.require_space(part.parent, int(length), f"Downloading {name}")
            with open(part, "ab" if have else "wb") as f, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True,
                    desc=name) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = redact(str(getattr(e, "reason", e)))
        if isinstance(e, urllib.error.HTTPError) and e.code in (401, 403, 404):
            raise DataError(f"Downloading {shown(url)} failed ({e.code} {reason}): the file "
                            "is missing or needs a token. Check the link (and for a gated or "
                            "private file, set HF_TOKEN or CIVITAI_TOKEN).") from None
        raise OfflineError(f"Downloading {shown(url)} failed ({reason}). Run it again to "
                           "resume, check the link, or download the file yourself and give "
                           "its path.") from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise OfflineError(f"Downloading {shown(url)} stopped at {size} of {total} bytes. Run "
                           "it again to resume.")


def shown(url: str) -> str:
    """``url`` without its query string, which may hold a token."""
    p = urlparse(url)
    return f"{p.scheme}://{p.netloc}{p.path}"


def file_name(url: str, default: str = "model.safetensors") -> str:
    return unquote(Path(urlparse(url).path).name) or default


# --------------------------------------------------------------------------- any link


def is_link(src: str) -> bool:
    return str(src).startswith(("http://", "https://"))


def link_file(url: str, dest_dir: Path, hub_cache: Path) -> Path:
    """Download the one model file behind a link (Drive, Hugging Face or plain HTTP(S)).

    Drive links go through gdown, Hugging Face file links through the Hub's cache, other
    links are streamed into ``dest_dir`` (resumable, whole or not at all).
    """
    if is_drive_link(url):
        got = drive_link(url, dest_dir / parse_drive_link(url)[1])
        files = sorted(p for p in got.rglob("*") if p.is_file() and not p.name.endswith(PART))
        if len(files) != 1:
            raise DataError(f"The Drive link {url} holds {len(files)} files; give a link to "
                            "one .safetensors or .ckpt file.")
        return files[0]
    hf = parse_hf_url(url)
    if hf:
        repo, revision, filename = hf
        return hf_file(repo, filename, hub_cache, revision)
    headers = {}
    if (urlparse(url).hostname or "").endswith("civitai.com") and \
            os.environ.get("CIVITAI_TOKEN", "").strip():
        token = remember_secret(os.environ["CIVITAI_TOKEN"].strip())
        headers["Authorization"] = f"Bearer {token}"
    return http_file(url, dest_dir / file_name(url), headers)
