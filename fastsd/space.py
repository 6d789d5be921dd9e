"""Free Drive space: what fastsd keeps in the workspace, how big each piece is, and the
deletion of the pieces the user picks, only once confirmed.

:func:`usage` lists, largest first, each session's checkpoints, trained models, LoRAs
and outputs, and the workspace's downloaded and converted models, the Hugging Face cache,
the wheelhouses and the tools. :func:`free` deletes the items picked by their number in
that list (or their path), and only with ``confirm=True``; without it, it says what would
go and how much room that makes.

Google Drive keeps deleted files in its trash, where they still count against the quota
until the trash is emptied; both messages say so.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from fastsd import drive, options, session as sessions
from fastsd.errors import ConfirmationNeeded, DataError
from fastsd.workspace import Workspace

log = logging.getLogger("fastsd")

TRASH_NOTE = ("Google Drive keeps deleted files in its trash, where they still count "
              "against your quota until you empty it: https://drive.google.com/drive/trash")


@dataclass(frozen=True)
class Item:
    """One thing that can be deleted: a checkpoint, a model, a cache entry..."""

    path: Path
    kind: str
    size: int  # bytes
    session: str | None = None

    @property
    def where(self) -> str:
        return f"session {self.session}" if self.session else "workspace"


def size_of(path: Path) -> int:
    """Bytes of the files under ``path`` (links are not followed nor counted, so the
    Hugging Face cache's snapshot links do not count its blobs twice)."""
    if path.is_symlink():
        return 0
    if path.is_file():
        return path.stat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for f in files:
            p = os.path.join(folder, f)
            if not os.path.islink(p):
                total += os.stat(p).st_size
    return total


def _children(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    # fastsd's temporaries are mid-write; hidden names are caches' locks, partial downloads.
    return sorted(p for p in folder.iterdir()
                  if not drive.is_temporary(p) and not p.name.startswith("."))


def _entries(ws: Workspace) -> Iterable[tuple[Path, str, str | None]]:
    for name in sessions.list_sessions(ws):
        s = sessions.load(name, ws)
        for p in _children(s.checkpoints):
            yield p, "checkpoint", name
        for p in _children(s.models):
            if p == s.loras:  # each trained LoRA is an item of its own
                for f in _children(p):
                    yield f, "LoRA", name
                continue
            yield p, "trained model" if p.is_dir() else "single file", name
        if s.outputs.is_dir() and any(s.outputs.iterdir()):
            yield s.outputs, "outputs (samples, images)", name
    special = {ws.hub_cache: "Hugging Face cache", ws.downloads: "download",
               ws.converted: "converted model"}
    for folder, kind in special.items():
        for p in _children(folder):
            yield p, kind, None
    for p in _children(ws.models):
        if p not in special:
            yield p, "model", None
    for p in _children(ws.wheels):
        yield p, "wheelhouse", None
    for p in _children(ws.tools):
        yield p, "tool", None


def session_space(s: sessions.Session) -> dict:
    """What one session keeps on Drive, in bytes: its checkpoints (each), trained models,
    LoRAs (each) and outputs; `fastsd session show` prints it."""
    return {"checkpoints": {p.name: size_of(p) for p in _children(s.checkpoints)},
            "models": sum(size_of(p) for p in _children(s.models) if p != s.loras),
            "loras": {p.name: size_of(p) for p in _children(s.loras)},
            "outputs": size_of(s.outputs) if s.outputs.is_dir() else 0}


def usage(root: Workspace | Path | None = None) -> list[Item]:
    """Everything deletable in the workspace, largest first."""
    ws = Workspace.current(root)
    items = [Item(p, kind, size_of(p), name) for p, kind, name in _entries(ws)]
    return sorted(items, key=lambda i: (-i.size, str(i.path)))


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def table(items: list[Item], root: Workspace | Path | None = None) -> str:
    """The numbered list a user picks from."""
    if not items:
        return "Nothing to free: the workspace holds no checkpoints, models or caches."
    base = Workspace.current(root).root if root is not None else None
    lines = []
    for n, i in enumerate(items, 1):
        shown = i.path.relative_to(base) if base and i.path.is_relative_to(base) else i.path
        lines.append(f"{n:>3}. {human(i.size):>9}  {i.kind:<26} {i.where:<20} {shown}")
    lines.append(f"     {human(sum(i.size for i in items)):>9}  in all")
    return "\n".join(lines)


def _pick(items: list[Item], picks: Iterable[int | str | os.PathLike[str]]) -> list[Item]:
    by_path = {i.path.resolve(): i for i in items}
    chosen: list[Item] = []
    for pick in picks:
        if isinstance(pick, int) or (isinstance(pick, str) and pick.strip().isdigit()):
            n = int(pick)
            if not 1 <= n <= len(items):
                raise DataError(f"There is no item {n}: pick numbers from 1 to {len(items)} "
                                "in the list above.")
            item = items[n - 1]
        else:
            item = by_path.get(Path(pick).expanduser().resolve())
            if item is None:
                raise DataError(f"{pick} is not in the list of what can be freed; only those "
                                "items (by number or path) are deleted.")
        if item not in chosen:
            chosen.append(item)
    return chosen


def parse_picks(text: str) -> list[str]:
    """ "1, 3 5" or "2-4" -> the numbers picked, as the notebook's form field gives them."""
    out: list[str] = []
    for part in text.replace(",", " ").split():
        if "-" in part and all(x.isdigit() for x in part.split("-", 1)):
            a, b = (int(x) for x in part.split("-", 1))
            out += [str(n) for n in range(a, b + 1)]
        else:
            out.append(part)
    return out


def free(picks: Iterable[int | str | os.PathLike[str]], root: Workspace | Path | None = None,
         confirm: bool = False) -> str:
    """Delete the picked items (numbers in :func:`usage`'s list, or their paths).

    Without ``confirm`` nothing is deleted: ConfirmationNeeded says what would be. Returns
    what was deleted and how much room that made.
    """
    items = usage(root)
    chosen = _pick(items, picks)
    if not chosen:
        raise DataError("Nothing picked: give the numbers of the items to delete.")
    listing = "\n".join(f"  {human(i.size):>9}  {i.kind}: {i.path}" for i in chosen)
    total = human(sum(i.size for i in chosen))
    if not confirm:
        numbers = ",".join(str(items.index(i) + 1) for i in chosen)
        raise ConfirmationNeeded(
            f"This would delete {len(chosen)} item(s), {total}:\n{listing}\nTo delete them: "
            f"{options.say(('delete', numbers), 'confirm_delete')}. {TRASH_NOTE}.")
    for i in chosen:
        drive.delete(i.path)  # retries after a Drive drop
        log.info("Deleted %s (%s)", i.path, human(i.size))
    return f"Deleted {len(chosen)} item(s), {total}:\n{listing}\n{TRASH_NOTE}."
