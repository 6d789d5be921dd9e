"""`fastsd demo`: the whole main job on the tiny model, through the CLI, offline."""

import json
import os
import re
import subprocess
import sys

from PIL import Image
from safetensors import safe_open

from fastsd import cli


# What the libraries say that a user of `make demo` (or of a notebook cell) should not see:
# Python's deprecation warnings (our own calls of a deprecated API among them) and the
# libraries' log notices that fastsd.env.quiet_libraries keeps out.
CHATTER = re.compile(r"DeprecationWarning|FutureWarning|is deprecated|requires torchvision|"
                     r"should be kept in float32|gemm_4bit|^\[(transformers|diffusers)\]", re.M)


def test_demo_runs_every_step(workspace, capsys):
    # The first run as `make demo` runs it: its own process, with Python's default warning
    # filters (pytest's, which hide deprecations, are not in force there): a deprecated call
    # into diffusers or transformers (a FutureWarning) shows, as it would in a cell.
    run = subprocess.run([sys.executable, "-m", "fastsd.cli", "demo"], capture_output=True,
                         text=True, timeout=900, env={**os.environ, "FASTSD_HOME": str(workspace)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Demo finished" in run.stdout
    said = run.stdout + run.stderr
    assert CHATTER.findall(said) == [], [ln for ln in said.splitlines() if CHATTER.search(ln)]
    s = workspace / "sessions" / "demo"
    originals = sorted(p.stem for p in (s / "instance_images" / "originals").glob("*.png"))
    assert originals == ["astronaut", "chelsea", "coffee", "rocket"]
    crops = json.loads((s / "instance_images" / "crops.json").read_text())
    assert set(crops) == set(originals) and {c["size"] for c in crops.values()} == {64}
    assert sorted(p.stem for p in (s / "captions").glob("*.json")) == originals
    assert all((s / "captions" / f"{n}.txt").read_text().startswith("sks cat")
               for n in originals)
    assert (s / "models" / "demo" / "model_index.json").is_file()
    with safe_open(s / "models" / "demo.safetensors", "pt") as f:
        assert "model.diffusion_model.input_blocks.0.0.weight" in f.keys()
        assert f.metadata()["global_step"] == "6"
    assert (s / "outputs" / "loss.png").is_file()
    assert list((s / "checkpoints").iterdir()), "resumable checkpoints are kept"
    # the server answered one txt2img request on the trained model, and saved its image
    made = list((s / "outputs" / "txt2img-images").rglob("*-1.png"))
    assert len(made) == 1 and "Model: demo," in Image.open(made[0]).info["parameters"]
    # Running it again starts over cleanly.
    assert cli.main(["demo"]) == 0
