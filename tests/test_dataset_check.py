"""The set check, bit depths and readable names, on sets made here from real photographs."""

import io
import json
import shutil
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter
from skimage import data

from fastsd import cli
from fastsd import session as sessions
from fastsd.dataset import captions, check, images, samples, sheet, widgets

# ---------------------------------------------------------------------------- bit depth


def png16(a: np.ndarray, sbit: tuple[int, ...] | None = None) -> bytes:
    """A 16-bit PNG written by hand (grey (H, W) or RGB (H, W, 3)), with an sBIT chunk."""
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    h, w = a.shape[:2]
    colour = 0 if a.ndim == 2 else 2
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in a)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
            + (chunk(b"sBIT", bytes(sbit)) if sbit else b"")
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def tones(grey: bool) -> np.ndarray:
    """A real photograph's 8-bit tones (camera, or astronaut in colour), 128 x 128."""
    img = samples.load("camera" if grey else "astronaut").resize((128, 128))
    return np.asarray(img.convert("L" if grey else "RGB")).astype(np.uint16)


def decoded(data: bytes, name: str = "x.png") -> np.ndarray:
    img, _ = images.decode_image(data, name)
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


@pytest.mark.parametrize("grey", [True, False], ids=["grey", "rgb"])
def test_full_range_16bit_keeps_its_tones(grey):
    eight = tones(grey)
    full = eight * 257  # 8-bit tones spread over the 16-bit range, as a raw converter does
    out = decoded(png16(full))
    want = eight if not grey else np.repeat(eight[..., None], 3, axis=2)
    assert np.abs(out - want).max() <= 1
    assert len(np.unique(out)) > 150, "the tones are kept, not crushed"


@pytest.mark.parametrize("grey", [True, False], ids=["grey", "rgb"])
@pytest.mark.parametrize("sbit", [None, 8], ids=["no-sBIT", "sBIT-8"])
def test_8bit_in_16bit_is_not_darkened(grey, sbit):
    eight = tones(grey)  # values 0-255 in a 16-bit file: several tools write them so
    out = decoded(png16(eight, (sbit,) * (1 if grey else 3) if sbit else None))
    want = eight if not grey else np.repeat(eight[..., None], 3, axis=2)
    assert np.array_equal(out, want)
    assert out.mean() > 60, "not the almost black image a /65535 scaling gives"


def test_sbit_scaled_data_and_12bit_range():
    eight = tones(False)
    # sBIT 8 with the samples scaled up as the PNG specification says: full range.
    assert np.abs(decoded(png16(eight * 257, (8, 8, 8))) - eight).max() <= 1
    # sBIT 12 with 12-bit samples in the low bits: white is 4095.
    twelve = ((eight.astype(np.int64) * 4095 + 127) // 255).astype(np.uint16)
    assert np.abs(decoded(png16(twelve, (12, 12, 12))) - eight).max() <= 1
    # No sBIT: the range used (largest value under 4096) says 12 bits.
    assert np.abs(decoded(png16(twelve)) - eight).max() <= 1


def test_16bit_tiff_rgb_and_32bit_float_grey():
    eight = tones(False)
    ok, buf = cv2.imencode(".tiff", (eight * 257)[..., ::-1].copy())  # OpenCV writes BGR
    assert ok
    assert np.abs(decoded(buf.tobytes(), "x.tif") - eight).max() <= 1
    grey = tones(True).astype(np.float32) / 255.0  # 32-bit float in [0, 1]
    tif = Image.fromarray(grey, "F")
    b = io.BytesIO()
    tif.save(b, format="TIFF")
    out = decoded(b.getvalue(), "x.tif")
    assert np.abs(out[..., 0] - tones(True)).max() <= 1


def test_32bit_float_rgb_tiff_pillow_cannot_open():
    eight = tones(False)
    ok, buf = cv2.imencode(".tiff", (eight[..., ::-1] / 255.0).astype(np.float32))
    assert ok
    with pytest.raises(Exception):
        Image.open(io.BytesIO(buf.tobytes()))  # no Pillow mode for float colour
    assert np.abs(decoded(buf.tobytes(), "hdr.tif") - eight).max() <= 1
    assert images.tiff_size(buf.tobytes()) == (128, 128)


# ---------------------------------------------------------------------------- set check

CLEAN = ["astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "motorcycle", "hubble"]


def photo(name: str) -> Image.Image:
    if name == "motorcycle":
        return Image.fromarray(data.stereo_motorcycle()[0])
    if name == "hubble":
        return Image.fromarray(data.hubble_deep_field())
    if name == "cells":
        return Image.fromarray(data.immunohistochemistry())
    if name == "coins":
        return Image.fromarray(data.coins()).convert("RGB")
    return samples.load(name).convert("RGB")


def burst(n: int) -> list[Image.Image]:
    """n frames of one scene, as a phone's burst takes them: a few pixels apart, the light
    changing a little."""
    base = photo("cells")
    frames = []
    for i in range(n):
        frame = base.crop((3 * i, 2 * i, 480 + 3 * i, 480 + 2 * i))
        frames.append(Image.eval(frame, lambda v, k=i: min(255, int(v * (1 + 0.02 * k)))))
    return frames


def blank() -> Image.Image:
    rng = np.random.default_rng(0)  # a lens-cap frame: one colour and sensor noise
    a = np.clip(rng.normal(40, 2.0, (400, 600, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(a)


# case -> (extra images, the checks expected to fire, the images they name)
CASES = {
    "clean": ({}, set(), set()),
    "blurred": ({"cells_blurred": lambda: photo("cells").filter(ImageFilter.GaussianBlur(3))},
                {"blurred"}, {"cells_blurred"}),
    "burst": ({f"burst_{i}": (lambda i=i: burst(2)[i]) for i in range(2)},
              {"duplicates"}, {"burst_0", "burst_1"}),
    "dominated": ({f"burst_{i}": (lambda i=i: burst(5)[i]) for i in range(5)},
                  {"duplicates", "dominated"}, {f"burst_{i}" for i in range(5)}),
    "blank": ({"lens_cap": blank}, {"blank"}, {"lens_cap"}),
    "small": ({"cells_small": lambda: photo("cells").resize((200, 200))}, {"small"},
              {"cells_small"}),
    "subject": ({"cells_far": lambda: photo("cells")}, {"subject"}, {"cells_far"}),
}


@pytest.fixture(scope="module")
def clean_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clean")
    for name in CLEAN:
        photo(name).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def clean_images(clean_folder, tmp_path_factory):
    """instance_images/ of a session holding the clean set, measured once for the module."""
    s = sessions.create("template", tmp_path_factory.mktemp("template"), resolution=256)
    images.import_images(s, clean_folder)
    return s.instance_images


def make_session(name, clean_images, tmp_path, extra: dict, keep=CLEAN):
    """A session with the clean photos in ``keep`` (imported and measured already, as
    after an earlier import) and a folder of ``extra`` photos to import next."""
    s = sessions.create(name, resolution=256, class_word="cell")
    shutil.copytree(clean_images, s.instance_images, dirs_exist_ok=True)  # keeps mtimes
    for p in images.originals(s):
        if p.stem not in keep:
            p.unlink()
    src = tmp_path / name
    src.mkdir()
    for stem, make in extra.items():
        make().save(src / f"{stem}.png")
    if "cells_far" in extra:  # Kosmos-2 found the subject: a speck in the corner
        (s.captions / "cells_far.json").write_text(json.dumps(
            {"caption": "a cell", "entities": [], "subject_box": [20, 20, 60, 60],
             "image_size": [512, 512]}))
    return s, src


@pytest.mark.parametrize("case", list(CASES))
def test_each_check_fires_on_its_case_and_stays_quiet_on_the_others(case, clean_images,
                                                                    tmp_path):
    extra, expected, named = CASES[case]
    s, src = make_session(case, clean_images, tmp_path, extra)
    report = images.import_images(s, src).check
    assert report is not None and report.n_images == len(CLEAN) + len(extra)
    assert report.checks == expected, report.to_text()
    for f in report.findings:
        assert set(f.images) <= named, f
        assert f.threshold.split("=")[0] in check.settings_fields() + ["size"], f.threshold
    if case == "clean":
        assert report.findings == [] and "no warnings" in report.to_text()
    if "duplicates" in expected:
        (dup,) = report.by("duplicates")
        assert set(dup.images) == named and dup.keep in named
        assert f"Keep {dup.keep}" in dup.message


def test_a_blurred_copy_beside_its_sharp_original_keeps_the_sharp_one(clean_images, tmp_path):
    extra = {"cells": lambda: photo("cells"),
             "cells_soft": lambda: photo("cells").filter(ImageFilter.GaussianBlur(3))}
    s, src = make_session("pair", clean_images, tmp_path, extra)
    report = images.import_images(s, src).check
    assert report.checks == {"blurred", "duplicates"}
    (dup,) = report.by("duplicates")
    assert sorted(dup.images) == ["cells", "cells_soft"] and dup.keep == "cells"
    assert [f.images for f in report.by("blurred")] == [["cells_soft"]]


def test_too_few_images_for_the_steps(clean_images, tmp_path):
    s, src = make_session("few", clean_images, tmp_path, {}, keep=CLEAN[:6])
    images.import_images(s, src, check_set=False)
    assert check.check_session(s, check.CheckSettings(steps=1200)).checks == set()
    (f,) = check.check_session(s).by("too_few")  # 1500 steps: 250 per image
    assert f.threshold == "max_steps_per_image=200" and f.value == 250
    assert "at least 8" in f.message and "at most 1200" in f.message
    s3, src3 = make_session("three", clean_images, tmp_path, {}, keep=CLEAN[:3])
    images.import_images(s3, src3, check_set=False)
    (f,) = check.check_session(s3, check.CheckSettings(steps=300)).by("too_few")
    assert f.threshold == "min_images=5"


def test_face_decides_the_subject_when_kosmos_did_not(clean_images, tmp_path):
    s, src = make_session("face", clean_images, tmp_path, {})
    images.import_images(s, src, check_set=False)
    quiet = check.check_session(s)
    assert quiet.by("subject") == []
    found = {f.images[0]: f for f in
             check.check_session(s, check.CheckSettings(min_face=0.05)).by("subject")}
    f = found["astronaut"]
    assert "face" in f.message and f.threshold == "min_face=0.05" and 0.02 < f.value < 0.05


def test_steps_default_is_the_trainers():
    from fastsd.train.settings import TrainSettings

    assert check.CheckSettings().steps == TrainSettings().unet_steps


def test_second_check_reads_the_cached_measures(clean_images, tmp_path):
    s, src = make_session("cache", clean_images, tmp_path, {"lens_cap": blank})
    first = images.import_images(s, src).check
    cached = s.instance_images / "previews" / check.MEASURES
    before = cached.stat().st_mtime_ns
    again = check.check_session(s)
    assert again.to_dict() == first.to_dict() and cached.stat().st_mtime_ns == before
    assert json.loads((s.outputs / check.REPORT).read_text()) == again.to_dict()


def test_cli_check_text_and_json(clean_images, tmp_path, capsys):
    s, src = make_session("clitest", clean_images, tmp_path, {"lens_cap": blank})
    images.import_images(s, src, check_set=False)
    assert cli.main(["images", "check", "clitest"]) == 0
    out = capsys.readouterr().out
    assert "[blank] lens_cap is blank" in out and "(blank_spread=6.0)" in out
    assert cli.main(["images", "check", "clitest", "--json", "--blank-spread", "0.1"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["findings"] == [] and got["settings"]["blank_spread"] == 0.1


def test_sheet_and_notebook_show_the_warnings(clean_images, tmp_path):
    s, src = make_session("shown", clean_images, tmp_path, {"lens_cap": blank})
    images.import_images(s, src)
    img = sheet.contact_sheet(s, thumb=128)
    a = np.asarray(img).astype(int)
    orange = (np.abs(a[..., 0] - 230) < 20) & (np.abs(a[..., 1] - 120) < 25) & (a[..., 2] < 30)
    assert orange.sum() > 500, "the warned tile is framed and the warning written"
    page = widgets.sheet_and_warnings(s).data
    assert "data:image/png;base64," in page and "lens_cap is blank" in page
    assert "blank_spread=6.0" in page


# ---------------------------------------------------------------------------- names


def label(text: str, size: int = 20) -> np.ndarray:
    img = Image.new("L", (600, 40), 255)
    ImageDraw.Draw(img).text((4, 4), text, fill=0, font=sheet.font(size))
    return np.asarray(img)


def test_names_in_any_script_never_draw_empty_boxes():
    name = "ok_unicode_e\u0301\u732b"  # as macOS writes it: e + combining accent, then 猫
    shown = sheet.readable(name)
    assert shown == "ok_unicode_\u00e9[U+732B]"
    assert all(ord(c) in sheet.covered() for c in shown), "every glyph drawn exists"
    assert 0x732B not in sheet.covered(), "猫 is not in DejaVu Sans: the fallback is needed"
    # Drawn as it is, 猫 would be DejaVu's empty box (.notdef); é is a real glyph.
    tofu = label("\u732b")
    assert (tofu < 128).sum() > 20 and not np.array_equal(tofu, label("\u00e9"))
    img = Image.new("RGB", (600, 40), "white")
    sheet.draw_text(ImageDraw.Draw(img), (4, 4), name, (0, 0, 0), 20)
    assert np.array_equal(np.asarray(img.convert("L")), label(shown)), \
        "the name is drawn as its readable form"
    assert sheet.readable("Фото_ψ_ü") == "Фото_ψ_ü"  # covered scripts are drawn as they are


def test_names_on_the_sheet_and_in_the_notebook(tmp_path):
    s = sessions.create("names", resolution=64)
    src = tmp_path / "src"
    src.mkdir()
    name = "ok_unicode_é猫 <b>"
    samples.load("chelsea").save(src / f"{name}.png")
    images.import_images(s, src)
    assert captions.image_stems(s) == [name], "the name is kept as it is"
    assert widgets.name_html(name) == ("<div style='word-break:break-all' title='"
                                       "ok_unicode_é猫 &lt;b&gt;'>ok_unicode_é猫 &lt;b&gt;</div>")
    editor = widgets.CaptionEditor(s)
    html_names = [w.value for w in editor.widget.children[0].children[0].children[1:]]
    assert html_names == [widgets.name_html(name)]
    sheet.contact_sheet(s)  # draws without error, in DejaVu Sans
