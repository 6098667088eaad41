"""The teaching notebook's module (kcdlib/artefacts/five_minutes.py): it honours its seeds, its stage table is the
schedule the runs trained, its mean ± sd comes from the records, and its hand-made E-step is the run's."""

import math
import re
import statistics
from pathlib import Path

import jupytext
import pytest
from conftest import STUDENT

from kcdlib import artefacts, condense, distillers
from kcdlib.artefacts import five_minutes
from kcdlib.buildoptions import BuildOptions
from kcdlib.errors import BadOption
from kcdlib.identity import distill_config

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "kcd_in_five_minutes.md"


def test_three_seeds_by_default_on_smoke_and_the_given_ones_otherwise(tmp_path):
    assert five_minutes.notebook_seeds("smoke", None) == [0, 1, 2]
    assert five_minutes.notebook_seeds("course", None) is None  # the profile's own: GPU runs are hours
    p = artefacts.setup(
        BuildOptions(profile="smoke", runs_dir=str(tmp_path), seeds=five_minutes.notebook_seeds("smoke", None))
    ).profile
    rows = five_minutes.declare(p)
    assert {row: [c.seed for c in cfgs] for row, cfgs in rows.items()} == {"KD": [0, 1, 2], "KCD": [0, 1, 2]}
    assert {c.method for c in rows["KCD"]} == {"kcd"} and {c.method for c in rows["KD"]} == {"kd"}
    p1 = artefacts.setup(
        BuildOptions(profile="smoke", runs_dir=str(tmp_path), seeds=five_minutes.notebook_seeds("smoke", [1]))
    ).profile
    assert [(c.method, c.seed) for c in five_minutes.five_minutes_runs(p1)] == [("kd", 1), ("kcd", 1)]
    with pytest.raises(BadOption, match="must be a list"):  # a bad parameter reaches setup's check as given
        artefacts.setup(
            BuildOptions(profile="smoke", runs_dir=str(tmp_path), seeds=five_minutes.notebook_seeds("smoke", "1"))
        )
    # The plan (and kcd book's scheduling) counts the runs the notebook makes with its default parameters.
    planned = artefacts.notebook_runs("smoke")["kcd_in_five_minutes"]
    assert [(c.method, c.seed) for c in planned] == [("kd", s) for s in (0, 1, 2)] + [("kcd", s) for s in (0, 1, 2)]


def test_the_notebook_hands_its_seeds_parameter_to_the_session(tmp_path):
    """The notebook's own parameters and setup cells, run with ``seeds = [1]`` as papermill would inject it."""
    cells = [c for c in jupytext.read(NOTEBOOK, fmt="md:myst").cells if c.cell_type == "code"]
    params = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
    namespace: dict = {}
    exec(cells[params].source, namespace)
    namespace.update(seeds=[1], runs_dir=str(tmp_path / "runs"))
    exec(cells[params + 1].source, namespace)
    assert [(c.method, c.seed) for cfgs in namespace["rows"].values() for c in cfgs] == [("kd", 1), ("kcd", 1)]
    assert namespace["kcd_cfg"].seed == 1


def record(top1, computation=1.0, points=1000, best=None):
    return {"final_top1": top1, "best_top1": best or top1, "computation": computation,
            "computation_formula": computation, "points_distilled": points}  # fmt: skip


def test_results_are_mean_and_sd_of_the_records_with_their_resolution():
    kd = [record(90.0), record(92.0), record(94.0)]
    kcd = [record(93.0, 0.8, 800), record(93.5, 0.8, 800), record(94.0, 0.8, 800)]
    table = five_minutes.results({"KD": kd, "KCD": kcd}, "digits", [0, 1, 2])
    assert table.frame.loc["KD", "top-1 % (last epoch)"] == "92.00 ± 2.00"
    assert table.frame.loc["KCD", "top-1 % (last epoch)"] == f"93.50 ± {statistics.stdev([93.0, 93.5, 94.0]):.2f}"
    assert table.frame.loc["KCD", "C (counted)"] == "80.0 %"
    kd_row = table.data[(table.data.row == "KD") & (table.data.field == "final_top1")].iloc[0]
    assert (kd_row["mean"], kd_row["sd"], kd_row["runs"]) == (92.0, 2.0, 3)
    assert math.isclose(table.key_numbers["gain"], 1.5)
    assert math.isclose(table.key_numbers["gain_images"], 1.5 * 360 / 100)  # digits: 360 test images
    assert "360 test images" in table.caption and "0.28 points" in table.caption
    assert "mean ± sd over seeds 0, 1, 2" in table.caption
    one = five_minutes.results({"KD": kd[:1], "KCD": kcd[:1]}, "digits", [1])
    assert one.frame.loc["KD", "top-1 % (last epoch)"] == "90.00" and "seed 1" in one.caption


def test_source_shows_the_code_without_its_docstring():
    text = five_minutes.source(distillers.kd_loss).data
    assert text.startswith("def kd_loss(") and "F.kl_div" in text and '"""' not in text


@pytest.fixture(scope="module")
def short_kcd(store, digits_teacher):
    """Two seeds of a two-stage KCD run at ρ = 0.5 (not the default: the table must read the run's options)."""
    cfgs = [distill_config("digits", STUDENT, teacher=digits_teacher, method="kcd", epochs=2, seed=s,
                           method_options={"stage_epochs": 1, "rho": 0.5}) for s in (0, 1)]  # fmt: skip
    return cfgs, [store.ensure(c, progress=False) for c in cfgs]


def test_stage_table_is_the_schedule_the_runs_trained(store, short_kcd):
    cfgs, recs = short_kcd
    n = store.dataset("digits").num_train
    stages = five_minutes.stage_table(recs, cfgs[0], n)
    expected = condense.keep_schedule("paper", n, 2, 1, 0.5)
    assert stages["kept"].tolist() == stages["keep_schedule"].tolist() == expected
    assert stages["mixed"].tolist() == [0, expected[0] - expected[1]]
    reentered = [statistics.fmean(r["stages"][i]["reentered"] for r in recs) for i in range(2)]
    assert stages["re-entered (mean)"].tolist() == reentered


def test_the_hand_made_e_step_is_the_runs_condensation(store, short_kcd):
    """What the notebook shows: summarize() on the replayed value record keeps the run's set, and the curve ends at
    the run's counted computation."""
    cfg, rec = short_kcd[0][0], short_kcd[1][0]
    o = dict(cfg.method_options)
    watch = five_minutes.watch_kcd(store, cfg)
    n = store.dataset("digits").num_train
    sizes = condense.keep_schedule("paper", n, 2, 1, 0.5)
    plan = condense.summarize(five_minutes.value_record_at(watch, 1), sizes[0], sizes[1], alpha=o["cost_exponent"],
                              stage_epochs=1, augment=o["augment"], eps_m=o["eps_m"], seed=cfg.seed + 1,
                              untrained=o["untrained"])  # fmt: skip
    assert set(plan.kept.tolist()) == set(watch[(watch.condensation == 1) & watch.after].point)
    assert set(plan.kept.tolist()) == {i for i, y in enumerate(rec["value_labels"]) if y == "1"}
    curves = five_minutes.accuracy_vs_computation({"KCD": [rec]}, n, 2)
    assert math.isclose(curves.computation.iloc[-1], rec["computation"])


def test_every_exercise_has_a_question_and_a_folded_worked_answer():
    """A teacher's request: each exercise asks a question and answers it, folded, with this build's numbers
    (glued in the notebook, so the answer is never a number typed in)."""
    text = NOTEBOOK.read_text()
    exercises = text[text.index("## Exercises") :]
    parts = re.split(r"\n\*\*\d\. ", exercises)[1:]
    assert len(parts) == 3
    for part in parts:
        assert "*Question.*" in part and ":::{admonition} Worked answer\n:class: dropdown\n" in part, part[:80]
    glued = set(re.findall(r'glue\("(\w+)"', text))
    used = set(re.findall(r"\{glue:text\}`(\w+)", exercises))
    assert used and used <= glued, used - glued
