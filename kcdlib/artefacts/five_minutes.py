"""KCD in five minutes: the teaching notebook's runs and the looks inside KCD's loop that it shows.

Rows: ``KD`` and ``KCD`` (KC-KD) of the profile's Table-2 pair, one run per seed of the notebook. The notebook
shows the method's pieces with the library's own functions (the KD loss, the value score, the schedule, the
summary); this module holds what a page should not spell out: reading the runs' records into a table and a curve,
the replay that snapshots the value record at each condensation, and the pictures.
"""

from __future__ import annotations

import ast
import inspect
import io
import textwrap
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import condense
from .. import data as datasets
from ..identity import RunConfig
from ..profiles import Profile, get_profile
from ..records import atomic_write
from ..runs import RunStore
from . import table2
from .captions import resolution
from .declare import Artefact, distill, seeds
from .format import Table, fmt, mean_sd, percent


def notebook_seeds(profile: str | Profile, given: Sequence[int] | None) -> Sequence[int] | None:
    """The seeds the notebook runs: ``given`` (its ``seeds`` parameter, checked by ``setup``) when set, else the
    teaching default of the profile (``ARTEFACT.default_seeds``), else None (the profile's own)."""
    if given is not None:
        return given
    name = profile.name if isinstance(profile, Profile) else profile
    return list(ARTEFACT.default_seeds[name]) if name in ARTEFACT.default_seeds else None


def pair(p: Profile) -> str:
    """The paper pair the notebook runs: Table 2's (its runs are Table 2's KD and KC-KD)."""
    return table2.TABLE2_PAIR.of(p)


def declare(p: Profile) -> dict[str, list[RunConfig]]:
    """Row -> its runs, one per seed of the profile (the notebook's ``seeds``)."""
    return {"KD": seeds(p, distill, pair(p)), "KCD": seeds(p, distill, pair(p), method="kcd")}


def five_minutes_runs(profile: Profile | str) -> list[RunConfig]:
    """Every run of the notebook: KD, then KCD, each for every seed."""
    return ARTEFACT.runs(get_profile(profile))


# -- reading the code ------------------------------------------------------------------------------------------
def source(obj: Any, docstring: bool = False):
    """The source of a library function or class, highlighted, without its docstring unless ``docstring``: the
    lines a page teaches, short enough to read."""
    from IPython.display import Code

    text = textwrap.dedent(inspect.getsource(obj))
    if not docstring:
        text = _without_docstrings(text)
    return Code(text, language="python")


def _without_docstrings(text: str) -> str:
    lines = text.splitlines()
    drop: set[int] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and ast.get_docstring(node):
            first = node.body[0]
            drop.update(range(first.lineno - 1, first.end_lineno))
            if first.end_lineno < len(lines) and not lines[first.end_lineno].strip():
                drop.add(first.end_lineno)  # the blank line after it
    return "\n".join(line for i, line in enumerate(lines) if i not in drop) + "\n"


# -- the schedule ----------------------------------------------------------------------------------------------
def schedule_frame(num_points: int, epochs: int, stage_epochs: int, rho: float) -> pd.DataFrame:
    """One row per stage ``t``: ``τ^t = ρ^{t·T/I}`` (Eq. 16), the points the paper schedule keeps (``⌊τ^t N⌋``,
    :func:`~kcdlib.condense.keep_schedule`) and those the released code's schedule keeps."""
    stages = epochs // stage_epochs
    paper = condense.keep_schedule("paper", num_points, epochs, stage_epochs, rho)
    official = condense.keep_schedule("official", num_points, epochs, stage_epochs, rho)
    frame = pd.DataFrame({
        "stage t": range(1, stages + 1),
        "epochs": [f"{(t - 1) * stage_epochs + 1}–{t * stage_epochs}" for t in range(1, stages + 1)],
        "τ^t": [rho ** (t / stages) for t in range(1, stages + 1)],
        "kept ⌊τ^t N⌋ (paper)": paper,
        "kept (released code)": official,
    })  # fmt: skip
    return frame.set_index("stage t")


def plot_schedule(frame: pd.DataFrame, num_points: int):
    """The kept fraction per stage, paper schedule against the released code's."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 2.8), layout="constrained")
    t = np.asarray(frame.index)
    ax.bar(t - 0.2, frame["kept ⌊τ^t N⌋ (paper)"] / num_points, 0.4, label="paper (Eq. 16)")
    ax.bar(t + 0.2, frame["kept (released code)"] / num_points, 0.4, label="released code")
    ax.set_xlabel("stage t")
    ax.set_ylabel("fraction of N trained")
    ax.set_xticks(list(t))
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=8, loc="lower left")
    plt.close(fig)
    return fig


# -- the runs' records -----------------------------------------------------------------------------------------
def records(store: RunStore, configs: Sequence[RunConfig]) -> list[dict[str, Any]]:
    """The finished records of ``configs`` (``session.ensure`` first)."""
    out = []
    for cfg in configs:
        rec = store.record(cfg)
        if rec is None:
            raise KeyError(f"run {store.path(cfg).name} ({cfg.arch} {cfg.method}, seed {cfg.seed}) is missing: "
                           "call session.ensure first")  # fmt: skip
        out.append(rec)
    return out


def stage_table(kcd_records: Sequence[dict[str, Any]], cfg: RunConfig, num_points: int) -> pd.DataFrame:
    """One row per KCD stage, over the runs of one row (seeds): the points trained (``kept``, the same for every
    seed), what Eq. 16 says it should be (:func:`~kcdlib.condense.keep_schedule` with the run's options), the
    fraction of ``N``, the images mixed at the stage's start and the points that came back after being left out
    (mean over seeds: which points come back depends on the seed)."""
    o = dict(cfg.method_options)
    schedule = condense.keep_schedule(o["schedule"], num_points, cfg.recipe.epochs, o["stage_epochs"], o["rho"])
    per_seed = [pd.DataFrame(rec["stages"]).set_index("stage") for rec in kcd_records]
    kept = per_seed[0]["kept"]
    if any(not f["kept"].equals(kept) for f in per_seed[1:]):
        raise ValueError("the runs of one row kept different numbers of points: they are not one schedule")
    reentered = pd.concat([f["reentered"] for f in per_seed], axis=1)
    frame = pd.DataFrame({
        "kept": kept,
        "keep_schedule": schedule,
        "kept fraction": kept / num_points,
        "mixed": per_seed[0]["mixed"],
        "re-entered (mean)": reentered.mean(axis=1),
    }, index=kept.index)  # fmt: skip
    return frame


def plot_stages(stages: pd.DataFrame):
    """Bar chart of the kept fraction per stage, with re-entered and mixed points marked."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2), layout="constrained")
    ax.bar(stages.index, stages["kept fraction"], color="#4c72b0", label="kept fraction τ^t")
    for s, row in stages.iterrows():
        ax.annotate(f"+{row['re-entered (mean)']:.0f} back\n{int(row['mixed'])} mixed", (s, row["kept fraction"]),
                    ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.set_xlabel("stage t")
    ax.set_ylabel("fraction of N trained")
    ax.set_ylim(0, 1.25)
    ax.set_xticks(list(stages.index))
    plt.close(fig)
    return fig


RESULT_FIELDS = {
    "final_top1": "top-1 % (last epoch)",
    "best_top1": "top-1 % (best epoch)",
    "computation": "C (counted)",
    "computation_formula": "C (formula)",
    "points_distilled": "points distilled",
}


def results(rows: Mapping[str, Sequence[dict[str, Any]]], dataset: str, seed_list: Sequence[int]) -> Table:
    """KD against KCD: each field of :data:`RESULT_FIELDS` as mean ± sd over the row's records (one per seed), and
    KCD − KD in points of top-1 and in test images."""
    cells, data = {}, []
    for row, recs in rows.items():
        for key, label in RESULT_FIELDS.items():
            mean, sd = mean_sd([float(r[key]) for r in recs])
            data.append({"row": row, "field": key, "mean": mean, "sd": sd, "runs": len(recs)})
            if key.startswith("computation"):  # the schedule's: the same for every seed
                cells[(row, label)] = percent(mean)
            elif key == "points_distilled":
                cells[(row, label)] = f"{mean:,.0f}"
            else:
                cells[(row, label)] = fmt(mean, sd)
    frame = pd.Series(cells).unstack().loc[list(rows), list(RESULT_FIELDS.values())]
    data = pd.DataFrame(data)
    top1 = data[data.field == "final_top1"].set_index("row")["mean"]
    test_images = datasets.spec(dataset).num_test
    key = {"kd_top1": float(top1["KD"]), "kcd_top1": float(top1["KCD"]),
           "gain": float(top1["KCD"] - top1["KD"]),
           "gain_images": float((top1["KCD"] - top1["KD"]) * test_images / 100)}  # fmt: skip
    many = f"mean ± sd over seeds {', '.join(map(str, seed_list))}" if len(seed_list) > 1 else f"seed {seed_list[0]}"
    caption = (
        f"KD against KC-KD on {dataset} ({many}). C: the knowledge points the teacher processed, relative to KD, "
        f"counted by the runs and from the schedule's formula. KCD − KD: {key['gain']:+.2f} points of top-1, "
        f"{key['gain_images']:+.1f} test images. {resolution(dataset)}"
    )
    return Table("kcd_in_five_minutes", caption, frame, data, key)


def accuracy_vs_computation(rows: Mapping[str, Sequence[dict[str, Any]]], num_points: int, epochs: int):
    """Per row and epoch: the computation spent so far (knowledge points distilled, relative to KD's whole run
    ``N · I``) and the test top-1, mean and sd over the row's records."""
    out = []
    for row, recs in rows.items():
        per_epoch = pd.DataFrame([{"seed": i, "epoch": e["epoch"], "points": e["points"], "top1": e["top1"]}
                                  for i, rec in enumerate(recs) for e in rec["epochs"]])  # fmt: skip
        per_epoch["computation"] = per_epoch.groupby("seed")["points"].cumsum() / (num_points * epochs)
        g = per_epoch.groupby("epoch")
        out.append(pd.DataFrame({"row": row, "computation": g["computation"].mean(), "top1": g["top1"].mean(),
                                 "top1_sd": g["top1"].std(ddof=1).fillna(0.0)}).reset_index())  # fmt: skip
    return pd.concat(out, ignore_index=True)


def plot_accuracy_vs_computation(curves: pd.DataFrame):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.2), layout="constrained")
    for row, c in curves.groupby("row", sort=False):
        ax.plot(c.computation, c.top1, marker="o", ms=3, label=row)
        ax.fill_between(c.computation, c.top1 - c.top1_sd, c.top1 + c.top1_sd, alpha=0.2)
    ax.set_xlabel("computation spent (knowledge points distilled / N·I)")
    ax.set_ylabel("test top-1 %")
    ax.legend()
    plt.close(fig)
    return fig


# -- inside a run: the value record at each condensation -------------------------------------------------------
WATCH_COLUMNS = ("condensation", "point", "V", "F", "value_sum", "score", "label", "before", "after")


def watch_kcd(store: RunStore, cfg: RunConfig) -> pd.DataFrame:
    """Replay the KCD run ``cfg`` epoch by epoch and snapshot the value record at each condensation: one row
    per (condensation, point) with ``V``, ``F``, the running sum of the point's per-epoch values, the score, its
    label, and whether the point was in the set before and after. The replay is cached beside the run
    (``watch.npz``, plain arrays read without pickle, so a copied store runs no code): a second call trains
    nothing."""
    cache = store.path(cfg) / "watch.npz"
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as arrays:
                if set(arrays.files) == set(WATCH_COLUMNS):
                    return pd.DataFrame({name: arrays[name] for name in WATCH_COLUMNS})
        except (OSError, ValueError, zipfile.BadZipFile):
            pass  # damaged or of an older layout: replay again
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
        state = method.values.state_dict()
        frames.append(pd.DataFrame({
            "condensation": trainer.epoch // method.T, "point": range(n),
            "V": method.values.values.cpu().numpy(), "F": state["frequency"].numpy(),
            "value_sum": state["value_sum"].numpy(),
            "score": method.values.score(method.options["cost_exponent"], method.T).cpu().numpy(),
            "label": trainer.data.train_labels.cpu().numpy(),
            "before": before.numpy(), "after": after.numpy(),
        }))  # fmt: skip
    frame = pd.concat(frames, ignore_index=True)
    buf = io.BytesIO()
    np.savez(buf, **{name: frame[name].to_numpy() for name in WATCH_COLUMNS})
    atomic_write(cache, buf.getvalue())
    return frame


def value_record_at(watch: pd.DataFrame, condensation: int) -> condense.ValueRecord:
    """The run's value record (OGVE) as it stood at ``condensation``, rebuilt from the replay's snapshot."""
    w = watch[watch.condensation == condensation].sort_values("point")
    n = len(w)
    record = condense.ValueRecord(n)
    zeros = torch.zeros(n, dtype=torch.float64)
    record.load_state_dict({
        "num_points": torch.tensor(n), "value_sum": torch.from_numpy(w.value_sum.to_numpy().copy()),
        "frequency": torch.from_numpy(w.F.to_numpy().astype(np.int64)), "epoch_sum": zeros,
        "epoch_count": torch.zeros(n, dtype=torch.int64),
    })  # fmt: skip
    return record


def plot_values(watch: pd.DataFrame):
    """The distribution of the cost-aware value score at each condensation, kept (y=1) against dropped (y=0)."""
    import matplotlib.pyplot as plt

    steps = sorted(watch.condensation.unique())
    cols = min(len(steps), 3)
    rows = -(-len(steps) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.4 * rows), sharey=True, layout="constrained",
                             squeeze=False)  # fmt: skip
    axes = list(axes.flat)
    for ax in axes[len(steps) :]:
        ax.set_axis_off()
    for ax, c in zip(axes, steps):
        w = watch[(watch.condensation == c) & (watch.F > 0)]
        bins = 30
        ax.hist(w[w.after].score, bins=bins, alpha=0.7, label="kept (y=1)")
        ax.hist(w[~w.after].score, bins=bins, alpha=0.7, label="dropped (y=0)")
        ax.set_title(f"after stage {c}", fontsize=9)
        ax.set_xlabel("(F/T)^α · V")
    for ax in axes[::cols]:
        ax.set_ylabel("points")
    axes[0].legend(fontsize=8)
    plt.close(fig)
    return fig


def _gray(image: torch.Tensor) -> np.ndarray:
    img = image.permute(1, 2, 0).numpy()
    return img[..., 0] if (img[..., 0] == img[..., -1]).all() else img


def plot_mixing(images: torch.Tensor, mixed: torch.Tensor, plan: condense.SummaryPlan, pairs: int = 8):
    """VAKS on real images: for ``pairs`` of the plan's pairs (spread over the ranking), the dropped point
    ``K0[j]``, the kept point ``K1L[j]`` it is mixed into, and the mixed image with its ratio ``r_j``."""
    import matplotlib.pyplot as plt

    m = plan.mix_targets.numel()
    if m == 0:
        raise ValueError("this condensation mixes no image (augment 'none', or nothing was dropped)")
    js = sorted(set(np.linspace(0, m - 1, min(pairs, m)).round().astype(int).tolist()))
    fig, axes = plt.subplots(3, len(js), figsize=(1.15 * len(js) + 1.2, 3.9), layout="constrained", squeeze=False)
    rows = (("K0[j]: dropped", images, plan.mix_sources), ("K1L[j]: kept", images, plan.mix_targets),
            ("mixed, stored", mixed, plan.mix_targets))  # fmt: skip
    for r, (title, imgs, idx) in enumerate(rows):
        for c, j in enumerate(js):
            ax = axes[r, c]
            ax.imshow(_gray(imgs[int(idx[j])].cpu()), cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"j={j}", fontsize=8)
            if r == 2:
                ax.set_xlabel(f"r_j={float(plan.mix_ratios[j]):.2f}", fontsize=8)
        axes[r, 0].set_ylabel(title, fontsize=8)
    plt.close(fig)
    return fig


# -- exercise 1: another value signal ----------------------------------------------------------------------------
def point_signals(store: RunStore, cfg: RunConfig, batch: int = 512) -> pd.DataFrame:
    """For every training point of ``cfg``'s dataset (un-augmented): the entropy of the run's final student (the
    signal KCD ranks by) and the point's distillation loss under the run's distiller options (γ·CE + α·T²·KL per
    point, for KD-style distillers), from the student and the teacher of the run."""
    import torch.nn.functional as F

    from .. import models

    data = store.dataset(cfg.dataset)
    student = models.load_checkpoint(cfg.arch, store.model_path(cfg), num_classes=data.num_classes)
    student = student.to(store.device).eval()
    teacher = store.load_teacher(cfg)
    o = dict(cfg.distiller_options)
    t = o.get("temperature", 4.0)
    rows = []
    with torch.no_grad():
        for start in range(0, data.num_train, batch):
            x = data.normalize(data.train_images[start : start + batch])
            y = data.train_labels[start : start + batch]
            z_s, z_t = student(x).float(), teacher(x).float()
            kl = F.kl_div(F.log_softmax(z_s / t, 1), F.softmax(z_t / t, 1), reduction="none").sum(1) * t**2
            loss = o.get("gamma", 0.0) * F.cross_entropy(z_s, y, reduction="none") + o.get("kd_weight", 0.0) * kl
            rows.append(pd.DataFrame({"entropy": condense.softmax_entropy(z_s).cpu().numpy(),
                                      "loss": loss.cpu().numpy()}))  # fmt: skip
    return pd.concat(rows, ignore_index=True).rename_axis("point")


# Three seeds on the CPU profile, so that the notebook can show mean ± sd (two of its six runs are Table 1's); the
# profile's seeds elsewhere (a GPU profile's runs are hours).
ARTEFACT = Artefact(
    "kcd_in_five_minutes", "KCD in five minutes", "method", 0, declare, default_seeds={"smoke": (0, 1, 2)}
)
