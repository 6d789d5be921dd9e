"""Notebook widgets: uploading photos and editing captions beside their images.

On Colab the upload uses Colab's own file picker; in plain Jupyter an ipywidgets
FileUpload. Both end in fastsd.dataset.images.import_images, like every other source.
"""

from __future__ import annotations

import base64
import html
import io
import logging

from fastsd import env, options
from fastsd.dataset import captions, check, images, sheet
from fastsd.dataset.originals import originals, preview
from fastsd.errors import DataError

log = logging.getLogger("fastsd")


def uploaded_files(value) -> dict[str, bytes]:
    """{name: bytes} from a FileUpload value (ipywidgets 8: a tuple of dicts; 7: a dict)."""
    if isinstance(value, dict):
        return {name: bytes(v["content"]) for name, v in value.items()}
    return {v["name"]: bytes(v["content"]) for v in value}


def upload(session, replace: bool = False):
    """Ask the user for photos. Colab: returns the import report; Jupyter: a widget.
    ``replace``: the session's photos are removed once new ones were picked."""
    if env.runtime() == "colab":
        from google.colab import files  # type: ignore[import-not-found]

        try:
            picked = files.upload()
        except Exception as e:  # Colab's MessageError: the browser side of the upload failed
            raise DataError(f"The upload from this device did not finish ({e}). Run the cell "
                            "again; or put the photos (or a .zip) in a Drive folder and "
                            f"{options.say('source')}.") from e
        return images.import_images(session, picked, replace=replace)
    return UploadWidget(session, replace).widget


class UploadWidget:
    def __init__(self, session, replace: bool = False) -> None:
        import ipywidgets as w

        self.session, self.replace = session, replace
        self.picker = w.FileUpload(accept="image/*,.zip,.txt", multiple=True,
                                   description="Photos")
        self.button = w.Button(description="Import", button_style="primary")
        self.output = w.Output()
        self.report: images.ImportReport | None = None
        self.button.on_click(lambda _: self.run())
        self.widget = w.VBox([w.HBox([self.picker, self.button]), self.output])

    def run(self) -> images.ImportReport:
        files = uploaded_files(self.picker.value)
        self.report = images.import_images(self.session, files, replace=self.replace)
        with self.output:
            from IPython.display import display

            display(self.report)
        return self.report


def name_html(stem: str) -> str:
    """An image's name for the page, escaped: the browser draws any script."""
    return f"<div style='word-break:break-all' title='{html.escape(stem)}'>{html.escape(stem)}</div>"


def sheet_and_warnings(session, settings: check.CheckSettings | None = None):
    """The contact sheet with the set check's warnings beside it, as notebook HTML."""
    from IPython.display import HTML

    report = check.check_session(session, settings)
    img = sheet.contact_sheet(session, report=report)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode()
    return HTML("<div style='display:flex;gap:16px;align-items:flex-start'>"
                f"<img style='max-width:65%' src='data:image/png;base64,{data}'/>"
                f"<div style='flex:1'>{report.html()}</div></div>")


class CaptionEditor:
    """Each image beside its caption in a text box; Save writes the changed ones."""

    def __init__(self, session, thumb: int = 256) -> None:
        import ipywidgets as w
        from PIL import Image

        self.session = session
        self.areas: dict[str, w.Textarea] = {}
        rows = []
        for path in originals(session):
            crop = session.instance_images / f"{path.stem}.png"
            with Image.open(crop if crop.is_file() else preview(session, path)) as im:
                im = im.convert("RGB")
                im.thumbnail((thumb, thumb))
                buf = io.BytesIO()
                im.save(buf, format="PNG")
            area = w.Textarea(value=captions.read(session, path.stem) or "",
                              layout=w.Layout(width="100%", height=f"{thumb // 2}px"))
            self.areas[path.stem] = area
            rows.append(w.HBox([w.VBox([w.Image(value=buf.getvalue(), format="png",
                                                layout=w.Layout(width=f"{thumb}px")),
                                        w.HTML(name_html(path.stem))]),
                                w.VBox([area], layout=w.Layout(width="100%"))]))
        self.button = w.Button(description="Save captions", button_style="success")
        self.status = w.Label()
        self.button.on_click(lambda _: self.save())
        self.widget = w.VBox([*rows, w.HBox([self.button, self.status])])

    def save(self) -> int:
        n = 0
        for stem, area in self.areas.items():
            if area.value.strip() != (captions.read(self.session, stem) or ""):
                n += captions.write(self.session, stem, area.value, overwrite=True)
        self.status.value = f"Saved {n} caption(s)."
        return n

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
