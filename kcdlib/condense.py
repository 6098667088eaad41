"""Knowledge condensation: value estimation (OGVE), schedules, and the value-adaptive summary (VAKS).

KCD treats the training set as a *knowledge set* ``K`` of ``N`` knowledge points ``k_i = (x_i, h_i)``
(a sample and the teacher's hint on it) and runs ``I`` epochs as ``I/T`` stages of ``T`` epochs, an EM
loop over a latent *value label* ``y_i ∈ {0, 1}``:

- **M-step**: distil the student for ``T`` epochs on the condensed set ``K^t`` only.
- **E-step**: estimate each point's value from what the M-step recorded, rank all ``N`` points, and
  condense the next set.

**Online global value estimation (OGVE)** (:class:`ValueRecord`). During the training forward the
engine records, for every sample, the entropy of the student's softmax (temperature 1). For each point
the record keeps ``F(i)``, the number of epochs it was trained in, and ``V(i)``, the mean of its
per-epoch entropies since the start of training. The record is *global*: never reset between stages,
and a dropped point keeps its ``V`` and ``F``. The cost-aware value (the paper's Eq. 13) is

    score(i) = (F(i) / T)^α · V(i),      α = 0.03,   score = 0 for a point never trained,

and the ranking ``r`` (best first) is over all ``N`` points, so a point dropped earlier can come back.

**Points never trained** (:func:`untrained_first`). Read literally, a point left out of the paper schedule's
stage 1 (a random 5.8 % of the points) has ``F = 0``, so score 0, and ranks last at every condensation: it is
never distilled. Its value is *unknown*, not low: by default (``untrained='first'``) such points rank ahead of
every trained point at the next condensation, so every point is distilled at least once and the stage sizes stay
those of Eq. 16. ``untrained='last'`` keeps the literal reading, for comparison.

**Condensation schedule** (:func:`keep_schedule`). Stage ``t`` keeps ``⌊τ^t · N⌋`` points. The paper
uses ``τ^t = ρ^{t·T/I}`` (``t = 1 … I/T``), of relative cost (Eq. 16)

    C = ρ^{T/I} (1 − ρ) / (1 − ρ^{T/I}) · T/I          (81.6 % for ρ = 0.7, T/I = 1/6);

the released code trains stage 1 on all ``N`` points and then drops ``⌊N(1 − ρ)/(I/T)⌋`` more per stage,
never below ``⌊ρN⌋`` (87.5 % for the same setting; :mod:`kcdlib.released` replays the released code itself).

**Value-adaptive knowledge summary (VAKS)** (:func:`summarize`, :func:`apply_mix`). Condensing from
``n_prev`` to ``n_new`` points with the global ranking ``r``: ``K1 = r[:n_new]`` is kept (``y = 1``),
``K0 = r[n_new:n_prev]`` holds the ``m = n_prev − n_new`` points just below the cut (``y = 0``), and
``K1L`` (the last ``m`` of ``K1``) is augmented with ``K0`` in rank order,

    x(K1L[j]) ← r_j · x(K1L[j]) + (1 − r_j) · x(K0[j]),     r_j = ε_m + (1 − ε_m)(m − j)/m,   ε_m = 0.7,

so ``r_0 = 1`` and the least valuable kept point takes the most of ``K0``. The mixed image is stored
as uint8 (truncated, as the released code does) and is permanent for the rest of the run.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from fractions import Fraction

import torch

from kcdlib.errors import BadOption, CheckpointError, KcdError

__all__ = [
    "AUGMENTS",
    "SCHEDULE_KINDS",
    "NonFiniteValue",
    "SummaryPlan",
    "ValueRecord",
    "apply_mix",
    "first_stage_points",
    "keep_schedule",
    "mix_pixels",
    "schedule_computation",
    "summarize",
    "untrained_first",
    "value_labels",
]

SCHEDULE_KINDS = ("paper", "official")
AUGMENTS = ("K1L", "K1H", "random", "none")
# Where points never trained (F = 0) rank at a condensation: ahead of all others (ours), or last (score 0, literal).
UNTRAINED_RULES = ("first", "last")


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``H(softmax(z)) = -Σ p log p`` per sample, in fp32: the per-step value OGVE records (at temperature 1)."""
    logp = torch.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1)


# What OGVE records per sample from the training forward: the paper's entropy of the student's softmax, or (an
# exercise, not the paper) the student's cross-entropy with the sample's label: its loss on the true class.
VALUE_SIGNALS = {
    "entropy": lambda logits, labels: softmax_entropy(logits),
    "ce": lambda logits, labels: torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none"),
}


class NonFiniteValue(KcdError):
    """An entropy handed to :meth:`ValueRecord.record` was NaN or infinite.

    One such value would turn ``V`` of that point (and, in the released code, the whole record) into
    NaN and the ranking into noise, so it stops the run instead. ``index`` is the knowledge point,
    ``value`` its entropy for the epoch.
    """

    def __init__(self, index: int, value: float):
        self.index = index
        self.value = value
        super().__init__(
            f"the student's entropy for knowledge point {index} is {value} in this epoch; a non-finite "
            "value cannot be ranked. The value record was left as it was before this epoch. The student "
            "has probably diverged (try a lower learning rate)."
        )


# --------------------------------------------------------------------------------------------------
# Online global value estimation (OGVE)
# --------------------------------------------------------------------------------------------------


class ValueRecord:
    """OGVE: the global record of ``V(i)`` and ``F(i)`` for the ``N`` knowledge points.

    ``V(i)`` is the mean of the point's per-epoch entropies since the start of training and ``F(i)`` the
    number of epochs it was trained in. The record is never reset between stages.

    Sums are kept in float64: ``V`` is a mean over up to ``I`` epochs and the ranking compares scores of
    50,000 points that are often close; float32's 7 digits would let rounding of the running sums
    reorder near-ties, and a ranking should depend on the values, not on the accumulation order.

    Non-finite entropies are checked lazily, at :meth:`end_epoch`, so that :meth:`record` never waits for
    the device (it is called at every step); the error still names the point, and the epoch is then not
    folded into the record.
    """

    def __init__(self, num_points: int, device: torch.device | str = "cpu"):
        self.num_points = _positive_int("num_points", num_points)
        self.device = torch.device(device)
        n, dev = self.num_points, self.device
        # Global record: sum over epochs of the per-epoch value, and F.
        self._value_sum = torch.zeros(n, dtype=torch.float64, device=dev)
        self._frequency = torch.zeros(n, dtype=torch.int64, device=dev)
        # The current epoch: sum and count of the entropies recorded for each point.
        self._epoch_sum = torch.zeros(n, dtype=torch.float64, device=dev)
        self._epoch_count = torch.zeros(n, dtype=torch.int64, device=dev)

    def record(self, indices: torch.Tensor, entropies: torch.Tensor) -> None:
        """Add one batch: ``indices`` (int64 point indices in ``[0, N)``) and the per-sample entropy of the
        student's softmax, on any device. Asynchronous: nothing here waits for the device."""
        if indices.dim() != 1 or entropies.dim() != 1 or indices.numel() != entropies.numel():
            raise ValueError(
                "record() expects two 1-D tensors of the same length (point indices, entropies), got "
                f"shapes {tuple(indices.shape)} and {tuple(entropies.shape)}"
            )
        if indices.is_floating_point() or indices.is_complex():
            raise ValueError(f"point indices must be integers, got {indices.dtype}")
        idx = indices.to(self.device, torch.int64)
        ent = entropies.detach().to(self.device, torch.float64)
        self._epoch_sum.index_add_(0, idx, ent)
        self._epoch_count.index_add_(0, idx, torch.ones_like(idx))

    def end_epoch(self) -> None:
        """Fold the epoch into the record: for each point seen, ``F(i) += 1`` and its epoch value (the mean
        of the epoch's entropies for it, normally exactly one) joins the running mean ``V(i)``.

        Raises :class:`NonFiniteValue` for the lowest-indexed point whose epoch value is NaN or infinite.
        """
        seen = self._epoch_count > 0
        epoch_value = self._epoch_sum / self._epoch_count.clamp(min=1)
        bad = seen & ~torch.isfinite(epoch_value)
        if bool(bad.any()):  # one device sync per epoch
            first = int(bad.nonzero()[0, 0])
            raise NonFiniteValue(first, float(epoch_value[first]))
        self._value_sum += torch.where(seen, epoch_value, torch.zeros_like(epoch_value))
        self._frequency += seen.to(torch.int64)
        self._epoch_sum.zero_()
        self._epoch_count.zero_()

    @property
    def values(self) -> torch.Tensor:
        """``V``: float64, the mean per-epoch entropy of each point since the start; 0 if never trained."""
        return self._value_sum / self._frequency.clamp(min=1)

    @property
    def frequency(self) -> torch.Tensor:
        """``F``: int64, the number of epochs each point was trained in."""
        return self._frequency.clone()

    def score(self, alpha: float, stage_epochs: int) -> torch.Tensor:
        """Cost-aware value (Eq. 13): ``(F/T)^α · V`` with ``T = stage_epochs``; 0 for never-trained points.

        The factor ``(F/T)^α`` favours points that have been trained more often: their ``V`` averages
        more epochs and is a more reliable estimate.
        """
        alpha = _finite_float("alpha", alpha)
        t = _positive_int("stage_epochs", stage_epochs)
        f = self._frequency.to(torch.float64)
        # Explicit zero: 0^α would be 1 for α = 0 and infinite for α < 0.
        return torch.where(f > 0, (f / t).pow(alpha) * self.values, torch.zeros_like(f))

    def ranking(self, alpha: float, stage_epochs: int) -> torch.Tensor:
        """The global ranking ``r``: all ``N`` point indices (int64), best score first.

        A stable sort, so equal scores keep ascending point order: the ranking is deterministic.
        """
        return torch.sort(self.score(alpha, stage_epochs), descending=True, stable=True).indices

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain CPU tensors (including the unfinished epoch), enough to resume a run exactly."""
        return {
            "num_points": torch.tensor(self.num_points, dtype=torch.int64),
            "value_sum": self._value_sum.cpu().clone(),
            "frequency": self._frequency.cpu().clone(),
            "epoch_sum": self._epoch_sum.cpu().clone(),
            "epoch_count": self._epoch_count.cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (onto this record's device)."""
        expected = {
            "value_sum": torch.float64,
            "frequency": torch.int64,
            "epoch_sum": torch.float64,
            "epoch_count": torch.int64,
        }
        missing = sorted((set(expected) | {"num_points"}) - set(state))
        if missing:
            raise CheckpointError(f"the value record in the checkpoint lacks {', '.join(missing)}")
        if int(state["num_points"]) != self.num_points:
            raise CheckpointError(
                f"the value record in the checkpoint is for {int(state['num_points'])} knowledge points, "
                f"this run has {self.num_points}"
            )
        for name, dtype in expected.items():
            tensor = state[name]
            if tensor.shape != (self.num_points,) or tensor.dtype != dtype:
                raise CheckpointError(
                    f"the value record's {name} in the checkpoint has shape {tuple(tensor.shape)} and "
                    f"dtype {tensor.dtype}, expected ({self.num_points},) and {dtype}"
                )
            setattr(self, "_" + name, tensor.to(self.device).clone())


# --------------------------------------------------------------------------------------------------
# Condensation schedule
# --------------------------------------------------------------------------------------------------


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
    n = _positive_int("num_points", num_points)
    size = _positive_int("size", size)
    if size > n:
        raise BadOption(f"cannot draw {size} of {n} knowledge points")
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=generator)[:size].sort().values


# --------------------------------------------------------------------------------------------------
# Value-adaptive knowledge summary (VAKS)
# --------------------------------------------------------------------------------------------------


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


def untrained_first(ranking: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """``ranking`` with the points never trained (``F = 0``) moved ahead of all others, each group keeping its
    order: a point whose value was never measured is not a point of low value."""
    never = frequency.to(ranking.device)[ranking] == 0
    return torch.cat([ranking[never], ranking[~never]])


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
    previous_size = _positive_int("previous_size", previous_size)
    new_size = _positive_int("new_size", new_size)
    if previous_size > n:
        raise BadOption(f"previous_size {previous_size} exceeds the {n} knowledge points")
    if new_size > previous_size:
        raise BadOption(f"a condensation cannot grow the set: new_size {new_size} > previous_size {previous_size}")
    if augment not in AUGMENTS:
        raise BadOption(f"unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTS)}")
    eps_m = _finite_float("eps_m", eps_m)
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
    n = _positive_int("num_points", num_points)
    y = torch.zeros(n, dtype=torch.uint8, device=plan.kept.device)
    y[plan.kept] = 1
    return y


# --------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool):
        raise BadOption(f"{name} must be a positive integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise BadOption(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise BadOption(f"{name} must be a positive integer, got {number}")
    return number


def _finite_float(name: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadOption(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise BadOption(f"{name} must be finite, got {value!r}")
    return number


def check_schedule(kind, num_points, epochs, stage_epochs, rho) -> tuple[int, int, Fraction]:
    """Validate a schedule's options; return ``N``, the stage count ``I/T`` and ``ρ`` as an exact fraction."""
    if kind not in SCHEDULE_KINDS:
        raise BadOption(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}")
    n = _positive_int("num_points", num_points)
    stage_epochs = _positive_int("stage_epochs (T)", stage_epochs)
    epochs = _positive_int("epochs (I)", epochs)
    if epochs % stage_epochs:
        raise BadOption(
            f"epochs (I={epochs}) must be a multiple of the stage length (T={stage_epochs}) "
            "so that every stage has T epochs"
        )
    rho_f = _finite_float("rho", rho)
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
