"""The book: every notebook executes under papermill (tiny profile) and shows its artefact, the Jupyter Book build
passes with warnings as errors and offline, a failing notebook is named with its cell, a table page renders; the
artefacts' registry is the one list of notebooks (runner, plan, table of contents); the notebooks' knobs are run
options; a rendered page shows no path of the machine that built it."""

import json
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import jupytext
import nbformat
import pytest
import torch
from conftest import TEACHER_EPOCHS

from kcdlib import artefacts, book, cli, cost, models, profiles, reference
from kcdlib.artefacts import declare, table1, tradeoff
from kcdlib.artefacts.format import NOT_RUN
from kcdlib.buildoptions import BuildOptions
from kcdlib.errors import UnknownName
from kcdlib.profiles import get_profile
from kcdlib.records import read_record

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def tiny_book(tmp_path_factory, runs_dir, digits_teacher):
    """The whole book on the tiny profile, built once; shares the suite's run store (and its digits teacher)."""
    assert profiles.get_profile("tiny").teacher_epochs == TEACHER_EPOCHS, "the tiny book must reuse this teacher"
    out = tmp_path_factory.mktemp("book")
    lines = []
    with pytest.MonkeyPatch.context() as mp:
        # The kernels run beside the test process on a small machine: one thread each (see conftest.CHILD_ENV).
        mp.setenv("OMP_NUM_THREADS", "1")
        html = book.build_book(BuildOptions(profile="tiny", runs_dir=str(runs_dir)), out=out, echo=lines.append, jobs=2)
    return out, html, lines


def outputs(nb_path: Path) -> list[dict]:
    nb = nbformat.read(nb_path, as_version=4)
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


@pytest.mark.parametrize("name", book.notebooks())
def test_notebook_shows_its_artefact(tiny_book, name):
    out, _, _ = tiny_book
    outs = outputs(out / "book" / "artefacts" / f"{name}.ipynb")
    assert not [o for o in outs if o.output_type == "error"]
    html = [o["data"]["text/html"] for o in outs if "text/html" in o.get("data", {})]
    images = [o for o in outs if "image/png" in o.get("data", {})]
    if name.startswith("table"):
        assert any("<table" in h and "Profile 'tiny'" in h for h in html), f"{name} shows no captioned table"
        # digits, not CIFAR-100: the caption says how fine a difference is, the paper's column that it compares
        # other data.
        table = next(h for h in html if "Profile 'tiny'" in h)
        assert "360 test images of digits, one image = 0.28 points" in table
        assert "not comparable" in table
    else:
        assert images, f"{name} shows no figure"


def test_book_html_is_built_offline(tiny_book):
    _, html, _ = tiny_book
    for page in (
        "intro",
        "method",
        "reproduce",
        "findings",
        "contributing",
        *(f"artefacts/{n}" for n in book.notebooks()),
    ):
        assert (html / "book" / f"{page}.html").is_file(), page
    findings = (html / "book" / "findings.html").read_text()
    assert "No key" not in findings and "%" in findings
    remote = re.compile(r"<(?:script|link)\b[^>]*(?:src|href)=\"https?://", re.I)
    for page in html.rglob("*.html"):
        assert not remote.search(page.read_text(errors="replace")), f"{page} loads something from the internet"


def test_failing_notebook_names_notebook_and_cell(tmp_path):
    """One line: the notebook, its cell, the error, and the file that keeps the full traceback."""
    nb = book.read_notebook(book.REPO / "notebooks" / "table3.md")
    nb.cells.insert(2, nbformat.v4.new_code_cell('raise RuntimeError("deliberately broken")'))
    broken = tmp_path / "broken_table.md"
    jupytext.write(nb, broken, fmt="md:myst")
    with pytest.raises(book.NotebookFailed) as err:
        book.execute_notebook(broken, tmp_path / "out" / "broken_table.ipynb", {"profile": "tiny"})
    message = str(err.value)
    assert "'broken_table' (cell " in message and "RuntimeError: deliberately broken" in message
    log = tmp_path / "out" / "broken_table.log"
    assert f"Full traceback: {log}" in message and "\n" not in message
    assert "Traceback" in log.read_text() or "deliberately broken" in log.read_text()


def test_the_kernels_own_log_goes_to_the_failing_notebooks_log_not_the_terminal(tmp_path, capfd):
    """ipykernel logs to its real stderr (an interrupt caught while a failed notebook's kernel shuts down, at random
    under load): that line belongs in the notebook's log file, not under kcd's one-line error."""
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell('get_ipython().kernel.log.error("the kernel speaks")\nraise RuntimeError("broken")'),
    ])  # fmt: skip
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "speaks.ipynb")
    with pytest.raises(book.NotebookFailed):
        book.execute_notebook(tmp_path / "speaks.ipynb", tmp_path / "out" / "speaks.ipynb", {})
    assert "the kernel speaks" not in capfd.readouterr().err
    assert "the kernel speaks" in (tmp_path / "out" / "speaks.log").read_text()


def test_a_notebook_parameter_is_checked_before_any_kernel(tmp_path, capsys):
    """A typo is refused with the closest parameter (papermill would inject it unused and run the defaults)."""
    code = cli.main(["notebook", "table5", "-p", "temprature", "2", "--out", str(tmp_path / "t5.ipynb")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == (
        "kcd: error: notebook 'table5' has no parameter 'temprature' (did you mean 'temperature'?)"
    )
    assert not (tmp_path / "t5.ipynb").exists()
    assert cli.main(["notebook", "tabel5"]) == 2 and "did you mean 'table5'?" in capsys.readouterr().err


def test_a_refused_parameter_inside_a_notebook_is_one_line(tmp_path, capfd):
    """The session refuses a notebook's own parameter in the kernel: kcd prints its message, not papermill's traceback;
    the kernel's own start-up warning (its stderr is this process's) is not printed either."""
    out = tmp_path / "t5.ipynb"
    code = cli.main(["notebook", "table5", "-p", "profile", "tiny", "-p", "runs_dir", str(tmp_path / "runs"),
                     "-y", "values: [0.01, '0.03']", "--out", str(out)])  # fmt: skip
    err = capfd.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("kcd: error: notebook 'table5' (cell ") and "BadOption" not in err
    assert "parameter alphas must be a non-empty list of values like (0.03,)" in err and "]. Full" in err
    assert f"Full traceback: {out.with_suffix('.log')}" in err and "BadOption" in out.with_suffix(".log").read_text()
    assert "Traceback" not in err and "IPKernelApp" not in err


@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_kcd_book_out_that_cannot_be_written_is_one_line(tmp_path, capsys, where):
    (tmp_path / "f").write_text("")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "book"
    code = cli.main(["book", "--profile", "tiny", "--out", str(out), "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(tmp_path / "f") in err, err


def test_kcd_book_checks_the_data_before_any_kernel(tmp_path, capsys):
    """The course profile's CIFAR-100 missing: one line at once, nothing written (it was a notebook's error)."""
    code = cli.main(["book", "--profile", "course", "--device", "cpu", "--data-root", str(tmp_path / "nodata"),
                     "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "CIFAR-100 was not found" in err
    assert ".." not in err and not (tmp_path / "out").exists()


def test_profiles_and_reference_data():
    with pytest.raises(UnknownName, match="known profiles"):
        profiles.get_profile("nope")
    for p in profiles.PROFILES.values():
        assert p.epochs % p.stage_epochs == 0
        for pair in table1.TABLE1_PAIRS.of(p):
            assert all(a in models.ARCHS for a in p.run_pair(pair))
    assert profiles.get_profile("smoke").stages == 6
    assert len(table1.TABLE1_PAIRS.of(profiles.get_profile("paper"))) == 11
    assert reference.paper_table1().loc["KC-KD", "wrn_40_2/wrn_16_2"] == pytest.approx(75.70)
    assert len(reference.unix_published()) == 12


def test_table2_matches_kcd_computation():
    p = profiles.get_profile("paper")
    k = declare.unix_k(p, "wrn_40_2/wrn_16_2")
    teacher, student = p.run_pair("wrn_40_2/wrn_16_2")
    c = cost.unix_computation(k, 64, declare.fs_over_ft(teacher, student, "cifar100"))
    assert abs(c - declare.kcd_computation(p)) < 0.01


def _distinct_colours(png: Path) -> int:
    from PIL import Image

    with Image.open(png) as im:
        return len(im.convert("RGB").getcolors(maxcolors=1 << 20) or [])


def test_table_page_screenshot_is_not_blank(tiny_book, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    _, html, _ = tiny_book
    png = tmp_path / "table1.png"
    cmd = [
        "timeout", "60", chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tempfile.mkdtemp()}", "--virtual-time-budget=3000", "--window-size=1280,900",
        f"--screenshot={png}", (html / "book" / "artefacts" / "table1.html").as_uri(),
    ]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=90)
    assert png.is_file() and png.stat().st_size > 10_000
    assert _distinct_colours(png) > 50, "the screenshot of the table page is (nearly) blank"


def test_rerun_trains_nothing(tiny_book, runs_dir):
    records = sorted(Path(runs_dir).glob("*/record.json"))
    before = {p: p.stat().st_mtime_ns for p in records}
    artefacts.setup(BuildOptions(profile="tiny", runs_dir=str(runs_dir))).ensure(
        artefacts.all_runs("tiny"), progress=False
    )
    assert {p: p.stat().st_mtime_ns for p in records} == before
    assert json.loads(records[0].read_text())["hash"]


@pytest.mark.parametrize(
    "parameters, needle",
    [
        ({"seeds": [-1]}, "build option seeds"),
        ({"seeds": 3}, "must be a list"),
        ({"seeds": [0, "1"]}, "build option seeds"),
        ({"devices": ["tpu"]}, "device 'tpu'"),
        ({"device": "tpu"}, "device 'tpu'"),
        ({"jobs_per_device": 0}, "jobs_per_device"),
        ({"compile": "fast"}, "build option compile"),
        ({"stale": "maybe"}, "build option stale"),
        ({"grid_pairs": "wrn_40_2/wrn_16_2"}, "must be a list"),
        ({"rhos": [0.7, "x"]}, "parameter rhos"),
        ({"profile": "huge"}, "unknown profile"),
        ({"epochs": 1, "stage_epochs": 1}, "at least two stages"),
        ({"epochs": 4, "stage_epochs": 3}, "must be a multiple of the stage length (T=3)"),
        ({"temperature": 0}, "option temperature must be > 0"),
        ({"gamma": -1.0}, "option gamma must be >= 0"),
        ({"rho": 1.5}, "option rho must be in (0, 1]"),
        ({"cost_exponent": "0.03"}, "build option cost_exponent must be a number"),
        ({"kd_weight": True}, "build option kd_weight must be a number"),
        ({"alpha": 0.03}, "unknown build option 'alpha'"),
    ],
)
def test_notebook_parameters_are_checked_before_any_run(tmp_path, parameters, needle):
    """The notebooks' first call refuses bad parameters with the command line's rules, one line each."""
    from kcdlib.errors import KcdError

    own = {k: v for k, v in parameters.items() if k in ("grid_pairs", "rhos")}  # table 5-7's own parameters
    build = {"profile": "tiny", "runs_dir": str(tmp_path), **{k: v for k, v in parameters.items() if k not in own}}
    with pytest.raises(KcdError, match=re.escape(needle)):
        artefacts.setup(build, **own)
    assert not any(tmp_path.iterdir())


def test_the_rendered_pages_hide_plumbing_and_show_no_absolute_path(tiny_book, runs_dir):
    """Papermill's injected parameters and the glue cells are removed from the page; what is shown names the run
    store relative to the book, never a folder of the machine that built it."""
    out, _, _ = tiny_book
    for name in book.notebooks():
        nb = nbformat.read(out / "book" / "artefacts" / f"{name}.ipynb", as_version=4)
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert injected and all("remove-cell" in c.metadata.tags for c in injected), name
        shown = [c for c in nb.cells if "remove-cell" not in c.metadata.get("tags", [])]
        assert not [c for c in shown if "glue(" in c.source], f"{name} shows a glue cell"
        text = json.dumps([(c.source, c.get("outputs", [])) for c in shown])
        for folder in (str(out), str(runs_dir)):
            assert folder not in text, f"{name} shows {folder}"


def test_the_runner_streams_which_notebook_and_run(tiny_book):
    """While papermill executes, the runner prints each notebook's progress line (its session writes it)."""
    _, _, lines = tiny_book
    for i, name in enumerate(book.notebooks(), 1):
        mine = [line for line in lines if line.startswith(f"[{i}/{len(book.notebooks())}] {name}: ")]
        assert any(line.endswith("runs ready") for line in mine), (name, mine)
    # Every epoch's line is printed, the last one too (a rewritten file lost it), under the run's own label.
    trained: dict[str, list[tuple[int, int]]] = {}
    for line in lines:
        if m := re.match(r"(.*), epoch (\d+)/(\d+)$", line):
            trained.setdefault(m[1], []).append((int(m[2]), int(m[3])))
    assert trained, "the tiny book trains its students: their epochs are printed"
    for label, seen in trained.items():
        assert [e for e, _ in seen] == list(range(1, seen[-1][1] + 1)), (label, seen)


def test_a_table_shows_what_the_profile_ran_with_the_papers_table_a_click_away(tiny_book):
    """Table 1 at 1280 px: the caption above the table's scroll box, only the pairs and rows the profile ran, the
    paper's whole table in a <details> under it; the parameters cell folded."""
    out, html, _ = tiny_book
    nb = out / "book" / "artefacts" / "table1.ipynb"
    h = next(o["data"]["text/html"] for o in outputs(nb) if "kcd-caption" in o.get("data", {}).get("text/html", ""))
    shown, _, full = h.partition("<details>")
    caption_end = shown.index("</p>")
    assert shown.index('<p class="kcd-caption">') < caption_end < shown.index("<table") and "<caption" not in h
    assert "resnet56/resnet20" not in shown[caption_end:] and "resnet56/resnet20" in full  # a pair tiny does not run
    assert NOT_RUN not in shown[caption_end:] and NOT_RUN in full
    cells = nbformat.read(nb, as_version=4).cells
    assert any("parameters" in c.metadata.get("tags", []) and "hide-cell" in c.metadata["tags"] for c in cells)
    assert "<details>" in (html / "book" / "artefacts" / "table1.html").read_text()


def test_the_table_of_contents_is_the_registry(tiny_book):
    out, _, _ = tiny_book
    # The registry's parts, then a part of the runs' pages (kcdlib.runpages; tests/test_readers.py checks them).
    assert (out / "_toc.yml").read_text().startswith(book.toc() + "  - caption: The runs\n")


def test_kcd_book_checks_the_device_first(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the course profile's device exists")
    code = cli.main(["book", "--profile", "course", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "no CUDA device" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() and not (tmp_path / "book").exists()


def test_jupyterlab_opens_the_text_notebooks_as_notebooks(tmp_path, monkeypatch):
    """`make lab` points JupyterLab at .jupyter/, whose settings make jupytext's notebook the default viewer of
    the project's .md notebooks (JupyterLab alone opens them as plain text)."""
    settings = pytest.importorskip(
        "jupyterlab_server.settings_utils", reason="JupyterLab (the dev and course extras) is not installed"
    )
    assert "JUPYTER_CONFIG_PATH=$(CURDIR)/.jupyter $(BIN)/jupyter lab" in (book.REPO / "Makefile").read_text()
    monkeypatch.setenv("JUPYTER_CONFIG_PATH", str(book.REPO / ".jupyter"))
    overrides, error = settings._get_overrides(str(tmp_path))  # how JupyterLab's server layers the settings
    viewers = overrides["@jupyterlab/docmanager-extension:plugin"]["defaultViewers"]
    assert not error and viewers["markdown"] == viewers["myst"] == "Jupytext Notebook"
    assert ".ipynb_checkpoints/" in (book.REPO / ".gitignore").read_text().splitlines()


def documented_commands(text: str, command: str) -> list[list[str]]:
    """The `.venv/bin/kcd COMMAND ...` lines of a page's code blocks (continuation lines joined), as argv."""
    import shlex

    joined = re.sub(r"\\\n\s*", " ", text)
    return [shlex.split(line.split("#")[0])[1:] for line in joined.splitlines()
            if line.strip().startswith(f".venv/bin/kcd {command} ")]  # fmt: skip


def test_the_readme_cli_examples_reuse_the_smoke_books_runs():
    """After `make book`, the README's first examples print a record at once (they trained 30 epochs from scratch):
    each is a run the smoke book trains, but the one it says is new (UNIX at k=48)."""
    from kcdlib.identity import with_teachers

    readme = (book.REPO / "README.md").read_text()
    section = readme[readme.index("## The command line") : readme.index("### The run store")]
    smoke = {c.options_hash for c in with_teachers(artefacts.all_runs("smoke"))}
    argvs = documented_commands(section, "teacher") + documented_commands(section, "distill")
    assert len(argvs) == 4
    reused = {" ".join(a): cli.config_from_args(cli.build_parser().parse_args(a)).options_hash in smoke for a in argvs}
    assert [cmd for cmd, ok in reused.items() if not ok] == [cmd for cmd in reused if "--unix-k 48" in cmd], reused
    built = len(with_teachers(artefacts.all_runs("smoke")))
    assert f"({built} runs: the {len(artefacts.all_runs('smoke'))} the notebooks ask" in readme


def test_the_documented_notebook_commands_pass_their_checks(tmp_path):
    """Every `kcd notebook` line of the README and the book's pages: its names are the notebook's parameters and
    its values pass the session's checks (the reproduce page's `-p seeds '[0, 1, 2]'` failed there)."""
    pages = [book.REPO / "README.md", *sorted((book.REPO / "book").glob("*.md"))]
    argvs = [a for page in pages for a in documented_commands(page.read_text(), "notebook")]
    assert len(argvs) >= 2
    for argv in argvs:
        args = cli.build_parser().parse_args(argv)
        parameters = cli.notebook_parameters(args)
        book.check_parameters(args.name, book.read_notebook(book.REPO / "notebooks" / f"{args.name}.md"), parameters)
        build = {k: v for k, v in parameters.items() if k in BuildOptions.names()}
        artefacts.setup({"profile": "smoke", **build, "runs_dir": str(tmp_path)})
    inline = re.findall(r"-p (\w+) '\[", "".join(p.read_text() for p in pages))
    assert not inline, f"a list passed with -p (a string to papermill): {inline}"


# -- what the book shows its readers: every table cell links to its runs' pages (kcdlib.runpages) -----------------
class _Cells(HTMLParser):
    """The cells of a page's tables that hold links to runs: (text, [href, ...])."""

    def __init__(self):
        super().__init__()
        self.cells, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "td":
            self._cell = ["", []]
        elif tag == "a" and self._cell is not None and "kcd-run" in (a.get("class") or ""):
            self._cell[1].append(a["href"])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            if self._cell[1]:
                self.cells.append(tuple(self._cell))
            self._cell = None


def _recorded(run_page: str, field: str) -> float:
    return float(re.search(rf'class="kcd-{field}">([^<]+)<', run_page).group(1))


def test_every_table_link_resolves_to_a_run_page_that_gives_the_cell(tiny_book):
    out, html, _ = tiny_book
    checked = 0
    for name in book.notebooks():
        page = html / "book" / "artefacts" / f"{name}.html"
        parser = _Cells()
        parser.feed(page.read_text())
        for text, hrefs in parser.cells:
            runs = [(page.parent / h).resolve() for h in hrefs]
            assert all(r.is_file() for r in runs), (name, text, hrefs)
            pages = [r.read_text() for r in runs]
            numbers = [float(x) for x in re.findall(r"\d+\.\d+", text.split("[")[0])]
            last = sum(_recorded(p, "final_top1") for p in pages) / len(pages)
            assert numbers[0] == pytest.approx(last, abs=0.005), (name, text)
            if "/" in text:  # "last / best"
                best = sum(_recorded(p, "best_top1") for p in pages) / len(pages)
                assert numbers[-1] == pytest.approx(best, abs=0.005), (name, text)
            checked += 1
    assert checked >= 10
    # The trade-off's plot (inline SVG): a link per run, each to an existing run page.
    plot = (html / "book" / "artefacts" / "tradeoff.html").read_text()
    dots = re.findall(r'xlink:href="(\.\./runs/[0-9a-f]{16}\.html)"', plot)
    assert len(dots) >= len(tradeoff.declare(get_profile("tiny")))
    assert all((html / "book" / "artefacts" / d).resolve().is_file() for d in dots)
    # Figure 5: the run behind each teacher's bars, linked under the figure.
    fig5 = (html / "book" / "artefacts" / "figure5.html").read_text()
    links = re.findall(r'<a class="kcd-run" href="(\.\./runs/[0-9a-f]{16}\.html)"', fig5)
    assert len(links) == len(artefacts.notebook_runs("tiny")["figure5"]) > 0
    assert all((html / "book" / "artefacts" / link).resolve().is_file() for link in links)
    # Every run page is in the table of contents, nothing of this machine is on it, the teacher is a link.
    toc = (out / "_toc.yml").read_text()
    pages = sorted((out / "book" / "runs").glob("*.md"))
    assert pages and all(f"book/runs/{p.stem}" in toc for p in pages)
    for p in (html / "book" / "runs").glob("*.html"):
        text = p.read_text()
        assert str(out) not in text and "/tmp/" not in text and "/home/" not in text, p
    distilled = [p for p in pages if re.search(r"\| teacher \| \w+, \[run [0-9a-f]{16}\]", p.read_text())]
    assert distilled


def test_the_frontier_holds_the_records_numbers(tiny_book, runs_dir):
    session = artefacts.setup(BuildOptions(profile="tiny", runs_dir=str(runs_dir)))
    result = tradeoff.build(session)
    data = result.table.data
    assert len(data) >= 5 and data.frontier.any()
    for (pair, lab), cfgs in tradeoff.declare(session.profile).items():
        row = data[(data.pair == pair) & (data.method == lab)].iloc[0]
        records = [read_record(session.store.path(c) / "record.json") for c in cfgs]
        assert row["last"] == pytest.approx(sum(r["final_top1"] for r in records) / len(records))
        assert row.computation == pytest.approx(sum(r["computation"] for r in records) / len(records))
    for pair, d in data.groupby("pair"):
        for _, p in d[d.frontier].iterrows():
            assert not ((d.computation < p.computation) & (d["last"] > p["last"])).any(), (pair, p.method)
