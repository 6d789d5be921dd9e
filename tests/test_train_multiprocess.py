"""Two processes (``accelerate launch --num_processes 2``, CPU, gloo): a run SIGKILLed after
a checkpoint and resumed through ``fastsd train NAME --resume`` ends bit-identical to an
uninterrupted two-process run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from test_train import link_tiny
from test_train_resume import final_state, final_tensors, make_subject_session

HERE = Path(__file__).parent
OPTIONS = dict(unet_steps=4, text_steps=2, checkpoint_every=2, unet_lr=1e-4, text_lr=1e-4,
               batch_size=1, flip=True, crop="random", class_steps=2)


def launch(home: Path, *args: str) -> tuple[int, str]:
    env = {**os.environ, "FASTSD_HOME": str(home), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(29500 + os.getpid() % 1000), *args]
    p = subprocess.run(cmd, env=env, start_new_session=True, capture_output=True, text=True,
                       timeout=300)
    if p.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(p.stderr[-4000:])
    return p.returncode, p.stderr


def test_two_processes_resume_bit_identical(workspace, tiny_sd1):
    link_tiny(workspace, "sd1", tiny_sd1)
    opts = json.dumps(OPTIONS)
    ref, s = (make_subject_session(n, workspace, n=4) for n in ("ref2", "killed2"))
    worker = str(HERE / "mp_train.py")
    assert launch(workspace, worker, str(workspace), "ref2", opts)[0] == 0
    assert launch(workspace, worker, str(workspace), "killed2", opts,
                  "--kill-after", "2", "--kill-at", "3")[0] == -signal.SIGKILL
    assert not (s.models / "killed2").exists()
    code, err = launch(workspace, "-m", "fastsd.cli", "train", "killed2", "--resume",
                       "--home", str(workspace))
    assert code == 0 and "Resuming from step-0000002" in err, err[-3000:]
    a, b = final_tensors(ref), final_tensors(s)
    assert a.keys() == b.keys() and a
    assert not [k for k in a if not a[k].equal(b[k])]
    st_ref, st = final_state(ref), final_state(s)
    assert st["global_step"] == st_ref["global_step"] == 6
    assert st["losses"] == st_ref["losses"] and st["data_order"] == st_ref["data_order"]
    # two processes took 2 images a step: 12 of 4 images, 3 whole epochs (1 process: 6)
    assert (st["data_order"]["epoch"], st["data_order"]["cursor"]) == (2, 4)
