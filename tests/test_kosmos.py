"""Captioning a session: .txt and .json per image, kept captions, resume, grounded crop, CLI."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fastsd import drive, session
from fastsd.kosmos import CaptionSettings, auto, caption_session, grounding
from fastsd.kosmos.model import BRIEF_PROMPT
from fastsd.errors import DataError
from fastsd.models import tiny_kosmos

STEMS = ("astronaut", "chelsea", "coffee")
SNOWMAN = ("<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044>"
           "<patch_index_0863></object> warming himself by<phrase> a fire</phrase><object>"
           "<patch_index_0005><patch_index_0911></object>.")


@pytest.fixture(scope="module")
def kosmos(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tiny_kosmos.ensure(tmp_path_factory.mktemp("kosmos")))


def _session(root: Path, name: str = "cats", cls: str = "cat") -> session.Session:
    """A session whose originals are three of the sample photographs, as the layout has them."""
    from fastsd.dataset import samples

    s = session.create(name, root, instance_token="sks", class_word=cls, resolution=64)
    samples.write(s.instance_images / "originals", STEMS)
    return s


def _settings(model: str, **kw) -> CaptionSettings:
    return CaptionSettings(model=model, max_new_tokens=12, **kw)


class ScriptedCaptioner:
    """Stands in for the model where a test needs a *grounded* generation: the random tiny
    Kosmos-2 writes gibberish without boxes. Everything after generation is the real path."""

    def __init__(self, raw: str) -> None:
        self.raw, self.closed = raw, False

    def generate(self, images, prompt, max_new_tokens):
        return [self.raw] * len(images)

    def close(self) -> None:
        self.closed = True


def test_captions_and_entity_files_for_every_image(workspace: Path, kosmos: str):
    from fastsd.dataset import captions

    s = _session(workspace)
    results = caption_session(s, _settings(kosmos), workspace)
    assert sorted(r.stem for r in results) == sorted(STEMS)
    for r in results:
        text = (s.captions / f"{r.stem}.txt").read_text(encoding="utf-8")
        assert text == captions.render(captions.DEFAULT_TEMPLATE, r.caption, "sks", "cat")
        assert "sks" in text and "cat" in text  # the template adds token and class word
        rec = drive.read_json(s.captions / f"{r.stem}.json")
        assert set(rec) == {"caption", "entities", "subject_box", "image_size"}
        from PIL import Image

        with Image.open(s.instance_images / "originals" / f"{r.stem}.png") as im:
            assert rec["image_size"] == list(im.size)
        w, h = rec["image_size"]
        for e in rec["entities"]:
            assert rec["caption"][slice(*e["span"])] == e["phrase"]
            for x0, y0, x1, y1 in e["boxes"]:
                assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
        assert rec["subject_box"] == grounding.subject_box(rec["entities"], "cat")
        assert "<patch_index_" not in rec["caption"] and "<grounding>" not in text
    assert len({r.caption for r in results}) > 1  # the images steer even the random model


def test_batched_session_equals_one_at_a_time(workspace: Path, kosmos: str):
    a, b = _session(workspace, "a"), _session(workspace, "b")
    caption_session(a, _settings(kosmos, batch_size=8), workspace)
    caption_session(b, _settings(kosmos, batch_size=1), workspace)
    for stem in STEMS:
        for ext in ("txt", "json"):
            assert (a.captions / f"{stem}.{ext}").read_bytes() == \
                (b.captions / f"{stem}.{ext}").read_bytes()


def test_existing_captions_kept_unless_overwrite_and_resume(workspace: Path, kosmos: str):
    s = _session(workspace)
    mine = s.captions / "chelsea.txt"
    drive.atomic_write_text(mine, "my own words")
    results = {r.stem: r for r in caption_session(s, _settings(kosmos), workspace)}
    assert mine.read_text() == "my own words" and not results["chelsea"].txt_written
    assert (s.captions / "chelsea.json").is_file() and results["coffee"].txt_written
    # Everything done: a second run has nothing to do and touches nothing.
    stamps = {p.name: p.stat().st_mtime_ns for p in s.captions.iterdir()}
    assert caption_session(s, _settings(kosmos), workspace) == []
    assert stamps == {p.name: p.stat().st_mtime_ns for p in s.captions.iterdir()}
    # A run cut short: only the image missing its json is captioned again.
    (s.captions / "coffee.json").unlink()
    assert [r.stem for r in caption_session(s, _settings(kosmos), workspace)] == ["coffee"]
    assert mine.read_text() == "my own words"
    # --overwrite replaces the user's caption too.
    results = {r.stem: r for r in caption_session(s, _settings(kosmos, overwrite=True),
                                                   workspace)}
    assert results["chelsea"].txt_written and mine.read_text() == results["chelsea"].text


def test_subject_box_drives_the_crop(workspace: Path):
    s = _session(workspace, "snow", cls="snowman")
    cap = ScriptedCaptioner(SNOWMAN)
    results = caption_session(s, CaptionSettings(batch_size=2), workspace, captioner=cap)
    assert not cap.closed  # a captioner passed in is the caller's to close
    crops = drive.read_json(s.instance_images / "crops.json")
    for r in results:
        rec = drive.read_json(s.captions / f"{r.stem}.json")
        assert rec["caption"] == "a snowman warming himself by a fire."
        assert r.text.count("snowman") >= 1
        w, h = rec["image_size"]
        box = grounding.to_pixels(grounding.patch_box(44, 863), (w, h))
        assert rec["subject_box"] == box  # the class word's phrase, in original pixels
        assert [e["phrase"] for e in rec["entities"]] == ["a snowman", "a fire"]
        c = crops[r.stem]
        assert c["focus"] == "subject"
        x0, y0, x1, y1 = c["box"]
        assert x0 <= box[0] and y0 <= box[1] and x1 >= box[2] and y1 >= box[3], (c, box)
        assert (s.instance_images / f"{r.stem}.png").is_file()


def test_largest_box_when_no_phrase_names_the_class(workspace: Path):
    s = _session(workspace, "dogs", cls="dog")
    caption_session(s, CaptionSettings(crop=False), workspace,
                    captioner=ScriptedCaptioner(SNOWMAN))
    rec = drive.read_json(s.captions / "coffee.json")
    size = tuple(rec["image_size"])
    snowman = grounding.to_pixels(grounding.patch_box(44, 863), size)
    fire = grounding.to_pixels(grounding.patch_box(5, 911), size)
    assert grounding._area(snowman) > grounding._area(fire)
    assert rec["subject_box"] == snowman  # no "dog": the largest box


def test_no_images_is_a_clear_error(workspace: Path, kosmos: str):
    s = session.create("empty", workspace)
    with pytest.raises(DataError, match="no images"):
        caption_session(s, _settings(kosmos), workspace)


def test_record_drops_the_prompt_words():
    rec = auto.record(SNOWMAN, BRIEF_PROMPT, (800, 600), "snowman")
    assert rec == {
        "caption": "a snowman warming himself by a fire.",
        "entities": [{"phrase": "a snowman", "span": [0, 9], "boxes": [[312, 28, 788, 497]]},
                     {"phrase": "a fire", "span": [29, 35],
                      "boxes": [[137, 9, 388, 535]]}],
        "subject_box": [312, 28, 788, 497], "image_size": [800, 600]}


def test_cli_auto(workspace: Path, kosmos: str, capsys):
    from fastsd.kosmos.cli import register_auto

    _session(workspace, "cli")
    parser = argparse.ArgumentParser()
    register_auto(parser.add_subparsers())
    args = parser.parse_args(["auto", "cli", "--model", kosmos, "--max-new-tokens", "8",
                              "--home", str(workspace), "--no-crop"])
    assert (args.detailed, args.overwrite, args.batch_size, args.quantize) == (
        False, False, 8, "auto")
    args.func(args)
    out = capsys.readouterr().out
    assert "Captioned 3 images" in out
    assert all((workspace / "sessions" / "cli" / "captions" / f"{s}.json").is_file()
               for s in STEMS)
    args = parser.parse_args(["auto", "cli", "--detailed", "--overwrite"])
    assert args.detailed and args.overwrite and args.model == "microsoft/kosmos-2-patch14-224"


def test_cli_offline_names_the_model(workspace: Path, monkeypatch):
    import subprocess
    import sys

    _session(workspace, "off")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = subprocess.run([sys.executable, "-m", "fastsd.cli", "captions", "auto", "off",
                        "--home", str(workspace)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "microsoft/kosmos-2-patch14-224" in p.stderr and "offline" in p.stderr
    assert "Traceback" not in p.stderr


def test_in_a_child_process_the_captions_are_the_same(workspace: Path, kosmos: str,
                                                       capsys):
    """In a notebook kernel on a GPU machine Kosmos-2 runs in a child process (a model run
    on CUDA in the kernel keeps a CUDA context there for the runtime's life): the same
    captions and records, and the child's own report shown here."""
    a, b = _session(workspace, "here"), _session(workspace, "child")
    here = caption_session(a, _settings(kosmos), workspace, in_child=False)
    assert "Captioned 3 images" not in capsys.readouterr().out
    child = caption_session(b, _settings(kosmos), workspace, in_child=True)
    assert [(r.stem, r.caption, r.text, r.subject_box, r.txt_written) for r in child] == \
        [(r.stem, r.caption, r.text, r.subject_box, r.txt_written) for r in here]
    for stem in STEMS:
        assert (b.captions / f"{stem}.json").read_bytes() == \
            (a.captions / f"{stem}.json").read_bytes()
    assert f"Captioned 3 images in {b.captions}" in capsys.readouterr().out  # `fastsd captions auto`
