"""How the book shows a table or a figure: the display frame and its numbers, mean ± sd, the paper's column, the
links from a cell to its runs' pages."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

import pandas as pd

from ..identity import RunConfig
from ..profiles import Profile
from ..runs import RunStore

NOT_RUN = "not run"  # a cell of the paper's table that this profile does not run (the captions say so)


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
