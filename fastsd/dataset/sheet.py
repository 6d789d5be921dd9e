"""The contact sheet: the whole dataset at a glance.

One tile per image: the original's thumbnail with its crop box (red) and Kosmos-2's
entity boxes (green, labelled with their phrase), its name, the set check's warnings
(orange) and the caption under it; the set-wide warnings head the sheet.

Text is drawn in DejaVu Sans (shipped inside matplotlib), which covers Latin, Greek,
Cyrillic, Arabic, Hebrew and more; a character it has no glyph for (CJK, for example) is
written as its code point, ``[U+732B]``, never as an empty box.
"""

from __future__ import annotations

import functools
import importlib.util
import textwrap
import unicodedata
from pathlib import Path

from fastsd import drive
from fastsd.errors import DataError

SHEET = "contact_sheet.png"
CROP_COLOUR = (220, 30, 30)
ENTITY_COLOUR = (20, 170, 60)
WARN_COLOUR = (230, 120, 0)


@functools.lru_cache(maxsize=1)
def font_path() -> Path:
    """DejaVu Sans from matplotlib's mpl-data (found without importing matplotlib)."""
    spec = importlib.util.find_spec("matplotlib")
    path = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    if not path.is_file():
        raise DataError(f"DejaVu Sans is missing from matplotlib ({path}). Reinstall it: "
                        "pip install --force-reinstall matplotlib.")
    return path


@functools.lru_cache(maxsize=1)
def covered() -> frozenset[int]:
    """The code points DejaVu Sans has a glyph for."""
    from fontTools.ttLib import TTFont

    with TTFont(font_path(), lazy=True) as f:
        return frozenset(f.getBestCmap())


def readable(text: str) -> str:
    """``text`` as DejaVu Sans can draw it: composed (NFC, as macOS names are not), and each
    character without a glyph, or a control character, written as [U+XXXX]."""
    have = covered()
    out = []
    for c in unicodedata.normalize("NFC", text):
        if ord(c) in have and unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co", "Cn"):
            out.append(c)
        else:
            out.append(f"[U+{ord(c):04X}]")
    return "".join(out)


@functools.lru_cache(maxsize=16)
def font(size: int):
    """DejaVu Sans at this size."""
    from PIL import ImageFont

    return ImageFont.truetype(str(font_path()), size)


def draw_text(draw, xy, text: str, fill, size: int) -> None:
    """Draw ``text`` readably (see readable) in DejaVu Sans."""
    draw.text(xy, readable(text), fill=fill, font=font(size))


def tile(original: Path, caption: str | None, crop_box, entities: list[dict], thumb: int,
         warnings: list[str] = (), size=None):
    """One tile; ``original`` may be its preview, with ``size`` the original's (w, h), in
    whose pixels the boxes are."""
    from PIL import Image, ImageDraw

    with Image.open(original) as im:
        im = im.convert("RGB")
        w, h = size or im.size
        scale = thumb / max(w, h)
        small = im.resize((max(1, round(w * scale)), max(1, round(h * scale))))
    draw = ImageDraw.Draw(small)
    for ent in entities:
        for box in ent.get("boxes", []):
            b = [round(v * scale) for v in box]
            draw.rectangle(b, outline=ENTITY_COLOUR, width=2)
            draw_text(draw, (b[0] + 3, b[1] + 2), ent.get("phrase", ""), ENTITY_COLOUR,
                      max(10, thumb // 16))
    if crop_box:
        draw.rectangle([round(v * scale) for v in crop_box], outline=CROP_COLOUR, width=2)
    lines = textwrap.wrap(caption or "(no caption)", width=max(12, thumb // 7))[:4]
    line_h = max(12, thumb // 14)
    warned = 1 if warnings else 0
    out = Image.new("RGB", (thumb, thumb + 8 + line_h * (len(lines) + 1 + warned)), "white")
    out.paste(small, ((thumb - small.width) // 2, (thumb - small.height) // 2))
    text = ImageDraw.Draw(out)
    draw_text(text, (4, thumb + 4), original.stem, (0, 0, 0), line_h - 2)
    if warnings:
        draw_text(text, (4, thumb + 4 + line_h), "\u26a0 " + ", ".join(warnings), WARN_COLOUR,
                  line_h - 3)
        text.rectangle([0, 0, thumb - 1, out.height - 1], outline=WARN_COLOUR, width=3)
    for i, line in enumerate(lines, 1 + warned):
        draw_text(text, (4, thumb + 4 + i * line_h), line, (60, 60, 60), line_h - 3)
    return out


def contact_sheet(session, thumb: int = 192, columns: int | None = None, report=None):
    """Build the sheet, save it to outputs/contact_sheet.png and return it (a PIL image).

    ``report``: the set check to show (fastsd.dataset.check); None runs it now.
    """
    from PIL import Image, ImageDraw

    from fastsd.dataset import captions, check, crop
    from fastsd.dataset.originals import originals, preview

    found = originals(session)
    if not found:
        raise DataError("The session has no images yet: import some first.")
    report = report if report is not None else check.check_session(session)
    sizes = {stem: m["size"] for stem, m in check.measures(session, found).items()}
    record_path = session.instance_images / crop.CROPS
    crops = drive.read_json(record_path) if record_path.is_file() else {}
    tiles = []
    for p in found:
        entities = (captions.read_record(session, p.stem) or {}).get("entities", [])
        tiles.append(tile(preview(session, p), captions.read(session, p.stem),
                          crops.get(p.stem, {}).get("box"), entities, thumb,
                          [f.check for f in report.for_image(p.stem) if f.check != "too_few"],
                          sizes[p.stem]))
    columns = columns or min(len(tiles), 5)
    rows = -(-len(tiles) // columns)
    cell_h = max(t.height for t in tiles)
    pad = 6
    width = columns * (thumb + pad) + pad
    line_h = max(14, thumb // 12)
    notes = [report.summary()] + [
        f"\u26a0 {f.check}: {line}" for f in report.findings
        for line in textwrap.wrap(f.message, width=max(40, width // (line_h // 2)))[:1]]
    head = pad + line_h * len(notes)
    sheet = Image.new("RGB", (width, head + rows * (cell_h + pad) + pad), (235, 235, 235))
    draw = ImageDraw.Draw(sheet)
    for i, note in enumerate(notes):
        draw_text(draw, (pad, pad + i * line_h), note, WARN_COLOUR if i else (0, 0, 0),
                  line_h - 3)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet.paste(t, (pad + c * (thumb + pad), head + r * (cell_h + pad)))
    with drive.atomic_writer(session.outputs / SHEET) as f:
        sheet.save(f, format="PNG")
    return sheet
