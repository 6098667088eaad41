"""What every artefact shares: the declaration of an artefact, the runs it is made of, and how a table looks.

An artefact (a table or a figure of the book) is an :class:`Artefact`: its rows declared once, by
``declare(profile)``, as an ordered mapping from each row (or cell) to the runs behind it. Its runs are derived
from that declaration (:meth:`Artefact.runs`), and so is its table: ``build(session)`` walks the same declaration
and reads the records. The formatting helpers (mean ± sd, the paper's numbers, captions) live here too.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import TYPE_CHECKING, Any

import pandas as pd

from .. import condense, cost, distillers, models
from .. import data as datasets
from ..identity import RunConfig, distill_config, teacher_config
from ..methods import METHODS
from ..profiles import Profile, get_profile
from ..runs import RunStore

if TYPE_CHECKING:
    from .session import Session

# The paper's final keep-ratio ρ: the KCD method's default, defined there.
KCD_RHO = METHODS["kcd"].option_specs["rho"].default
NOT_RUN = "not run"  # a cell of the paper's table that this profile does not run (the captions say so)


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


def changed_options(cfg: RunConfig) -> dict[str, Any]:
    """The run's method and distiller options that differ from their defaults (KCD's stage length: ``epochs/6``)."""
    changed = {}
    for name, value in cfg.method_options:
        spec = METHODS[cfg.method].option_specs[name]
        default = cfg.recipe.epochs // 6 if name == "stage_epochs" and cfg.recipe.epochs % 6 == 0 else spec.default
        if value != default:
            changed[name] = value
    for name, value in cfg.distiller_options:
        if value != distillers.DISTILLERS[cfg.distiller].option_specs[name].default:
            changed["kd_alpha" if name == "alpha" else name] = value  # KCD has an alpha too
    return changed


def non_default_options(cfg: RunConfig) -> str:
    """:func:`changed_options` as ``rho=0.5 temperature=2`` (and a published teacher said)."""
    parts = [f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
             for name, value in changed_options(cfg).items()]  # fmt: skip
    if cfg.teacher_sha256 is not None:
        parts.append("published teacher")
    return " ".join(parts)


def unique(configs: Iterable[RunConfig]) -> list[RunConfig]:
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


# -- tables ----------------------------------------------------------------------------------------------------
# Lines and alignment for the book's tables (the theme draws none around pandas' HTML). Headers and row labels
# wrap, numbers do not: a table of a few columns with long names (Table 4) fits the page's column at 1280 px.
TABLE_STYLE = [
    {"selector": "", "props": "font-size: 0.9em;"},
    {"selector": "th, td", "props": "padding: 0.2em 0.5em; text-align: right; white-space: nowrap;"},
    {"selector": "tbody th", "props": "text-align: left; white-space: normal; min-width: 9em;"},
    {"selector": "thead th", "props": "border-bottom: 1px solid #888; text-align: center; white-space: normal;"},
    {"selector": "tbody tr:nth-child(even)", "props": "background-color: #f4f6f8;"},
]


@dataclass
class Table:
    """A table as the book shows it (``frame``, strings: what the profile ran), its numbers (``data``, one row per
    cell, floats: the source for glued prose) and a caption; ``full``, when set, is the paper's whole table with
    ours beside it (one click away on the page, under ``frame``)."""

    name: str
    caption: str
    frame: pd.DataFrame
    data: pd.DataFrame
    key_numbers: dict[str, float] = field(default_factory=dict)
    # (row, column) of ``frame`` -> the hashes of the runs the cell is made of (:func:`run_hashes`): the rendered
    # cell links to their pages (kcdlib.runpages).
    links: dict[Any, list[str]] = field(default_factory=dict)
    full: pd.DataFrame | None = None  # the paper's whole table, of which ``frame`` is what the profile ran

    def styled(self, frame: pd.DataFrame | None = None):
        return (self.linked() if frame is None else frame).style.set_table_styles(TABLE_STYLE)

    def linked(self) -> pd.DataFrame:
        """``frame`` with each cell of ``links`` linked to its run's page (one run), or followed by a link per run
        (several seeds: ``[1] [2] [3]``)."""
        from ..runpages import href

        frame = self.frame.copy()
        for (row, col), hashes in self.links.items():
            if row not in frame.index or col not in frame.columns:
                continue  # a cell of the paper's whole table that this profile's table does not show
            text = escape(str(frame.loc[row, col]), quote=False)
            if len(hashes) == 1:
                frame.loc[row, col] = f'<a class="kcd-run" href="{href(hashes[0])}">{text}</a>'
            else:
                runs = " ".join(f'<a class="kcd-run" href="{href(h)}">[{i}]</a>' for i, h in enumerate(hashes, 1))
                frame.loc[row, col] = f"{text} <sup>{runs}</sup>"
        return frame

    def _repr_html_(self) -> str:
        # The caption is a paragraph above the table's own scroll box: it wraps at the page's width, never clipped.
        html = f'<p class="kcd-caption">{escape(self.caption, quote=False)}</p>{_scroll(self.styled().to_html())}'
        if self.full is not None:
            html += (f"<details><summary>The paper's whole table: every row and pair it prints, '{NOT_RUN}' where "
                     f"this profile did not run the cell</summary>{_scroll(self.styled(self.full).to_html())}"
                     "</details>")  # fmt: skip
        return html

    def __repr__(self) -> str:
        return f"{self.caption}\n{self.frame.to_string()}"


def _scroll(html: str) -> str:
    return f'<div style="overflow-x: auto; max-width: 100%;">{html}</div>'


@dataclass
class Figure:
    name: str
    caption: str
    figure: Any  # matplotlib Figure
    data: pd.DataFrame
    key_numbers: dict[str, float] = field(default_factory=dict)
    # What each part of the figure shows -> the hashes of the runs it is made of (:func:`run_hashes`).
    links: dict[str, list[str]] = field(default_factory=dict)

    def runs_html(self) -> str:
        """One line under the figure linking each part to its runs' pages (kcdlib.runpages)."""
        from ..runpages import href

        parts = [", ".join(f'<a class="kcd-run" href="{href(h)}">{escape(label, quote=False)}</a>' for h in hashes)
                 for label, hashes in self.links.items()]  # fmt: skip
        return f'<p class="kcd-runs">The runs behind the figure: {"; ".join(parts)}.</p>' if parts else ""


def values(store: RunStore, configs: Sequence[RunConfig], key: str) -> list[float]:
    """Field ``key`` of each run's record (every run must be finished: ``session.ensure`` first)."""
    out = []
    for cfg in configs:
        rec = store.record(cfg)
        if rec is None:
            raise KeyError(f"run {store.path(cfg)} ({cfg.arch} {cfg.method}) is missing: call session.ensure first")
        out.append(float(rec[key]))
    return out


def run_hashes(store: RunStore, configs: Sequence[RunConfig]) -> list[str]:
    """The identities of the runs behind a cell, for :attr:`Table.links` (computed by the store, never here)."""
    return [store.run_hash(cfg) for cfg in configs]


def mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def fmt(mean: float, sd: float, digits: int = 2) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def paper(value: Any) -> str:
    return "–" if value is None or pd.isna(value) else f"{float(value):.2f}"


def percent(fraction: float) -> str:
    return f"{100 * fraction:.1f} %"


def cell(store: RunStore, configs: Sequence[RunConfig], key: str = "final_top1") -> tuple[float, float, str]:
    """The mean and sd of ``key`` over the runs, and the text of the cell: last / best epoch for top-1."""
    mean, sd = mean_sd(values(store, configs, key))
    if key != "final_top1":
        return mean, sd, fmt(mean, sd)
    best, best_sd = mean_sd(values(store, configs, "best_top1"))
    return mean, sd, f"{fmt(mean, sd)} / {fmt(best, best_sd)}"


def paper_column(profile: Profile, dataset: str = "cifar100", name: str = "paper", short: str = "paper") -> str:
    """The header of the paper's column (``name``); on a profile that runs other data than the paper's
    ``dataset``, ``short`` said to be not comparable: ``paper (CIFAR-100, not comparable)``."""
    return name if profile.dataset == dataset else f"{short} ({_DATASET_NAMES.get(dataset, dataset)}, not comparable)"


_DATASET_NAMES = {"cifar100": "CIFAR-100", "imagenet": "ImageNet", "digits": "digits"}


def resolution(dataset: str) -> str:
    """How fine a top-1 difference the test split can show: one test image in points of top-1 %."""
    spec = datasets.spec(dataset)
    return (f"Resolution: {spec.num_test:,} test images of {dataset}, one image = "
            f"{spec.points_per_test_image:.2f} points of top-1.")  # fmt: skip


def caption(
    title: str,
    profile: Profile,
    pairs: Iterable[str],
    dataset: str | None = None,
    paper_note: str = "paper: as published (CIFAR-100)",
    teachers: str = "",
    epochs: tuple[int, int] | None = None,
    runs: Iterable[RunConfig] = (),
    varied: Iterable[str] = (),
) -> str:
    """A table's caption: the schedule of this build first, then the profile, the pairs, seeds and what the
    columns mean. ``runs`` (the runs behind the table) name every option that differs from the paper's in them,
    except the ``varied`` ones (the table's rows say those)."""
    shown = [f"{p} → {'/'.join(profile.run_pair(p))}" if profile.pairs.get(p, p) != p else p for p in pairs]
    seed_list = ", ".join(map(str, profile.seeds))
    many = " (mean ± sd over seeds)" if len(profile.seeds) > 1 else ""
    other = f" Dataset: {dataset}." if dataset and dataset != profile.dataset else ""
    epochs, stage = epochs or (profile.epochs, profile.stage_epochs)
    own = get_profile(profile.name)
    rescheduled = (profile.epochs, profile.stage_epochs, profile.teacher_epochs) != (
        own.epochs, own.stage_epochs, own.teacher_epochs)  # fmt: skip
    return (
        f"{title}. This build: {epochs} epochs, KCD stages of {stage}{changed_settings(runs, varied)}. Profile "
        f"'{profile.name}'{' with its schedule changed by the parameters (its own: ' if rescheduled else ' ('}"
        f"{profile.description}).{other} Pairs run (paper → run): {'; '.join(shown) or 'none'}. Seeds: {seed_list}. "
        f"Ours: top-1 % at the last epoch / at the best epoch{many}; the paper most likely printed the best epoch "
        f"(the released KCD script reports the best test accuracy; RepDistiller, whose baselines it quotes, the "
        f"last). {resolution(dataset or profile.dataset)} "
        f"{paper_note}; '{NOT_RUN}': not run on this profile. C: counted computation relative to KD.{teachers}"
    )


# How a caption names an option (the paper's symbols where it has one).
OPTION_NAMES = {"temperature": "T", "gamma": "γ", "kd_alpha": "α (KD term)", "alpha": "α", "beta": "β", "rho": "ρ"}


def changed_settings(runs: Iterable[RunConfig], varied: Iterable[str] = ()) -> str:
    """``; not the paper's: T=2 (every run), ...``: the options of ``runs`` that differ from the paper's defaults,
    from the runs' own configs, ``varied`` left out, and KCD's stage length (the caption states it); "" when none."""
    seen: dict[str, list] = {}
    runs = [c for c in runs if c.kind == "distill"]
    for cfg in runs:
        for name, value in changed_options(cfg).items():
            if name not in (*varied, "stage_epochs") and value not in seen.setdefault(name, []):
                seen[name].append(value)
    if not seen:
        return ""
    parts = [f"{OPTION_NAMES.get(n, n)}={'/'.join(f'{v:g}' if isinstance(v, float) else str(v) for v in vs)}"
             for n, vs in seen.items()]  # fmt: skip
    return f"; not the paper's settings: {', '.join(parts)}"


def teachers(store: RunStore, configs: Iterable[RunConfig]) -> str:
    """Which teachers the runs distilled from, each with the accuracy measured here when it was used."""
    seen: dict[str, str] = {}
    for cfg in configs:
        if cfg.kind != "distill" or cfg.teacher_arch in seen:
            continue
        rec = store.record(cfg) or {}
        acc = (rec.get("teacher_accuracy") or {}).get("top1")
        where = "a published checkpoint" if cfg.teacher is None else "trained here"
        seen[cfg.teacher_arch] = f"{cfg.teacher_arch}, {where}" + ("" if acc is None else f" ({acc:.2f} % top-1)")
    return f" Teachers (top-1 measured here): {'; '.join(seen.values())}." if seen else ""


def ran(full: pd.DataFrame, groups: Sequence[str]) -> pd.DataFrame:
    """The part of a paper's whole table that the profile ran: the column groups ``groups`` (its pairs, plus any
    group of ``full`` that is not a pair, e.g. Table 1's counted C), the rows with a cell of ours in them."""
    keep = [c for c in full.columns if c[0] in groups or "/" not in c[0]]
    part = full[keep]
    ours = [c for c in keep if c[1] == "ours"]
    return part[(part[ours] != NOT_RUN).any(axis=1)] if ours else part


def frame_of(cells: dict[tuple[str, tuple[str, str]], str], columns: Sequence[tuple[str, str]], index: str):
    """A display frame from ``{(row label, (column group, column)): text}``, rows in first-seen order."""
    frame = pd.Series(cells).unstack().reindex(list(dict.fromkeys(label for label, _ in cells)))
    frame.columns = pd.MultiIndex.from_tuples(frame.columns)
    frame = frame[list(columns)].fillna("–")  # a row of one pair only (a distiller the paper did not run)
    frame.index.name = index
    return frame
