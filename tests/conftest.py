import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from kcdlib.runs import RunStore, distill_config, teacher_config

# The smoke pair of the test suite: small enough for a 2-core CPU, far apart enough in capacity to distil.
TEACHER, STUDENT = "resnet20", "resnet8"
TEACHER_EPOCHS = 15


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def store(runs_dir):
    return RunStore(runs_dir, device="cpu")


@pytest.fixture(scope="session")
def digits_teacher(store):
    """The digits teacher of the suite, trained once (cached in the session's run store)."""
    cfg = teacher_config("digits", TEACHER, seed=0, epochs=TEACHER_EPOCHS)
    store.ensure(cfg, progress=False)
    return cfg


def short_kd(teacher, epochs=4, **kw):
    return distill_config("digits", STUDENT, teacher=teacher, epochs=epochs, **kw)


# Child processes run beside the test process on a 2-core machine: one thread each, or OpenMP threads of
# several processes spin against each other and everything slows down tenfold.
CHILD_ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def run_cli(*args, timeout=600):
    """Run `python -m kcdlib ARGS` and return the CompletedProcess (text mode)."""
    return subprocess.run(
        [sys.executable, "-m", "kcdlib", *args], capture_output=True, text=True, timeout=timeout, env=CHILD_ENV
    )


def kill_and_resume(store, teacher, cfg, args, tmp_path, kill_at_epoch: int):
    """Run ``kcd ARGS`` (the run ``cfg``) twice, each in its own store holding a copy of ``teacher``'s run:
    uninterrupted, and killed with SIGKILL once its checkpoint has reached ``kill_at_epoch``, then run again.

    The two first runs go side by side (one thread each). Returns the uninterrupted record, the resumed one and
    the resuming process.
    """
    dirs = {name: tmp_path / name for name in ("clean", "killed")}
    for d in dirs.values():
        shutil.copytree(store.path(teacher), d / teacher.hash)
    procs = {name: subprocess.Popen([sys.executable, "-m", "kcdlib", *args, "--runs-dir", str(d)], env=CHILD_ENV)
             for name, d in dirs.items()}  # fmt: skip
    ckpt = dirs["killed"] / cfg.hash / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline:
        if ckpt.exists() and torch.load(ckpt, weights_only=False)["epoch"] >= kill_at_epoch:
            break
        time.sleep(0.05)
    procs["killed"].send_signal(signal.SIGKILL)
    procs["killed"].wait()
    assert procs["clean"].wait() == 0
    assert not (dirs["killed"] / cfg.hash / "record.json").exists(), "the run finished before it could be killed"
    resumed = run_cli(*args, "--runs-dir", str(dirs["killed"]))
    assert resumed.returncode == 0, resumed.stderr
    records = [json.loads((d / cfg.hash / "record.json").read_text()) for d in dirs.values()]
    return records[0], records[1], resumed
