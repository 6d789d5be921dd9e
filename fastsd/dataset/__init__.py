"""Instance images: import, validation, smart crop, captions, contact sheet."""
