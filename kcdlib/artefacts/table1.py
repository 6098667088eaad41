"""Table 1: KD, PKT and CRD with and without knowledge condensation, the teacher and the student trained alone.

Rows: for each pair the profile runs, ``Teacher``, ``Student`` and, for each distiller of the profile, its label
(from the distiller registry) and ``KC-<label>``. The table shows the pairs the profile ran; the paper's whole
table, ours beside it where the profile ran the cell, is one click away (``Table.full``)."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

import pandas as pd

from .. import reference
from ..distillers import DISTILLERS
from ..profiles import Profile
from .captions import caption, teachers
from .declare import Artefact, Field, distill, pair_teachers, student_run, teacher_run
from .format import NOT_RUN, Table, cell, frame_of, mean_sd, paper, paper_column, percent, ran, run_hashes, values
from .noise import METHOD, counts, difference

if TYPE_CHECKING:
    from .session import Session  # the notebook's, for build(); a declaration needs no session

# The pairs of the paper's Table 1 (teacher/student, the RepDistiller model names), and the pairs each profile runs.
TABLE1_PAIRS = Field(
    "table1_pairs",
    ("wrn_40_2/wrn_16_2", "wrn_40_2/wrn_40_1", "resnet56/resnet20", "resnet32x4/resnet8x4", "vgg13/vgg8",
     "vgg13/MobileNetV2", "ResNet50/MobileNetV2", "ResNet50/vgg8", "resnet32x4/ShuffleV1", "resnet32x4/ShuffleV2",
     "wrn_40_2/ShuffleV1"),
    {"smoke": ("wrn_40_2/wrn_16_2", "resnet56/resnet20"), "tiny": ("wrn_40_2/wrn_16_2",),
     "course": ("wrn_40_2/wrn_16_2", "resnet32x4/resnet8x4")},
    teachers=pair_teachers,
)  # fmt: skip
# The distillers run with and without KCD (registry names). The paper's three have glued gains (NaN) even where a
# profile does not run them.
TABLE1_DISTILLERS = Field("table1_distillers", ("kd", "pkt", "crd"), {"tiny": ("kd",), "course": ("kd", "crd")})
DIFF = "KC − base"  # the column of the differences against seed noise (kcdlib.artefacts.noise)


def label(distiller: str, method: str) -> str:
    return ("KC-" if method == "kcd" else "") + DISTILLERS[distiller].label


def declare(p: Profile) -> dict[tuple[str, str], list]:
    """(paper pair, row label) -> the runs of that cell."""
    rows = {}
    for pair in TABLE1_PAIRS.of(p):
        teacher, student = p.run_pair(pair)
        rows[(pair, "Teacher")] = [teacher_run(p, teacher)]
        rows[(pair, "Student")] = [student_run(p, student, s) for s in p.seeds]
        for d in TABLE1_DISTILLERS.of(p):
            for m in ("kd", "kcd"):
                # KD against KC-KD is the comparison the findings page weighs against seed noise: its seeds.
                s = p.comparison_seeds() if d == "kd" else p.seeds
                rows[(pair, label(d, m))] = [distill(p, pair, distiller=d, method=m, seed=i) for i in s]
    return rows


def build(session: Session) -> Table:
    """Table 1: the paper's whole table (every method and pair it prints), ours beside it where this profile ran
    the cell: KD, PKT, CRD and their KC- versions, the teacher and the student trained alone."""
    p, store = session.profile, session.store
    run_pairs, run_distillers = TABLE1_PAIRS.of(p), TABLE1_DISTILLERS.of(p)
    published = reference.paper_table1()
    declared = declare(p)
    head = paper_column(p)
    rows, cells, run_cfgs, links = [], {}, [], {}
    pairs = list(dict.fromkeys([*published.columns, *run_pairs]))
    for pair in pairs:
        teacher, student = p.run_pair(pair)
        entries = {lab: cfgs for (pr, lab), cfgs in declared.items() if pr == pair}
        for lab in dict.fromkeys([*published.index, *entries]):
            ref = published.loc[lab, pair] if lab in published.index and pair in published.columns else None
            cells[(lab, (pair, head))] = paper(ref)
            cfgs = entries.get(lab)
            if cfgs is None:
                cells[(lab, (pair, "ours"))] = NOT_RUN
                continue
            run_cfgs += cfgs
            mean, sd, text = cell(store, cfgs)
            c = statistics.fmean(values(store, cfgs, "computation")) if lab not in ("Teacher", "Student") else None
            rows.append({"pair": pair, "run_pair": f"{teacher}/{student}", "method": lab, "ours": mean,
                         "ours_sd": sd, "ours_best": mean_sd(values(store, cfgs, "best_top1"))[0],
                         "paper": None if ref is None or pd.isna(ref) else float(ref), "computation": c})  # fmt: skip
            cells[(lab, (pair, "ours"))] = text
            links[(lab, (pair, "ours"))] = run_hashes(store, cfgs)
    data = pd.DataFrame(rows)
    # The paper's claim, cell by cell: KC-X beats X on the pair. The difference of the means over seeds (last
    # epoch) with Welch's interval; a gain only where the interval excludes 0.
    diffs = []
    for pair in run_pairs:
        for d in run_distillers:
            kc, base = declared[(pair, label(d, "kcd"))], declared[(pair, label(d, "kd"))]
            diff = difference(values(store, kc, "final_top1"), values(store, base, "final_top1"))
            diffs.append(diff)
            cells[(label(d, "kcd"), (pair, DIFF))] = diff.text()
    shown = [(pair, k) for pair in pairs for k in (head, "ours", DIFF) if k != DIFF or pair in run_pairs]
    frame = frame_of(cells, shown, "method")
    comp = data.dropna(subset=["computation"]).groupby("method", sort=False)["computation"].mean()
    frame[("", "C (counted)")] = [percent(comp[m]) if m in comp else "" for m in frame.index]
    names = dict.fromkeys([*TABLE1_DISTILLERS.paper, *run_distillers])
    gains = {f"{d}_gain": float("nan") for d in names} | {f"{d}_wins": 0 for d in names}
    for d in run_distillers:
        base = data[data.method == label(d, "kd")].set_index("pair")["ours"]
        kc = data[data.method == label(d, "kcd")].set_index("pair")["ours"]
        gains[f"{d}_gain"] = float((kc - base).mean())
        gains[f"{d}_wins"] = int((kc > base).sum())
    claims = counts(diffs)
    gains |= {f"claims_{v.replace(' ', '_')}": n for v, n in claims.items()} | {"claims": len(diffs)}
    key = {**gains, "pairs": len(run_pairs), "kcd_computation": 100 * float(comp.get("KC-KD", float("nan")))}
    shown = ", ".join(DISTILLERS[d].label for d in names)
    title = f"Table 1: top-1 accuracy of {shown} and their KCD versions, on the pairs this profile ran"
    text = caption(title, p, run_pairs, teachers=teachers(store, run_cfgs), runs=run_cfgs) + (
        (
            ""
            if p.comparison_seeds() == p.seeds
            else f" KD and KC-KD: seeds {', '.join(map(str, p.comparison_seeds()))}, for the comparison against noise."
        )
        + f" {DIFF}: KC-X's mean top-1 (last epoch) minus X's, with a {METHOD} 95 % interval over seeds where both "
        "have two or more (a gain only where it excludes 0; one seed: the bare difference, no verdict)."
    )
    return Table("table1", text, ran(frame, run_pairs), data, key, links, full=frame)


ARTEFACT = Artefact("table1", "Table 1: KD, PKT and CRD, with and without knowledge condensation", "paper", 10,
                    declare, build, fields=(TABLE1_PAIRS, TABLE1_DISTILLERS))  # fmt: skip
