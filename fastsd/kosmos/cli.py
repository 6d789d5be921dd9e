"""`fastsd captions auto`: Kosmos-2 captions for a session's images."""

from __future__ import annotations

import argparse

from fastsd.cli_common import add_home, home, load_session


def _auto(args: argparse.Namespace) -> None:
    from fastsd.kosmos import CaptionSettings, caption_session

    s = load_session(args)
    settings = CaptionSettings(model=args.model, detailed=args.detailed,
                               overwrite=args.overwrite, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens, quantize=args.quantize,
                               crop=not args.no_crop)
    results = caption_session(s, settings, home(args))
    for r in results:
        box = "no subject box" if r.subject_box is None else f"subject {r.subject_box}"
        kept = "" if r.txt_written else " (existing .txt kept)"
        print(f"{r.stem}: {r.text}  [{box}]{kept}")
    print(f"Captioned {len(results)} images in {s.captions}")


def register_auto(captions_sub: argparse._SubParsersAction) -> None:
    """Add `auto` to the `fastsd captions` group (whose verbs fastsd.dataset.cli made)."""
    from fastsd.kosmos.model import DEFAULT_MODEL, QUANTIZE

    p = captions_sub.add_parser(
        "auto", help="caption the session's images with Kosmos-2 and crop around the subject",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write captions/NAME.txt (through the caption template) and "
        "captions/NAME.json (grounded phrases and boxes) for each image, then re-crop the "
        "images around the subject's box. Existing captions are kept unless --overwrite.")
    p.add_argument("session", help="session name")
    p.add_argument("--detailed", action="store_true",
                   help="detailed captions ('Describe this image in detail:') instead of brief")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing captions instead of keeping them")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="Hugging Face id or folder of a Kosmos-2 model, or tiny-kosmos2")
    p.add_argument("--batch-size", type=int, default=8, help="images per generation batch")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest generation in tokens (default: 64 brief, 256 detailed)")
    p.add_argument("--quantize", choices=QUANTIZE, default="auto",
                   help="8-bit loading: auto (when fp16 does not fit in free VRAM), 8bit, none")
    p.add_argument("--no-crop", action="store_true",
                   help="do not re-crop the images around their subject boxes")
    add_home(p)
    p.set_defaults(func=_auto)
