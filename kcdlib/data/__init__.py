"""Datasets as knowledge points: every batch is ``(images, labels, point_indices)``.

A *knowledge point* ``k_i`` is training sample ``i`` (and the teacher's hint on it). The engine asks, each epoch, for
batches over a subset of point indices (the condensed set ``K^t``); the point index travels with each sample so
that values can be recorded per point.

``digits`` and ``cifar100`` keep the whole split on the training device as one uint8 tensor, and the paper's
augmentation (random crop with zero padding, horizontal flip, normalisation) runs for the whole batch at once on
that device: no worker processes, no per-sample Python. ``imagenet`` uses torchvision's ImageFolder, since 1.28M
full-size images do not fit on a device, decoded by PIL in DataLoader workers or, with ``decode="gpu"``, by nvjpeg
on the device (:mod:`.gpu_decode`).

All random draws of an epoch (order, crop offsets, flips) are made up front on the CPU from a generator seeded by
``(seed, epoch)``: an epoch is the same on any device, and a run resumed at epoch ``e`` sees exactly the batches an
uninterrupted run would have seen.

:func:`fingerprint` identifies a dataset's splits by content, so a run store can tell when the data under a root
changed.

Each dataset is one :class:`DatasetSpec` in :data:`DATASETS`: its loader, its fingerprint, the facts known
without its files (classes, image side, split sizes) and its default optimisation recipe. Adding a dataset is one
module beside these and one entry there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import BadOption
from ..recipe import Recipe
from ..registry import Registry
from .cifar100 import cifar100_fingerprint, load_cifar100, read_cifar100_split
from .device import CIFAR100_MEAN, CIFAR100_STD, Batch, DeviceDataset, batch_part, crop_flip, epoch_generator
from .digits import digits_fingerprint, load_digits
from .imagenet import DECODES, IMAGENET_MEAN, IMAGENET_STD, ImageNetData, imagenet_fingerprint

__all__ = [
    "CIFAR100_MEAN", "CIFAR100_STD", "DATASETS", "DECODES", "IMAGENET_MEAN", "IMAGENET_STD", "Batch", "DatasetSpec",
    "DeviceDataset", "ImageNetData", "batch_part", "check_decode", "crop_flip", "epoch_generator", "fingerprint",
    "load_cifar100", "load_dataset", "load_digits", "read_cifar100_split", "spec",
]  # fmt: skip

# Architectures that RepDistiller trains with lr 0.01 instead of 0.05.
LOW_LR_ARCHS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")


def _cifar_lr(arch: str) -> float:
    return 0.01 if arch in LOW_LR_ARCHS else 0.05


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: ``load(root, device)``, ``fingerprint(root)`` (see :func:`fingerprint`), the facts a plan needs
    without the files, and ``recipe(arch, epochs)``, its protocol for one architecture (``epochs`` overrides the
    length; the lr milestones scale with it). ``decodes``: how its images can be decoded (datasets decoded from
    files: ``load(root, device, decode=...)`` takes each)."""

    name: str
    num_classes: int
    image_size: int
    num_train: int  # training points N
    num_test: int
    load: Callable[[str, torch.device | str], Any]
    fingerprint: Callable[[str], dict]
    recipe: Callable[[str, int | None], Recipe]
    decodes: tuple[str, ...] = ("pil",)

    @property
    def points_per_test_image(self) -> float:
        """How much one test image moves a top-1 accuracy, in percentage points (digits: 0.28)."""
        return 100.0 / self.num_test


DATASETS: Registry[DatasetSpec] = Registry("dataset", {
    # 1,437 points: 30 epochs are 690 steps of 64, enough for the small networks to converge.
    "digits": DatasetSpec(
        "digits", 10, 16, 1_437, 360, lambda root, device: load_digits(device), lambda root: dict(digits_fingerprint()),
        lambda arch, epochs=None: Recipe(epochs or 30, lr=_cifar_lr(arch)),
    ),
    "cifar100": DatasetSpec(
        "cifar100", 100, 32, 50_000, 10_000, load_cifar100, cifar100_fingerprint,
        lambda arch, epochs=None: Recipe(epochs or 240, lr=_cifar_lr(arch)),
    ),
    "imagenet": DatasetSpec(
        "imagenet", 1000, 224, 1_281_167, 50_000, ImageNetData, imagenet_fingerprint,
        lambda arch, epochs=None: Recipe(epochs or 90, batch_size=256, lr=0.1, weight_decay=1e-4,
                                         milestones=(30 / 90, 60 / 90, 80 / 90)),
        decodes=DECODES,
    ),
})  # fmt: skip


def spec(name: str) -> DatasetSpec:
    """The spec of dataset ``name``; an unknown name is one line that lists the known ones."""
    return DATASETS[name]


def check_decode(name: str, decode: str, device: str | torch.device | None = None) -> None:
    """``decode`` must be one of dataset ``name``'s ways of decoding, and ``gpu`` needs a CUDA ``device`` (when
    given): one line that says what to use instead."""
    if decode not in DECODES:
        raise BadOption(f"unknown decode '{decode}': one of {', '.join(DECODES)}")
    if decode not in spec(name).decodes:
        raise BadOption(f"decode '{decode}' is for datasets decoded from files (imagenet); {name} is held in memory "
                        "as one uint8 tensor: use decode 'pil' (the default)")  # fmt: skip
    if decode == "gpu" and device is not None and torch.device(device).type != "cuda":
        raise BadOption(f"decode 'gpu' decodes JPEGs with nvjpeg on a CUDA device, and the device is "
                        f"'{device}': use decode 'pil' there (or a CUDA device)")  # fmt: skip


def load_dataset(name: str, root: str = "data", device: str | torch.device = "cpu", decode: str = "pil"):
    """Load a dataset by name: ``digits`` (embedded), ``cifar100`` or ``imagenet`` (under ``root``), decoded
    ``decode`` (see :func:`check_decode`; ``gpu`` also runs on a CPU device here, for tests and benchmarks)."""
    check_decode(name, decode)
    return spec(name).load(root, device) if decode == "pil" else spec(name).load(root, device, decode=decode)


def fingerprint(name: str, root: str = "data") -> dict:
    """What identifies a dataset's data: ``{"name", "num_train", "num_test", "train_sha256", "test_sha256"}``.

    A run store compares it to tell when the data under ``root`` changed, test split included. ``digits`` hashes
    its uint8 images and int64 labels (once per process), ``cifar100`` its two files (every time), ``imagenet``
    every image of both splits (read once, with a progress bar, then cached in the user's cache folder for the
    files' sizes, times and inodes; see :mod:`.fingerprints`).
    """
    return spec(name).fingerprint(root)
