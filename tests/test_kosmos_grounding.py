"""Parsing Kosmos-2's grounded output: the documented format, pixel boxes, the subject."""

from __future__ import annotations

import pytest

from fastsd.kosmos import grounding
from fastsd.kosmos.grounding import Entity, drop_prefix, parse, patch_box, to_pixels

# The example of Kosmos-2's documentation (transformers, processing_kosmos2.py).
SNOWMAN = ("<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044>"
           "<patch_index_0863></object> warming himself by<phrase> a fire</phrase><object>"
           "<patch_index_0005><patch_index_0911></object>.")


def test_snowman_caption_and_entities():
    g = parse(SNOWMAN)
    assert g.caption == "An image of a snowman warming himself by a fire."
    assert [e.phrase for e in g.entities] == ["a snowman", "a fire"]
    assert [e.span for e in g.entities] == [(12, 21), (41, 47)]
    for e in g.entities:
        assert g.caption[e.span[0]:e.span[1]] == e.phrase
    # The documented normalised boxes.
    assert g.entities[0].boxes == ((0.390625, 0.046875, 0.984375, 0.828125),)
    assert g.entities[1].boxes == ((0.171875, 0.015625, 0.484375, 0.890625),)


def test_patch_box_by_hand():
    # 44 = row 1, column 12; 863 = row 26, column 31 on the 32x32 grid. They share neither
    # row nor column, so the box runs from patch centre to patch centre: (c + 0.5) / 32.
    assert patch_box(44, 863) == ((12 + .5) / 32, (1 + .5) / 32, (31 + .5) / 32, (26 + .5) / 32)
    # Same row (row 3, columns 2..9): whole patches.
    assert patch_box(3 * 32 + 2, 3 * 32 + 9) == (2 / 32, 3 / 32, 10 / 32, 4 / 32)
    # One patch: that patch.
    assert patch_box(0, 0) == (0.0, 0.0, 1 / 32, 1 / 32)
    assert patch_box(1023, 1023) == (31 / 32, 31 / 32, 1.0, 1.0)


def test_pixel_conversion_by_hand():
    # The snowman box on an 800x600 original:
    # x0 = 0.390625*800 = 312.5 -> 312 (left edge rounds down)
    # y0 = 0.046875*600 = 28.125 -> 28
    # x1 = 0.984375*800 = 787.5 -> 788 (right edge rounds up)
    # y1 = 0.828125*600 = 496.875 -> 497
    box = parse(SNOWMAN).entities[0].boxes[0]
    assert to_pixels(box, (800, 600)) == [312, 28, 788, 497]
    # Exact pixel edges stay put, and boxes are clamped to the image.
    assert to_pixels((0.25, 0.5, 0.75, 1.0), (640, 480)) == [160, 240, 480, 480]
    assert to_pixels((0.0, 0.0, 1.0, 1.0), (33, 7)) == [0, 0, 33, 7]


def test_multiple_boxes_and_decoded_prefix():
    raw = ("<s><image>. the to</image><grounding> Two<phrase> dogs</phrase><object>"
           "<patch_index_0100><patch_index_0300></delimiter_of_multi_objects/>"
           "<patch_index_0012><patch_index_0044></object> and<phrase> a cat</phrase>"
           "<object><patch_index_0032><patch_index_0063></object> on a bed</s>")
    g = parse(raw)
    assert g.caption == "Two dogs and a cat on a bed"
    dogs, cat = g.entities
    assert dogs == Entity("dogs", (4, 8), (patch_box(100, 300), patch_box(12, 44)))
    assert cat.phrase == "a cat" and cat.boxes == (patch_box(32, 63),)
    assert cat.boxes[0] == (0.0, 1 / 32, 1.0, 2 / 32)  # the whole second row


@pytest.mark.parametrize("raw", [
    SNOWMAN,
    "<grounding> Two<phrase> dogs</phrase><object><patch_index_0100><patch_index_0300>"
    "</delimiter_of_multi_objects/><patch_index_0012><patch_index_0044></object> and"
    "<phrase> a cat</phrase><object><patch_index_0032><patch_index_0063></object> on a bed",
    "  <grounding>x<phrase>a</phrase><object><patch_index_0001><patch_index_0001></object>  ",
    "<grounding> Describe this image in detail: The image shows<phrase> a woman</phrase>"
    "<object><patch_index_0257><patch_index_0990></object> holding<phrase> a cup of coffee"
    "</phrase><object><patch_index_0600><patch_index_0700></object> in a café.",
])
def test_agrees_with_the_processors_own_parser(raw):
    from transformers.models.kosmos2.processing_kosmos2 import (
        clean_text_and_extract_entities_with_bboxes,
    )

    text, entities = clean_text_and_extract_entities_with_bboxes(raw)
    g = parse(raw)
    assert g.caption == text
    assert [(e.phrase, e.span, list(e.boxes)) for e in g.entities] == [
        (name, span, [tuple(b) for b in boxes]) for name, span, boxes in entities]


def test_truncated_and_malformed_output():
    # A phrase whose object never came, an unclosed object, an out-of-range index.
    g = parse("<grounding> A<phrase> dog</phrase> on<phrase> a mat</phrase><object>"
              "<patch_index_0001>")
    assert g.caption == "A dog on a mat" and g.entities == ()
    g = parse("A<phrase> dog</phrase><object><patch_index_9999><patch_index_0001></object>.")
    assert g.caption == "A dog." and g.entities == ()
    # An object without a phrase: a nameless entity where it stood.
    g = parse("A dog<object><patch_index_0000><patch_index_1023></object> runs")
    assert g.caption == "A dog runs"
    assert g.entities == (Entity("", (5, 5), ((1 / 64, 1 / 64, 63 / 64, 63 / 64),)),)
    # Random-model gibberish: no tags closed, nothing grounded, no crash.
    assert parse("<patch_index_0286><patch_index_0286></phrase><object>").entities == ()


def test_drop_prefix_shifts_spans():
    g = drop_prefix(parse(SNOWMAN), "An image of")
    assert g.caption == "a snowman warming himself by a fire."
    assert [(e.phrase, e.span) for e in g.entities] == [("a snowman", (0, 9)),
                                                        ("a fire", (29, 35))]
    assert all(g.caption[slice(*e.span)] == e.phrase for e in g.entities)
    assert drop_prefix(g, "Describe this image in detail:") == g


@pytest.mark.parametrize("phrase,cls,hit", [
    ("a snowman", "snowman", True), ("two dogs", "dog", True), ("a puppy", "dog", True),
    ("a young woman", "person", True), ("a fire", "dog", False), ("a hotdog", "dog", False),
    ("a brown teddy bear", "teddy bear", True), ("a bear", "teddy bear", False),
    ("three glasses", "glass", True), ("a cat", "", False),
])
def test_matches_class(phrase, cls, hit):
    assert grounding.matches_class(phrase, cls) is hit


def test_subject_box_prefers_the_class_then_the_largest():
    entities = [
        {"phrase": "a fire", "span": [0, 6], "boxes": [[0, 0, 500, 500]]},
        {"phrase": "a dog", "span": [10, 15], "boxes": [[10, 10, 20, 20], [0, 0, 50, 40]]},
    ]
    assert grounding.subject_box(entities, "dog") == [0, 0, 50, 40]
    assert grounding.subject_box(entities, "cat") == [0, 0, 500, 500]
    assert grounding.subject_box([], "dog") is None
