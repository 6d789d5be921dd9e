#@title 1. Install (seconds after the first time)
#@markdown Where fastsd comes from: a copy of its repository on your Drive, a `git+https://` URL, or a wheel. This cell is the same in every notebook (notebooks/install_cell.py).
FASTSD_SOURCE = "/content/gdrive/MyDrive/Fast-Dreambooth/fastsd"  #@param {type:"string"}
#@markdown Restart the runtime by itself when the install upgraded a package it had already loaded.
Restart_If_Needed = False  #@param {type:"boolean"}
#@markdown Tick to install fastsd again from the source after you updated it.
Update_fastsd = False  #@param {type:"boolean"}
import importlib, importlib.util, json, os, shutil, subprocess, sys
# Tests (and fastsd's CI) fill the form from FASTSD_FORM, as every later cell does.
FASTSD_SOURCE = json.loads(os.environ.get("FASTSD_FORM") or "{}").get("FASTSD_SOURCE", FASTSD_SOURCE)
if importlib.util.find_spec("fastsd") is None or Update_fastsd:
    if FASTSD_SOURCE.startswith("/content/gdrive"):
        from google.colab import drive as _gdrive
        _gdrive.mount("/content/gdrive")
    # A regular install (not editable) is importable at once, in this same kernel; with uv
    # (Colab has it) when there is one, pip otherwise. Never from a cached build: the
    # source may have changed since.
    _uv = shutil.which("uv") or shutil.which("uv", path=os.path.dirname(sys.executable))
    _how = ([_uv, "pip", "install", "-q", "--python", sys.executable,
             "--reinstall-package", "fastsd", "--no-cache"] if _uv else
            [sys.executable, "-m", "pip", "install", "-q", "--force-reinstall"])
    _src = FASTSD_SOURCE
    if os.path.isdir(_src):  # built from a local copy: the build writes nothing into Drive
        import tempfile
        _src = shutil.copytree(_src, os.path.join(tempfile.mkdtemp(), "fastsd"), ignore=
                               shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__"))
    if subprocess.run(_how + ["--no-deps", "--no-build-isolation", _src]).returncode:
        raise SystemExit(f"fastsd could not be installed from {FASTSD_SOURCE!r} (the installer "
                         "says why above). Set FASTSD_SOURCE to the folder holding fastsd's "
                         "setup.py, a git+https:// URL or a .whl file, and run this cell again.")
    importlib.invalidate_caches()
    for _m in [m for m in sys.modules if m == "fastsd" or m.startswith("fastsd.")]:
        del sys.modules[_m]  # an updated fastsd: the cells below import the new one
import logging
logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
from fastsd import deps
report = deps.install(restart=Restart_If_Needed)  # from wheels kept on Drive; built once
print(report.summary())
print(deps.format_checks(deps.doctor()))  # the environment report
