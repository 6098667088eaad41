"""Tables 5 (α), 6 (ρ) and 7 (augmentation): one idea, three tables. KC-KD with one setting varied, the others at
the paper's; the paper's whole table (every setting and pair it prints), ours where the profile ran the cell.

Rows: for each setting the profile runs (the field ``alphas``, ``rhos`` or ``augments`` of ``table5.py``,
``table6.py``, ``table7.py``) and each of the :data:`GRID_PAIRS`, the runs of that cell. :func:`grid_artefact` makes
the three artefacts; ``table5.py``, ``table6.py`` and ``table7.py`` each hold one."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from .. import reference
from ..profiles import Profile
from .captions import caption, teachers
from .declare import Artefact, Field, distill, kcd_rho, pair_teachers, seeds
from .format import NOT_RUN, Table, cell, frame_of, paper, paper_column, percent, ran, run_hashes, values

if TYPE_CHECKING:
    from .session import Session  # the notebook's, for build(); a declaration needs no session

# The supplement's pairs of Tables 5-7; the short profiles run the first (or its stand-in).
GRID_PAIRS = Field(
    "grid_pairs", ("wrn_40_2/wrn_16_2", "vgg13/MobileNetV2", "resnet32x4/ShuffleV2"),
    {"smoke": ("wrn_40_2/wrn_16_2",), "tiny": ("wrn_40_2/wrn_16_2",), "course": ("wrn_40_2/wrn_16_2",)},
    teachers=pair_teachers,
)  # fmt: skip

# Table 7's row names in the supplement for our augment option values.
AUGMENT_LABELS = {"none": "K1 w/o Aug.", "random": "Aug. K1 in random (eps=eps_m)", "K1H": "Aug. K1H",
                  "K1L": "Aug. K1L"}  # fmt: skip


@dataclass(frozen=True)
class Grid:
    table: int  # the supplement's table number
    option: str  # the KCD option varied
    symbol: str  # its name in the table
    values: Field  # the settings run (the table's own field)
    title: str

    def label(self, value: Any) -> str:
        return AUGMENT_LABELS[value] if self.option == "augment" else f"{self.symbol} = {value:g}"

    def key(self, value: Any) -> str:
        """A setting as the paper's table spells it (0.7 and 0.70 are one setting)."""
        return AUGMENT_LABELS.get(value, value) if self.option == "augment" else f"{float(value):g}"

    def declare(self, p: Profile) -> dict[tuple[Any, str], list]:
        """(setting, paper pair) -> the runs of that cell."""
        return {(v, pair): seeds(p, distill, pair, method="kcd", **{self.option: v})
                for pair in GRID_PAIRS.of(p) for v in self.values.of(p)}  # fmt: skip

    def build(self, session: Session) -> Table:
        p, store = session.profile, session.store
        published = reference.paper_tables5to7()
        published = published[published.table == self.table]
        paper_pairs = [c for c in published.columns if "/" in c]
        # The paper's settings as our option values (Table 7 prints names; AUGMENT_LABELS maps ours to them).
        by_label = {label: value for value, label in AUGMENT_LABELS.items()}
        paper_values = [by_label.get(v, v) if self.option == "augment" else float(v) for v in published.value]
        declared = self.declare(p)
        head = paper_column(p)
        pairs = list(dict.fromkeys([*paper_pairs, *GRID_PAIRS.of(p)]))
        rows, cells, run_cfgs, links = [], {}, [], {}
        for v in _unique_values([*paper_values, *self.values.of(p)]):
            label = self.label(v)
            ref_row = published[published.value.map(self.key) == self.key(v)]
            for pair in pairs:
                ref = ref_row[pair].iloc[0] if len(ref_row) and pair in ref_row else None
                cells[(label, (pair, head))] = paper(ref)
                cfgs = next((cfgs for (r, pr), cfgs in declared.items() if pr == pair and _same(v, r)), None)
                if cfgs is None:
                    cells[(label, (pair, "ours"))] = NOT_RUN
                    cells[(label, (pair, "C (counted)"))] = "–"
                    continue
                run_cfgs += cfgs
                mean, sd, text = cell(store, cfgs)
                counted = statistics.fmean(values(store, cfgs, "computation"))
                rows.append({"setting": v, "pair": pair, "ours": mean, "ours_sd": sd, "paper": ref,
                             "computation": counted})  # fmt: skip
                cells[(label, (pair, "ours"))] = text
                links[(label, (pair, "ours"))] = run_hashes(store, cfgs)
                cells[(label, (pair, "C (counted)"))] = percent(counted)
        frame = frame_of(cells, [(pair, k) for pair in pairs for k in (head, "ours", "C (counted)")], self.symbol)
        data = pd.DataFrame(rows)
        best = data.groupby("setting", sort=False)["ours"].mean()
        settings = {
            "cost_exponent": f"α={p.kcd_options.get('cost_exponent', 0.03):g}",
            "rho": f"ρ={kcd_rho(p):g}",
            "augment": "K1L",
        }
        others = ", ".join(text for option, text in settings.items() if option != self.option)
        text = caption(f"{self.title} (KC-KD; the other KCD settings: {others})", p, GRID_PAIRS.of(p),
                       teachers=teachers(store, run_cfgs), runs=run_cfgs, varied=(self.option,))  # fmt: skip
        key = {"best": str(best.idxmax()), "spread": float(best.max() - best.min())}
        return Table(f"table{self.table}", text, ran(frame, GRID_PAIRS.of(p)), data, key, links, full=frame)


def grid_artefact(grid: Grid, order: int) -> Artefact:
    return Artefact(f"table{grid.table}", grid.title, "paper", order, grid.declare, grid.build,
                    fields=(GRID_PAIRS, grid.values))  # fmt: skip


def _same(a: Any, b: Any) -> bool:
    return a == b if isinstance(a, str) or isinstance(b, str) else math.isclose(float(a), float(b))


def _unique_values(values: Iterable[Any]) -> list[Any]:
    """The settings in order, each once (0.7 and 0.70 are one setting)."""
    out: list[Any] = []
    for v in values:
        if not any(_same(v, u) for u in out):
            out.append(v)
    return out
