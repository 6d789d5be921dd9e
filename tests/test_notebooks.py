"""The notebooks, as a Colab user runs them, on the tiny models, offline.

* Every notebook is stored clean (no outputs), each code cell is a Colab form of valid
  Python with no shell magic and no ``input()``, and the install cell is the one in
  ``notebooks/install_cell.py`` (where fastsd comes from is set there, once).
* Both notebooks run top to bottom through nbval (``pytest --nbval-lax``), unchanged, in a
  kernel of a fresh Colab-like runtime (tests/colab/runtime.py: Colab's torch, ipywidgets 7
  and other preinstalls, uv), where the install cell installs fastsd as a user's does (a
  regular install, not this checkout's editable one) and its pins from a wheelhouse. The
  workspace and the tiny models are chosen by environment variables (``FASTSD_HOME``, and
  ``FASTSD_FORM``, which ``fastsd.env.form`` and the install cell read to fill each cell's
  form fields).
* Restarts: on a fresh kernel, install -> session -> convert works from the session alone;
  and install -> session -> train resumes after the kernel was killed mid-training.

Run ``python tests/test_notebooks.py`` to copy install_cell.py into every notebook.
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import queue
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from conftest import colab_module
from hubstandin import hub  # noqa: F401  (the fixture)

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
INSTALL_CELL = NOTEBOOKS / "install_cell.py"
PARAM = re.compile(r"^(\w+) = (.*?)\s*#@param(.*)$")
ALL = sorted(NOTEBOOKS.glob("*.ipynb"))


def fill_in(nb, values: dict) -> set:
    """Set the form fields named in ``values`` in a notebook read with nbformat (for the
    install cell, which runs before fastsd and its env.form exist); returns those found."""
    found = set()
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        lines = c.source.splitlines()
        for i, line in enumerate(lines):
            m = PARAM.match(line)
            if m and m.group(1) in values:
                lines[i] = f"{m.group(1)} = {values[m.group(1)]!r}  #@param{m.group(3)}"
                found.add(m.group(1))
        c.source = "\n".join(lines)
    return found


def code_cells(path: Path) -> list:
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def cell(path: Path, number: str) -> str:
    """The source of the cell whose title starts with ``number.`` (e.g. "6.")."""
    (found,) = [c.source for c in code_cells(path) if c.source.startswith(f"#@title {number} ")]
    return found


# --------------------------------------------------------------------------- static


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_every_cell_is_a_clean_form_of_valid_python(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert cells[0].source == INSTALL_CELL.read_text().rstrip("\n"), \
        "the install cell differs from notebooks/install_cell.py: run python tests/test_notebooks.py"
    for c in cells:
        assert c.outputs == [] and c.execution_count is None, "stored output: " + c.source[:40]
        assert c.source.startswith("#@title "), c.source[:40]
        tree = ast.parse(c.source)  # IPython magics (!cmd, %cd) are not Python: they fail here
        for line in c.source.splitlines():
            assert not line.lstrip().startswith(("!", "%")), line
            if "#@param" in line:
                assert PARAM.match(line), line
        calls = {n.func.id for n in ast.walk(tree)
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert not calls & {"input", "exec", "eval"}, calls
        waits = [n for n in ast.walk(tree) if isinstance(n, ast.While)]
        assert not waits, "no waiting loops in a cell"


def test_cells_never_read_a_variable_only_a_later_cell_makes():
    """Each cell runs after a restart given cells 1 and 2: the names it reads are made by
    itself, by the install or session cell, or are built in."""
    for path in ALL:
        cells = code_cells(path)
        given = set(dir(builtins))
        for c in cells[:2]:
            given |= assigned(c.source)
        for c in cells[2:]:
            tree = ast.parse(c.source)
            read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
                    and isinstance(n.ctx, ast.Load)}
            missing = read - given - assigned(c.source) - {"display", "get_ipython"}
            assert not missing, f"{path.name}: {c.source.splitlines()[0]} reads {missing}"


def assigned(source: str) -> set[str]:
    names = set()
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            names.add(n.id)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in n.names}
        elif isinstance(n, (ast.FunctionDef, ast.ClassDef)):
            names.add(n.name)
        elif isinstance(n, ast.arg):
            names.add(n.arg)
    return names


# --------------------------------------------------------------------------- runs

TRAIN = {"UNet_Steps": 4, "UNet_Learning_Rate": 1e-4, "Text_Encoder_Steps": 2,
         "Text_Encoder_Learning_Rate": 5e-5, "Checkpoint_Every": 2, "GPU_Preset": "cpu",
         "Sample_Every": 3, "Sample_Prompts": "a photo of sks cat; sks cat on a rug"}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def form(photos: Path, **more) -> dict:
    """What a CI run types into the forms: the tiny models, few steps, small images, and
    the web UI on this machine only (no tunnel), on a free port."""
    return {"Session_Name": "nb test", "Class_Word": "cat", "Resolution": 64,
            "Base_Model": "tiny-sd1", "Source": str(photos), "Caption_Model": "tiny-kosmos2",
            **TRAIN, "Precision": "fp32", "Steps": 2, "Images": 1, "Seed": 7,
            "Tunnel": "none", "Port": free_port(), "Password": "nb-secret-1234",
            "Launch_Web_UI": False, **more}


def kernel_env(home: Path, values: dict) -> dict:
    return {**os.environ, "FASTSD_HOME": str(home), "FASTSD_FORM": json.dumps(values),
            "FASTSD_RUN_DIR": str(home / "run"), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1"}


COLAB_KERNEL = "colab-runtime"


@pytest.fixture(scope="module")
def colab_kernel(tmp_path_factory) -> dict:
    """A fresh Colab-like runtime with a Jupyter kernel named COLAB_KERNEL; returns the
    environment that finds it (JUPYTER_PATH). fastsd is not installed in it: the notebook's
    install cell does that, from FASTSD_SOURCE, a copy of this checkout."""
    runtime = colab_module("runtime")
    folder = tmp_path_factory.mktemp("colab-runtime")
    python = runtime.fresh(folder / "venv", with_uv=True)
    source = runtime.source_copy(folder / "fastsd-source")
    # Not this checkout's venv: the kernel's PATH has no .venv/bin in it.
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p != str(Path(sys.executable).parent))
    jupyter = runtime.kernelspec(folder / "jupyter", python, {"PATH": path}, COLAB_KERNEL)
    return {"JUPYTER_PATH": str(jupyter), "source": str(source), "python": python}


def wheels_cache() -> Path:
    """Wheelhouses kept between test runs, as a user's Drive keeps them between runtimes."""
    return colab_module("runtime").cache_dir() / "workspace-wheels"


def lend_wheels(home: Path) -> None:
    """Put the kept wheelhouses into ``home`` (links, or copies across file systems)."""
    import shutil

    if wheels_cache().is_dir():
        def link(src, dst):
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        shutil.copytree(wheels_cache(), home / "wheels", copy_function=link,
                        dirs_exist_ok=True)


def keep_wheels(home: Path) -> None:
    """Keep any wheelhouse the install cell built in ``home`` for the next test run."""
    import shutil

    for house in (home / "wheels").glob("*/manifest.json"):
        dest = wheels_cache() / house.parent.name
        if not dest.exists():
            tmp = wheels_cache() / f".{house.parent.name}-{os.getpid()}"
            shutil.copytree(house.parent, tmp)
            os.replace(tmp, dest)


def colab_env(home: Path, values: dict, kernel: dict) -> dict:
    """kernel_env for the Colab-like runtime: the install cell's source in the form, and
    the kernel found on JUPYTER_PATH."""
    return {**kernel_env(home, {"FASTSD_SOURCE": kernel["source"], **values}),
            "JUPYTER_PATH": kernel["JUPYTER_PATH"]}


def nbval(notebook: str, env: dict, kernel: str | None = None) -> None:
    """``pytest --nbval-lax`` on one notebook: every cell must run without an error."""
    named = [f"--nbval-kernel-name={kernel}"] if kernel else []
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "--nbval-lax", "--nbval-cell-timeout=600", *named,
                          str(NOTEBOOKS / notebook)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert re.search(r"\b(\d+) passed\b", res.stdout).group(1) == str(
        len(code_cells(NOTEBOOKS / notebook)))


def serving(env: dict, port: int, password: str, tries: int = 240) -> str:
    """The status our web UI answers on ``port`` with the password (after it loaded, for up
    to ``tries`` half seconds) and without it, then stop it as a user's Stop cell would."""
    code = (f"from fastsd.webui import background, start\n"
            f"url = 'http://127.0.0.1:{port}' + background.HEALTH_PATH\n"
            f"import time\n"
            f"for _ in range({tries}):\n"
            f"    status = background.answers(url, ('fastsd', {password!r}))\n"
            f"    if status == 200: break\n"
            f"    time.sleep(0.5)\n"
            f"print('STATUS', status, background.answers(url, ('fastsd', 'wrong')))\n"
            f"if status == 200:\n"
            f"    import requests\n"
            f"    print('MODEL', requests.get('http://127.0.0.1:{port}/sdapi/v1/options', "
            f"auth=('fastsd', {password!r}), timeout=30).json()['sd_model_checkpoint'])\n"
            f"print('STOPPED', start.stop())\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    return res.stdout


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    from fastsd.dataset import samples

    folder = tmp_path_factory.mktemp("photos")
    samples.write(folder, ["chelsea", "astronaut", "coffee"])
    return folder


@pytest.fixture(scope="module")
def ran(tmp_path_factory, photos, colab_kernel) -> Path:
    """fast_dreambooth.ipynb run top to bottom by nbval in the Colab-like runtime, the web
    UI launched by cell 7; returns the workspace."""
    home = tmp_path_factory.mktemp("nbval-home")
    lend_wheels(home)
    values = form(photos, Launch_Web_UI=True)
    env = colab_env(home, values, colab_kernel)
    try:
        nbval("fast_dreambooth.ipynb", env, COLAB_KERNEL)
    finally:
        home.joinpath("serving.txt").write_text(serving(env, values["Port"],
                                                        values["Password"]))
        keep_wheels(home)
    return home


@pytest.mark.timeout(1500)
def test_fast_dreambooth_runs_top_to_bottom_under_nbval(ran, colab_kernel):
    # The install cell installed fastsd into the runtime as a user's runs it: a regular
    # install, with the files a session needs shipped inside the package.
    where = subprocess.run([str(colab_kernel["python"]), "-c", "import fastsd; print("
                            "fastsd.__file__)"], capture_output=True, text=True, check=True,
                           cwd=colab_kernel["python"].parent)
    assert "site-packages" in where.stdout, where.stdout
    s = ran / "sessions" / "nb_test"
    # the session was made from the top-level sessions_template/, shipped in the wheel
    template = REPO / "sessions_template"
    assert (s / "README.txt").read_text() == (template / "README.txt").read_text()
    assert {p.name for p in template.iterdir() if p.is_dir() and p.name != "__pycache__"} <= \
        {p.name for p in s.iterdir() if p.is_dir()}
    assert not [p for p in s.rglob("*") if p.name in (".keep", "__init__.py")]
    settings = json.loads((s / "session.json").read_text())["settings"]
    assert settings["base_model"] == "tiny-sd1" and settings["class_word"] == "cat"
    assert settings["resolution"] == 64
    assert sorted(p.name for p in (s / "instance_images").glob("*.png")) == [
        "astronaut.png", "chelsea.png", "coffee.png"]
    assert len(list((s / "captions").glob("*.txt"))) == 3
    assert (s / "outputs" / "contact_sheet.png").is_file()
    assert (s / "models" / "nb_test" / "model_index.json").is_file()
    assert (s / "models" / "nb_test-fp32.safetensors").is_file()
    assert sorted(p.name for p in (s / "outputs" / "samples").glob("*.png")) == [
        f"step-000000{n}-{i}.png" for n in (3, 6) for i in (0, 1)]  # two prompts, every 3
    assert (s / "outputs" / "loss.png").is_file()
    assert len(list((s / "outputs" / "txt2img-images").rglob("*-7.png"))) == 1
    # cell 7 launched the web UI on the trained model, behind the password
    status, model, stopped = (ran / "serving.txt").read_text().splitlines()
    assert status == "STATUS 200 401" and model.startswith("MODEL nb_test"), model
    assert stopped == "STOPPED True" and (s / "logs" / "webui.log").is_file()


@pytest.mark.timeout(900)
def test_webui_notebook_runs_under_nbval(ran, colab_kernel):
    """webui.ipynb on the session fast_dreambooth.ipynb trained: the session's model, the
    ControlNets of its family listed, our UI launched without a tunnel, then stopped."""
    values = {"Session": "nb_test", "Tunnel": "none", "Port": free_port(),
              "Password": "nb-secret-5678", "ControlNets": ""}
    env = colab_env(ran, values, colab_kernel)
    log = ran / "sessions" / "nb_test" / "logs" / "webui.log"
    before = log.stat().st_mtime_ns
    try:
        nbval("webui.ipynb", env, COLAB_KERNEL)
    finally:
        out = serving(env, values["Port"], values["Password"], tries=1)
    # the launch cell started it (its log was written again); the Stop cell stopped it
    assert log.stat().st_mtime_ns > before
    assert out.splitlines() == ["STATUS None None", "STOPPED False"]


# --------------------------------------------------------------------------- restarts


class Kernel:
    """A real Jupyter kernel that runs cells as their source text."""

    def __init__(self, env: dict, cwd: Path):
        from jupyter_client.manager import start_new_kernel

        self.km, self.kc = start_new_kernel(kernel_name="python3", env=env, cwd=str(cwd))
        self.text = ""

    def start(self, code: str) -> str:
        return self.kc.execute(code)

    def wait(self, msg_id: str, timeout: float = 600, until=None) -> dict | None:
        """Collect the cell's output until it ends (its reply), or until ``until()``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if until is not None and until():
                return None
            try:
                msg = self.kc.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                self.text += content["text"]
            elif kind in ("display_data", "execute_result"):
                shown = "[image/png]" if "image/png" in content["data"] else \
                    content["data"].get("text/plain", "")
                self.text += shown + "\n"
            elif kind == "error":
                self.text += "\n".join(content["traceback"])
            elif kind == "status" and content["execution_state"] == "idle":
                reply = self.kc.get_shell_msg(timeout=60)
                return reply["content"]
        raise AssertionError(f"the cell did not finish in {timeout}s:\n{self.text[-3000:]}")

    def run(self, code: str, timeout: float = 600) -> None:
        reply = self.wait(self.start(code), timeout)
        assert reply["status"] == "ok", self.text[-4000:]

    def kill(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)  # SIGKILL: a runtime that dies


NB = NOTEBOOKS / "fast_dreambooth.ipynb"


def kill_training(home: Path) -> int:
    """SIGKILL the process groups of `fastsd train` children working in ``home``."""
    import signal

    groups = set()
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train" in argv and str(home).encode() in argv and b"fastsd.cli" in argv:
            groups.add(os.getpgid(int(proc.name)))
    for g in groups:
        os.killpg(g, signal.SIGKILL)
    return len(groups)


@pytest.mark.timeout(1500)
def test_convert_and_upload_run_on_a_fresh_kernel_from_the_session_alone(ran, photos, tmp_path,
                                                                        hub):
    """Install -> session -> convert -> upload, in a new kernel: no variable of the train
    cell is needed. The upload goes through huggingface_hub to the Hub stand-in."""
    models = ran / "sessions" / "nb_test" / "models"
    (models / "nb_test-fp32.safetensors").unlink()
    env = {**kernel_env(ran, form(photos, Format="ckpt", Hub_Repo="me/nb-test")),
           "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
           "HF_TOKEN": "hf_notebooktoken123"}
    k = Kernel(env, tmp_path)
    try:
        for n in ("1.", "2.", "8.", "9."):
            k.run(cell(NB, n))
    finally:
        k.kill()
    assert "Loaded session nb_test" in k.text and f"Single file: {models}/nb_test-fp32.ckpt" \
        in k.text
    assert (models / "nb_test-fp32.ckpt").stat().st_size > 0
    assert "Uploaded: " in k.text and hub.private["me/nb-test"] is True
    sent = hub.repos["me/nb-test"]
    assert "model_index.json" in sent and "nb_test.safetensors" in sent and "README.md" in sent
    assert "hf_notebooktoken123" not in k.text


@pytest.mark.timeout(1500)
def test_training_resumes_after_the_kernel_is_killed_mid_training(ran, workspace, photos,
                                                                  tmp_path):
    """install -> session -> train, the runtime killed mid-training (kernel and training
    child), then install -> session -> train with Resume on a new kernel. The session is a
    copy of the notebook run's photos and captions, so cells 3 to 5 need not run again."""
    import shutil

    src, dst = ran / "sessions" / "nb_test", workspace / "sessions" / "resume"
    dst.mkdir(parents=True)
    for part in ("session.json", "instance_images", "captions"):
        (shutil.copytree if (src / part).is_dir() else shutil.copy)(src / part, dst / part)
    (workspace / "models").mkdir()
    (workspace / "models" / "tiny-sd1").symlink_to(ran / "models" / "tiny-sd1")
    values = form(photos, Session_Name="resume", UNet_Steps=20, Checkpoint_Every=2,
                  Sample_Every=10)
    k = Kernel(kernel_env(workspace, values), tmp_path)
    ckpts = dst / "checkpoints"
    try:
        for n in ("1.", "2."):
            k.run(cell(NB, n))
        first = lambda: any(ckpts.glob("step-*/manifest.json"))  # noqa: E731  (a whole one)
        reply = k.wait(k.start(cell(NB, "6.")), timeout=600, until=first)
        assert reply is None, "training ended before it could be killed: " + k.text[-2000:]
    finally:
        k.kill()
        killed = kill_training(workspace)  # the runtime died: its training child with it
    assert killed, "the train cell ran no training child"
    assert not (dst / "models" / "resume").exists()

    k = Kernel(kernel_env(workspace, {**values, "Resume": True}), tmp_path)
    try:
        for n in ("1.", "2.", "6."):
            k.run(cell(NB, n))
    finally:
        k.kill()
    assert "Resuming from step-" in k.text, k.text[-3000:]
    assert (dst / "models" / "resume" / "model_index.json").is_file()
    assert json.loads((dst / "session.json").read_text())["settings"]["train"]["unet_steps"] == 20
    # the samples were shown in the cell as the child made them, then the loss curve
    shown = re.findall(r"samples at step (\d+): ", k.text)
    assert shown[-1] == "20" and "step-0000020-0.png, step-0000020-1.png" in k.text
    assert k.text.count("[image/png]") == 2 * len(shown) + 1, k.text[-3000:]

    # A caption changed since the checkpoints: Resume is refused with what to tick; ticking
    # Accept_Changed_Photos goes on with the new caption.
    caption = next((dst / "captions").glob("*.txt"))
    caption.write_text(caption.read_text() + ", on a rug")
    longer = {**values, "Resume": True, "Text_Encoder_Steps": 4}  # the last stage, longer
    k = Kernel(kernel_env(workspace, longer), tmp_path)
    try:
        for n in ("1.", "2."):
            k.run(cell(NB, n))
        reply = k.wait(k.start(cell(NB, "6.")))
        assert reply["status"] == "error" and "tick Accept_Changed_Photos" in k.text, k.text[-2000:]
        ticked = cell(NB, "6.").replace("Accept_Changed_Photos = False",
                                        "Accept_Changed_Photos = True")  # as the box does
        k.run(ticked)
    finally:
        k.kill()
    assert "Going on with changed training images or captions" in k.text, k.text[-3000:]
    assert json.loads((dst / "session.json").read_text())["settings"]["train"]["text_steps"] == 4


def sync() -> None:
    """Copy notebooks/install_cell.py into the install cell of every notebook."""
    text = INSTALL_CELL.read_text().rstrip("\n")
    for path in ALL:
        nb = nbformat.read(path, as_version=4)
        first = next(c for c in nb.cells if c.cell_type == "code")
        first.source = text
        nbformat.write(nb, path)
        print("updated", path.name)


if __name__ == "__main__":
    sync()
