"""Errors that say what happened and what to do.

Every error fastsd raises on purpose is a FastSDError. A notebook cell or the CLI shows
its message alone, without a traceback, so the message must stand on its own: the first
sentence says what happened, the rest says what to do about it.
"""


class FastSDError(Exception):
    """Base class of every error fastsd raises on purpose."""


class InvalidName(FastSDError, ValueError):
    """A session (or other) name that cannot be used as a folder name."""


class SessionNotFound(FastSDError, FileNotFoundError):
    """The session folder does not exist."""


class SessionExists(FastSDError, FileExistsError):
    """A session of that name already exists."""


class SchemaError(FastSDError):
    """session.json is unreadable, or written by a newer fastsd."""


class DriveError(FastSDError, OSError):
    """Google Drive (or the local folder standing in for it) failed us."""


class ModelError(FastSDError):
    """A model is missing, of an unknown kind, or cannot be loaded."""


class OfflineError(FastSDError):
    """Something must be downloaded but the machine is offline."""


class DataError(FastSDError, ValueError):
    """The user's data (images, captions, settings) cannot be used as given."""


class ConfirmationNeeded(FastSDError):
    """A destructive action was asked for without its confirmation."""


class OutOfMemory(FastSDError):
    """The GPU ran out of memory (training, or one generation request); the message says
    what to lower."""


class TunnelError(FastSDError):
    """No public URL could be opened, or an open one stopped answering."""


class LaunchError(FastSDError):
    """A background server (ours, AUTOMATIC1111 or Forge) did not start or stopped."""


def _notebook_handler(shell, etype, value, tb, tb_offset=None):
    """Show a FastSDError as its message in red, the traceback folded away beneath it."""
    import html
    import traceback

    from IPython.display import display

    message = str(value) or etype.__name__
    trace = "".join(traceback.format_exception(etype, value, tb))
    display({
        "text/plain": f"{etype.__name__}: {message}",
        "text/html": (
            '<div class="fastsd-error" style="color:#c62828;background:#fdecea;'
            'border-left:4px solid #c62828;padding:6px 10px;white-space:pre-wrap;'
            f'font-family:sans-serif"><b>{html.escape(etype.__name__)}:</b> '
            f"{html.escape(message)}</div>"
            '<details style="margin-top:4px"><summary>Traceback (for a bug report)</summary>'
            f"<pre>{html.escape(trace)}</pre></details>"),
    }, raw=True)
    return []


def show_in_notebook(shell=None) -> bool:
    """In an IPython kernel, show every FastSDError as its message, not a traceback.
    Called by ``import fastsd``; returns whether a kernel was found."""
    if shell is None:
        import sys

        ipython = sys.modules.get("IPython")
        shell = ipython.get_ipython() if ipython is not None else None
    if shell is None or not hasattr(shell, "kernel"):
        return False
    shell.set_custom_exc((FastSDError,), _notebook_handler)
    return True
