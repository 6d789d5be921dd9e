"""The install cell: warm set-up (filled Drive wheelhouse, package index unreachable) against
cold (every dependency from the index), each into a fresh Colab-like runtime
(tests/colab/runtime.py: torch 2.13.0+cpu and Colab's other preinstalls). Target: warm at
most 0.3x cold.

Where the ratio comes from: the warm runtime resolves nothing against the index and downloads
nothing; it installs the wheels kept on Drive with ``--no-index``. Both sides run the same
notebook cell in the same image with uv (as Colab has it); only the wheelhouse (and the
index) differ. The cold side has no pip cache, as a fresh Colab runtime has none.

Run: .venv/bin/python benchmarks/bench_install.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Row, write_result

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "colab"))
sys.path.insert(0, str(ROOT / "tests"))

import runtime  # noqa: E402  (tests/colab is not a package)


def install_cell(source: Path) -> str:
    import nbformat
    from test_notebooks import NOTEBOOKS, fill_in

    nb = nbformat.read(NOTEBOOKS / "fast_dreambooth.ipynb", as_version=4)
    fill_in(nb, {"FASTSD_SOURCE": str(source)})
    return nb.cells[1].source


def timed(python: Path, code: str, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([str(python), "-c", code], check=True, env=env, cwd=python.parent)
    return time.perf_counter() - start


def check(python: Path, env: dict) -> None:
    """Every pin is installed and fastsd imports: the set-up is whole."""
    subprocess.run([str(python), "-c", "import fastsd, diffusers\nfrom fastsd import deps\n"
                    "assert deps.missing(deps.read_requirements()) == [], "
                    "deps.missing(deps.read_requirements())"], check=True, env=env)


def main() -> None:
    runtime.image()  # built once, outside the timings
    cold_s, warm_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = runtime.source_copy(tmp / "fastsd-src")
        cell = install_cell(source)
        for i in range(2):
            # The same cell on both sides, each in a fresh runtime with uv (as Colab has);
            # only the wheelhouse differs: cold finds none (and the index), warm finds the
            # one cold left on "Drive" (and no index).
            base = {**os.environ, "FASTSD_HOME": str(tmp / f"drive{i}"), "PIP_NO_CACHE_DIR": "1"}
            py = runtime.fresh(tmp / f"rt-cold{i}", with_uv=True)
            cold_s.append(timed(py, cell, base))
            check(py, base)
            shutil.rmtree(tmp / f"rt-cold{i}")

            py = runtime.fresh(tmp / f"rt-warm{i}", with_uv=True)
            env = runtime.offline_env(base)
            warm_s.append(timed(py, cell, env))
            check(py, env)
            shutil.rmtree(tmp / f"rt-warm{i}")
    cold, warm = min(cold_s), min(warm_s)
    ratio = warm / cold
    write_result("install", "Install cell: warm (Drive wheelhouse, no index) vs cold (index)", [
        Row("install cell into a fresh Colab-like runtime", "s", round(warm, 1), round(cold, 1),
            target="warm <= 0.3x cold", higher_is_better=False, passed=ratio <= 0.3)],
        command=".venv/bin/python benchmarks/bench_install.py",
        notes=(f"Best of 2 alternating runs per side (cold {', '.join(f'{x:.1f}' for x in cold_s)}"
               f" s; warm {', '.join(f'{x:.1f}' for x in warm_s)} s). Both sides run the "
               "notebook's install cell as it is, in a fresh copy of the same Colab-like image "
               "(torch 2.13.0+cpu, Colab's preinstalls, uv), on a 2-core machine shared with "
               "other jobs. The one difference: cold starts with an empty wheelhouse and the "
               "package index reachable (no pip cache), so it resolves the pins, downloads the "
               "10 missing wheels and keeps them; warm finds that wheelhouse and the index at a "
               "closed localhost port, so it only installs. The ratio comes from skipping the "
               "resolve and the downloads. Both include the cell's fastsd install and its "
               "`fastsd doctor` report."))


if __name__ == "__main__":
    main()
