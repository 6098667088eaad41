"""Several runs at once: ``jobs_per_device`` worker processes on each of ``devices``.

Small CIFAR networks at batch 64 leave most of an accelerator idle, so running a table's runs side by side is
the cheapest speed-up there is. Each worker process owns one device slot and its own :class:`RunStore` (so a
dataset is loaded onto its device once per worker); every run still writes its own record, and the run store's
file lock keeps two workers from training the same run. Teachers are ensured before the students that need them.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from .identity import RunConfig
from .runs import RunStore

_store: RunStore | None = None


def _die_with_parent() -> None:
    """A worker must not train on when the process that started it is gone (kcd book killed, a notebook's kernel
    stopped): Linux sends it SIGTERM then (PR_SET_PDEATHSIG). Elsewhere nothing is set."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _init_worker(slots, runs_dir: str, data_root: str, threads: int, compile: str, stale: str) -> None:
    global _store
    _die_with_parent()
    torch.set_num_threads(threads)
    _store = RunStore(runs_dir, data_root, slots.get(), compile, stale)


def _ensure_one(cfg: RunConfig) -> dict[str, Any]:
    return _store.ensure(cfg, progress=False)


def ensure_all(
    configs: list[RunConfig],
    runs_dir: str,
    data_root: str = "data",
    devices: list[str] | None = None,
    jobs_per_device: int = 1,
    progress: bool = True,
    compile: str = "off",
    stale: str = "stop",
) -> list[dict[str, Any]]:
    """The records of ``configs`` (in order), training the missing ones ``jobs_per_device`` at a time on each
    of ``devices`` (default: ``['cpu']``)."""
    devices = devices or ["cpu"]
    if jobs_per_device < 1:
        raise ValueError("jobs_per_device must be at least 1")
    workers = len(devices) * jobs_per_device
    unique = list(dict.fromkeys(configs))
    if workers == 1:
        store = RunStore(runs_dir, data_root, devices[0], compile, stale)
        done = {cfg: store.ensure(cfg, progress=False) for cfg in _with_bar(unique, progress)}
        return [done[cfg] for cfg in configs]
    teachers = list(dict.fromkeys(cfg.teacher for cfg in unique if cfg.teacher is not None))
    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    slots = ctx.Manager().Queue()
    for device in devices:
        for _ in range(jobs_per_device):
            slots.put(device)
    threads = max(1, (os.cpu_count() or 1) // workers)
    done: dict[RunConfig, dict[str, Any]] = {}
    init = (slots, str(runs_dir), data_root, threads, compile, stale)
    with ProcessPoolExecutor(workers, ctx, _init_worker, init) as pool:
        for batch in (teachers, unique):
            todo = [cfg for cfg in batch if cfg not in done]
            for cfg, rec in zip(todo, _with_bar(pool.map(_ensure_one, todo), progress, len(todo))):
                done[cfg] = rec
    return [done[cfg] for cfg in configs]


def _with_bar(iterable, enabled: bool, total: int | None = None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc="runs", dynamic_ncols=True)
