"""The book runner: papermill executes every notebook of ``notebooks/`` on a profile, Jupyter Book 1.x renders HTML.

The notebooks are MyST Markdown text files (``notebooks/<name>.md``, jupytext's ``myst`` format), one per artefact
of :mod:`kcdlib.artefacts`; each is converted to a notebook (jupytext's Python API) and executed by papermill into
``book/artefacts/<name>.ipynb``. The book's table of contents (``_toc.yml``) is written from the same registry.
The notebooks train nothing that is already in the run store, so a rebuild after a finished build only re-executes
the (cheap) notebooks and re-renders. The book builds offline (MathJax served locally) with warnings as errors.

While a notebook runs, its session appends a line to a progress file for each run and epoch it trains; the runner
prints each new line, prefixed with the notebook. A file rather than papermill's ``log_output``: that would stream
every output of every cell (tqdm bars included) interleaved across ``--jobs``, where one line per event is what a
reader needs. ``kcd notebook`` runs one notebook the same way, its parameters checked against its ``parameters``
cell first.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import artefacts
from .archive import recorded_env, write_provenance
from .buildoptions import NOTEBOOK_DEFAULTS, BuildOptions
from .errors import BadOption, KcdError
from .options import device as resolve_device
from .profiles import get_profile
from .registry import did_you_mean

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
# The kernels' own log (a warning at every start that the loopback TCP transport is not encrypted: messages are
# signed with the session's key, and ipc sockets would be files in the notebooks' folder) is kept to errors, and
# those go to the failing notebook's log file (see _kernel_manager), not to the terminal.
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR"]
# Cells the rendered book does not show: papermill's injected parameters (they hold this machine's absolute paths);
# and folds: the parameters cell (a click shows it).
HIDDEN_TAGS = {"injected-parameters": "remove-cell", "parameters": "hide-cell"}


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
    """A notebook raised an error: names the notebook, the cell and the file with the full traceback."""


def declared_parameters(nb) -> list[str]:
    """The names the notebook's cell tagged ``parameters`` assigns (papermill's parameters)."""
    names = []
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            for node in ast.parse(cell.source).body:
                targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
                names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


def check_parameters(name: str, nb, parameters: dict) -> None:
    """Refuse a parameter the notebook does not declare (papermill would inject it, unused, and run the defaults):
    name it and the closest declared one. A notebook that declares ``build`` takes every build option too."""
    declared = declared_parameters(nb)
    if "build" in declared:
        declared += BuildOptions.names()
    for given in parameters:
        if given not in declared:
            hint = did_you_mean(given, declared) or f" (its parameters: {', '.join(declared)})"
            raise BadOption(f"notebook '{name}' has no parameter '{given}'{hint}")


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
    """Run ``source`` (``.md`` or ``.ipynb``) with papermill into ``target``, in ``source``'s folder. A parameter
    the notebook does not declare is refused before any kernel starts; a failing cell raises
    :class:`NotebookFailed`, one line (the error of a refused option or run as it is), the full traceback kept in
    ``target`` with ``.log``. The executed copy hides papermill's injected-parameters cell."""
    import nbformat
    import papermill
    from papermill.exceptions import PapermillExecutionError

    nb = read_notebook(source)
    check_parameters(source.stem, nb, parameters)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BadOption(f"cannot write the executed notebook to '{target.parent}': {err.strerror}") from None
    with tempfile.TemporaryFile("w+") as kernel_stderr:
        try:
            papermill.execute_notebook(
                nb, str(target), parameters=parameters, kernel_name=kernel, progress_bar=False, log_output=log_output,
                cwd=str(source.parent), extra_arguments=KERNEL_ARGUMENTS,
                kernel_manager_class=_kernel_manager(kernel_stderr),
            )  # fmt: skip
        except PapermillExecutionError as err:  # papermill has shut the kernel down: its log is whole
            kernel_stderr.seek(0)
            raise _failed(source.stem, target.with_suffix(".log"), err, kernel_stderr.read()) from None
    nb = nbformat.read(target, as_version=4)
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        hide = [HIDDEN_TAGS[t] for t in tags if t in HIDDEN_TAGS and HIDDEN_TAGS[t] not in tags]
        if hide:
            cell.metadata["tags"] = [*tags, *hide]
    nbformat.write(nb, target)


def _failed(name: str, log: Path, err, kernel_log: str) -> NotebookFailed:
    """The one-line error of notebook ``name``'s failed cell; its traceback (and the kernel's own log) go to ``log``."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(err.traceback)) + "\n"
    log.write_text(text + (f"\nThe kernel's own log:\n{kernel_log}" if kernel_log.strip() else ""))
    # papermill counts the injected-parameters cell; the error of one of ours is its message, as the CLI's.
    what = err.evalue.rstrip(".") if err.ename in _kcd_error_names() else f"{err.ename}: {err.evalue.rstrip('.')}"
    return NotebookFailed(f"notebook '{name}' (cell {err.exec_count}): {what}. Full traceback: {log}")


def _kernel_manager(stderr):
    """A kernel manager class whose kernels write their stderr (ipykernel's own log: an interrupt caught while a
    failed notebook's kernel shuts down, for one) to the open file ``stderr`` instead of this process's."""
    from jupyter_client.manager import AsyncKernelManager

    class KernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):
            await super()._async_launch_kernel(kernel_cmd, **{**kw, "stderr": stderr})

    return KernelManager


def _kcd_error_names() -> set[str]:
    """The names of the errors a user can cause (:class:`~kcdlib.errors.KcdError` and its subclasses)."""
    found, todo = set(), [KcdError]
    while todo:
        cls = todo.pop()
        found.add(cls.__name__)
        todo += cls.__subclasses__()
    return found


class Progress:
    """Prints each line the notebooks append to their progress files (``[i/n] name: run 3/17: ..., epoch 5/12``),
    every line once, in order."""

    def __init__(self, folder: Path, echo, every: float = 1.0):
        self.folder, self.echo, self.every = folder, echo, every
        self.active: dict[str, str] = {}  # name -> "[i/n] name"
        self.read: dict[str, int] = {}  # name -> bytes of its file already printed
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
                    with open(self.file(name), "rb") as f:
                        f.seek(self.read.get(name, 0))
                        chunk = f.read()
                except OSError:
                    continue
                complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written waits for the next look
                self.read[name] = self.read.get(name, 0) + len(complete)
                for line in complete.decode().splitlines():
                    if line.strip():
                        self.echo(f"{prefix}: {line.strip()}")

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
    build: BuildOptions,
    out: str | Path | None = None,
    notebooks_dir: Path | None = None,
    names: tuple[str, ...] | None = None,
    html: bool = True,
    echo=print,
    jobs: int = 1,
    slurm=None,
    wait: bool = True,
    from_records: bool = False,
    verify: bool = False,
) -> Path | None:
    """Execute the notebooks of the build ``build`` (:class:`~kcdlib.buildoptions.BuildOptions`: the profile, the
    data and the run store, where missing runs train, a shorter schedule, the knobs) into
    ``out/book/artefacts/`` and build ``out/_build/html``.

    ``out`` defaults to the checkout itself; another folder gets a copy of the book's sources first (the test
    suite builds into a temporary folder). Either way ``out/_toc.yml`` is written from the registry. Returns the
    HTML folder (or the artefacts folder without ``html``). ``names`` (default: every registered artefact) are
    executed, ``jobs`` at a time (their runs are shared safely: the run store locks each run). ``slurm``
    (:class:`kcdlib.cluster.SlurmOptions`) trains the missing runs on a Slurm cluster first (:mod:`kcdlib.cluster`);
    without ``wait`` it submits them and returns None. ``from_records`` renders from the store alone
    (:mod:`kcdlib.archive`). ``verify``: once the notebooks ran, every finished run of the store is re-evaluated
    (:func:`kcdlib.verify.verify_or_fail`) and a failure fails the build. The device is checked first: a
    profile's CUDA on a machine without one is a one-line :class:`~kcdlib.errors.BadOption`, not a traceback from
    inside a notebook."""
    p = get_profile(build.profile)
    try:
        device = resolve_device(build.device or p.device)
    except BadOption as err:
        raise BadOption(f"profile '{p.name}' runs on {p.device}: {err} (kcd book --device cpu)" if build.device is None
                        else str(err)) from None  # fmt: skip
    names = notebooks() if names is None else tuple(names)
    out = Path(out or REPO).resolve()
    notebooks_dir = Path(notebooks_dir or REPO / "notebooks")
    # The notebooks run in notebooks/: every path they get is absolute.
    build = build.with_(
        runs_dir=str(Path(build.runs_dir).resolve()), data_root=str(Path(build.data_root).resolve()), device=device,
        teachers_dir=str(Path(build.teachers_dir).resolve()) if build.teachers_dir else None, book_root=str(out),
    )  # fmt: skip
    runs_dir = Path(build.runs_dir)
    if not from_records:  # rendering from records needs no data
        check_data(p, names, build.data_root)
    if out.exists() and not out.is_dir():
        raise BadOption(f"--out '{out}' is a file, not a folder: choose another")
    try:
        if out != REPO:
            out.mkdir(parents=True, exist_ok=True)
            for name in BOOK_SOURCES:
                src = REPO / name
                if src.is_dir():
                    skip = shutil.ignore_patterns("artefacts", "runs")  # made by this build
                    shutil.copytree(src, out / name, dirs_exist_ok=True, ignore=skip)
                else:
                    shutil.copy2(src, out / name)
        (out / "_toc.yml").write_text(toc(names))
        (out / "book" / "artefacts").mkdir(parents=True, exist_ok=True)
        write_provenance(out, runs_dir, from_records)
    except OSError as err:
        where = f" ('{err.filename}')" if err.filename and Path(err.filename) != out else ""
        raise BadOption(f"cannot build the book in '{out}'{where}: {err.strerror} (choose another --out)") from None
    book_artefacts = out / "book" / "artefacts"
    if slurm is not None or from_records:  # the runs first: on the cluster, or checked to be in the store
        from .cluster import runs_before_notebooks

        if not runs_before_notebooks(build, names, slurm, wait, from_records, echo):
            return None
    start = time.perf_counter()
    with (
        recorded_env(from_records),
        tempfile.TemporaryDirectory(prefix="kcd-progress-") as folder,
        Progress(Path(folder), echo) as progress,
    ):

        def run(i: int, name: str) -> None:
            t = time.perf_counter()
            prefix = f"[{i}/{len(names)}] {name}"
            echo(f"{prefix}: executing ...")
            progress.start(name, prefix)
            try:
                build_of = build.with_(progress_file=str(progress.file(name)))
                execute_notebook(notebooks_dir / f"{name}.md", book_artefacts / f"{name}.ipynb",
                                 {"build": build_of.as_parameters()})  # fmt: skip
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

        verify_or_fail(runs_dir, build.data_root, device, echo)
    if not html:
        return book_artefacts
    (out / "_toc.yml").write_text(toc(names, write_run_pages(build, names, out, echo)))
    return build_html(out, echo)


def check_data(p, names: tuple[str, ...], data_root: str) -> None:
    """Every dataset the notebooks ``names`` read is under ``data_root``: a missing one is a one-line
    :class:`~kcdlib.errors.DatasetMissing` before any kernel starts, not a notebook's error minutes later. Its
    fingerprint is what the run store computes first anyway (and caches beside the data)."""
    from .data import fingerprint

    runs = artefacts.notebook_runs(p)
    for dataset in sorted({c.dataset for name in names for c in runs[name]}):
        fingerprint(dataset, data_root)


def run_notebook(name: str, parameters: dict, target: str | Path, echo=print) -> Path:
    """``kcd notebook``: execute the book's notebook ``name`` with ``parameters`` (checked against its
    ``parameters`` cell) into ``target``, printing the run and epoch in progress as ``kcd book`` does."""
    if name not in notebooks():
        raise BadOption(f"no notebook '{name}'{did_you_mean(name, notebooks())}: one of {', '.join(notebooks())}")
    target = Path(target).resolve()
    build = dict(parameters.get("build") or {})
    build.update({k: v for k, v in parameters.items() if k in BuildOptions.names()})
    own = {k: v for k, v in parameters.items() if k != "build" and k not in BuildOptions.names()}
    BuildOptions.from_mapping({**NOTEBOOK_DEFAULTS, **build})  # checked before any kernel starts
    with tempfile.TemporaryDirectory(prefix="kcd-progress-") as folder, Progress(Path(folder), echo) as progress:
        progress.start(name, name)
        try:
            execute_notebook(REPO / "notebooks" / f"{name}.md", target,
                             {**own, "build": {**build, "progress_file": str(progress.file(name))}})  # fmt: skip
        finally:
            progress.done(name)
    return target


def write_run_pages(build: BuildOptions, names: tuple[str, ...], out: Path, echo=print) -> tuple[str, ...]:
    """A page per run the notebooks ``names`` read (:mod:`kcdlib.runpages`), their profile set up as a notebook
    sets it up (the same build), so a cell's link names the very run the cell read."""
    from . import runpages

    session = artefacts.setup(build)
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
