"""Importing instance images into a session: every file is imported or skipped with a reason.

Sources: a local folder (or one file), a .zip, a Google Drive share link (through gdown),
or uploaded files (Colab's upload or an ipywidgets FileUpload, see widgets.py). Each image
is checked, normalised (EXIF orientation applied, converted to 8-bit RGB, flattened on
white) and saved losslessly as ``instance_images/originals/STEM.png``. The source is never
modified. Images whose pixels are already in the session are not imported again, so
importing the same files twice adds nothing.

:func:`remove_images` takes photos out of a session again, with everything made from them
(each kept by its own module: original and preview, crop and crop record, captions, cached
measures, the import index entry); ``replace=True`` on an import removes the session's
photos once the new ones are in hand.
"""

from __future__ import annotations

import hashlib
import html
import io
import logging
import shutil
import struct
import tempfile
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from fastsd import drive, fetch
from fastsd.dataset import captions, check, crop
from fastsd.dataset import originals as originals_mod
from fastsd.dataset.originals import IMAGE_EXTS, originals, originals_dir  # noqa: F401
from fastsd.dataset.originals import write_preview
from fastsd.errors import DataError

log = logging.getLogger("fastsd")

MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit (about 89 Mpx)
MIN_SIDE = 64
MAX_ZIP_BYTES = 4 << 30  # uncompressed, all members together
MAX_ZIP_RATIO = 200  # a member this much larger than its compressed bytes is a zip bomb...
ZIP_RATIO_FROM = 16 << 20  # ...once it unpacks to more than this (photos hardly compress)
INDEX = "imports.json"  # pixel hash -> stem, in originals/
REPORT = "import_report.json"  # in outputs/
PNG_LEVEL = 3  # lossless; half the time of the default level 6 for ~15% more bytes


@dataclass
class Row:
    """What happened to one file of the source."""

    file: str
    outcome: str  # "imported", "skipped" or "duplicate"
    reason: str = ""
    name: str = ""  # the stem it has in the session
    size: tuple[int, int] | None = None  # width, height of the imported image
    kind: str = "image"  # "image", or "caption" for a .txt beside an image


@dataclass
class ImportReport:
    """One row per file; shown as a table in a notebook and as text by the CLI."""

    rows: list[Row] = field(default_factory=list)
    check: check.CheckReport | None = None  # the set check after this import

    def by(self, outcome: str, kind: str | None = "image") -> list[Row]:
        """Rows with this outcome, of this kind (None: of any kind)."""
        return [r for r in self.rows if r.outcome == outcome and kind in (None, r.kind)]

    @property
    def imported(self) -> list[Row]:
        """The images imported (captions are in ``captions``)."""
        return self.by("imported")

    @property
    def captions(self) -> list[Row]:
        return self.by("imported", "caption")

    @property
    def skipped(self) -> list[Row]:
        return self.by("skipped", None)

    def summary(self) -> str:
        return (f"{len(self.imported)} imported, {len(self.by('duplicate'))} duplicate, "
                f"{len(self.skipped)} skipped, {len(self.captions)} captions")

    def to_dicts(self) -> list[dict]:
        return [asdict(r) for r in self.rows]

    def to_text(self) -> str:
        width = max([len(r.file) for r in self.rows] + [4])
        lines = [f"{'file':<{width}}  {'outcome':<9}  {'size':<9}  reason"]
        lines += [f"{r.file:<{width}}  {r.outcome:<9}  {_size(r):<9}  {r.reason}"
                  for r in self.rows]
        lines.append(self.summary())
        if self.check is not None:
            lines.append(self.check.to_text())
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        colour = {"imported": "#1a7f37", "duplicate": "#9a6700", "skipped": "#cf222e"}
        cells = "".join(
            f"<tr><td>{html.escape(r.file)}</td><td style='color:{colour[r.outcome]}'>"
            f"{r.outcome}</td><td>{_size(r)}</td><td>{html.escape(r.name)}</td>"
            f"<td>{html.escape(r.reason)}</td></tr>" for r in self.rows)
        checked = self.check.html() if self.check is not None else ""
        return ("<table><tr><th>file</th><th>outcome</th><th>size</th><th>name</th>"
                f"<th>reason</th></tr>{cells}</table><p>{html.escape(self.summary())}</p>"
                f"{checked}")


def _size(row: Row) -> str:
    return f"{row.size[0]}x{row.size[1]}" if row.size else ""


class Skip(Exception):
    """Raised by decode_image with the reason a file is skipped."""


# What Pillow's decoders raise on damaged data (struct.error, EOFError and IndexError from
# malformed headers, SyntaxError from some plugins, OSError "image file is truncated").
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError,
                 struct.error)


# --------------------------------------------------------------------------- one image


def _heif_available() -> bool:
    try:
        import pillow_heif  # type: ignore[import-not-found]
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _to_rgb(img):
    """8-bit RGB, with alpha and palette transparency flattened on white."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        return _deep_to_rgb(np.asarray(img), None)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img.convert("RGB")  # CMYK, L, YCbCr...


# --------------------------------------------------------------------------- bit depth

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEPTHS = (8, 10, 12, 14, 16, 24, 32)  # the containers "the range actually used" picks from


def png_header(data: bytes) -> tuple[int, int, tuple[int, ...] | None] | None:
    """(bit depth, colour type, sBIT significant bits or None) of PNG data; None if not PNG."""
    if not data.startswith(PNG_SIGNATURE):
        return None
    pos, depth, colour, sbit = 8, None, None, None
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR" and len(body) >= 10:
            depth, colour = body[8], body[9]
        elif kind == b"sBIT" and body:
            sbit = tuple(body)
        elif kind in (b"IDAT", b"IEND"):
            break
        pos += 12 + length
    return None if depth is None else (depth, colour, sbit)


def white_level(samples, significant_bits: int | None = None) -> float:
    """The sample value that is white, judged by the image's real depth.

    Floats within [0, 1] are in that range; larger fractional floats (high dynamic range)
    are scaled by their brightest value. Integers: a PNG sBIT of n bits means n-bit data,
    either in the low n bits (what several tools write) or scaled up to the whole
    container as the PNG specification says, whichever the largest value shows. Without
    sBIT, the smallest common depth (8, 10, 12, 14, 16 bits...) that holds the largest
    value: an 8-bit image stored in 16 bits is not darkened, and a full-range one keeps
    its tones. The container's full range is the last resort.
    """
    import numpy as np

    top = float(np.nanmax(samples)) if samples.size else 0.0
    if samples.dtype.kind == "f":
        if top <= 1.0:
            return 1.0
        if not np.array_equal(samples, np.round(samples)):
            return top  # high dynamic range: its brightest value is white
        container = 32  # whole numbers stored as floats: judged like integers
    else:
        container = samples.dtype.itemsize * 8
    if significant_bits:
        low = float(2 ** significant_bits - 1)
        return low if top <= low else float(2 ** container - 1)
    for bits in DEPTHS:
        if top < 2 ** bits:
            return float(2 ** bits - 1)
    return top


def _deep_to_rgb(a, significant_bits: int | None, bgr: bool = False):
    """An 8-bit RGB PIL image from a deep (16/32-bit or float) array: grey (H, W), or
    (H, W, C) with C = 2 (grey + alpha), 3 (colour) or 4 (colour + alpha)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(a)
    if a.ndim == 2:
        a = a[..., None]
    colour = a[..., : 1 if a.shape[2] < 3 else 3].astype(np.float32)
    alpha = a[..., -1].astype(np.float32) if a.shape[2] in (2, 4) else None
    if bgr and colour.shape[2] == 3:
        colour = colour[..., ::-1]
    rgb = np.clip(colour / white_level(a[..., : colour.shape[2]], significant_bits), 0, 1)
    if alpha is not None:
        opacity = np.clip(alpha / white_level(a[..., -1], significant_bits), 0, 1)[..., None]
        rgb = rgb * opacity + (1.0 - opacity)  # flattened on white
    out = (rgb * 255.0 + 0.5).astype(np.uint8)
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(out), "RGB")


_ORIENT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
           6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}  # EXIF orientation -> transpose


def tiff_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a TIFF's first directory, without decoding; None if not TIFF."""
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None or len(data) < 8 or struct.unpack(order + "H", data[2:4])[0] != 42:
        return None
    pos = struct.unpack(order + "I", data[4:8])[0]
    if pos + 2 > len(data):
        return None
    size = {}
    for i in range(struct.unpack(order + "H", data[pos:pos + 2])[0]):
        entry = data[pos + 2 + 12 * i: pos + 14 + 12 * i]
        if len(entry) < 12:
            return None
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag in (256, 257):
            size[tag] = struct.unpack(order + ("H" if kind == 3 else "I"),
                                      entry[8:10] if kind == 3 else entry[8:12])[0]
    return (size[256], size[257]) if len(size) == 2 else None


def _float_tiff(data: bytes):
    """8-bit RGB from a TIFF Pillow cannot open (32-bit float colour), through OpenCV once
    its header's size is under the limit; None when it is not such a file."""
    size = tiff_size(data)
    if size is None:
        return None
    _refuse_bomb(*size)
    import cv2
    import numpy as np

    a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if a is None:
        return None
    return _refuse_small(_deep_to_rgb(a, None, bgr=True))


def _refuse_bomb(w: int, h: int) -> None:
    if w * h > MAX_PIXELS:
        raise Skip(f"decompression bomb refused without decoding: {w}x{h} is "
                   f"{w * h / 1e6:.0f} Mpx, over the {MAX_PIXELS / 1e6:.0f} Mpx limit")


def _refuse_small(img):
    if min(img.size) < MIN_SIDE:
        raise Skip(f"too small: {img.size[0]}x{img.size[1]} px (at least {MIN_SIDE} px on "
                   "each side is needed)")
    return img


def _deep_decode(data: bytes, img):
    """8-bit RGB from a file deeper than 8 bits per sample that Pillow would truncate (16-bit
    colour PNG and TIFF: Pillow keeps only the high byte); None when Pillow's own decode
    is exact."""
    png = png_header(data)
    if png is not None:
        deep = png[0] == 16
        sbit = max(png[2]) if png[2] else None
    else:
        bits = getattr(img, "tag_v2", {}).get(258, (8,)) if img.format == "TIFF" else (8,)
        deep = max(bits if isinstance(bits, tuple) else (bits,)) > 8
        sbit = None
    if not deep:
        return None
    import cv2
    import numpy as np
    from PIL import Image

    a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if a is None:  # OpenCV cannot read it: Pillow's modes I;16, I and F still can
        return None
    out = _deep_to_rgb(a, sbit, bgr=True)
    method = _ORIENT.get(img.getexif().get(0x0112, 1))
    return out.transpose(getattr(Image.Transpose, method)) if method else out


def decode_image(data: bytes, name: str):
    """Decode and normalise one image, or raise Skip with the reason."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise Skip("empty file (0 bytes)")
    ext = Path(name).suffix.lower()
    if ext in (".heic", ".heif") and not _heif_available():
        raise Skip("HEIC image: install the pillow-heif package to import it "
                   "(pip install pillow-heif), or convert it to JPEG")
    try:
        with warnings.catch_warnings():  # the size is checked below, before decoding
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        deep = _float_tiff(data)  # 32-bit float colour TIFFs, which Pillow has no mode for
        if deep is not None:
            return deep, ""
        raise Skip("not an image: Pillow cannot read this file's contents") from None
    except Image.DecompressionBombError as e:
        raise Skip(f"decompression bomb refused without decoding: {e}") from None
    _refuse_bomb(*img.size)
    try:
        frames = getattr(img, "n_frames", 1)
        img.seek(0)
        img.load()
    except DECODE_ERRORS as e:
        raise Skip(f"truncated or corrupt image ({e})") from None
    try:
        if frames > 1:
            img = img.copy()
        deep = _deep_decode(data, img)
        img = deep if deep is not None else _to_rgb(ImageOps.exif_transpose(img))
    except DECODE_ERRORS as e:
        raise Skip(f"cannot convert this image to RGB ({type(e).__name__}: {e})") from None
    return _refuse_small(img), (f"first frame of {frames}" if frames > 1 else "")


def pixel_hash(img) -> str:
    h = hashlib.sha256(f"{img.size}".encode())
    h.update(img.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- session side


def _free_stem(stem: str, taken: set[str]) -> str:
    if stem not in taken:
        return stem
    n = 2
    while f"{stem}_{n}" in taken:
        n += 1
    return f"{stem}_{n}"


def _read(display: str, path: Path) -> bytes:
    try:
        return drive.retry(path.read_bytes, f"Reading {display}")
    except PermissionError as e:
        raise Skip(f"cannot be read ({e.strerror}): check the file's permissions") from None


def import_files(session, files: Iterable[tuple[str, Path]], refused: Iterable[Row] = (),
                 check_set: bool = True, replace: bool = False) -> ImportReport:
    """Import (display name, path) pairs; the common end of every source.

    One row per pair, in the order given, after the ``refused`` rows (files a source
    already turned down, such as unsafe zip members). A ``.txt`` with the stem of an
    image among the files is that image's caption (written unless one exists). Then the
    whole set is checked (``check_set``), and the warnings are part of the report.
    ``replace``: first remove the session's photos (:func:`remove_images`), once the
    source has given at least one image file; with none, nothing is removed.
    """
    files = list(files)
    if replace:
        if not any(p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")
                   for _, p in files):
            raise DataError("The source holds no image files, so the session's photos were "
                            "kept. Give a folder, .zip or link with the new photos.")
        old = [p.stem for p in originals(session)]
        if old:
            remove_images(session, old)
            log.info("Removed the session's %d earlier photos before the import.", len(old))
    folder = drive.make_folder(originals_dir(session))
    index_path = folder / INDEX
    taken = {p.stem for p in originals(session)}
    # pixel hash -> stem; entries whose original was deleted since are forgotten.
    drive.clean_temporaries(folder)  # halves of originals a dropped Drive left behind
    index = {k: v for k, v in (drive.read_json(index_path) if index_path.is_file() else {}
                               ).items() if v in taken}
    # An original written just before a drop, whose index entry was never written: hash
    # it now, so importing the same photo again finds it instead of adding a copy.
    unindexed = taken - set(index.values())
    for p in originals(session):
        if p.stem in unindexed:
            try:
                index[pixel_hash(decode_image(drive.read_bytes(p), p.name)[0])] = p.stem
            except Skip:
                log.warning("%s is not a readable image; import it again", p.name)
    rows: dict[int, Row] = {}
    stem_of: dict[str, tuple[str, str]] = {}  # source stem -> (session stem, outcome)
    for i, (display, path) in enumerate(files):
        ext = path.suffix.lower()
        if ext == ".txt":
            continue
        if path.name.startswith("."):
            rows[i] = Row(display, "skipped", "hidden file (a system file, not a photo)")
            continue
        if ext not in IMAGE_EXTS:
            rows[i] = Row(display, "skipped", "not an image file (unknown extension "
                          f"{path.suffix or 'none'})")
            continue
        try:
            img, note = decode_image(_read(display, path), path.name)
        except Skip as e:
            rows[i] = Row(display, "skipped", str(e))
            stem_of.setdefault(path.stem, ("", "skipped"))
            continue
        digest = pixel_hash(img)
        if digest in index:
            rows[i] = Row(display, "duplicate", f"same pixels as {index[digest]}",
                          index[digest], img.size)
            stem_of.setdefault(path.stem, (index[digest], "duplicate"))
            continue
        stem = _free_stem(path.stem, taken)
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=PNG_LEVEL)
        drive.atomic_write_bytes(folder / f"{stem}.png", buf.getvalue())
        write_preview(session, stem, img)
        taken.add(stem)
        index[digest] = stem
        drive.atomic_write_json(index_path, index)
        reason = "; ".join(x for x in (note, f"saved as {stem}" if stem != path.stem else "")
                           if x)
        rows[i] = Row(display, "imported", reason, stem, img.size)
        stem_of[path.stem] = (stem, "imported")
    for i, (display, path) in enumerate(files):
        if path.suffix.lower() != ".txt":
            continue
        stem, outcome = stem_of.get(path.stem, ("", ""))
        if not stem:
            why = "its image was skipped" if outcome else f"no image named {path.stem} beside it"
            rows[i] = Row(display, "skipped", f"caption file, but {why}", kind="caption")
            continue
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if captions.write(session, stem, text):
            rows[i] = Row(display, "imported", f"caption of {stem}", stem, kind="caption")
        else:
            rows[i] = Row(display, "skipped", f"{stem} has a caption already (kept)", stem,
                          kind="caption")
    report = ImportReport([*refused, *(rows[i] for i in sorted(rows))])
    drive.atomic_write_json(session.outputs / REPORT, report.to_dicts())
    log.info("%s", report.summary())
    if check_set and originals(session):
        report.check = check.check_session(session)
    return report


def _walk(folder: Path) -> list[tuple[str, Path]]:
    return [(p.relative_to(folder).as_posix(), p)
            for p in sorted(folder.rglob("*"))
            if p.is_file() and "__MACOSX" not in p.parts]


def extract_zip(zip_path: Path, dest: Path,
                refused: list[Row] | None = None) -> list[tuple[str, Path]]:
    """Extract a zip safely: no paths outside ``dest``, no zip bombs.

    Returns (member name, extracted path) pairs; members with unsafe paths are not
    extracted and are added to ``refused`` as skipped rows.
    """
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as e:
        raise DataError(f"{zip_path.name} is not a readable zip file ({e}). Re-create the "
                        "zip, or import the folder instead.") from e
    with zf:
        # zipfile never yields more bytes than a member declares, so the declared sizes
        # bound what is written here.
        total = sum(i.file_size for i in zf.infolist())
        if total > MAX_ZIP_BYTES:
            raise DataError(f"{zip_path.name} would unpack to {total / 2**30:.1f} GiB, over "
                            f"the {MAX_ZIP_BYTES / 2**30:.0f} GiB limit. Zip fewer, smaller "
                            "photos.")
        for i in zf.infolist():
            if i.file_size > ZIP_RATIO_FROM and i.file_size > MAX_ZIP_RATIO * max(
                    i.compress_size, 1):
                raise DataError(f"{zip_path.name} looks like a zip bomb: {i.filename} unpacks "
                                f"from {i.compress_size} bytes to {i.file_size} bytes. "
                                "Nothing was extracted; zip the photos themselves.")
        out = []
        for info in zf.infolist():
            name = info.filename
            if info.is_dir() or "__MACOSX" in name:
                continue
            parts = Path(name).parts
            if name.startswith(("/", "\\")) or ".." in parts or ":" in name:
                log.warning("Skipping %s in %s: unsafe path", name, zip_path.name)
                if refused is not None:
                    refused.append(Row(name, "skipped", "unsafe path in the zip (absolute or "
                                       "with '..'): not extracted"))
                continue
            target = dest / Path(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            out.append((name, target))
    return out


# --------------------------------------------------------------------------- entry point


def import_images(session, source: str | Path | dict[str, bytes],
                  check_set: bool = True, replace: bool = False) -> ImportReport:
    """Import from a folder, one file, a .zip, a Drive share link, or {name: bytes}.

    ``check_set``: check the whole set afterwards (fastsd.dataset.check); its warnings are
    in the report. ``replace``: the session's photos are removed first, once the source
    has given image files (see :func:`import_files`)."""
    with tempfile.TemporaryDirectory(prefix="fastsd-import-") as tmp:
        tmp_path = Path(tmp)
        if isinstance(source, dict):
            for name, data in source.items():
                (tmp_path / Path(name).name).write_bytes(bytes(data))
            return import_files(session, _walk(tmp_path), check_set=check_set,
                                replace=replace)
        text = str(source)
        if text.startswith(("http://", "https://")):
            if not fetch.is_drive_link(text):
                raise DataError(f"{text} is not a Google Drive link. Download the photos and "
                                "import the folder or zip instead.")
            folder = fetch.drive_link(text, tmp_path / "download")
            files = _walk(folder)
            refused: list[Row] = []
            zips = [p for _, p in files if p.suffix.lower() == ".zip"]
            for z in zips:
                files += extract_zip(z, tmp_path / "unzipped" / z.stem, refused)
            return import_files(session, [(n, p) for n, p in files
                                          if p.suffix.lower() != ".zip"], refused, check_set,
                                replace)
        path = Path(text).expanduser()
        if not path.exists():
            raise DataError(f"{path} does not exist. Give a folder, a .zip file or a Google "
                            "Drive share link.")
        if path.is_dir():
            return import_files(session, _walk(path), check_set=check_set, replace=replace)
        if path.suffix.lower() == ".zip":
            refused = []
            files = extract_zip(path, tmp_path / "zip", refused)
            return import_files(session, files, refused, check_set, replace)
        return import_files(session, [(path.name, path)], check_set=check_set,
                            replace=replace)


# --------------------------------------------------------------------------- removing


def remove_images(session, names: Iterable[str]) -> list[str]:
    """Remove photos from the session, each named by its name in the session (``dog`` or
    ``dog.png``, as the import report and the contact sheet show it): its original and
    preview, its crop and crop record, its caption and Kosmos-2 record, its cached
    measures and its import index entry, each through the module that keeps it. Returns
    the names removed. A name the session does not have is a DataError, and then nothing
    is removed."""
    known = {p.stem for p in originals(session)} | {p.stem for p in crop.training_images(session)}
    stems, unknown = [], []
    for name in names:
        name = str(name).strip()
        if not name:
            continue
        stem = name if name in known else Path(name).stem if (
            Path(name).suffix.lower() in IMAGE_EXTS and Path(name).stem in known) else None
        (stems if stem else unknown).append(stem or name)
    if unknown:
        raise DataError(f"Session {session.name} has no photo named "
                        f"{', '.join(map(repr, unknown))}; nothing was removed. Its photos: "
                        f"{', '.join(sorted(known)) or 'none'}.")
    gone = set(stems)
    if not gone:
        return []
    originals_mod.forget(session, gone)
    crop.forget(session, gone)
    captions.forget(session, gone)
    check.forget(session, gone)
    index_path = originals_dir(session) / INDEX
    if index_path.is_file():
        index = drive.read_json(index_path)
        drive.atomic_write_json(index_path, {k: v for k, v in index.items() if v not in gone})
    log.info("Removed %d photo(s) from session %s: %s", len(gone), session.name,
             ", ".join(sorted(gone)))
    return sorted(gone)


def last_report(session) -> ImportReport | None:
    path = session.outputs / REPORT
    if not path.is_file():
        return None
    return ImportReport([Row(**{**d, "size": tuple(d["size"]) if d.get("size") else None})
                         for d in drive.read_json(path)])
