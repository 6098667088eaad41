"""The declaration of an artefact (a table or a figure of the book) and the runs it is made of.

An artefact is an :class:`Artefact`: its rows declared once, by ``declare(profile)``, as an ordered mapping from
each row (or cell) to the runs behind it. Its runs are derived from that declaration (:meth:`Artefact.runs`), and
so is its table: ``build(session)`` walks the same declaration and reads the records (how a table looks:
:mod:`.format`; what its caption says: :mod:`.captions`). The run builders here (:func:`teacher_run`,
:func:`distill` ...) make every run of the book, so a profile's knobs reach every run the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import condense, cost, distillers, models
from .. import data as datasets
from ..methods import METHODS
from ..profiles import Profile, get_profile
from ..runs import RunConfig, distill_config, teacher_config

if TYPE_CHECKING:
    from .session import Session

# The paper's final keep-ratio ρ: the KCD method's default, defined there.
KCD_RHO = METHODS["kcd"].option_specs["rho"].default


# -- the declaration -----------------------------------------------------------------------------------------
Declaration = Mapping[Any, Sequence[RunConfig]]


@dataclass(frozen=True)
class Artefact:
    """One table or figure of the book, and its notebook ``notebooks/<name>.md`` (its page in the book).

    ``declare(profile)`` lists the artefact's rows once: each row (or cell) key -> the runs behind it (one per
    seed). ``build(session)`` makes the table or figure from the records of those same runs. ``part`` is the
    book part the page belongs to and ``order`` its place in the reading order. ``default_seeds``: profile name ->
    the seeds the notebook runs when its ``seeds`` parameter is None (else the profile's)."""

    name: str
    title: str
    part: str
    order: int
    declare: Callable[[Profile], Declaration]
    build: Callable[[Session], Any] | None = None
    default_seeds: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def runs(self, profile: Profile | str) -> list[RunConfig]:
        """Every run the artefact needs, each once, in the order of its declaration."""
        return unique(c for cfgs in self.declare(get_profile(profile)).values() for c in cfgs)

    def notebook_profile(self, profile: Profile | str) -> Profile:
        """The profile the notebook runs on with its default parameters (its own seeds where it has them)."""
        p = get_profile(profile)
        seeds = self.default_seeds.get(p.name)
        return p if seeds is None else p.with_options(seeds=tuple(seeds))


def unique(configs: Iterable[RunConfig]) -> list[RunConfig]:
    """The runs, each once (one per options hash), in the order first seen."""
    seen: dict[str, RunConfig] = {}
    for cfg in configs:
        seen.setdefault(cfg.options_hash, cfg)
    return list(seen.values())


# -- run configs ---------------------------------------------------------------------------------------------
def teacher_run(profile: Profile, arch: str, dataset: str | None = None, epochs: int | None = None) -> RunConfig:
    """The teacher's own run (trained with cross-entropy, seed 0, ``epochs`` or ``profile.teacher_epochs``)."""
    return teacher_config(dataset or profile.dataset, arch, seed=0, epochs=epochs or profile.teacher_epochs)


def student_run(profile: Profile, arch: str, seed: int = 0, dataset: str | None = None) -> RunConfig:
    """The student trained alone (the paper's "Student" row), as long as the distillation runs."""
    return teacher_config(dataset or profile.dataset, arch, seed=seed, epochs=profile.epochs)


def distill_pair(
    profile: Profile,
    teacher: str,
    student: str,
    *,
    distiller: str = "kd",
    method: str = "kd",
    seed: int = 0,
    dataset: str | None = None,
    epochs: int | None = None,
    teacher_epochs: int | None = None,
    **options: Any,
) -> RunConfig:
    """A distillation run of ``student`` from ``teacher`` (architectures actually run). KCD runs always carry
    the profile's stage length ``T`` and its KCD knobs (``profile.kcd_options``: ρ, the score's α); the loss knobs
    (``profile.loss_options``: temperature, γ, α, β) go to the distiller when it has them (not to a method's own
    loss: UNIX keeps its KD). ``options`` (``rho``,
    ``alpha``, ``augment``, UNIX's ``k``) win over the knobs: a table that varies a setting keeps its own."""
    dataset = dataset or profile.dataset
    if method == "kcd":
        options = {"stage_epochs": profile.stage_epochs, **profile.kcd_options, **options}
    # A method with a loss of its own (UNIX: KD alone, γ = 0, α = 1) keeps it: the knobs are the named distiller's.
    own_loss = distiller == "kd" and METHODS[method].loss is not None
    specs = {} if own_loss else distillers.DISTILLERS[distiller].option_specs
    loss_options = {k: v for k, v in profile.loss_options.items() if k in specs}
    source: dict[str, Any]
    if teacher in profile.teacher_checkpoints:
        source = {"teacher_checkpoint": profile.teacher_checkpoints[teacher], "teacher_arch": teacher}
    else:
        source = {"teacher": teacher_run(profile, teacher, dataset, teacher_epochs)}
    return distill_config(
        dataset, student, distiller=distiller, distiller_options=loss_options, method=method,
        method_options=options, epochs=epochs or profile.epochs, seed=seed, **source,
    )  # fmt: skip


def distill(profile: Profile, paper_pair: str, **kw: Any) -> RunConfig:
    """The run standing in for ``paper_pair`` (``'teacher/student'``) in this profile."""
    teacher, student = profile.run_pair(paper_pair)
    return distill_pair(profile, teacher, student, **kw)


def seeds(profile: Profile, make: Callable[..., RunConfig], *args: Any, **kw: Any) -> list[RunConfig]:
    """``make(profile, *args, seed=s, **kw)`` for each of the profile's seeds: one row's runs."""
    return [make(profile, *args, seed=s, **kw) for s in profile.seeds]


def fs_over_ft(teacher: str, student: str, dataset: str) -> float:
    """Student/teacher forward multiply-adds at the dataset's image size (UNIX's Fs/Ft), counted."""
    spec = datasets.spec(dataset)
    size = (3, spec.image_size, spec.image_size)
    return cost.forward_macs(models.create(student, spec.num_classes), size) / cost.forward_macs(
        models.create(teacher, spec.num_classes), size
    )


def kcd_rho(profile: Profile) -> float:
    """The final keep-ratio ρ of the profile's KCD runs (the paper's 0.7 unless a notebook sets ``rho``)."""
    return profile.kcd_options.get("rho", KCD_RHO)


def kcd_computation(profile: Profile, rho: float | None = None, epochs: int | None = None, stage_epochs=None) -> float:
    """KCD's relative computation ``C`` for the paper schedule (Eq. 16)."""
    rho = kcd_rho(profile) if rho is None else rho
    return condense.schedule_computation("paper", epochs or profile.epochs, stage_epochs or profile.stage_epochs, rho)


def unix_k(profile: Profile, paper_pair: str) -> int:
    """UNIX's ``k`` whose Eq. 19 cost equals KCD's ``C`` for this pair (rounded to the nearest integer)."""
    teacher, student = profile.run_pair(paper_pair)
    ratio = fs_over_ft(teacher, student, profile.dataset)
    return round(cost.unix_k_for(kcd_computation(profile), batch=64, fs_over_ft=ratio))
