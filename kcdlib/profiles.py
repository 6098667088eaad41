"""Profiles: how much of the paper the book reproduces, defined in one place.

A profile names the dataset, the schedule (``epochs`` of ``stage_epochs`` each, six stages like the paper's 240/40)
and, for every paper pair ``teacher/student`` the book shows, the pair it actually runs. The paper profile runs
the paper's pairs; the short ones run stand-ins small enough for their machine, and every table says so. What a
table runs of its own on each profile (Table 1's pairs and distillers, Table 5's α values ...) is declared in the
table's module (:class:`kcdlib.artefacts.declare.Field`), so that adding a table touches one place.

- ``smoke`` (default): digits on the CPU, stand-in pairs, 12 epochs of 2 (six stages); the whole book in minutes.
- ``course``: CIFAR-100 on one GPU in about an hour, two pairs (KD and CRD in Table 1), 30 epochs of 5.
- ``paper``: CIFAR-100 with the paper's pairs and hyperparameters (240 epochs of 40), ImageNet for Table 3.
- ``tiny``: the test suite's profile: every notebook runs in seconds (numbers mean nothing).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DatasetMissing
from .registry import Registry


def split_pair(pair: str) -> tuple[str, str]:
    """``'teacher/student'`` -> ``('teacher', 'student')``."""
    teacher, student = pair.split("/")
    return teacher, student


@dataclass(frozen=True)
class Profile:
    """What one build of the book runs, the part every artefact shares. ``pairs`` maps each paper pair to the pair
    run in its place; ``teacher_checkpoints`` maps an architecture to a RepDistiller checkpoint file used instead of
    training that teacher. What a table runs of its own (Table 1's pairs and distillers, Table 5's α ...) is that
    artefact's, in its module (``kcdlib/artefacts/``)."""

    name: str
    description: str
    dataset: str
    device: str
    epochs: int  # I
    stage_epochs: int  # T (epochs / stage_epochs = 6 stages for the short profiles, as in the paper)
    teacher_epochs: int
    seeds: tuple[int, ...]
    pairs: dict[str, str]
    teacher_checkpoints: dict[str, str] = field(default_factory=dict)
    # The course's knobs (a notebook's parameters), empty = the paper's defaults: options of every distiller that
    # has them (temperature, gamma, kd_weight, beta) and of every KCD run (rho, cost_exponent of the value score).
    loss_options: dict[str, float] = field(default_factory=dict)
    kcd_options: dict[str, float] = field(default_factory=dict)
    # Seeds of the runs the findings page weighs against seed noise (Table 1's KD and KC-KD rows), when more than
    # ``seeds``: a difference needs two or more a side for an interval (kcdlib.artefacts.noise).
    noise_seeds: tuple[int, ...] = ()
    # The artefacts' own fields a notebook's parameters set (name -> value; kcdlib.artefacts.declare.Field): each
    # artefact declares its fields, with the paper's and every profile's values, in its own module.
    artefact_fields: dict[str, Any] = field(default_factory=dict)

    @property
    def stages(self) -> int:
        return self.epochs // self.stage_epochs

    def comparison_seeds(self) -> tuple[int, ...]:
        """The seeds of the runs weighed against seed noise: ``noise_seeds`` where they are more than ``seeds``."""
        return self.noise_seeds if len(self.noise_seeds) > len(self.seeds) else self.seeds

    def run_pair(self, paper_pair: str) -> tuple[str, str]:
        """The (teacher, student) this profile runs in place of ``paper_pair``."""
        return split_pair(self.pairs.get(paper_pair, paper_pair))

    def with_options(self, **changes) -> Profile:
        """A copy with some fields changed (the notebooks' parameters: seeds, device, epochs ...)."""
        from dataclasses import replace

        return replace(self, **{k: v for k, v in changes.items() if v is not None})


_SMOKE_PAIRS = {
    "wrn_40_2/wrn_16_2": "resnet20/resnet8",
    "resnet56/resnet20": "resnet14/resnet8",
    "ResNet34/ResNet18": "resnet20/resnet8",
}

PROFILES: Registry[Profile] = Registry("profile", {
    "smoke": Profile(
        name="smoke",
        description="digits on the CPU, small stand-in pairs, 12 epochs in six stages of 2",
        dataset="digits",
        device="cpu",
        epochs=12,
        stage_epochs=2,
        teacher_epochs=15,
        seeds=(0,),
        # Three seeds for KD and KC-KD of Table 1: 4 runs more (the five-minute notebook already runs seeds 0-2 of
        # one pair), for the findings page's verdicts against seed noise.
        noise_seeds=(0, 1, 2),
        pairs=_SMOKE_PAIRS,
    ),
    "tiny": Profile(
        name="tiny",
        description="the test suite's profile: digits, one pair, KD only in Table 1, one value per grid, "
        "3 epochs in three stages of 1",
        dataset="digits",
        device="cpu",
        epochs=3,
        stage_epochs=1,
        teacher_epochs=10,
        seeds=(0,),
        pairs=_SMOKE_PAIRS,
    ),
    "course": Profile(
        # Sized to fit a class: at most an hour on one H200 with 4 runs at a time (kcd book --jobs-per-device 4),
        # by kcdlib.estimate.gpu_estimate, an EXTRAPOLATION from the H200 figures of kcdlib/gpu_figures.json, as
        # recorded in benchmarks/README.md ("Measured figures", log benchmarks/results/gpu_check_h200_2026-11-28.log):
        # resnet32x4 -> resnet8x4 KD, fp32 eager, batch 64, a 50,000-image epoch in 7.08 s (7,063 images/s,
        # `bench_epoch.py --mode engine --steps 0`), and four concurrent runs at 18,592 images/s against 6,275 for
        # one (2.96x, efficiency 0.74); other pairs scaled by multiply-adds or layers, whichever is slower. At 60
        # epochs and four pairs x three distillers it was 49 runs, 2,940 epochs, about 7.8 h one after another.
        # Now: 27 runs, 810 epochs, about 1.7 h one after another, 34 min with 4 jobs if every slot stayed busy,
        # about 59 min as kcd book schedules them (notebook by notebook, teachers first): `kcd book --profile
        # course --plan` prints it; on the GPU machine it times the steps there.
        name="course",
        description="CIFAR-100 on one GPU in about an hour: two pairs, KD and CRD in Table 1, 30 epochs in six "
        "stages of 5",
        dataset="cifar100",
        device="cuda",
        epochs=30,
        stage_epochs=5,
        teacher_epochs=30,
        seeds=(0,),
        # Table 3's ImageNet pair stands in as Table 1's resnet32x4/resnet8x4: its runs are Table 1's.
        pairs={"ResNet34/ResNet18": "resnet32x4/resnet8x4"},
    ),
    "paper": Profile(
        name="paper",
        description="CIFAR-100 with the paper's pairs (240 epochs in six stages of 40), ImageNet for Table 3",
        dataset="cifar100",
        device="cuda",
        epochs=240,
        stage_epochs=40,
        teacher_epochs=240,
        seeds=(0,),
        pairs={},
    ),
})  # fmt: skip


# Where RepDistiller (and the KCD authors, who distil from the same teachers) publish a teacher, under the folder
# of its `save/models/`: e.g. `wrn_40_2_vanilla/ckpt_epoch_240.pth`.
PUBLISHED_TEACHER = "{arch}_vanilla/ckpt_epoch_240.pth"


def published_teachers(teachers_dir: str | os.PathLike | None, archs) -> dict[str, str]:
    """The published teacher checkpoints found in ``teachers_dir`` for ``archs`` (architecture -> file)."""
    if teachers_dir is None:
        return {}
    folder = Path(teachers_dir)
    if not folder.is_dir():
        raise DatasetMissing(f"the teachers folder '{folder}' does not exist: it should hold RepDistiller's "
                             f"checkpoints as {PUBLISHED_TEACHER.format(arch='<arch>')}")  # fmt: skip
    found = {arch: folder / PUBLISHED_TEACHER.format(arch=arch) for arch in archs}
    return {arch: str(path) for arch, path in found.items() if path.is_file()}


def get_profile(name: str | Profile) -> Profile:
    """The profile called ``name`` (a :class:`Profile` is returned as is)."""
    if isinstance(name, Profile):
        return name
    return PROFILES[name]
