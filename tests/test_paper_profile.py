"""The paper profile's gaps, closed: every knowledge point distilled at least once, published teachers."""

import pytest
import torch
from conftest import STUDENT, short_kd

from kcdlib import artefacts, condense, models
from kcdlib.artefacts import declare, five_minutes
from kcdlib.buildoptions import BuildOptions
from kcdlib.cli import main
from kcdlib.methods import KCD, MethodContext
from kcdlib.profiles import PUBLISHED_TEACHER

CIFAR100_TRAIN = 50_000


def replay_never_trained(untrained: str, n: int = CIFAR100_TRAIN, epochs: int = 240, stage: int = 40) -> int:
    """KCD's method at the paper's setting, replayed without a network: every epoch it is shown its points
    with random entropies. Returns how many points it never trained."""
    method = KCD(MethodContext(n, epochs, seed=0, options={"stage_epochs": stage, "untrained": untrained}))
    g = torch.Generator().manual_seed(0)
    for epoch in range(1, epochs + 1):
        points = method.epoch_points(epoch)
        points = torch.arange(n) if points is None else points
        method.observe(points, torch.rand(points.numel(), generator=g, dtype=torch.float64))
        method.end_epoch(epoch, None)
    return int((method.values.frequency == 0).sum())


def test_every_point_is_trained_at_the_papers_scale_with_our_rule():
    assert replay_never_trained("first") == 0
    # The paper read literally: the points its random stage 1 leaves out never come back (2,886 of 50,000).
    left_out = CIFAR100_TRAIN - condense.keep_schedule("paper", CIFAR100_TRAIN, 240, 40, 0.7)[0]
    assert replay_never_trained("last") == left_out == 2886


@pytest.mark.parametrize("untrained", ["first", "last"])
def test_a_digits_run_records_the_points_it_never_distilled(store, digits_teacher, untrained):
    cfg = short_kd(digits_teacher, epochs=3, method="kcd", method_options={"stage_epochs": 1, "untrained": untrained})
    rec = store.ensure(cfg, progress=False)
    first_stage = condense.keep_schedule("paper", 1437, 3, 1, 0.7)[0]
    assert rec["never_distilled"] == (0 if untrained == "first" else 1437 - first_stage)
    # The stage sizes of Eq. 16 are the same under both rules: only which points fill them differs.
    assert [s["kept"] for s in rec["stages"]] == condense.keep_schedule("paper", 1437, 3, 1, 0.7)


def test_untrained_points_rank_ahead_of_trained_ones():
    ranking = torch.tensor([3, 0, 2, 1, 4])
    frequency = torch.tensor([2, 0, 1, 5, 0])
    assert condense.untrained_first(ranking, frequency).tolist() == [1, 4, 3, 0, 2]


def publish(folder, arch, model):
    path = folder / PUBLISHED_TEACHER.format(arch=arch)
    models.save_checkpoint(model, path)
    return path


def test_a_published_teacher_replaces_the_profiles_own(tmp_path, store, digits_teacher):
    teachers = tmp_path / "teachers"
    path = publish(
        teachers, digits_teacher.arch, models.load_checkpoint("resnet20", store.model_path(digits_teacher), 10)
    )
    p = artefacts.setup(
        BuildOptions(profile="tiny", runs_dir=str(tmp_path / "runs"), teachers_dir=str(teachers))
    ).profile
    cfg = declare.distill(p, five_minutes.pair(p))
    assert cfg.teacher is None and cfg.teacher_checkpoint == str(path) and cfg.teacher_arch == "resnet20"
    # A teacher with no published file is still trained here.
    p_none = artefacts.setup(
        BuildOptions(profile="tiny", runs_dir=str(tmp_path / "runs"), teachers_dir=str(tmp_path))
    ).profile
    assert declare.distill(p_none, five_minutes.pair(p_none)).teacher is not None


def test_kcd_distill_uses_a_published_teacher_and_records_its_accuracy(tmp_path, capsys, store, digits_teacher):
    teachers = tmp_path / "teachers"
    publish(teachers, "resnet20", models.load_checkpoint("resnet20", store.model_path(digits_teacher), 10))
    code = main(["distill", "--dataset", "digits", "--teacher", "resnet20", "--teachers-dir", str(teachers),
                 "--student", STUDENT, "--epochs", "1", "--runs-dir", str(tmp_path / "runs"), "--device", "cpu",
                 "--no-progress"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    import json

    record = json.loads(open(out.strip().splitlines()[-1]).read())
    assert record["config"]["teacher"] == {"sha256": record["config"]["teacher"]["sha256"]}
    assert record["teacher_accuracy"]["top1"] == pytest.approx(store.record(digits_teacher)["final_top1"])
    assert record["teacher_accuracy"]["source"].endswith(PUBLISHED_TEACHER.format(arch="resnet20"))


def test_a_broken_published_teacher_is_one_line_naming_the_file(tmp_path, capsys):
    teachers = tmp_path / "teachers"
    wrong = publish(teachers, "resnet20", models.create("resnet8", num_classes=10))
    args = ["distill", "--dataset", "digits", "--teacher", "resnet20", "--teachers-dir", str(teachers),
            "--student", STUDENT, "--epochs", "1", "--runs-dir", str(tmp_path / "runs"), "--device", "cpu"]  # fmt: skip
    for needle in ("does not fit architecture 'resnet20'", "cannot read checkpoint"):
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2 and str(wrong) in err and needle in err and "Traceback" not in err, err
        wrong.write_bytes(b"not a checkpoint")


def test_a_missing_teachers_dir_is_one_line(tmp_path, capsys):
    code = main(
        [
            "distill",
            "--dataset",
            "digits",
            "--teacher",
            "resnet20",
            "--teachers-dir",
            str(tmp_path / "none"),
            "--student",
            STUDENT,
            "--runs-dir",
            str(tmp_path / "runs"),
            "--device",
            "cpu",
        ]
    )
    assert code == 2 and "teachers folder" in capsys.readouterr().err


def test_the_teaching_notebook_honours_its_seeds_parameter(tmp_path):
    p = artefacts.setup(BuildOptions(profile="tiny", runs_dir=str(tmp_path), seeds=[3])).profile
    assert {cfg.seed for cfg in five_minutes.five_minutes_runs(p)} == {3}
