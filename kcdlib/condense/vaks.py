"""Value-adaptive knowledge summary (VAKS): the E-step's condensation of the ranked set and its augmentation.

Condensing from ``n_prev`` to ``n_new`` points with the global ranking ``r`` (:mod:`.ogve`): ``K1 = r[:n_new]`` is
kept (``y = 1``), ``K0 = r[n_new:n_prev]`` holds the ``m = n_prev − n_new`` points just below the cut (``y = 0``),
and ``K1L`` (the last ``m`` of ``K1``) is augmented with ``K0`` in rank order,

    x(K1L[j]) ← r_j · x(K1L[j]) + (1 − r_j) · x(K0[j]),     r_j = ε_m + (1 − ε_m)(m − j)/m,   ε_m = 0.7,

so ``r_0 = 1`` and the least valuable kept point takes the most of ``K0``. The mixed image is stored as uint8
(truncated, as the released code does) and is permanent for the rest of the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import BadOption
from .checks import finite_float, positive_int
from .ogve import UNTRAINED_RULES, ValueRecord, untrained_first

AUGMENTS = ("K1L", "K1H", "random", "none")


@dataclass(frozen=True, eq=False)
class SummaryPlan:
    """One condensation: int64 point indices and float32 mixing ratios (on the value record's device).

    ``kept``: ``K1`` (``y = 1``), ranked best first. ``dropped``: ``K0``, ranked. ``mix_targets``: the kept
    points whose image is augmented; ``mix_sources``: their partners from ``K0``; ``mix_ratios``: ``r_j``,
    the weight of the target's own image.
    """

    kept: torch.Tensor
    dropped: torch.Tensor
    mix_targets: torch.Tensor
    mix_sources: torch.Tensor
    mix_ratios: torch.Tensor


def summarize(
    record: ValueRecord,
    previous_size: int,
    new_size: int,
    *,
    alpha: float,
    stage_epochs: int,
    augment: str,
    eps_m: float = 0.7,
    seed: int = 0,
    ranking: torch.Tensor | None = None,
    untrained: str = "first",
) -> SummaryPlan:
    """VAKS: condense from ``previous_size`` to ``new_size`` points by the global ranking and plan the
    knowledge augmentation.

    ``K1 = r[:new_size]``, ``K0 = r[new_size:previous_size]`` (``m`` points, from the *global* ranking, so
    ``K0`` may hold points that were not in the previous set). ``augment`` picks which kept points are
    mixed with ``K0`` (supplement Table 7):

    - ``'K1L'`` (the paper's design): the last ``m`` points of ``K1``, ``K1L[j]`` paired with ``K0[j]``,
      ``r_j = ε_m + (1 − ε_m)(m − j)/m``, so ``r_0 = 1`` and ``r_{m−1} = ε_m + (1 − ε_m)/m``.
    - ``'K1H'``: ``K1`` re-partitioned so that ``|K1H| = |K0|``, i.e. the ``m`` most valuable kept points
      ``K1[:m]``, with the same rank-order pairing and ratios (what the released code's alternative does).
    - ``'random'``: ``m`` distinct points of ``K1`` drawn with ``seed`` (so the pairing with ``K0`` in rank
      order is random too), all with the constant ratio ``ε_m``.
    - ``'none'``: no augmentation, ``K̂ = K1``.

    ``m = 0`` plans no mixing. If ``m > new_size``, only ``p = min(m, new_size)`` pairs exist: ``K0[:p]`` with
    all of ``K1``, and the ratio ramp runs over those ``p`` pairs (``m`` replaced by ``p``, as the released
    code's mixer does with its ``len(mix_remain)``), so the last pair still gets ``ε_m + (1 − ε_m)/p``.
    Ratios are computed on the CPU in float32 with the released code's operations, so they are its values.

    ``ranking`` replaces the record's value ranking (the ablation that condenses by a random ranking).
    ``untrained``: ``'first'`` moves the points never trained ahead of the ranking (:func:`untrained_first`),
    ``'last'`` leaves them where their score 0 puts them.
    """
    if not isinstance(record, ValueRecord):
        raise TypeError(f"summarize() needs a ValueRecord, got {type(record).__name__}")
    n = record.num_points
    previous_size = positive_int("previous_size", previous_size)
    new_size = positive_int("new_size", new_size)
    if previous_size > n:
        raise BadOption(f"previous_size {previous_size} exceeds the {n} knowledge points")
    if new_size > previous_size:
        raise BadOption(f"a condensation cannot grow the set: new_size {new_size} > previous_size {previous_size}")
    if augment not in AUGMENTS:
        raise BadOption(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTS)}")
    eps_m = finite_float("eps_m", eps_m)
    if not 0.0 <= eps_m <= 1.0:
        raise BadOption(f"eps_m must lie in [0, 1], got {eps_m}")

    if untrained not in UNTRAINED_RULES:
        raise BadOption(f"unknown rule for untrained points {untrained!r}; choose one of {', '.join(UNTRAINED_RULES)}")
    if ranking is None:
        ranking = record.ranking(alpha, stage_epochs)
    if untrained == "first":
        ranking = untrained_first(ranking, record.frequency)
    kept = ranking[:new_size]
    dropped = ranking[new_size:previous_size]
    pairs = min(previous_size - new_size, new_size)
    device = kept.device

    if augment == "none" or pairs == 0:
        targets = kept[:0]
        ratios = torch.zeros(0, dtype=torch.float32)
    elif augment == "random":
        generator = torch.Generator().manual_seed(int(seed))
        chosen = torch.randperm(new_size, generator=generator)[:pairs]
        targets = kept[chosen.to(device)]
        ratios = torch.full((pairs,), eps_m, dtype=torch.float32)
    else:
        targets = kept[new_size - pairs :] if augment == "K1L" else kept[:pairs]
        ratios = _ramp_ratios(pairs, eps_m)
    return SummaryPlan(
        kept=kept,
        dropped=dropped,
        mix_targets=targets,
        mix_sources=dropped[: targets.numel()],
        mix_ratios=ratios.to(device),
    )


def _ramp_ratios(m: int, eps_m: float) -> torch.Tensor:
    """``r_j = ε_m + (1 − ε_m)(m − j)/m`` for ``j = 0 … m−1``, in float32 on the CPU with the released code's
    order of operations (one rounding per step), so that the mixed pixels match it bit for bit."""
    j = torch.arange(m, dtype=torch.float32)
    return (1 - eps_m) * ((m * torch.ones(m) - j) / m) + eps_m


def apply_mix(images: torch.Tensor, plan: SummaryPlan) -> torch.Tensor:
    """Apply the plan's knowledge augmentation to the stored images, in place, and return ``images``.

    ``images`` is uint8 with the point index first (any device). For each pair,
    ``x[t] ← r · x[t] + (1 − r) · x[s]`` in float32 (``1 − r`` rounded to float32 first), truncated toward
    zero to uint8: the released code's arithmetic, bit for bit. Every pair reads the pixels as they were
    before this call, even where a source is also a target of the same plan.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"apply_mix() works on the stored uint8 images, got {images.dtype}")
    targets, sources, ratios = plan.mix_targets, plan.mix_sources, plan.mix_ratios
    if not targets.numel() == sources.numel() == ratios.numel():
        raise ValueError(
            f"a mixing plan needs as many targets, sources and ratios, got "
            f"{targets.numel()}, {sources.numel()} and {ratios.numel()}"
        )
    if targets.numel() == 0:
        return images
    if torch.unique(targets).numel() != targets.numel():
        raise ValueError("a mixing plan must not mix the same target twice")
    device = images.device
    targets, sources = targets.to(device, torch.int64), sources.to(device, torch.int64)
    shape = (-1,) + (1,) * (images.dim() - 1)
    r = ratios.to(device, torch.float32).reshape(shape)
    # index_select copies: all reads happen before the single write below.
    mixed = mix_pixels(images.index_select(0, targets), images.index_select(0, sources), r)
    images.index_copy_(0, targets, mixed)
    return images


def mix_pixels(own: torch.Tensor, partner: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """VAKS's pixel formula, the one place it is computed: ``r · own + (1 − r) · partner`` as uint8.

    ``own`` and ``partner`` are uint8 of one shape, ``ratio`` float32 broadcastable to it (one ``r`` per image).
    In float32, ``1 − r`` rounded to float32 first, each product and the sum rounded once, then truncated toward
    zero to uint8: the released code's arithmetic, bit for bit. :func:`apply_mix` (images in memory) and
    :class:`kcdlib.data.mixing.MixRecipes` (images decoded from files) both mix through it.
    """
    r = ratio.to(own.device, torch.float32)
    return (own.to(torch.float32) * r + partner.to(torch.float32) * (1 - r)).to(torch.uint8)


def value_labels(plan: SummaryPlan, num_points: int) -> torch.Tensor:
    """The value labels ``y`` (uint8): 1 for the kept points ``K1``, 0 for every other point."""
    n = positive_int("num_points", num_points)
    y = torch.zeros(n, dtype=torch.uint8, device=plan.kept.device)
    y[plan.kept] = 1
    return y
