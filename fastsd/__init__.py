"""fastsd: DreamBooth fine-tuning of Stable Diffusion from a Colab or Jupyter notebook.

Importing fastsd is instant: torch, diffusers and transformers are imported only by the
functions that need them. In a notebook kernel it shows each FastSDError as its message;
everywhere it keeps the libraries' log notices to errors (fastsd.env.quiet_libraries).

The package is in layers, each importing only from those below it (ARCHITECTURE.md):
errors, env -> drive -> workspace -> session, fetch, deps -> cli_common -> convert ->
models -> dataset -> kosmos -> train -> tunnel -> webui -> demo -> cli.
"""

__version__ = "0.1.0"

import os as _os

# Exact resume on a CPU: without it, Intel MKL may take another code path for a tensor
# that lies at another memory alignment (a weight or optimizer state loaded from a
# checkpoint), and a resumed run drifts from an uninterrupted one in the last bits. MKL
# reads this when it loads, so it is set before torch is imported; a value the user set
# is kept.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from fastsd.env import quiet_libraries  # noqa: E402
from fastsd.errors import FastSDError, show_in_notebook  # noqa: E402,F401

show_in_notebook()
quiet_libraries()
