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
* The forms' own defaults (only the session name changed), on the Colab stand-in in a
  kernel of this checkout's venv, offline up to the first download: each cell run first
  in a new runtime says which cell to run, and the session holds what the forms show.

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


def test_each_cell_reads_only_names_it_makes_itself():
    """Any cell can run first after a restart: each reads only what it makes itself (its
    form fields, its imports, what it asks fastsd for, such as session.current()) or
    builtins; never a variable of an earlier cell, which a restart has wiped."""
    for path in ALL:
        for c in code_cells(path):
            tree = ast.parse(c.source)
            read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
                    and isinstance(n.ctx, ast.Load)}
            missing = read - set(dir(builtins)) - assigned(c.source) - {"display", "get_ipython"}
            assert not missing, f"{path.name}: {c.source.splitlines()[0]} reads {missing}"


def form_defaults(path: Path) -> dict:
    """Every form field of a notebook with the value it is stored with."""
    return {m.group(1): ast.literal_eval(m.group(2)) for c in code_cells(path)
            for m in map(PARAM.match, c.source.splitlines()) if m}


def test_form_defaults_are_the_packages_defaults():
    """A form's fields are literal values (Colab shows them as typed): those that stand for a
    default of the package hold that default, so it is set in one place, the package."""
    import inspect

    from fastsd import session
    from fastsd.train import TrainSettings
    from fastsd.webui import auth
    from fastsd.webui.server import with_session_lora

    t = TrainSettings()
    train = form_defaults(NOTEBOOKS / "fast_dreambooth.ipynb")
    webui = form_defaults(NOTEBOOKS / "webui.ipynb")
    for rate in ("UNet_Learning_Rate", "Text_Encoder_Learning_Rate"):
        train[rate] = train[rate] or None  # the cell's "0 = the method's own rate"
    checks = [
        (train, "UNet_Steps", t.unet_steps), (train, "Text_Encoder_Steps", t.text_steps),
        (train, "UNet_Learning_Rate", t.unet_lr), (train, "Text_Encoder_Learning_Rate", t.text_lr),
        (train, "Method", t.method), (train, "LoRA_Rank", t.rank), (train, "LoRA_Alpha", t.alpha),
        (train, "LoRA_Weight", inspect.signature(with_session_lora).parameters["weight"].default),
        (train, "Checkpoint_Every", t.checkpoint_every), (train, "Sample_Every", t.sample_every),
        (train, "Flip_Images", t.flip), (train, "GPU_Preset", t.preset),
        (train, "Offset_Noise", t.offset_noise),
        (train, "Prior_Preservation", t.prior_preservation),
        (train, "Class_Images", t.class_images), (train, "Class_Prompt", t.class_prompt),
        (train, "Prior_Weight", t.prior_weight),
        (train, "Save_Single_File_Every", t.save_every),
        (train, "Start_Saving_From_Step", t.save_from),
        (train, "Instance_Token", session.DEFAULT_SETTINGS["instance_token"]),
        (train, "Class_Word", session.DEFAULT_SETTINGS["class_word"]),
        (train, "Resolution", session.DEFAULT_SETTINGS["resolution"]),
        (train, "Port", auth.DEFAULT_PORT), (webui, "Port", auth.DEFAULT_PORT),
        (webui, "User", auth.DEFAULT_USER),
    ]
    differ = [(name, form[name], want) for form, name, want in checks if form[name] != want]
    assert not differ, f"form field, its value, the package's default: {differ}"


def test_the_ngrok_token_field_only_goes_to_the_web_ui_start():
    """Ngrok_Token is read only as start.start's ngrok_token (which puts it where the ngrok
    tunnel reads it, never into the output): no cell prints or shows it."""
    for path, number in ((NB, 7), (WEBUI, 4)):
        tree = ast.parse(cell(path, f"{number}."))
        uses = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == "Ngrok_Token"
                and isinstance(n.ctx, ast.Load)]
        passed = {id(n) for c in ast.walk(tree) if isinstance(c, ast.Call)
                  and getattr(c.func, "attr", "") == "start"
                  for kw in c.keywords if kw.arg == "ngrok_token" for n in ast.walk(kw.value)}
        assert uses and all(id(u) in passed for u in uses), (path.name, number)


def test_the_options_table_names_real_cells_fields_and_flags():
    """fastsd.options, which messages use to name what to set, agrees with the notebooks
    (each cell's title, each field a form field of that cell) and with the CLI's parser."""
    import argparse

    from fastsd import options
    from fastsd.cli import build_parser

    def parser_of(command: str):
        parser = build_parser()
        words = command.split("--")[0].split()[1:]  # the subcommands, then its arguments
        for word in [w for w in words if not w.isupper()]:
            (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
            parser = sub.choices[word]
        return parser

    for name, titles in options.CELLS.items():
        heads = [c.source.splitlines()[0] for c in code_cells(NOTEBOOKS / name)]
        assert len(heads) == len(titles)
        for number, (head, title) in enumerate(zip(heads, titles), start=1):
            assert head.startswith(f"#@title {number}. {title}"), head
    for key, o in options.OPTIONS.items():
        for nb, number, field in o.fields + ((o.preset[:3],) if o.preset else ()):
            assert field in defaults(NOTEBOOKS / nb, number), (key, nb, number, field)
        if o.flag:
            assert o.flag in parser_of(o.command)._option_string_actions, (key, o.flag)
    for command, _ in options.STEPS.values():
        parser_of(command)


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
        elif isinstance(n, ast.ExceptHandler) and n.name:
            names.add(n.name)
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
    code = (f"from fastsd.webui import process, start\n"
            f"url = 'http://127.0.0.1:{port}' + process.HEALTH_PATH\n"
            f"import time\n"
            f"for _ in range({tries}):\n"
            f"    status = process.answers(url, ('fastsd', {password!r}))\n"
            f"    if status == 200: break\n"
            f"    time.sleep(0.5)\n"
            f"print('STATUS', status, process.answers(url, ('fastsd', 'wrong')))\n"
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
    values = form(photos, Launch_Web_UI=True, Offset_Noise=0.05, Save_Single_File_Every=3,
                  Disconnect_After_Training=True)  # (not Colab: one line, nothing else)
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
    assert sorted(p.name for p in (s / "models").glob("nb_test-step*.safetensors")) == [
        "nb_test-step3.safetensors", "nb_test-step6.safetensors"]  # Save_Single_File_Every
    assert settings["train"]["offset_noise"] == 0.05
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
        self.outputs: list[tuple[str, dict]] = []  # (message type, content), all cells

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
            if kind in ("stream", "display_data", "execute_result", "error"):
                self.outputs.append((kind, content))
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


# --------------------------------------------------------------------------- the forms' defaults

WEBUI = NOTEBOOKS / "webui.ipynb"


def defaults(path: Path, number: int) -> dict:
    """The form fields of cell ``number`` with the values the notebook gives them."""
    return {m.group(1): ast.literal_eval(m.group(2)) for line in
            cell(path, f"{number}.").splitlines() if (m := PARAM.match(line))}


@pytest.fixture(scope="module")
def standin(tmp_path_factory, photos):
    """A Jupyter kernel of this checkout's venv on the Colab stand-in (tests/colab): Drive a
    FUSE passthrough of a local folder, the upload picking ``photos``, offline. The forms
    keep their own values but for the session name. Yields (kernel, Drive's folder)."""
    from conftest import COLAB

    tmp = tmp_path_factory.mktemp("standin")
    backing, mount = tmp / "drive", tmp / "gdrive"
    env = {**kernel_env(tmp, {"Session_Name": "defaults"}), "PYTHONPATH": str(COLAB),
           "COLAB_RELEASE_TAG": "standin", "COLAB_STANDIN_BACKING": str(backing),
           "COLAB_STANDIN_PYTHON": sys.executable, "FASTSD_DRIVE_MOUNT": str(mount),
           "COLAB_STANDIN_UPLOAD": str(photos)}
    del env["FASTSD_HOME"]  # on Colab the workspace is on Drive
    k = Kernel(env, tmp)
    try:
        yield k, backing / "MyDrive" / "Fast-Dreambooth"
    finally:
        k.kill()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("COLAB_STANDIN_BACKING", str(backing))
            colab_module("standin").unmount(mount)


def fails(k: Kernel, source: str) -> str:
    """Run a cell that must fail, and return the one line it shows: a FastSDError's
    message, never a traceback."""
    since = len(k.outputs)
    reply = k.wait(k.start(source))
    shown = k.outputs[since:]
    assert reply["status"] == "error", k.text[-2000:]
    assert not [c for kind, c in shown if kind == "error"], "a traceback:\n" + k.text[-3000:]
    (line,) = [c["data"]["text/plain"] for kind, c in shown if kind == "display_data"
               and "fastsd-error" in c["data"].get("text/html", "")]
    assert "\n" not in line.strip(), line
    return line


def settings_of(workspace: Path, name: str) -> dict:
    return json.loads((workspace / "sessions" / name / "session.json").read_text())["settings"]


@pytest.mark.timeout(900)
def test_fast_dreambooth_with_the_forms_own_defaults(standin):
    """What a new user runs: every form at its own value, offline up to the first
    download. Each cell run first in a new runtime says which cell to run; a declined Drive
    and a failed upload are one message; the session holds what the forms show (SD 1.5,
    never the tiny test model), and the trainer would train with cell 6's values."""
    from fastsd import env, options
    from fastsd.models import registry
    from fastsd.train import TrainSettings
    from fastsd.train.settings import DEFAULT_LR, resolve

    k, ws = standin
    for n in range(3, 11):  # a new (or restarted) runtime
        assert fails(k, cell(NB, f"{n}.")) == (
            "SessionNotFound: No session is open in this runtime (a new or restarted one): "
            "run cell 2 (Drive and session) first.")
        k.run("%reset -f")
    k.run("import os; os.environ['COLAB_STANDIN_DECLINE'] = '1'")
    declined = fails(k, cell(NB, "2."))
    assert declined.startswith("DriveError: Mounting Google Drive") and \
        "credential propagation was unsuccessful" in declined, declined
    k.run("del os.environ['COLAB_STANDIN_DECLINE']")

    (ws / "Sessions" / "old_dog" / "instance_images").mkdir(parents=True)  # TheLastBen's
    k.run(cell(NB, "2."))
    assert "Created session defaults" in k.text
    assert "fast-stable-diffusion sessions (Import_Old_Session): old_dog" in k.text
    sd15 = registry.get(registry.DEFAULT_BASE_MODEL)
    offline = fails(k, cell(NB, "3."))
    assert offline.startswith("OfflineError: ") and sd15.repo in offline, offline
    assert f"Base model {sd15.name}: about {sd15.download_gb:.1f} GB, kept on Drive. Drive: " \
        in k.text and "tick Use_Temp_Storage in cell 3 (Base model)" in k.text, k.text[-2000:]
    form2, got = defaults(NB, 2), settings_of(ws, "defaults")
    assert got["base_model"] == defaults(NB, 3)["Base_Model"] == sd15.name
    assert (got["instance_token"], got["class_word"], got["resolution"]) == (
        form2["Instance_Token"], form2["Class_Word"], form2["Resolution"])

    k.run("os.environ['COLAB_STANDIN_UPLOAD_FAIL'] = '1'")
    assert fails(k, cell(NB, "4.")).startswith(
        "DataError: The upload from this device did not finish (TypeError: Cannot read")
    k.run("del os.environ['COLAB_STANDIN_UPLOAD_FAIL']")
    k.run(cell(NB, "4."))
    assert len(list((ws / "sessions" / "defaults" / "instance_images" / "originals")
                    .glob("*.png"))) == 3

    form5 = defaults(NB, 5)
    offline = fails(k, cell(NB, "5."))  # cropped, then Kosmos-2 would download
    assert offline.startswith("OfflineError: ") and form5["Caption_Model"] in offline, offline
    assert settings_of(ws, "defaults")["caption_template"] == form5["Caption_Template"]

    offline = fails(k, cell(NB, "6."))  # the child stored its settings, then hit the download
    assert offline.startswith("TrainingFailed: ") and sd15.repo in offline, offline
    trained = settings_of(ws, "defaults")["train"]
    form6 = defaults(NB, 6)
    given = {name: form6[f] for name, o in options.OPTIONS.items() for nb, n, f in o.fields
             if (nb, n) == (NB.name, 6) and name in trained}
    call = next(n for n in ast.walk(ast.parse(cell(NB, "6."))) if isinstance(n, ast.Call)
                and getattr(n.func, "id", "") == "TrainSettings")
    assert set(given) == {kw.arg for kw in call.keywords}, "every field cell 6 passes on"
    given["sample_prompts"] = [p for p in given["sample_prompts"].split(";") if p.strip()]
    for stage in ("unet", "text"):  # a rate of 0: the method's own, as stored by the run
        given[f"{stage}_lr"] = given[f"{stage}_lr"] or DEFAULT_LR[given["method"]][stage]
    assert {name: trained[name] for name in given} == given
    would = resolve(TrainSettings(**given), env.device_info(), form2["Resolution"])[0]
    assert trained == would.to_dict()

    assert fails(k, cell(NB, "7.")).startswith("OfflineError: ")  # the base model, to try
    assert defaults(NB, 7)["Launch_Web_UI"] is False
    assert not (ws / "sessions" / "defaults" / "logs").exists(), "no web UI started"
    for n in (8, 9):
        assert fails(k, cell(NB, f"{n}.")).endswith(
            "Train it first: run cell 6 (Train).")
    k.run(cell(NB, "10."))
    assert not (ws / "models" / "tiny-sd1").exists()


@pytest.mark.timeout(600)
def test_webui_notebook_with_the_forms_own_defaults(standin):
    """webui.ipynb in a new runtime: the ControlNet and launch cells run first say to run
    the model cell; the model cell's default model is SD 1.5, whose download (offline) is
    one message."""
    from fastsd.models import registry

    k, _ = standin
    k.run("%reset -f")
    first = "FastSDError: No model is chosen in this runtime (a new or restarted one): run " \
        "cell 2 (Drive and model) first."
    assert fails(k, cell(WEBUI, "3.")) == first
    assert fails(k, cell(WEBUI, "4.")) == first
    k.run(cell(WEBUI, "5."))
    assert "No web UI was running." in k.text
    assert defaults(WEBUI, 2)["Model"] == registry.DEFAULT_BASE_MODEL
    offline = fails(k, cell(WEBUI, "2."))
    assert offline.startswith("OfflineError: ") and \
        registry.get(registry.DEFAULT_BASE_MODEL).repo in offline, offline
    assert fails(k, cell(WEBUI, "4.")) == first


def test_on_colab_the_web_ui_says_that_colab_restricts_it(workspace, monkeypatch, caplog):
    """Where a web UI starts, one line on Colab (never elsewhere), and cell 7 offers
    generation in the cell first, the web UI one tick away."""
    from fastsd.errors import SessionNotFound
    from fastsd.webui import start

    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    for colab in (False, True):
        if colab:
            monkeypatch.setenv("COLAB_RELEASE_TAG", "standin")
        caplog.clear()
        with pytest.raises(SessionNotFound):
            start.start("nobody", home=workspace, tunnel=None)
        said = [r.getMessage() for r in caplog.records if "Colab restricts" in r.getMessage()]
        assert said == ([start.colab_note()] if colab else [])
    assert "generate in the notebook instead: cell 7 (Try it) of fast_dreambooth.ipynb" \
        in start.colab_note()
    source = cell(NB, "7.")
    assert source.index("webui.generate(") < source.index("start.start(")
    assert defaults(NB, 7)["Launch_Web_UI"] is False


def project_url() -> str:
    """setup.py's ``url``: the project's public address, kept there only."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", "") == "setup")
    return next(ast.literal_eval(k.value) for k in call.keywords if k.arg == "url")


def default_source() -> str:
    """The install cell's default: the archive of the main branch at that address."""
    return project_url().rstrip("/") + "/archive/refs/heads/main.zip"


COLAB_LINK = re.compile(r"https://colab\.research\.google\.com/github/[^)\s]*?/notebooks/"
                        r"([\w.-]+\.ipynb)")


def colab_link(notebook: str) -> str:
    from urllib.parse import urlparse

    return (f"https://colab.research.google.com/github{urlparse(project_url()).path}"
            f"/blob/main/notebooks/{notebook}")


def synced_install_cell() -> str:
    """install_cell.py with its default source made from setup.py's url."""
    return re.sub(r'^(FASTSD_SOURCE = )".*?"(  #@param)',
                  lambda m: f'{m[1]}"{default_source()}"{m[2]}', INSTALL_CELL.read_text(),
                  count=1, flags=re.M)


def test_the_public_address_is_setup_pys_url():
    """The install cell installs from setup.py's url by default and the README's Colab
    links open the notebooks there (python tests/test_notebooks.py writes both)."""
    assert INSTALL_CELL.read_text() == synced_install_cell(), \
        "run python tests/test_notebooks.py"
    assert defaults(NB, 1)["FASTSD_SOURCE"] == default_source()
    links = COLAB_LINK.findall((REPO / "README.md").read_text())
    assert sorted(links) == [p.name for p in ALL]
    readme = (REPO / "README.md").read_text()
    assert all(colab_link(name) in readme for name in links), "run python tests/test_notebooks.py"


def sync() -> None:
    """Write setup.py's url into install_cell.py and the README's Colab links, and copy
    install_cell.py into the install cell of every notebook."""
    INSTALL_CELL.write_text(synced_install_cell())
    readme = REPO / "README.md"
    readme.write_text(COLAB_LINK.sub(lambda m: colab_link(m[1]), readme.read_text()))
    text = INSTALL_CELL.read_text().rstrip("\n")
    for path in ALL:
        nb = nbformat.read(path, as_version=4)
        first = next(c for c in nb.cells if c.cell_type == "code")
        first.source = text
        nbformat.write(nb, path)
        print("updated", path.name)


if __name__ == "__main__":
    sync()
