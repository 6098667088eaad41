"""`kcd runs verify`: stored final models re-evaluated against their records, on real digits runs."""

import hashlib
import json

import pytest
import torch
from conftest import copy_run, run_cli, short_kd

import kcdlib.data
from kcdlib import cli, verify
from kcdlib.book import build_book
from kcdlib.buildoptions import BuildOptions
from kcdlib.records import read_record, sealed


@pytest.fixture(scope="module")
def two_runs(store, digits_teacher):
    """The suite's digits teacher and a one-epoch KD student from it (both in the session's store)."""
    kd = short_kd(digits_teacher, epochs=1, seed=11)
    store.ensure(kd, progress=False)
    return digits_teacher, kd


@pytest.fixture
def copied(store, two_runs, tmp_path):
    """A store of its own holding copies of the two runs: ``(root, teacher folder, student folder)``."""
    root = tmp_path / "runs"
    root.mkdir()
    for cfg in two_runs:
        copy_run(store, cfg, root)
    return root, *(root / store.path(cfg).name for cfg in two_runs)


def forge(folder, **changes):
    """Rewrite ``folder``'s record with ``changes`` and a valid checksum: what a checksum cannot catch."""
    record = {**read_record(folder / "record.json"), **changes}
    (folder / "record.json").write_text(json.dumps(sealed(record)))


def shifted(folder, images):
    """The record's final top-1 moved by ``images`` test images (its last epoch row too, as a forger would)."""
    record = read_record(folder / "record.json")
    top1 = record["final_top1"] + 100.0 * images / record["data"]["num_test"]
    return {"final_top1": top1, "epochs": [*record["epochs"][:-1], {**record["epochs"][-1], "top1": top1}]}


def test_intact_runs_verify_exactly(copied):
    root, teacher, student = copied
    verdicts = verify.verify_store(root, device="cpu")
    assert [v.run for v in verdicts] == sorted([teacher.name, student.name])
    for v in verdicts:
        assert v.ok, v.line()
        assert (v.images_off, v.allowed, v.num_test) == (0, 0, 360)  # a CPU fp32 record on a CPU: exact
        assert v.checked == ["record checksum and hash", "model sha256", "data fingerprint", "model loads strictly",
                             "top-1/top-5 on 360 test images"]  # fmt: skip
        assert v.line().startswith(f"ok {v.run} digits ") and f"({v.hits}/360 images)" in v.line()


def test_resealed_accuracy_fails_in_images(copied):
    root, teacher, _ = copied
    forge(teacher, **shifted(teacher, 3))
    read_record(teacher / "record.json")  # the checksum holds: only re-evaluation finds it
    v = verify.verify_run(teacher, device="cpu")
    assert not v.ok
    assert "top-1 re-evaluated" in v.line() and "3 images apart (at most 0 allowed)" in v.line()
    assert "top-5" not in v.line()


def test_other_device_allows_a_stated_number_of_images(copied):
    """A GPU record may be off by rounding: up to max(2, 0.1 %) images pass, and the difference is said."""
    root, teacher, _ = copied
    forge(teacher, device="NVIDIA H200", **shifted(teacher, 2))
    v = verify.verify_run(teacher, device="cpu")
    assert v.ok and "2 images from the record (at most 2 allowed)" in v.line()
    forge(teacher, **shifted(teacher, 1))
    v = verify.verify_run(teacher, device="cpu")
    assert not v.ok and "3 images apart (at most 2 allowed)" in v.line()
    for other in ({"device": "cpu (x86_64, 16 cores)", "world_size": 2}, {"execution": {"compile": "default"}}):
        assert not verify.exact_rule({**read_record(teacher / "record.json"), **other}, torch.device("cpu"))
    assert verify.allowed_images(10_000, exact=False) == 10 and verify.allowed_images(50_000, exact=False) == 50


def test_swapped_model_fails_on_its_hash(copied):
    root, teacher, student = copied
    (teacher / "model.pt").write_bytes((student / "model.pt").read_bytes())
    v = verify.verify_run(teacher, device="cpu")
    assert not v.ok and "model.pt is not the model the record names" in v.line()
    assert "model sha256" not in v.checked


class Planted:
    """A pickle that creates ``marker`` when unpickled by a loader that runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_planted_pickle_is_refused_unrun(copied, tmp_path):
    root, teacher, _ = copied
    marker = tmp_path / "ran"
    torch.save({"model": Planted(marker)}, teacher / "model.pt")
    blob = (teacher / "model.pt").read_bytes()
    forge(teacher, model_sha256=hashlib.sha256(blob).hexdigest())  # so the hash passes and loading is reached
    v = verify.verify_run(teacher, device="cpu")
    assert not v.ok and "model.pt is not tensors only: refused unread" in v.line()
    assert not marker.exists()
    # The plant is real: a loader that runs code creates the marker.
    planted = tmp_path / "planted.pt"
    torch.save({"model": Planted(tmp_path / "ran-here")}, planted)
    torch.load(planted, weights_only=False)
    assert (tmp_path / "ran-here").exists()


def test_changed_data_fails_naming_the_fields(copied, monkeypatch):
    root, teacher, _ = copied
    real = kcdlib.data.fingerprint("digits")
    other = {**real, "train_sha256": "0" * 64, "test_sha256": "1" * 64}
    monkeypatch.setattr(kcdlib.data, "fingerprint", lambda name, root="data": other)
    v = verify.verify_run(teacher, device="cpu")
    assert not v.ok
    assert (
        f"the data under 'data' is not the record's: test_sha256 (record {real['test_sha256'][:12]}, here "
        "111111111111), " in v.line()
    )
    assert f"train_sha256 (record {real['train_sha256'][:12]}, here 000000000000)" in v.line()


def test_cli_lines_and_exit_codes(copied, capsys):
    root, teacher, student = copied
    assert cli.main(["runs", "verify", student.name, "--runs-dir", str(root), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"ok {student.name} digits resnet8 top-1 ") and lines[0].endswith("data ok")
    assert lines[1:] == [f"verified 1 run in {root}: 1 ok"]
    forge(teacher, **shifted(teacher, -5))
    failed = run_cli("runs", "verify", "--runs-dir", str(root), "--device", "cpu")  # the real command, in a process
    assert failed.returncode == 1 and failed.stderr == ""
    *runs, last = failed.stdout.splitlines()
    bad, good = sorted(runs, key=lambda line: not line.startswith("FAILED"))
    assert bad.startswith(f"FAILED {teacher.name}: top-1 re-evaluated ") and bad.endswith(
        "5 images apart (at most 0 allowed)"
    )
    assert good.startswith(f"ok {student.name} ")
    assert last == f"verified 2 runs in {root}: 1 ok, 1 FAILED"


@pytest.mark.parametrize(
    "args, why",
    [
        (["0123456789abcdef"], "no finished run '0123456789abcdef' in "),
        (["--runs-dir", "/nonexistent/runs"], "no runs folder"),
    ],
)
def test_cli_bad_input_is_one_line(copied, capsys, args, why):
    root = copied[0]
    assert cli.main(["runs", "verify", "--runs-dir", str(root), *args, "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("kcd: error: ") and why in err and err.count("\n") == 1


def test_book_verify_checks_the_store_and_fails_the_build(copied, tmp_path):
    root, teacher, _ = copied
    lines = []
    build = BuildOptions(profile="tiny", device="cpu", runs_dir=str(root))
    build_book(build, out=tmp_path / "book", names=(), html=False, verify=True, echo=lines.append)
    assert lines[-1] == f"verified 2 runs in {root}: 2 ok"
    forge(teacher, **shifted(teacher, 4))
    with pytest.raises(verify.VerificationFailed, match=f"^1 of 2 runs in {root} failed verification: {teacher.name}$"):
        build_book(build, out=tmp_path / "book", names=(), html=False, verify=True, echo=lines.append)
