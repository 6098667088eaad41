"""KCD and UNIX in the engine, on digits: counted computation, condensation, augmentation, options."""

import pytest
import torch
from conftest import STUDENT, short_kd

from kcdlib import condense, cost, models
from kcdlib.errors import BadOption

N = 1437  # digits training points


def kcd(teacher, epochs=12, **options):
    return short_kd(teacher, epochs=epochs, method="kcd", method_options=options)


def test_kcd_paper_schedule_counts_what_eq16_says(store, digits_teacher):
    cfg = kcd(digits_teacher)
    rec = store.ensure(cfg, progress=False)
    sizes = condense.keep_schedule("paper", N, 12, 2, 0.7)
    assert rec["points_distilled"] == 2 * sum(sizes)
    assert rec["points_trained"] == rec["points_distilled"]
    assert [s["kept"] for s in rec["stages"]] == sizes
    # Whole points: each of the six floors loses less than one point.
    assert 0 <= rec["computation_formula"] - rec["computation"] < 1 / N
    assert rec["computation_formula"] == pytest.approx(0.816, abs=5e-4)
    assert [row["points"] for row in rec["epochs"]] == [s for s in sizes for _ in range(2)]
    labels = rec["value_labels"]
    assert len(labels) == N and labels.count("1") == sizes[-1]
    assert rec["final_top1"] > 60.0  # far above chance (10 %) after 12 short epochs


def test_kcd_official_schedule_trains_stage_one_on_everything(store, digits_teacher):
    cfg = kcd(digits_teacher, epochs=6, schedule="official")  # six stages of one epoch
    rec = store.ensure(cfg, progress=False)
    sizes = condense.keep_schedule("official", N, 6, 1, 0.7)
    assert sizes[0] == N and rec["epochs"][0]["points"] == N
    assert rec["points_distilled"] == sum(sizes)
    assert rec["computation"] == pytest.approx(sum(sizes) / (N * 6))
    assert rec["computation"] > 0.85


def test_kcd_mixes_the_runs_own_images_only(store, digits_teacher):
    trainer = store.build_trainer(kcd(digits_teacher, epochs=3, stage_epochs=1), progress=False)
    original = trainer.data.train_images.clone()
    trainer.run()
    assert torch.equal(trainer.data.train_images, original), "the dataset handed in was modified"
    changed = (trainer.images != original).flatten(1).any(1)
    mixed = sum(s["mixed"] for s in trainer.method.stages)
    assert 0 < int(changed.sum()) <= mixed
    # Every changed image belongs to a point that is still, or was once, in the condensed sets.
    assert trainer.method.stages[-1]["kept"] == len(trainer.method.points)


def test_kcd_none_augment_leaves_images_alone(store, digits_teacher):
    trainer = store.build_trainer(kcd(digits_teacher, epochs=3, stage_epochs=1, augment="none"), progress=False)
    assert trainer.images is None  # no copy of the images is made when nothing will be mixed into them
    trainer.run()
    assert all(s["mixed"] == 0 for s in trainer.method.stages)


def test_random_value_ablation_keeps_the_schedule(store, digits_teacher):
    trainer = store.build_trainer(kcd(digits_teacher, epochs=3, stage_epochs=1, value="random"), progress=False)
    trainer.run()
    assert [s["kept"] for s in trainer.method.stages] == condense.keep_schedule("paper", N, 3, 1, 0.7)


def test_bad_kcd_options_are_refused_before_any_training(tmp_path, digits_teacher):
    from kcdlib.runs import RunStore

    empty = RunStore(tmp_path, device="cpu")
    with pytest.raises(BadOption, match="rho"):
        empty.ensure(kcd(digits_teacher, rho=1.5), progress=False)
    with pytest.raises(BadOption, match="no option"):
        empty.ensure(kcd(digits_teacher, gamma=3), progress=False)
    with pytest.raises(BadOption, match="multiple"):
        empty.ensure(kcd(digits_teacher, epochs=10, stage_epochs=4), progress=False)
    assert not list(tmp_path.glob("*/record.json")), "a teacher was trained before the options were checked"


def test_unix_counts_its_passes_as_eq17(store, digits_teacher):
    cfg = short_kd(digits_teacher, epochs=1, method="unix")
    assert cfg.distiller == "unix_kd"
    rec = store.ensure(cfg, progress=False)
    full, last = divmod(N, 64)
    per_epoch = full * 48 + min(48, last)
    assert rec["passes"] == {"N_t": per_epoch, "N_s1": N + per_epoch, "N_s2": per_epoch}
    size = (3, 16, 16)
    r = cost.forward_macs(models.create(STUDENT, 10), size) / cost.forward_macs(models.create("resnet20", 10), size)
    assert rec["computation"] == pytest.approx((per_epoch + (N + 2 * per_epoch) * r) / (N * (1 + 2 * r)))
    assert rec["computation_formula"] == pytest.approx(cost.unix_computation(48, 64, r))
    # The counted cost differs from Eq. 19 only through the last, partial batch.
    assert abs(rec["computation"] - rec["computation_formula"]) < 0.01


def test_nan_entropy_stops_the_run_naming_the_point(store, digits_teacher):
    trainer = store.build_trainer(kcd(digits_teacher, epochs=3, stage_epochs=1), progress=False)
    poisoned = trainer.method.observe

    def observe(indices, entropies):
        entropies = entropies.clone()
        entropies[0] = float("nan")
        poisoned(indices, entropies)

    trainer.method.observe = observe
    with pytest.raises(condense.NonFiniteValue, match="point"):
        trainer.train_epoch()
