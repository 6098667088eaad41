"""The book runner: papermill executes every notebook of ``notebooks/`` on a profile, Jupyter Book 1.x renders HTML.

The notebooks train nothing that is already in the run store, so a rebuild after a finished build only re-executes
the (cheap) notebooks and re-renders. The book builds offline (MathJax served locally) with warnings as errors.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from .errors import KcdError
from .profiles import get_profile

# Where the package sits in a checkout: the book's sources are beside it.
REPO = Path(__file__).resolve().parents[1]
# The notebooks in reading order (also the order of _toc.yml).
NOTEBOOKS = (
    "kcd_in_five_minutes", "table1", "table2", "table3", "table4", "table5", "table6", "table7", "figure5",
)  # fmt: skip
# What a book tree needs besides the executed notebooks.
BOOK_SOURCES = ("_config.yml", "_toc.yml", "book")


class NotebookFailed(KcdError):
    """A notebook raised an error: names the notebook and the cell."""


def execute_notebook(
    source: Path, target: Path, parameters: dict, kernel: str = "python3", log_output: bool = False
) -> None:
    """Run ``source`` with papermill into ``target``; a failing cell raises :class:`NotebookFailed`."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        papermill.execute_notebook(
            str(source), str(target), parameters=parameters, kernel_name=kernel, progress_bar=False,
            log_output=log_output, cwd=str(source.parent),
        )  # fmt: skip
    except PapermillExecutionError as err:
        # papermill counts the injected-parameters cell; report the cell of the source notebook too.
        raise NotebookFailed(
            f"notebook '{source.name}' failed in cell {err.cell_index} (execution count {err.exec_count}): "
            f"{err.ename}: {err.evalue}. The executed copy with the full traceback is {target}."
        ) from None


def build_book(
    profile: str = "smoke",
    data_root: str = "data",
    device: str | None = None,
    runs_dir: str | Path | None = None,
    out: str | Path | None = None,
    notebooks: Path | None = None,
    names: tuple[str, ...] = NOTEBOOKS,
    html: bool = True,
    echo=print,
    jobs: int = 1,
    devices: list[str] | None = None,
    jobs_per_device: int = 1,
    compile: str = "off",
    stale: str = "stop",
    teachers_dir: str | None = None,
    schedule: dict[str, int] | None = None,
) -> Path:
    """Execute the notebooks of ``profile`` into ``out/book/artefacts/`` and build ``out/_build/html``.

    ``out`` defaults to the checkout itself; another folder gets a copy of the book's sources first (the test
    suite builds into a temporary folder). Returns the HTML folder (or the artefacts folder without ``html``).
    ``jobs`` notebooks run at a time (their runs are shared safely: the run store locks each run); inside a
    notebook, missing runs are trained ``jobs_per_device`` at a time on each of ``devices``. ``teachers_dir``
    holds published teachers; ``schedule`` overrides the profile's ``epochs``, ``stage_epochs`` and
    ``teacher_epochs`` (a rehearsal of a long profile).
    """
    p = get_profile(profile)
    out = Path(out or REPO).resolve()
    notebooks = Path(notebooks or REPO / "notebooks")
    runs_dir = Path(runs_dir or REPO / "runs").resolve()
    if out != REPO:
        out.mkdir(parents=True, exist_ok=True)
        for name in BOOK_SOURCES:
            src = REPO / name
            if src.is_dir():
                shutil.copytree(src, out / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("artefacts"))
            else:
                shutil.copy2(src, out / name)
    artefacts = out / "book" / "artefacts"
    parameters = {
        "profile": p.name,
        "data_root": str(Path(data_root).resolve()),
        "runs_dir": str(runs_dir),
        "device": device or p.device,
        "devices": devices,
        "jobs_per_device": jobs_per_device,
        "compile_mode": compile,
        "stale": stale,
        "teachers_dir": str(Path(teachers_dir).resolve()) if teachers_dir else None,
        **(schedule or {}),
    }
    start = time.perf_counter()

    def run(i: int, name: str) -> None:
        t = time.perf_counter()
        echo(f"[{i}/{len(names)}] {name}: executing ...")
        execute_notebook(notebooks / f"{name}.ipynb", artefacts / f"{name}.ipynb", parameters)
        echo(f"[{i}/{len(names)}] {name}: done in {time.perf_counter() - t:.0f} s")

    if jobs <= 1:
        for i, name in enumerate(names, 1):
            run(i, name)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(jobs) as pool:
            for future in [pool.submit(run, i, name) for i, name in enumerate(names, 1)]:
                future.result()
    echo(f"notebooks executed in {time.perf_counter() - start:.0f} s (profile '{p.name}', runs in {runs_dir})")
    if not html:
        return artefacts
    return build_html(out, echo)


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
