"""The plan of a build of the book: every run a profile needs, which of them the run store already holds, and how
long the others will take (:mod:`kcdlib.estimate`). Nothing is trained, and the dataset need not be there.

:func:`plan` lists the runs (``artefacts.all_runs``, each teacher before the runs that learn from it), looks each
up in the store, and estimates its device time on this device (:func:`kcdlib.estimate.time_steps`, one timing per
dataset/teacher/student/distiller) and on the GPU the benchmarks measured (:func:`kcdlib.estimate.gpu_run_seconds`).

``kcd book --profile P --plan`` prints :func:`format_plan` of :func:`plan`; ``kcd runs export`` writes the records
a build needs into an archive (:func:`runs_command`).
"""

from __future__ import annotations

import functools
import math
import sys
import textwrap
import time
from collections.abc import Callable, Sequence

import pandas as pd
import torch

from . import archive, artefacts
from .artefacts.captions import non_default_options
from .buildoptions import BuildOptions
from .errors import DatasetInvalid, DatasetMissing
from .estimate import (
    CPU_TIMING_THREADS,
    ESTIMATE_NOTES,
    FIGURES,
    StepCost,
    concurrency_speedup,
    cpu_threads,
    efficiency,
    figures,
    forget_networks,
    gpu_notes,
    gpu_run_seconds,
    notebook_phases,
    run_seconds,
    simulate_wall,
    time_steps,
    train_fraction,
)
from .identity import RunConfig, with_teachers
from .profiles import Profile, get_profile
from .recipe import Recipe
from .runs import RunStore

SHORT = {"kcd_in_five_minutes": "5min", "figure5": "F5", **{f"table{i}": f"T{i}" for i in range(1, 8)}}
# A teacher (or Table 1's student row) is trained with cross-entropy alone: no method, no distiller.
TRAINED_ALONE = "–"
FIGURES_NAME = f"kcdlib/{FIGURES.name}"


def timing_key(cfg: RunConfig) -> tuple:
    """What decides the cost of a run's step: dataset, teacher, student, distiller and its options, batch."""
    teacher = cfg.teacher_arch if cfg.kind == "distill" else None
    return (cfg.dataset, teacher, cfg.arch, cfg.distiller, cfg.recipe.batch_size, cfg.distiller_options)


def notebook_runs(p: Profile) -> dict[str, list[RunConfig]]:
    """The runs each notebook of the book asks for, in the order ``kcd book`` executes them."""
    return artefacts.notebook_runs(p)


def store_status(store: RunStore, cfg: RunConfig) -> tuple[str, str | None]:
    """``('done' | 'missing' | 'unknown', why unknown)``: a finished record in the store, none, or no way to tell
    (the dataset is not there, and a run's identity includes a fingerprint of its data)."""
    try:
        return ("done" if store.record(cfg) is not None else "missing"), None
    except DatasetMissing as err:
        return "unknown", "dataset not found: " + str(err).split(": expected")[0]
    except DatasetInvalid as err:
        return "unknown", f"dataset unreadable: {err}"


# -- the plan ----------------------------------------------------------------------------------------------------
def plan(
    profile: str | Profile,
    store: RunStore,
    *,
    devices: Sequence[str] | None = None,
    jobs_per_device: int | None = None,
    timer: Callable[..., StepCost] | None = None,
    echo: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Every run the book needs for ``profile`` (one row each, in the book's order; a teacher that only a listed
    run needs comes before it), whether ``store`` holds its finished record, and its estimated device time on
    ``store.device`` (``est_s``, timed here) and on the measured GPU (``gpu_s``, extrapolated from its figures).
    Trains nothing. ``profile`` is a build's (:meth:`kcdlib.buildoptions.BuildOptions.applied`, a rehearsal's
    schedule included, as :func:`plan_command` makes it); ``devices`` and ``jobs_per_device`` default to the
    store's device, one run at a time.

    The totals are in ``frame.attrs`` (:func:`format_plan` prints them): device time of the runs still to train
    and of all, and the wall time with ``jobs_per_device`` runs at once on each device.

    The host side runs on :data:`CPU_TIMING_THREADS` thread (the timed CPU steps, the multiply-add counts)."""
    try:
        with cpu_threads(CPU_TIMING_THREADS):
            return _plan(get_profile(profile), store, devices, jobs_per_device, timer, echo)
    finally:
        forget_networks()


def _plan(p, store, devices, jobs_per_device, timer, echo) -> pd.DataFrame:
    timer = timer or time_steps
    devices = list(devices or [str(store.device)])
    jobs = jobs_per_device or 1
    echo = echo or (lambda line: None)
    listed = artefacts.all_runs(p)
    configs = with_teachers(listed)
    needed_by: dict[str, list[str]] = {}
    for name, runs in notebook_runs(p).items():
        for cfg in runs:
            needed_by.setdefault(cfg.options_hash, []).append(SHORT.get(name, name))
    listed_hashes = {c.options_hash for c in listed}
    for cfg in listed:
        if cfg.teacher is not None and cfg.teacher.options_hash not in listed_hashes:
            needed_by.setdefault(cfg.teacher.options_hash, [])
            for name in needed_by.get(cfg.options_hash, []):
                if f"teacher for {name}" not in needed_by[cfg.teacher.options_hash]:
                    needed_by[cfg.teacher.options_hash].append(f"teacher for {name}")

    # One timing per combination of what decides a step's cost, of the first run that has it.
    keys = {cfg.options_hash: timing_key(cfg) for cfg in configs}
    combos: dict[tuple, RunConfig] = {}
    for cfg in configs:
        combos.setdefault(keys[cfg.options_hash], cfg)
    echo(f"timing {len(combos)} teacher/student/distiller combinations on {store.device} ...")
    start = time.perf_counter()
    if combos:  # the process's first steps pay for thread pools and allocators: one untimed call
        timer(RunConfig(configs[0].dataset, "resnet8", Recipe(1, batch_size=64)), store.device, steps=1)
    timings = {key: timer(cfg, store.device) for key, cfg in combos.items()}
    timing_s = time.perf_counter() - start
    echo(f"timed in {timing_s:.0f} s")

    rows, unknown = [], {}
    for i, cfg in enumerate(configs, 1):
        status, why = store_status(store, cfg)
        if why:
            unknown.setdefault(cfg.dataset, why)
        pair = cfg.arch if cfg.kind == "teacher" else f"{cfg.teacher_arch} → {cfg.arch}"
        alone = cfg.kind == "teacher"
        rows.append({
            "#": i, "status": status, "kind": cfg.kind, "pair": pair, "dataset": cfg.dataset,
            "method": TRAINED_ALONE if alone else cfg.method, "distiller": TRAINED_ALONE if alone else cfg.distiller,
            "options": non_default_options(cfg), "seed": cfg.seed,
            "epochs": cfg.recipe.epochs, "points %": 100 * train_fraction(cfg),
            "for": " ".join(needed_by.get(cfg.options_hash, [])),
            "est_s": run_seconds(cfg, timings[keys[cfg.options_hash]]), "gpu_s": gpu_run_seconds(cfg),
        })  # fmt: skip
    frame = pd.DataFrame(rows)
    frame["options_hash"] = [c.options_hash for c in configs]
    to_train = {c.options_hash for c, r in zip(configs, rows) if r["status"] != "done"}
    device_type = store.device.type
    est = {c.options_hash: r["est_s"] for c, r in zip(configs, rows)}
    gpu = {c.options_hash: r["gpu_s"] for c, r in zip(configs, rows)}
    groups_est = notebook_phases(p, to_train, est)
    groups_gpu = notebook_phases(p, to_train, gpu)
    cuda = functools.partial(concurrency_speedup, device_type="cuda")
    here = functools.partial(concurrency_speedup, device_type=device_type)
    frame.attrs.update({
        "profile": p.name, "description": p.description, "device": str(store.device), "device_type": device_type,
        "devices": len(devices) if device_type == "cuda" else 1, "jobs_per_device": jobs,
        "timing_batch": {d: sorted({t.batch for k, t in timings.items() if k[0] == d}) for d in dict.fromkeys(
            k[0] for k in timings)},
        "combinations": len(combos), "timing_s": timing_s, "unknown": unknown, "runs_dir": str(store.root),
        "to_train_s": sum(est[h] for h in to_train), "all_s": sum(est.values()),
        "scheduled_s": simulate_wall(groups_est, len(devices) if device_type == "cuda" else 1, jobs, here),
        "gpu": figures().card.removeprefix("NVIDIA "), "gpu_to_train_s": sum(gpu[h] for h in to_train),
        "gpu_all_s": sum(gpu.values()),
        "gpu_scheduled_s": {j: simulate_wall(groups_gpu, 1, j, cuda) for j in sorted({1, jobs, 4})},
    })  # fmt: skip
    return frame


def human(seconds: float) -> str:
    """``42 s``, ``3.5 min``, ``2.1 h``, ``4.2 d``."""
    if not math.isfinite(seconds):
        return "–"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def format_plan(frame: pd.DataFrame, max_rows: int | None = None) -> str:
    """The plan as plain text: a header, the table (aligned columns), the totals and what the estimates leave
    out. ``max_rows`` keeps the first and last rows of a long table."""
    a = frame.attrs
    shown = frame.drop(columns="options_hash")
    shown["points %"] = shown["points %"].map(lambda v: f"{v:.1f}")
    shown["est."] = shown.pop("est_s").map(human)
    shown[f"{a['gpu']} (extrap.)"] = shown.pop("gpu_s").map(human)
    for column in shown.columns:  # text left-aligned, numbers right-aligned
        if shown[column].dtype == object:
            width = max(len(column), *(len(str(v)) for v in shown[column]))
            shown[column] = shown[column].map(lambda v, w=width: str(v).ljust(w))
    if max_rows is not None and len(shown) > max_rows:
        head, tail = shown.head(max_rows - max_rows // 3), shown.tail(max_rows // 3)
        dots = pd.DataFrame([{c: "…" for c in shown.columns}])
        shown = pd.concat([head, dots, tail], ignore_index=True)
    table = shown.to_string(index=False, justify="left")
    counts = frame["status"].value_counts()
    done, missing, unknown = (int(counts.get(s, 0)) for s in ("done", "missing", "unknown"))
    n = len(frame)
    lines = [f"Plan for profile '{a['profile']}' ({a['description']}); run store {a['runs_dir']}", "", table, ""]
    status = f"{n} runs: {done} done, {missing} missing"
    if unknown:
        status += f", {unknown} unknown (store status unknown: {'; '.join(a['unknown'].values())})"
    lines.append(status)
    batches = ", ".join(
        f"{d} at batch {b[0]}" + (f" to {b[-1]}" if len(b) > 1 else "") for d, b in a["timing_batch"].items()
    )
    threads = f" ({CPU_TIMING_THREADS} thread)" if a["device_type"] != "cuda" else ""
    timed = f"{a['combinations']} combinations in {a['timing_s']:.0f} s"
    lines.append(f"timed on {a['device']}{threads}: {timed}, {batches}")
    jobs, devices = a["jobs_per_device"], a["devices"]
    if a["device_type"] == "cuda":
        busy = a["to_train_s"] / (devices * concurrency_speedup(jobs))
        wall = (
            f"wall on {devices} x {a['device']} with {jobs} job(s) each: {human(a['scheduled_s'])} as kcd book "
            f"schedules them, {human(busy)} with every slot busy (efficiency {efficiency(jobs):.2f} per job)"
        )
    else:
        wall = f"wall {human(a['scheduled_s'])} (concurrent jobs on a CPU share its cores: no gain assumed)"
    lines.append(
        f"total: {missing + unknown} of {n} runs to train: {human(a['to_train_s'])} of {a['device']} time "
        f"(all {n}: {human(a['all_s'])}); {wall}"
    )
    gpu = [
        f"with {j} jobs: {human(wall)} as kcd book schedules them, "
        f"{human(a['gpu_to_train_s'] / concurrency_speedup(j))} with every slot busy"
        if j > 1
        else f"with 1 job: {human(wall)}"
        for j, wall in sorted(a["gpu_scheduled_s"].items(), reverse=True)
    ]
    lines.append(
        f"{a['gpu']}, extrapolated from {FIGURES_NAME} (not measured): {human(a['gpu_to_train_s'])} of device "
        f"time to train (all: {human(a['gpu_all_s'])}); wall on one {a['gpu']} {'; '.join(gpu)}"
    )
    tags = ", ".join(f"{tag} {name}" for name, tag in SHORT.items())
    notes = [f"kind 'teacher': trained with cross-entropy alone (a teacher, or Table 1's student row), so no method "
             f"or distiller ('{TRAINED_ALONE}'). 'for': the notebooks that need the run ({tags}).",
             ESTIMATE_NOTES, gpu_notes()]  # fmt: skip
    if a["device_type"] != "cuda":
        notes.append(
            f"Timed on {CPU_TIMING_THREADS} CPU thread, in CPU time (what other processes on the machine take does "
            "not count; a run with more idle cores may be faster). For the GPU estimate run the same command on "
            "the GPU machine (--device cuda)."
        )
    lines.append("")
    lines += [textwrap.fill(t, 118, initial_indent="- ", subsequent_indent="  ", break_on_hyphens=False) for t in notes]
    return "\n".join(lines)


def plan_command(build: BuildOptions) -> str:
    """``kcd book --plan``: the plan of the build ``build`` as text. Without a device the profile's is used, or the
    CPU when the profile's is a GPU this machine does not have (said on standard error)."""
    p = get_profile(build.profile)
    if build.device is None:
        device = (build.devices or [None])[0] or p.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            print(f"kcd: profile '{p.name}' runs on {device}, which this machine lacks: timing on the CPU "
                  "(run the same command on the GPU machine for its estimate)", file=sys.stderr)  # fmt: skip
            device = "cpu"
        build = build.with_(device=device)
    session = artefacts.setup(build)
    frame = plan(session.profile, session.store, devices=session.devices, jobs_per_device=session.jobs_per_device,
                 echo=lambda line: print(f"kcd: {line}", file=sys.stderr))  # fmt: skip
    return format_plan(frame)


def runs_command(args) -> int:
    """``kcd runs import`` (:func:`kcdlib.archive.import_runs`) and ``kcd runs export``: the records the book's
    notebooks (or ``--only`` those) need, as ``kcd book`` would ask for them, into one archive."""
    if args.runs_command == "import":
        archive.import_runs(args.archive, RunStore(args.runs_dir))
        return 0
    from .cluster import book_runs

    names = tuple(args.only.split(",")) if args.only else artefacts.names()
    configs, store = book_runs(
        BuildOptions(profile=args.profile, runs_dir=args.runs_dir, data_root=args.data_root, device=args.device), names
    )
    archive.export_runs(configs, store, args.out, models=args.models, profile=args.profile)
    return 0
