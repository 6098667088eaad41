"""The book runner: papermill executes every notebook of ``notebooks/`` on a profile, Jupyter Book 1.x renders HTML.

The notebooks are MyST Markdown text files (``notebooks/<name>.md``, jupytext's ``myst`` format), one per artefact
of :mod:`kcdlib.artefacts`; each is converted to a notebook (jupytext's Python API) and executed by papermill into
``book/artefacts/<name>.ipynb``. The book's table of contents (``_toc.yml``) is written from the same registry.
The notebooks train nothing that is already in the run store, so a rebuild after a finished build only re-executes
the (cheap) notebooks and re-renders. The book builds offline (MathJax served locally) with warnings as errors.

While a notebook runs, its session writes one line to a progress file (the run it is training and the epoch);
the runner prints each new line. A file rather than papermill's ``log_output``: that would stream every output of
every cell (tqdm bars included) interleaved across ``--jobs``, where one line per notebook is what a reader needs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import artefacts
from .errors import BadOption, KcdError
from .options import device as resolve_device
from .profiles import get_profile

# Where the package sits in a checkout: the book's sources are beside it.
REPO = Path(__file__).resolve().parents[1]
# What a book tree needs besides the executed notebooks and the table of contents (written by toc()).
BOOK_SOURCES = ("_config.yml", "book")
# The book's parts: (caption, prose pages before, the artefacts' part, prose pages after). Each artefact names its
# part; its page follows the part's first prose pages in the artefacts' reading order.
PARTS = (
    ("The method", ("book/method",), "method", ()),
    ("The paper, reproduced", ("book/reproduce",), "paper", ("book/findings",)),
    ("Contributing", ("book/contributing",), None, ()),
)
# Cells of papermill's making that the rendered book does not show (the injected parameters hold this machine's
# absolute paths).
HIDDEN_TAGS = {"injected-parameters": "remove-cell"}


def notebooks() -> tuple[str, ...]:
    """The notebooks in reading order: the artefacts' registry."""
    return artefacts.names()


def toc(names: tuple[str, ...] | None = None, runs: tuple[str, ...] = ()) -> str:
    """``_toc.yml`` of the book: the prose pages of :data:`PARTS` and a page per artefact, from the registry;
    ``runs`` (:func:`kcdlib.runpages.write`'s entries, its index first): a last part, a page per run."""
    names = notebooks() if names is None else names
    lines = ["# Written by kcdlib.book.toc() from kcdlib.artefacts: do not edit.", "format: jb-book",
             "root: book/intro", "parts:"]  # fmt: skip
    for caption, before, part, after in PARTS:
        pages = [*before, *(f"book/artefacts/{n}" for n in names if artefacts.get(n).part == part), *after]
        lines += [f"  - caption: {caption}", "    chapters:", *(f"      - file: {page}" for page in pages)]
    if runs:
        lines += ["  - caption: The runs", "    chapters:", f"      - file: {runs[0]}"]
        lines += ["        sections:", *(f"          - file: {page}" for page in runs[1:])] if runs[1:] else []
    return "\n".join(lines) + "\n"


class NotebookFailed(KcdError):
    """A notebook raised an error: names the notebook and the cell."""


def read_notebook(source: Path):
    """A notebook from ``source``: a MyST Markdown text notebook (``.md``, jupytext) or an ``.ipynb``."""
    import jupytext
    import nbformat

    if source.suffix == ".md":
        return jupytext.read(source, fmt="md:myst")
    return nbformat.read(source, as_version=4)


def execute_notebook(
    source: Path, target: Path, parameters: dict, kernel: str = "python3", log_output: bool = False
) -> None:
    """Run ``source`` (``.md`` or ``.ipynb``) with papermill into ``target``, in ``source``'s folder; a failing
    cell raises :class:`NotebookFailed`. The executed copy hides papermill's injected-parameters cell."""
    import nbformat
    import papermill
    from papermill.exceptions import PapermillExecutionError

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        papermill.execute_notebook(
            read_notebook(source), str(target), parameters=parameters, kernel_name=kernel, progress_bar=False,
            log_output=log_output, cwd=str(source.parent),
        )  # fmt: skip
    except PapermillExecutionError as err:
        # papermill counts the injected-parameters cell; report the cell of the source notebook too.
        raise NotebookFailed(
            f"notebook '{source.name}' failed in cell {err.cell_index} (execution count {err.exec_count}): "
            f"{err.ename}: {err.evalue}. The executed copy with the full traceback is {target}."
        ) from None
    nb = nbformat.read(target, as_version=4)
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        hide = [HIDDEN_TAGS[t] for t in tags if t in HIDDEN_TAGS and HIDDEN_TAGS[t] not in tags]
        if hide:
            cell.metadata["tags"] = [*tags, *hide]
    nbformat.write(nb, target)


class Progress:
    """Prints each new line of the notebooks' progress files (``[i/n] name: run 3/17: ..., epoch 5/12``)."""

    def __init__(self, folder: Path, echo, every: float = 1.0):
        self.folder, self.echo, self.every = folder, echo, every
        self.active: dict[str, str] = {}  # name -> "[i/n] name"
        self.shown: dict[str, str] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def file(self, name: str) -> Path:
        return self.folder / f"{name}.txt"

    def start(self, name: str, prefix: str) -> None:
        with self.lock:
            self.active[name] = prefix

    def done(self, name: str) -> None:
        self.poll()
        with self.lock:
            self.active.pop(name, None)

    def poll(self) -> None:
        with self.lock:
            active = dict(self.active)
        for name, prefix in active.items():
            try:
                line = self.file(name).read_text().strip()
            except OSError:
                continue
            if line and self.shown.get(name) != line:
                self.shown[name] = line
                self.echo(f"{prefix}: {line}")

    def _watch(self) -> None:
        while not self.stop.wait(self.every):
            self.poll()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def build_book(
    profile: str = "smoke",
    data_root: str = "data",
    device: str | None = None,
    runs_dir: str | Path | None = None,
    out: str | Path | None = None,
    notebooks_dir: Path | None = None,
    names: tuple[str, ...] | None = None,
    html: bool = True,
    echo=print,
    jobs: int = 1,
    devices: list[str] | None = None,
    jobs_per_device: int = 1,
    compile: str = "off",
    stale: str = "stop",
    teachers_dir: str | None = None,
    schedule: dict[str, int] | None = None,
    verify: bool = False,
) -> Path:
    """Execute the notebooks of ``profile`` into ``out/book/artefacts/`` and build ``out/_build/html``.

    ``out`` defaults to the checkout itself; another folder gets a copy of the book's sources first (the test
    suite builds into a temporary folder). Either way ``out/_toc.yml`` is written from the registry. Returns the
    HTML folder (or the artefacts folder without ``html``). ``names`` (default: every registered artefact) are
    executed, ``jobs`` at a time (their runs are shared safely: the run store locks each run); inside a notebook,
    missing runs are trained ``jobs_per_device`` at a time on each of ``devices``. ``teachers_dir`` holds
    published teachers; ``schedule`` overrides the profile's ``epochs``, ``stage_epochs`` and ``teacher_epochs``
    (a rehearsal of a long profile). The device is checked first: a profile's CUDA on a machine without one is a
    one-line :class:`~kcdlib.errors.BadOption`, not a traceback from inside a notebook. ``verify``: once the
    notebooks ran, every finished run of ``runs_dir`` is re-evaluated (:func:`kcdlib.verify.verify_or_fail`) and a
    failure fails the build."""
    p = get_profile(profile)
    try:
        device = resolve_device(device or p.device)
    except BadOption as err:
        raise BadOption(f"profile '{p.name}' runs on {p.device}: {err} (kcd book --device cpu)" if device is None
                        else str(err)) from None  # fmt: skip
    for d in devices or []:
        resolve_device(d)
    names = notebooks() if names is None else tuple(names)
    out = Path(out or REPO).resolve()
    notebooks_dir = Path(notebooks_dir or REPO / "notebooks")
    runs_dir = Path(runs_dir or REPO / "runs").resolve()
    if out != REPO:
        out.mkdir(parents=True, exist_ok=True)
        for name in BOOK_SOURCES:
            src = REPO / name
            if src.is_dir():
                shutil.copytree(src, out / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("artefacts", "runs"))
            else:
                shutil.copy2(src, out / name)
    (out / "_toc.yml").write_text(toc(names))
    book_artefacts = out / "book" / "artefacts"
    parameters = {
        "profile": p.name,
        "data_root": str(Path(data_root).resolve()),
        "runs_dir": str(runs_dir),
        "device": device,
        "devices": devices,
        "jobs_per_device": jobs_per_device,
        "compile_mode": compile,
        "stale": stale,
        "teachers_dir": str(Path(teachers_dir).resolve()) if teachers_dir else None,
        "book_root": str(out),
        **(schedule or {}),
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kcd-progress-") as folder, Progress(Path(folder), echo) as progress:

        def run(i: int, name: str) -> None:
            t = time.perf_counter()
            prefix = f"[{i}/{len(names)}] {name}"
            echo(f"{prefix}: executing ...")
            progress.start(name, prefix)
            try:
                execute_notebook(notebooks_dir / f"{name}.md", book_artefacts / f"{name}.ipynb",
                                 {**parameters, "progress_file": str(progress.file(name))})  # fmt: skip
            finally:
                progress.done(name)
            echo(f"{prefix}: done in {time.perf_counter() - t:.0f} s")

        if jobs <= 1:
            for i, name in enumerate(names, 1):
                run(i, name)
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(jobs) as pool:
                for future in [pool.submit(run, i, name) for i, name in enumerate(names, 1)]:
                    future.result()
    echo(f"notebooks executed in {time.perf_counter() - start:.0f} s (profile '{p.name}', runs in {runs_dir})")
    if verify:
        from .verify import verify_or_fail

        verify_or_fail(runs_dir, data_root, device, echo)
    if not html:
        return book_artefacts
    (out / "_toc.yml").write_text(toc(names, write_run_pages(p.name, parameters, names, out, echo)))
    return build_html(out, echo)


def write_run_pages(profile: str, parameters: dict, names: tuple[str, ...], out: Path, echo=print) -> tuple[str, ...]:
    """A page per run the notebooks ``names`` read (:mod:`kcdlib.runpages`), their profile set up as a notebook
    sets it up (same parameters), so a cell's link names the very run the cell read."""
    from . import runpages

    keys = ("runs_dir", "data_root", "device", "stale", "teachers_dir", "epochs", "stage_epochs", "teacher_epochs")
    session = artefacts.setup(profile, **{k: parameters[k] for k in keys if k in parameters})
    configs = [c for n in names for c in artefacts.get(n).runs(artefacts.get(n).notebook_profile(session.profile))]
    return tuple(runpages.write(session.store, configs, out, echo))


def build_html(root: Path, echo=print) -> Path:
    """``jupyter-book build -W -n --keep-going --all`` (warnings are errors) of the book rooted at ``root``.

    ``--all`` rebuilds every page: Sphinx would otherwise keep an unchanged prose page, with numbers glued from
    the previous build's notebooks."""
    t = time.perf_counter()
    cmd = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()", "build", str(root), "-W", "-n",
           "--keep-going", "--all"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise KcdError(f"jupyter-book build failed (warnings count as errors):\n{tail}")
    html = root / "_build" / "html"
    echo(f"HTML built in {time.perf_counter() - t:.0f} s: {html / 'book' / 'intro.html'}")
    return html
