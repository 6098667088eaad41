"""Knowledge condensation: value estimation (OGVE), schedules, and the value-adaptive summary (VAKS).

KCD treats the training set as a *knowledge set* ``K`` of ``N`` knowledge points ``k_i = (x_i, h_i)``
(a sample and the teacher's hint on it) and runs ``I`` epochs as ``I/T`` stages of ``T`` epochs, an EM
loop over a latent *value label* ``y_i ∈ {0, 1}``:

- **M-step**: distil the student for ``T`` epochs on the condensed set ``K^t`` only, recording each point's value
  (:mod:`.ogve`: the entropy ``V(i)`` and the frequency ``F(i)``).
- **E-step**: rank all ``N`` points by the cost-aware value ``(F/T)^α · V`` and condense the next set to the size
  the schedule gives (:mod:`.schedule`: ``⌊τ^{t+1} N⌋``), mixing the points just below the cut into the weakest
  kept ones (:mod:`.vaks`).

The method that runs this loop is :class:`kcdlib.methods.KCD`; this package is its arithmetic, and its names are
the package's interface.
"""

from .ogve import UNTRAINED_RULES, VALUE_SIGNALS, NonFiniteValue, ValueRecord, softmax_entropy, untrained_first
from .schedule import SCHEDULE_KINDS, check_schedule, first_stage_points, keep_schedule, schedule_computation
from .vaks import AUGMENTS, SummaryPlan, apply_mix, mix_pixels, summarize, value_labels

__all__ = [
    "AUGMENTS", "SCHEDULE_KINDS", "UNTRAINED_RULES", "VALUE_SIGNALS", "NonFiniteValue", "SummaryPlan", "ValueRecord",
    "apply_mix", "check_schedule", "first_stage_points", "keep_schedule", "mix_pixels", "schedule_computation",
    "softmax_entropy", "summarize", "untrained_first", "value_labels",
]  # fmt: skip
