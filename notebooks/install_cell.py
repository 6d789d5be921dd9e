#@title 1. Install (seconds after the first time)
#@markdown Where fastsd comes from: a copy of its repository on your Drive, a `git+https://` URL, or a wheel. This cell is the same in every notebook (notebooks/install_cell.py).
FASTSD_SOURCE = "/content/gdrive/MyDrive/Fast-Dreambooth/fastsd"  #@param {type:"string"}
#@markdown Restart the runtime by itself when the install upgraded a package it had already loaded.
Restart_If_Needed = False  #@param {type:"boolean"}
#@markdown Tick to install fastsd again from the source after you updated it.
Update_fastsd = False  #@param {type:"boolean"}
import importlib, importlib.util, subprocess, sys
if importlib.util.find_spec("fastsd") is None or Update_fastsd:
    if FASTSD_SOURCE.startswith("/content/gdrive"):
        from google.colab import drive as _gdrive
        _gdrive.mount("/content/gdrive")
    # A regular install (not editable) is importable at once, in this same kernel.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--force-reinstall", "--no-build-isolation", FASTSD_SOURCE], check=True)
    importlib.invalidate_caches()
import logging
logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
from fastsd import deps
report = deps.install(restart=Restart_If_Needed)  # from wheels kept on Drive; built once
print(report.summary())
print(deps.format_checks(deps.doctor()))  # the environment report
