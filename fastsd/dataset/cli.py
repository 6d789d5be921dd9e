"""`fastsd images import|crop|report` and `fastsd captions set|replace|show|auto`."""

from __future__ import annotations

import argparse
import dataclasses

from fastsd.cli_common import add_home, home, load_session as _load, print_json


def _import(args) -> None:
    from fastsd.dataset import crop, images

    s = _load(args)
    for i, source in enumerate(args.source):
        report = images.import_images(s, source, replace=args.remove_existing and i == 0)
        print(report.to_text())
    if not args.no_crop and images.originals(s):
        record = crop.crop_session(s, args.size)
        print(f"Cropped {len(record)} images to {args.size or s.settings['resolution']} px")


def _remove(args) -> None:
    from fastsd.dataset import images

    gone = images.remove_images(_load(args), args.names)
    print(f"Removed {len(gone)} photo(s), with their crops, captions and cached measures: "
          + ", ".join(gone))


def _crop(args) -> None:
    from fastsd.dataset import crop

    record = crop.crop_session(_load(args), args.size)
    for stem, r in record.items():
        print(f"{stem}: {r['size']} px, box {r['box']} ({r['focus']})")


def _report(args) -> None:
    from fastsd.dataset import check, images, sheet

    s = _load(args)
    report = images.last_report(s)
    print(report.to_text() if report else "No import yet.")
    if images.originals(s):
        checked = check.check_session(s)
        print(checked.to_text())
        sheet.contact_sheet(s, report=checked)
        print(f"Contact sheet: {s.outputs / sheet.SHEET}")


def _import_legacy(args) -> None:
    from fastsd.dataset import legacy

    done = legacy.import_session(args.source, args.name, home(args))
    print(done.report.to_text())
    print(done)


def _check(args) -> None:
    from fastsd.dataset import check

    given = {name: getattr(args, name) for name in check.settings_fields()
             if getattr(args, name, None) is not None}
    report = check.check_session(_load(args), check.CheckSettings(**given))
    if args.json:
        print_json(report.to_dict())
    else:
        print(report.to_text())


def _set(args) -> None:
    from fastsd.dataset import captions

    n = captions.set_all(_load(args), args.template, args.caption, args.overwrite)
    print(f"Wrote {n} caption(s)")


def _replace(args) -> None:
    from fastsd.dataset import captions

    print(f"Changed {captions.replace(_load(args), args.find, args.repl, args.regex)} caption(s)")


def _show(args) -> None:
    from fastsd.dataset import captions

    print_json(captions.show(_load(args)))


def register(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add `fastsd images ...` and `fastsd captions ...`; returns the captions verbs, to
    which the captioner adds `auto`."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("images", help="import, crop and check a session's instance images")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    c = verbs.add_parser("import", formatter_class=fmt,
                         help="import photos from folders, .zip files or Drive share links")
    c.add_argument("session", help="session name")
    c.add_argument("source", nargs="+", help="a folder, an image, a .zip, or a Google Drive "
                   "share link (file or folder)")
    c.add_argument("--size", type=int, default=None,
                   help="crop size (default: the session's resolution)")
    c.add_argument("--no-crop", action="store_true", help="import only; crop later")
    c.add_argument("--remove-existing", action="store_true",
                   help="first remove the session's photos, with their crops and captions "
                   "(once the source has given image files)")
    c.set_defaults(func=_import)
    c = verbs.add_parser("remove", formatter_class=fmt,
                         help="remove photos from a session, with their crops and captions")
    c.add_argument("session", help="session name")
    c.add_argument("names", nargs="+", metavar="NAME",
                   help="a photo's name in the session (as 'images report' lists it), e.g. "
                   "chelsea or chelsea.png")
    c.set_defaults(func=_remove)
    c = verbs.add_parser("crop", formatter_class=fmt,
                         help="(re)crop the originals to the training resolution")
    c.add_argument("session", help="session name")
    c.add_argument("--size", type=int, default=None,
                   help="crop size, a multiple of 64 (default: the session's resolution)")
    c.set_defaults(func=_crop)
    c = verbs.add_parser("import-legacy", formatter_class=fmt,
                         help="make a session from a fast-stable-diffusion session: photos, "
                         "captions and its trained model as the base model")
    c.add_argument("source", help="the old session's folder (Fast-Dreambooth/Sessions/NAME), "
                   "or its name")
    c.add_argument("--name", default=None, help="the new session's name (default: the old one's)")
    c.set_defaults(func=_import_legacy)
    c = verbs.add_parser("check", help="check the images as a set: blank, blurred, "
                         "near-duplicate, small, subject too small, too few (warnings only)")
    c.add_argument("session", help="session name")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    from fastsd.dataset.check import CheckSettings

    for f in dataclasses.fields(CheckSettings):
        c.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                       type=float if f.type == "float" else int,
                       help="training size (default: the session's resolution)"
                       if f.default is None else f"threshold (default {f.default})")
    c.set_defaults(func=_check)
    c = verbs.add_parser("report", help="the last import report and the contact sheet")
    c.add_argument("session", help="session name")
    c.set_defaults(func=_report)
    for c in verbs.choices.values():
        add_home(c)

    p = sub.add_parser("captions", help="write, edit and show captions (or auto-caption)")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    c = verbs.add_parser("set", formatter_class=fmt,
                         help="give every image a caption from a template")
    c.add_argument("session", help="session name")
    c.add_argument("--template", default=None, help="e.g. '{token} {cls}, {caption}' "
                   "(default: the session's caption_template, else that one)")
    c.add_argument("--caption", default="", help="text for {caption}")
    c.add_argument("--overwrite", action="store_true", help="replace existing captions")
    c.set_defaults(func=_set)
    c = verbs.add_parser("replace", formatter_class=fmt,
                         help="find and replace in every caption")
    c.add_argument("session", help="session name")
    c.add_argument("find", help="text to find")
    c.add_argument("repl", help="replacement")
    c.add_argument("--regex", action="store_true", help="FIND is a regular expression")
    c.set_defaults(func=_replace)
    c = verbs.add_parser("show", help="print every image's caption as JSON")
    c.add_argument("session", help="session name")
    c.set_defaults(func=_show)
    for c in verbs.choices.values():
        add_home(c)
    return verbs
