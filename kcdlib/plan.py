"""Planning a build of the book: every run a profile needs, which of them the run store already holds, and how
long the others will take. Nothing is trained, and the dataset need not be there.

:func:`plan` lists the runs (``artefacts.all_runs``, and the teachers they would train first), looks each up in the
store, and estimates its device time from a few training steps timed on the current device: the real
:class:`~kcdlib.train.Trainer` over synthetic random uint8 images of the dataset's size and class count, one
timing per (dataset, teacher, student, distiller), multiplied by the samples the run will process. What the
estimate approximates or leaves out is said in :data:`ESTIMATE_NOTES`, which the printed plan repeats.

:func:`h200_estimate` gives the same profile's time on an H200 without one: an extrapolation from the one H200
measurement recorded in ``benchmarks/README.md`` (see :func:`h200_run_seconds`).

``kcd book --profile P --plan`` prints :func:`format_plan` of :func:`plan`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from . import artefacts, condense, cost, models
from . import data as datasets
from .artefacts.captions import non_default_options
from .data import DeviceDataset
from .distillers import DistillContext
from .distillers import build as build_distiller
from .errors import DatasetInvalid, DatasetMissing
from .profiles import Profile, get_profile
from .recipe import Recipe
from .runs import RunConfig, RunStore
from .train import Trainer, evaluate

# -- the recorded H200 figures -------------------------------------------------------------------------------
# From benchmarks/README.md, "Measured figures" (log: benchmarks/results/gpu_check_h200_2026-11-28.log), one
# session on one NVIDIA H200, torch 2.11.0+cu130: resnet32x4 -> resnet8x4, KD, batch 64, fp32, eager steps (the
# book's defaults, --compile off), CIFAR-shaped synthetic data of 50,000 points.
H200_REFERENCE = ("resnet32x4", "resnet8x4")
# `bench_epoch.py --mode engine --steps 0` (the log's step epoch_fp32): one measured epoch, 50,000 images in
# 7.0789 s (7,063 images/s; evaluation not included).
H200_EPOCH_SECONDS = 7.0789
H200_SECONDS_PER_IMAGE = H200_EPOCH_SECONDS / 50_000
# The log's step "concurrency": four engine runs at once on the one H200, 400 steps each, their timed windows
# overlapping 98.6 %: 18,591.5 images/s together against 6,275.2 for one run alone, 2.963x (efficiency 0.74).
H200_CONCURRENCY = {1: 1.0, 4: 18_591.5 / 6_275.2}
# The same README: at batch 64 these networks are far from compute-bound on an H200 (9.7 of 206 TF32 TMAC/s):
# eager PyTorch is limited by kernel launches, about 10 ms of host time per step. So a pair's time is scaled by
# its multiply-adds AND by its layer count (a proxy for launches), and the larger of the two is taken.
H200_EVAL_BATCH_OVER_TRAIN = 256 / 64  # evaluation runs batches of 256: a quarter of the launches per image

ESTIMATE_NOTES = (
    "Estimated device time = the measured seconds per sample of a few training steps (synthetic random images of "
    "the dataset's size and class count, the real Trainer, one timing per dataset/teacher/student/distiller) x "
    "the samples the run processes: epochs x N x the method's fraction (KCD: its keep schedule; UNIX, "
    "approximately: k/batch of every batch trained, plus one student forward per point, taken as the student's "
    "share of the step's multiply-adds), plus evaluation (one student forward per test image per epoch, timed). "
    "Not counted: data loading (ImageNet decodes JPEG files, likely the real limit there), checkpoints, KCD's "
    "condensations, the teacher's accuracy check, process start-up. Steps run eagerly in fp32 (the book's defaults: "
    "--compile and --precision are not applied). A smaller timing batch on a CPU is scaled per sample."
)
H200_NOTES = (
    "H200 column: an extrapolation from ONE recorded measurement (benchmarks/README.md: resnet32x4 -> resnet8x4, "
    "KD, fp32 eager, batch 64: a 50,000-image epoch in 7.08 s; 4 concurrent runs 2.96x one), each pair scaled by "
    "its multiply-adds (3 Fs + Ft) or its layer count (eager steps are launch-bound there), whichever is slower; "
    "a distiller's own cost (CRD's negatives, PKT's similarities) is not counted; concurrency is interpolated "
    "linearly between 1 and 4 jobs, and jobs beyond 4 are assumed to add nothing."
)

SHORT = {"kcd_in_five_minutes": "5min", "figure5": "F5", **{f"table{i}": f"T{i}" for i in range(1, 8)}}
# A teacher (or Table 1's student row) is trained with cross-entropy alone: no method, no distiller.
TRAINED_ALONE = "–"


# -- concurrency ---------------------------------------------------------------------------------------------
def concurrency_speedup(jobs: int, device_type: str = "cuda") -> float:
    """Throughput of ``jobs`` runs at once on one device, relative to one run alone.

    On CUDA: the recorded 2.963 of four jobs on an H200 (:data:`H200_CONCURRENCY`), linear between one and four
    jobs, and no further gain beyond four (not measured). On a CPU: 1, concurrent runs share the same cores."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    if device_type != "cuda":
        return 1.0
    top = max(H200_CONCURRENCY)
    if jobs >= top:
        return H200_CONCURRENCY[top]
    return 1.0 + (H200_CONCURRENCY[top] - 1.0) * (jobs - 1) / (top - 1)


def efficiency(jobs: int, device_type: str = "cuda") -> float:
    """Per-job efficiency of ``jobs`` concurrent runs: :func:`concurrency_speedup` / ``jobs``."""
    return concurrency_speedup(jobs, device_type) / jobs


def simulate_wall(
    groups: Sequence[Sequence[Sequence[float]]], devices: int, jobs: int, speedup: Callable[[int], float]
) -> float:
    """Wall time of phases of jobs run one phase after another, each phase's jobs ``jobs`` at a time on each of
    ``devices``, a device with ``a`` jobs running each at ``speedup(a) / a`` of its speed alone. ``groups`` are
    lists of phases, a phase a list of the jobs' seconds alone (``kcd book``: one group per notebook, its teachers
    first, then the rest, as :func:`kcdlib.parallel.ensure_all` trains them)."""
    wall = 0.0
    for phases in groups:
        for phase in phases:
            queue = [d for d in phase if d > 0]
            active: list[list[float]] = [[] for _ in range(devices)]
            while queue or any(active):
                while queue and min(map(len, active)) < jobs:  # idle workers take the next job, in order
                    min(active, key=len).append(queue.pop(0))
                rates = [speedup(len(a)) / len(a) if a else 0.0 for a in active]
                dt = min(r / rate for a, rate in zip(active, rates) for r in a)
                wall += dt
                active = [[r - dt * rate for r in a if r - dt * rate > 1e-9] for a, rate in zip(active, rates)]
    return wall


# -- what a run costs ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepCost:
    """Seconds per sample of one training step (teacher forward, student forward and backward, loss, update),
    per image of a student forward alone (UNIX's selection pass), and per test image of evaluation."""

    step: float
    student_forward: float
    evaluate: float
    batch: int = 0  # the batch it was timed at (0: not timed)


def train_fraction(cfg: RunConfig) -> float:
    """The share of ``epochs x N`` training samples the run's steps see: 1 for KD and teachers, KCD's keep
    schedule counted over whole points, UNIX's ``k / batch`` (its selection forward is counted apart)."""
    o = dict(cfg.method_options)
    if cfg.method == "kcd":
        n = datasets.spec(cfg.dataset).num_train
        return condense.schedule_computation(o["schedule"], cfg.recipe.epochs, o["stage_epochs"], o["rho"], n)
    if cfg.method == "unix":
        return o["k"] / cfg.recipe.batch_size
    return 1.0


def run_seconds(cfg: RunConfig, c: StepCost) -> float:
    """The run's device time: its training samples x the step cost, UNIX's selection forwards, evaluation."""
    spec = datasets.spec(cfg.dataset)
    n, n_test = spec.num_train, spec.num_test
    epochs = cfg.recipe.epochs
    seconds = epochs * n * train_fraction(cfg) * c.step
    if cfg.method == "unix":
        seconds += epochs * n * c.student_forward
    return seconds + epochs * n_test * c.evaluate


@functools.cache
def arch_cost(arch: str, dataset: str) -> tuple[int, int]:
    """``(forward multiply-adds per image, layers)`` of ``arch`` at ``dataset``'s image size; layers counts the
    convolutions, batch norms and linear layers (a proxy for the kernels a step launches)."""
    spec = datasets.spec(dataset)
    side = spec.image_size
    model = models.create(arch, spec.num_classes)
    layers = sum(isinstance(m, torch.nn.Conv2d | torch.nn.BatchNorm2d | torch.nn.Linear) for m in model.modules())
    return cost.forward_macs(model, (3, side, side)), layers


def student_share(teacher: str | None, student: str, dataset: str) -> float:
    """A student forward's share of a training step's multiply-adds: ``Fs / (3 Fs + Ft)``."""
    fs = arch_cost(student, dataset)[0]
    ft = arch_cost(teacher, dataset)[0] if teacher else 0
    return fs / (3 * fs + ft)


# -- the H200 extrapolation -----------------------------------------------------------------------------------
def h200_step_cost(teacher: str | None, student: str, dataset: str) -> StepCost:
    """Seconds per sample on an H200, extrapolated from the recorded resnet32x4 -> resnet8x4 epoch: the reference's
    seconds per image x the larger of two ratios to the reference pair, multiply-adds ``3 Fs + Ft`` (student
    forward and backward, teacher forward) and layers ``3 Ls + Lt`` (launches of an eager step)."""
    ref_t, ref_s = (arch_cost(a, "cifar100") for a in H200_REFERENCE)
    ref_macs, ref_layers = 3 * ref_s[0] + ref_t[0], 3 * ref_s[1] + ref_t[1]
    fs, ls = arch_cost(student, dataset)
    ft, lt = arch_cost(teacher, dataset) if teacher else (0, 0)
    base = H200_SECONDS_PER_IMAGE
    step = base * max((3 * fs + ft) / ref_macs, (3 * ls + lt) / ref_layers)
    forward = base * max(fs / ref_macs, ls / ref_layers)
    evaluate_ = base * max(fs / ref_macs, ls / ref_layers / H200_EVAL_BATCH_OVER_TRAIN)
    return StepCost(step, forward, evaluate_)


def h200_run_seconds(cfg: RunConfig) -> float:
    """One run's time alone on an H200, EXTRAPOLATED from one recorded measurement (benchmarks/README.md: the
    resnet32x4 -> resnet8x4 KD epoch of 7.08 s, fp32 eager, batch 64), not measured: every other pair is scaled by
    its multiply-adds or its layer count, whichever gives the longer time (:func:`h200_step_cost`); the method's
    fraction and evaluation as in :func:`run_seconds`. Data loading is not counted (ImageNet's JPEG decoding
    would likely dominate there), nor a distiller's own cost (CRD's memory bank, PKT's similarities)."""
    return run_seconds(cfg, h200_step_cost(cfg.teacher_arch if cfg.kind == "distill" else None, cfg.arch, cfg.dataset))


def h200_estimate(profile: str | Profile, jobs_per_device: int = 4, devices: int = 1) -> dict[str, float]:
    """A profile's whole book (every run, trained from nothing) on ``devices`` H200s with ``jobs_per_device``
    runs at once on each, EXTRAPOLATED from the one H200 measurement recorded in benchmarks/README.md (see
    :func:`h200_run_seconds`; the concurrency gain is the recorded 2.963x of four jobs, :func:`concurrency_speedup`).

    Returns ``runs``, ``epochs`` (summed over runs), ``device_s`` (the runs one after another), ``wall_s``
    (``device_s / (devices x jobs x efficiency)``: every slot always busy) and ``scheduled_s`` (the book's
    order: notebook by notebook, each notebook's teachers first, :func:`simulate_wall`)."""
    p = get_profile(profile)
    with cpu_threads(CPU_TIMING_THREADS):  # the multiply-add counts
        configs = with_teachers(artefacts.all_runs(p))
        seconds = {cfg.options_hash: h200_run_seconds(cfg) for cfg in configs}
        groups = notebook_phases(p, set(seconds), seconds)
    total = sum(seconds.values())
    speed = functools.partial(concurrency_speedup, device_type="cuda")
    return {
        "runs": len(configs),
        "epochs": sum(cfg.recipe.epochs for cfg in configs),
        "device_s": total,
        "wall_s": total / (devices * concurrency_speedup(jobs_per_device)),
        "scheduled_s": simulate_wall(groups, devices, jobs_per_device, speed),
    }


# -- which runs ------------------------------------------------------------------------------------------------
def with_teachers(configs: Iterable[RunConfig]) -> list[RunConfig]:
    """``configs`` with, before the first run that needs it, each teacher run that is not listed itself (the store
    trains it first)."""
    configs = list(configs)
    listed = {cfg.options_hash for cfg in configs}
    out, seen = [], set()
    for cfg in configs:
        t = cfg.teacher
        if t is not None and t.options_hash not in listed and t.options_hash not in seen:
            seen.add(t.options_hash)
            out.append(t)
        out.append(cfg)
    return out


def notebook_runs(p: Profile) -> dict[str, list[RunConfig]]:
    """The runs each notebook of the book asks for, in the order ``kcd book`` executes them."""
    return artefacts.notebook_runs(p)


def notebook_phases(p: Profile, to_train: set[str], seconds: dict[str, float]) -> list[list[list[float]]]:
    """For :func:`simulate_wall`: per notebook, the seconds of the runs still to train when it runs, its teachers
    first (as :func:`kcdlib.parallel.ensure_all`), then the rest."""
    done: set[str] = set()
    groups = []
    for configs in notebook_runs(p).values():
        missing = [c for c in configs if c.options_hash in to_train and c.options_hash not in done]
        teachers = artefacts.unique(c.teacher for c in missing if c.teacher is not None)
        teachers = [t for t in teachers if t.options_hash in to_train and t.options_hash not in done]
        done |= {t.options_hash for t in teachers}
        rest = [c for c in missing if c.options_hash not in done]
        done |= {c.options_hash for c in rest}
        groups.append([[seconds[c.options_hash] for c in teachers], [seconds[c.options_hash] for c in rest]])
    return groups


def store_status(store: RunStore, cfg: RunConfig) -> tuple[str, str | None]:
    """``('done' | 'missing' | 'unknown', why unknown)``: a finished record in the store, none, or no way to tell
    (the dataset is not there, and a run's identity includes a fingerprint of its data)."""
    try:
        return ("done" if store.record(cfg) is not None else "missing"), None
    except DatasetMissing as err:
        return "unknown", "dataset not found: " + str(err).split(": expected")[0]
    except DatasetInvalid as err:
        return "unknown", f"dataset unreadable: {err}"


# -- timing on this device ------------------------------------------------------------------------------------
# On a CPU a timed step is kept near this many multiply-adds (about a tenth of a second on one core), so that a
# plan of the paper profile (some 50 combinations, ImageNet's ResNet34 among them) is timed in about a minute.
CPU_STEP_MACS = 6e9
# Steps are timed on one CPU thread: on a shared machine two OpenMP threads spin against other processes and one
# step can take a hundred times as long (benchmarks/README.md times on one thread for the same reason).
CPU_TIMING_THREADS = 1


def timing_batch(batch_size: int, dataset: str, device: torch.device, macs_per_sample: float = 0.0) -> int:
    """The batch the steps are timed at: the recipe's on a GPU; on a CPU at most 16 and about
    :data:`CPU_STEP_MACS` per step (at least 2), the time then scaled per sample."""
    if device.type == "cuda":
        return batch_size
    fit = int(CPU_STEP_MACS // macs_per_sample) if macs_per_sample > 0 else 16
    return max(2, min(batch_size, 16, fit))


# The networks of one plan, reused from one timing to the next (their weights do not change a step's time, and
# initialising them again would take a sixth of a CPU plan); :func:`plan` empties it when it is done.
_NETWORKS: dict[tuple[str, int, str, str], torch.nn.Module] = {}


def _network(arch: str, classes: int, device: torch.device, role: str) -> torch.nn.Module:
    """A network of ``arch`` on ``device``: a frozen one in eval mode for ``role='teacher'``."""
    key = (arch, classes, str(device), role)
    if key not in _NETWORKS:
        torch.manual_seed(0)
        net = models.create(arch, classes).to(device)
        if role == "teacher":
            net.eval()
            for param in net.parameters():
                param.requires_grad_(False)
        _NETWORKS[key] = net
    return _NETWORKS[key]


@contextlib.contextmanager
def cpu_threads(threads: int) -> Iterator[None]:
    """torch's CPU threads set to ``threads`` inside the block (the plan's timings and multiply-add counts)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    dataset: str,
    teacher: str | None,
    student: str,
    distiller: str,
    batch_size: int,
    device: str | torch.device,
    distiller_options: dict[str, Any] | None = None,
    warmup: int | None = None,
    steps: int = 3,
    budget_s: float = 0.3,
) -> StepCost:
    """Seconds per sample of training steps of ``teacher -> student`` with ``distiller`` on ``device``, timed with
    the real :class:`Trainer` on synthetic random uint8 images of ``dataset``'s size and class count (the
    distiller is built for the real ``N``: CRD's negatives), at :func:`timing_batch`. ``warmup`` untimed steps
    (2 on a GPU, 1 on a CPU), then ``steps`` timed ones: on a GPU together, in wall time; on a CPU one at a time
    on :data:`CPU_TIMING_THREADS` thread, in the process's CPU time (other processes on the machine do not count),
    as many as fit ``budget_s`` (at least one), the median kept. Evaluation
    is timed on a synthetic test split of one evaluation batch (256 images on a GPU, the timing batch on a CPU)."""
    device = torch.device(device)
    spec = datasets.spec(dataset)
    classes, side, n_points = spec.num_classes, spec.image_size, spec.num_train
    fs = arch_cost(student, dataset)[0]
    batch = timing_batch(batch_size, dataset, device, 3 * fs + (arch_cost(teacher, dataset)[0] if teacher else 0))
    n_test = 256 if device.type == "cuda" else batch
    warmup = warmup if warmup is not None else (2 if device.type == "cuda" else 1)
    g = torch.Generator().manual_seed(0)
    n = batch * (warmup + steps)
    images = torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, classes, (n,), generator=g)
    test = torch.randint(0, 256, (n_test, 3, side, side), generator=g, dtype=torch.uint8)
    test_labels = torch.randint(0, classes, (n_test,), generator=g)
    data = DeviceDataset(dataset, classes, images, labels, test, test_labels, pad=max(1, side // 8)).to(device)
    net = _network(student, classes, device, "student")
    t_net = None if teacher is None else _network(teacher, classes, device, "teacher")
    context = DistillContext(
        num_points=n_points, num_classes=classes, student_dim=models.penultimate_dim(net),
        teacher_dim=models.penultimate_dim(t_net) if t_net is not None else 0,
        labels=torch.randint(0, classes, (n_points,), generator=g), options=distiller_options or {},
    )  # fmt: skip
    loss = build_distiller(distiller, context).to(device)
    trainer = Trainer(net, data, Recipe(1, batch_size=batch), loss, t_net, progress=False)
    with cpu_threads(CPU_TIMING_THREADS):
        trainer.train_pass(1, torch.arange(batch * warmup))
        if device.type == "cuda":
            _sync(device)
            start = time.perf_counter()
            trainer.train_pass(2, torch.arange(batch * steps))
            _sync(device)
            step = (time.perf_counter() - start) / (batch * steps)
            evaluate(net, data)  # cuDNN's autotuner meets the evaluation batch here
            _sync(device)
            start = time.perf_counter()
            evaluate(net, data)
            _sync(device)
            per_test = (time.perf_counter() - start) / n_test
        else:
            # One step at a time, in the process's CPU time (one thread: the time the step itself took, however
            # many other processes share the cores), the median kept.
            times: list[float] = []
            while len(times) < steps and (not times or sum(times) < budget_s):
                start = time.process_time()
                trainer.train_pass(2 + len(times), torch.arange(batch))
                times.append(time.process_time() - start)
            step = statistics.median(times) / batch
            evals = []
            for _ in range(2):
                start = time.process_time()
                evaluate(net, data)
                evals.append(time.process_time() - start)
            per_test = min(evals) / n_test
    return StepCost(step, step * student_share(teacher, student, dataset), per_test, batch)


# -- the plan ----------------------------------------------------------------------------------------------------
def plan(
    profile: str | Profile,
    store: RunStore,
    *,
    devices: Sequence[str] | None = None,
    jobs_per_device: int | None = None,
    epochs: int | None = None,
    stage_epochs: int | None = None,
    teacher_epochs: int | None = None,
    timer: Callable[..., StepCost] | None = None,
    echo: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Every run the book needs for ``profile`` (one row each, in the book's order; a teacher that only a listed
    run needs comes before it), whether ``store`` holds its finished record, and its estimated device time on
    ``store.device`` (``est_s``, timed here) and on an H200 (``h200_s``, extrapolated from the recorded figures).
    Trains nothing. ``epochs``, ``stage_epochs``, ``teacher_epochs`` shorten the profile as ``kcd book`` does;
    ``devices`` and ``jobs_per_device`` default to the store's device, one run at a time.

    The totals are in ``frame.attrs`` (:func:`format_plan` prints them): device time of the runs still to train
    and of all, and the wall time with ``jobs_per_device`` runs at once on each device.

    The host side runs on :data:`CPU_TIMING_THREADS` thread (the timed CPU steps, the multiply-add counts)."""
    try:
        with cpu_threads(CPU_TIMING_THREADS):
            return _plan(get_profile(profile), store, devices, jobs_per_device, epochs, stage_epochs, teacher_epochs,
                         timer, echo)  # fmt: skip
    finally:
        _NETWORKS.clear()


def _plan(p, store, devices, jobs_per_device, epochs, stage_epochs, teacher_epochs, timer, echo) -> pd.DataFrame:
    timer = timer or time_steps
    if any(v is not None for v in (epochs, stage_epochs, teacher_epochs)):
        p = artefacts.setup(p, str(store.root), store.data_root, str(store.device), epochs=epochs,
                            stage_epochs=stage_epochs, teacher_epochs=teacher_epochs).profile  # fmt: skip
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

    keys = {}
    for cfg in configs:
        teacher = cfg.teacher_arch if cfg.kind == "distill" else None
        keys[cfg.options_hash] = (cfg.dataset, teacher, cfg.arch, cfg.distiller, cfg.recipe.batch_size,
                                  cfg.distiller_options)  # fmt: skip
    combos = list(dict.fromkeys(keys.values()))
    echo(f"timing {len(combos)} teacher/student/distiller combinations on {store.device} ...")
    start = time.perf_counter()
    if combos:  # the process's first steps pay for thread pools and allocators: one untimed call
        timer(combos[0][0], None, "resnet8", "ce", 64, store.device, {}, steps=1)
    timings = {}
    for dataset, teacher, student, distiller, batch, options in combos:
        timings[(dataset, teacher, student, distiller, batch, options)] = timer(
            dataset, teacher, student, distiller, batch, store.device, dict(options)
        )
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
            "est_s": run_seconds(cfg, timings[keys[cfg.options_hash]]), "h200_s": h200_run_seconds(cfg),
        })  # fmt: skip
    frame = pd.DataFrame(rows)
    frame["options_hash"] = [c.options_hash for c in configs]
    to_train = {c.options_hash for c, r in zip(configs, rows) if r["status"] != "done"}
    device_type = store.device.type
    est = {c.options_hash: r["est_s"] for c, r in zip(configs, rows)}
    h200 = {c.options_hash: r["h200_s"] for c, r in zip(configs, rows)}
    groups_est = notebook_phases(p, to_train, est)
    groups_h200 = notebook_phases(p, to_train, h200)
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
        "h200_to_train_s": sum(h200[h] for h in to_train), "h200_all_s": sum(h200.values()),
        "h200_scheduled_s": {j: simulate_wall(groups_h200, 1, j, cuda) for j in sorted({1, jobs, 4})},
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
    shown["H200 (extrap.)"] = shown.pop("h200_s").map(human)
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
    h200 = [
        f"with {j} jobs: {human(wall)} as kcd book schedules them, "
        f"{human(a['h200_to_train_s'] / concurrency_speedup(j))} with every slot busy"
        if j > 1
        else f"with 1 job: {human(wall)}"
        for j, wall in sorted(a["h200_scheduled_s"].items(), reverse=True)
    ]
    lines.append(
        f"H200, extrapolated from benchmarks/README.md (not measured): {human(a['h200_to_train_s'])} of device time "
        f"to train (all: {human(a['h200_all_s'])}); wall on one H200 {'; '.join(h200)}"
    )
    tags = ", ".join(f"{tag} {name}" for name, tag in SHORT.items())
    notes = [f"kind 'teacher': trained with cross-entropy alone (a teacher, or Table 1's student row), so no method "
             f"or distiller ('{TRAINED_ALONE}'). 'for': the notebooks that need the run ({tags}).",
             ESTIMATE_NOTES, H200_NOTES]  # fmt: skip
    if a["device_type"] != "cuda":
        notes.append(
            f"Timed on {CPU_TIMING_THREADS} CPU thread, in CPU time (what other processes on the machine take does "
            "not count; a run with more idle cores may be faster). For the GPU estimate run the same command on "
            "the GPU machine (--device cuda)."
        )
    lines.append("")
    lines += [textwrap.fill(t, 118, initial_indent="- ", subsequent_indent="  ", break_on_hyphens=False) for t in notes]
    return "\n".join(lines)


def plan_command(
    profile: str,
    data_root: str = "data",
    runs_dir: str | None = None,
    device: str | None = None,
    devices: list[str] | None = None,
    jobs_per_device: int = 1,
    teachers_dir: str | None = None,
    schedule: dict[str, int] | None = None,
) -> str:
    """``kcd book --plan``: the plan as text. Without ``device`` the profile's is used, or the CPU when the
    profile's is a GPU this machine does not have (said on standard error)."""
    from .book import REPO
    from .options import device as resolve_device

    p = get_profile(profile)
    if device is None:
        device = (devices or [None])[0] or p.device
        if device.startswith("cuda") and not torch.cuda.is_available():
            print(f"kcd: profile '{p.name}' runs on {device}, which this machine lacks: timing on the CPU "
                  "(run the same command on the GPU machine for its estimate)", file=sys.stderr)  # fmt: skip
            device = "cpu"
    device = resolve_device(device)
    runs_dir = str(Path(runs_dir or REPO / "runs").resolve())
    session = artefacts.setup(p, runs_dir, data_root, device, devices=devices, jobs_per_device=jobs_per_device,
                              teachers_dir=teachers_dir, **(schedule or {}))  # fmt: skip
    frame = plan(session.profile, session.store, devices=session.devices, jobs_per_device=session.jobs_per_device,
                 echo=lambda line: print(f"kcd: {line}", file=sys.stderr))  # fmt: skip
    return format_plan(frame)
