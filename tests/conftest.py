import os
import shutil
import subprocess
import sys

import pytest
import torch

from kcdlib.identity import distill_config, teacher_config
from kcdlib.runs import RunStore

if os.environ.get("PYTEST_XDIST_WORKER"):
    # make test runs two pytest processes on two cores: one thread each, or their OpenMP threads spin against each
    # other (see CHILD_ENV).
    torch.set_num_threads(1)

# The smoke pair of the test suite: small enough for a 2-core CPU, far apart enough in capacity to distil.
TEACHER, STUDENT = "resnet20", "resnet8"
TEACHER_EPOCHS = 10  # the tiny profile's too, so the test book reuses this teacher (96.7 % top-1)


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


def copy_run(store, cfg, root):
    """Copy the finished run ``cfg`` of ``store`` into the store folder ``root`` (same data, same identity)."""
    shutil.copytree(store.path(cfg), root / store.path(cfg).name)


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
