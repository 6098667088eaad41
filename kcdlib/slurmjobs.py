"""Watching the Slurm jobs of a build (:mod:`kcdlib.cluster` submits them): which runs earlier jobs still train,
each job's state and end, one line of counts while they run, and a report of the failed ones with their logs."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import files
from .identity import RunConfig

# Slurm states of a job that ended (without submitit's result file: it died without saying why).
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "DEADLINE", "BOOT_FAIL",
         "SPECIAL_EXIT"}  # fmt: skip
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD", "SUSPENDED"}


@dataclass
class Submitted:
    """A job of a build: its submitit job, the runs it trains, and their folders in the store."""

    job: Any
    configs: list[RunConfig]
    folders: list[Path]
    role: str  # "teachers" or "students"
    depends_on: list[str] = field(default_factory=list)

    @property
    def job_id(self) -> str:
        return str(self.job.job_id)


def describe_runs(configs: Sequence[RunConfig]) -> str:
    from .artefacts.session import describe

    return "; ".join(describe(c) for c in configs)


# Which Slurm job trains which run, for a later kcd book (run hash -> job id), in submitit's folder.
SUBMITTED_FILE = "submitted.json"


def remember(logs: str, jobs: dict[str, str]) -> None:
    """Add ``jobs`` (run hash -> job id) to the runs submitted before."""
    path = Path(logs) / SUBMITTED_FILE
    known = _read_submitted(path)
    files.atomic_write(path, (json.dumps({**known, **jobs}, indent=1) + "\n").encode())


def _read_submitted(path: Path) -> dict[str, str]:
    try:
        known = files.read_json(path)
    except (OSError, ValueError):  # missing, or not strict JSON (files.BadFile)
        return {}
    return (
        {k: v for k, v in known.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(known, dict) else {}
    )


def in_flight(logs: str) -> dict[str, str]:
    """The runs (hash -> job id) of jobs submitted before that Slurm still lists as queued or running."""
    known = _read_submitted(Path(logs) / SUBMITTED_FILE)
    states = slurm_states(sorted(set(known.values())))
    return {run: job for run, job in known.items() if states.get(job) and states[job] not in ENDED}


def wait_in_flight(logs: str, echo: Callable[[str], None], poll_s: float) -> None:
    """Wait for the jobs of an earlier ``kcd book`` still queued or running (one line when their count changes)."""
    shown = -1
    while busy := in_flight(logs):
        jobs = sorted(set(busy.values()))
        if len(jobs) != shown:
            echo(f"slurm: waiting for {len(jobs)} jobs submitted before ({', '.join(jobs)}) training {len(busy)} runs")
            shown = len(jobs)
        time.sleep(poll_s)


def slurm_states(job_ids: Sequence[str]) -> dict[str, str]:
    """Slurm's state of each job (array tasks as ``<array id>_<task>``); jobs Slurm no longer knows are absent."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    if not arrays:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", ",".join(arrays)],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    states = {}
    for line in out.stdout.splitlines():
        job, _, state = line.strip().partition("|")
        states[job] = state.split()[0] if state else ""
    return states


@dataclass
class Outcome:
    """A job's end: ``ok``, or the reason it failed and the end of its log."""

    ok: bool
    why: str = ""
    log_tail: str = ""


def outcome(s: Submitted, state: str | None) -> Outcome | None:
    """The job's end when it ended (None while queued or running): submitit's result file says, else Slurm's
    state (a job that died without a result, or a student cancelled because its teacher failed)."""
    job = s.job
    if job.paths.result_pickle.exists():
        try:
            job.result()
            return Outcome(True)
        except Exception as err:  # noqa: BLE001 - the job's own exception, as submitit gives it back
            return Outcome(False, exception_line(str(err)) or type(err).__name__, log_tail(job))
    if state in ENDED:
        why = f"Slurm ended it as {state} without a result"
        if state == "CANCELLED" and s.depends_on:
            why += f" (it waited for teacher job {', '.join(s.depends_on)}, which failed)"
        return Outcome(False, why, log_tail(job))
    return None


def exception_line(traceback: str) -> str:
    """The line of a traceback that names the exception (``CheckpointError: ...``), shortened."""
    lines = [line.strip() for line in traceback.strip().splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b.*", line)]
    line = (named or lines or [""])[-1]
    return line if len(line) <= 300 else line[:297] + "..."


def log_tail(job, lines: int = 8) -> str:
    text = ""
    for path in (job.paths.stderr, job.paths.stdout):
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        if text.strip():
            break
    return "\n".join(text.strip().splitlines()[-lines:])


def wait(
    submitted: Sequence[Submitted], echo: Callable[[str], None] = print, poll_s: float = 5.0, gone_s: float = 120.0
) -> dict[str, Outcome]:
    """Wait until every job ended, printing ``slurm: 2 queued, 1 running, 5 done, 0 failed`` whenever the counts
    change. Returns each job's :class:`Outcome` by job id; failures do not stop the others. A job Slurm no longer
    lists and that left no result for ``gone_s`` counts as failed."""
    ended: dict[str, Outcome] = {}
    unseen_since: dict[str, float] = {}
    shown = ""
    while True:
        states = slurm_states([s.job_id for s in submitted if s.job_id not in ended])
        counts = {"queued": 0, "running": 0}
        for s in submitted:
            if s.job_id in ended:
                continue
            state = states.get(s.job_id)
            end = outcome(s, state)
            if end is None and state is None:
                first = unseen_since.setdefault(s.job_id, time.monotonic())
                if time.monotonic() - first > gone_s:
                    end = Outcome(False, "Slurm no longer lists it and it left no result", log_tail(s.job))
            if end is not None:
                ended[s.job_id] = end
            elif state in QUEUED:
                counts["queued"] += 1
            else:
                counts["running"] += 1
        done = sum(o.ok for o in ended.values())
        line = (f"slurm: {counts['queued']} queued, {counts['running']} running, {done} done, "
                f"{len(ended) - done} failed ({len(submitted)} jobs)")  # fmt: skip
        if line != shown:
            echo(line)
            shown = line
        if len(ended) == len(submitted):
            return ended
        time.sleep(poll_s)


def failure_report(submitted: Sequence[Submitted], outcomes: dict[str, Outcome]) -> str:
    """Each failed job: its runs, its job id, why, and the end of its log."""
    parts = []
    for s in submitted:
        o = outcomes.get(s.job_id)
        if o is None or o.ok:
            continue
        runs = ", ".join(f"{describe_runs([c])} ({f.name})" for c, f in zip(s.configs, s.folders))
        tail = "\n".join("    " + line for line in o.log_tail.splitlines())
        parts.append(f"job {s.job_id} failed: {o.why}\n  runs: {runs}\n  log {s.job.paths.stderr}:\n{tail}")
    return "\n".join(parts)
