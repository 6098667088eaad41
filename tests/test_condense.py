"""Tests of kcdlib.condense: OGVE, the schedules and their cost, VAKS and the uint8 mixing."""

import io
import math

import numpy as np
import pytest
import torch

from kcdlib.condense import (
    NonFiniteValue,
    SummaryPlan,
    ValueRecord,
    apply_mix,
    first_stage_points,
    keep_schedule,
    schedule_computation,
    summarize,
    value_labels,
)
from kcdlib.errors import BadOption, CheckpointError, KcdError
from kcdlib.released import released_code_schedule

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _epoch(record, indices, entropies):
    record.record(torch.tensor(indices), torch.tensor(entropies, dtype=torch.float32))
    record.end_epoch()


def _ranked_record(entropies):
    """A record after one epoch in which point i had entropy entropies[i] (so V ranks them)."""
    record = ValueRecord(len(entropies))
    _epoch(record, list(range(len(entropies))), entropies)
    return record


# ---------------------------------------------------------------- OGVE


@pytest.mark.parametrize("device", DEVICES)
def test_value_is_the_mean_over_the_epochs_a_point_was_trained_in(device):
    record = ValueRecord(3, device=device)
    _epoch(record, [0, 1], [0.2, 1.0])
    _epoch(record, [1], [3.0])  # point 0 not trained in epoch 2
    _epoch(record, [0, 1], [0.6, 2.0])
    assert record.values.dtype == torch.float64
    assert record.frequency.dtype == torch.int64
    assert record.values.cpu().tolist() == pytest.approx([0.4, 2.0, 0.0])
    assert record.frequency.cpu().tolist() == [2, 3, 0]


def test_a_point_recorded_twice_in_an_epoch_counts_once_with_the_epoch_mean():
    record = ValueRecord(2)
    record.record(torch.tensor([0, 0]), torch.tensor([0.2, 0.4]))  # twice in one call
    record.record(torch.tensor([1]), torch.tensor([1.0]))
    record.record(torch.tensor([1]), torch.tensor([2.0]))  # and across calls
    record.end_epoch()
    assert record.frequency.tolist() == [1, 1]
    assert record.values.tolist() == pytest.approx([0.3, 1.5])
    _epoch(record, [0], [0.9])  # V(0) = mean(0.3, 0.9), not mean(0.2, 0.4, 0.9)
    assert record.values[0].item() == pytest.approx(0.6)


def test_never_trained_points_score_zero_and_rank_last():
    record = ValueRecord(4)
    _epoch(record, [1, 3], [0.5, 0.1])
    for alpha in (0.0, 0.03, -0.5):
        score = record.score(alpha, 40)
        assert score[0].item() == 0.0 and score[2].item() == 0.0
        assert torch.isfinite(score).all()
    assert record.ranking(0.03, 40).tolist() == [1, 3, 0, 2]


def test_cost_aware_factor_reorders_a_ranking_that_value_alone_would_keep():
    # T = 1. Point 0: trained once, V = 1.00. Point 1: trained twice, V = 0.99.
    # V alone (alpha = 0): point 0 first. Cost-aware: 2^0.03 * 0.99 = 1.0108 > 1^0.03 * 1.00.
    record = ValueRecord(2)
    _epoch(record, [0, 1], [1.0, 0.99])
    _epoch(record, [1], [0.99])
    assert record.ranking(0.0, 1).tolist() == [0, 1]
    assert record.ranking(0.03, 1).tolist() == [1, 0]
    assert record.score(0.03, 1).tolist() == pytest.approx([1.0, 2**0.03 * 0.99])
    # With T = 4 the factor (F/T)^alpha is below 1 for both and still favours F = 2.
    assert record.score(0.03, 4).tolist() == pytest.approx([0.25**0.03, 0.5**0.03 * 0.99])


def test_ranking_breaks_ties_by_point_index():
    record = ValueRecord(5)
    _epoch(record, [4, 3, 2, 1, 0], [0.5, 0.7, 0.5, 0.7, 0.5])
    assert record.ranking(0.03, 40).tolist() == [1, 3, 0, 2, 4]


def test_ranking_is_global_so_a_dropped_point_can_come_back():
    record = _ranked_record([0.9, 0.8, 0.7, 0.6])
    plan = summarize(record, 4, 3, alpha=0.03, stage_epochs=1, augment="none")
    assert plan.dropped.tolist() == [3]
    # The next stage trains only on K1; their entropy falls. Point 3 keeps its V = 0.6 and F = 1.
    _epoch(record, [0, 1, 2], [0.1, 0.3, 0.5])
    assert record.values[3].item() == pytest.approx(0.6) and record.frequency[3].item() == 1
    plan = summarize(record, 3, 2, alpha=0.03, stage_epochs=1, augment="none")
    # V = 0.5, 0.55, 0.6 (F = 2) and 0.6 (F = 1): point 3 re-enters, point 1 is K0.
    assert plan.kept.tolist() == [2, 3]
    assert plan.dropped.tolist() == [1]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_entropy_names_the_point_and_leaves_the_record_unchanged(bad):
    record = ValueRecord(10)
    _epoch(record, [4, 7, 8], [0.1, 0.2, 0.3])
    before = record.state_dict()
    record.record(torch.tensor([4, 7, 8]), torch.tensor([0.1, bad, bad]))  # no error while recording
    with pytest.raises(NonFiniteValue) as caught:
        record.end_epoch()
    assert isinstance(caught.value, KcdError)
    assert caught.value.index == 7 and "point 7 " in str(caught.value)
    assert str(bad) in str(caught.value)
    assert torch.equal(record.values, before["value_sum"] / before["frequency"].clamp(min=1))
    assert torch.equal(record.frequency, before["frequency"])


def test_record_refuses_mismatched_batches():
    record = ValueRecord(4)
    with pytest.raises(ValueError):
        record.record(torch.tensor([0, 1]), torch.tensor([0.1]))
    with pytest.raises(ValueError):
        record.record(torch.tensor([0.0, 1.0]), torch.tensor([0.1, 0.2]))
    with pytest.raises(BadOption):
        ValueRecord(0)


def test_state_dict_round_trip_resumes_exactly_even_mid_epoch():
    a = ValueRecord(6)
    _epoch(a, [0, 1, 2, 3], [0.3, 0.1, 0.4, 0.1])
    a.record(torch.tensor([5, 2]), torch.tensor([0.9, 0.2]))  # an unfinished epoch
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = ValueRecord(6)
    b.load_state_dict(torch.load(buffer))
    for r in (a, b):
        r.record(torch.tensor([0]), torch.tensor([0.7]))
        r.end_epoch()
    assert torch.equal(a.values, b.values) and torch.equal(a.frequency, b.frequency)
    assert torch.equal(a.ranking(0.03, 40), b.ranking(0.03, 40))
    with pytest.raises(CheckpointError, match="6 knowledge points"):
        ValueRecord(7).load_state_dict(a.state_dict())
    with pytest.raises(CheckpointError, match="lacks frequency"):
        ValueRecord(6).load_state_dict({k: v for k, v in a.state_dict().items() if k != "frequency"})


# ---------------------------------------------------------------- schedules

# N = 50,000, I = 240, T = 40 (six stages), rho = 0.7.
# paper: floor(50000 * 0.7^(t/6)), t = 1..6; 0.7^(1/6) = 0.9422866, so
#   t=1: 47114.33 -> 47114, t=2: 44395.20 -> 44395, t=3: 41833.00 -> 41833,
#   t=4: 39418.68 -> 39418, t=5: 37143.69 -> 37143, t=6: 0.7 * 50000 = 35000 exactly.
PAPER_STAGES = [47114, 44395, 41833, 39418, 37143, 35000]
# official: all 50,000 in stage 1, then floor(50000 * 0.3 / 6) = 2500 fewer per stage (the floor
# 35000 is only reached by the condensation after the last stage, which is never trained on).
OFFICIAL_STAGES = [50000, 47500, 45000, 42500, 40000, 37500]


def test_stage_sizes_of_both_schedules():
    assert keep_schedule("paper", 50000, 240, 40, 0.7) == PAPER_STAGES
    assert keep_schedule("official", 50000, 240, 40, 0.7) == OFFICIAL_STAGES


def test_computation_of_both_schedules_formula_and_count():
    paper = schedule_computation("paper", 240, 40, 0.7)
    assert paper == pytest.approx(0.816, abs=0.0005)
    assert schedule_computation("official", 240, 40, 0.7) == pytest.approx(0.875)
    # Counted over whole points: each of the I/T floors loses less than one point, so the count lies
    # below the formula by less than (I/T) * T / (N * I) = 1/N.
    counted = sum(keep_schedule("paper", 50000, 240, 40, 0.7)) * 40 / (50000 * 240)
    assert 0 <= paper - counted < 1 / 50000
    assert schedule_computation("paper", 240, 40, 0.7, num_points=50000) == counted
    counted = sum(keep_schedule("official", 50000, 240, 40, 0.7)) * 40 / (50000 * 240)
    assert counted == 0.875
    assert schedule_computation("official", 240, 40, 0.7, num_points=50000) == 0.875


def test_paper_cost_equals_the_mean_keep_ratio():
    for rho, epochs, stage in [(0.5, 90, 15), (0.3, 240, 30), (0.9, 100, 10)]:
        stages = epochs // stage
        mean = sum(rho ** (t / stages) for t in range(1, stages + 1)) / stages
        assert schedule_computation("paper", epochs, stage, rho) == pytest.approx(mean)


def test_floors_are_exact_where_floats_fall_just_short():
    assert 0.29 * 100 < 29  # the float product is 28.999999999999996
    assert keep_schedule("paper", 100, 10, 10, 0.29) == [29]
    assert keep_schedule("official", 100, 20, 10, 0.29) == [100, 65]  # drop floor(71/2) = 35
    assert keep_schedule("paper", 50000, 240, 240, 0.7) == [35000]
    assert keep_schedule("paper", 1000, 4, 1, 0.81) == [948, 900, 853, 810]  # 0.81^(1/2) = 0.9 exactly


def test_rho_one_keeps_everything():
    assert keep_schedule("paper", 10, 6, 2, 1.0) == [10, 10, 10]
    assert keep_schedule("official", 10, 6, 2, 1) == [10, 10, 10]
    assert schedule_computation("paper", 6, 2, 1.0) == 1.0
    assert schedule_computation("official", 6, 2, 1.0) == 1.0


@pytest.mark.parametrize(
    "args, match",
    [
        (("paper", 100, 240, 40, 0.0), "rho"),
        (("paper", 100, 240, 40, 1.5), "rho"),
        (("paper", 100, 240, 40, -0.2), "rho"),
        (("official", 100, 240, 40, float("nan")), "rho"),
        (("paper", 100, 250, 40, 0.7), "multiple"),
        (("paper", 100, 240, 0, 0.7), "stage_epochs"),
        (("paper", 100, 0, 40, 0.7), "epochs"),
        (("paper", 100, 240.0, 40, 0.7), "epochs"),
        (("paper", 0, 240, 40, 0.7), "num_points"),
        (("linear", 100, 240, 40, 0.7), "unknown schedule"),
        (("paper", 1, 40, 40, 0.5), "no knowledge point"),  # floor(0.5) = 0: an empty stage
    ],
)
def test_schedules_refuse_nonsense(args, match):
    with pytest.raises(BadOption, match=match):
        keep_schedule(*args)


def test_released_code_condenses_after_the_last_epoch_and_crashes_on_a_seventh_condensation():
    released = released_code_schedule(50000, 240, 40, 0.7)
    assert released.trained == OFFICIAL_STAGES
    assert released.condensed == [47500, 45000, 42500, 40000, 37500, 35000]  # 35000: never trained
    assert released.crashes_at is None and released.computation == pytest.approx(0.875)
    # T = 30: eight stages; the code still drops 2500 per condensation, reaches 35000 after six, and
    # the seventh drops nothing (an empty K0) and crashes.
    crashing = released_code_schedule(50000, 240, 30, 0.7)
    assert crashing.crashes_at == 7 and crashing.computation is None
    assert crashing.trained == OFFICIAL_STAGES + [35000]
    # T = 80: three stages; the code's "/ 6" leaves it far from rho, unlike this library's official.
    assert released_code_schedule(50000, 240, 80, 0.7).condensed == [47500, 45000, 42500]
    assert keep_schedule("official", 50000, 240, 80, 0.7) == [50000, 45000, 40000]


def test_first_stage_points_are_a_seeded_subset():
    a = first_stage_points(100, 94, seed=3)
    assert a.tolist() == sorted(set(a.tolist())) and len(a) == 94
    assert torch.equal(a, first_stage_points(100, 94, seed=3))
    assert not torch.equal(a, first_stage_points(100, 94, seed=4))
    with pytest.raises(BadOption):
        first_stage_points(10, 11)


# ---------------------------------------------------------------- VAKS

# Entropies give the ranking r = [3, 0, 7, 1, 9, 5, 2, 8, 6, 4] (point 3 most valuable).
ENTROPIES = [0.90, 0.70, 0.30, 1.00, 0.05, 0.40, 0.10, 0.80, 0.20, 0.50]
RANKING = [3, 0, 7, 1, 9, 5, 2, 8, 6, 4]


def _ramp_reference(m, eps=0.7):
    """The released code's ratios, recomputed in numpy float32 (one rounding per operation)."""
    j = np.arange(m, dtype=np.float32)
    frac = (np.float32(m) - j) / np.float32(m)
    return np.float32(1 - eps) * frac + np.float32(eps)


def test_k1l_pairs_the_last_kept_with_the_best_dropped_in_rank_order():
    record = _ranked_record(ENTROPIES)
    assert record.ranking(0.03, 40).tolist() == RANKING
    plan = summarize(record, 10, 6, alpha=0.03, stage_epochs=40, augment="K1L")
    assert plan.kept.tolist() == RANKING[:6] and plan.kept.dtype == torch.int64
    assert plan.dropped.tolist() == RANKING[6:]
    assert plan.mix_targets.tolist() == [7, 1, 9, 5]  # K1L = last m = 4 of K1
    assert plan.mix_sources.tolist() == [2, 8, 6, 4]  # K0 in rank order
    assert plan.mix_ratios.dtype == torch.float32
    # r_j = 0.7 + 0.3 (4 - j) / 4: r_0 = 1, r_3 = eps + (1 - eps) / m = 0.775
    assert plan.mix_ratios.tolist() == pytest.approx([1.0, 0.925, 0.85, 0.775])
    assert plan.mix_ratios[0].item() == 1.0
    np.testing.assert_array_equal(plan.mix_ratios.numpy(), _ramp_reference(4))
    assert value_labels(plan, 10).tolist() == [1, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    assert value_labels(plan, 10).dtype == torch.uint8


def test_k0_comes_from_the_global_ranking():
    # The previous set had 8 points, but K0 = r[6:8] whatever they were.
    plan = summarize(_ranked_record(ENTROPIES), 8, 6, alpha=0.03, stage_epochs=40, augment="K1L")
    assert plan.dropped.tolist() == [2, 8]
    assert plan.mix_targets.tolist() == [9, 5]
    assert plan.mix_ratios.tolist() == pytest.approx([1.0, 0.85])


def test_k1h_mixes_the_most_valuable_kept_points_with_the_same_rule():
    plan = summarize(_ranked_record(ENTROPIES), 10, 6, alpha=0.03, stage_epochs=40, augment="K1H", eps_m=0.5)
    assert plan.mix_targets.tolist() == [3, 0, 7, 1]
    assert plan.mix_sources.tolist() == [2, 8, 6, 4]
    np.testing.assert_array_equal(plan.mix_ratios.numpy(), _ramp_reference(4, eps=0.5))


def test_random_mixes_m_distinct_kept_points_with_a_constant_ratio():
    record = _ranked_record(ENTROPIES)
    plans = [summarize(record, 10, 6, alpha=0.03, stage_epochs=40, augment="random", seed=s) for s in (0, 0, 1, 2)]
    targets = [p.mix_targets.tolist() for p in plans]
    assert targets[0] == targets[1]  # seeded
    assert len({tuple(t) for t in targets}) > 1
    for plan in plans:
        assert len(set(plan.mix_targets.tolist())) == 4
        assert set(plan.mix_targets.tolist()) <= set(RANKING[:6])
        assert plan.mix_sources.tolist() == [2, 8, 6, 4]
        assert plan.mix_ratios.tolist() == [np.float32(0.7)] * 4


def test_none_plans_no_mixing():
    plan = summarize(_ranked_record(ENTROPIES), 10, 6, alpha=0.03, stage_epochs=40, augment="none")
    assert plan.dropped.tolist() == RANKING[6:]
    assert plan.mix_targets.numel() == plan.mix_sources.numel() == plan.mix_ratios.numel() == 0
    assert plan.mix_targets.dtype == torch.int64 and plan.mix_ratios.dtype == torch.float32


@pytest.mark.parametrize("augment", ["K1L", "K1H", "random", "none"])
def test_no_condensation_means_no_mixing(augment):
    plan = summarize(_ranked_record(ENTROPIES), 6, 6, alpha=0.03, stage_epochs=40, augment=augment)
    assert plan.kept.tolist() == RANKING[:6] and plan.dropped.numel() == 0
    assert plan.mix_targets.numel() == plan.mix_sources.numel() == plan.mix_ratios.numel() == 0
    images = torch.arange(30, dtype=torch.uint8).reshape(10, 3)
    assert torch.equal(apply_mix(images.clone(), plan), images)


def test_more_dropped_than_kept_pairs_all_kept_points_with_the_best_dropped():
    plan = summarize(_ranked_record(ENTROPIES), 10, 3, alpha=0.03, stage_epochs=40, augment="K1L")
    assert plan.dropped.tolist() == RANKING[3:]  # m = 7
    assert plan.mix_targets.tolist() == [3, 0, 7]  # all of K1
    assert plan.mix_sources.tolist() == [1, 9, 5]  # K0[:3]
    assert plan.mix_ratios.tolist() == pytest.approx([1.0, 0.9, 0.8])  # ramp over the 3 pairs


@pytest.mark.parametrize(
    "previous, new, augment, eps_m",
    [(6, 7, "K1L", 0.7), (11, 6, "K1L", 0.7), (6, 0, "K1L", 0.7), (10, 6, "k1l", 0.7), (10, 6, "K1L", 1.5)],
)
def test_summarize_refuses_nonsense(previous, new, augment, eps_m):
    record = _ranked_record(ENTROPIES)
    with pytest.raises(BadOption):
        summarize(record, previous, new, alpha=0.03, stage_epochs=40, augment=augment, eps_m=eps_m)


# ---------------------------------------------------------------- uint8 mixing


def _plan(targets, sources, ratios):
    t = torch.tensor(targets)
    return SummaryPlan(t, t[:0], t, torch.tensor(sources), torch.tensor(ratios, dtype=torch.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_mixing_truncates_float32_to_uint8_in_place(device):
    images = torch.tensor([[255, 255, 10], [0, 254, 3], [9, 9, 9]], dtype=torch.uint8, device=device)
    out = apply_mix(images, _plan([0], [1], [0.7]))
    assert out is images
    # 0.7*255 + 0.3*0 = 178.5 -> 178; 0.7*255 + 0.3*254 = 254.7 -> 254 (rounding would give 255);
    # 0.7*10 + 0.3*3 = 7.9 -> 7
    assert images.cpu().tolist() == [[178, 254, 7], [0, 254, 3], [9, 9, 9]]


@pytest.mark.parametrize("device", DEVICES)
def test_every_pair_reads_the_pixels_from_before_the_call(device):
    images = torch.tensor([[100], [200], [50]], dtype=torch.uint8, device=device)
    # 0 <- 1 and 1 <- 0 (a swap), and 2 <- 1 (a chain through an updated target)
    apply_mix(images, _plan([0, 1, 2], [1, 0, 1], [0.5, 0.5, 0.5]))
    assert images.cpu().flatten().tolist() == [150, 150, 125]


def test_ratio_one_leaves_the_image_unchanged():
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    before = images.clone()
    apply_mix(images, _plan([0], [1], [1.0]))
    assert torch.equal(images, before)


@pytest.mark.parametrize("device", DEVICES)
def test_mixing_is_bit_identical_to_the_released_float32_arithmetic(device):
    # Every (target, source) pixel pair, for each ratio of a 7-pair ramp and the random variant's eps_m.
    ratios = np.concatenate([_ramp_reference(7), [np.float32(0.7)]])
    a, b = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    n = len(ratios)
    images = np.zeros((2 * n, 256, 256), dtype=np.uint8)
    images[:n], images[n:] = a, b
    expected = images.copy()
    for j, r in enumerate(ratios):  # the released code: uint8 -> float32, r and (1 - r) in float32
        mixed = a.astype(np.float32) * r + b.astype(np.float32) * (np.float32(1) - r)
        expected[j] = mixed.astype(np.uint8)
    # Sanity: float32 rounding matters somewhere (exact arithmetic would differ in some pixel).
    exact = np.floor(a.astype(np.float64) * 0.7 + b.astype(np.float64) * 0.3 + 1e-9).astype(np.uint8)
    assert (expected[n - 1] != exact).any()
    tensor = torch.from_numpy(images).to(device)
    apply_mix(tensor, _plan(list(range(n)), list(range(n, 2 * n)), ratios.tolist()))
    np.testing.assert_array_equal(tensor.cpu().numpy(), expected)


def test_apply_mix_refuses_bad_plans():
    images = torch.zeros(4, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        apply_mix(images.float(), _plan([0], [1], [0.7]))
    with pytest.raises(ValueError, match="twice"):
        apply_mix(images, _plan([0, 0], [1, 2], [0.7, 0.7]))
    with pytest.raises(ValueError, match="as many"):
        apply_mix(images, SummaryPlan(*(torch.tensor([0]),) * 4, torch.tensor([0.7, 0.8])))


def test_a_full_condensation_changes_only_k1l_images():
    record = _ranked_record(ENTROPIES)
    plan = summarize(record, 10, 6, alpha=0.03, stage_epochs=40, augment="K1L")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8, generator=generator)
    before = images.clone()
    apply_mix(images, plan)
    changed = {i for i in range(10) if not torch.equal(images[i], before[i])}
    assert changed == {1, 9, 5}  # K1L minus its first point, whose r_0 = 1
    assert math.isclose(plan.mix_ratios[-1].item(), 0.7 + 0.3 / 4, rel_tol=1e-6)
