"""Table 4 (our reconstruction): KCD's components added one at a time, and the paper's schedule against the code's.

Rows: :data:`ROWS`, each a label, a method and its options, all on the profile's Table-4 pair."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

import pandas as pd

from .. import condense, reference
from ..profiles import Profile
from ..released import released_code_schedule
from .captions import caption, teachers
from .declare import KCD_RHO, Artefact, Field, distill, pair_teachers, seeds
from .format import Table, cell, paper, paper_column, percent, run_hashes
from .format import values as read
from .noise import METHOD, difference

if TYPE_CHECKING:
    from .session import Session  # the notebook's, for build(); a declaration needs no session

# The pair of the ablation (every profile runs the paper's first pair, or its stand-in).
TABLE4_PAIR = Field("table4_pair", "wrn_40_2/wrn_16_2", teachers=pair_teachers)

# Label, method, options: each row adds one component of KCD to the one above (our reconstruction).
ROWS = (
    ("KD (all points)", "kd", {}),
    ("random condensation (KCD's schedule)", "kcd", {"value": "random", "augment": "none"}),
    ("+ value ranking, no cost-aware factor (α=0)", "kcd", {"cost_exponent": 0.0, "augment": "none"}),
    ("+ cost-aware factor (α=0.03), no augmentation", "kcd", {"augment": "none"}),
    ("+ knowledge augmentation K1L = full KCD (paper schedule)", "kcd", {}),
    ("full KCD, released code's schedule", "kcd", {"schedule": "official"}),
    ("full KCD, untrained points ranked last (the paper read literally)", "kcd", {"untrained": "last"}),
)

# The options the rows set (their labels say them; a caption names the others that are not the paper's).
TABLE4_VARIED = tuple(dict.fromkeys(name for _, _, options in ROWS for name in options))


def declare(p: Profile) -> dict[str, list]:
    """Row label -> its runs."""
    return {label: seeds(p, distill, TABLE4_PAIR.of(p), method=m, **o) for label, m, o in ROWS}


def build(session: Session) -> Table:
    """Table 4 (reconstructed): KCD's components one at a time, and the paper's schedule against the code's."""
    p, store = session.profile, session.store
    paper1 = reference.paper_table1()
    pair = TABLE4_PAIR.of(p)
    declared = declare(p)
    head = paper_column(p, name="top-1 paper (Table 1)")
    rows, display, links = [], [], {}
    for label, m, _ in ROWS:
        cfgs = declared[label]
        mean, sd, text = cell(store, cfgs)
        links[(label, "top-1 ours")] = run_hashes(store, cfgs)
        counted = statistics.fmean(read(store, cfgs, "computation"))
        formula = statistics.fmean(read(store, cfgs, "computation_formula"))
        never = statistics.fmean(read(store, cfgs, "never_distilled"))
        ref = None
        if pair in paper1.columns and label.startswith(("KD", "+ knowledge")):
            ref = paper1.loc["KD" if m == "kd" else "KC-KD", pair]
        rows.append({"row": label, "ours": mean, "ours_sd": sd, "computation": counted, "formula": formula,
                     "never_distilled": never})  # fmt: skip
        display.append({"variant": label, head: paper(ref), "top-1 ours": text, "C (formula)": percent(formula),
                        "C (counted)": percent(counted), "never distilled": f"{never:.0f}"})  # fmt: skip
    # Each row against KD over seeds (last epoch), Welch's interval where both have two or more (artefacts.noise).
    kd, display[0]["vs KD"] = read(store, declared[ROWS[0][0]], "final_top1"), "–"
    for (label, _, _), shown in zip(ROWS[1:], display[1:]):
        shown["vs KD"] = difference(read(store, declared[label], "final_top1"), kd).text()
    frame = pd.DataFrame(display).set_index("variant")
    data = pd.DataFrame(rows)
    text = caption(
        "Table 4 (our reconstruction: the supplement does not print the main paper's Table 4): KCD's components "
        "added one at a time, the paper's keep schedule (Eq. 16) against the released code's, and our rule for "
        "points never trained against the literal reading",
        p, [pair], paper_note="paper: the KD and KC-KD rows of the paper's Table 1 (CIFAR-100); vs KD: the row's mean "
        f"top-1 minus KD's with a {METHOD} 95 % interval over seeds (one seed: the bare difference)",
        teachers=teachers(store, [c for cfgs in declared.values() for c in cfgs]),
        runs=[c for cfgs in declared.values() for c in cfgs], varied=TABLE4_VARIED,
    )  # fmt: skip
    key = {"kd_top1": rows[0]["ours"], "random_top1": rows[1]["ours"], "alpha0_top1": rows[2]["ours"],
           "noaug_top1": rows[3]["ours"], "kcd_top1": rows[4]["ours"], "official_top1": rows[5]["ours"],
           "kcd_computation": 100 * rows[4]["computation"], "kcd_formula": 100 * rows[4]["formula"],
           "official_computation": 100 * rows[5]["computation"], "kcd_never": rows[4]["never_distilled"],
           "literal_top1": rows[6]["ours"], "literal_never": rows[6]["never_distilled"]}  # fmt: skip
    # The paper's own setting (CIFAR-100: N = 50,000, I = 240, T = 40, ρ = 0.7), computed, not typed in: the
    # schedule of Eq. 16, and the released code's schedule replayed with its arithmetic.
    released = released_code_schedule(50000, 240, 40, KCD_RHO)
    key["paper_setting_formula"] = 100 * condense.schedule_computation("paper", 240, 40, KCD_RHO)
    key["paper_setting_released"] = 100 * released.computation
    # Read literally, the paper schedule never distils the points its random stage 1 leaves out.
    key["paper_setting_never_literal"] = 50000 - condense.keep_schedule("paper", 50000, 240, 40, KCD_RHO)[0]
    key["released_crash_condensation"] = released_code_schedule(50000, 240, 30, KCD_RHO).crashes_at
    return Table("table4", text, frame, data, key, links)


ARTEFACT = Artefact("table4", "Table 4: what each component of KCD contributes", "paper", 40, declare, build,
                    fields=(TABLE4_PAIR,))  # fmt: skip
