#@title 1. Install (seconds after the first time)
#@markdown Where fastsd comes from: its repository on the web (as given), or a `.zip` of it (the code host's "Download ZIP") on your Drive, the folder holding its `setup.py`, a `git+https://` URL or a wheel. This cell is the same in every notebook (notebooks/install_cell.py).
FASTSD_SOURCE = "https://github.com/fastsd/fastsd/archive/refs/heads/main.zip"  #@param {type:"string"}
#@markdown Or tick to upload that `.zip` from this device.
Upload_Zip = False  #@param {type:"boolean"}
#@markdown Restart the runtime by itself when the install upgraded a package it had already loaded.
Restart_If_Needed = False  #@param {type:"boolean"}
#@markdown Tick to install fastsd again from the source after you updated it.
Update_fastsd = False  #@param {type:"boolean"}
import importlib, importlib.util, json, os, shutil, subprocess, sys, tempfile, zipfile
# Tests (and fastsd's CI) fill the form from FASTSD_FORM, as every later cell does.
FASTSD_SOURCE = json.loads(os.environ.get("FASTSD_FORM") or "{}").get("FASTSD_SOURCE", FASTSD_SOURCE)


class InstallFailed(Exception):
    """Shown as one message: IPython prints what _render_traceback_ returns, no traceback."""
    def _render_traceback_(self):
        return [f"InstallFailed: {self}"]


def _install(source: str) -> None:
    """Install fastsd from ``source`` (a URL, a repository .zip, a folder, a wheel), or
    from the .zip picked with Upload_Zip; InstallFailed says what was tried and what to do."""
    todo = ("What to do: for a web address, check this runtime's internet access; or "
            "download fastsd's repository as a .zip (the code host's Download ZIP), put it on "
            "your Drive and set FASTSD_SOURCE to its path, or tick Upload_Zip and pick it (a "
            "folder holding fastsd's setup.py, a git+https:// URL or a wheel work too). Then "
            "run this cell again.")
    tmp, drive = tempfile.mkdtemp(), os.environ.get("FASTSD_DRIVE_MOUNT", "/content/gdrive")
    try:
        if Upload_Zip:
            from google.colab import files
            picked = files.upload()
            if not picked:
                raise InstallFailed("No file was uploaded. " + todo)
            source = os.path.join(tmp, next(iter(picked)))
            with open(source, "wb") as f:
                f.write(next(iter(picked.values())))
        elif source.startswith(drive):
            from google.colab import drive as gdrive
            gdrive.mount(drive)
    except InstallFailed:
        raise
    except Exception as e:  # Colab's MessageError: a declined Drive, a failed upload
        raise InstallFailed(f"{'The upload' if Upload_Zip else 'Mounting Google Drive'} did "
                            f"not finish ({e}). {todo}") from None
    target = source  # what the installer gets: a URL, a wheel, or a folder with setup.py
    if source.startswith(("http://", "https://", "git+")) and not source.endswith(".whl"):
        target = f"fastsd @ {source}"
    elif not os.path.exists(source):
        raise InstallFailed(f"{source!r} does not exist. {todo}")
    elif source.lower().endswith(".zip"):
        try:
            zipfile.ZipFile(source).extractall(os.path.join(tmp, "zip"))
        except (zipfile.BadZipFile, OSError) as e:
            raise InstallFailed(f"{source!r} cannot be unpacked ({e}). {todo}") from None
        tops = [os.path.join(tmp, "zip", n) for n in os.listdir(os.path.join(tmp, "zip"))]
        found = [t for t in [os.path.join(tmp, "zip"), *tops] if os.path.isfile(
            os.path.join(t, "setup.py"))]
        if not found:
            raise InstallFailed(f"{source!r} holds no setup.py, at its top or in its top "
                                f"folder: it is not fastsd's repository. {todo}")
        target = found[0]
    elif os.path.isdir(source):  # built from a copy: the build writes nothing into Drive
        target = shutil.copytree(source, os.path.join(tmp, "fastsd"), ignore=
                                 shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__"))
    # A regular install (not editable) is importable at once, in this same kernel; with uv
    # (Colab has it) when there is one, pip otherwise. Never from a cached build: the
    # source may have changed since.
    uv = shutil.which("uv") or shutil.which("uv", path=os.path.dirname(sys.executable))
    how = ([uv, "pip", "install", "-q", "--python", sys.executable,
            "--reinstall-package", "fastsd", "--no-cache"] if uv else
           [sys.executable, "-m", "pip", "install", "-q", "--force-reinstall"])
    # The installer's output is captured: a child process's output never reaches the cell.
    done = subprocess.run(how + ["--no-deps", "--no-build-isolation", target],
                          capture_output=True, text=True)
    if done.returncode:
        said = (done.stdout + done.stderr).strip().splitlines()[-20:]
        raise InstallFailed(f"fastsd could not be installed from {source!r} with "
                            f"{'uv' if uv else 'pip'} (exit code {done.returncode}). {todo}\n"
                            "The installer said:\n" + "\n".join(said))
    importlib.invalidate_caches()
    for m in [m for m in sys.modules if m == "fastsd" or m.startswith("fastsd.")]:
        del sys.modules[m]  # an updated fastsd: the cells below import the new one


if importlib.util.find_spec("fastsd") is None or Update_fastsd or Upload_Zip:
    _install(FASTSD_SOURCE.strip())
import logging
logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
from fastsd import deps
report = deps.install(restart=Restart_If_Needed)  # from wheels kept on Drive; built once
print(report.summary())
print(deps.format_checks(deps.doctor()))  # the environment report
