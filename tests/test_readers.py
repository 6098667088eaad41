"""What the book shows its readers beyond the paper's tables: the trade-off's frontier, differences against seed
noise, and a page per run that every table cell links to (the checks on the suite's tiny book: tests/test_book.py)."""

import math
import re

import pytest
import scipy.stats

from kcdlib.artefacts import noise, tradeoff
from kcdlib.profiles import get_profile


def test_frontier_keeps_exactly_the_points_nothing_beats():
    # (C, top-1): KD; KCD cheaper and better; a point beaten on both axes by KCD; a cheap weak point; a tie in C.
    c = [1.0, 0.8, 0.9, 0.5, 0.8]
    a = [70.0, 71.0, 70.5, 60.0, 70.9]
    assert tradeoff.frontier(c, a) == [False, True, False, True, False]
    assert tradeoff.frontier([1.0], [50.0]) == [True]
    # Two identical points beat neither: both stay.
    assert tradeoff.frontier([0.8, 0.8], [70.0, 70.0]) == [True, True]


def test_welch_interval_is_scipys_and_a_difference_within_noise_is_no_gain():
    kc, base = [71.2, 72.0, 70.9, 71.8], [70.1, 70.6, 71.5]
    d = noise.difference(kc, base)
    ref = scipy.stats.ttest_ind(kc, base, equal_var=False).confidence_interval(0.95)
    assert d.diff == pytest.approx(sum(kc) / 4 - sum(base) / 3)
    assert (d.low, d.high) == pytest.approx((ref.low, ref.high))
    # Welch-Satterthwaite by hand on the same numbers: the library's interval is the textbook one.
    va, vb = scipy.stats.tvar(kc) / 4, scipy.stats.tvar(base) / 3
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    half = scipy.stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert (d.low, d.high) == pytest.approx((d.diff - half, d.diff + half))
    assert d.diff > 0 and d.low < 0 < d.high and d.verdict == noise.WITHIN_NOISE
    assert noise.difference([75.0, 75.2, 75.1], [70.0, 70.3, 70.1]).verdict == noise.REPRODUCED
    assert noise.difference([70.0, 70.3, 70.1], [75.0, 75.2, 75.1]).verdict == noise.OPPOSITE
    one = noise.difference([75.0], [70.0, 70.1])
    assert one.verdict == noise.ONE_SEED and one.text() == "+4.95"
    assert noise.counts([d, one]) == {noise.REPRODUCED: 0, noise.WITHIN_NOISE: 1, noise.OPPOSITE: 0,
                                      noise.ONE_SEED: 1}  # fmt: skip
    assert re.fullmatch(r"\+\d\.\d\d \[−\d\.\d\d, \+\d\.\d\d\]", d.text())


def test_a_run_page_names_the_options_off_their_defaults():
    from kcdlib import runpages
    from kcdlib.artefacts import declare, table4

    p = get_profile("tiny")
    cfg = declare.distill(p, table4.TABLE4_PAIR.of(p), method="kcd", value="random", augment="none")
    assert runpages.differences(cfg.canonical()) == {
        "recipe.epochs": 3, "kcd.augment": "none", "kcd.stage_epochs": 1, "kcd.value": "random",
    }  # fmt: skip
    assert runpages.differences(declare.teacher_run(p, "resnet20").canonical()) == {"recipe.epochs": 10}
