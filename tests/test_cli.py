"""The command line: help, a clear paragraph and exit status 2 on bad input, never a traceback."""

import errno
import json
import os
import subprocess

import pytest
import torch
from conftest import run_cli

from kcdlib import models
from kcdlib.cli import main


def run_main(capsys, *args):
    """The CLI in this process (no interpreter start-up); an uncaught exception fails the test by itself."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def assert_clean_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert proc.stderr.startswith("kcd: error:") or "error:" in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_help_reads_well(capsys):
    for args, words in ((["--help"], ("teacher", "distill", "record.json")),
                        (["distill", "--help"], ("--teacher-ckpt", "--student", "--compile"))):  # fmt: skip
        with pytest.raises(SystemExit) as exited:
            main(args)
        assert exited.value.code == 0
        out = capsys.readouterr().out
        assert all(word in out for word in words), out


@pytest.mark.parametrize(
    "args, needles",
    [
        (["teacher", "--arch", "resnet9000"], ["unknown architecture 'resnet9000'", "resnet8x4"]),
        (["teacher", "--arch", "resnet8", "--dataset", "mnist"], ["unknown dataset 'mnist'", "cifar100"]),
        (["distill", "--teacher", "resnet20", "--student", "resnet8", "--distiller", "fitnet"], ["'fitnet'"]),
        (["teacher", "--arch", "resnet8", "--device", "cuda:0"], []),
    ],
)
def test_bad_names_are_one_clear_paragraph(tmp_path, capsys, args, needles):
    if "cuda:0" in args and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device, so asking for one is not an error")
    assert_clean_error(run_main(capsys, *args, "--runs-dir", str(tmp_path)), *needles)


def test_missing_cifar100_says_where(tmp_path):
    """Through a real process: status 2, one paragraph, no traceback."""
    proc = run_cli("teacher", "--arch", "resnet8", "--dataset", "cifar100", "--data-root", str(tmp_path / "nowhere"),
                   "--runs-dir", str(tmp_path), "--device", "cpu")  # fmt: skip
    assert_clean_error(proc, "cifar-100-python", "nowhere")


def test_checkpoint_of_the_wrong_architecture(tmp_path, capsys):
    ckpt = tmp_path / "resnet8_vanilla.pth"
    models.save_checkpoint(models.create("resnet8", num_classes=10), ckpt)
    proc = run_main(capsys, "distill", "--teacher-ckpt", str(ckpt), "--teacher-arch", "resnet20",
                    "--student", "resnet8", "--runs-dir", str(tmp_path), "--device", "cpu")  # fmt: skip
    assert_clean_error(proc, "resnet20", "missing")


def test_corrupt_and_missing_checkpoints(tmp_path, capsys):
    bad = tmp_path / "resnet20_bad.pth"
    bad.write_bytes(b"\x00garbage")
    proc = run_main(capsys, "distill", "--teacher-ckpt", str(bad), "--student", "resnet8", "--runs-dir", str(tmp_path),
                   "--device", "cpu", "--no-progress")  # fmt: skip
    assert_clean_error(proc, "resnet20")
    proc = run_main(capsys, "distill", "--teacher-ckpt", str(tmp_path / "absent.pth"), "--teacher-arch", "resnet20",
                   "--student", "resnet8", "--runs-dir", str(tmp_path), "--device", "cpu")  # fmt: skip
    assert_clean_error(proc, "absent.pth")


def test_distill_from_a_published_style_checkpoint(tmp_path, capsys, store, digits_teacher):
    """A RepDistiller-format file of the right architecture is accepted and identified by content."""
    ckpt = store.model_path(digits_teacher)
    proc = run_main(capsys, "distill", "--dataset", "digits", "--teacher-ckpt", str(ckpt), "--teacher-arch", "resnet20",
                   "--student", "resnet8", "--epochs", "1", "--runs-dir", str(tmp_path), "--device", "cpu")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].endswith("record.json") and "top-1" in lines[-2]


@pytest.mark.parametrize(
    "flag, value, needle",
    [("--epochs", "-3", "must be at least 1"), ("--epochs", "x", "'x' is not a whole number"),
     ("--seed", "-1", "must be at least 0"),
     ("--teacher-epochs", "0", "must be at least 1"), ("--stage-epochs", "0", "must be at least 1")],
)  # fmt: skip
def test_numbers_out_of_range_are_refused_before_anything_runs(tmp_path, capsys, flag, value, needle):
    with pytest.raises(SystemExit) as exited:
        main(["distill", "--teacher", "resnet20", "--student", "resnet8", flag, value, "--runs-dir", str(tmp_path)])
    assert exited.value.code == 2
    assert f"argument {flag}: {needle}" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_warnings_are_one_line_for_the_reader(tmp_path, capsys, store, digits_teacher):
    proc = run_main(capsys, "distill", "--dataset", "digits", "--teacher-ckpt", str(store.model_path(digits_teacher)),
                    "--teacher-arch", "resnet20", "--student", "resnet8", "--epochs", "1", "--compile", "graph",
                    "--runs-dir", str(tmp_path), "--device", "cpu", "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "kcd: warning: compile 'graph' records CUDA graphs and needs a CUDA device" in proc.stderr
    assert "UserWarning" not in proc.stderr and ".py:" not in proc.stderr


DISTILL = ["distill", "--dataset", "digits", "--teacher", "resnet20", "--student", "resnet8", "--device", "cpu"]
UNIX = [*DISTILL, "--method", "unix"]
KCD = [*DISTILL, "--method", "kcd"]


@pytest.mark.parametrize(
    "args, needles",
    [
        ([*UNIX, "--unix-w", "nan"], ["option w", "finite"]),
        ([*UNIX, "--unix-w", "-50"], ["option w", ">= 0"]),
        ([*UNIX, "--unix-k", "100000"], ["option k", "at most the batch size 64"]),
        ([*KCD, "--cost-exponent", "nan"], ["option cost_exponent", "finite"]),
        ([*KCD, "--cost-exponent", "inf"], ["option cost_exponent", "finite"]),
        ([*KCD, "--cost-exponent", "-1"], ["option cost_exponent", ">= 0"]),
        ([*KCD, "--eps-m", "1.5"], ["option eps_m", "in [0, 1]"]),
        ([*KCD, "--rho", "0"], ["option rho", "in (0, 1]"]),
        ([*KCD, "--epochs", "10"], ["six stages", "stage_epochs"]),
        ([*DISTILL, "--temperature", "0"], ["option temperature", "> 0"]),
        ([*DISTILL, "--gamma", "-1"], ["option gamma", ">= 0"]),
        ([*DISTILL, "--beta", "1"], ["distiller 'kd' has no option beta", "gamma, kd_weight, temperature"]),
        ([*DISTILL, "--rho", "0.5"], ["--rho belongs to --method kcd"]),
        ([*DISTILL, "--teacher-arch", "resnet32"], ["--teacher-arch is for --teacher-ckpt"]),
        ([*DISTILL, "--device", "tpu"], ["device 'tpu'", "cpu, cuda"]),
        (["teacher", "--arch", "resnet8", "--dataset", "cifar100", "--data-root", "nowhere"], ["cifar-100-python"]),
    ],
)
def test_bad_input_is_one_line_before_any_training(tmp_path, capsys, args, needles):
    """Every row of issue #6's list of bad input: status 2, one line, nothing trained (no run folder written)."""
    proc = run_main(capsys, *args, "--runs-dir", str(tmp_path / "runs"), "--no-progress")
    assert_clean_error(proc, *needles)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not list(tmp_path.glob("runs/*/config.json")), "something was trained before the options were checked"


def test_a_teacher_checkpoint_flag_for_the_wrong_source_is_refused(tmp_path, capsys, store, digits_teacher):
    proc = run_main(capsys, "distill", "--dataset", "digits", "--teacher-ckpt", str(store.model_path(digits_teacher)),
                    "--teacher-arch", "resnet20", "--teacher-epochs", "3", "--student", "resnet8",
                    "--runs-dir", str(tmp_path), "--device", "cpu")  # fmt: skip
    assert_clean_error(proc, "--teacher-epochs is for a teacher trained here")


def test_a_huge_seed_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main([*DISTILL, "--seed", str(2**40), "--runs-dir", str(tmp_path)])
    assert exited.value.code == 2
    assert "argument --seed: must be at most 2147483647" in capsys.readouterr().err


@pytest.mark.parametrize(
    "errno_, needle",
    [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only"), (errno.EACCES, "permission denied")],
)
def test_the_environment_refusing_a_write_is_one_line(tmp_path, capsys, monkeypatch, errno_, needle):
    def refuse(src, dst):
        raise OSError(errno_, os.strerror(errno_))

    monkeypatch.setattr("kcdlib.runs.os.replace", refuse)
    proc = run_main(capsys, "teacher", "--arch", "resnet8", "--dataset", "digits", "--epochs", "1",
                    "--runs-dir", str(tmp_path), "--device", "cpu", "--no-progress")  # fmt: skip
    assert_clean_error(proc, "cannot write", needle)


def test_a_runs_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    for runs in (tmp_path / "file", tmp_path / "file" / "below"):
        proc = run_main(capsys, "teacher", "--arch", "resnet8", "--epochs", "1", "--runs-dir", str(runs),
                        "--device", "cpu")  # fmt: skip
        assert_clean_error(proc, str(runs))


def test_a_diverging_run_stops_naming_the_epoch_and_records_nothing(tmp_path, capsys, monkeypatch):
    from kcdlib.distillers import CrossEntropy

    monkeypatch.setattr(
        CrossEntropy, "forward", lambda self, *a: {"ce": torch.tensor(float("nan"), requires_grad=True)}
    )
    proc = run_main(capsys, "teacher", "--arch", "resnet8", "--epochs", "2", "--runs-dir", str(tmp_path),
                    "--device", "cpu", "--no-progress")  # fmt: skip
    assert_clean_error(proc, "diverged in epoch 1", "training loss is nan")
    assert not list(tmp_path.glob("*/record.json"))


def test_teacher_checkpoints_with_nonfinite_or_useless_weights(tmp_path, capsys):
    model = models.create("resnet8", num_classes=10)
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    models.save_checkpoint(model, tmp_path / "nan.pth")
    args = ["distill", "--dataset", "digits", "--teacher-arch", "resnet8", "--student", "resnet8", "--epochs", "1",
            "--runs-dir", str(tmp_path / "runs"), "--device", "cpu", "--no-progress"]  # fmt: skip
    assert_clean_error(run_main(capsys, *args, "--teacher-ckpt", str(tmp_path / "nan.pth")), "non-finite")
    # Garbled bytes that still parse as weights: accepted, but its measured accuracy is recorded and flagged.
    models.save_checkpoint(models.create("resnet8", num_classes=10), tmp_path / "random.pth")
    proc = run_main(capsys, *args, "--teacher-ckpt", str(tmp_path / "random.pth"))
    assert proc.returncode == 0, proc.stderr
    assert "kcd: warning: the teacher" in proc.stderr and "is it the right file?" in proc.stderr
    record = json.loads(open(proc.stdout.strip().splitlines()[-1]).read())
    assert record["teacher_accuracy"]["top1"] < 20.0


def test_a_reused_run_says_when_it_was_trained(tmp_path, capsys, store, digits_teacher):
    args = ["distill", "--dataset", "digits", "--teacher-ckpt", str(store.model_path(digits_teacher)),
            "--teacher-arch", "resnet20", "--student", "resnet8", "--epochs", "1", "--runs-dir", str(tmp_path),
            "--device", "cpu", "--no-progress"]  # fmt: skip
    first = run_main(capsys, *args)
    again = run_main(capsys, *args)
    assert first.returncode == again.returncode == 0
    folder = first.stdout.strip().splitlines()[-1].rsplit("/", 1)[0]
    assert f"kcd: reused {folder} (trained 20" in again.stderr


def test_keep_stale_prints_the_record_it_reused(tmp_path, capsys, monkeypatch):
    """The last line (and the notice) name the record.json reused, not the folder the new numerics would use."""
    import kcdlib.identity

    args = ["teacher", "--dataset", "digits", "--arch", "resnet8", "--epochs", "1", "--runs-dir", str(tmp_path),
            "--device", "cpu", "--no-progress"]  # fmt: skip
    old = run_main(capsys, *args).stdout.strip().splitlines()[-1]
    assert old.endswith("record.json") and os.path.isfile(old)
    monkeypatch.setattr(kcdlib.identity, "NUMERICS_VERSION", kcdlib.identity.NUMERICS_VERSION + 1)
    proc = run_main(capsys, *args, "--keep-stale")
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == old
    assert f"kcd: reused {old} (trained" in proc.stderr, proc.stderr


def _processes_with(marker: str) -> list[int]:
    """The processes whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the launched processes through /proc (Linux)")
def test_killing_kcd_nproc_stops_torchrun_and_its_workers(tmp_path):
    """A real SIGKILL of `kcd distill --nproc 2`: torchrun and both workers stop (they trained on, orphaned)."""
    import signal
    import sys
    import time

    from conftest import CHILD_ENV

    runs = str(tmp_path / "runs-kill-nproc")  # in every launched process's command line
    kcd = subprocess.Popen(
        [sys.executable, "-m", "kcdlib", "distill", "--nproc", "2", "--dataset", "digits", "--teacher", "resnet8",
         "--teacher-epochs", "50", "--student", "resnet8", "--runs-dir", runs, "--device", "cpu", "--no-progress"],
        env=CHILD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while len(_processes_with(runs)) < 4 and time.time() < deadline:  # kcd, torchrun, two workers
            time.sleep(0.5)
        assert len(_processes_with(runs)) >= 4, "the workers did not start"
        time.sleep(2)
        kcd.send_signal(signal.SIGKILL)
        kcd.wait()
        deadline = time.time() + 60
        while _processes_with(runs) and time.time() < deadline:
            time.sleep(0.5)
        assert _processes_with(runs) == [], "torchrun or a worker survived the launcher"
    finally:
        for pid in _processes_with(runs):
            os.kill(pid, signal.SIGKILL)
