"""Table 2: KD, UNIX as published, UNIX re-run at KCD's computation (``k`` from Eq. 19), and KC-KD.

Rows: for each pair UNIX published (and the profile's pair), the four methods; only the profile's pair is run.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

import pandas as pd

from .. import cost, reference
from ..profiles import Profile, split_pair
from .captions import caption, teachers
from .declare import Artefact, Field, distill, fs_over_ft, kcd_computation, pair_teachers, seeds, unix_k
from .format import NOT_RUN, Table, cell, paper, paper_column, percent, run_hashes, values

if TYPE_CHECKING:
    from .session import Session  # the notebook's, for build(); a declaration needs no session

# The pair of the paper's Table 2, run by every profile (the five-minute notebook runs it too).
TABLE2_PAIR = Field("table2_pair", "wrn_40_2/wrn_16_2", teachers=pair_teachers)
KD, UNIX_PUBLISHED, UNIX_RERUN, KCKD = "KD", "UNIX (published, k=48)", "UNIX (re-run at KCD's C)", "KC-KD"


def declare(p: Profile) -> dict[str, list]:
    """Method -> the runs of the profile's pair (UNIX's ``k`` matched to KCD's ``C``)."""
    pair = TABLE2_PAIR.of(p)
    k = unix_k(p, pair)
    return {KD: seeds(p, distill, pair), UNIX_RERUN: seeds(p, distill, pair, method="unix", k=k),
            KCKD: seeds(p, distill, pair, method="kcd")}  # fmt: skip


def build(session: Session) -> Table:
    """Table 2: KD, UNIX as published, UNIX re-run at KCD's computation (k from Eq. 19), and KC-KD, for every pair
    UNIX published; ours where this profile ran the pair."""
    p, store = session.profile, session.store
    published = reference.unix_published()
    paper1 = reference.paper_table1()
    run_pair = TABLE2_PAIR.of(p)
    declared = declare(p)
    published_pairs = [f"{t}/{s}" for t, s in zip(published.teacher, published.student)]
    head = paper_column(p, name="top-1 published")
    rows, display, key, links = [], [], {}, {}
    for pair in dict.fromkeys([*published_pairs, run_pair]):
        pt, ps = split_pair(pair)
        pub = published[(published.teacher == pt) & (published.student == ps)]
        pub = pub.iloc[0] if len(pub) else None
        ran = pair == run_pair
        k = unix_k(p, pair) if ran else None
        ratio = fs_over_ft(*p.run_pair(pair), p.dataset) if ran else None
        entries = [
            (KD, 1.0, None if pub is None else pub.kd_acc),
            (UNIX_PUBLISHED, None if pub is None else pub.unix_computation_pct / 100,
             None if pub is None else pub.unix_acc),
            (UNIX_RERUN, cost.unix_computation(k, 64, ratio) if ran else None, None),
            (KCKD, kcd_computation(p) if ran else None, paper1.loc[KCKD, pair] if pair in paper1.columns else None),
        ]  # fmt: skip
        for label, formula, ref in entries:
            mean = sd = counted = float("nan")
            if label == UNIX_PUBLISHED:
                text, counted_text = "(published only)", "–"
            elif not ran:
                text, counted_text = NOT_RUN, "–"
            else:
                cfgs = declared[label]
                mean, sd, text = cell(store, cfgs)
                counted = statistics.fmean(values(store, cfgs, "computation"))
                counted_text = percent(counted)
                shown = f"UNIX (re-run, k={k})" if label == UNIX_RERUN else label
                links[((pair, shown), "top-1 ours")] = run_hashes(store, cfgs)
            if ran:
                key[label] = {"ours": mean, "computation": counted}
            rows.append({"pair": pair, "method": label, "ours": mean, "ours_sd": sd, "paper": ref,
                         "formula": formula, "computation": counted})  # fmt: skip
            display.append({
                "pair": pair, "method": f"UNIX (re-run, k={k})" if ran and label == UNIX_RERUN else label,
                head: paper(ref), "top-1 ours": text,
                "C (formula)": "–" if formula is None else percent(formula), "C (counted)": counted_text,
            })  # fmt: skip
    frame = pd.DataFrame(display).set_index(["pair", "method"])
    data = pd.DataFrame(rows)
    k, ratio = unix_k(p, run_pair), fs_over_ft(*p.run_pair(run_pair), p.dataset)
    text = caption(
        f"Table 2: KD, UNIX and KC-KD at matched computation, for every pair UNIX published; re-run: UNIX's "
        f"k={k} makes its Eq. 19 cost equal KCD's C (Fs/Ft={ratio:.3f} counted for the pair run); published "
        "numbers: UNIX's official README and the paper's Table 1",
        p, [run_pair], teachers=teachers(store, declared[KD]),
        runs=[c for cfgs in declared.values() for c in cfgs], varied=("k",),
    )  # fmt: skip
    unix = key[UNIX_RERUN]
    key = {"unix_k": k, "kd_top1": key[KD]["ours"], "unix_top1": unix["ours"], "kcd_top1": key[KCKD]["ours"],
           "unix_computation": 100 * unix["computation"],
           "kcd_computation": 100 * key[KCKD]["computation"]}  # fmt: skip
    return Table("table2", text, frame, data, key, links)


ARTEFACT = Artefact("table2", "Table 2: KCD against UNIX at the same computation", "paper", 20, declare, build,
                    fields=(TABLE2_PAIR,))  # fmt: skip
