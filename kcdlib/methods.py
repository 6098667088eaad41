"""Methods: which knowledge points a run distils, epoch by epoch.

The engine asks a method three things, and KCD and UNIX need nothing more:

- ``epoch_points(epoch)``: the point indices to train on in this epoch (``None`` = all ``N``);
- ``observe(indices, values)``: for a method that declares a per-step ``signal`` (KCD: OGVE's entropy of the
  student's softmax), called on every step with each sample's point index and that signal, which the training
  step computes from its own forward (tensors stay on the device, and a CUDA graph's next replay rewrites them:
  copy what you keep). A method without one (plain KD, UNIX) costs the step nothing beyond its losses;
- ``end_epoch(epoch, images)``: after the epoch, a chance to update the set (KCD's E-step) and report per-epoch
  facts for the record.

``select(batch, student)`` lets a method change a batch before the teacher sees it (UNIX's uncertainty-aware
mixup). ``state_dict``/``load_state_dict`` make a method resumable. Methods are registered in :data:`METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import condense
from .data.mixing import MixRecipes
from .errors import BadOption
from .options import Option, between, canonical, non_negative, positive
from .registry import Registry


@dataclass
class MethodContext:
    """What a method may need to know: the knowledge set's size, the schedule, and the run's seed."""

    num_points: int
    epochs: int
    seed: int
    options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    device: str = "cpu"  # where the per-step records live (the training device: no copy per step)
    fs_over_ft: float = 1.0  # student/teacher forward multiply-adds (UNIX's Eq. 19)
    images_in_memory: bool = True  # False for datasets decoded from files (ImageNet)
    group: Any = None  # kcdlib.distributed.Group when the run trains on several processes (torchrun)

    def option(self, name: str, default: Any) -> Any:
        return self.options.get(name, default)


class Method:
    """Plain distillation: every knowledge point in every epoch (``C = 1``)."""

    name = "kd"
    # Whether the method writes into the run's own copy of the training images (KCD's knowledge augmentation).
    modifies_images = False
    # For a dataset decoded from files, the same augmentation as recipes the loader applies (kcdlib.data.mixing).
    mix_recipes: MixRecipes | None = None
    # Options this method accepts, with their paper defaults and rules (anything else is refused).
    option_specs: dict[str, Option] = {}
    # The distiller the method's loss needs in place of plain KD (UNIX trains on KD alone), or None.
    loss: str | None = None
    # The per-sample signal the training step computes from its own forward, ``signal(logits, labels)``, and hands
    # to observe() (KCD: one of condense.VALUE_SIGNALS), or None: then the step computes nothing for the method.
    signal: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def canonical_options(cls, options: dict[str, Any] | None, epochs: int, batch_size: int) -> dict[str, Any]:
        """Every option, defaults filled in and checked, including the rules that tie an option to the run's
        schedule (``epochs``, ``batch_size``): the form the run identity hashes, known before any training."""
        return canonical(f"method '{cls.name}'", cls.option_specs, options)

    def __init__(self, context: MethodContext):
        self.context = context
        self.options = self.canonical_options(context.options, context.epochs, context.batch_size)
        # Student forwards made outside the training step (UNIX's selection pass), for Eq. 17's N_s1.
        self.extra_student_forwards = 0
        # Bumped whenever the method changes the run's images, so a checkpoint stores them only then.
        self.images_version = 0

    def epoch_points(self, epoch: int) -> torch.Tensor | None:
        return None

    def select(self, batch, student):
        return batch

    def observe(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        pass

    def end_epoch(self, epoch: int, images: torch.Tensor | None) -> dict[str, Any]:
        return {}

    def summary(self) -> dict[str, Any]:
        """Facts for the run record beyond the counted computation."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class KCD(Method):
    """Knowledge Condensation Distillation: an EM loop over stages of ``T`` epochs.

    M-step: distil on the condensed set ``K^t`` for ``T`` epochs, recording each sample's entropy (OGVE).
    E-step, at each stage boundary except after the last epoch: rank all ``N`` points by the cost-aware value
    ``(F/T)^α · V``, keep the next stage's ``⌊τ^{t+1} N⌋`` best (``K1``) and mix the ``m`` just below the cut
    (``K0``) into the weakest kept ones (``K1L``): VAKS. Options (paper defaults): ``rho`` 0.7, ``cost_exponent`` (α)
    0.03, ``stage_epochs`` ``T`` (default ``I/6``: the paper's 40 of 240), ``schedule`` ``paper`` (Eq. 16) or
    ``official`` (the released code's), ``augment`` ``K1L``/``K1H``/``random``/``none``, ``eps_m`` 0.7,
    ``value`` ``entropy``, ``ce`` (the student's cross-entropy with the label recorded instead of its entropy:
    ranking by the loss, not the paper) or ``random`` (same schedule, random ranking: the ablation baseline),
    ``untrained`` ``first`` (points never trained rank ahead of all others at a condensation: every point is
    distilled at least once) or ``last`` (their score 0 ranks them last: the paper read literally).

    The mixes go into the run's own copy of the images when the dataset is held in memory; for one decoded from
    files (ImageNet) they are kept as :attr:`mix_recipes`, part of the checkpointed state, which the loader replays.
    """

    name = "kcd"
    modifies_images = True
    option_specs = {
        "rho": Option(0.7, **between(0, 1, low_open=True)),
        "cost_exponent": Option(0.03, **non_negative()),
        "stage_epochs": Option(None, int, **positive()),  # None: I/6, the paper's 40 of 240
        "schedule": Option("paper", str, choices=condense.SCHEDULE_KINDS),
        "augment": Option("K1L", str, choices=condense.AUGMENTS),
        "eps_m": Option(0.7, **between(0, 1)),
        # A value signal recorded per step (condense.VALUE_SIGNALS), or a random ranking (the ablation baseline).
        "value": Option("entropy", str, choices=(*condense.VALUE_SIGNALS, "random")),
        "untrained": Option("first", str, choices=condense.UNTRAINED_RULES),
    }

    @classmethod
    def canonical_options(cls, options, epochs, batch_size):
        o = super().canonical_options(options, epochs, batch_size)
        if o["stage_epochs"] is None:
            if epochs % 6:
                raise BadOption(f"KCD's default keeps six stages: {epochs} epochs are not a multiple of 6; "
                                "give stage_epochs")  # fmt: skip
            o["stage_epochs"] = epochs // 6
        condense.check_schedule(o["schedule"], 1, epochs, o["stage_epochs"], o["rho"])  # I a multiple of T, ...
        return o

    def __init__(self, context: MethodContext):
        super().__init__(context)
        o = self.options
        n, epochs = context.num_points, context.epochs
        # Images decoded from files (ImageNet) cannot be rewritten: their mixes are kept as recipes instead.
        self.modifies_images = o["augment"] != "none" and context.images_in_memory
        if o["augment"] != "none" and not context.images_in_memory:
            self.mix_recipes = MixRecipes(n)
        # The random ranking still records the entropy: its F decides which points were never trained.
        self.signal = condense.VALUE_SIGNALS["entropy" if o["value"] == "random" else o["value"]]
        self.T = int(o["stage_epochs"])
        self.sizes = condense.keep_schedule(o["schedule"], n, epochs, self.T, o["rho"])
        self.values = condense.ValueRecord(n, context.device)
        if self.sizes[0] == n:
            self.points = torch.arange(n)
        else:  # the paper schedule's stage 1: no estimate yet, a seeded uniform subset
            self.points = condense.first_stage_points(n, self.sizes[0], context.seed)
        self.stages: list[dict[str, Any]] = [{"stage": 1, "kept": self.sizes[0], "reentered": 0, "mixed": 0}]
        self.labels = torch.zeros(n, dtype=torch.uint8)
        self.labels[self.points] = 1

    def epoch_points(self, epoch: int) -> torch.Tensor | None:
        return None if self.points.numel() == self.context.num_points else self.points

    def observe(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        self.values.record(indices, values)

    def end_epoch(self, epoch: int, images: torch.Tensor | None) -> dict[str, Any]:
        self.values.end_epoch()
        stage = epoch // self.T
        # Condense at a stage boundary, but not after the last epoch: that condensation would never be
        # trained on (the released code does it anyway, which is why it spends 87.5 %, not 81.6 %).
        if epoch % self.T or epoch >= self.context.epochs:
            return {"stage": -(-epoch // self.T)}
        previous, new = self.sizes[stage - 1], self.sizes[stage]
        ranking = None
        if self.options["value"] == "random":
            g = torch.Generator().manual_seed(self.context.seed * 1009 + stage)
            ranking = torch.randperm(self.context.num_points, generator=g)
        plan = condense.summarize(
            self.values, previous, new, alpha=self.options["cost_exponent"], stage_epochs=self.T,
            augment=self.options["augment"], eps_m=self.options["eps_m"], seed=self.context.seed + stage,
            ranking=ranking, untrained=self.options["untrained"],
        )  # fmt: skip
        if plan.mix_targets.numel() and images is not None:
            condense.apply_mix(images, _on(plan, images.device))
            self.images_version += 1
        elif plan.mix_targets.numel() and self.mix_recipes is not None:
            self.mix_recipes.add(stage, plan)
            self.images_version += 1
        was_in = torch.zeros(self.context.num_points, dtype=torch.bool)
        was_in[self.points] = True
        kept = plan.kept.cpu()
        self.points = kept.sort().values
        self.labels = condense.value_labels(plan, self.context.num_points).cpu()
        self.stages.append({
            "stage": stage + 1, "kept": new, "reentered": int((~was_in[kept]).sum()),
            "mixed": int(plan.mix_targets.numel()),
            # Decoded from files: the most files one sample now needs (at most 2^condensations).
            **({"most_decodes": self.mix_recipes.most_decodes()} if self.mix_recipes is not None else {}),
        })  # fmt: skip
        return {"stage": stage, "condensed_to": new}

    def summary(self) -> dict[str, Any]:
        o = self.options
        return {
            "computation_formula": condense.schedule_computation(o["schedule"], self.context.epochs, self.T, o["rho"]),
            "stage_epochs": self.T,
            "stages": self.stages,
            # y per point at the end of the run: 1 for the last condensed set K^t, 0 for the rest.
            "value_labels": "".join(map(str, self.labels.tolist())),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "values": self.values.state_dict(),
            "points": self.points,
            "labels": self.labels,
            "stages": self.stages,
            "images_version": self.images_version,
            **({"mix_recipes": self.mix_recipes.state_dict()} if self.mix_recipes is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values.load_state_dict(state["values"])
        self.points, self.labels = state["points"], state["labels"]
        self.stages, self.images_version = state["stages"], state["images_version"]
        if self.mix_recipes is not None:
            self.mix_recipes.load_state_dict(state["mix_recipes"])


def _on(plan: condense.SummaryPlan, device: torch.device) -> condense.SummaryPlan:
    return condense.SummaryPlan(*(t.to(device) for t in (plan.kept, plan.dropped, plan.mix_targets,
                                                          plan.mix_sources, plan.mix_ratios)))  # fmt: skip


class UNIX(Method):
    """UNIX (Xu, Liu, Loy, arXiv:2012.09413), the baseline of Table 2: uncertainty-aware mixup.

    Per batch of ``B``: a student forward without gradient on all ``B`` samples (in training mode, as the
    official code does); uncertainty = entropy of its softmax; samples sorted by it, descending; each sorted
    sample is mixed with a random partner of the batch by ``λ·m_r``, ``m_r = 1/(1+exp(−w(r/B − (2b−1)/(2B))))``,
    ``λ ~ Beta(1,1)``; the first ``k`` mixed samples go to the teacher and the student's training step.
    Options: ``k`` 48, ``b`` 32, ``w`` 10 (the published setting). Its loss is KD alone (CE weight 0, the
    ``unix_kd`` distiller). Under torchrun each process makes the selection forward on its part of the batch;
    the selection itself is over the gathered global batch, the same on every process, and each process trains
    its part of the ``k`` selected: UNIX of the global batch, whatever the number of processes.
    """

    name = "unix"
    option_specs = {"k": Option(48, int, **positive()), "b": Option(32, int, **positive()),
                    "w": Option(10.0, **non_negative())}  # fmt: skip
    loss = "unix_kd"

    @classmethod
    def canonical_options(cls, options, epochs, batch_size):
        o = super().canonical_options(options, epochs, batch_size)
        for name in ("k", "b"):
            if o[name] > batch_size:
                raise BadOption(f"method 'unix' option {name} must be at most the batch size {batch_size}, "
                                f"got {o[name]}")  # fmt: skip
        return o

    def select(self, batch, student):
        x, y, idx = batch
        o = self.options
        group = self.context.group
        with torch.no_grad():
            logits = student(x)
        uncertainty = condense.softmax_entropy(logits)
        if group is not None:
            x, y, idx, uncertainty = group.gather(x, y, idx, uncertainty)
        n, full = x.shape[0], self.context.batch_size
        self.extra_student_forwards += n
        r = torch.arange(n, device=x.device, dtype=torch.float32)
        centre = (2 * o["b"] - 1) / (2 * full)
        mask = torch.sigmoid(o["w"] * (r / full - centre))
        lam = torch.distributions.Beta(1.0, 1.0).sample().to(x.device)
        mask = (lam * mask).view(-1, 1, 1, 1)
        rank = torch.argsort(uncertainty, descending=True)
        partner = torch.randperm(n, device=x.device)
        mixed = (1 - mask) * x[rank] + mask * x[partner]
        k = min(int(o["k"]), n)
        selected = mixed[:k], y[rank][:k], idx[rank][:k]
        return selected if group is None else tuple(group.part(*selected))

    def summary(self) -> dict[str, Any]:
        from .cost import unix_computation

        o = self.options
        return {"computation_formula": unix_computation(o["k"], self.context.batch_size, self.context.fs_over_ft)}


METHODS: Registry[type[Method]] = Registry("method", {"kd": Method, "kcd": KCD, "unix": UNIX})


def canonical_options(name: str, options: dict[str, Any] | None, epochs: int, batch_size: int) -> dict[str, Any]:
    """Every option of method ``name`` for a run of ``epochs`` in batches of ``batch_size``, defaults filled in."""
    return METHODS[name].canonical_options(options, epochs, batch_size)


def build(name: str, context: MethodContext) -> Method:
    return METHODS[name](context)
