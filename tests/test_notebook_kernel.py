"""In a real Jupyter kernel: a FastSDError shows as its message, and training runs in a
child process that the Stop button (a kernel interrupt) stops with a checkpoint."""

from __future__ import annotations

import queue
import re
import sys
import textwrap
import time

import pytest
from jupyter_client.manager import start_new_kernel

from conftest import fake_nvidia_smi
from fastsd import env


class Kernel:
    def __init__(self, env: dict):
        self.km, self.kc = start_new_kernel(kernel_name="python3", env=env)

    def run(self, code: str, on_output=None, timeout: float = 600) -> tuple[dict, list[dict]]:
        """Execute ``code``; returns (reply content, iopub outputs)."""
        msg_id = self.kc.execute(textwrap.dedent(code))
        outputs, deadline = [], time.monotonic() + timeout
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=max(1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no answer from the kernel; outputs so far: {outputs}")
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content["execution_state"] == "idle":
                break
            if kind in ("stream", "display_data", "execute_result", "error"):
                outputs.append({"type": kind, **content})
                if on_output:
                    on_output(outputs[-1])
        while True:
            reply = self.kc.get_shell_msg(timeout=60)
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply["content"], outputs

    def close(self):
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def text_of(outputs) -> str:
    return "".join(o.get("text", "") for o in outputs)


@pytest.fixture
def kernel(workspace):
    import os

    k = Kernel({**os.environ, "FASTSD_HOME": str(workspace)})
    yield k
    k.close()


def test_a_fastsd_error_shows_as_its_message(kernel):
    reply, out = kernel.run("""
        import fastsd
        from fastsd import session
        session.load("no such session")
    """)
    assert reply["status"] == "error"  # the cell still counts as failed (Run all stops)
    assert not [o for o in out if o["type"] == "error"], "no traceback wall"
    (shown,) = [o for o in out if o["type"] == "display_data"]
    html, plain = shown["data"]["text/html"], shown["data"]["text/plain"]
    assert plain.startswith("SessionNotFound: ") and "\n" not in plain.strip()
    assert 'class="fastsd-error"' in html and "color:#c62828" in html
    message, _, folded = html.partition("<details")
    assert "SessionNotFound" in message and "Traceback" not in message
    assert "Traceback (most recent call last)" in folded  # one click away
    # Other errors keep IPython's usual traceback.
    reply, out = kernel.run("1/0")
    assert [o["ename"] for o in out if o["type"] == "error"] == ["ZeroDivisionError"]


SETTINGS = dict(unet_steps=6, text_steps=2, checkpoint_every=2, keep_checkpoints=2,
                unet_lr=1e-4, text_lr=1e-4, batch_size=1, prior_preservation=False)


@pytest.mark.timeout(900)
def test_training_runs_in_a_child_stops_with_stop_and_resumes(kernel, workspace, tiny_sd1):
    from test_train_resume import make_subject_session

    (workspace / "models").mkdir()
    (workspace / "models" / "tiny-sd1").symlink_to(tiny_sd1)
    s = make_subject_session("stop", workspace)
    setup = f"""
        import sys
        from pathlib import Path
        import fastsd
        from fastsd import env, session
        env.form(globals())  # as each notebook cell does: messages name its form fields
        from fastsd.train import TrainSettings
        from fastsd.train.runner import train_in_child
        ROOT = Path({str(workspace)!r})
        S = session.load("stop", ROOT)
        settings = TrainSettings(**{SETTINGS!r})
    """
    reply, _ = kernel.run(setup)
    assert reply["status"] == "ok"

    interrupted = []

    def stop_at_first_checkpoint(o):
        if not interrupted and "checkpoint at step 2" in o.get("text", ""):
            interrupted.append(True)
            kernel.km.interrupt_kernel()  # the Stop button

    reply, out = kernel.run("result = train_in_child(S, settings, grace=60)",
                            on_output=stop_at_first_checkpoint)
    assert interrupted, text_of(out)
    assert reply["status"] == "error"
    shown = [o["data"]["text/plain"] for o in out if o["type"] == "display_data"
             and "text/html" in o["data"] and "fastsd-error" in o["data"]["text/html"]]
    assert shown and shown[0].startswith("TrainingStopped: Training stopped at step"), out
    assert "tick Resume in cell 6 (Train), and run it again" in shown[0], shown[0]
    assert not (s.models / "stop").exists(), "stopped before the end: no model yet"

    reply, out = kernel.run("""
        result = train_in_child(S, settings, resume=True)
        print("DONE", result.global_step, result.model_dir, result.loss_curve is not None)
        print("TORCH IN KERNEL", "torch" in sys.modules)
    """)
    text = text_of(out)
    assert reply["status"] == "ok", out
    assert "Resuming from step-" in text
    assert f"DONE {SETTINGS['unet_steps'] + SETTINGS['text_steps']} {s.models / 'stop'} True" \
        in text
    assert "TORCH IN KERNEL False" in text, "training must not load torch into the kernel"
    assert (s.models / "stop" / "model_index.json").is_file()


def test_an_out_of_memory_child_is_a_message_with_what_to_lower(workspace, monkeypatch):
    from conftest import tiny_session
    from fastsd.train import TrainSettings, runner

    s = tiny_session("oom", workspace)
    child = ("import sys; print('step 1'); sys.stderr.write('torch.OutOfMemoryError: CUDA out "
             "of memory. Tried to allocate 2.00 GiB\\n'); sys.exit(1)")
    monkeypatch.setattr(runner, "command", lambda *a, **k: [sys.executable, "-c", child])
    with pytest.raises(runner.OutOfMemory) as e:
        runner.train_in_child(s, TrainSettings(batch_size=2))
    said = str(e.value)
    assert said.startswith("The GPU ran out of memory while training (resolution from the "
                           "preset, batch size 2, gradient checkpointing from the preset")
    assert "(run 'fastsd train oom --batch-size 1 --gradient-checkpointing --adam-8bit')" \
        in said and "then resume: run 'fastsd train oom --resume'" in said, said
    # In the notebook: the GPU preset that sets them, and the boxes of the train cell.
    monkeypatch.setenv(env.CALLER_ENV, "6. Train")
    with pytest.raises(runner.OutOfMemory) as e:
        runner.train_in_child(s, TrainSettings(batch_size=2))
    said = str(e.value)
    assert "(set GPU_Preset to 't4' in cell 6 (Train))" in said and \
        "then resume: tick Resume in cell 6 (Train)" in said, said
    assert not re.search(r"batch_size|adam_8bit|gradient_checkpointing|--", said), said


def test_the_train_cells_child_names_the_cells_fields(workspace, monkeypatch, capsys):
    """The child a train cell starts says what to tick in that cell; the same refusal on
    the command line names the flags."""
    from conftest import tiny_session
    from fastsd.cli import main
    from fastsd.train import TrainSettings, runner
    from test_notebooks import NB, cell

    s = tiny_session("again", workspace)
    (s.checkpoints / "step-0000002").mkdir()  # a run to resume or restart
    monkeypatch.setattr(env, "_caller", None)
    env.form({"_ih": [cell(NB, "6.")]})  # what the train cell's env.form(globals()) records
    assert env.caller() == "6. Train"
    with pytest.raises(runner.TrainingFailed) as e:
        runner.train_in_child(s, TrainSettings(unet_steps=1))
    assert str(e.value).endswith("To resume that run: tick Resume in cell 6 (Train); to start "
                                 "over, which deletes them: tick Restart in cell 6 (Train).")
    monkeypatch.setattr(env, "_caller", None)
    assert main(["train", "again"]) == 2
    assert capsys.readouterr().err.endswith(
        "To resume that run: run 'fastsd train again --resume'; to start over, which deletes "
        "them: run 'fastsd train again --restart'.\n")


def test_a_child_killed_for_memory_says_so(workspace, monkeypatch):
    """The kernel's OOM killer sends SIGKILL: the cell says what that most likely was, not
    only "exit code -9"."""
    from fastsd import session
    from fastsd.train import TrainSettings, runner

    s = session.create("killed", workspace, base_model="tiny-sd1")
    child = ("import os, signal; print('@@fastsd-event {\"event\": \"step\", "
             "\"global_step\": 7, \"loss\": 0.1}', flush=True); os.kill(os.getpid(), "
             "signal.SIGKILL)")
    monkeypatch.setattr(runner, "command", lambda *a, **k: [sys.executable, "-c", child])
    with pytest.raises(runner.TrainingFailed, match="killed .SIGKILL. at step 7.*system RAM"):
        runner.train_in_child(s, TrainSettings())


def test_the_child_command_is_fastsd_train_with_the_settings():
    from fastsd.train import TrainSettings, runner

    cmd = runner.command("dog", TrainSettings(unet_steps=10, flip=True), resume=True, gpus=1)
    assert cmd[1:5] == ["-m", "fastsd.cli", "train", "dog"]
    assert "--events" in cmd and "--resume" in cmd
    assert cmd[cmd.index("--unet-steps") + 1] == "10" and "--flip" in cmd
    multi = runner.command("dog", gpus=2)
    assert multi[1:5] == ["-m", "accelerate.commands.launch", "--num_processes", "2"]
    from fastsd.cli import build_parser

    args = build_parser().parse_args(cmd[3:])
    assert args.unet_steps == 10 and args.flip and args.resume and args.events


def test_the_child_runs_one_process_per_gpu_the_driver_lists(tmp_path, monkeypatch):
    from fastsd.train import runner

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert runner.command("dog")[1:3] == ["-m", "fastsd.cli"]  # no driver: one process
    two = fake_nvidia_smi(tmp_path / "bin", "NVIDIA L4, 22000, 23034", "NVIDIA L4, 22000, 23034")
    monkeypatch.setenv("PATH", f"{two}:/usr/bin:/bin")
    assert runner.command("dog")[1:5] == ["-m", "accelerate.commands.launch",
                                          "--num_processes", "2"]
