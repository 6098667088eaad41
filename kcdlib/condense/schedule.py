"""The condensation schedule: how many knowledge points each of the ``I/T`` stages of ``T`` epochs trains on.

Stage ``t`` keeps ``⌊τ^t · N⌋`` points. The paper uses ``τ^t = ρ^{t·T/I}`` (``t = 1 … I/T``), of relative cost
(Eq. 16)

    C = ρ^{T/I} (1 − ρ) / (1 − ρ^{T/I}) · T/I          (81.6 % for ρ = 0.7, T/I = 1/6);

the released code trains stage 1 on all ``N`` points and then drops ``⌊N(1 − ρ)/(I/T)⌋`` more per stage,
never below ``⌊ρN⌋`` (87.5 % for the same setting; :mod:`kcdlib.released` replays the released code itself).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from ..errors import BadOption
from .checks import finite_float, positive_int

SCHEDULE_KINDS = ("paper", "official")


def keep_schedule(kind: str, num_points: int, epochs: int, stage_epochs: int, rho: float) -> list[int]:
    """The number of knowledge points trained in each of the ``I/T`` stages.

    - ``'paper'``: ``⌊τ^t · N⌋`` with ``τ^t = ρ^{t·T/I}``, ``t = 1 … I/T`` (stage 1 is already below ``N``).
    - ``'official'``: the released code's rule with this run's ``I/T``: stage 1 trains on all ``N``, each
      later stage on ``⌊N(1 − ρ)/(I/T)⌋`` fewer, never below ``⌊ρN⌋``. (The released code divides by 6
      whatever ``I/T`` is; :func:`kcdlib.released.released_code_schedule` reproduces that.)

    Floors are exact: ``ρ`` is read as the decimal it was written as (``0.7`` means 7/10, not the binary
    float just below it) and compared in integer arithmetic, so ``ρ^1 · 50000`` gives 35000, not 34999.
    Parameters: ``N = num_points``, ``I = epochs``, ``T = stage_epochs``, ``ρ = rho`` (the final keep-ratio).
    """
    n, stages, rho_q = check_schedule(kind, num_points, epochs, stage_epochs, rho)
    if kind == "paper":
        counts = [_floor_power(n, rho_q, t, stages) for t in range(1, stages + 1)]
    else:
        drop = math.floor(n * (1 - rho_q) / stages)
        floor_count = math.floor(n * rho_q)
        counts = [max(n - t * drop, floor_count) for t in range(stages)]
    for t, count in enumerate(counts, start=1):
        if count < 1:
            raise BadOption(
                f"the {kind} schedule would train stage {t} on no knowledge point "
                f"(N={n}, rho={rho}, {stages} stages): use more points or a larger rho"
            )
        if t > 1 and count > counts[t - 2]:
            raise BadOption(f"the {kind} schedule would grow at stage {t}: {counts}")
    return counts


def schedule_computation(kind: str, epochs: int, stage_epochs: int, rho: float, num_points: int | None = None) -> float:
    """The relative computation ``C = C_a(KCD) / C_a(KD)`` of a schedule (the teacher's forwards on
    knowledge points over the run, relative to ``N · I``).

    Without ``num_points``, the closed form: Eq. 16 for ``'paper'``, ``ρ^{T/I}(1 − ρ)/(1 − ρ^{T/I}) · T/I``
    (1 for ``ρ = 1``); for ``'official'``, the released code's linear drop without rounding to whole points,
    ``(T/I) Σ_{t=0}^{I/T−1} (1 − t(1 − ρ)/(I/T)) = 1 − (1 − ρ)(I/T − 1)/(2 I/T)``. With ``num_points``,
    the count over whole points: ``Σ keep_schedule(...) · T / (N · I)``.
    """
    if num_points is not None:
        counts = keep_schedule(kind, num_points, epochs, stage_epochs, rho)
        return sum(counts) * stage_epochs / (num_points * epochs)
    _, stages, rho_q = check_schedule(kind, 1, epochs, stage_epochs, rho)
    rho_f = float(rho_q)
    if kind == "official":
        return 1.0 - (1.0 - rho_f) * (stages - 1) / (2 * stages)
    if rho_q == 1:
        return 1.0
    q = rho_f ** (1.0 / stages)  # ρ^{T/I}
    return q * (1.0 - rho_f) / (1.0 - q) / stages


def first_stage_points(num_points: int, size: int, seed: int = 0) -> torch.Tensor:
    """The paper schedule's stage-1 set: ``size`` points drawn uniformly (seeded), in ascending order.

    Stage 1 of the paper schedule already keeps ``τ^1 N < N`` points but no value has been estimated yet.
    """
    n = positive_int("num_points", num_points)
    size = positive_int("size", size)
    if size > n:
        raise BadOption(f"cannot draw {size} of {n} knowledge points")
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=generator)[:size].sort().values


def check_schedule(kind, num_points, epochs, stage_epochs, rho) -> tuple[int, int, Fraction]:
    """Validate a schedule's options; return ``N``, the stage count ``I/T`` and ``ρ`` as an exact fraction."""
    if kind not in SCHEDULE_KINDS:
        raise BadOption(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}")
    n = positive_int("num_points", num_points)
    stage_epochs = positive_int("stage_epochs (T)", stage_epochs)
    epochs = positive_int("epochs (I)", epochs)
    if epochs % stage_epochs:
        raise BadOption(
            f"epochs (I={epochs}) must be a multiple of the stage length (T={stage_epochs}) "
            "so that every stage has T epochs"
        )
    rho_f = finite_float("rho", rho)
    if not 0.0 < rho_f <= 1.0:
        raise BadOption(f"rho (the final keep-ratio) must lie in (0, 1], got {rho}")
    # repr() is the shortest decimal that reads back as the same float: the number the user wrote.
    return n, epochs // stage_epochs, Fraction(repr(rho_f))


def _floor_power(n: int, rho: Fraction, t: int, stages: int) -> int:
    """``⌊n · ρ^{t/stages}⌋`` exactly: the largest ``k`` with ``k^stages ≤ n^stages · ρ^t`` (integers)."""
    p, q = rho.numerator, rho.denominator
    bound = n**stages * p**t  # compare k^S · q^t with n^S · p^t

    def fits(k: int) -> bool:
        return k**stages * q**t <= bound

    k = math.floor(n * float(rho) ** (t / stages))  # off by at most one or two
    while k > 0 and not fits(k):
        k -= 1
    while fits(k + 1):
        k += 1
    return k
