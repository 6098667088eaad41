"""The command line: help, a clear paragraph and exit status 2 on bad input, never a traceback."""

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
