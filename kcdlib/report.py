"""The book's tables and figures: which runs each artefact needs, and how its records become a table.

For every artefact ``X`` there is ``X_runs(profile)``, the run configs it needs (the notebook hands them to
:func:`ensure`, which trains only what is missing), and ``X(store, profile)``, which reads the records and returns
a :class:`Table` (or a :class:`Figure`): our numbers beside the paper's, mean ± sd over seeds when there are
several, the counted computation, and a caption naming the profile and the pairs actually run.

Adding a table = one ``*_runs`` and one builder here, one thin notebook in ``notebooks/``.
"""

from __future__ import annotations

import io
import math
import statistics
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import condense, cost, models, options, reference
from . import data as datasets
from .errors import BadOption
from .fastpath import COMPILE_MODES
from .methods import METHODS
from .profiles import Profile, get_profile, published_teachers, split_pair
from .released import released_code_schedule
from .runs import MAX_SEED, RunConfig, RunStore, atomic_write, distill_config, teacher_config

# Table 3's absolute computation as the paper quotes it (ImageNet: 1.26M points x 90 epochs for KD).
PAPER_IMAGENET_CA = {"KD": 114e6, "KC-KD": 81e6}
# The paper's final keep-ratio ρ: the KCD method's default, defined there.
KCD_RHO = METHODS["kcd"].option_specs["rho"].default


# -- run configs ---------------------------------------------------------------------------------------------
def teacher_run(profile: Profile, arch: str, dataset: str | None = None, epochs: int | None = None) -> RunConfig:
    """The teacher's own run (trained with cross-entropy, seed 0, ``epochs`` or ``profile.teacher_epochs``)."""
    return teacher_config(dataset or profile.dataset, arch, seed=0, epochs=epochs or profile.teacher_epochs)


def student_run(profile: Profile, arch: str, seed: int = 0, dataset: str | None = None) -> RunConfig:
    """The student trained alone (the paper's "Student" row), as long as the distillation runs."""
    return teacher_config(dataset or profile.dataset, arch, seed=seed, epochs=profile.epochs)


def distill_pair(
    profile: Profile,
    teacher: str,
    student: str,
    *,
    distiller: str = "kd",
    method: str = "kd",
    seed: int = 0,
    dataset: str | None = None,
    epochs: int | None = None,
    teacher_epochs: int | None = None,
    **options: Any,
) -> RunConfig:
    """A distillation run of ``student`` from ``teacher`` (architectures actually run). KCD runs always carry
    the profile's stage length ``T``; other options (``rho``, ``alpha``, ``augment``, UNIX's ``k``) as given."""
    dataset = dataset or profile.dataset
    if method == "kcd":
        options.setdefault("stage_epochs", profile.stage_epochs)
    source: dict[str, Any]
    if teacher in profile.teacher_checkpoints:
        source = {"teacher_checkpoint": profile.teacher_checkpoints[teacher], "teacher_arch": teacher}
    else:
        source = {"teacher": teacher_run(profile, teacher, dataset, teacher_epochs)}
    return distill_config(
        dataset, student, distiller=distiller, method=method, method_options=options,
        epochs=epochs or profile.epochs, seed=seed, **source,
    )  # fmt: skip


def distill(profile: Profile, paper_pair: str, **kw: Any) -> RunConfig:
    """The run standing in for ``paper_pair`` (``'teacher/student'``) in this profile."""
    teacher, student = profile.run_pair(paper_pair)
    return distill_pair(profile, teacher, student, **kw)


def fs_over_ft(teacher: str, student: str, dataset: str) -> float:
    """Student/teacher forward multiply-adds at the dataset's image size (UNIX's Fs/Ft), counted."""
    spec = datasets.spec(dataset)
    classes, size = spec.num_classes, (3, spec.image_size, spec.image_size)
    return cost.forward_macs(models.create(student, classes), size) / cost.forward_macs(
        models.create(teacher, classes), size
    )


def kcd_computation(profile: Profile, rho: float = KCD_RHO, epochs: int | None = None, stage_epochs=None) -> float:
    """KCD's relative computation ``C`` for the paper schedule (Eq. 16)."""
    return condense.schedule_computation("paper", epochs or profile.epochs, stage_epochs or profile.stage_epochs, rho)


def unix_k(profile: Profile, paper_pair: str) -> int:
    """UNIX's ``k`` whose Eq. 19 cost equals KCD's ``C`` for this pair (rounded to the nearest integer)."""
    teacher, student = profile.run_pair(paper_pair)
    ratio = fs_over_ft(teacher, student, profile.dataset)
    return round(cost.unix_k_for(kcd_computation(profile), batch=64, fs_over_ft=ratio))


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
    **knobs: Any,
) -> tuple[Profile, RunStore]:
    """A notebook's first call: the profile with the notebook's parameters applied (``None`` keeps the
    profile's value) and the run store. ``devices`` and ``jobs_per_device`` let :func:`ensure` train missing
    runs several at a time; ``teachers_dir`` holds published teachers (RepDistiller's names), used wherever one
    exists instead of training the profile's own. ``epochs``, ``stage_epochs`` and ``teacher_epochs`` shorten a
    profile (a rehearsal), Table 3's schedule with it. Every parameter is checked here, with the command line's
    rules, before any run."""
    p = get_profile(profile)
    for name, value in (("runs_dir", runs_dir), ("data_root", data_root)):
        if not isinstance(value, str | Path):
            raise BadOption(f"parameter {name} must be a folder path, got {value!r}")
    seeds = _list_of("seeds", seeds, lambda s: isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED,
                     f"whole numbers in [0, {MAX_SEED}]")  # fmt: skip
    devices = _list_of("devices", devices, lambda d: isinstance(d, str), "device names")
    devices = [options.device(d) for d in devices] if devices else None
    if isinstance(jobs_per_device, bool) or not isinstance(jobs_per_device, int) or jobs_per_device < 1:
        raise BadOption(f"parameter jobs_per_device must be a whole number >= 1, got {jobs_per_device!r}")
    if compile not in COMPILE_MODES:
        raise BadOption(f"parameter compile_mode must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
    changes = {}
    for name, value in knobs.items():
        if value is None:
            continue
        if not hasattr(p, name):
            raise BadOption(f"unknown parameter {name}")
        current = getattr(p, name)
        if isinstance(current, tuple):
            value = tuple(_list_of(name, value, lambda v, c=current: _like(v, c[0]) if c else True,
                                   f"values like {current[:2]}"))  # fmt: skip
        elif not _like(value, current):
            raise BadOption(f"parameter {name} must be like {current!r}, got {value!r}")
        elif isinstance(value, int) and value < 1:
            raise BadOption(f"parameter {name} must be at least 1, got {value}")
        changes[name] = value
    if "epochs" in changes and p.table3_epochs:
        changes.update(table3_epochs=changes["epochs"], table3_stage_epochs=changes.get("stage_epochs"))
    p = p.with_options(seeds=tuple(seeds) if seeds else None, **changes)
    if p.epochs % p.stage_epochs or p.epochs < 2 * p.stage_epochs:
        raise BadOption(f"parameter epochs ({p.epochs}) must be a multiple of stage_epochs ({p.stage_epochs}), with "
                        "at least two stages: the book shows KCD condensing")  # fmt: skip
    published = published_teachers(teachers_dir, p.teacher_archs())
    if published:
        p = p.with_options(teacher_checkpoints={**p.teacher_checkpoints, **published})
    store = RunStore(runs_dir, data_root, options.device(device or p.device), compile, stale)
    store.devices = devices or [str(store.device)]
    store.jobs_per_device = jobs_per_device
    return p, store


def _like(value: Any, example: Any) -> bool:
    """``value`` has the type of ``example`` (an int stands for a float; a bool is no number)."""
    if isinstance(value, bool) or isinstance(example, bool):
        return isinstance(value, bool) and isinstance(example, bool)
    if isinstance(example, float):
        return isinstance(value, int | float) and math.isfinite(value)
    return isinstance(value, type(example))


def _list_of(name: str, value: Any, ok, what: str) -> list | None:
    """A notebook parameter that must be a list (``-y 'seeds: [0, 1]'``), each element checked."""
    if value is None:
        return None
    if not isinstance(value, list | tuple):
        raise BadOption(f"parameter {name} must be a list of {what} (papermill: -y '{name}: [...]'), got {value!r}")
    bad = [v for v in value if not ok(v)]
    if bad or not value:
        raise BadOption(f"parameter {name} must be a non-empty list of {what}, got {list(value)!r}")
    return list(value)


# -- running -------------------------------------------------------------------------------------------------
def unique(configs: Iterable[RunConfig]) -> list[RunConfig]:
    seen: dict[str, RunConfig] = {}
    for cfg in configs:
        seen.setdefault(cfg.options_hash, cfg)
    return list(seen.values())


def ensure(store: RunStore, configs: Iterable[RunConfig], progress: bool = True) -> list[dict[str, Any]]:
    """Make sure every run exists (finished runs are reused, missing ones trained), with one progress bar
    across the runs; prints how many were reused and trained."""
    from tqdm import tqdm

    configs = unique(configs)
    missing = [c for c in configs if store.record(c) is None]
    reused = len(configs) - len(missing)
    start = time.perf_counter()
    devices, jobs = getattr(store, "devices", [str(store.device)]), getattr(store, "jobs_per_device", 1)
    if missing and len(devices) * jobs > 1:
        from .parallel import ensure_all

        ensure_all(missing, str(store.root), store.data_root, devices, jobs, progress, store.compile, store.stale)
    records = [
        store.ensure(cfg, progress=False)
        for cfg in tqdm(configs, desc="runs", unit="run", disable=not progress, mininterval=2.0)
    ]
    print(
        f"{len(configs)} runs: {reused} reused, {len(configs) - reused} trained "
        f"({time.perf_counter() - start:.0f} s) in {store.root}"
    )
    return records


# -- tables ----------------------------------------------------------------------------------------------------
# Lines and alignment for the book's tables (the theme draws none around pandas' HTML).
TABLE_STYLE = [
    {"selector": "caption", "props": "caption-side: top; text-align: left; padding-bottom: 0.5em;"},
    {"selector": "th, td", "props": "padding: 0.2em 0.7em; text-align: right; white-space: nowrap;"},
    {"selector": "thead th", "props": "border-bottom: 1px solid #888; text-align: center;"},
    {"selector": "tbody tr:nth-child(even)", "props": "background-color: #f4f6f8;"},
]


@dataclass
class Table:
    """A table as the book shows it (``frame``, strings), its numbers (``data``, one row per cell, floats:
    the source for glued prose) and a caption."""

    name: str
    caption: str
    frame: pd.DataFrame
    data: pd.DataFrame
    key_numbers: dict[str, float] = field(default_factory=dict)

    def styled(self):
        return self.frame.style.set_caption(self.caption).set_table_styles(TABLE_STYLE)

    def _repr_html_(self) -> str:
        return self.styled().to_html()

    def __repr__(self) -> str:
        return f"{self.caption}\n{self.frame.to_string()}"


def _values(store: RunStore, configs: Sequence[RunConfig], key: str) -> list[float]:
    out = []
    for cfg in configs:
        rec = store.record(cfg)
        if rec is None:
            raise KeyError(f"run {store.path(cfg)} ({cfg.arch} {cfg.method}) is missing: call report.ensure first")
        out.append(float(rec[key]))
    return out


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def _fmt(mean: float, sd: float, digits: int = 2) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _paper(value: Any) -> str:
    return "–" if value is None or pd.isna(value) else f"{float(value):.2f}"


NOT_RUN = "not run"  # a cell of the paper's table that this profile does not run (the captions say so)


def _caption(
    title: str,
    profile: Profile,
    pairs: Iterable[str],
    dataset: str | None = None,
    paper_note: str = "paper: as published (CIFAR-100)",
    teachers: str = "",
    epochs: tuple[int, int] | None = None,
) -> str:
    shown = [f"{p} → {'/'.join(profile.run_pair(p))}" if profile.pairs.get(p, p) != p else p for p in pairs]
    seeds = ", ".join(map(str, profile.seeds))
    many = " (mean ± sd over seeds)" if len(profile.seeds) > 1 else ""
    other = f" Dataset: {dataset}." if dataset and dataset != profile.dataset else ""
    epochs, stage = epochs or (profile.epochs, profile.stage_epochs)
    return (
        f"{title}. Profile '{profile.name}' ({profile.description}); this build: {epochs} epochs, KCD stages of "
        f"{stage}.{other} Pairs run (paper → run): {'; '.join(shown) or 'none'}. Seeds: {seeds}. Ours: top-1 % "
        f"at the last epoch / at the best epoch{many}; the paper most likely printed the best epoch (the released "
        f"KCD script reports the best test accuracy; RepDistiller, whose baselines it quotes, the last). "
        f"{paper_note}; '{NOT_RUN}': not run on this profile. C: counted computation relative to KD.{teachers}"
    )


def _cell(store: RunStore, configs: Sequence[RunConfig], key: str = "final_top1") -> tuple[float, float, str]:
    """The mean and sd of ``key`` over the runs, and the text of the cell: last / best epoch for top-1."""
    mean, sd = _mean_sd(_values(store, configs, key))
    if key != "final_top1":
        return mean, sd, _fmt(mean, sd)
    best, best_sd = _mean_sd(_values(store, configs, "best_top1"))
    return mean, sd, f"{_fmt(mean, sd)} / {_fmt(best, best_sd)}"


def _teachers(store: RunStore, configs: Iterable[RunConfig]) -> str:
    """Which teachers the runs distilled from, each with the accuracy measured here when it was used."""
    seen: dict[str, str] = {}
    for cfg in configs:
        if cfg.kind != "distill" or cfg.teacher_arch in seen:
            continue
        rec = store.record(cfg) or {}
        acc = (rec.get("teacher_accuracy") or {}).get("top1")
        where = "a published checkpoint" if cfg.teacher is None else "trained here"
        seen[cfg.teacher_arch] = f"{cfg.teacher_arch}, {where}" + ("" if acc is None else f" ({acc:.2f} % top-1)")
    return f" Teachers (top-1 measured here): {'; '.join(seen.values())}." if seen else ""


# Table 1 ----------------------------------------------------------------------------------------------------
_DISTILLER_LABEL = {"kd": "KD", "pkt": "PKT", "crd": "CRD"}


def table1_runs(profile: Profile | str) -> list[RunConfig]:
    p = get_profile(profile)
    configs = []
    for pair in p.table1_pairs:
        teacher, student = p.run_pair(pair)
        configs.append(teacher_run(p, teacher))
        configs += [student_run(p, student, s) for s in p.seeds]
        for d in p.table1_distillers:
            for m in ("kd", "kcd"):
                configs += [distill(p, pair, distiller=d, method=m, seed=s) for s in p.seeds]
    return unique(configs)


def table1(store: RunStore, profile: Profile | str) -> Table:
    """Table 1: the paper's whole table (every method and pair it prints), ours beside it where this profile ran
    the cell: KD, PKT, CRD and their KC- versions, the teacher and the student trained alone."""
    p = get_profile(profile)
    paper = reference.paper_table1()
    rows, cells = [], {}
    run_cfgs = []
    for pair in dict.fromkeys([*paper.columns, *p.table1_pairs]):
        ran = pair in p.table1_pairs
        teacher, student = p.run_pair(pair)
        entries = {}
        if ran:
            entries = {"Teacher": [teacher_run(p, teacher)], "Student": [student_run(p, student, s) for s in p.seeds]}
            for d in p.table1_distillers:
                for m in ("kd", "kcd"):
                    label = ("KC-" if m == "kcd" else "") + _DISTILLER_LABEL[d]
                    entries[label] = [distill(p, pair, distiller=d, method=m, seed=s) for s in p.seeds]
        for label in dict.fromkeys([*paper.index, *entries]):
            ref = paper.loc[label, pair] if label in paper.index and pair in paper.columns else None
            cells[(label, (pair, "paper"))] = _paper(ref)
            cfgs = entries.get(label)
            if cfgs is None:
                cells[(label, (pair, "ours"))] = NOT_RUN
                continue
            run_cfgs += cfgs
            mean, sd, text = _cell(store, cfgs)
            c = statistics.fmean(_values(store, cfgs, "computation")) if label not in ("Teacher", "Student") else None
            rows.append({"pair": pair, "run_pair": f"{teacher}/{student}", "method": label, "ours": mean,
                         "ours_sd": sd, "ours_best": _mean_sd(_values(store, cfgs, "best_top1"))[0],
                         "paper": None if ref is None or pd.isna(ref) else float(ref), "computation": c})  # fmt: skip
            cells[(label, (pair, "ours"))] = text
    data = pd.DataFrame(rows)
    order = list(dict.fromkeys(label for label, _ in cells))
    frame = pd.Series(cells).unstack().reindex(order)
    frame.columns = pd.MultiIndex.from_tuples(frame.columns)
    pairs = list(dict.fromkeys([*paper.columns, *p.table1_pairs]))
    frame = frame[[(pair, k) for pair in pairs for k in ("paper", "ours")]]
    comp = data.dropna(subset=["computation"]).groupby("method", sort=False)["computation"].mean()
    frame[("", "C (counted)")] = [f"{100 * comp[m]:.1f} %" if m in comp else "" for m in frame.index]
    frame.index.name = "method"
    gains = {f"{d}_gain": float("nan") for d in _DISTILLER_LABEL} | {f"{d}_wins": 0 for d in _DISTILLER_LABEL}
    for d in p.table1_distillers:
        label = _DISTILLER_LABEL[d]
        base = data[data.method == label].set_index("pair")["ours"]
        kc = data[data.method == "KC-" + label].set_index("pair")["ours"]
        gains[f"{d}_gain"] = float((kc - base).mean())
        gains[f"{d}_wins"] = int((kc > base).sum())
    key = {**gains, "pairs": len(p.table1_pairs), "kcd_computation": 100 * float(comp.get("KC-KD", float("nan")))}
    caption = _caption("Table 1: top-1 accuracy of KD, PKT, CRD and their KCD versions (the paper's whole table)",
                       p, p.table1_pairs, teachers=_teachers(store, run_cfgs))  # fmt: skip
    return Table("table1", caption, frame, data, key)


# Table 2 ----------------------------------------------------------------------------------------------------
def table2_runs(profile: Profile | str) -> list[RunConfig]:
    p = get_profile(profile)
    pair, k = p.table2_pair, unix_k(p, p.table2_pair)
    configs = []
    for s in p.seeds:
        configs += [distill(p, pair, seed=s), distill(p, pair, method="unix", k=k, seed=s),
                    distill(p, pair, method="kcd", seed=s)]  # fmt: skip
    return unique(configs)


def table2(store: RunStore, profile: Profile | str) -> Table:
    """Table 2: KD, UNIX as published, UNIX re-run at KCD's computation (k from Eq. 19), and KC-KD, for every pair
    UNIX published; ours where this profile ran the pair."""
    p = get_profile(profile)
    published = reference.unix_published()
    paper1 = reference.paper_table1()
    run_pair = p.table2_pair
    published_pairs = [f"{t}/{s}" for t, s in zip(published.teacher, published.student)]
    rows, display, key = [], [], {}
    for pair in dict.fromkeys([*published_pairs, run_pair]):
        pt, ps = split_pair(pair)
        pub = published[(published.teacher == pt) & (published.student == ps)]
        pub = pub.iloc[0] if len(pub) else None
        ran = pair == run_pair
        k = unix_k(p, pair) if ran else None
        ratio = fs_over_ft(*p.run_pair(pair), p.dataset) if ran else None
        runs = {"KD": {}, "UNIX (re-run at KCD's C)": {"method": "unix", "k": k}, "KC-KD": {"method": "kcd"}}
        cfgs = {label: [distill(p, pair, seed=s, **o) for s in p.seeds] if ran else None for label, o in runs.items()}
        entries = [
            ("KD", cfgs["KD"], 1.0, None if pub is None else pub.kd_acc),
            ("UNIX (published, k=48)", None, None if pub is None else pub.unix_computation_pct / 100,
             None if pub is None else pub.unix_acc),
            ("UNIX (re-run at KCD's C)", cfgs["UNIX (re-run at KCD's C)"],
             cost.unix_computation(k, 64, ratio) if ran else None, None),
            ("KC-KD", cfgs["KC-KD"], kcd_computation(p) if ran else None,
             paper1.loc["KC-KD", pair] if pair in paper1.columns else None),
        ]  # fmt: skip
        for label, cfgs, formula, ref in entries:
            mean = sd = counted = float("nan")
            if label.startswith("UNIX (published"):
                text, counted_text = "(published only)", "–"
            elif not ran:
                text, counted_text = NOT_RUN, "–"
            else:
                mean, sd, text = _cell(store, cfgs)
                counted = statistics.fmean(_values(store, cfgs, "computation"))
                counted_text = f"{100 * counted:.1f} %"
            if ran:
                key[label] = {"ours": mean, "computation": counted}
            rows.append({"pair": pair, "method": label, "ours": mean, "ours_sd": sd, "paper": ref,
                         "formula": formula, "computation": counted})  # fmt: skip
            display.append({
                "pair": pair, "method": label if not (ran and label.startswith("UNIX (re-run")) else
                f"UNIX (re-run, k={k})", "top-1 published": _paper(ref), "top-1 ours": text,
                "C (formula)": "–" if formula is None else f"{100 * formula:.1f} %", "C (counted)": counted_text,
            })  # fmt: skip
    frame = pd.DataFrame(display).set_index(["pair", "method"])
    data = pd.DataFrame(rows)
    k, ratio = unix_k(p, run_pair), fs_over_ft(*p.run_pair(run_pair), p.dataset)
    caption = _caption(
        f"Table 2: KD, UNIX and KC-KD at matched computation, for every pair UNIX published; re-run: UNIX's "
        f"k={k} makes its Eq. 19 cost equal KCD's C (Fs/Ft={ratio:.3f} counted for the pair run); published "
        "numbers: UNIX's official README and the paper's Table 1",
        p, [run_pair], teachers=_teachers(store, [distill(p, run_pair, seed=s) for s in p.seeds]),
    )  # fmt: skip
    unix = key["UNIX (re-run at KCD's C)"]
    key = {"unix_k": k, "kd_top1": key["KD"]["ours"], "unix_top1": unix["ours"], "kcd_top1": key["KC-KD"]["ours"],
           "unix_computation": 100 * unix["computation"],
           "kcd_computation": 100 * key["KC-KD"]["computation"]}  # fmt: skip
    return Table("table2", caption, frame, data, key)


# Table 3 ----------------------------------------------------------------------------------------------------
def _table3_configs(p: Profile, seed: int) -> dict[str, RunConfig]:
    epochs, t = p.table3_epochs or p.epochs, p.table3_stage_epochs or p.stage_epochs
    teacher, student = p.run_pair(p.table3_pair)
    # An ImageNet teacher trained here follows ImageNet's own protocol (Table 3's epochs), not CIFAR's 240.
    kw = {"dataset": p.table3_dataset, "epochs": epochs, "seed": seed,
          "teacher_epochs": epochs if p.table3_dataset != p.dataset else None}  # fmt: skip
    # ImageNet is decoded from files, so there are no stored images for VAKS to mix into: KC-KD without
    # knowledge augmentation there (the caption says so).
    no_mix = {"augment": "none"} if p.table3_dataset == "imagenet" else {}
    return {"KD": distill_pair(p, teacher, student, **kw),
            "KC-KD": distill_pair(p, teacher, student, method="kcd", stage_epochs=t, **no_mix, **kw)}  # fmt: skip


def table3_runs(profile: Profile | str) -> list[RunConfig]:
    p = get_profile(profile)
    return unique(c for s in p.seeds for c in _table3_configs(p, s).values())


def table3(store: RunStore, profile: Profile | str) -> Table:
    """Table 3: ImageNet ResNet34 -> ResNet18, KD and KC-KD: top-1, top-5 and the absolute computation C_a."""
    p = get_profile(profile)
    rows, display = [], []
    for label in ("KD", "KC-KD"):
        cfgs = [_table3_configs(p, s)[label] for s in p.seeds]
        m1, s1, t1 = _cell(store, cfgs)
        m5, s5, t5 = _cell(store, cfgs, "final_top5")
        ca = statistics.fmean(_values(store, cfgs, "points_distilled"))
        c = statistics.fmean(_values(store, cfgs, "computation"))
        rows.append({"method": label, "top1": m1, "top5": m5, "points_distilled": ca, "computation": c,
                     "paper_points": PAPER_IMAGENET_CA[label]})  # fmt: skip
        display.append({"method": label, "top-1 ours": t1, "top-5 ours": t5, "C_a counted": f"{ca:,.0f}",
                        "C (counted)": f"{100 * c:.1f} %",
                        "C_a paper": f"{PAPER_IMAGENET_CA[label] / 1e6:.0f}M"})  # fmt: skip
    frame = pd.DataFrame(display).set_index("method")
    data = pd.DataFrame(rows)
    caption = _caption(
        "Table 3: ImageNet ResNet34 → ResNet18 (paper: C_a = 114M points for KD, 81M for KC-KD; its accuracies "
        "are not in our reference files"
        + ("; on ImageNet our KC-KD runs without knowledge augmentation, which needs images held in memory)"
           if p.table3_dataset == "imagenet" else ")"),
        p, [p.table3_pair], p.table3_dataset,
        paper_note="paper: the absolute computation it quotes for ImageNet",
        teachers=_teachers(store, table3_runs(p)),
        epochs=(p.table3_epochs or p.epochs, p.table3_stage_epochs or p.stage_epochs),
    )  # fmt: skip
    key = {"kd_points": rows[0]["points_distilled"], "kcd_points": rows[1]["points_distilled"],
           "ratio": 100 * rows[1]["points_distilled"] / rows[0]["points_distilled"],
           "kd_top1": rows[0]["top1"], "kcd_top1": rows[1]["top1"],
           "paper_kd_points_m": PAPER_IMAGENET_CA["KD"] / 1e6,
           "paper_kcd_points_m": PAPER_IMAGENET_CA["KC-KD"] / 1e6}  # fmt: skip
    return Table("table3", caption, frame, data, key)


# Table 4 ----------------------------------------------------------------------------------------------------
# Label, method, options: each row adds one component of KCD to the one above (our reconstruction).
TABLE4_ROWS = (
    ("KD (all points)", "kd", {}),
    ("random condensation (KCD's schedule)", "kcd", {"value": "random", "augment": "none"}),
    ("+ value ranking, no cost-aware factor (α=0)", "kcd", {"alpha": 0.0, "augment": "none"}),
    ("+ cost-aware factor (α=0.03), no augmentation", "kcd", {"augment": "none"}),
    ("+ knowledge augmentation K1L = full KCD (paper schedule)", "kcd", {}),
    ("full KCD, released code's schedule", "kcd", {"schedule": "official"}),
    ("full KCD, untrained points ranked last (the paper read literally)", "kcd", {"untrained": "last"}),
)


def table4_runs(profile: Profile | str) -> list[RunConfig]:
    p = get_profile(profile)
    return unique(distill(p, p.table4_pair, method=m, seed=s, **o) for _, m, o in TABLE4_ROWS for s in p.seeds)


def table4(store: RunStore, profile: Profile | str) -> Table:
    """Table 4 (reconstructed): KCD's components one at a time, and the paper's schedule against the code's."""
    p = get_profile(profile)
    paper1 = reference.paper_table1()
    pair = p.table4_pair
    rows, display = [], []
    for label, m, o in TABLE4_ROWS:
        cfgs = [distill(p, pair, method=m, seed=s, **o) for s in p.seeds]
        mean, sd, text = _cell(store, cfgs)
        counted = statistics.fmean(_values(store, cfgs, "computation"))
        formula = statistics.fmean(_values(store, cfgs, "computation_formula"))
        never = statistics.fmean(_values(store, cfgs, "never_distilled"))
        ref = None
        if pair in paper1.columns and label.startswith(("KD", "+ knowledge")):
            ref = paper1.loc["KD" if m == "kd" else "KC-KD", pair]
        rows.append({"row": label, "ours": mean, "ours_sd": sd, "computation": counted, "formula": formula,
                     "never_distilled": never})  # fmt: skip
        display.append({"variant": label, "top-1 paper (Table 1)": _paper(ref), "top-1 ours": text,
                        "C (formula)": f"{100 * formula:.1f} %", "C (counted)": f"{100 * counted:.1f} %",
                        "never distilled": f"{never:.0f}"})  # fmt: skip
    frame = pd.DataFrame(display).set_index("variant")
    data = pd.DataFrame(rows)
    caption = _caption(
        "Table 4 (our reconstruction: the supplement does not print the main paper's Table 4): KCD's components "
        "added one at a time, the paper's keep schedule (Eq. 16) against the released code's, and our rule for "
        "points never trained against the literal reading", p, [pair], teachers=_teachers(store, table4_runs(p)),
    )  # fmt: skip
    key = {"kd_top1": rows[0]["ours"], "random_top1": rows[1]["ours"], "alpha0_top1": rows[2]["ours"],
           "noaug_top1": rows[3]["ours"], "kcd_top1": rows[4]["ours"], "official_top1": rows[5]["ours"],
           "kcd_computation": 100 * rows[4]["computation"], "kcd_formula": 100 * rows[4]["formula"],
           "official_computation": 100 * rows[5]["computation"], "kcd_never": rows[4]["never_distilled"],
           "literal_top1": rows[6]["ours"], "literal_never": rows[6]["never_distilled"]}  # fmt: skip
    # The paper's own setting (CIFAR-100: N = 50,000, I = 240, T = 40, ρ = 0.7), computed, not typed in: the
    # schedule of Eq. 16, and the released code's schedule replayed with its arithmetic.
    released = released_code_schedule(50000, 240, 40, KCD_RHO)
    key["paper_setting_formula"] = 100 * condense.schedule_computation("paper", 240, 40, KCD_RHO)
    key["paper_setting_released"] = 100 * released.computation
    # Read literally, the paper schedule never distils the points its random stage 1 leaves out.
    key["paper_setting_never_literal"] = 50000 - condense.keep_schedule("paper", 50000, 240, 40, KCD_RHO)[0]
    key["released_crash_condensation"] = released_code_schedule(50000, 240, 30, KCD_RHO).crashes_at
    return Table("table4", caption, frame, data, key)


# Tables 5, 6, 7 ---------------------------------------------------------------------------------------------
GRIDS = {
    5: ("alpha", "α", "alphas"),
    6: ("rho", "ρ", "rhos"),
    7: ("augment", "augmentation", "augments"),
}
# Table 7's row names in the supplement for our augment option values.
AUGMENT_LABELS = {"none": "K1 w/o Aug.", "random": "Aug. K1 in random (eps=eps_m)", "K1H": "Aug. K1H",
                  "K1L": "Aug. K1L"}  # fmt: skip


def grid_runs(profile: Profile | str, table: int) -> list[RunConfig]:
    p = get_profile(profile)
    option, _, knob = GRIDS[table]
    return unique(
        distill(p, pair, method="kcd", seed=s, **{option: v})
        for pair in p.grid_pairs for v in getattr(p, knob) for s in p.seeds
    )  # fmt: skip


def grid(store: RunStore, profile: Profile | str, table: int) -> Table:
    """Tables 5 (α), 6 (ρ) and 7 (augmentation): KC-KD with one setting varied, the others at the paper's. The
    paper's whole table (every setting and pair it prints), ours where this profile ran the cell."""
    p = get_profile(profile)
    option, symbol, knob = GRIDS[table]
    paper = reference.paper_tables5to7()
    paper = paper[paper.table == table]
    paper_pairs = [c for c in paper.columns if "/" in c]
    # The paper's settings as our option values (Table 7 prints names; AUGMENT_LABELS maps ours to them).
    by_label = {label: value for value, label in AUGMENT_LABELS.items()}
    paper_values = [by_label.get(v, v) if option == "augment" else float(v) for v in paper.value]
    ran_values = list(getattr(p, knob))
    rows, cells, run_cfgs = [], {}, []
    for v in _unique_values([*paper_values, *ran_values]):
        label = AUGMENT_LABELS[v] if option == "augment" else f"{symbol} = {v:g}"
        key_value = AUGMENT_LABELS[v] if option == "augment" else f"{float(v):g}"
        ref_row = paper[paper.value.map(lambda x: x if option == "augment" else f"{float(x):g}") == key_value]
        for pair in dict.fromkeys([*paper_pairs, *p.grid_pairs]):
            ref = ref_row[pair].iloc[0] if len(ref_row) and pair in ref_row else None
            cells[(label, (pair, "paper"))] = _paper(ref)
            if pair not in p.grid_pairs or not any(_same(v, r) for r in ran_values):
                cells[(label, (pair, "ours"))] = NOT_RUN
                cells[(label, (pair, "C (counted)"))] = "–"
                continue
            cfgs = [distill(p, pair, method="kcd", seed=s, **{option: v}) for s in p.seeds]
            run_cfgs += cfgs
            mean, sd, text = _cell(store, cfgs)
            counted = statistics.fmean(_values(store, cfgs, "computation"))
            rows.append({"setting": v, "pair": pair, "ours": mean, "ours_sd": sd, "paper": ref, "computation": counted})
            cells[(label, (pair, "ours"))] = text
            cells[(label, (pair, "C (counted)"))] = f"{100 * counted:.1f} %"
    frame = pd.Series(cells).unstack()
    frame = frame.reindex(list(dict.fromkeys(label for label, _ in cells)))
    frame.columns = pd.MultiIndex.from_tuples(frame.columns)
    pairs = list(dict.fromkeys([*paper_pairs, *p.grid_pairs]))
    frame = frame[[(pair, k) for pair in pairs for k in ("paper", "ours", "C (counted)")]]
    frame.index.name = symbol
    data = pd.DataFrame(rows)
    best = data.groupby("setting", sort=False)["ours"].mean()
    title = {5: "Table 5: the cost-aware exponent α", 6: "Table 6: the final keep-ratio ρ",
             7: "Table 7: knowledge augmentation variants"}[table]  # fmt: skip
    caption = _caption(f"{title} (KC-KD; other settings as in the paper: α=0.03, ρ=0.7, K1L)", p, p.grid_pairs,
                       teachers=_teachers(store, run_cfgs))  # fmt: skip
    key = {"best": str(best.idxmax()), "spread": float(best.max() - best.min())}
    return Table(f"table{table}", caption, frame, data, key)


def _same(a: Any, b: Any) -> bool:
    return a == b if isinstance(a, str) or isinstance(b, str) else math.isclose(float(a), float(b))


def _unique_values(values: Iterable[Any]) -> list[Any]:
    """The settings in order, each once (0.7 and 0.70 are one setting)."""
    out: list[Any] = []
    for v in values:
        if not any(_same(v, u) for u in out):
            out.append(v)
    return out


def table5_runs(profile):
    return grid_runs(profile, 5)


def table6_runs(profile):
    return grid_runs(profile, 6)


def table7_runs(profile):
    return grid_runs(profile, 7)


def table5(store, profile):
    return grid(store, profile, 5)


def table6(store, profile):
    return grid(store, profile, 6)


def table7(store, profile):
    return grid(store, profile, 7)


# Figure 5 ---------------------------------------------------------------------------------------------------
def figure5_runs(profile: Profile | str) -> list[RunConfig]:
    p = get_profile(profile)
    return unique(distill_pair(p, t, p.figure5_student, method="kcd", seed=0) for t in p.figure5_teachers.values())


def value_labels(record: dict[str, Any]) -> torch.Tensor:
    """A KCD record's final value labels ``y`` as a bool tensor (True = kept, y = 1)."""
    return torch.tensor([c == "1" for c in record["value_labels"]])


def teacher_entropy(store: RunStore, cfg: RunConfig, temperature: float) -> torch.Tensor:
    """Entropy of the teacher's soft labels softmax(z_t / T) on every (unaugmented) training image of ``cfg``."""
    data = store.dataset(cfg.dataset)
    teacher = store.load_teacher(cfg)
    out = []
    with torch.no_grad():
        for start in range(0, data.num_train, 512):
            logits = teacher(data.normalize(data.train_images[start : start + 512])).float() / temperature
            out.append(condense.softmax_entropy(logits).cpu())
    return torch.cat(out)


@dataclass
class Figure:
    name: str
    caption: str
    figure: Any  # matplotlib Figure
    data: pd.DataFrame
    key_numbers: dict[str, float] = field(default_factory=dict)


def figure5(store: RunStore, profile: Profile | str, images_per_row: int = 10) -> Figure:
    """Figure 5: (a) training images with value label 1 and 0 at the end of a KCD run; (b) the teacher's
    soft-label entropy averaged over y = 1 and y = 0 points, at T = 4 and T = 1, for each teacher."""
    import matplotlib.pyplot as plt

    p = get_profile(profile)
    rows = []
    for paper_teacher, teacher in p.figure5_teachers.items():
        cfg = distill_pair(p, teacher, p.figure5_student, method="kcd", seed=0)
        y = value_labels(store.record(cfg))
        for temp in (4.0, 1.0):
            h = teacher_entropy(store, cfg, temp)
            for label in (1, 0):
                sel = y if label else ~y
                rows.append({"teacher": teacher, "paper_teacher": paper_teacher, "T": temp, "y": label,
                             "entropy": float(h[sel].mean()), "points": int(sel.sum())})  # fmt: skip
    data = pd.DataFrame(rows)

    first = distill_pair(p, next(iter(p.figure5_teachers.values())), p.figure5_student, method="kcd", seed=0)
    y = value_labels(store.record(first))
    images = store.dataset(first.dataset).train_images.cpu()
    g = torch.Generator().manual_seed(0)
    fig = plt.figure(figsize=(12, 6.5), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.1])
    axes = top.subplots(2, images_per_row)
    for r, (label, sel) in enumerate(((1, y), (0, ~y))):
        idx = sel.nonzero().flatten()
        pick = idx[torch.randperm(idx.numel(), generator=g)[:images_per_row]]
        for c in range(images_per_row):
            ax = axes[r, c]
            ax.set_axis_off()
            if c < pick.numel():
                img = images[pick[c]].permute(1, 2, 0).numpy()
                ax.imshow(img[..., 0] if img.shape[-1] == 3 and (img[..., 0] == img[..., 1]).all() else img,
                          cmap="gray")  # fmt: skip
        axes[r, 0].set_title(f"y = {label}", loc="left", fontsize=10)
    top.suptitle(f"(a) value labels at the end of KCD ({first.teacher_arch} → {first.arch})", fontsize=11)
    axs = bottom.subplots(1, 2)
    for ax, temp in zip(axs, (4.0, 1.0)):
        d = data[data["T"] == temp]
        teachers = list(dict.fromkeys(d.teacher))
        width = 0.38
        for j, label in enumerate((1, 0)):
            vals = [float(d[(d.teacher == t) & (d.y == label)].entropy.iloc[0]) for t in teachers]
            ax.bar([i + (j - 0.5) * width for i in range(len(teachers))], vals, width, label=f"y = {label}")
        ax.set_xticks(range(len(teachers)), teachers)
        ax.set_ylabel("mean entropy of teacher soft labels")
        ax.set_title(f"T = {temp:g}", fontsize=10)
        ax.legend()
    bottom.suptitle("(b) teacher soft-label entropy over kept (y = 1) and dropped (y = 0) points", fontsize=11)
    plt.close(fig)
    mapping = "; ".join(f"{k} → {v}" if k != v else k for k, v in p.figure5_teachers.items())
    caption = (
        f"Figure 5. Profile '{p.name}': {p.dataset}, {p.description}. KC-KD runs of {p.figure5_student} from each "
        f"teacher (paper → run: {mapping}), seed 0."
    )
    t4 = data[data["T"] == 4.0].pivot_table(index="teacher", columns="y", values="entropy")
    key = {"entropy_y1": float(t4[1].mean()), "entropy_y0": float(t4[0].mean()),
           "teachers_higher_y0": int((t4[0] > t4[1]).sum()), "teachers": len(t4)}  # fmt: skip
    return Figure("figure5", caption, fig, data, key)


# KCD in five minutes ----------------------------------------------------------------------------------------
def five_minutes_runs(profile: Profile | str) -> list[RunConfig]:
    """The teaching notebook's KD and KCD runs, with the first of the notebook's seeds."""
    p = get_profile(profile)
    pair, seed = p.table2_pair, p.seeds[0]
    return unique([distill(p, pair, seed=seed), distill(p, pair, method="kcd", seed=seed)])


def stage_table(record: dict[str, Any], num_points: int) -> pd.DataFrame:
    """One row per KCD stage: points kept, fraction of N, points re-entered, images mixed at its start."""
    frame = pd.DataFrame(record["stages"]).set_index("stage")
    frame.insert(1, "kept fraction", frame["kept"] / num_points)
    return frame


def watch_kcd(store: RunStore, cfg: RunConfig) -> pd.DataFrame:
    """Replay the KCD run ``cfg`` epoch by epoch and snapshot the value record at each condensation: one row
    per (condensation, point) with ``V``, ``F``, the score, and whether the point was in the set before and
    after. The replay is cached beside the run (``watch.npz``, plain arrays read without pickle, so a copied store
    runs no code), so a second call trains nothing."""
    cache = store.path(cfg) / "watch.npz"
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as arrays:
                return pd.DataFrame({name: arrays[name] for name in arrays.files})
        except (OSError, ValueError, zipfile.BadZipFile):
            pass  # damaged: replay again
    trainer = store.build_trainer(cfg, progress=False)
    method, n = trainer.method, trainer.data.num_train
    frames = []
    while trainer.epoch < cfg.recipe.epochs:
        before = torch.zeros(n, dtype=torch.bool)
        before[method.points] = True
        trainer.train_epoch()
        if trainer.epoch % method.T or trainer.epoch >= cfg.recipe.epochs:
            continue
        after = torch.zeros(n, dtype=torch.bool)
        after[method.points] = True
        frames.append(pd.DataFrame({
            "condensation": trainer.epoch // method.T, "point": range(n),
            "V": method.values.values.cpu().numpy(), "F": method.values.frequency.cpu().numpy(),
            "score": method.values.score(method.options["alpha"], method.T).cpu().numpy(),
            "label": trainer.data.train_labels.cpu().numpy(),
            "before": before.numpy(), "after": after.numpy(),
        }))  # fmt: skip
    frame = pd.concat(frames, ignore_index=True)
    buf = io.BytesIO()
    np.savez(buf, **{name: frame[name].to_numpy() for name in frame.columns})
    atomic_write(cache, buf.getvalue())
    return frame


def accuracy_curves(store: RunStore, configs: dict[str, RunConfig]) -> pd.DataFrame:
    """Per-epoch test top-1 of several runs, long format (``run``, ``epoch``, ``top1``, ``points``)."""
    rows = []
    for name, cfg in configs.items():
        for e in store.record(cfg)["epochs"]:
            rows.append({"run": name, "epoch": e["epoch"], "top1": e["top1"], "points": e["points"]})
    return pd.DataFrame(rows)


ARTEFACTS = {
    "table1": (table1_runs, table1),
    "table2": (table2_runs, table2),
    "table3": (table3_runs, table3),
    "table4": (table4_runs, table4),
    "table5": (table5_runs, table5),
    "table6": (table6_runs, table6),
    "table7": (table7_runs, table7),
    "figure5": (figure5_runs, figure5),
}


def all_runs(profile: Profile | str) -> list[RunConfig]:
    """Every run the book needs for ``profile`` (for planning: count, estimate time)."""
    return unique([*(c for runs, _ in ARTEFACTS.values() for c in runs(profile)), *five_minutes_runs(profile)])


def plot_stages(stages: pd.DataFrame):
    """Bar chart of the kept fraction per stage, with re-entered and mixed points marked."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2), layout="constrained")
    ax.bar(stages.index, stages["kept fraction"], color="#4c72b0", label="kept fraction τ^t")
    for s, row in stages.iterrows():
        ax.annotate(f"+{int(row['reentered'])} back\n{int(row['mixed'])} mixed", (s, row["kept fraction"]),
                    ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.set_xlabel("stage t")
    ax.set_ylabel("fraction of N trained")
    ax.set_ylim(0, 1.25)
    ax.set_xticks(list(stages.index))
    plt.close(fig)
    return fig


def plot_values(watch: pd.DataFrame):
    """The distribution of the cost-aware value score at each condensation, kept (y=1) against dropped (y=0)."""
    import matplotlib.pyplot as plt

    steps = sorted(watch.condensation.unique())
    fig, axes = plt.subplots(1, len(steps), figsize=(2.6 * len(steps), 2.8), sharey=True, layout="constrained")
    axes = [axes] if len(steps) == 1 else list(axes)
    for ax, c in zip(axes, steps):
        w = watch[(watch.condensation == c) & (watch.F > 0)]
        bins = 30
        ax.hist(w[w.after].score, bins=bins, alpha=0.7, label="kept (y=1)")
        ax.hist(w[~w.after].score, bins=bins, alpha=0.7, label="dropped (y=0)")
        ax.set_title(f"after stage {c}", fontsize=9)
        ax.set_xlabel("(F/T)^α · V")
    axes[0].set_ylabel("points")
    axes[0].legend(fontsize=8)
    plt.close(fig)
    return fig


def plot_points(store: RunStore, cfg: RunConfig, watch: pd.DataFrame, per_row: int = 12):
    """Training images the last condensation dropped, and images that re-entered the set after a drop."""
    import matplotlib.pyplot as plt

    images = store.dataset(cfg.dataset).train_images.cpu()
    last = watch[watch.condensation == watch.condensation.max()]
    dropped = last[last.before & ~last.after].sort_values("score").point.tolist()
    back = watch[~watch.before & watch.after].point.drop_duplicates().tolist()
    fig, axes = plt.subplots(2, per_row, figsize=(per_row * 0.9, 2.4), layout="constrained")
    for r, (title, pts) in enumerate(((f"dropped at the last condensation ({len(dropped)})", dropped),
                                      (f"entered at a condensation after being out ({len(back)})", back))):  # fmt: skip
        for c in range(per_row):
            ax = axes[r, c]
            ax.set_axis_off()
            if c < len(pts):
                img = images[pts[c]].permute(1, 2, 0).numpy()
                ax.imshow(img[..., 0] if (img[..., 0] == img[..., -1]).all() else img, cmap="gray")
        axes[r, 0].set_title(title, loc="left", fontsize=9)
    plt.close(fig)
    return fig
