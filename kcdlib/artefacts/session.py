"""A notebook's session: the profile with the notebook's parameters applied, the run store, and where missing runs
are trained. Every parameter is checked here, with the command line's rules, before any run."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import distillers, methods, options
from ..archive import FROM_RECORDS_ENV, recorded_code, recorded_fingerprints
from ..errors import BadOption
from ..fastpath import COMPILE_MODES
from ..profiles import Profile, get_profile, published_teachers
from ..runs import MAX_SEED, RunConfig, RunStore
from .captions import non_default_options
from .declare import apply_parameters, like, list_of, teacher_archs, unique

# The course's knobs: notebook parameter -> the distiller option it sets (every distiller that has it; UNIX's own
# loss is UNIX's protocol and keeps its values).
LOSS_KNOBS = {"temperature": "temperature", "gamma": "gamma", "kd_alpha": "alpha", "beta": "beta"}
# ... and -> the KCD option it sets (the tables that vary one keep their own value).
KCD_KNOBS = {"rho": "rho", "alpha": "alpha"}
# The fields of a run's record that the tables read.
RECORD_FIELDS = ("final_top1", "best_top1", "final_top5", "computation", "computation_formula", "points_distilled",
                 "never_distilled")  # fmt: skip


@dataclass
class Session:
    """What a notebook works with: ``profile`` (parameters applied), ``store`` (the run store), and the devices
    on which :meth:`ensure` trains missing runs, ``jobs_per_device`` at a time on each. ``progress_file``, when
    set (``kcd book`` sets it), always holds one line: the run being trained and its epoch. ``book_root`` is the
    folder paths are shown relative to."""

    profile: Profile
    store: RunStore
    devices: list[str]
    jobs_per_device: int = 1
    progress_file: Path | None = None
    book_root: Path | None = None

    def ensure(self, configs: Iterable[RunConfig], progress: bool = True) -> list[dict[str, Any]]:
        """Make sure every run exists (finished runs are reused, missing ones trained), with one progress bar
        across the runs; prints how many were reused and trained."""
        from tqdm import tqdm

        store = self.store
        configs = unique(configs)
        missing = [c for c in configs if store.record(c) is None]
        reused = len(configs) - len(missing)
        start = time.perf_counter()
        if missing and len(self.devices) * self.jobs_per_device > 1:
            from ..parallel import ensure_all

            self.status(f"training {len(missing)} runs on {', '.join(self.devices)} ({self.jobs_per_device} each)")
            ensure_all(missing, str(store.root), store.data_root, self.devices, self.jobs_per_device, progress,
                       store.compile, store.stale)  # fmt: skip
        # A teacher run the store would train inside its student's ensure() gets its own turn (and label) first.
        from ..plan import with_teachers

        order = with_teachers(configs)
        records = {}
        for i, cfg in enumerate(tqdm(order, desc="runs", unit="run", disable=not progress, mininterval=2.0), 1):
            what = f"run {i}/{len(order)}: {describe(cfg)}"
            self.status(what)
            store.on_epoch = lambda epoch, epochs, what=what: self.status(f"{what}, epoch {epoch}/{epochs}")
            try:
                records[cfg.options_hash] = store.ensure(cfg, progress=False)
            finally:
                store.on_epoch = None
        self.status(f"{len(order)} runs ready")
        print(
            f"{len(configs)} runs: {reused} reused, {len(configs) - reused} trained "
            f"({time.perf_counter() - start:.0f} s) in {self.shown(store.root)}"
        )
        return [records[c.options_hash] for c in configs]

    def records(self, configs: Iterable[RunConfig], fields: Sequence[str] = RECORD_FIELDS):
        """The records of ``configs`` as a frame, one row per run: its seed, its folder in the store (relative to
        the book) and the record's ``fields`` that a table reads (those the records have)."""
        import pandas as pd

        rows = []
        for cfg in configs:
            rec = self.store.record(cfg)
            if rec is None:
                raise KeyError(f"run {self.shown(self.store.path(cfg))} is missing: call session.ensure first")
            rows.append({"run": self.shown(self.store.path(cfg)), "seed": cfg.seed,
                         **{f: rec[f] for f in fields if f in rec}})  # fmt: skip
        return pd.DataFrame(rows).set_index("run").astype(object)  # a seed stays a whole number when transposed

    def status(self, line: str) -> None:
        """Append ``line`` to the progress file: ``kcd book`` prints every line, the last epoch's included (a file
        rewritten each time lost the lines written between two of the runner's looks)."""
        if self.progress_file is not None:
            with open(self.progress_file, "a") as f:
                f.write(line + "\n")

    def shown(self, path: str | os.PathLike) -> str:
        """``path`` relative to the book (a rendered page shows no folder of the machine that built it)."""
        root = self.book_root or Path.cwd()
        return os.path.relpath(Path(path).resolve(), Path(root).resolve())


def describe(cfg: RunConfig) -> str:
    """A run in a few words, from its own options: ``resnet20 trained alone (15 epochs), seed 0`` (a teacher, or
    Table 1's student row) or ``resnet8 from resnet20, kd/kcd rho=0.5, seed 0`` (the options that differ from
    their defaults, as ``kcd book --plan``)."""
    if cfg.kind == "teacher":
        return f"{cfg.arch} trained alone ({cfg.recipe.epochs} epochs), seed {cfg.seed}"
    changed = non_default_options(cfg)
    return (
        f"{cfg.arch} from {cfg.teacher_arch}, {cfg.distiller}/{cfg.method}{' ' + changed if changed else ''}, "
        f"seed {cfg.seed}"
    )


def setup(
    profile: str | Profile,
    runs_dir: str = "runs",
    data_root: str = "data",
    device: str | None = None,
    seeds: Sequence[int] | None = None,
    devices: Sequence[str] | None = None,
    jobs_per_device: int = 1,
    compile: str = "off",
    stale: str = "stop",
    teachers_dir: str | None = None,
    progress_file: str | None = None,
    book_root: str | None = None,
    temperature: float | None = None,
    gamma: float | None = None,
    kd_alpha: float | None = None,
    beta: float | None = None,
    rho: float | None = None,
    alpha: float | None = None,
    **knobs: Any,
) -> Session:
    """A notebook's first call: the profile with the notebook's parameters applied (``None`` keeps the
    profile's value) and the run store. ``devices`` and ``jobs_per_device`` let :meth:`Session.ensure` train missing
    runs several at a time; ``teachers_dir`` holds published teachers (RepDistiller's names), used wherever one
    exists instead of training the profile's own. ``epochs``, ``stage_epochs`` and ``teacher_epochs`` shorten a
    profile (a rehearsal), Table 3's schedule with it. The course's knobs (``None``: the paper's value):
    ``temperature`` (KD's T), ``gamma``, ``kd_alpha``, ``beta`` (the loss weights γ, α, β of every distiller that
    has them; UNIX keeps its own loss), ``rho`` and ``alpha`` (KCD's final keep-ratio ρ and the value score's
    exponent α). They become run options, so they are part of every run's identity. ``progress_file`` and
    ``book_root`` are ``kcd book``'s: see :class:`Session`."""
    p = get_profile(profile)
    for name, value in (("runs_dir", runs_dir), ("data_root", data_root)):
        if not isinstance(value, str | Path):
            raise BadOption(f"parameter {name} must be a folder path, got {value!r}")
    seeds = list_of("seeds", seeds, lambda s: isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED,
                    f"whole numbers in [0, {MAX_SEED}]")  # fmt: skip
    devices = list_of("devices", devices, lambda d: isinstance(d, str), "device names")
    devices = [options.device(d) for d in devices] if devices else None
    if isinstance(jobs_per_device, bool) or not isinstance(jobs_per_device, int) or jobs_per_device < 1:
        raise BadOption(f"parameter jobs_per_device must be a whole number >= 1, got {jobs_per_device!r}")
    if compile not in COMPILE_MODES:
        raise BadOption(f"parameter compile_mode must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
    p = apply_parameters(p, **knobs)
    given = {"temperature": temperature, "gamma": gamma, "kd_alpha": kd_alpha, "beta": beta, "rho": rho,
             "alpha": alpha}  # fmt: skip
    for name, value in given.items():
        if value is not None and not like(value, 1.0):
            raise BadOption(f"parameter {name} must be a number, got {value!r}")
    loss = {option: given[knob] for knob, option in LOSS_KNOBS.items() if given[knob] is not None}
    kcd = {option: given[knob] for knob, option in KCD_KNOBS.items() if given[knob] is not None}
    p = p.with_options(seeds=tuple(seeds) if seeds else None, loss_options={**p.loss_options, **loss},
                       kcd_options={**p.kcd_options, **kcd})  # fmt: skip
    if p.epochs % p.stage_epochs or p.epochs < 2 * p.stage_epochs:
        raise BadOption(f"parameter epochs ({p.epochs}) must be a multiple of stage_epochs ({p.stage_epochs}), with "
                        "at least two stages: the book shows KCD condensing")  # fmt: skip
    _check_knobs(p)
    published = published_teachers(teachers_dir, teacher_archs(p))
    if published:
        p = p.with_options(teacher_checkpoints={**p.teacher_checkpoints, **published})
    # kcd book --from-records: the data fingerprints and the code come from the store's records (the data is not
    # here, and the code may be newer).
    from_records = os.environ.get(FROM_RECORDS_ENV) == "1"
    store = RunStore(runs_dir, data_root, options.device(device or p.device), compile, stale,
                     recorded_fingerprints=recorded_fingerprints(runs_dir) if from_records else None,
                     recorded_code=recorded_code(runs_dir) if from_records else None)  # fmt: skip
    return Session(
        p, store, devices or [str(store.device)], jobs_per_device,
        Path(progress_file) if progress_file else None, Path(book_root) if book_root else None,
    )  # fmt: skip


def _check_knobs(p: Profile) -> None:
    """The knobs with the option rules of the distillers and of KCD (a bad value fails here, not in a run)."""
    for name, cls in distillers.DISTILLERS.items():
        given = {k: v for k, v in p.loss_options.items() if k in cls.option_specs}
        if given:
            distillers.canonical_options(name, given)
    if p.kcd_options:
        methods.canonical_options("kcd", {**p.kcd_options, "stage_epochs": p.stage_epochs}, p.epochs, 64)
