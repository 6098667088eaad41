"""Figure 5: what the value labels pick. (a) Training images with value label 1 and 0 at the end of a KCD run;
(b) the teacher's soft-label entropy averaged over y = 1 and y = 0 points, at T = 4 and T = 1, for each teacher.

Rows: one KC-KD run (seed 0) of the profile's Figure-5 student from each of its Figure-5 teachers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from .. import condense
from ..identity import RunConfig
from ..profiles import Profile
from ..runs import RunStore
from .captions import changed_settings
from .declare import Artefact, Field, distill_pair
from .format import Figure, run_hashes

if TYPE_CHECKING:
    from .session import Session  # the notebook's, for build(); a declaration needs no session


# Figure 5(b)'s four teachers (not named in the supplement: four of Table 1's) -> the teacher each profile runs in
# their place; course and smoke: teachers already trained for Table 1.
FIGURE5_TEACHERS = Field(
    "figure5_teachers",
    {t: t for t in ("resnet56", "wrn_40_2", "resnet32x4", "vgg13")},
    {"smoke": {"resnet56": "resnet20", "wrn_40_2": "wrn_16_2", "resnet32x4": "resnet14", "vgg13": "wrn_16_1"},
     "tiny": {"resnet56": "resnet20"}, "course": {"wrn_40_2": "wrn_40_2", "resnet32x4": "resnet32x4"}},
    teachers=lambda p, teachers: teachers.values(),
)  # fmt: skip
# The student distilled from each of them.
FIGURE5_STUDENT = Field("figure5_student", "resnet8x4", {"smoke": "resnet8", "tiny": "resnet8"})


def declare(p: Profile) -> dict[str, list[RunConfig]]:
    """Paper teacher -> the KC-KD run from the teacher standing in for it."""
    student = FIGURE5_STUDENT.of(p)
    return {paper: [distill_pair(p, t, student, method="kcd", seed=0)] for paper, t in FIGURE5_TEACHERS.of(p).items()}


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


def build(session: Session, images_per_row: int = 10) -> Figure:
    """Figure 5: (a) training images with value label 1 and 0 at the end of a KCD run; (b) the teacher's
    soft-label entropy averaged over y = 1 and y = 0 points, at T = 4 and T = 1, for each teacher."""
    import matplotlib.pyplot as plt

    p, store = session.profile, session.store
    declared = declare(p)
    rows = []
    for paper_teacher, teacher in FIGURE5_TEACHERS.of(p).items():
        cfg = declared[paper_teacher][0]
        y = value_labels(store.record(cfg))
        for temp in (4.0, 1.0):
            h = teacher_entropy(store, cfg, temp)
            for label in (1, 0):
                sel = y if label else ~y
                rows.append({"teacher": teacher, "paper_teacher": paper_teacher, "T": temp, "y": label,
                             "entropy": float(h[sel].mean()), "points": int(sel.sum())})  # fmt: skip
    data = pd.DataFrame(rows)

    first = next(iter(declared.values()))[0]
    y = value_labels(store.record(first))
    images = store.dataset(first.dataset).train_images.cpu()
    g = torch.Generator().manual_seed(0)
    # Drawn at the size the page shows it (about 900 px wide), so that its 10-12 pt text reads at 10-12 px.
    fig = plt.figure(figsize=(9, 6.5), layout="constrained")
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
        axes[r, 0].set_title(f"y = {label}", loc="left", fontsize=12)
    top.suptitle(f"(a) value labels at the end of KCD ({first.teacher_arch} → {first.arch})", fontsize=12)
    axs = bottom.subplots(1, 2)
    for ax, temp in zip(axs, (4.0, 1.0)):
        d = data[data["T"] == temp]
        teachers = list(dict.fromkeys(d.teacher))
        width = 0.38
        for j, label in enumerate((1, 0)):
            vals = [float(d[(d.teacher == t) & (d.y == label)].entropy.iloc[0]) for t in teachers]
            ax.bar([i + (j - 0.5) * width for i in range(len(teachers))], vals, width, label=f"y = {label}")
        ax.set_xticks(range(len(teachers)), teachers, fontsize=11, rotation=20 if len(teachers) > 2 else 0)
        ax.tick_params(axis="y", labelsize=11)
        ax.set_title(f"T = {temp:g}", fontsize=12)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.25)  # room above the bars for the legend
        ax.legend(loc="upper center", ncols=2, fontsize=11, frameon=False)
    axs[0].set_ylabel("mean entropy of the teacher's soft labels", fontsize=11)  # one label: the panels share it
    bottom.suptitle("(b) teacher soft-label entropy over kept (y = 1) and dropped (y = 0) points", fontsize=12)
    plt.close(fig)
    mapping = "; ".join(f"{k} → {v}" if k != v else k for k, v in FIGURE5_TEACHERS.of(p).items())
    runs = [cfgs[0] for cfgs in declared.values()]
    caption = (
        f"Figure 5. KC-KD runs of {FIGURE5_STUDENT.of(p)} from each teacher (paper → run: {mapping}), seed 0, on "
        f"{first.dataset}: {first.recipe.epochs} epochs, KCD stages of {p.stage_epochs}{changed_settings(runs)}. "
        f"Profile '{p.name}' ({p.description})."
    )
    t4 = data[data["T"] == 4.0].pivot_table(index="teacher", columns="y", values="entropy")
    key = {"entropy_y1": float(t4[1].mean()), "entropy_y0": float(t4[0].mean()),
           "teachers_higher_y0": int((t4[0] > t4[1]).sum()), "teachers": len(t4)}  # fmt: skip
    links = {f"{cfg.teacher_arch} → {cfg.arch}": run_hashes(store, [cfg]) for cfg in runs}
    return Figure("figure5", caption, fig, data, key, links)


ARTEFACT = Artefact("figure5", "Figure 5: what the value labels pick", "paper", 80, declare, build,
                    fields=(FIGURE5_TEACHERS, FIGURE5_STUDENT))  # fmt: skip
