"""Online global value estimation (OGVE): the value ``V(i)`` and frequency ``F(i)`` of every knowledge point.

During the training forward the engine hands the method, for every sample, the entropy of the student's softmax
(temperature 1): :data:`VALUE_SIGNALS` ``['entropy']``, computed in the step itself, no extra pass. For each point
:class:`ValueRecord` keeps ``F(i)``, the number of epochs it was trained in, and ``V(i)``, the mean of its per-epoch
entropies since the start of training. The record is *global*: never reset between stages, and a dropped point
keeps its ``V`` and ``F``. The cost-aware value (the paper's Eq. 13) is

    score(i) = (F(i) / T)^α · V(i),      α = 0.03,   score = 0 for a point never trained,

and the ranking ``r`` (best first) is over all ``N`` points, so a point dropped earlier can come back.

**Points never trained** (:func:`untrained_first`). Read literally, a point left out of the paper schedule's
stage 1 (a random 5.8 % of the points) has ``F = 0``, so score 0, and ranks last at every condensation: it is
never distilled. Its value is *unknown*, not low: by default (``untrained='first'``) such points rank ahead of
every trained point at the next condensation, so every point is distilled at least once and the stage sizes stay
those of Eq. 16. ``untrained='last'`` keeps the literal reading, for comparison.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import CheckpointError, KcdError
from ..registry import Registry
from .checks import finite_float, positive_int

# Where points never trained (F = 0) rank at a condensation: ahead of all others (ours), or last (score 0, literal).
UNTRAINED_RULES = ("first", "last")


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``H(softmax(z)) = -Σ p log p`` per sample, in fp32: the per-step value OGVE records (at temperature 1)."""
    logp = torch.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1)


# What OGVE records per sample from the training forward: the paper's entropy of the student's softmax, or (an
# exercise, not the paper) the student's cross-entropy with the sample's label: its loss on the true class.
VALUE_SIGNALS: Registry[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = Registry(
    "value signal",
    {
        "entropy": lambda logits, labels: softmax_entropy(logits),
        "ce": lambda logits, labels: torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none"),
    },
)


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
        self.num_points = positive_int("num_points", num_points)
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
        alpha = finite_float("alpha", alpha)
        t = positive_int("stage_epochs", stage_epochs)
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


def untrained_first(ranking: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """``ranking`` with the points never trained (``F = 0``) moved ahead of all others, each group keeping its
    order: a point whose value was never measured is not a point of low value."""
    never = frequency.to(ranking.device)[ranking] == 0
    return torch.cat([ranking[never], ranking[~never]])
