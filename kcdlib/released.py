"""The released KCD code's condensation arithmetic, replayed: where the paper and the released code disagree, the
book reports both (:func:`kcdlib.condense.keep_schedule` implements the paper's rule and the released rule at the
run's own ``I/T``; this module reproduces what the released script itself computes, constants and crash included).
"""

from __future__ import annotations

from dataclasses import dataclass

from .condense import check_schedule

# The released code divides by this constant instead of the run's I/T (kcd-method.md).
RELEASED_CODE_STAGES = 6


@dataclass(frozen=True)
class ReleasedSchedule:
    """What the released code does with a schedule (its stage count hard-coded to 6).

    ``trained``: points trained per stage that runs. ``condensed``: the kept count each condensation
    computes; condensations run after every ``T`` epochs, the last one after the last epoch, so
    ``condensed[-1]`` is never trained on. ``crashes_at``: the 1-based condensation at which the code
    fails (it drops no point, an empty ``K0``), or ``None``; the stages after it never run.
    ``computation``: ``Σ trained · T / (N · I)``, or ``None`` when the run crashes.
    """

    trained: list[int]
    condensed: list[int]
    crashes_at: int | None
    computation: float | None


def released_code_schedule(num_points: int, epochs: int, stage_epochs: int, rho: float) -> ReleasedSchedule:
    """Replay the released code's condensation arithmetic (float, as it does: ``int(N(1 − ρ)/6)`` dropped
    per condensation, never below ``int(ρN)``), including its last, untrained condensation and its crash
    when a condensation drops nothing (e.g. the seventh one of a run with more than six stages)."""
    n, stages, _ = check_schedule("official", num_points, epochs, stage_epochs, rho)
    rho = float(rho)
    drop = int(n * (1 - rho) / RELEASED_CODE_STAGES)
    floor_count = int(rho * n)
    trained, condensed, crashes_at = [n], [], None
    for c in range(1, stages + 1):
        current = trained[-1]
        new = floor_count if current - drop < floor_count else current - drop
        condensed.append(new)
        if new == current:
            crashes_at = c
            break
        if c < stages:
            trained.append(new)
    computation = None if crashes_at is not None else sum(trained) * stage_epochs / (n * epochs)
    return ReleasedSchedule(trained, condensed, crashes_at, computation)
