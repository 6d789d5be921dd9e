"""The package as a user gets it: `python -m build` makes an sdist and, from that sdist, a
wheel; a regular (non-editable) install of that wheel creates sessions from the top-level
sessions_template/ and reads the pins from its metadata."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_sdist_builds_a_wheel_whose_install_creates_sessions_from_the_template(tmp_path):
    dist = tmp_path / "dist"
    # --no-isolation: this venv's setuptools, offline; the wheel is built from the sdist
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist),
                    str(ROOT)], check=True, capture_output=True, text=True, timeout=300)
    (sdist,), (wheel,) = dist.glob("*.tar.gz"), dist.glob("*.whl")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    template = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "sessions_template")
                      .rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert {"setup.py", "MANIFEST.in", "requirements-colab.txt", "README.md",
            *template} <= names

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--target", str(site), str(wheel)], check=True, timeout=300)
    code = ("import json, fastsd\n"
            "from fastsd import deps, session\n"
            "s = session.create('x')\n"
            "print(json.dumps({'where': fastsd.__file__, 'pins': deps.read_requirements(),\n"
            "  'files': sorted(p.relative_to(s.path).as_posix() for p in s.path.rglob('*')),\n"
            "  'readme': (s.path / 'README.txt').read_text()}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=300,
                         capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "FASTSD_HOME": str(tmp_path / "home"),
                              "PATH": "/usr/bin:/bin"})
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["where"].startswith(str(site)), "not the installed copy"
    folders = sorted(p.name for p in (ROOT / "sessions_template").iterdir()
                     if p.is_dir() and p.name != "__pycache__")
    assert got["files"] == sorted([*folders, "README.txt", "session.json"])
    assert got["readme"] == (ROOT / "sessions_template" / "README.txt").read_text()
    pins = [ln.split("#")[0].strip() for ln in
            (ROOT / "requirements-colab.txt").read_text().splitlines() if ln.split("#")[0].strip()]
    assert got["pins"] == pins
