"""The run store under damage: processes killed at every write, corrupted and planted files, stale records, one
spelling per run, and the lock a second process waits on."""

import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from conftest import CHILD_ENV, STUDENT, TEACHER_EPOCHS, copy_run, run_cli, short_kd

import kcdlib.data
import kcdlib.files
import kcdlib.identity
import kcdlib.records
import kcdlib.runs
from kcdlib import distillers, files, provenance
from kcdlib.artefacts import declare
from kcdlib.cli import build_parser, config_from_args
from kcdlib.errors import Diverged, StaleRun, StoreError
from kcdlib.folders import locked
from kcdlib.identity import distill_config, teacher_config
from kcdlib.profiles import get_profile
from kcdlib.records import sha16
from kcdlib.runs import RunStore, StoreWarning
from kcdlib.train import Trainer

# What differs between two runs of one configuration: when and how fast they ran, the checksum over that, and the
# commit checked out when the record was written (someone may commit while the tests run).
VOLATILE = ("wall_seconds", "finished", "checksum", "git_commit")


def stable(record: dict) -> dict:
    """``record`` without its volatile fields (also each epoch row's ``seconds``), as JSON would give it back."""
    rec = json.loads(json.dumps(record))
    for key in VOLATILE:
        rec.pop(key)
    for row in rec["epochs"]:
        row.pop("seconds")
    return rec


def stored(folder: Path) -> dict:
    return json.loads((folder / "record.json").read_text())


def leftovers(folder: Path) -> list[str]:
    """What a finished run folder must no longer hold."""
    found = [*folder.glob("checkpoint-*"), *folder.glob("images-*"), *folder.glob(".*.tmp"), folder / "owner.json"]
    return sorted(p.name for p in found if p.exists())


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def one_thread(digits_teacher):
    """This module's in-process runs on one thread: on two cores shared with child processes two threads are
    several times slower, and a run's weights depend on the thread count, so every run this module compares is
    made here (the suite's teacher is trained first, at the default)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield digits_teacher
    torch.set_num_threads(before)


def trained_epochs(monkeypatch, stop_at: int | None = None) -> list[int]:
    """Spy on ``Trainer.train_epoch``: the list fills with each epoch trained (1-based). With ``stop_at``, a
    KeyboardInterrupt comes instead of training the epoch after ``stop_at`` (as Ctrl-C between epochs)."""
    epochs = []
    train_epoch = Trainer.train_epoch

    def spy(self):
        if self.epoch == stop_at:
            raise KeyboardInterrupt
        epochs.append(self.epoch + 1)
        return train_epoch(self)

    monkeypatch.setattr(Trainer, "train_epoch", spy)
    return epochs


# -- 1. processes killed anywhere resume to the same record ----------------------------------------------------
KCD_ARGS = ["distill", "--dataset", "digits", "--teacher", "resnet20", "--teacher-epochs", str(TEACHER_EPOCHS),
            "--student", STUDENT, "--epochs", "4", "--method", "kcd", "--stage-epochs", "1", "--seed", "4",
            "--device", "cpu", "--no-progress"]  # fmt: skip
# Every point a fresh run of KCD_ARGS passes, with how often: four epochs, each checkpointed; three condensations
# each mix new images (versions 1-3, stored at the epoch's checkpoint); owner, config, model and record once.
PASSES = {"epoch": 4, "checkpoint": 4, "images": 3, "model": 1, "record": 1, "config": 1, "owner": 1}
KILL_POINTS = [f"epoch:{n}" for n in range(1, PASSES["epoch"] + 1)] + [
    f"{when}:{kind}:{n}" for kind, times in PASSES.items() if kind != "epoch" for when in ("write", "wrote")
    for n in range(1, times + 1)
]  # fmt: skip


def test_kcd_run_killed_at_random_points_resumes_to_the_same_record(store, digits_teacher, tmp_path):
    seed = int(os.environ.get("KCD_FAULT_SEED", random.randrange(10**6)))
    rng = random.Random(seed)
    kills = [rng.choice(KILL_POINTS) for _ in range(3)]
    print(f"fault-injection seed {seed}: kills {kills}")
    cfg = short_kd(digits_teacher, epochs=4, method="kcd", method_options={"stage_epochs": 1}, seed=4)
    dirs = {name: tmp_path / name for name in ("clean", "killed")}
    for d in dirs.values():
        copy_run(store, digits_teacher, d)
    run = RunStore(dirs["killed"]).path(cfg)
    env = {k: v for k, v in CHILD_ENV.items() if k != "KCD_KILL_AT"}

    def kcd(runs_dir: Path, kill: str | None = None, **kw):
        """`kcd distill KCD_ARGS` on the store ``runs_dir``, killed at ``kill``."""
        command = [sys.executable, "-m", "kcdlib", *KCD_ARGS, "--runs-dir", str(runs_dir)]
        return subprocess.Popen(command, env={**env, "KCD_KILL_AT": kill} if kill else env, text=True, **kw)

    # The uninterrupted run goes beside the killed ones (one thread each).
    with open(tmp_path / "clean.log", "w") as log:
        clean = kcd(dirs["clean"], stdout=log, stderr=subprocess.STDOUT)
    exits = []
    try:
        for i, kill in enumerate(kills):
            with kcd(dirs["killed"], kill, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as done:
                _, stderr = done.communicate(timeout=300)
            exits.append(done.returncode)
            where = f"seed {seed}, kills {kills}, exits {exits}"
            assert done.returncode in (0, -signal.SIGKILL), f"{where}: {stderr}"
            if i == 0:
                assert done.returncode == -signal.SIGKILL, f"{where}: a fresh run passes {kill} but was not killed"
                assert (run / "record.json").exists() == (kill == "wrote:record:1"), where
                if kill.startswith("write:"):  # killed between writing the temporary file and renaming it
                    assert list(run.glob(f".{kill.split(':')[1]}*.tmp")), f"{where}: no half-written file"
            if done.returncode == 0:  # the run finished before this kill point came
                break
        with kcd(dirs["killed"], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as final:
            stdout, stderr = final.communicate(timeout=300)
        assert final.returncode == 0, stderr
        assert clean.wait(timeout=300) == 0, (tmp_path / "clean.log").read_text()
    finally:
        if clean.poll() is None:
            clean.kill()
            clean.wait()
    where = f"seed {seed}, kills {kills}, exits {exits}"
    assert stdout.strip().splitlines()[-1] == str(run / "record.json"), where
    reference, resumed = stored(RunStore(dirs["clean"]).path(cfg)), stored(run)
    assert resumed["model_sha256"] == reference["model_sha256"], f"{where}: the weights differ"
    assert stable(resumed) == stable(reference), where
    assert leftovers(run) == [], f"{where}: left behind in the finished run"


# -- 2. damaged files: each is named, set aside, and the run goes on from what is intact -----------------------
@dataclass
class KcdRuns:
    cfg: object
    clean: dict  # the record of the uninterrupted run
    interrupted: Path  # a store root: the teacher, and the run with the checkpoints of epochs 1 and 2


@pytest.fixture(scope="module")
def kcd_runs(store, one_thread, tmp_path_factory):
    """KCD for three epochs of one stage each (two condensations, mixed images): run uninterrupted, and
    interrupted by Ctrl-C before its third epoch."""
    cfg = short_kd(one_thread, epochs=3, method="kcd", method_options={"stage_epochs": 1})
    clean_root, interrupted = tmp_path_factory.mktemp("kcd-clean"), tmp_path_factory.mktemp("kcd-interrupted")
    for root in (clean_root, interrupted):
        copy_run(store, one_thread, root)
    clean_store = RunStore(clean_root)
    clean = clean_store.ensure(cfg, progress=False)
    assert clean == stored(clean_store.path(cfg)), "the record returned is not the record stored"
    with pytest.MonkeyPatch.context() as mp:
        trained_epochs(mp, stop_at=2)
        with pytest.raises(KeyboardInterrupt):
            RunStore(interrupted).ensure(cfg, progress=False)
    run = RunStore(interrupted).path(cfg)
    assert [p.name[:18] for p in sorted(run.glob("checkpoint-*.pt"))] == ["checkpoint-e000001", "checkpoint-e000002"]
    assert not (run / "record.json").exists()
    return KcdRuns(cfg, clean, interrupted)


def interrupted_store(kcd_runs: KcdRuns, tmp_path: Path) -> tuple[RunStore, Path]:
    """A copy of the interrupted store, and the run's folder in it."""
    shutil.copytree(kcd_runs.interrupted, tmp_path / "runs")
    st = RunStore(tmp_path / "runs")
    return st, st.path(kcd_runs.cfg)


def checkpoints(run: Path) -> list[Path]:
    """The run's checkpoints, newest first."""
    return sorted(run.glob("checkpoint-e*.pt"), reverse=True)


def images_file(checkpoint: Path) -> Path:
    return checkpoint.parent / torch.load(checkpoint, weights_only=True)["images_file"]


def test_damaged_newest_checkpoint_resumes_from_the_one_before(kcd_runs, tmp_path, monkeypatch):
    st, run = interrupted_store(kcd_runs, tmp_path)
    newest = checkpoints(run)[0]
    flip_byte(newest)
    trained = trained_epochs(monkeypatch)
    with pytest.warns(StoreWarning, match=rf"{re.escape(newest.name)} is damaged \(.*checksum mismatch"):
        rec = st.ensure(kcd_runs.cfg, progress=False)
    assert trained == [2, 3], "not resumed from epoch 1's checkpoint"
    assert stable(rec) == stable(kcd_runs.clean)
    assert leftovers(run) == []


def test_damaged_images_file_makes_its_checkpoint_unusable(kcd_runs, tmp_path, monkeypatch):
    st, run = interrupted_store(kcd_runs, tmp_path)
    newest, before = checkpoints(run)
    images = images_file(newest)
    assert images != images_file(before), "both checkpoints share their images: the case tests nothing"
    flip_byte(images)
    trained = trained_epochs(monkeypatch)
    with pytest.warns(StoreWarning, match=rf"{re.escape(newest.name)} is damaged \({re.escape(images.name)}"):
        rec = st.ensure(kcd_runs.cfg, progress=False)
    assert trained == [2, 3], "not resumed from epoch 1's checkpoint"
    assert stable(rec) == stable(kcd_runs.clean)
    assert leftovers(run) == []


def test_damaged_images_file_is_never_referenced_again(kcd_runs, tmp_path, monkeypatch):
    st, run = interrupted_store(kcd_runs, tmp_path)
    flip_byte(images_file(checkpoints(run)[0]))
    with pytest.warns(StoreWarning, match="is damaged"), pytest.raises(KeyboardInterrupt):
        trained_epochs(monkeypatch, stop_at=2)  # epoch 2 trained again from epoch 1's checkpoint, then Ctrl-C
        st.ensure(kcd_runs.cfg, progress=False)
    newest = checkpoints(run)[0]
    assert newest.name.startswith("checkpoint-e000002")
    images = images_file(newest)
    assert sha16(images.read_bytes()) == images.stem.rsplit("-", 1)[1], f"{newest.name} needs the damaged {images.name}"


def test_truncated_checkpoints_start_the_run_again(kcd_runs, tmp_path, monkeypatch):
    st, run = interrupted_store(kcd_runs, tmp_path)
    for path in checkpoints(run):
        path.write_bytes(path.read_bytes()[:1000])
    trained = trained_epochs(monkeypatch)
    with pytest.warns(StoreWarning) as caught:
        rec = st.ensure(kcd_runs.cfg, progress=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, StoreWarning)]
    assert any("the run starts again from its first epoch" in m for m in messages), messages
    assert trained == [1, 2, 3]
    assert stable(rec) == stable(kcd_runs.clean)


class Planted:
    """A pickle that, when loaded as a pickle may be, creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_planted_pickle_is_refused_never_run(kcd_runs, tmp_path, monkeypatch):
    st, run = interrupted_store(kcd_runs, tmp_path)
    marker = tmp_path / "planted-code-ran"
    buf = io.BytesIO()
    torch.save({"epoch": 9, "run": run.name, "payload": Planted(marker)}, buf)
    data = buf.getvalue()
    # Correctly named for its content, and for a later epoch than any real checkpoint: the first one tried.
    planted = run / f"checkpoint-e000009-v0-{sha16(data)}.pt"
    planted.write_bytes(data)
    trained = trained_epochs(monkeypatch)
    with pytest.warns(StoreWarning, match=rf"{re.escape(planted.name)} is damaged \(.*unreadable"):
        rec = st.ensure(kcd_runs.cfg, progress=False)
    assert not marker.exists(), "the store ran code from a checkpoint"
    assert not planted.exists()
    assert trained == [3], "not resumed from epoch 2's checkpoint"
    assert stable(rec) == stable(kcd_runs.clean)
    # The plant is live: loaded without weights_only, it runs.
    torch.load(io.BytesIO(data), weights_only=False)
    assert marker.exists()


def test_debris_in_a_run_folder_does_not_stop_it(kcd_runs, tmp_path, monkeypatch):
    """Writes a killed process left half done, a lock folder of an older store, an owner.json that is garbage."""
    st, run = interrupted_store(kcd_runs, tmp_path)
    temps = [run / ".checkpoint-e000003-v2-0123456789abcdef.pt.4242.tmp", run / ".images-v3-0123.pt.4242.tmp",
             run / ".record.json.4242.tmp"]  # fmt: skip
    for path in temps:
        path.write_bytes(b"half a file")
    (run / "lock").mkdir()
    (run / "owner.json").write_text("{'pid': ")
    trained = trained_epochs(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = st.ensure(kcd_runs.cfg, progress=False)
    assert [str(w.message) for w in caught if issubclass(w.category, StoreWarning)] == []
    assert trained == [3]
    assert stable(rec) == stable(kcd_runs.clean)
    assert not any(path.exists() for path in temps)
    assert leftovers(run) == []


# A cheap finished run of each kind: a student distilled for one epoch, and a small teacher of one epoch.
@dataclass
class Finished:
    cfg: object
    record: dict
    root: Path  # its store (holding the suite's teacher for the student)

    def copy(self, tmp_path: Path) -> tuple[RunStore, Path]:
        shutil.copytree(self.root, tmp_path / "runs")
        st = RunStore(tmp_path / "runs")
        return st, st.path(self.cfg)


@pytest.fixture(scope="module")
def kd_run(store, one_thread, tmp_path_factory):
    cfg = short_kd(one_thread, epochs=1, seed=7)
    root = tmp_path_factory.mktemp("kd")
    copy_run(store, one_thread, root)
    return Finished(cfg, RunStore(root).ensure(cfg, progress=False), root)


@pytest.fixture(scope="module")
def small_teacher(one_thread, tmp_path_factory):
    cfg = teacher_config("digits", "resnet8", epochs=1)
    root = tmp_path_factory.mktemp("small-teacher")
    return Finished(cfg, RunStore(root).ensure(cfg, progress=False), root)


def truncated(text: str) -> str:
    return text[: len(text) // 2]


def one_digit_changed(text: str) -> str:
    """The first digit of ``final_top1`` changed: still JSON, the checksum no longer matches. (Not its last digit:
    a 17th significant digit may parse to the same float, and the checksum covers the values, not the bytes.)"""
    match = re.search(r'"final_top1": ([0-9])', text)
    assert match, text
    i = match.start(1)
    return text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1 :]


@pytest.mark.parametrize(
    "damage, why",
    [(truncated, "not JSON"), (lambda text: "", "empty"), (one_digit_changed, "checksum mismatch")],
    ids=["truncated", "empty", "one-digit-changed"],
)
def test_damaged_record_is_set_aside_and_the_run_trained_again(kd_run, tmp_path, damage, why):
    st, run = kd_run.copy(tmp_path)
    bad = damage((run / "record.json").read_text())
    (run / "record.json").write_text(bad)
    with pytest.warns(StoreWarning, match=rf"{re.escape(str(run / 'record.json'))} is damaged \(.*{why}"):
        assert st.record(kd_run.cfg) is None
    rec = st.ensure(kd_run.cfg, progress=False)
    assert rec["model_sha256"] == kd_run.record["model_sha256"]
    assert stable(rec) == stable(kd_run.record)
    assert (run / "record.json.damaged").read_text() == bad
    assert st.record(kd_run.cfg) == rec


def test_a_finished_run_sweeps_what_a_killed_process_left(kd_run, tmp_path):
    st, run = kd_run.copy(tmp_path)
    debris = [run / "checkpoint-e000001-v0-0123456789abcdef.pt", run / "owner.json", run / ".model.pt.4242.tmp"]
    for path in debris:
        path.write_bytes(b"left by a killed process")
    assert st.ensure(kd_run.cfg, progress=False) == kd_run.record
    assert leftovers(run) == []


@pytest.mark.parametrize("change", ["deleted", "replaced"])
def test_teacher_weights_gone_or_changed_are_trained_again(small_teacher, tmp_path, change):
    st, folder = small_teacher.copy(tmp_path)
    weights = folder / "model.pt"
    if change == "deleted":
        weights.unlink()
    else:
        flip_byte(weights)
    student = distill_config("digits", "resnet8", teacher=small_teacher.cfg, epochs=1)
    why = "missing" if change == "deleted" else "not the file its record names"
    with pytest.warns(StoreWarning, match=rf"{re.escape(str(weights))} are {why}"):
        st.ensure(student, progress=False)
    assert kcdlib.files.sha256_file(weights) == small_teacher.record["model_sha256"]
    assert (folder / "record.json.damaged").exists()
    assert stable(st.record(small_teacher.cfg)) == stable(small_teacher.record)
    assert st.record(student) is not None


# -- 3. a record of the same options made on other data or by other numerics is never reused silently ----------
def test_record_of_other_numerics_is_stale(small_teacher, tmp_path, monkeypatch):
    st, old = small_teacher.copy(tmp_path)
    cfg, root = small_teacher.cfg, st.root
    monkeypatch.setattr(kcdlib.identity, "NUMERICS_VERSION", kcdlib.identity.NUMERICS_VERSION + 1)
    assert RunStore(root).path(cfg) != old
    with pytest.raises(StaleRun) as err:
        RunStore(root).ensure(cfg, progress=False)
    for words in (str(old), "numerics version", "--rerun", "--keep-stale"):
        assert words in str(err.value)
    lines = []
    assert RunStore(root, stale="keep").ensure(cfg, progress=False, log=lines.append) == small_teacher.record
    assert any("--keep-stale" in line for line in lines), lines
    assert [p.parent for p in root.glob("*/record.json")] == [old], "keeping the old record trained a run"
    rec = RunStore(root, stale="rerun").ensure(cfg, progress=False)
    assert rec["numerics"] == small_teacher.record["numerics"] + 1
    assert len(list(root.glob("*/record.json"))) == 2
    assert stored(old) == small_teacher.record, "the old run was touched"


def test_record_of_other_data_is_stale(kd_run, tmp_path, monkeypatch):
    st, old = kd_run.copy(tmp_path)
    real = kcdlib.data.fingerprint
    monkeypatch.setattr(kcdlib.data, "fingerprint", lambda *a, **kw: {**real(*a, **kw), "train_sha256": "0" * 64})
    with pytest.raises(StaleRun, match="other data") as err:
        RunStore(st.root).ensure(kd_run.cfg, progress=False)
    assert str(old) in str(err.value) and "--rerun" in str(err.value)
    assert "numerics" not in str(err.value)


def test_changed_distiller_default_is_another_run(kd_run, tmp_path, monkeypatch):
    st, old = kd_run.copy(tmp_path)
    specs = distillers.KD.option_specs
    monkeypatch.setattr(distillers.KD, "option_specs", {**specs, "temperature": replace(specs["temperature"],
                                                                                       default=5.0)})  # fmt: skip
    new = short_kd(kd_run.cfg.teacher, epochs=1, seed=kd_run.cfg.seed)
    assert dict(new.distiller_options)["temperature"] == 5.0
    assert new.options_hash != kd_run.cfg.options_hash
    assert st.path(new) != old
    assert st.record(new) is None
    assert st.stale_records(new) == [], "another run's record is offered as this one's"
    assert st.record(kd_run.cfg) == kd_run.record


# -- 4. one spelling per run --------------------------------------------------------------------------------------
def cli_config(*flags: str):
    args = ["distill", "--dataset", "digits", "--teacher", "resnet20", "--teacher-epochs", "15", "--student",
            "resnet8", "--epochs", "12", *flags]  # fmt: skip
    return config_from_args(build_parser().parse_args(args))


def test_one_run_has_one_spelling(store):
    teacher = teacher_config("digits", "resnet20", epochs=15)

    def kcd(**options):
        return distill_config("digits", "resnet8", teacher=teacher, method="kcd", epochs=12, method_options=options)

    spellings = {
        "no options": kcd(),
        "every default": kcd(
            rho=0.7, cost_exponent=0.03, stage_epochs=2, schedule="paper", augment="K1L", eps_m=0.7, value="entropy"
        ),  # fmt: skip
        "other number types": kcd(rho=7 / 10, cost_exponent=3e-2, stage_epochs=2.0, eps_m=0.70),
        "command line": cli_config("--method", "kcd"),
        "command line, options": cli_config("--method", "kcd", "--rho", "0.7", "--stage-epochs", "2"),
        "book": declare.distill(get_profile("smoke"), "wrn_40_2/wrn_16_2", method="kcd"),
    }
    paths = {name: store.path(cfg) for name, cfg in spellings.items()}
    assert len(set(paths.values())) == 1, paths
    assert len({cfg.options_hash for cfg in spellings.values()}) == 1
    # ... and another option is another run.
    for other in (kcd(rho=0.6), kcd(stage_epochs=3), kcd(augment="none"), cli_config("--method", "kcd", "--seed", "1")):
        assert store.path(other) != paths["no options"]


def test_unix_and_kd_options_have_one_spelling(store):
    unix = {
        "no flags": cli_config("--method", "unix"),
        "defaults": cli_config("--method", "unix", "--unix-k", "48", "--unix-b", "32", "--unix-w", "10"),
        "w as a float": cli_config("--method", "unix", "--unix-w", "10.0"),
    }
    assert len({store.path(cfg) for cfg in unix.values()}) == 1, unix
    assert store.path(cli_config("--method", "unix", "--unix-w", "9")) != store.path(unix["no flags"])
    teacher = teacher_config("digits", "resnet20", epochs=15)
    kd = [distill_config("digits", "resnet8", teacher=teacher, epochs=12, distiller_options=options)
          for options in (None, {"temperature": 4}, {"temperature": 4.0, "gamma": 0.1})]  # fmt: skip
    assert len({store.path(cfg) for cfg in kd}) == 1
    assert store.path(cli_config("--temperature", "4")) == store.path(kd[0])
    assert store.path(cli_config("--temperature", "5")) != store.path(kd[0])


# -- 5. a second process waits for the run's lock, and says so ---------------------------------------------------
def test_waiting_for_the_lock_says_who_holds_it(kd_run, tmp_path):
    shutil.copytree(kd_run.root, tmp_path / "runs", ignore=lambda d, names: [kd_run.record["hash"]])
    st = RunStore(tmp_path / "runs")
    run = st.path(kd_run.cfg)
    assert not run.exists() and st.record(kd_run.cfg.teacher) is not None
    held, release = threading.Event(), threading.Event()

    def holder():  # another process training the run: it holds the lock, then finishes the run
        with locked(run, print):
            (run / "owner.json").write_text(json.dumps({"pid": 4242, "host": "elsewhere", "since": "today"}))
            held.set()
            release.wait(30)
            for name in ("model.pt", "record.json"):
                shutil.copy(kd_run.root / run.name / name, run / name)
            (run / "owner.json").unlink()

    lines, results = [], []
    holding = threading.Thread(target=holder)
    holding.start()
    try:
        assert held.wait(10)
        waiting = threading.Thread(target=lambda: results.append(st.ensure(kd_run.cfg, progress=False,
                                                                           log=lines.append)))  # fmt: skip
        waiting.start()
        deadline = time.monotonic() + 10
        while not any("waiting for" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.02)
        waits = [line for line in lines if "waiting for" in line]
        assert waits and "process 4242 on elsewhere" in waits[0] and str(run) in waits[0], lines
        assert waiting.is_alive() and not results, "it did not wait for the lock"
    finally:
        release.set()
        holding.join(30)
    waiting.join(30)
    assert not waiting.is_alive()
    # The run finished while it waited: the record is reused, not trained again.
    assert results == [kd_run.record]


# A cheap distillation from the CLI: one epoch of the suite's student from a teacher of one epoch.
KD_CLI_ARGS = ["distill", "--dataset", "digits", "--teacher", "resnet8", "--student", STUDENT, "--epochs", "1",
               "--seed", "3", "--device", "cpu", "--no-progress"]  # fmt: skip


# -- 4. trust that holds when things change quietly (issue 16) --------------------------------------------------
def test_a_changed_loss_is_other_code_and_a_comment_is_not():
    """The code digest follows the program, not its text: kd_loss's body changed is another digest; a comment, a
    docstring or the layout changed is the same one; notebooks are not part of it."""
    source = (Path(provenance.PACKAGE) / "distillers.py").read_text()
    same = {
        "comment": source.replace("def kd_loss(", "# a new comment\ndef kd_loss(", 1),
        "docstring": source.replace('"""', '"""Reworded. ', 1),
        "layout": source.replace("def kd_loss(", "\n\n\ndef kd_loss(", 1),
    }
    digest = provenance.module_digest(source)
    for what, text in same.items():
        assert provenance.module_digest(text) == digest, what
    changed = source.replace("* temperature**2 /", "* 0.5 * temperature**2 /", 1)
    assert changed != source and provenance.module_digest(changed) != digest
    names = {p.relative_to(provenance.PACKAGE).as_posix() for p in provenance.code_files()}
    assert {
        "distillers.py",
        "train.py",
        "condense/ogve.py",
        "trainers.py",
        "models/resnet.py",
        "data/device.py",
    } <= names
    assert not {"runs.py", "cli.py", "book.py", "plan.py"} & names and not any("notebooks" in n for n in names)


def test_a_record_made_by_other_code_is_stale(kd_run, tmp_path, monkeypatch):
    """kd_loss changed without a NUMERICS_VERSION bump: the old record is refused as stale, naming the code;
    --keep-stale reuses it saying which record; records say which code made them and whether the tree was
    modified."""
    st, old = kd_run.copy(tmp_path)
    assert kd_run.record["code"] == provenance.code_digest() and isinstance(kd_run.record["git_modified"], list)
    monkeypatch.setattr(provenance, "code_digest", lambda: "0123456789abcdef")
    with pytest.raises(StaleRun, match="made by other code") as err:
        RunStore(st.root).ensure(kd_run.cfg, progress=False)
    assert str(old) in str(err.value) and "numerics" not in str(err.value)
    lines = []
    assert RunStore(st.root, stale="keep").ensure(kd_run.cfg, progress=False, log=lines.append) == kd_run.record
    assert any(str(old / "record.json") in line for line in lines), lines


def test_a_record_of_another_test_split_is_stale(kd_run, tmp_path, monkeypatch):
    st, old = kd_run.copy(tmp_path)
    real = kcdlib.data.fingerprint
    monkeypatch.setattr(kcdlib.data, "fingerprint", lambda *a, **kw: {**real(*a, **kw), "test_sha256": "1" * 64})
    with pytest.raises(StaleRun, match="other data \\(test split"):
        RunStore(st.root).ensure(kd_run.cfg, progress=False)


def test_a_run_folder_that_is_a_link_is_refused_and_nothing_is_written_through_it(kd_run, tmp_path):
    """A link in place of a run's folder, to another run's folder and to a folder outside the store: one line naming
    it, and the other run's record and model untouched."""
    st, run = kd_run.copy(tmp_path)
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.rmtree(run)
    for target in (other, st.path(kd_run.cfg.teacher)):
        if run.is_symlink():
            run.unlink()
        run.symlink_to(target, target_is_directory=True)
        before = sorted((p.name, p.stat().st_mtime_ns) for p in target.iterdir())
        with pytest.raises(StoreError, match=f"run folder '{re.escape(str(run))}' is a link"):
            st.ensure(kd_run.cfg, progress=False)
        assert sorted((p.name, p.stat().st_mtime_ns) for p in target.iterdir()) == before
    same_run = ["distill", "--dataset", "digits", "--teacher", "resnet20", "--teacher-epochs", str(TEACHER_EPOCHS),
                "--student", STUDENT, "--epochs", "1", "--seed", "7", "--device", "cpu", "--no-progress"]  # fmt: skip
    result = run_cli(*same_run, "--runs-dir", str(st.root))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "is a link" in result.stderr and "Traceback" not in result.stderr


def test_a_planted_link_at_a_temporary_file_is_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    target = tmp_path / "record.json"
    (tmp_path / f".record.json.{os.getpid()}.tmp").symlink_to(victim)
    files.atomic_write(target, b"{}")
    assert victim.read_text() == "untouched" and target.read_bytes() == b"{}" and not target.is_symlink()


@pytest.mark.parametrize(
    "text, why",
    [
        ('{"final_top1": NaN}', "bare NaN"),
        ('{"final_top1": 1e999}', "not finite"),
        ("[" * 100_000 + "]" * 100_000, "nested deeper"),
        ("[" * 40 + "]" * 40, "nested deeper"),
    ],
    ids=["nan", "overflow", "deep", "deeper-than-a-record"],
)
def test_malformed_json_is_named_never_a_traceback(tmp_path, text, why):
    path = tmp_path / "record.json"
    path.write_text(text)
    with pytest.raises(files.BadFile, match=why):
        files.read_json(path)


def test_malformed_records_are_set_aside_and_one_folder_never_blocks_the_store(kd_run, small_teacher, tmp_path):
    """A record with a bare NaN, a resealed record with a string where a number belongs, and a deeply nested
    config.json in another run's folder: named as damaged, the run trained again, the other runs untouched."""
    st, run = kd_run.copy(tmp_path)
    other = st.root / small_teacher.record["hash"]
    shutil.copytree(small_teacher.root / small_teacher.record["hash"], other)
    (other / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    text = (run / "record.json").read_text()
    for bad, why in (
        (text.replace('"final_top1": ', '"final_top1": NaN, "x": ', 1), "bare NaN"),
        (json.dumps(kcdlib.records.sealed({**kd_run.record, "final_top1": "99.9"})), "'final_top1' is \"99.9\""),
    ):
        (run / "record.json").write_text(bad)
        assert RunStore(st.root).record(small_teacher.cfg) is not None
        with pytest.warns(StoreWarning, match=f"is damaged \\(.*{re.escape(why)}"):
            assert RunStore(st.root).record(kd_run.cfg) is None
    with pytest.warns(StoreWarning, match="is damaged"):
        rec = RunStore(st.root).ensure(kd_run.cfg, progress=False)
    assert stable(rec) == stable(kd_run.record) and (run / "record.json.damaged").exists()


def test_a_record_that_is_a_link_is_damaged(kd_run, tmp_path):
    st, run = kd_run.copy(tmp_path)
    outside = tmp_path / "forged.json"
    os.replace(run / "record.json", outside)
    (run / "record.json").symlink_to(outside)
    with pytest.warns(StoreWarning, match="is a link"):
        assert st.record(kd_run.cfg) is None


def test_a_diverged_run_leaves_nothing_and_leftovers_go_at_the_next_start(kd_run, tmp_path, monkeypatch):
    st, run = kd_run.copy(tmp_path)
    cfg = replace(kd_run.cfg, seed=11)

    def diverge(self, on_epoch_end=None):
        raise Diverged("the loss is NaN at epoch 1")

    with monkeypatch.context() as mp:
        mp.setattr(Trainer, "run", diverge)
        with pytest.raises(Diverged):
            st.ensure(cfg, progress=False)
    assert not st.path(cfg).exists()
    # What a killed process left: an abandoned start and half-written files in a finished run's folder.
    abandoned = st.root / ("f" * 16)
    abandoned.mkdir()
    (abandoned / "config.json").write_text("{}")
    (abandoned / "owner.json").write_text("{}")
    half = [run / ".record.json.999999.tmp", run / ".checkpoint-e000001-v0-0.pt.999999.tmp"]
    for path in half:
        path.write_bytes(b"x" * 1000)
    reader_cache = run / ".watch.npz.999999.tmp"  # a notebook's cache beside a finished run: not the trainer's
    reader_cache.write_bytes(b"x")
    RunStore(st.root).ensure(kd_run.cfg, progress=False)
    assert not abandoned.exists() and not any(p.exists() for p in half) and reader_cache.exists()


def test_two_processes_build_the_same_runs_at_once(tmp_path):
    """Two processes ask a fresh store for the same teacher and student at once (as two notebooks of one build
    do): one identity each, one trains and the other reuses, no stale run, no second folder."""
    runs = tmp_path / "runs"
    args = [*KD_CLI_ARGS, "--teacher-epochs", "1", "--runs-dir", str(runs)]
    command = [sys.executable, "-m", "kcdlib", *args]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
             for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    assert len({o.strip().splitlines()[-1] for o, _ in outs}) == 1
    assert len(list(runs.iterdir())) == 2 and len(list(runs.glob("*/record.json"))) == 2


def test_the_code_digest_is_the_same_under_every_python():
    """The digest must not change with the interpreter (the GPU machine runs 3.12, this one 3.11): computed by
    every other CPython 3.10+ found on this machine (pyenv's or on PATH), it equals this process's."""
    found = [*Path("/root/.pyenv/versions").glob("3.1[0-9]*/bin/python"), *Path("/usr/bin").glob("python3.1[0-9]")]
    others = sorted(str(p) for p in found if p.is_file())
    if not others:
        pytest.skip("no other CPython 3.10+ on this machine to compare the code digest with")
    code = "from kcdlib import provenance; print(provenance.code_digest())"
    env = {**CHILD_ENV, "PYTHONPATH": str(provenance.PACKAGE.parent)}
    for python in others:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, timeout=60)
        assert done.stdout.strip() == provenance.code_digest(), (python, done.stderr[-500:])
