"""The artefacts' registry is the one list of the book's notebooks: the runner, the plan and the table of contents
are derived from it, and an artefact registered anywhere appears in all three. The notebooks' classic knobs are
run options: they change exactly the runs they should, through the run identity."""

import dataclasses

import jupytext
import pytest

from kcdlib import artefacts, book, distillers, plan, profiles
from kcdlib.artefacts import captions, declare, grid, session, table1, table2, table3, table4, table5, table6
from kcdlib.buildoptions import BuildOptions
from kcdlib.errors import BadOption
from kcdlib.profiles import get_profile
from kcdlib.runs import RunStore

NOTEBOOKS = book.REPO / "notebooks"


def test_registry_runner_plan_and_notebook_files_agree():
    names = artefacts.names()
    assert names[0] == "kcd_in_five_minutes" and {f"table{i}" for i in range(1, 8)} | {"figure5"} <= set(names)
    assert book.notebooks() == names
    assert tuple(plan.notebook_runs(get_profile("tiny"))) == names
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.md")) == sorted(names)
    assert not list(NOTEBOOKS.glob("*.ipynb")), "the notebooks are text (MyST Markdown) files"
    toc = book.toc()
    pages = [line.split("file: ")[1] for line in toc.splitlines() if "file: " in line]
    assert [p.split("/")[-1] for p in pages if p.startswith("book/artefacts/")] == list(names)
    for page in pages:
        if not page.startswith("book/artefacts/"):
            assert (book.REPO / f"{page}.md").is_file(), page


def test_a_registered_artefact_appears_in_the_runs_the_plan_and_the_toc():
    p = get_profile("tiny")
    extra = declare.student_run(p, "resnet14")
    assert extra.options_hash not in {c.options_hash for c in artefacts.all_runs(p)}
    scratch = declare.Artefact("scratch_table", "A scratch table", "paper", 75, lambda p: {"row": [extra]})
    with artefacts.ARTEFACTS.override("scratch_table", scratch):
        names = artefacts.names()
        assert names.index("table7") < names.index("scratch_table") < names.index("figure5")  # order 75
        assert book.notebooks() == names
        assert plan.notebook_runs(p)["scratch_table"] == [extra]
        assert extra.options_hash in {c.options_hash for c in artefacts.all_runs(p)}
        toc = book.toc()
        assert toc.index("book/artefacts/table7\n") < toc.index("book/artefacts/scratch_table\n") < toc.index("figure5")
        with pytest.raises(ValueError, match="two artefacts"):
            artefacts.register(dataclasses.replace(scratch, order=1))


@pytest.mark.parametrize("name", artefacts.names())
def test_every_notebook_takes_the_build_options_and_hides_its_glue(name):
    """One build parameter (every build option reaches the session through it) and the notebook's own."""
    nb = book.read_notebook(NOTEBOOKS / f"{name}.md")
    parameters = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1
    assert "\nbuild = {}" in "\n" + parameters[0].source, f"{name}: no build parameter"
    declared = set(book.declared_parameters(nb))
    assert not declared & set(BuildOptions.names()), f"{name}: a build option declared on its own"
    assert len(parameters[0].source.splitlines()) <= 6, f"{name}: a long parameters cell"
    setup = next(c for c in nb.cells if "setup(" in c.source)
    assert "BuildOptions.from_notebook(globals())" in setup.source, f"{name}: the build does not reach setup()"
    for cell in nb.cells:
        if "glue(" in cell.source:
            assert "remove-cell" in cell.metadata.get("tags", []), f"{name}: a glue cell is shown"
    assert jupytext.reads(jupytext.writes(nb, fmt="md:myst"), fmt="md:myst").cells[1].source == parameters[0].source


def hashes(p):
    return {c.options_hash for c in artefacts.all_runs(p)}


def test_the_knobs_at_the_papers_values_are_the_same_runs(tmp_path):
    default = artefacts.setup(BuildOptions(profile="tiny", runs_dir=str(tmp_path))).profile
    paper = artefacts.setup(
        BuildOptions(profile="tiny", runs_dir=str(tmp_path), temperature=4, kd_weight=0.9, rho=0.7, cost_exponent=0.03)
    ).profile
    assert hashes(paper) == hashes(default)


def test_a_knob_changes_the_runs_it_names_and_no_other(tmp_path):
    default = artefacts.setup(BuildOptions(profile="tiny", runs_dir=str(tmp_path))).profile
    hot = artefacts.setup(BuildOptions(profile="tiny", runs_dir=str(tmp_path), temperature=2.0)).profile
    before, after = artefacts.all_runs(default), artefacts.all_runs(hot)
    assert len(before) == len(after) and any(c.distiller == "kd" for c in after)
    for old, new in zip(before, after):
        options = dict(new.distiller_options)
        if new.distiller == "kd":
            assert options["temperature"] == 2.0 and new.options_hash != old.options_hash
        else:  # the teachers and the students trained alone; UNIX keeps its own loss
            assert new.options_hash == old.options_hash
    store = RunStore(tmp_path)
    kd = declare.distill(hot, table2.TABLE2_PAIR.of(hot))
    assert store.identity(kd)["run"]["distiller_options"]["temperature"] == 2.0
    assert store.run_hash(kd) != store.run_hash(declare.distill(default, table2.TABLE2_PAIR.of(default)))


def test_kcd_knobs_reach_every_kcd_run_but_a_table_keeps_its_own_setting(tmp_path):
    p = artefacts.setup(BuildOptions(profile="tiny", runs_dir=str(tmp_path), rho=0.5, cost_exponent=0.1)).profile
    alpha0 = table4.declare(p)["+ value ranking, no cost-aware factor (α=0)"]
    own_alpha = {c.options_hash for c in [*artefacts.get("table5").runs(p), *alpha0]}
    own_rho = {c.options_hash for c in artefacts.get("table6").runs(p)}
    kcd = [c for c in artefacts.all_runs(p) if c.method == "kcd"]
    assert len(kcd) > len(own_alpha | own_rho)
    rho, alpha = table6.RHOS.of(p)[0], table5.ALPHAS.of(p)[0]
    for cfg in kcd:
        o = dict(cfg.method_options)
        assert o["rho"] == (rho if cfg.options_hash in own_rho else 0.5)
        assert o["cost_exponent"] == (0.0 if cfg in alpha0 else alpha if cfg.options_hash in own_alpha else 0.1)
    # UNIX's k is matched to KCD's C, which follows ρ.
    assert declare.kcd_computation(p) < declare.kcd_computation(get_profile("tiny"))


def test_a_new_distiller_gets_its_table1_rows_from_the_registry():
    """Table 1 names a distiller by its registry label: a distiller added to a profile needs no table edit."""

    class Scaled(distillers.KD):
        name, label = "scaled_kd", "SKD"

    with distillers.DISTILLERS.override("scaled_kd", Scaled):
        p = declare.apply_parameters(get_profile("tiny"), table1_distillers=["kd", "scaled_kd"])
        rows = table1.declare(p)
    labels = {label for _, label in rows}
    assert {"KD", "KC-KD", "SKD", "KC-SKD"} <= labels
    assert {c.distiller for c in rows[(table1.TABLE1_PAIRS.of(p)[0], "KC-SKD")]} == {"scaled_kd"}


def test_the_session_reports_the_run_and_epoch_in_progress(tmp_path):
    """What `kcd book` prints while a notebook trains comes from the session's progress file: a teacher the
    student needs is trained under its own label (not the student's), every epoch's line is kept, the last one
    included, and the runner prints each line once."""

    class Store:
        on_epoch = None
        root = tmp_path

        def record(self, cfg):
            return None

        def ensure(self, cfg, progress=False):
            for epoch in range(1, cfg.recipe.epochs + 1):
                self.on_epoch(epoch, cfg.recipe.epochs)
            return {"arch": cfg.arch}

    progress_file = tmp_path / "progress.txt"
    p = get_profile("tiny")
    cfg = declare.distill(p, table2.TABLE2_PAIR.of(p))
    s = session.Session(p, Store(), ["cpu"], progress_file=progress_file)
    assert s.ensure([cfg], progress=False) == [{"arch": "resnet8"}]  # the records of the runs asked for only
    teacher = f"run 1/2: resnet20 trained alone ({p.teacher_epochs} epochs), seed 0"
    student = "run 2/2: resnet8 from resnet20, kd/kd, seed 0"
    assert progress_file.read_text().splitlines() == [
        teacher, *(f"{teacher}, epoch {e}/{p.teacher_epochs}" for e in range(1, p.teacher_epochs + 1)),
        student, *(f"{student}, epoch {e}/{p.epochs}" for e in range(1, p.epochs + 1)),
        "2 runs ready",
    ]  # fmt: skip
    printed = []
    progress = book.Progress(tmp_path, printed.append)
    progress.start("progress", "[1/1] x")
    progress.poll()
    with open(progress_file, "a") as f:
        f.write("one more\nhalf a li")
    progress.done("progress")
    assert printed == [f"[1/1] x: {line}" for line in progress_file.read_text().splitlines()[:-1]]


def test_a_run_is_described_by_its_own_options():
    """Table 4's runs differ in their KCD options: the progress line names them, so no two read the same."""
    p = get_profile("tiny")
    runs = table4.ARTEFACT.runs(p)
    labels = [session.describe(c) for c in runs]
    assert len(set(labels)) == len(runs), labels


def test_captions_name_the_settings_the_runs_used(tmp_path):
    """After the README's `-p temperature 2 -p epochs 4`, Table 5's caption says T=2 and 4 epochs first (it said
    "other settings as in the paper" and the profile's 12 epochs); with the paper's settings it names none."""
    s = session.setup(BuildOptions(profile="smoke", runs_dir=str(tmp_path), temperature=2, epochs=4))
    runs = table5.ARTEFACT.runs(s.profile)
    assert {dict(c.distiller_options)["temperature"] for c in runs} == {2}
    text = captions.caption("Table 5", s.profile, grid.GRID_PAIRS.of(s.profile), runs=runs, varied=("cost_exponent",))
    assert text.startswith("Table 5. This build: 4 epochs, KCD stages of 2; not the paper's settings: T=2. ")
    assert "as in the paper" not in text and "with its schedule changed by the parameters" in text
    plain = session.setup(BuildOptions(profile="smoke", runs_dir=str(tmp_path)))
    text = captions.caption("Table 5", plain.profile, grid.GRID_PAIRS.of(plain.profile),
                            runs=table5.ARTEFACT.runs(plain.profile), varied=("cost_exponent",))  # fmt: skip
    assert "not the paper's" not in text and text.startswith("Table 5. This build: 12 epochs, KCD stages of 2. ")
    assert "Profile 'smoke' (digits on the CPU" in text


def test_each_artefact_declares_its_own_fields_and_a_notebook_sets_them_by_name():
    """A table's settings live in its module, the paper's value and each profile's beside it; a notebook's parameter
    of the same name sets one, checked like the value it replaces, and a rehearsal reschedules Table 3 on the paper
    profile only (the others run Table 3 on their own schedule)."""
    fields = declare.artefact_fields()
    assert {"table1_pairs", "table2_pair", "table3_epochs", "grid_pairs", "alphas", "figure5_teachers"} <= set(fields)
    for f in fields.values():
        assert set(f.profiles) <= set(profiles.PROFILES), f.name
        assert not hasattr(profiles.PROFILES["paper"], f.name), f"{f.name} is the artefact's, not the profile's"
    tiny = get_profile("tiny")
    p = declare.apply_parameters(tiny, alphas=[0.05, 0.1], table2_pair="resnet56/resnet20")
    assert table5.ALPHAS.of(p) == (0.05, 0.1) and table5.ALPHAS.of(tiny) == (0.03,)
    assert {dict(c.method_options)["cost_exponent"] for c in table5.ARTEFACT.runs(p)} == {0.05, 0.1}
    assert "resnet14" in declare.teacher_archs(p) and table2.TABLE2_PAIR.of(get_profile("paper")) == "wrn_40_2/wrn_16_2"
    with pytest.raises(BadOption, match="parameter alphas"):
        declare.apply_parameters(tiny, alphas=["x"])
    with pytest.raises(BadOption, match="unknown parameter"):
        declare.apply_parameters(tiny, table9_pair="a/b")
    paper = declare.apply_parameters(get_profile("paper"), epochs=480, stage_epochs=80)
    assert table3.schedule(paper) == (480, 80) and table3.schedule(get_profile("paper")) == (90, 15)
    assert table3.schedule(declare.apply_parameters(get_profile("smoke"), epochs=4)) == (4, 2)
