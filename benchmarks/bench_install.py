"""The install cell: warm set-up (filled Drive wheelhouse, package index unreachable) against
cold (every dependency from the index), each into a fresh Colab-like runtime
(tests/colab/runtime.py: torch 2.13.0+cpu and Colab's other preinstalls). Target: warm at
most 0.3x cold.

Where the ratio comes from: the warm runtime resolves nothing against the index and downloads
nothing; it installs the wheels kept on Drive with ``--no-index`` (uv when present, pip
here). Both sides install the same pins into the same image and run the same notebook cell
text; only the wheelhouse (and the index) differ. The cold side has no pip cache, as a fresh
Colab runtime has none.

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
    subprocess.run([str(python), "-c", "import fastsd, diffusers\nfrom fastsd import deps\n"
                    "assert deps.missing(deps.read_requirements()) == [], "
                    "deps.missing(deps.read_requirements())"], check=True, env=env)


def main() -> None:
    runtime.image()  # built once, outside the timings
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = runtime.source_copy(tmp / "fastsd-src")
        cell = install_cell(source)
        base = {k: v for k, v in os.environ.items()}
        base.update(FASTSD_HOME=str(tmp / "drive"), PIP_NO_CACHE_DIR="1")
        # Fill the wheelhouse (a first runtime; not timed).
        py = runtime.fresh(tmp / "rt-fill")
        subprocess.run([str(py), "-c", cell], check=True, env=base, cwd=tmp)
        shutil.rmtree(tmp / "rt-fill")

        cold_s, warm_s = [], []
        for i in range(2):  # alternate the sides
            py = runtime.fresh(tmp / f"rt-cold{i}")
            cold_s.append(timed(py, (
                "import subprocess, sys\n"
                f"subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', "
                f"'--no-build-isolation', {str(source)!r}], check=True)"), base))
            check(py, base)
            shutil.rmtree(tmp / f"rt-cold{i}")

            py = runtime.fresh(tmp / f"rt-warm{i}")
            env = runtime.offline_env(base)
            warm_s.append(timed(py, cell, env))
            check(py, env)
            shutil.rmtree(tmp / f"rt-warm{i}")
    cold, warm = min(cold_s), min(warm_s)
    ratio = warm / cold
    write_result("install", "Install cell: warm (Drive wheelhouse, no index) vs cold (index)", [
        Row("set-up time into a fresh Colab-like runtime", "s", round(warm, 1), round(cold, 1),
            target="warm <= 0.3x cold", higher_is_better=False, passed=ratio <= 0.3)],
        command=".venv/bin/python benchmarks/bench_install.py",
        notes=(f"Best of 2 alternating runs per side (cold {', '.join(f'{x:.1f}' for x in cold_s)} s;"
               f" warm {', '.join(f'{x:.1f}' for x in warm_s)} s). Cold: `pip install` of the "
               "fastsd folder, its pins from the index, no pip cache. Warm: the notebook's "
               "install cell with the wheelhouse filled by an earlier runtime and the index at "
               "a closed localhost port; it includes the cell's own `fastsd doctor` report. "
               "Both: the same image (torch 2.13.0+cpu, Colab's preinstalls), the same pins."))


if __name__ == "__main__":
    main()
