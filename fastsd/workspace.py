"""The workspace: the one folder (on Drive in Colab) that holds everything fastsd keeps.

```
WORKSPACE/
  sessions/NAME/      one folder per training session (fastsd.session)
  models/             tiny models, custom and converted models, downloads
  models/hub/         the Hugging Face cache
  wheels/             the wheelhouse the install cell fills once (fastsd.deps)
  tools/              tunnel binaries
```

On Colab the workspace is ``MyDrive/Fast-Dreambooth`` (or a Shared Drive's folder), mounted
first; elsewhere it is ``$FASTSD_HOME`` (default ``~/fastsd``). Code that needs a folder asks
a :class:`Workspace` for it, never walks up from another path.

Base models may be kept on the runtime's own disk instead of Drive (the notebook's
Use_Temp_Storage): :meth:`Workspace.on_local_disk` is the same workspace with its models/
in :func:`local_models_root`; the model resolver (:func:`fastsd.models.resolve_model`) is
the one place that picks it.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fastsd import drive, env
from fastsd.errors import DriveError

WORKSPACE_NAME = "Fast-Dreambooth"
LOCAL_MODELS_ENV = "FASTSD_LOCAL_MODELS"  # where models kept off Drive go


def local_models_root() -> Path:
    """The runtime's own disk, for models kept off Drive: ``$FASTSD_LOCAL_MODELS``, else
    ``/content/fastsd-models`` on Colab, else ``fastsd-models`` in the system's temporary
    folder. What is there goes with the runtime."""
    if os.environ.get(LOCAL_MODELS_ENV):
        return Path(os.environ[LOCAL_MODELS_ENV])
    if env.runtime() == "colab":
        return Path("/content/fastsd-models")
    return Path(tempfile.gettempdir()) / "fastsd-models"


def default_root(shared_drive: str | None = None, mount: bool = True) -> Path:
    """The workspace folder of this runtime, created if missing.

    On Colab, Drive is mounted first (when ``mount``). ``shared_drive`` names a Shared
    Drive to use instead of My Drive. Elsewhere ``$FASTSD_HOME`` is used.
    """
    if env.runtime() == "colab":
        if mount:
            drive.mount_drive()
        root = drive.COLAB_MOUNT / ("Shareddrives/" + shared_drive if shared_drive
                                    else "MyDrive")
        if not drive.retry(root.is_dir, f"Opening {root}"):
            raise DriveError(
                f"{root} does not exist. "
                + ("Check the Shared Drive's name and that this Google account can open it."
                   if shared_drive else "Run the Drive cell again to mount Google Drive.")
            )
        path = root / WORKSPACE_NAME
    else:
        path = Path(os.environ.get("FASTSD_HOME") or Path.home() / "fastsd").expanduser()
    try:
        drive.make_folder(path)
    except drive.DriveFull:
        raise
    except OSError as e:
        raise DriveError(f"Cannot create the workspace folder {path}: {e}. "
                         "Set FASTSD_HOME to a folder you can write to.") from e
    return path


@dataclass(frozen=True)
class Workspace:
    root: Path
    models_root: Path | None = None  # models/ elsewhere: the runtime's disk (on_local_disk)

    @classmethod
    def current(cls, home: "Workspace | str | os.PathLike[str] | None" = None,
                shared_drive: str | None = None, mount: bool = True) -> "Workspace":
        """``home`` as a Workspace (a folder or a Workspace), else this runtime's default."""
        if isinstance(home, Workspace):
            return home
        if home:
            return cls(Path(home).expanduser())
        return cls(default_root(shared_drive, mount))

    @property
    def sessions(self) -> Path:
        return self.root / "sessions"

    def on_local_disk(self) -> "Workspace":
        """This workspace with its models/ (downloads, Hub cache, conversions) on the
        runtime's own disk (:func:`local_models_root`) instead of Drive."""
        return dataclasses.replace(self, models_root=local_models_root())

    @property
    def models(self) -> Path:
        return self.models_root or self.root / "models"

    @property
    def hub_cache(self) -> Path:
        """The Hugging Face cache (on Drive in Colab, so a model downloads once)."""
        return self.models / "hub"

    @property
    def downloads(self) -> Path:
        """Model files fetched from links (Drive, civitai, plain HTTP)."""
        return self.models / "downloads"

    @property
    def converted(self) -> Path:
        """Diffusers folders made from single files, so each is converted once."""
        return self.models / "converted"

    @property
    def wheels(self) -> Path:
        return self.root / "wheels"

    @property
    def tools(self) -> Path:
        return self.root / "tools"
