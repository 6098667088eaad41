"""The runs of a build on a Slurm cluster, through submitit: ``kcd book --executor slurm``.

The cluster's own scheduler spreads the runs, driven by submitit (the library the field uses to submit Python
functions to Slurm), not a scheduler of ours. :func:`submit` turns the runs the store lacks into Slurm jobs:

- **teachers first**: the missing teacher runs are one job array; each student job waits for the teacher jobs it
  needs with a Slurm dependency (``afterok``, ``kill_on_invalid_dep``: a student whose teacher failed is cancelled,
  not left pending), not a process waiting on a run's lock on a GPU;
- **packing**: small runs (CIFAR, digits) go ``jobs_per_device`` to a one-GPU job, trained side by side by the
  local pool (:func:`kcdlib.parallel.ensure_all`), as ``--jobs-per-device`` does on one machine;
- **large runs** (ImageNet, :data:`WHOLE_NODE_DATASETS`) are one job of ``gpus_per_node`` tasks, one per GPU:
  submitit exports torchrun's variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...) and the run trains as it
  does under torchrun (:mod:`kcdlib.distributed`: the same run, the same record);
- **preemption and time limits** lose nothing: a job is checkpointable in submitit's sense (it has the
  ``checkpoint`` method :class:`submitit.helpers.Checkpointable` provides; not that class itself, so that
  importing kcdlib does not import submitit); when Slurm signals it (``USR2``, ``slurm_signal_delay_s`` before its
  time limit, or on preemption) submitit requeues it, and the requeued job asks the run store for its runs again,
  which resumes each from its last checkpoint.

The time limit of a job is the plan's GPU estimate of its runs (:func:`kcdlib.estimate.gpu_run_seconds`) times
:data:`TIME_MARGIN`, at least :data:`MIN_TIME_MIN`, unless ``time_min`` is given. While the jobs run, one line of
queued/running/done/failed counts is printed whenever they change, and at the end each failed run is named with
its job id and the end of its log (:mod:`kcdlib.slurmjobs`); the other jobs go on.

Several nodes share one run store: it must be on a file system where the run lock (``flock``) holds across nodes
(:func:`kcdlib.sharedfs.check_lock`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .buildoptions import BuildOptions
from .errors import BadOption, KcdError
from .identity import RunConfig, with_teachers
from .runs import RunStore
from .slurmjobs import Submitted, failure_report, in_flight, remember, wait, wait_in_flight

# Runs that need a whole node of GPUs (trained under torchrun's rules inside the allocation).
WHOLE_NODE_DATASETS = ("imagenet",)
# A job's time limit: its runs' estimated time times this, never under MIN_TIME_MIN minutes.
TIME_MARGIN = 2.0
MIN_TIME_MIN = 30


class SlurmError(KcdError):
    """Slurm cannot be used (no sbatch), refused a job, or runs failed on it."""


@dataclass(frozen=True)
class SlurmOptions:
    """What a Slurm user sets for the jobs of a build. ``logs`` is submitit's folder (job pickles and logs): it
    must be on a file system the nodes share, not /tmp. ``sbatch`` holds extra ``--key=value`` options."""

    logs: str
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_node: int = 1
    cpus_per_job: int | None = None
    mem_gb: float | None = None
    time_min: int | None = None
    array_parallelism: int = 32
    sbatch: tuple[str, ...] = ()
    signal_delay_s: int = 120
    max_requeues: int = 8

    def extra(self) -> dict[str, str | bool]:
        """``sbatch`` as submitit's ``additional_parameters`` (``--mail-type=END`` -> ``mail_type: END``, a flag
        such as ``--exclusive`` -> ``exclusive: True``)."""
        out: dict[str, str | bool] = {}
        for option in self.sbatch:
            key, sep, value = option.partition("=")
            if not key.startswith("--") or len(key) < 3 or (sep and not value):
                raise BadOption(f"an extra sbatch option is --key=value or --flag, got '{option}'")
            out[key[2:].replace("-", "_")] = value if sep else True
        return out


class RunJob:
    """One Slurm job: the run store's ``ensure`` of its runs. Requeued, it is called again and every run resumes
    from its last checkpoint (the store's own guarantee), so a requeue is nothing but this call once more."""

    def __init__(self, configs: Sequence[RunConfig], store: dict[str, Any], jobs_per_device: int, ranks: int):
        self.configs = list(configs)
        self.store = store  # RunStore's arguments: root, data_root, device, compile, stale
        self.jobs_per_device = jobs_per_device
        self.ranks = ranks

    def __call__(self) -> list[str]:
        import torch

        # The CPUs Slurm gave the task (one when none were asked for): more threads than that spin against the
        # other jobs of the node.
        cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        torch.set_num_threads(max(1, cpus // max(1, self.jobs_per_device)))
        if self.ranks > 1:
            return self._distributed()
        if self.jobs_per_device > 1 and len(self.configs) > 1:
            from .parallel import ensure_all

            s = self.store
            devices = [s["device"]]
            recs = ensure_all(self.configs, s["root"], s["data_root"], devices, self.jobs_per_device, False,
                              s["compile"], s["stale"])  # fmt: skip
            return [r["hash"] for r in recs]
        store = RunStore(**self.store)
        return [store.ensure(cfg, progress=False)["hash"] for cfg in self.configs]

    def _distributed(self) -> list[str]:
        """This task's part of one run, under torchrun's rules: submitit exports RANK, WORLD_SIZE, MASTER_ADDR."""
        import submitit

        from . import distributed

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        group = distributed.from_env(self.store["device"].split(":")[0])
        try:
            store = RunStore(**{**self.store, "device": str(group.device)}, group=group)
            return [store.ensure(cfg, progress=False)["hash"] for cfg in self.configs]
        finally:
            distributed.close()

    def checkpoint(self, *args, **kwargs):
        """Requeue with the same runs: the store holds the state (its checkpoints), nothing else to save."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def job_minutes(configs: Sequence[RunConfig], jobs_per_device: int, options: SlurmOptions) -> int:
    """The job's time limit: ``options.time_min``, or its runs' estimated GPU time (packed runs share a GPU at
    the measured concurrency) times :data:`TIME_MARGIN`, at least :data:`MIN_TIME_MIN`."""
    if options.time_min is not None:
        return options.time_min
    from .estimate import concurrency_speedup, gpu_run_seconds

    seconds = sum(gpu_run_seconds(c) for c in configs) / concurrency_speedup(min(jobs_per_device, len(configs)))
    return max(MIN_TIME_MIN, math.ceil(TIME_MARGIN * seconds / 60))


def check_slurm() -> None:
    from shutil import which

    missing = [tool for tool in ("sbatch", "squeue", "scontrol") if which(tool) is None]
    if missing:
        raise SlurmError(f"--executor slurm needs Slurm's {', '.join(missing)} on the PATH of this machine "
                         "(a login node of the cluster)")  # fmt: skip


def _executor(options: SlurmOptions, name: str, minutes: int, ranks: int, depends: list[str]):
    import submitit

    Path(options.logs).mkdir(parents=True, exist_ok=True)
    ex = submitit.SlurmExecutor(folder=str(Path(options.logs) / "%j"), max_num_timeout=options.max_requeues)
    params = dict(
        job_name=name, time=minutes, nodes=1, ntasks_per_node=ranks, signal_delay_s=options.signal_delay_s,
        array_parallelism=options.array_parallelism, partition=options.partition, account=options.account,
        qos=options.qos, cpus_per_task=options.cpus_per_job, mem=f"{options.mem_gb}G" if options.mem_gb else None,
    )  # fmt: skip
    params = {k: v for k, v in params.items() if v is not None}
    if options.gpus_per_node > 0:  # 0: CPU jobs (a cluster without GPUs, the test suite's Slurm)
        params["gpus_per_node"] = ranks
    extra = options.extra()
    if depends:
        params["dependency"] = "afterok:" + ":".join(depends)
        extra["kill_on_invalid_dep"] = "yes"
    ex.update_parameters(**params, additional_parameters=extra)
    return ex


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def submit(
    configs: Sequence[RunConfig],
    store: RunStore,
    options: SlurmOptions,
    jobs_per_device: int = 1,
    echo: Callable[[str], None] = print,
) -> list[Submitted]:
    """Submit the runs of ``configs`` (and their teachers) that ``store`` lacks; returns the jobs (none when the
    store holds every run). Teachers come first (one array); each student job depends on its teachers' jobs."""
    check_slurm()
    from .sharedfs import check_lock

    check_lock(store.root)
    check_lock(options.logs)
    missing = [c for c in with_teachers(configs) if store.record(c) is None]
    # A run in a job submitted before (kcd book --no-wait, then kcd book again) is not submitted twice.
    busy = in_flight(options.logs)
    missing = [c for c in missing if store.run_hash(c) not in busy]
    if not missing:
        return []
    # Jobs with GPUs train on them, whatever device this (login) node looked the runs up with: a run's identity
    # does not depend on its device, so `kcd book --device cpu --executor slurm` on a node without CUDA works.
    device = "cuda" if options.gpus_per_node > 0 else str(store.device)
    args = {"root": str(Path(store.root).resolve()), "data_root": str(Path(store.data_root).resolve()),
            "device": device, "compile": store.compile, "stale": store.stale}  # fmt: skip
    teacher_set = {c.teacher for c in missing if c.teacher is not None and c.teacher in missing}
    teachers = [c for c in missing if c in teacher_set]
    students = [c for c in missing if c not in teacher_set]
    submitted: list[Submitted] = []
    job_of: dict[RunConfig, Submitted] = {}

    def array(groups: list[list[RunConfig]], role: str, ranks: int, depends: list[str]) -> None:
        minutes = max(job_minutes(g, jobs_per_device, options) for g in groups)
        ex = _executor(options, f"kcd-{role}", minutes, ranks, depends)
        try:
            with ex.batch():
                jobs = [ex.submit(RunJob(g, args, jobs_per_device if ranks == 1 else 1, ranks)) for g in groups]
        except Exception as err:  # noqa: BLE001 - submitit raises what sbatch said, as a plain error
            raise SlurmError(f"sbatch refused the {role} jobs: {str(err).strip().splitlines()[-1]}") from None
        for job, group in zip(jobs, groups):
            s = Submitted(job, group, [store.path(c) for c in group], role, depends)
            submitted.append(s)
            for cfg in group:
                job_of[cfg] = s

    def packed(runs: list[RunConfig]) -> dict[int, list[list[RunConfig]]]:
        """Jobs by their task count: a whole-node run alone on ``gpus_per_node`` tasks, small runs packed."""
        ranks = max(1, options.gpus_per_node)
        whole = [c for c in runs if c.dataset in WHOLE_NODE_DATASETS and ranks > 1]
        small = [c for c in runs if c not in whole]
        jobs = {}
        if small:
            jobs[1] = chunks(small, jobs_per_device)
        if whole:
            jobs[ranks] = [[c] for c in whole]
        return jobs

    for ranks, groups in packed(teachers).items():
        array(groups, "teachers", ranks, [])
    # Students grouped by the teacher jobs they wait for: one array per group, so each waits only for its own.
    by_deps: dict[tuple[str, ...], list[RunConfig]] = {}
    for cfg in students:
        deps = (job_of[cfg.teacher].job_id,) if cfg.teacher in job_of else ()
        by_deps.setdefault(deps, []).append(cfg)
    for deps, runs in by_deps.items():
        for ranks, groups in packed(runs).items():
            array(groups, "students", ranks, list(deps))
    remember(options.logs, {folder.name: s.job_id for s in submitted for folder in s.folders})
    echo(f"slurm: submitted {len(submitted)} jobs for {len(missing)} runs ({len(teachers)} teachers first); "
         f"logs in {options.logs}")  # fmt: skip
    return submitted


def ensure_on_slurm(
    configs: Sequence[RunConfig],
    store: RunStore,
    options: SlurmOptions,
    jobs_per_device: int = 1,
    wait_for_jobs: bool = True,
    echo: Callable[[str], None] = print,
    poll_s: float = 5.0,
) -> list[Submitted]:
    """Submit what the store lacks and (unless ``wait_for_jobs`` is false) wait for it; raises
    :class:`SlurmError` naming every failed run, after all jobs have ended."""
    if wait_for_jobs:
        check_slurm()
        wait_in_flight(options.logs, echo, poll_s)
    submitted = submit(configs, store, options, jobs_per_device, echo)
    if not submitted or not wait_for_jobs:
        return submitted
    outcomes = wait(submitted, echo, poll_s)
    report = failure_report(submitted, outcomes)
    if report:
        failed = sum(not o.ok for o in outcomes.values())
        raise SlurmError(f"{failed} of {len(submitted)} Slurm jobs failed (the others finished; run the same "
                         f"command again to retry the failed ones):\n{report}")  # fmt: skip
    return submitted


# -- the command line: kcd book --executor slurm ---------------------------------------------------------------
def add_options(parser, at_least) -> None:
    """``kcd book``'s executor options (here, beside what they drive, so the command line only adds a call);
    ``at_least(n)``: the command line's argparse type of a whole number no smaller than ``n``."""
    parser.add_argument("--executor", choices=("local", "slurm"), default="local", help="where missing runs train: "
                        "local (default: this machine's --devices) or slurm (submitted through submitit)")  # fmt: skip
    parser.add_argument("--no-wait", action="store_true", help="with --executor slurm: submit and exit; run the "
                        "same kcd book again to render once the runs are in the store")  # fmt: skip
    g = parser.add_argument_group("Slurm (--executor slurm; see README, 'A Slurm cluster')")
    g.add_argument("--partition", help="Slurm partition")
    g.add_argument("--account", help="Slurm account")
    g.add_argument("--qos", help="Slurm quality of service")
    g.add_argument("--gpus-per-node", type=at_least(0), default=1, help="GPUs of an ImageNet job (one run under "
                   "torchrun's rules on all of them; default 1); CIFAR jobs take one. 0: CPU jobs")  # fmt: skip
    g.add_argument("--cpus-per-job", type=at_least(1), help="CPUs per task (default: the partition's)")
    g.add_argument("--mem-gb", type=float, help="memory per job in GB (default: the partition's)")
    g.add_argument("--time-min", type=at_least(1), help=f"time limit per job in minutes (default: the plan's GPU "
                   f"estimate x {TIME_MARGIN:g}, at least {MIN_TIME_MIN})")  # fmt: skip
    g.add_argument("--array-parallelism", type=at_least(1), default=32, help="array jobs running at once (32)")
    g.add_argument("--sbatch", action="append", default=[], metavar="--KEY=VALUE",
                   help="an extra sbatch option (repeatable), e.g. --sbatch=--constraint=h100")  # fmt: skip
    g.add_argument("--slurm-logs", help="submitit's folder (job files and logs), on a file system the nodes share "
                   "(default: slurm-logs/ beside the run store)")  # fmt: skip


def options_from_args(args, runs_dir: Path) -> SlurmOptions:
    logs = args.slurm_logs or str(Path(runs_dir).resolve().parent / "slurm-logs")
    return SlurmOptions(
        logs=logs, partition=args.partition, account=args.account, qos=args.qos, gpus_per_node=args.gpus_per_node,
        cpus_per_job=args.cpus_per_job, mem_gb=args.mem_gb, time_min=args.time_min,
        array_parallelism=args.array_parallelism, sbatch=tuple(args.sbatch),
    )  # fmt: skip


def book_runs(build: BuildOptions, names: Sequence[str]):
    """The runs the notebooks ``names`` ask for in the build ``build``, and the store they are looked up in."""
    from . import artefacts

    session = artefacts.setup(build)
    configs = []
    for name in names:
        a = artefacts.get(name)
        configs += a.runs(a.notebook_profile(session.profile))
    return artefacts.unique(configs), session.store


def runs_before_notebooks(build: BuildOptions, names: Sequence[str], slurm, wait: bool, from_records: bool,
                          echo: Callable[[str], None]) -> bool:  # fmt: skip
    """``kcd book``'s runs before its notebooks: ``from_records``, every run checked to be in the store; with
    ``slurm``, the missing ones trained on the cluster. False when the jobs were submitted without waiting."""
    from .archive import check_complete, recorded_env
    from .artefacts.session import describe

    with recorded_env(from_records):
        configs, store = book_runs(build, names)
        if from_records:
            check_complete(configs, store, describe)
            datasets = ", ".join(sorted(store.recorded_fingerprints))
            echo(f"rendering from the records in {store.root}: the data fingerprints and the code are the recorded "
                 f"ones ({datasets}; code {store.code}), nothing is trained")  # fmt: skip
            return True
    submitted = ensure_on_slurm(configs, store, slurm, build.jobs_per_device, wait, echo)
    if submitted and not wait:
        echo("slurm: submitted; run the same kcd book again to render the book once the jobs have finished")
        return False
    return True
