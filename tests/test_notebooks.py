"""The notebook runs top to bottom in a real Jupyter kernel, on the tiny models, offline.

Its Colab form fields are set the way a user would fill them in, then every cell runs
as it is. Nothing in a cell is skipped or stubbed.
"""

import ast
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PARAM = re.compile(r"^(\w+) = (.*?)\s*#@param(.*)$")


def fill_in(nb, values: dict) -> set:
    """Set the form fields named in ``values``; returns the names that were found."""
    found = set()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        lines = cell.source.splitlines()
        for i, line in enumerate(lines):
            m = PARAM.match(line)
            if m and m.group(1) in values:
                lines[i] = f"{m.group(1)} = {values[m.group(1)]!r}  #@param{m.group(3)}"
                found.add(m.group(1))
        cell.source = "\n".join(lines)
    return found


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_every_cell_is_a_form_of_valid_python(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.source.startswith("#@title "), cell.source[:40]
            ast.parse(cell.source)
            for line in cell.source.splitlines():
                if "#@param" in line:
                    assert PARAM.match(line), line


@pytest.mark.timeout(900)
def test_fast_dreambooth_runs_end_to_end(workspace, tmp_path):
    from fastsd.dataset import samples

    photos = samples.write(tmp_path / "photos", ["chelsea", "astronaut", "coffee"])
    nb = nbformat.read(NOTEBOOKS / "fast_dreambooth.ipynb", as_version=4)
    values = {"Session_Name": "nb test", "Class_Word": "cat", "Base_Model": "tiny-sd1",
              "Resolution": 64, "Source": str(photos[0].parent),
              "Caption_Model": "tiny-kosmos2", "UNet_Steps": 4, "UNet_Learning_Rate": 1e-4,
              "Text_Encoder_Steps": 2, "Text_Encoder_Learning_Rate": 5e-5,
              "Checkpoint_Every": 2, "Precision": "fp32", "Steps": 2, "Images": 1, "Seed": 7}
    assert fill_in(nb, values) == set(values)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    s = workspace / "sessions" / "nb_test"
    assert sorted(p.name for p in (s / "instance_images").glob("*.png")) == [
        "astronaut.png", "chelsea.png", "coffee.png"]
    assert len(list((s / "captions").glob("*.txt"))) == 3
    assert (s / "outputs" / "contact_sheet.png").is_file()
    assert (s / "models" / "nb_test" / "model_index.json").is_file()
    assert (s / "models" / "nb_test-fp32.safetensors").is_file()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)
    assert "Session nb_test" in text and "Single file:" in text
    # cell 7 showed an image made by the trained model, and saved it
    assert "Seed: 7," in text and "Model: nb_test," in text
    shown = [o for o in nb.cells[-1].outputs if "image/png" in o.get("data", {})]
    assert len(shown) == 1
    assert len(list((s / "outputs" / "txt2img-images").rglob("*-7.png"))) == 1
