"""Smart crop, captions, contact sheet, widgets and the CLI of fastsd.dataset."""

import json

import numpy as np
import pytest
from PIL import Image

from fastsd import cli
from fastsd import session as sessions
from fastsd.dataset import captions, crop, images, samples, sheet
from fastsd.dataset.widgets import CaptionEditor, UploadWidget
from fastsd.errors import DataError


@pytest.fixture
def s(workspace):
    return sessions.create("subject", workspace, class_word="cat", resolution=64)


def inside(inner, outer):
    return (outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2]
            and inner[3] <= outer[3])


def astronaut_off_centre():
    """The astronaut photo at the right end of a wide canvas: a centre crop misses the face."""
    canvas = Image.new("RGB", (1200, 512), (128, 128, 128))
    canvas.paste(samples.load("astronaut"), (688, 0))
    return canvas


def test_face_crop_keeps_the_face():
    image = astronaut_off_centre()
    face = crop.detect_face(image)
    assert face is not None
    assert 688 + 150 < face[0] < face[2] < 688 + 300, face  # the astronaut's face
    out, box, focus = crop.smart_crop(image, 256)
    assert focus == "face" and out.size == (256, 256)
    assert inside(face, box)
    assert not inside(face, crop.square_around(1200, 512, 600, 256)), "centre would miss it"


def test_subject_box_comes_first():
    image = astronaut_off_centre()
    subject = (20, 300, 120, 400)
    _, box, focus = crop.smart_crop(image, 128, subject_box=subject)
    assert focus == "subject" and inside(subject, box)


def test_saliency_then_centre():
    img = Image.new("RGB", (900, 300), (90, 90, 90))
    img.paste((250, 240, 20), (40, 100, 140, 200))
    _, box, focus = crop.smart_crop(img, 64)
    assert focus == "saliency" and inside((40, 100, 140, 200), box)
    _, box, focus = crop.smart_crop(Image.new("RGB", (900, 300), (90, 90, 90)), 64)
    assert focus == "center" and box == (300, 0, 600, 300)


@pytest.mark.parametrize("size", [0, 100, 2048, 320 + 1])
def test_crop_size_must_be_a_multiple_of_64(size):
    with pytest.raises(DataError, match="multiple of 64"):
        crop.check_size(size)


def test_crop_session_records_boxes_and_redoes_at_another_size(s, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    astronaut_off_centre().save(src / "astro.png")
    samples.write(src, ["chelsea"])
    images.import_images(s, src)
    (s.captions / "chelsea.json").write_text(json.dumps(
        {"caption": "a cat", "entities": [{"phrase": "a cat", "span": [0, 5],
                                           "boxes": [[10, 10, 150, 200]]}],
         "subject_box": [10, 10, 150, 200], "image_size": [451, 300]}))
    record = crop.crop_session(s)
    assert record["astro"]["focus"] == "face" and record["chelsea"]["focus"] == "subject"
    assert inside((10, 10, 150, 200), record["chelsea"]["box"])
    with Image.open(s.instance_images / "astro.png") as im:
        assert im.size == (64, 64)
    assert [p.name for p in crop.training_images(s)] == ["astro.png", "chelsea.png"]
    assert (s.instance_images / "originals" / "astro.png").is_file(), "originals are kept"
    crop.crop_session(s, 128, stems=["astro"])
    saved = json.loads((s.instance_images / "crops.json").read_text())
    assert saved["astro"]["size"] == 128 and saved["chelsea"]["size"] == 64
    with Image.open(s.instance_images / "astro.png") as im:
        assert im.size == (128, 128)


def test_caption_template_round_trip(s, tmp_path):
    assert captions.render("{token} {cls}, {caption}", "a cat on a sofa", "sks",
                           "cat") == "sks cat, a cat on a sofa"
    assert captions.render("{token} {cls}, {caption}", "", "sks", "cat") == "sks cat"
    assert captions.render("photo of {token} {cls} , {caption}.", " on grass ", "ohwx",
                           "dog") == "photo of ohwx dog, on grass."
    with pytest.raises(DataError, match="only"):
        captions.render("{token} {name}", "", "sks", "cat")
    src = tmp_path / "in"
    src.mkdir()
    for i, name in enumerate(["IMG_0042", "2023-05-01 beach 7"]):
        Image.new("RGB", (80, 80), (i * 90, 30, 30)).save(src / f"{name}.png")
    (src / "IMG_0042.txt").write_text("my words")
    images.import_images(s, src)
    assert captions.set_all(s) == 1, "the existing caption is kept"
    assert captions.show(s) == {"2023-05-01 beach 7": "sks cat", "IMG_0042": "my words"}
    assert captions.set_all(s, "{token} {cls}, {caption}", "in the sun", overwrite=True) == 2
    assert captions.read(s, "IMG_0042") == "sks cat, in the sun"
    assert captions.replace(s, "in the sun", "at night") == 2
    assert captions.replace(s, r"s\w+ cat", "zwx cat", regex=True) == 2
    assert captions.show(s)["2023-05-01 beach 7"] == "zwx cat, at night"
    assert sorted(p.name for p in s.captions.iterdir()) == [
        "2023-05-01 beach 7.txt", "IMG_0042.txt"], "file names are never mangled"


def test_contact_sheet_draws_crop_and_entity_boxes(s, tmp_path):
    src = tmp_path / "in"
    samples.write(src, ["chelsea", "coffee"])
    images.import_images(s, src)
    crop.crop_session(s)
    captions.set_all(s)
    (s.captions / "coffee.json").write_text(json.dumps(
        {"caption": "a cup", "entities": [{"phrase": "a cup", "span": [0, 5],
                                           "boxes": [[100, 50, 400, 350]]}],
         "subject_box": [100, 50, 400, 350], "image_size": [600, 400]}))
    img = sheet.contact_sheet(s, thumb=160)
    assert (s.outputs / "contact_sheet.png").is_file()
    a = np.asarray(img).astype(int)
    red = (a[..., 0] > 200) & (a[..., 1] < 60) & (a[..., 2] < 60)
    green = (a[..., 1] > 150) & (a[..., 0] < 60) & (a[..., 2] < 100)
    assert red.sum() > 100 and green.sum() > 100
    assert img.width > 2 * 160


def test_contact_sheet_and_crop_of_an_empty_session(s):
    with pytest.raises(DataError, match="import some first"):
        sheet.contact_sheet(s)
    with pytest.raises(DataError, match="import some first"):
        crop.crop_session(s)


def test_caption_editor_saves_edits(s, tmp_path):
    src = tmp_path / "in"
    samples.write(src, ["chelsea", "rocket"])
    images.import_images(s, src)
    captions.set_all(s)
    editor = CaptionEditor(s)
    assert set(editor.areas) == {"chelsea", "rocket"}
    assert editor.areas["chelsea"].value == "sks cat"
    editor.areas["rocket"].value = "sks cat next to a rocket"
    editor.button.click()
    assert captions.read(s, "rocket") == "sks cat next to a rocket"
    assert captions.read(s, "chelsea") == "sks cat"
    assert "1" in editor.status.value


def test_upload_widget_imports_what_was_picked(s):
    import datetime
    import io

    buf = io.BytesIO()
    Image.new("RGB", (90, 90), (1, 2, 3)).save(buf, format="PNG")
    import ipywidgets

    up = UploadWidget(s)
    meta = {"name": "pet.png", "type": "image/png", "size": len(buf.getvalue()),
            "last_modified": datetime.datetime.now()}
    if ipywidgets.__version__.startswith("7."):  # what Colab ships: {name: {metadata, content}}
        value = {"pet.png": {"metadata": meta, "content": buf.getvalue()}}
    else:  # ipywidgets 8: a tuple of dicts
        value = ({**meta, "content": memoryview(buf.getvalue())},)
    up.picker.set_trait("value", value)
    up.button.click()
    assert up.report is not None and up.report.rows[0].outcome == "imported"
    assert [p.name for p in images.originals(s)] == ["pet.png"]


def test_cli_import_crop_report_and_captions(s, tmp_path, capsys):
    src = tmp_path / "in"
    samples.write(src, ["chelsea", "astronaut"])
    assert cli.main(["images", "import", "subject", str(src)]) == 0
    out = capsys.readouterr().out
    assert "2 imported" in out and "Cropped 2 images to 64 px" in out
    assert cli.main(["images", "crop", "subject", "--size", "128"]) == 0
    assert "astronaut: 128 px" in capsys.readouterr().out
    assert cli.main(["images", "report", "subject"]) == 0
    assert "contact_sheet.png" in capsys.readouterr().out
    assert cli.main(["captions", "set", "subject", "--caption", "indoors"]) == 0
    assert cli.main(["captions", "replace", "subject", "indoors", "outdoors"]) == 0
    capsys.readouterr()
    assert cli.main(["captions", "show", "subject"]) == 0
    assert json.loads(capsys.readouterr().out) == {"astronaut": "sks cat, outdoors",
                                                   "chelsea": "sks cat, outdoors"}
    assert cli.main(["images", "crop", "subject", "--size", "100"]) == 2
    assert "multiple of 64" in capsys.readouterr().err
