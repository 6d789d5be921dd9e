"""`fastsd demo`: the whole main job on the tiny model, through the CLI, offline."""

import json

from PIL import Image
from safetensors import safe_open

from fastsd import cli


def test_demo_runs_every_step(workspace, capsys):
    assert cli.main(["demo"]) == 0
    assert "Demo finished" in capsys.readouterr().out
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
