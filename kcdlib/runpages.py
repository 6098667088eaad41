"""A page of the book per run, written from its record: where every number of a table or figure came from.

``kcd book`` writes ``book/runs/<hash>.md`` for every run the build's notebooks read (and the teachers they learned
from), and ``book/runs/index.md`` listing them; :func:`kcdlib.book.toc` puts them in the table of contents. A
table cell links to the pages of the runs it is made of (:meth:`kcdlib.artefacts.format.Table.linked`).

A page shows only what the record holds and nothing of the machine that made it: no path, no host name (a
published teacher is named by the SHA-256 of its file, not by where it was found).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import data as datasets
from . import distillers, methods
from .folders import run_folder
from .identity import RunConfig, with_teachers
from .records import Damaged, read_record
from .runs import RunStore

# Where the pages go in the book tree, and the HTML page a table cell links to, relative to an artefact's page.
FOLDER = "book/runs"
INDEX = f"{FOLDER}/index"


def href(run_hash: str) -> str:
    """The link from an artefact's page (``book/artefacts/<name>``) to a run's page."""
    return f"../runs/{run_hash}.html"


def differences(config: dict[str, Any]) -> dict[str, Any]:
    """The options of a run's ``config`` (a record's) that differ from their defaults: the dataset's recipe for
    the architecture, the distiller's and the method's published defaults."""
    spec = datasets.spec(config["dataset"])
    recipe = spec.recipe(config["arch"], None).as_dict()
    out = {f"recipe.{k}": v for k, v in config["recipe"].items() if recipe.get(k) != v}
    # The registries' own defaults (KCD's stage length: None, six stages), not defaults fitted to this schedule.
    for kind, specs in (("distiller", distillers.DISTILLERS), ("method", methods.METHODS)):
        name, spec = config[kind], specs[config[kind]].option_specs
        out |= {f"{name}.{k}": v for k, v in config[f"{kind}_options"].items() if k not in spec or spec[k].default != v}
    if config.get("seed"):
        out["seed"] = config["seed"]
    return out


def _teacher_hash(store: RunStore, cfg: RunConfig) -> str | None:
    return store.run_hash(cfg.teacher) if cfg.teacher is not None else None


def _value(v: Any) -> str:
    return f"`{json.dumps(v)}`" if not isinstance(v, str) else f"`{v}`"


def page(record: dict[str, Any], teacher_hash: str | None, figure: str | None, linked: bool = True) -> str:
    """The MyST text of one run's page; ``teacher_hash``: the teacher's run, a link where ``linked``."""
    c, h = record["config"], record["hash"]
    what = (f"{c['arch']} trained alone (cross-entropy)" if c["kind"] == "teacher"
            else f"{c['arch']} from {c['teacher_arch']}, {c['distiller']} + {c['method']}")  # fmt: skip
    short = (f"{c['arch']} alone" if c["kind"] == "teacher"
             else f"{c['teacher_arch']} → {c['arch']}, {c['distiller']}/{c['method']}")  # fmt: skip
    lines = [f"(run-{h})=", f"# {short}, seed {c['seed']}: run {h}", "", f"{what}, seed {c['seed']}, on "
             f"{c['dataset']}.", ""]  # fmt: skip
    lines += ["## Numbers", "", "| field | recorded |", "| --- | --- |"]
    for key in ("final_top1", "best_top1", "final_top5", "computation", "computation_formula", "points_distilled",
                "never_distilled", "wall_seconds"):  # fmt: skip
        if record.get(key) is not None:
            lines.append(f'| `{key}` | <span class="kcd-{key}">{record[key]!r}</span> |')
    lines += ["", "`final_top1` / `best_top1`: top-1 % at the last / best epoch; `computation`: the knowledge points "
              "the teacher processed and the student's passes, counted, relative to KD on the same data and epochs.",
              ""]  # fmt: skip
    lines += ["## Where it came from", "", "| | |", "| --- | --- |", f"| identity | `{h}` |"]
    data = record["data"]
    lines.append("| data | " + ", ".join(f"{k} {_value(v)}" for k, v in data.items()) + " |")
    for key, name in (("code", "code digest"), ("numerics", "numerics version"), ("git_commit", "commit")):
        if record.get(key) is not None:
            lines.append(f"| {name} | `{record[key]}` |")
    if record.get("git_modified"):
        lines.append(f"| modified from the commit | {', '.join(f'`{f}`' for f in record['git_modified'])} |")
    versions = record.get("versions") or {}
    if versions:
        lines.append("| versions | " + ", ".join(f"{k} {v}" for k, v in versions.items()) + " |")
    lines += [f"| device | {record.get('device', '–')} |", f"| wall time | {record['wall_seconds']:.1f} s |",
              f"| finished | {record['finished']} |"]  # fmt: skip
    if c["kind"] == "distill":
        t = c["teacher"]
        acc = (record.get("teacher_accuracy") or {}).get("top1")
        measured = "" if acc is None else f" ({acc:.2f} % top-1 measured when used)"
        if teacher_hash is not None:
            run = f"[run {teacher_hash}]({teacher_hash}.md)" if linked else f"run `{teacher_hash}` (no page)"
            lines.append(f"| teacher | {c['teacher_arch']}, {run}{measured} |")
        else:
            lines.append(f"| teacher | {c['teacher_arch']}, a published checkpoint, SHA-256 `{t['sha256']}`"
                         f"{measured} |")  # fmt: skip
    lines += ["", "## Options that differ from the defaults", ""]
    diff = differences(c)
    if diff:
        lines += ["| option | value |", "| --- | --- |", *(f"| `{k}` | {_value(v)} |" for k, v in diff.items())]
    else:
        lines.append("None: the dataset's recipe and the published defaults.")
    if record.get("stages"):
        lines += ["", "## KCD's stages", "", "Points kept at each stage (the condensed set the student trained on), "
                  "points that re-entered, points mixed by the knowledge summary (VAKS).", "",
                  "| stage | kept | re-entered | mixed |", "| --- | --- | --- | --- |"]  # fmt: skip
        lines += [f"| {s.get('stage')} | {s.get('kept')} | {s.get('reentered')} | {s.get('mixed')} |"
                  for s in record["stages"]]  # fmt: skip
    lines += ["", "## Epochs", ""]
    if figure:
        lines += [f"![Loss and test top-1 of run {h} per epoch]({figure})", ""]
    lines += ["| epoch | lr | points | train loss | test top-1 | test top-5 |", "| --- | --- | --- | --- | --- | --- |"]
    for r in record["epochs"]:
        loss = r.get("train_loss")
        lines.append(f"| {r['epoch']} | {r.get('lr', '–')} | {r.get('points', '–')} | "
                     f"{'–' if loss is None else f'{loss:.4f}'} | {r['top1']:.2f} | {r['top5']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def curves(record: dict[str, Any], path: Path) -> None:
    """The run's training loss and test top-1 per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in record["epochs"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 2.6), layout="constrained")
    a.plot(epochs, [r.get("train_loss", float("nan")) for r in record["epochs"]], marker="o", ms=3)
    a.set(xlabel="epoch", ylabel="training loss")
    b.plot(epochs, [r["top1"] for r in record["epochs"]], marker="o", ms=3, color="C1")
    b.set(xlabel="epoch", ylabel="test top-1 %")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write(store: RunStore, configs: Iterable[RunConfig], root: Path, echo=print) -> list[str]:
    """One page per finished run of ``configs`` (their teachers added) under ``root/book/runs``, and an index.
    Returns the pages' TOC entries (``book/runs/<hash>``), the index first; runs without a record are left out
    and said so."""
    folder = root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*"):  # a page of a run this build did not read must not stay in the book
        old.unlink()
    entries, rows, missing, written = [], [], 0, set()
    for cfg in with_teachers(configs):
        h = store.run_hash(cfg)
        try:
            record = read_record(run_folder(store.root, h) / "record.json")
        except (Damaged, OSError):
            missing += 1
            continue
        figure = None
        if record["epochs"]:
            curves(record, folder / f"{h}.png")
            figure = f"{h}.png"
        # Teachers come first (with_teachers): a teacher without a page (its record damaged) is named, not linked.
        teacher = _teacher_hash(store, cfg)
        (folder / f"{h}.md").write_text(page(record, teacher, figure, linked=teacher in written))
        written.add(h)
        entries.append(f"{FOLDER}/{h}")
        c = record["config"]
        who = c["arch"] if c["kind"] == "teacher" else f"{c['teacher_arch']} → {c['arch']}"
        rows.append(f"| [{h}]({h}.md) | {who} | {c['distiller']} | {c['method']} | {c['seed']} | "
                    f"{record['final_top1']:.2f} | {record['computation']:.3f} |")  # fmt: skip
    index = ["# The runs", "", "Every run this build's tables and figures read, one page each, generated from its "
             "record (`runs/<hash>/record.json`). A table cell links to the runs it is made of.", "",
             "| run | network | distiller | method | seed | final top-1 | C |",
             "| --- | --- | --- | --- | --- | --- | --- |", *rows]  # fmt: skip
    (folder / "index.md").write_text("\n".join(index) + "\n")
    if missing:
        echo(f"run pages: {missing} run(s) without a finished record were left out")
    return [INDEX, *entries]
