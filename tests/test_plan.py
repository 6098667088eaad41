"""`kcd book --plan`: every run the book needs, which the store holds, how long the rest will take; nothing trained."""

import json
import re
from pathlib import Path

import pytest
import torch

from kcdlib import artefacts, cli, estimate, files, plan
from kcdlib.artefacts import declare
from kcdlib.buildoptions import BuildOptions
from kcdlib.identity import with_teachers
from kcdlib.profiles import get_profile
from kcdlib.runs import RunStore


def fake_timer(cfg, device, **kw):
    """A step cost without timing anything: the plan's logic, fast and deterministic."""
    return estimate.StepCost(step=1e-3, student_forward=3e-4, evaluate=1e-4, batch=cfg.recipe.batch_size)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """A store holding one finished run of the tiny book: the student trained alone (resnet8, 3 epochs)."""
    store = RunStore(tmp_path_factory.mktemp("plan-runs"), device="cpu")
    cfg = declare.student_run(get_profile("tiny"), "resnet8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two OpenMP threads on a shared 2-core machine spin against other processes
    try:
        store.ensure(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    return store, cfg


def test_tiny_plan_lists_the_book_runs_and_marks_the_stored_one(tiny_store):
    store, done = tiny_store
    frame = plan.plan("tiny", store, timer=fake_timer)
    runs = with_teachers(artefacts.all_runs("tiny"))  # the book's order, each teacher before its students
    assert list(frame.options_hash) == [c.options_hash for c in runs]
    assert dict(zip(frame.options_hash, frame.status)) == {
        c.options_hash: "done" if c == done else "missing" for c in runs
    }
    assert (frame.est_s > 0).all() and (frame.gpu_s > 0).all()
    kcd = frame[(frame.method == "kcd") & (frame.options == "stage_epochs=1")].iloc[0]
    assert kcd["points %"] == pytest.approx(100 * declare.kcd_computation(get_profile("tiny")), abs=1)
    text = plan.format_plan(frame)
    assert "10 runs: 1 done, 9 missing" in text
    # The runs still to train exclude the stored one; all of them include it.
    assert frame.attrs["to_train_s"] == pytest.approx(frame.est_s[frame.status != "done"].sum())
    assert frame.attrs["all_s"] == pytest.approx(frame.est_s.sum())
    # A run trained alone has no method and no distiller (it read "kd" and "ce"); the notebooks' tags are explained.
    alone = frame[frame.kind == "teacher"]
    assert len(alone) and set(alone.method) == set(alone.distiller) == {plan.TRAINED_ALONE}
    assert "5min kcd_in_five_minutes" in text and "trained with cross-entropy alone" in text


def test_cli_plan_times_steps_and_trains_nothing(tiny_store, capsys):
    """`kcd book --profile tiny --plan` (the command line's entry point, in this process: a child process would
    import torch again), with the real timer: steps timed, nothing written to the store."""
    store, done = tiny_store
    before = sorted(p.relative_to(store.root) for p in store.root.rglob("*"))
    assert cli.main(["book", "--profile", "tiny", "--plan", "--runs-dir", str(store.root), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    total = [line for line in lines if line.startswith("total: ")]
    assert len(total) == 1 and total[0].startswith("total: 9 of 10 runs to train"), captured.out
    assert "10 runs: 1 done, 9 missing" in captured.out
    assert "timing 4 teacher/student/distiller combinations on cpu" in captured.err
    rows = [line.split() for line in lines if line.split()[:1] and line.split()[0].isdigit()]
    assert [row[1:4] for row in rows if row[1] == "done"] == [["done", "teacher", "resnet8"]]  # resnet8 alone
    assert sorted(p.relative_to(store.root) for p in store.root.rglob("*")) == before  # nothing written


def test_missing_dataset_gives_unknown_status_not_a_traceback(tmp_path, monkeypatch, capsys):
    store = RunStore(tmp_path / "runs", "/nonexistent", "cpu")
    frame = plan.plan("course", store, timer=fake_timer)
    assert set(frame.status) == {"unknown"} and len(frame) == len(artefacts.all_runs("course"))
    assert "store status unknown: dataset not found" in plan.format_plan(frame)
    # The command line, in this process, with the same stand-in timer (the real one is exercised above).
    monkeypatch.setattr(plan, "time_steps", fake_timer)
    args = ["book", "--profile", "course", "--plan", "--data-root", "/nonexistent", "--device", "cpu",
            "--runs-dir", str(tmp_path / "runs")]  # fmt: skip
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "store status unknown: dataset not found" in out and "\ntotal: " in out
    assert not (tmp_path / "runs").exists()


def test_schedule_overrides_and_jobs_reach_the_plan(tmp_path):
    build = BuildOptions(profile="course", runs_dir=str(tmp_path / "runs"), data_root="/nonexistent", device="cpu",
                         epochs=12, stage_epochs=2, teacher_epochs=6)  # fmt: skip
    session = artefacts.setup(build)
    frame = plan.plan(session.profile, session.store, jobs_per_device=4, timer=fake_timer)
    assert set(frame.epochs) == {12, 6}
    assert frame.attrs["jobs_per_device"] == 4
    assert frame.attrs["scheduled_s"] == pytest.approx(frame.attrs["to_train_s"])  # a CPU gains nothing


def test_course_fits_an_hour_on_one_h200_with_four_jobs():
    assert estimate.figures().card == "NVIDIA H200"
    gpu = estimate.gpu_estimate("course", jobs_per_device=4)
    assert gpu["runs"] == len(with_teachers(artefacts.all_runs("course")))
    assert gpu["wall_s"] <= 3600  # every slot busy: device time / (4 x 0.74)
    assert gpu["scheduled_s"] <= 3600  # notebook by notebook, teachers first, as kcd book runs them
    assert gpu["wall_s"] == pytest.approx(gpu["device_s"] / estimate.concurrency_speedup(4))


def test_concurrency_model():
    assert estimate.concurrency_speedup(1) == 1.0
    assert estimate.efficiency(4) == pytest.approx(0.74, abs=0.01)
    assert estimate.concurrency_speedup(8) == estimate.concurrency_speedup(4)  # not measured beyond four
    assert estimate.concurrency_speedup(4, "cpu") == 1.0
    speed = estimate.concurrency_speedup
    assert estimate.simulate_wall([[[10.0] * 4]], 1, 1, speed) == pytest.approx(40)
    assert estimate.simulate_wall([[[10.0] * 4]], 1, 4, speed) == pytest.approx(40 / speed(4))
    # Phases run one after another: a lone teacher first gains nothing from the other slots.
    assert estimate.simulate_wall([[[10.0], [10.0] * 4]], 1, 4, speed) == pytest.approx(10 + 40 / speed(4))


def test_the_gpu_figures_are_the_measured_ones_with_their_provenance():
    """The shipped file holds the H200 figures of benchmarks/results' log, each with its card, command and date."""
    raw = files.read_json(estimate.FIGURES)
    log = (Path(__file__).resolve().parents[1] / "benchmarks/results/gpu_check_h200_2026-11-28.log").read_text()
    assert '"engine_images": 50000, "engine_seconds": 7.0789' in log
    assert '"single_images_per_second": 6275.2, "group_images_per_second": 18591.5' in log
    f = estimate.figures()
    assert f.seconds_per_image == pytest.approx(7.0789 / 50_000)
    assert f.concurrency == {1: 1.0, 4: pytest.approx(18_591.5 / 6_275.2)}
    for entry in (raw["epoch"], raw["concurrency"]):
        assert entry["card"] == "NVIDIA H200" and entry["date"] == "2026-11-28" and "gpu_check.sh" in entry["command"]


@pytest.mark.parametrize(
    "change, says",
    [
        (lambda d: d.update(format="other"), "not a kcd-gpu-figures/1 file"),
        (lambda d: d.pop("concurrency"), "no 'concurrency' figure"),
        (lambda d: d["epoch"].update(seconds=-1), "'epoch.seconds' must be a positive number"),
        (lambda d: d["epoch"].update(seconds="7"), "'epoch.seconds' must be a positive number"),
        (lambda d: d["epoch"].pop("command"), "'epoch.command' must be a text"),
        (lambda d: d["epoch"].update(date="28/11/2026"), "'epoch.date' must be YYYY-MM-DD"),
        (lambda d: d["epoch"].update(batch_size=64.5), "'epoch.batch_size' must be a whole number"),
        (lambda d: d["concurrency"].update(compile="graph"), "the estimate is of the book's defaults"),
        (lambda d: d["concurrency"].update(card="NVIDIA H100"), "one card"),
        (lambda d: d["epoch"].update(student="resnet9000"), "not an architecture"),
    ],
)
def test_damaged_gpu_figures_are_refused_in_one_line(tmp_path, change, says):
    data = files.read_json(estimate.FIGURES)
    change(data)
    path = tmp_path / "gpu_figures.json"
    path.write_text(json.dumps(data))
    with pytest.raises(estimate.FiguresError, match=re.escape(says)) as err:
        estimate.figures(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("text, says", [("", "not JSON (empty)"), ('{"format": NaN}', "bare NaN"), ("[1,", "not JSON")])
def test_unreadable_gpu_figures_are_refused_in_one_line(tmp_path, text, says):
    path = tmp_path / "gpu_figures.json"
    path.write_text(text)
    with pytest.raises(estimate.FiguresError, match=re.escape(says)):
        estimate.figures(path)
    with pytest.raises(estimate.FiguresError, match="cannot read"):
        estimate.figures(tmp_path / "absent.json")


def test_step_timing_builds_the_run_stores_trainer():
    """The real timer on the CPU: CRD is built for the dataset's real N (its negatives), from the run's own
    options, through kcdlib.trainers.build_trainer; a KCD run is timed as its plain-KD step."""
    crd = next(c for c in artefacts.all_runs("course") if c.distiller == "crd")
    kcd = next(c for c in artefacts.all_runs("tiny") if c.method == "kcd")
    with estimate.cpu_threads(1):
        cost = estimate.time_steps(crd, "cpu", steps=1)
        assert estimate.time_steps(kcd, "cpu", steps=1).step > 0
    estimate.forget_networks()
    assert cost.step > 0 and cost.evaluate > 0 and 2 <= cost.batch <= 16
    assert cost.student_forward == pytest.approx(cost.step * estimate.student_share(crd.teacher_arch, crd.arch,
                                                                                    crd.dataset))  # fmt: skip
