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
from kcdlib.artefacts import common, tradeoff
from kcdlib.errors import UnknownName
from kcdlib.profiles import get_profile
from kcdlib.runs import read_record

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
        html = book.build_book("tiny", runs_dir=runs_dir, out=out, echo=lines.append, jobs=2)
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
    nb = book.read_notebook(book.REPO / "notebooks" / "table3.md")
    nb.cells.insert(2, nbformat.v4.new_code_cell('raise RuntimeError("deliberately broken")'))
    broken = tmp_path / "broken_table.md"
    jupytext.write(nb, broken, fmt="md:myst")
    with pytest.raises(book.NotebookFailed) as err:
        book.execute_notebook(broken, tmp_path / "out" / "broken_table.ipynb", {"profile": "tiny"})
    message = str(err.value)
    assert "broken_table.md" in message and "cell" in message and "deliberately broken" in message


def test_profiles_and_reference_data():
    with pytest.raises(UnknownName, match="known profiles"):
        profiles.get_profile("nope")
    for p in profiles.PROFILES.values():
        assert p.epochs % p.stage_epochs == 0
        for pair in p.table1_pairs:
            assert all(a in models.ARCHS for a in p.run_pair(pair))
    assert profiles.get_profile("smoke").stages == 6
    assert len(profiles.get_profile("paper").table1_pairs) == 11
    assert reference.paper_table1().loc["KC-KD", "wrn_40_2/wrn_16_2"] == pytest.approx(75.70)
    assert len(reference.unix_published()) == 12


def test_table2_matches_kcd_computation():
    p = profiles.get_profile("paper")
    k = common.unix_k(p, "wrn_40_2/wrn_16_2")
    teacher, student = p.run_pair("wrn_40_2/wrn_16_2")
    c = cost.unix_computation(k, 64, common.fs_over_ft(teacher, student, "cifar100"))
    assert abs(c - common.kcd_computation(p)) < 0.01


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
    artefacts.setup("tiny", str(runs_dir)).ensure(artefacts.all_runs("tiny"), progress=False)
    assert {p: p.stat().st_mtime_ns for p in records} == before
    assert json.loads(records[0].read_text())["hash"]


@pytest.mark.parametrize(
    "parameters, needle",
    [
        ({"seeds": [-1]}, "parameter seeds"),
        ({"seeds": 3}, "must be a list"),
        ({"seeds": [0, "1"]}, "parameter seeds"),
        ({"devices": ["tpu"]}, "device 'tpu'"),
        ({"device": "tpu"}, "device 'tpu'"),
        ({"jobs_per_device": 0}, "jobs_per_device"),
        ({"compile": "fast"}, "compile_mode"),
        ({"stale": "maybe"}, "stale policy"),
        ({"grid_pairs": "wrn_40_2/wrn_16_2"}, "must be a list"),
        ({"rhos": [0.7, "x"]}, "parameter rhos"),
        ({"profile": "huge"}, "unknown profile"),
        ({"epochs": 1, "stage_epochs": 1}, "at least two stages"),
        ({"epochs": 4, "stage_epochs": 3}, "multiple of stage_epochs"),
        ({"temperature": 0}, "option temperature must be > 0"),
        ({"gamma": -1.0}, "option gamma must be >= 0"),
        ({"rho": 1.5}, "option rho must be in (0, 1]"),
        ({"alpha": "0.03"}, "parameter alpha must be a number"),
        ({"kd_alpha": True}, "parameter kd_alpha must be a number"),
    ],
)
def test_notebook_parameters_are_checked_before_any_run(tmp_path, parameters, needle):
    """The notebooks' first call refuses bad parameters with the command line's rules, one line each."""
    from kcdlib.errors import KcdError

    kwargs = {"profile": "tiny", "runs_dir": str(tmp_path), **parameters}
    with pytest.raises(KcdError, match=re.escape(needle)):
        artefacts.setup(**kwargs)
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
    session = artefacts.setup("tiny", str(runs_dir))
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
