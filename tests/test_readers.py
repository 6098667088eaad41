"""What the book shows its readers beyond the paper's tables: the trade-off's frontier, differences against seed
noise, and a page per run that every table cell links to (checked on the HTML of the suite's tiny book)."""

import math
import re
from html.parser import HTMLParser

import pytest
import scipy.stats

from kcdlib import artefacts, book
from kcdlib.artefacts import noise, tradeoff
from kcdlib.profiles import get_profile
from kcdlib.runs import read_record


def test_frontier_keeps_exactly_the_points_nothing_beats():
    # (C, top-1): KD; KCD cheaper and better; a point beaten on both axes by KCD; a cheap weak point; a tie in C.
    c = [1.0, 0.8, 0.9, 0.5, 0.8]
    a = [70.0, 71.0, 70.5, 60.0, 70.9]
    assert tradeoff.frontier(c, a) == [False, True, False, True, False]
    assert tradeoff.frontier([1.0], [50.0]) == [True]
    # Two identical points beat neither: both stay.
    assert tradeoff.frontier([0.8, 0.8], [70.0, 70.0]) == [True, True]


def test_welch_interval_is_scipys_and_a_difference_within_noise_is_no_gain():
    kc, base = [71.2, 72.0, 70.9, 71.8], [70.1, 70.6, 71.5]
    d = noise.difference(kc, base)
    ref = scipy.stats.ttest_ind(kc, base, equal_var=False).confidence_interval(0.95)
    assert d.diff == pytest.approx(sum(kc) / 4 - sum(base) / 3)
    assert (d.low, d.high) == pytest.approx((ref.low, ref.high))
    # Welch-Satterthwaite by hand on the same numbers: the library's interval is the textbook one.
    va, vb = scipy.stats.tvar(kc) / 4, scipy.stats.tvar(base) / 3
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    half = scipy.stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert (d.low, d.high) == pytest.approx((d.diff - half, d.diff + half))
    assert d.diff > 0 and d.low < 0 < d.high and d.verdict == noise.WITHIN_NOISE
    assert noise.difference([75.0, 75.2, 75.1], [70.0, 70.3, 70.1]).verdict == noise.REPRODUCED
    assert noise.difference([70.0, 70.3, 70.1], [75.0, 75.2, 75.1]).verdict == noise.OPPOSITE
    one = noise.difference([75.0], [70.0, 70.1])
    assert one.verdict == noise.ONE_SEED and one.text() == "+4.95"
    assert noise.counts([d, one]) == {noise.REPRODUCED: 0, noise.WITHIN_NOISE: 1, noise.OPPOSITE: 0,
                                      noise.ONE_SEED: 1}  # fmt: skip
    assert re.fullmatch(r"\+\d\.\d\d \[−\d\.\d\d, \+\d\.\d\d\]", d.text())


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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_a_run_page_names_the_options_off_their_defaults():
    from kcdlib import runpages
    from kcdlib.artefacts import common

    p = get_profile("tiny")
    cfg = common.distill(p, p.table4_pair, method="kcd", value="random", augment="none")
    assert runpages.differences(cfg.canonical()) == {
        "recipe.epochs": 3, "kcd.augment": "none", "kcd.stage_epochs": 1, "kcd.value": "random",
    }  # fmt: skip
    assert runpages.differences(common.teacher_run(p, "resnet20").canonical()) == {"recipe.epochs": 10}
