"""KCD in five minutes: the teaching notebook's runs (one KD and one KCD run of the same pair) and the looks
inside KCD's loop it shows: the stages, the values at each condensation, the images kept and dropped.

Rows: ``KD`` and ``KCD`` of the profile's Table-2 pair, with the first of the notebook's seeds."""

from __future__ import annotations

import io
import zipfile
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..profiles import Profile, get_profile
from ..runs import RunConfig, RunStore, atomic_write
from .common import Artefact, distill, unique


def declare(p: Profile) -> dict[str, list[RunConfig]]:
    """Run name -> its run (the first of the profile's seeds)."""
    kd, kcd = five_minutes_runs(p)
    return {"KD": [kd], "KCD": [kcd]}


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


ARTEFACT = Artefact("kcd_in_five_minutes", "KCD in five minutes", "method", 0, declare)
