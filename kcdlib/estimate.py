"""How long a build's runs take: a few training steps timed on this device, an extrapolation to a GPU from the
figures measured there, and a simulation of how ``kcd book`` schedules runs on devices.

:func:`time_steps` times the real trainer (:func:`kcdlib.trainers.build_trainer`) over synthetic images of a
dataset's size and class count; :func:`run_seconds` multiplies a step's cost by the samples a run processes.
:func:`gpu_run_seconds` scales the one pair measured on a GPU (:func:`figures`, read from :data:`FIGURES`, which
``benchmarks/gpu_check.sh`` writes) to any pair. What the estimates leave out is said in :data:`ESTIMATE_NOTES`
and :func:`gpu_notes`, which the printed plan repeats.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import artefacts, condense, cost, files, models
from . import data as datasets
from .data import DeviceDataset
from .errors import KcdError
from .identity import RunConfig, with_teachers
from .profiles import Profile, get_profile
from .recipe import Recipe
from .train import evaluate
from .trainers import build_trainer

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

# -- the measured GPU figures ------------------------------------------------------------------------------------
# In the package, not in benchmarks/: `kcd book --plan` and the Slurm time limits read it from an installed kcdlib.
FIGURES = Path(__file__).with_name("gpu_figures.json")
FORMAT = "kcd-gpu-figures/1"
# Every figure says where it came from; the measured fields of each, and their types.
PROVENANCE = {"card": str, "torch": str, "date": str, "command": str, "source": str}
MEASURED = {
    "epoch": {"teacher": str, "student": str, "batch_size": int, "precision": str, "compile": str, "images": int,
              "seconds": float},
    "concurrency": {"precision": str, "compile": str, "processes": int, "steps_each": int,
                    "single_images_per_second": float, "group_images_per_second": float, "overlap_fraction": float},
}  # fmt: skip
# The estimate is of the book's defaults (fp32, eager steps): figures measured otherwise would not describe them.
BOOK_SETTING = {"precision": "fp32", "compile": "off"}
EVAL_BATCH = 256  # kcdlib.train.evaluate's batch: an evaluation launches fewer kernels per image than a step


class FiguresError(KcdError):
    """The GPU figures file is missing, damaged or not of the setting the estimate extrapolates."""


@dataclass(frozen=True)
class GpuFigures:
    """The measured figures: a ``teacher -> student`` pair's seconds per image of an eager fp32 KD epoch on
    ``card`` at ``batch_size``, and the throughput of ``jobs`` runs at once relative to one (``{1: 1.0, n: x}``)."""

    card: str
    teacher: str
    student: str
    batch_size: int
    seconds_per_image: float
    concurrency: dict[int, float]
    date: str


def check_figures(data: Any, where: str) -> GpuFigures:
    """The figures of the parsed file ``data``; a :class:`FiguresError` naming the first thing wrong."""

    def bad(problem: str) -> FiguresError:
        return FiguresError(f"{where}: {problem} (the GPU figures the plan extrapolates from: benchmarks/"
                            "gpu_check.sh writes them on a GPU)")  # fmt: skip

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise bad(f"not a {FORMAT} file")
    for name, fields in MEASURED.items():
        entry = data.get(name)
        if not isinstance(entry, dict):
            raise bad(f"no '{name}' figure")
        for key, kind in {**PROVENANCE, **fields}.items():
            value = entry.get(key)
            if kind is str:
                ok = isinstance(value, str) and value != ""
            else:
                ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
            if not ok:
                raise bad(f"'{name}.{key}' must be {'a text' if kind is str else 'a positive number'}, got {value!r}")
            if kind is int and value != int(value):
                raise bad(f"'{name}.{key}' must be a whole number, got {value!r}")
        if not re.fullmatch(r"\d{4}-\d\d-\d\d", entry["date"]):
            raise bad(f"'{name}.date' must be YYYY-MM-DD, got {entry['date']!r}")
        if {k: entry[k] for k in BOOK_SETTING} != BOOK_SETTING:
            raise bad(f"'{name}' was measured at precision {entry['precision']}, compile {entry['compile']}: the "
                      "estimate is of the book's defaults, fp32 and eager steps (compile off)")  # fmt: skip
    epoch, conc = data["epoch"], data["concurrency"]
    if epoch["card"] != conc["card"]:
        raise bad(f"the epoch was measured on {epoch['card']}, the concurrency on {conc['card']}: one card")
    for role in ("teacher", "student"):
        if epoch[role] not in models.ARCHS:
            raise bad(f"'epoch.{role}' is not an architecture of kcdlib.models: {epoch[role]!r}")
    if int(conc["processes"]) < 2 or conc["overlap_fraction"] > 1:
        raise bad("'concurrency' needs at least 2 processes and an overlap fraction of at most 1")
    ratio = conc["group_images_per_second"] / conc["single_images_per_second"]
    return GpuFigures(epoch["card"], epoch["teacher"], epoch["student"], int(epoch["batch_size"]),
                      epoch["seconds"] / epoch["images"], {1: 1.0, int(conc["processes"]): ratio},
                      epoch["date"])  # fmt: skip


@functools.cache
def figures(path: Path = FIGURES) -> GpuFigures:
    """The GPU figures in ``path`` (strict JSON, checked by :func:`check_figures`)."""
    try:
        data = files.read_json(path, max_bytes=1 << 20)
    except files.BadFile as err:
        raise FiguresError(f"{path}: {err}") from None
    except OSError as err:
        raise FiguresError(f"{path}: cannot read the GPU figures ({err.strerror or err})") from None
    return check_figures(data, str(path))


def gpu_notes() -> str:
    """What the GPU column is: the figures it scales and what it leaves out."""
    f = figures()
    top = max(f.concurrency)
    return (
        f"{f.card} column: an extrapolation from ONE measured pair ({FIGURES.name}, {f.date}: {f.teacher} -> "
        f"{f.student}, KD, fp32 eager, batch {f.batch_size}: {f.seconds_per_image * 50_000:.2f} s per 50,000 "
        f"images; {top} concurrent runs {f.concurrency[top]:.2f}x one), each pair scaled by its multiply-adds "
        "(3 Fs + Ft) or its layer count (eager steps are launch-bound there), whichever is slower; a distiller's own "
        f"cost (CRD's negatives, PKT's similarities) is not counted; concurrency is interpolated linearly between 1 "
        f"and {top} jobs, and jobs beyond {top} are assumed to add nothing."
    )


# -- concurrency ---------------------------------------------------------------------------------------------
def concurrency_speedup(jobs: int, device_type: str = "cuda") -> float:
    """Throughput of ``jobs`` runs at once on one device, relative to one run alone: on CUDA the measured gain
    (:func:`figures`), linear in between and none beyond the jobs measured; on a CPU 1 (the runs share its cores)."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    if device_type != "cuda":
        return 1.0
    measured = figures().concurrency
    top = max(measured)
    if jobs >= top:
        return measured[top]
    return 1.0 + (measured[top] - 1.0) * (jobs - 1) / (top - 1)


def efficiency(jobs: int, device_type: str = "cuda") -> float:
    """Per-job efficiency of ``jobs`` concurrent runs: :func:`concurrency_speedup` / ``jobs``."""
    return concurrency_speedup(jobs, device_type) / jobs


def simulate_wall(
    groups: Sequence[Sequence[Sequence[float]]], devices: int, jobs: int, speedup: Callable[[int], float]
) -> float:
    """Wall time of phases of jobs run one phase after another, each phase's jobs ``jobs`` at a time on each of
    ``devices``, a device with ``a`` jobs running each at ``speedup(a) / a`` of its speed alone. ``groups`` are
    lists of phases, a phase a list of the jobs' seconds alone (:func:`notebook_phases`)."""
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


def notebook_phases(p: Profile, to_train: set[str], seconds: dict[str, float]) -> list[list[list[float]]]:
    """For :func:`simulate_wall`: per notebook, the seconds of the runs still to train when it runs, its teachers
    first (as :func:`kcdlib.parallel.ensure_all`), then the rest."""
    done: set[str] = set()
    groups = []
    for configs in artefacts.notebook_runs(p).values():
        missing = [c for c in configs if c.options_hash in to_train and c.options_hash not in done]
        teachers = artefacts.unique(c.teacher for c in missing if c.teacher is not None)
        teachers = [t for t in teachers if t.options_hash in to_train and t.options_hash not in done]
        done |= {t.options_hash for t in teachers}
        rest = [c for c in missing if c.options_hash not in done]
        done |= {c.options_hash for c in rest}
        groups.append([[seconds[c.options_hash] for c in teachers], [seconds[c.options_hash] for c in rest]])
    return groups


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
    epochs = cfg.recipe.epochs
    seconds = epochs * spec.num_train * train_fraction(cfg) * c.step
    if cfg.method == "unix":
        seconds += epochs * spec.num_train * c.student_forward
    return seconds + epochs * spec.num_test * c.evaluate


@functools.cache
def arch_cost(arch: str, dataset: str) -> tuple[int, int]:
    """``(forward multiply-adds per image, layers)`` of ``arch`` at ``dataset``'s image size; layers counts the
    convolutions, batch norms and linear layers (a proxy for the kernels a step launches)."""
    spec = datasets.spec(dataset)
    model = models.create(arch, spec.num_classes)
    layers = sum(isinstance(m, torch.nn.Conv2d | torch.nn.BatchNorm2d | torch.nn.Linear) for m in model.modules())
    return cost.forward_macs(model, (3, spec.image_size, spec.image_size)), layers


def student_share(teacher: str | None, student: str, dataset: str) -> float:
    """A student forward's share of a training step's multiply-adds: ``Fs / (3 Fs + Ft)``."""
    fs = arch_cost(student, dataset)[0]
    ft = arch_cost(teacher, dataset)[0] if teacher else 0
    return fs / (3 * fs + ft)


def _teacher_arch(cfg: RunConfig) -> str | None:
    return cfg.teacher_arch if cfg.kind == "distill" else None


# -- the GPU extrapolation -----------------------------------------------------------------------------------
def gpu_step_cost(teacher: str | None, student: str, dataset: str) -> StepCost:
    """Seconds per sample on the measured card: the measured pair's seconds per image x the larger of two ratios
    to that pair, multiply-adds ``3 Fs + Ft`` (student forward and backward, teacher forward) and layers
    ``3 Ls + Lt`` (the launches of an eager step, which bound it there at these batch sizes)."""
    f = figures()
    ref_t, ref_s = arch_cost(f.teacher, "cifar100"), arch_cost(f.student, "cifar100")
    ref_macs, ref_layers = 3 * ref_s[0] + ref_t[0], 3 * ref_s[1] + ref_t[1]
    fs, ls = arch_cost(student, dataset)
    ft, lt = arch_cost(teacher, dataset) if teacher else (0, 0)
    base = f.seconds_per_image
    step = base * max((3 * fs + ft) / ref_macs, (3 * ls + lt) / ref_layers)
    forward = base * max(fs / ref_macs, ls / ref_layers)
    evaluate_ = base * max(fs / ref_macs, ls / ref_layers / (EVAL_BATCH / f.batch_size))
    return StepCost(step, forward, evaluate_)


def gpu_run_seconds(cfg: RunConfig) -> float:
    """One run's time alone on the measured card, EXTRAPOLATED (:func:`gpu_step_cost`), not measured; the method's
    fraction and evaluation as in :func:`run_seconds`. Data loading is not counted (ImageNet's JPEG decoding
    would likely dominate there), nor a distiller's own cost (CRD's memory bank, PKT's similarities)."""
    return run_seconds(cfg, gpu_step_cost(_teacher_arch(cfg), cfg.arch, cfg.dataset))


def gpu_estimate(profile: str | Profile, jobs_per_device: int = 4, devices: int = 1) -> dict[str, float]:
    """A profile's whole book (every run, trained from nothing) on ``devices`` of the measured card with
    ``jobs_per_device`` runs at once on each, EXTRAPOLATED (:func:`gpu_run_seconds`, :func:`concurrency_speedup`).

    Returns ``runs``, ``epochs`` (summed over runs), ``device_s`` (the runs one after another), ``wall_s``
    (``device_s / (devices x jobs x efficiency)``: every slot always busy) and ``scheduled_s`` (the book's
    order: notebook by notebook, each notebook's teachers first, :func:`simulate_wall`)."""
    p = get_profile(profile)
    with cpu_threads(CPU_TIMING_THREADS):  # the multiply-add counts
        configs = with_teachers(artefacts.all_runs(p))
        seconds = {cfg.options_hash: gpu_run_seconds(cfg) for cfg in configs}
        groups = notebook_phases(p, set(seconds), seconds)
    total = sum(seconds.values())
    return {
        "runs": len(configs),
        "epochs": sum(cfg.recipe.epochs for cfg in configs),
        "device_s": total,
        "wall_s": total / (devices * concurrency_speedup(jobs_per_device)),
        "scheduled_s": simulate_wall(groups, devices, jobs_per_device, concurrency_speedup),
    }


# -- timing on this device ------------------------------------------------------------------------------------
# On a CPU a timed step is kept near this many multiply-adds (about a tenth of a second on one core), so that a
# plan of the paper profile (some 50 combinations, ImageNet's ResNet34 among them) is timed in about a minute.
CPU_STEP_MACS = 6e9
# Steps are timed on one CPU thread: on a shared machine two OpenMP threads spin against other processes and one
# step can take a hundred times as long (benchmarks/README.md times on one thread for the same reason).
CPU_TIMING_THREADS = 1


def timing_batch(batch_size: int, device: torch.device, macs_per_sample: float = 0.0) -> int:
    """The batch the steps are timed at: the recipe's on a GPU; on a CPU at most 16 and about
    :data:`CPU_STEP_MACS` per step (at least 2), the time then scaled per sample."""
    if device.type == "cuda":
        return batch_size
    fit = int(CPU_STEP_MACS // macs_per_sample) if macs_per_sample > 0 else 16
    return max(2, min(batch_size, 16, fit))


# The teachers of one plan, reused from one timing to the next (their weights do not change a step's time, and
# initialising them again would cost a good part of a CPU plan); :func:`forget_networks` empties it.
_TEACHERS: dict[tuple[str, int, str], torch.nn.Module] = {}


def _teacher(arch: str, classes: int, device: torch.device) -> torch.nn.Module:
    key = (arch, classes, str(device))
    if key not in _TEACHERS:
        net = models.create(arch, classes).to(device).eval()
        for param in net.parameters():
            param.requires_grad_(False)
        _TEACHERS[key] = net
    return _TEACHERS[key]


def forget_networks() -> None:
    _TEACHERS.clear()


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


def synthetic_data(dataset: str, n_test: int, device: torch.device) -> DeviceDataset:
    """Random uint8 images of ``dataset``'s size, class count and number of training points, on ``device``. The
    training images are one image seen ``N`` times (a view, no memory): a step's time does not depend on the
    pixels, and the distiller and method are built for the real ``N`` (CRD's negatives and memory)."""
    spec = datasets.spec(dataset)
    side, classes, n = spec.image_size, spec.num_classes, spec.num_train
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 3, side, side), generator=g, dtype=torch.uint8).to(device)
    labels = torch.randint(0, classes, (n,), generator=g).to(device)
    test = torch.randint(0, 256, (n_test, 3, side, side), generator=g, dtype=torch.uint8).to(device)
    test_labels = torch.randint(0, classes, (n_test,), generator=g).to(device)
    return DeviceDataset(dataset, classes, image.expand(n, -1, -1, -1), labels, test, test_labels,
                         pad=max(1, side // 8))  # fmt: skip


def time_steps(
    cfg: RunConfig, device: str | torch.device, warmup: int | None = None, steps: int = 3, budget_s: float = 0.3
) -> StepCost:
    """Seconds per sample of training steps of run ``cfg``'s networks and distiller on ``device``, the trainer
    built as the store builds it (:func:`kcdlib.trainers.build_trainer`) with plain KD as the method (a method's
    share of the samples is :func:`train_fraction`'s), fp32 and eager, at :func:`timing_batch`, on
    :func:`synthetic_data`; a teacher of random weights. ``warmup`` untimed steps (2 on a GPU, 1 on a CPU), then
    ``steps`` timed ones: on a GPU together, in wall time; on a CPU one at a time on :data:`CPU_TIMING_THREADS`
    thread, in the process's CPU time (other processes on the machine do not count), as many as fit
    ``budget_s`` (at least one), the median kept. Evaluation is timed on a synthetic test split of one
    evaluation batch (256 images on a GPU, the timing batch on a CPU)."""
    device = torch.device(device)
    teacher = _teacher_arch(cfg)
    macs = 3 * arch_cost(cfg.arch, cfg.dataset)[0] + (arch_cost(teacher, cfg.dataset)[0] if teacher else 0)
    batch = timing_batch(cfg.recipe.batch_size, device, macs)
    n_test = EVAL_BATCH if device.type == "cuda" else batch
    warmup = warmup if warmup is not None else (2 if device.type == "cuda" else 1)
    timed = dataclasses.replace(cfg, recipe=Recipe(1, batch_size=batch), method="kd", method_options=(),
                                precision="fp32")  # fmt: skip
    data = synthetic_data(cfg.dataset, n_test, device)
    classes = data.num_classes
    load = None if teacher is None else functools.partial(_teacher, teacher, classes, device)
    with cpu_threads(CPU_TIMING_THREADS):
        trainer = build_trainer(timed, data, device, load, compile="off", group=None, progress=False)
        net = trainer.student
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
    return StepCost(step, step * student_share(teacher, cfg.arch, cfg.dataset), per_test, batch)
