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


class TunnelError(FastSDError):
    """No public URL could be opened, or an open one stopped answering."""


class LaunchError(FastSDError):
    """A background server (ours, AUTOMATIC1111 or Forge) did not start or stopped."""
