"""The contact sheet: the whole dataset at a glance.

One tile per image: the original's thumbnail with its crop box (red) and Kosmos-2's
entity boxes (green, labelled with their phrase), and the caption under it.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from fastsd import drive
from fastsd.errors import DataError

SHEET = "contact_sheet.png"
CROP_COLOUR = (220, 30, 30)
ENTITY_COLOUR = (20, 170, 60)


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size)


def tile(original: Path, caption: str | None, crop_box, entities: list[dict], thumb: int):
    from PIL import Image, ImageDraw

    with Image.open(original) as im:
        im = im.convert("RGB")
        scale = thumb / max(im.size)
        small = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
    draw = ImageDraw.Draw(small)
    font = _font(max(10, thumb // 16))
    for ent in entities:
        for box in ent.get("boxes", []):
            b = [round(v * scale) for v in box]
            draw.rectangle(b, outline=ENTITY_COLOUR, width=2)
            draw.text((b[0] + 3, b[1] + 2), ent.get("phrase", ""), fill=ENTITY_COLOUR, font=font)
    if crop_box:
        draw.rectangle([round(v * scale) for v in crop_box], outline=CROP_COLOUR, width=2)
    lines = textwrap.wrap(caption or "(no caption)", width=max(12, thumb // 7))[:4]
    line_h = max(12, thumb // 14)
    out = Image.new("RGB", (thumb, thumb + 8 + line_h * (len(lines) + 1)), "white")
    out.paste(small, ((thumb - small.width) // 2, (thumb - small.height) // 2))
    text = ImageDraw.Draw(out)
    text.text((4, thumb + 4), original.stem, fill=(0, 0, 0), font=_font(line_h - 2))
    for i, line in enumerate(lines, 1):
        text.text((4, thumb + 4 + i * line_h), line, fill=(60, 60, 60), font=_font(line_h - 3))
    return out


def contact_sheet(session, thumb: int = 192, columns: int | None = None):
    """Build the sheet, save it to outputs/contact_sheet.png and return it (a PIL image)."""
    from PIL import Image

    from fastsd.dataset import captions, crop, images

    originals = images.originals(session)
    record_path = session.instance_images / crop.CROPS
    crops = drive.read_json(record_path) if record_path.is_file() else {}
    tiles = []
    for p in originals:
        entities = (captions.read_record(session, p.stem) or {}).get("entities", [])
        tiles.append(tile(p, captions.read(session, p.stem), crops.get(p.stem, {}).get("box"),
                          entities, thumb))
    if not tiles:
        raise DataError("The session has no images yet: import some first.")
    columns = columns or min(len(tiles), 5)
    rows = -(-len(tiles) // columns)
    cell_h = max(t.height for t in tiles)
    pad = 6
    sheet = Image.new("RGB", (columns * (thumb + pad) + pad, rows * (cell_h + pad) + pad),
                      (235, 235, 235))
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet.paste(t, (pad + c * (thumb + pad), pad + r * (cell_h + pad)))
    with drive.atomic_writer(session.outputs / SHEET) as f:
        sheet.save(f, format="PNG")
    return sheet
