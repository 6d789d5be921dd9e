"""Import and validation: one test per kind of file a user brings, on files made here."""

import hashlib
import io
import re
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastsd import fetch
from fastsd import session as sessions
from fastsd.dataset import images
from fastsd.errors import DataError, OfflineError


@pytest.fixture
def s(workspace):
    return sessions.create("subject", workspace, class_word="cat", resolution=64)


def png_bytes(img, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def gradient(w=96, h=80, mode="RGB"):
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w)[None, :]
    a[..., 1] = np.linspace(0, 255, h)[:, None]
    a[..., 2] = 77
    return Image.fromarray(a).convert(mode)


def bomb_png(w=10_000, h=10_000) -> bytes:
    """A PNG whose header claims w x h (100 Mpx) but holds no pixel data at all."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# name -> (bytes maker, expected outcome, words expected in the reason)
def cases():
    jpeg = png_bytes(gradient(200, 150), format="JPEG", quality=90)
    pngb = png_bytes(gradient(200, 150))
    gif = io.BytesIO()
    frames = [Image.new("P", (90, 90), i) for i in (1, 2)]
    for f, colour in zip(frames, ((10, 200, 10), (200, 10, 10))):
        f.putpalette([0, 0, 0, 10, 200, 10, 200, 10, 10] + [0] * 759)
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    rgba = Image.new("RGBA", (80, 80), (0, 0, 255, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 40, 80))
    pal = Image.new("P", (80, 80), 0)
    pal.putpalette([9, 9, 9, 250, 0, 0] + [0] * 762)
    pal.paste(1, (40, 0, 80, 80))
    i16 = Image.fromarray(np.full((70, 70), 65535, np.uint16))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    rotated = png_bytes(gradient(120, 80), format="JPEG", exif=exif.tobytes(), quality=95)
    return {
        "zero.jpg": (b"", "skipped", "empty file"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "skipped", "truncated"),
        "truncated.png": (pngb[: len(pngb) // 2], "skipped", "truncated"),
        "notes.png": (b"this is a shopping list, not a picture\n" * 20, "skipped",
                      "not an image"),
        "tiny.png": (png_bytes(gradient(50, 200)), "skipped", "too small"),
        "bomb.png": (bomb_png(), "skipped", "decompression bomb"),
        "animated.gif": (gif.getvalue(), "imported", "first frame of 2"),
        "cmyk.jpg": (png_bytes(Image.new("CMYK", (90, 90), (0, 255, 255, 0)), format="JPEG"),
                     "imported", ""),
        "deep16.png": (png_bytes(i16), "imported", ""),
        "grey.png": (png_bytes(gradient(90, 90, "L")), "imported", ""),
        "alpha.png": (png_bytes(rgba), "imported", ""),
        "palette.png": (png_bytes(pal, transparency=0), "imported", ""),
        "rotated.jpg": (rotated, "imported", ""),
        "photo.webp": (png_bytes(gradient(100, 100), format="WEBP", lossless=True),
                       "imported", ""),
        "IMG_0042.png": (png_bytes(gradient(101, 99)), "imported", ""),
        "IMG_0042_copy.bmp": (png_bytes(gradient(101, 99), format="BMP"), "duplicate",
                              "same pixels as IMG_0042"),
    }


@pytest.fixture
def mixed_folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, (data, _, _) in cases().items():
        (folder / name).write_bytes(data)
    (folder / "IMG_0042.txt").write_text("a cat on a red sofa")
    (folder / "tiny.txt").write_text("goes with a skipped image")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return folder


EXTRA = {"IMG_0042.txt": ("imported", "caption of IMG_0042"),
         "tiny.txt": ("skipped", "its image was skipped"),
         ".DS_Store": ("skipped", "hidden file")}


def folder_digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_mixed_folder_one_row_per_file_each_as_stated(s, mixed_folder):
    before = folder_digest(mixed_folder)
    report = images.import_images(s, mixed_folder)
    expected = {name: (outcome, words) for name, (_, outcome, words) in cases().items()}
    expected.update(EXTRA)
    assert [r.file for r in report.rows] == sorted(p.name for p in mixed_folder.iterdir())
    for row in report.rows:
        outcome, words = expected[row.file]
        assert row.outcome == outcome, (row.file, row.reason)
        assert words in row.reason, (row.file, row.reason)
    assert len(report.skipped) == 8 and len(report.captions) == 1
    assert folder_digest(mixed_folder) == before, "the source is never modified"
    names = [p.name for p in images.originals(s)]
    assert "IMG_0042.png" in names and len(names) == len(report.imported)
    assert (s.captions / "IMG_0042.txt").read_text() == "a cat on a red sofa"
    assert images.last_report(s).to_dicts() == report.to_dicts()
    html = report._repr_html_()
    assert html.count("<tr>") == len(report.rows) + 1 and "decompression bomb" in html
    text = report.to_text()
    assert re.search(r"^IMG_0042\.png +imported +101x99 ", text, re.M)
    assert "\n9 imported, 1 duplicate, 8 skipped, 1 captions\nSet check: 9 images, " in text
    assert report.check is not None and text.endswith(report.check.to_text())
    assert report.check.summary() in html, "the set check is part of the report"


def original(s, stem):
    with Image.open(s.instance_images / "originals" / f"{stem}.png") as im:
        assert im.mode == "RGB"
        return np.asarray(im)


def test_conversions_give_8bit_rgb(s, mixed_folder):
    images.import_images(s, mixed_folder)
    gif = original(s, "animated")
    assert tuple(gif[0, 0]) == (10, 200, 10), "the first frame, not the second"
    assert tuple(original(s, "deep16")[5, 5]) == (255, 255, 255), "16-bit white stays white"
    cmyk = original(s, "cmyk")[5, 5]
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60, "cyan-free magenta+yellow is red"
    grey = original(s, "grey")
    assert np.array_equal(grey[..., 0], grey[..., 1])
    alpha = original(s, "alpha")
    assert tuple(alpha[10, 10]) == (0, 0, 255) and tuple(alpha[10, 70]) == (255, 255, 255)
    pal = original(s, "palette")
    assert tuple(pal[10, 10]) == (255, 255, 255) and tuple(pal[10, 70]) == (250, 0, 0)


def test_exif_orientation_is_applied(s, mixed_folder):
    images.import_images(s, mixed_folder)
    rotated = original(s, "rotated")
    assert rotated.shape[:2] == (120, 80), "a 120x80 photo shot rotated stands 80 wide"
    # Orientation 6: the stored top-left corner (dark red channel) ends top-right.
    assert rotated[2, -3, 0] < 40 and rotated[2, 2, 0] < 40 and rotated[-3, 2, 0] > 200


def test_heic_with_and_without_pillow_heif(s, tmp_path, monkeypatch):
    import pillow_heif  # a hard requirement (requirements-colab.txt): never skipped

    pillow_heif.register_heif_opener()
    heic = tmp_path / "phone.heic"
    heic.write_bytes(png_bytes(gradient(90, 90), format="HEIF"))
    assert images.import_images(s, heic).rows[0].outcome == "imported"
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # as if it were not installed
    other = tmp_path / "other.heic"
    other.write_bytes(png_bytes(gradient(91, 90), format="HEIF"))
    row = images.import_images(s, other).rows[0]
    assert row.outcome == "skipped" and "pillow-heif" in row.reason


def test_importing_twice_adds_nothing(s, mixed_folder):
    first = images.import_images(s, mixed_folder)
    files = sorted(p.name for p in images.originals(s))
    second = images.import_images(s, mixed_folder)
    assert sorted(p.name for p in images.originals(s)) == files
    assert second.imported == []
    assert len(second.by("duplicate")) == len(first.imported) + len(first.by("duplicate"))


def test_deleted_original_can_be_imported_again(s, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "dog.png").write_bytes(png_bytes(gradient(90, 90)))
    images.import_images(s, src)
    (s.instance_images / "originals" / "dog.png").unlink()
    row = images.import_images(s, src).rows[0]
    assert row.outcome == "imported" and row.name == "dog"


def test_caption_of_a_duplicate_goes_to_the_image_already_there(s, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "dog.png").write_bytes(png_bytes(gradient(90, 90)))
    (b / "same dog.png").write_bytes(png_bytes(gradient(90, 90)))
    (b / "same dog.txt").write_text("a dog")
    (b / "lonely.txt").write_text("no picture")
    images.import_images(s, a)
    rows = {r.file: r for r in images.import_images(s, b).rows}
    assert rows["same dog.png"].outcome == "duplicate"
    assert rows["same dog.txt"].outcome == "imported" and rows["same dog.txt"].name == "dog"
    assert (s.captions / "dog.txt").read_text() == "a dog"
    assert rows["lonely.txt"].outcome == "skipped" and "no image named" in rows[
        "lonely.txt"].reason
    again = {r.file: r for r in images.import_images(s, b).rows}
    assert again["same dog.txt"].outcome == "skipped" and "kept" in again["same dog.txt"].reason


def test_same_name_different_pixels_gets_a_free_name(s, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "dog.png").write_bytes(png_bytes(gradient(90, 90)))
    (b / "dog.png").write_bytes(png_bytes(gradient(91, 90)))
    images.import_images(s, a)
    row = images.import_images(s, b).rows[0]
    assert row.outcome == "imported" and row.name == "dog_2" and "saved as dog_2" in row.reason


def test_zip_import_with_captions_and_an_unsafe_member(s, tmp_path):
    z = tmp_path / "photos.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("set/cat 01.png", png_bytes(gradient(90, 90)))
        zf.writestr("set/cat 01.txt", "a tabby cat")
        zf.writestr("__MACOSX/set/._cat 01.png", b"junk")
        zf.writestr("../escape.png", png_bytes(gradient(92, 90)))
    report = images.import_images(s, z)
    assert [(r.file, r.outcome) for r in report.rows] == [
        ("../escape.png", "skipped"), ("set/cat 01.png", "imported"),
        ("set/cat 01.txt", "imported")]
    assert "unsafe path" in report.rows[0].reason
    assert (s.captions / "cat 01.txt").read_text() == "a tabby cat"
    assert not (tmp_path / "escape.png").exists()
    assert not list(s.path.parent.parent.rglob("escape.png"))


def test_zip_bomb_is_refused_before_extracting(s, tmp_path):
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.png", png_bytes(gradient(90, 90)))
        zf.writestr("b.png", b"\0" * (40 << 20))  # 40 MiB of zeros, about 40 KiB zipped
    assert z.stat().st_size < 200_000
    with pytest.raises(DataError, match="zip bomb"):
        images.import_images(s, z)
    assert images.originals(s) == [], "nothing is extracted from a bomb"


def test_zip_over_the_total_limit_is_refused(s, tmp_path, monkeypatch):
    z = tmp_path / "big.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for i in range(3):
            zf.writestr(f"{i}.png", png_bytes(gradient(90 + i, 90)))
    monkeypatch.setattr(images, "MAX_ZIP_BYTES", 2 * len(png_bytes(gradient(90, 90))))
    with pytest.raises(DataError, match="would unpack to"):
        images.import_images(s, z)


def test_not_a_zip_and_missing_paths_say_what_to_do(s, tmp_path):
    bad = tmp_path / "broken.zip"
    bad.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(DataError, match="not a readable zip"):
        images.import_images(s, bad)
    with pytest.raises(DataError, match="does not exist"):
        images.import_images(s, tmp_path / "nowhere")
    with pytest.raises(DataError, match="not a Google Drive link"):
        images.import_images(s, "https://example.com/photos.zip")


@pytest.mark.parametrize("link, kind, ident", [
    ("https://drive.google.com/file/d/1AbCdEfGhIjKlMnOp_q-R/view?usp=sharing", "file",
     "1AbCdEfGhIjKlMnOp_q-R"),
    ("https://drive.google.com/open?id=1AbCdEfGhIjKlMnOp", "file", "1AbCdEfGhIjKlMnOp"),
    ("https://drive.google.com/uc?export=download&id=1AbCdEfGhIjKlMnOp", "file",
     "1AbCdEfGhIjKlMnOp"),
    ("https://drive.google.com/drive/folders/1ZyXwVuTsRqPo?usp=share_link", "folder",
     "1ZyXwVuTsRqPo"),
    ("https://drive.google.com/drive/u/0/folders/1ZyXwVuTsRqPo", "folder", "1ZyXwVuTsRqPo"),
])
def test_drive_link_forms(link, kind, ident):
    assert fetch.parse_drive_link(link) == (kind, ident)


@pytest.mark.timeout(60)
def test_drive_link_offline_fails_fast(s):
    with pytest.raises(DataError, match="not a Google Drive share link"):
        fetch.parse_drive_link("https://drive.google.com/")
    with pytest.raises(OfflineError, match="give their local path"):
        images.import_images(s, "https://drive.google.com/file/d/1AbCdEfGhIjKlMnOp/view")


# --------------------------------------------------------------------------- removing


def session_files(s) -> dict[str, set[str]]:
    """Every record of each photo in the session, by where it lives."""
    from fastsd import drive
    from fastsd.dataset import check, crop

    ii = s.instance_images
    read = lambda p: set(drive.read_json(p)) if p.is_file() else set()  # noqa: E731
    return {"originals": {p.stem for p in (ii / "originals").glob("*.png")},
            "previews": {p.stem for p in (ii / "previews").glob("*.png")},
            "crops": {p.stem for p in crop.training_images(s)},
            "crop records": read(ii / crop.CROPS),
            "measures": read(ii / "previews" / check.MEASURES),
            "captions": {p.stem for p in s.captions.glob("*.txt")},
            "caption records": {p.stem for p in s.captions.glob("*.json")},
            "import index": set(drive.read_json(ii / "originals" / images.INDEX).values())}


@pytest.fixture
def three(s, tmp_path):
    """A session with three photos, each with its crop, caption, Kosmos-2 record and
    cached measures."""
    from fastsd.dataset import captions, check, crop

    src = tmp_path / "three"
    src.mkdir()
    for i, name in enumerate(("ann", "bob", "cat")):
        (src / f"{name}.png").write_bytes(png_bytes(gradient(96 + 8 * i, 80)))
        (src / f"{name}.txt").write_text(f"sks cat number {i}")
    images.import_images(s, src)
    crop.crop_session(s)
    for stem in ("ann", "bob", "cat"):
        captions.write_record(s, stem, {"caption": "a cat", "subject_box": None})
    check.check_session(s)
    return s


def test_removing_photos_takes_every_record_of_them_and_nothing_else(three):
    before = session_files(three)
    assert all(v == {"ann", "bob", "cat"} for v in before.values()), before
    kept = {p.name: p.read_bytes() for p in (three.path / "instance_images").rglob("cat*")}
    with pytest.raises(DataError, match="no photo named 'dan'; nothing was removed"):
        images.remove_images(three, ["ann", "dan"])
    assert session_files(three) == before
    assert images.remove_images(three, ["ann", "bob.png"]) == ["ann", "bob"]
    assert all(v == {"cat"} for v in session_files(three).values()), session_files(three)
    assert {p.name: p.read_bytes() for p in (three.path / "instance_images").rglob("cat*")} \
        == kept
    # the import index forgot them: the same photo imports again
    src = three.path.parent.parent.parent / "three"
    rows = {r.file: r.outcome for r in images.import_images(three, src).rows}
    assert rows["ann.png"] == rows["bob.png"] == "imported" and rows["cat.png"] == "duplicate"


def test_importing_with_replace_removes_the_earlier_photos_once_new_ones_are_there(three,
                                                                                   tmp_path):
    from fastsd import cli

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no photos here")
    with pytest.raises(DataError, match="no image files, so the session's photos were kept"):
        images.import_images(three, empty, replace=True)
    assert session_files(three)["originals"] == {"ann", "bob", "cat"}
    new = tmp_path / "new"
    new.mkdir()
    (new / "dog.png").write_bytes(png_bytes(gradient(120, 90)))
    assert cli.main(["images", "import", "subject", str(new), "--remove-existing",
                     "--no-crop"]) == 0
    files = session_files(three)
    assert files["originals"] == files["import index"] == {"dog"}
    assert not (files["crops"] | files["captions"] | files["caption records"]
                | files["crop records"] | files["measures"]) - {"dog"}
    assert cli.main(["images", "remove", "subject", "dog"]) == 0
    assert images.originals(three) == []
