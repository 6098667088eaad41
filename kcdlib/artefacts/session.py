"""A notebook's session: the profile with the build's options (:class:`~kcdlib.buildoptions.BuildOptions`, checked
where they are made) and the notebook's own parameters applied, the run store, and where missing runs are trained.
Every parameter is checked before any run."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import options
from ..archive import FROM_RECORDS_ENV, recorded_code, recorded_fingerprints
from ..buildoptions import BuildOptions
from ..identity import RunConfig, with_teachers
from ..profiles import Profile, published_teachers
from ..runs import RunStore
from .captions import non_default_options
from .declare import apply_parameters, teacher_archs, unique

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


def setup(build: BuildOptions | Mapping[str, Any] | None = None, **parameters: Any) -> Session:
    """A notebook's first call: ``session = setup(BuildOptions.from_notebook(globals()), alphas=values)``. ``build``
    (:class:`~kcdlib.buildoptions.BuildOptions`, or a mapping of its fields) is checked once, where it is made;
    ``parameters`` are the notebook's own (its artefact's fields: ``grid_pairs``, ``alphas`` ...), ``None``
    keeping the profile's value. The published teachers in the build's ``teachers_dir`` replace the profile's own
    wherever one exists."""
    if not isinstance(build, BuildOptions):
        build = BuildOptions.from_mapping(build or {})
    # The build's schedule again, so the artefacts' fields that follow it (Table 3's ImageNet schedule) do.
    p = apply_parameters(build.applied(), **build.schedule(), **parameters)
    published = published_teachers(build.teachers_dir, teacher_archs(p))
    if published:
        p = p.with_options(teacher_checkpoints={**p.teacher_checkpoints, **published})
    # kcd book --from-records: the data fingerprints and the code come from the store's records (the data is not
    # here, and the code may be newer).
    from_records = os.environ.get(FROM_RECORDS_ENV) == "1"
    runs_dir = build.runs_dir
    store = RunStore(runs_dir, build.data_root, options.device(build.device or p.device), build.compile, build.stale,
                     recorded_fingerprints=recorded_fingerprints(runs_dir) if from_records else None,
                     recorded_code=recorded_code(runs_dir) if from_records else None)  # fmt: skip
    devices = [options.device(d) for d in build.devices] if build.devices else [str(store.device)]
    return Session(
        p, store, devices, build.jobs_per_device,
        Path(build.progress_file) if build.progress_file else None, Path(build.book_root) if build.book_root else None,
    )  # fmt: skip
