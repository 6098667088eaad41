"""The optimisation protocol of a run (RepDistiller's, which the paper follows): SGD with momentum and weight decay,
a step-decayed learning rate. Each dataset's defaults are in its spec (:data:`kcdlib.data.DATASETS`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .options import Option, between, canonical, non_negative, normalize, positive


@dataclass(frozen=True)
class Recipe:
    """Optimisation schedule. ``milestones`` are fractions of ``epochs`` after which lr is multiplied by
    ``lr_decay`` (paper: 150/240, 180/240, 210/240, so a shorter run keeps the same shape)."""

    epochs: int
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[float, ...] = (150 / 240, 180 / 240, 210 / 240)
    lr_decay: float = 0.1

    def __post_init__(self):
        # Normalised and checked here, so a recipe has one spelling (``0.05`` and ``5e-2``, ``1`` and ``1.0``).
        o = canonical("recipe", RECIPE_OPTIONS, {k: getattr(self, k) for k in RECIPE_OPTIONS})
        o["milestones"] = tuple(normalize("recipe", "milestone", MILESTONE, m) for m in self.milestones)
        for name, value in o.items():
            object.__setattr__(self, name, value)

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 1-based ``epoch``: decayed once for each milestone epoch already passed."""
        passed = sum(epoch > round(m * self.epochs) for m in self.milestones)
        return self.lr * self.lr_decay**passed

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d


RECIPE_OPTIONS = {
    "epochs": Option(None, int, **positive()),
    "batch_size": Option(None, int, **positive()),
    "lr": Option(None, **positive()),
    "momentum": Option(None, **between(0, 1, high_open=True)),
    "weight_decay": Option(None, **non_negative()),
    "lr_decay": Option(None, **between(0, 1, low_open=True)),
}
MILESTONE = Option(None, **between(0, 1, low_open=True))
