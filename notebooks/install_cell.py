#@title 1. Install (seconds after the first time)
#@markdown Where fastsd comes from: a copy of its repository on your Drive, a `git+https://` URL, or a wheel. This cell is the same in every notebook (notebooks/install_cell.py).
FASTSD_SOURCE = "/content/gdrive/MyDrive/Fast-Dreambooth/fastsd"  #@param {type:"string"}
import importlib.util, subprocess, sys
if importlib.util.find_spec("fastsd") is None:
    if FASTSD_SOURCE.startswith("/content/gdrive"):
        from google.colab import drive as _gdrive
        _gdrive.mount("/content/gdrive")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", FASTSD_SOURCE], check=True)
    importlib.invalidate_caches()
import logging
logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
from fastsd import deps, env
from fastsd.workspace import Workspace
report = deps.install()  # from the wheels kept on Drive; builds them the first time only
print("Installed from", report.wheelhouse if report.installed else "(already installed)")
for key, value in env.report(Workspace.current().root).items():
    print(f"{key:>14}: {value}")
