"""The declaration of an artefact (a table or a figure of the book) and the runs it is made of.

An artefact is an :class:`Artefact`: its rows declared once, by ``declare(profile)``, as an ordered mapping from
each row (or cell) to the runs behind it. Its runs are derived from that declaration (:meth:`Artefact.runs`), and
so is its table: ``build(session)`` walks the same declaration and reads the records (how a table looks:
:mod:`.format`; what its caption says: :mod:`.captions`). The run builders here (:func:`teacher_run`,
:func:`distill` ...) make every run of the book, so a profile's knobs reach every run the same way.

An artefact's own settings (Table 1's pairs, Table 5's α values ...) are its :class:`Field` s, declared in its
module with the paper's value and each profile's beside it; a notebook sets one by its name
(:func:`apply_parameters`), and what needs every artefact's fields asks the registry (:func:`teacher_archs`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import condense, cost, distillers, models
from .. import data as datasets
from ..errors import BadOption
from ..identity import RunConfig, distill_config, loss_of, teacher_config
from ..methods import METHODS
from ..options import checked_list
from ..profiles import Profile, get_profile

if TYPE_CHECKING:
    from .session import Session

# The paper's final keep-ratio ρ: the KCD method's default, defined there.
KCD_RHO = METHODS["kcd"].option_specs["rho"].default


# -- the declaration -----------------------------------------------------------------------------------------
Declaration = Mapping[Any, Sequence[RunConfig]]


@dataclass(frozen=True)
class Field:
    """One of an artefact's own settings, and the notebook parameter of the same name (``table1_pairs``): the
    paper's value, and the value of each profile that runs another (profile name -> value). ``teachers(p, value)``
    names the teacher architectures the value runs (for the published teachers to look for). ``follows`` names a
    field of the profile's schedule whose value a rehearsal (a notebook's ``epochs``) gives this field too, where
    the profile sets this one (Table 3's own ImageNet schedule)."""

    name: str
    paper: Any
    profiles: Mapping[str, Any] = field(default_factory=dict)
    teachers: Callable[[Profile, Any], Iterable[str]] | None = None
    follows: str | None = None

    def of(self, p: Profile) -> Any:
        """Its value on ``p``: a notebook's (``p.artefact_fields``), else the profile's, else the paper's."""
        if self.name in p.artefact_fields:
            return p.artefact_fields[self.name]
        return self.profiles.get(p.name, self.paper)


def pair_teachers(p: Profile, pairs: str | Iterable[str]) -> list[str]:
    """The teachers run in place of a paper pair's, or of each of a list of pairs (a :attr:`Field.teachers`)."""
    return [p.run_pair(pair)[0] for pair in ([pairs] if isinstance(pairs, str) else pairs)]


@dataclass(frozen=True)
class Artefact:
    """One table or figure of the book, and its notebook ``notebooks/<name>.md`` (its page in the book).

    ``declare(profile)`` lists the artefact's rows once: each row (or cell) key -> the runs behind it (one per
    seed). ``build(session)`` makes the table or figure from the records of those same runs. ``part`` is the
    book part the page belongs to and ``order`` its place in the reading order. ``default_seeds``: profile name ->
    the seeds the notebook runs when its ``seeds`` parameter is None (else the profile's). ``fields``: the
    artefact's own settings (:class:`Field`)."""

    name: str
    title: str
    part: str
    order: int
    declare: Callable[[Profile], Declaration]
    build: Callable[[Session], Any] | None = None
    default_seeds: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    fields: tuple[Field, ...] = ()

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
    ``cost_exponent``, ``augment``, UNIX's ``k``) win over the knobs: a table that varies a setting keeps its own."""
    dataset = dataset or profile.dataset
    if method == "kcd":
        options = {"stage_epochs": profile.stage_epochs, **profile.kcd_options, **options}
    # A method with a loss of its own (UNIX's) keeps it: the knobs are the named distiller's only.
    specs = distillers.DISTILLERS[distiller].option_specs if loss_of(distiller, method) == distiller else {}
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
    """UNIX's Fs/Ft (:func:`kcdlib.cost.fs_over_ft`) of two architectures on ``dataset``."""
    spec = datasets.spec(dataset)
    return cost.fs_over_ft(models.create(student, spec.num_classes), models.create(teacher, spec.num_classes),
                           spec.image_size)  # fmt: skip


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


# -- every artefact's fields, and a notebook's parameters ----------------------------------------------------------
def artefact_fields() -> dict[str, Field]:
    """Every registered artefact's own fields by name (a field two artefacts share, the grids' pairs, once)."""
    from . import ARTEFACTS  # the registry: the package, complete once imported (it imports this module first)

    out: dict[str, Field] = {}
    for artefact in ARTEFACTS.values():
        for f in artefact.fields:
            if out.setdefault(f.name, f) is not f:
                raise ValueError(f"two artefacts declare a field called '{f.name}'")
    return out


def teacher_archs(p: Profile) -> set[str]:
    """Every teacher architecture the profile's artefacts distil from: of its stand-in pairs and of the pairs and
    teachers the artefacts' fields name."""
    archs = {p.run_pair(pair)[0] for pair in p.pairs}
    for f in artefact_fields().values():
        if f.teachers is not None:
            archs.update(f.teachers(p, f.of(p)))
    return archs


def apply_parameters(p: Profile, **given: Any) -> Profile:
    """``p`` with a notebook's parameters set (``None`` keeps a value): the profile's own fields (``epochs``,
    ``stage_epochs``, ``teacher_epochs`` ...) and the artefacts' (``table2_pair``, ``grid_pairs``, ``alphas`` ...),
    each like its value on ``p`` (a list for a tuple; a number of epochs at least 1). A rehearsal's ``epochs`` also
    reschedules the fields that follow the schedule, where the profile sets them (Table 3's ImageNet schedule)."""
    own = {f.name for f in dataclasses.fields(Profile)} - {"artefact_fields"}
    theirs = artefact_fields()
    changes, fields_given = {}, {}
    for name, value in given.items():
        if value is None:
            continue
        if name in own:
            current = getattr(p, name)
        elif name in theirs:
            current = theirs[name].of(p)
        else:
            raise BadOption(f"unknown parameter {name}")
        if isinstance(current, tuple):
            value = tuple(checked_list(f"parameter {name}", value, lambda v, c=current: like(v, c[0]) if c else True,
                                  f"values like {current[:2]}"))  # fmt: skip
        elif not like(value, current):
            raise BadOption(f"parameter {name} must be like {current!r}, got {value!r}")
        elif isinstance(value, int) and value < 1:
            raise BadOption(f"parameter {name} must be at least 1, got {value}")
        (changes if name in own else fields_given)[name] = value
    if "epochs" in changes:
        for f in theirs.values():
            if f.follows in changes and f.of(p) is not None:
                fields_given[f.name] = changes[f.follows]
    return p.with_options(**changes, artefact_fields={**p.artefact_fields, **fields_given})


def like(value: Any, example: Any) -> bool:
    """``value`` has the type of ``example`` (an int stands for a float; a bool is no number)."""
    if isinstance(value, bool) or isinstance(example, bool):
        return isinstance(value, bool) and isinstance(example, bool)
    if isinstance(example, float):
        return isinstance(value, int | float) and math.isfinite(value)
    return isinstance(value, type(example))
