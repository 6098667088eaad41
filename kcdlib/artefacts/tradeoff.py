"""Accuracy against computation: every method the profile runs on a pair, top-1 against the counted computation
``C`` relative to KD on the same pair, and the points no other point beats on both axes joined as a frontier.

Rows: the runs the tables already declare, nothing more: Table 1's distillers with and without KCD, Table 2's
UNIX at its ``k``, Table 4's ablations (random values among them), Tables 5-7's α, ρ and augmentation, Table 3's
pair; one point per distinct set of runs (a run shared by two tables is one point), grouped by the pair run."""

from __future__ import annotations

import base64
import io
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from .. import condense, reference
from ..identity import RunConfig
from ..profiles import Profile
from ..runpages import href
from . import grid, table1, table2, table3, table4, table5, table6, table7
from .declare import KCD_RHO, Artefact
from .format import Table, mean_sd, percent, run_hashes, values

if TYPE_CHECKING:
    from .session import Session  # the notebook's, for build(); a declaration needs no session


@dataclass
class Tradeoff:
    """The plot (``figure``, matplotlib), its numbers as a table whose cells link to the runs (``table``), and the
    paper's own points (``paper``)."""

    table: Table
    figure: Any
    paper: pd.DataFrame
    caption: str  # the figure's

    @property
    def key_numbers(self) -> dict[str, float]:
        return self.table.key_numbers

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict[str, str]:
        """The plot as inline SVG (the book shows it: every run's dot links to its page) and as PNG (the notebook's
        fallback)."""
        svg, png = io.StringIO(), io.BytesIO()
        self.figure.savefig(svg, format="svg")
        self.figure.savefig(png, format="png", dpi=100)
        # Drop the XML prolog and the fixed size: the inline plot scales to the page's column.
        text = re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r'<svg\1 style="width: 100%; height: auto"',
                      svg.getvalue()[svg.getvalue().index("<svg"):], count=1)  # fmt: skip
        return {"text/html": text, "image/png": base64.b64encode(png.getvalue()).decode()}


def frontier(computation: Sequence[float], top1: Sequence[float]) -> list[bool]:
    """Which points are on the frontier: no other point has ``C`` no higher and top-1 no lower, one of the two
    strictly (a point beaten on both axes, or matched on one and beaten on the other, is off it)."""
    points = list(zip(computation, top1))
    return [
        not any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for c2, a2 in points)
        for c, a in points
    ]  # fmt: skip


def group(cfg: RunConfig) -> str:
    """The pair a point belongs to: ``teacher → student`` as run (the dataset named when it is not the profile's)."""
    return f"{cfg.teacher_arch} → {cfg.arch} ({cfg.dataset})"


def declare(p: Profile) -> dict[tuple[str, str], list[RunConfig]]:
    """(pair run, method label) -> its runs, from the tables' own declarations; runs a point already holds are not
    another point (Table 1's KD over three seeds holds Table 2's KD of seed 0), nor is a second point of one label."""
    labelled: list[tuple[str, list[RunConfig]]] = []
    labelled += [(lab, cfgs) for (_, lab), cfgs in table1.declare(p).items() if lab not in ("Teacher", "Student")]
    k = table2.unix_k(p, table2.TABLE2_PAIR.of(p))
    labelled += [(f"UNIX (k={k})" if lab == table2.UNIX_RERUN else lab, cfgs)
                 for lab, cfgs in table2.declare(p).items()]  # fmt: skip
    labelled += [(f"KC-KD, {lab}", cfgs) for lab, cfgs in table4.declare(p).items() if not lab.startswith("KD")]
    for g in (table5.GRID, table6.GRID, table7.GRID):
        labelled += [(f"KC-KD, {g.label(v)}", cfgs) for (v, _), cfgs in g.declare(p).items()]
    labelled += [(lab, cfgs) for lab, cfgs in table3.declare(p).items()]
    out: dict[tuple[str, str], list[RunConfig]] = {}
    seen: set[str] = set()
    for lab, cfgs in labelled:
        runs = {c.options_hash for c in cfgs}
        if not runs <= seen and (group(cfgs[0]), lab) not in out:
            seen |= runs
            out[(group(cfgs[0]), lab)] = cfgs
    return out


def paper_points(p: Profile) -> pd.DataFrame:
    """The paper's own (C, top-1) points, where it gives both, for the pairs this profile runs: KD (C = 1), KC-KD and
    Table 6's ρ at C from Eq. 16 at the paper's setting (240 epochs, stages of 40), UNIX as published."""
    t1, grids, unix = reference.paper_table1(), reference.paper_tables5to7(), reference.unix_published()
    rows = []
    pairs = [*table1.TABLE1_PAIRS.of(p), table2.TABLE2_PAIR.of(p), table4.TABLE4_PAIR.of(p), *grid.GRID_PAIRS.of(p)]
    for pair in dict.fromkeys(pairs):
        teacher, student = p.run_pair(pair)
        where = {"paper_pair": pair, "group": f"{teacher} → {student} ({p.dataset})"}
        if pair in t1.columns:
            rows.append({**where, "method": "KD", "computation": 1.0, "top1": t1.loc["KD", pair]})
            c = condense.schedule_computation("paper", 240, 40, KCD_RHO)
            rows.append({**where, "method": "KC-KD", "computation": c, "top1": t1.loc["KC-KD", pair]})
        if pair in grids.columns:
            for _, r in grids[grids.table == 6].iterrows():
                if float(r.value) == KCD_RHO:  # the paper's KC-KD point above
                    continue
                c = condense.schedule_computation("paper", 240, 40, float(r.value))
                rows.append({**where, "method": f"KC-KD, ρ = {float(r.value):g}", "computation": c, "top1": r[pair]})
        pt, ps = pair.split("/")
        for _, r in unix[(unix.teacher == pt) & (unix.student == ps)].iterrows():
            rows.append({**where, "method": "UNIX (published, k=48)", "computation": r.unix_computation_pct / 100,
                         "top1": r.unix_acc})  # fmt: skip
    data = pd.DataFrame(rows, columns=["paper_pair", "group", "method", "computation", "top1"])
    return data.dropna(subset=["top1"])


def build(session: Session) -> Tradeoff:
    """The trade-off: a plot per pair (``.figure``) and its numbers as a table whose cells link to the runs."""
    import matplotlib.pyplot as plt

    p, store = session.profile, session.store
    rows, links = [], {}
    for (pair, lab), cfgs in declare(p).items():
        last, last_sd = mean_sd(values(store, cfgs, "final_top1"))
        best, best_sd = mean_sd(values(store, cfgs, "best_top1"))
        each = values(store, cfgs, "computation")
        rows.append({"pair": pair, "method": lab, "computation": statistics.fmean(each), "last": last,
                     "last_sd": last_sd, "best": best, "best_sd": best_sd, "seeds": len(cfgs),
                     "runs": run_hashes(store, cfgs), "run_computation": each,
                     "run_last": values(store, cfgs, "final_top1")})  # fmt: skip
    data = pd.DataFrame(rows)
    data["frontier"] = False
    for _, idx in data.groupby("pair", sort=False).groups.items():
        data.loc[idx, "frontier"] = frontier(data.loc[idx, "computation"].tolist(), data.loc[idx, "last"].tolist())
    published = paper_points(p)
    comparable = p.dataset == "cifar100"

    groups = list(dict.fromkeys(data.pair))
    # Two pairs a row at most: the book's column is narrow, and the points of one pair crowd near KCD's C.
    cols = min(2, len(groups))
    rows_ = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(6 * cols, 4.8 * rows_), squeeze=False, layout="constrained")
    for ax in axes.flat[len(groups) :]:
        ax.set_axis_off()
    for ax, g in zip(axes.flat, groups):
        d = data[data.pair == g].sort_values("computation")
        kcd = d.method.str.startswith("KC-")
        for sel, colour, name in ((~kcd, "C0", "without KCD (KD, PKT, CRD, UNIX)"), (kcd, "C1", "with KCD")):
            s = d[sel]
            ax.errorbar(100 * s.computation, s["last"], yerr=s.last_sd.fillna(0), fmt="o", color=colour, capsize=3,
                        label=f"{name}: last epoch")  # fmt: skip
            ax.scatter(100 * s.computation, s.best, marker="_", s=120, color=colour, label=f"{name}: best epoch")
            # One small dot per run, on top, linked to the run's page (in the book's inline SVG).
            runs = s.explode(["runs", "run_computation", "run_last"])
            dots = ax.scatter(100 * runs.run_computation.astype(float), runs.run_last.astype(float), s=10,
                              color="white", edgecolors=colour, linewidths=0.8, zorder=3)  # fmt: skip
            dots.set_urls([href(h) for h in runs.runs])
        f = d[d.frontier]
        ax.plot(100 * f.computation, f["last"], "-", color="0.3", lw=1, zorder=0, label="frontier (last epoch)")
        # Frontier points share a C (KCD's variants): their labels step down so that none hides another.
        for i, (_, r) in enumerate(f.sort_values("last", ascending=False).iterrows()):
            ax.annotate(r.method, (100 * r.computation, r["last"]), xytext=(8, -4 - 11 * i), fontsize=7,
                        textcoords="offset points", arrowprops={"arrowstyle": "-", "color": "0.6"})  # fmt: skip
        if comparable:
            q = published[published.group == g]
            ax.scatter(100 * q.computation, q.top1, marker="s", facecolors="none", edgecolors="k",
                       label="the paper (CIFAR-100)")  # fmt: skip
        ax.set(xlabel="counted computation C, % of KD on this pair", ylabel="top-1 %", title=g)
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8)
    plt.close(fig)

    display = []
    for _, r in data.iterrows():
        sd = "" if pd.isna(r.last_sd) else f" ± {r.last_sd:.2f}"
        bsd = "" if pd.isna(r.best_sd) else f" ± {r.best_sd:.2f}"
        display.append({"pair": r.pair, "method": r.method, "C (counted)": percent(r.computation),
                        "top-1 last": f"{r['last']:.2f}{sd}", "top-1 best": f"{r.best:.2f}{bsd}",
                        "seeds": r.seeds, "frontier": "●" if r.frontier else ""})  # fmt: skip
        links[((r.pair, r.method), "top-1 last")] = r.runs
    frame = pd.DataFrame(display).set_index(["pair", "method"])
    n = sorted(set(data.seeds))
    text = (
        f"Accuracy against computation. Profile '{p.name}' ({p.description}); {p.epochs} epochs, KCD stages of "
        f"{p.stage_epochs}. Each point: one method on one pair, top-1 % (dot and bar: last epoch, mean ± sd over "
        f"seeds; dash: best epoch) against the computation C counted from the runs' passes, relative to KD on the "
        f"same pair; small circles: each run (a link to its page); {'/'.join(map(str, n))} seed(s) per point. "
        "The runs are the tables' own (Tables 1-7). The "
        "frontier joins the points no other point beats on both axes (lower C and higher last-epoch top-1). "
        + ("Squares: the paper's points where it gives both numbers (C of KCD from Eq. 16 at its setting; UNIX's "
           "from its README)." if comparable else
           f"The paper's points (CIFAR-100) are listed below, not plotted: this profile runs {p.dataset}.")
    )  # fmt: skip
    on = data[data.frontier]
    key = {"points": len(data), "frontier_points": len(on), "pairs": len(groups),
           "kcd_on_frontier": int(on.method.str.startswith("KC-").sum())}  # fmt: skip
    numbers = data.drop(columns=["runs", "run_computation", "run_last"])
    # The figure's caption goes above the plot; the table under it says only what it is.
    table = Table("tradeoff", "The numbers behind the plot: one row per point, each top-1 linked to its runs; ● "
                  "marks the frontier.", frame, numbers, key, links)  # fmt: skip
    return Tradeoff(table, fig, published, text)


ARTEFACT = Artefact("tradeoff", "Accuracy against computation", "paper", 85, declare, build)
