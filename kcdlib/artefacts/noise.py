"""Differences against seed noise: a KC- method against its base, the difference of the means over seeds with a
95 % interval, and whether it reproduces the paper's claimed gain.

The interval is Welch's (two samples, unequal variances): ``scipy.stats.ttest_ind(kc, base, equal_var=False)`` and
its ``confidence_interval``. A gain is claimed only when the interval lies above 0, a loss only when it lies below;
with fewer than two seeds on either side there is no interval and no verdict.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import scipy.stats

CONFIDENCE = 0.95
METHOD = "Welch's t (scipy.stats.ttest_ind, equal_var=False)"
# The verdicts, in the order the findings page counts them.
REPRODUCED, WITHIN_NOISE, OPPOSITE, ONE_SEED = "reproduced", "within noise", "opposite", "one seed"
VERDICTS = (REPRODUCED, WITHIN_NOISE, OPPOSITE, ONE_SEED)


@dataclass(frozen=True)
class Difference:
    """``mean(kc) - mean(base)`` in points of top-1, and its interval (NaN with fewer than two seeds a side)."""

    diff: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        """Against a claimed gain (the paper's: KC- better than its base)."""
        if math.isnan(self.low):
            return ONE_SEED
        if self.low > 0:
            return REPRODUCED
        if self.high < 0:
            return OPPOSITE
        return WITHIN_NOISE

    def text(self) -> str:
        """``+0.41 [−0.30, +1.10]`` (or the bare difference with one seed)."""
        text = f"{self.diff:+.2f}" if math.isnan(self.low) else f"{self.diff:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"
        return text.replace("-", "−")


def difference(kc: Sequence[float], base: Sequence[float], confidence: float = CONFIDENCE) -> Difference:
    """The difference of the means of ``kc`` and ``base`` (one value per seed) with Welch's interval."""
    diff = sum(kc) / len(kc) - sum(base) / len(base)
    if len(kc) < 2 or len(base) < 2:
        return Difference(diff, math.nan, math.nan)
    if max(kc) == min(kc) and max(base) == min(base):  # no spread at all: the interval is the difference itself
        return Difference(diff, diff, diff)
    ci = scipy.stats.ttest_ind(kc, base, equal_var=False).confidence_interval(confidence)
    return Difference(diff, float(ci.low), float(ci.high))


def counts(differences: Iterable[Difference]) -> dict[str, int]:
    """How many of the claimed gains are reproduced beyond noise, within noise, the other way, untested."""
    out = dict.fromkeys(VERDICTS, 0)
    for d in differences:
        out[d.verdict] += 1
    return out
