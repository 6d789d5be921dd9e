"""Kosmos-2 captioning with grounded subject boxes.

``caption_session(session, CaptionSettings(...))`` writes captions/STEM.txt and
captions/STEM.json for a session's images and re-crops them around the subject box.
"""

from fastsd.kosmos.auto import CaptionSettings, ImageCaption, caption_session
from fastsd.kosmos.model import DEFAULT_MODEL, Captioner

__all__ = ["CaptionSettings", "Captioner", "DEFAULT_MODEL", "ImageCaption", "caption_session"]
