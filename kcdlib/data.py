"""Datasets as knowledge points: every batch is ``(images, labels, point_indices)``.

A *knowledge point* ``k_i`` is training sample ``i`` (and the teacher's hint on it). The engine asks, each epoch, for
batches over a subset of point indices (the condensed set ``K^t``); the point index travels with each sample so
that values can be recorded per point.

``digits`` and ``cifar100`` keep the whole split on the training device as one uint8 tensor, and the paper's
augmentation (random crop with zero padding, horizontal flip, normalisation) runs for the whole batch at once on
that device: no worker processes, no per-sample Python. ``imagenet`` uses torchvision's ImageFolder and a
DataLoader, since 1.28M full-size images do not fit on a device.

All random draws of an epoch (order, crop offsets, flips) are made up front on the CPU from a generator seeded by
``(seed, epoch)``: an epoch is the same on any device, and a run resumed at epoch ``e`` sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DatasetMissing, UnknownName

# The paper's (RepDistiller's) CIFAR-100 normalisation, used for every device-resident dataset.
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def epoch_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    """A CPU generator that depends only on ``(seed, epoch, salt)``: the basis of exact resume."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 7919 + salt) % (2**63 - 1))
    return g


def crop_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int) -> torch.Tensor:
    """Random crop with zero padding, then horizontal flip, for a whole uint8 batch at once.

    ``images`` is ``(B, C, H, W)``; sample ``b`` is cut from the zero-padded image at rows ``dy[b] : dy[b] + H``
    and columns ``dx[b] : dx[b] + W`` (offsets in ``[0, 2 * pad]``), then mirrored where ``flip[b]``. This is
    torchvision's ``RandomCrop(H, padding=pad)`` followed by ``RandomHorizontalFlip()``, done by indexing.
    """
    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = dy.view(b, 1) + torch.arange(h, device=images.device).view(1, h)
    cols = dx.view(b, 1) + torch.arange(w, device=images.device).view(1, w)
    # Mirroring is a reversed column index, so crop and flip are one gather.
    cols = torch.where(flip.view(b, 1), cols.flip(1), cols)
    batch = torch.arange(b, device=images.device).view(b, 1, 1)
    out = padded.permute(0, 2, 3, 1)[batch, rows.view(b, h, 1), cols.view(b, 1, w)]
    return out.permute(0, 3, 1, 2)


@dataclass
class DeviceDataset:
    """A split pair held on one device as uint8 ``(N, C, H, W)`` images and int64 labels.

    ``train_images`` may be replaced by a run's own copy (KCD's knowledge augmentation writes into it);
    the tensors given by the user are never modified in place by the library.
    """

    name: str
    num_classes: int
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: tuple[float, float, float] = CIFAR100_MEAN
    std: tuple[float, float, float] = CIFAR100_STD
    pad: int = 4
    _stats: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_train(self) -> int:
        return int(self.train_images.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.train_images.device

    def to(self, device: str | torch.device) -> DeviceDataset:
        move = {k: getattr(self, k).to(device) for k in ("train_images", "train_labels", "test_images", "test_labels")}
        return DeviceDataset(self.name, self.num_classes, mean=self.mean, std=self.std, pad=self.pad, **move)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, C, H, W)`` -> float32, scaled to [0, 1] and standardised with the dataset's mean/std."""
        mean, std = self._moments(images.device)
        return (images.float().div_(255.0) - mean) / std

    def _moments(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Made once per device: a new tensor per batch would be a blocking host-to-device copy on CUDA.
        key = str(device)
        if key not in self._stats:
            self._stats[key] = (
                torch.tensor(self.mean, device=device).view(1, -1, 1, 1),
                torch.tensor(self.std, device=device).view(1, -1, 1, 1),
            )
        return self._stats[key]

    def train_batches(
        self,
        indices: torch.Tensor | None,
        batch_size: int,
        seed: int,
        epoch: int,
        images: torch.Tensor | None = None,
    ) -> Iterator[Batch]:
        """Augmented, normalised batches over the points ``indices`` (all points when None), in a seeded order.

        ``images`` overrides ``train_images`` (a run's own, possibly augmented, copy). The last batch may be
        smaller, as with RepDistiller's DataLoader (drop_last=False).
        """
        images = self.train_images if images is None else images
        if indices is None:
            indices = torch.arange(self.num_train)
        indices = indices.cpu()
        g = epoch_generator(seed, epoch)
        n = int(indices.numel())
        order = indices[torch.randperm(n, generator=g)]
        dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
        flip = torch.rand(n, generator=g) < 0.5
        dev = self.device
        order, dy, dx, flip = (t.to(dev, non_blocking=True) for t in (order, dy, dx, flip))
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            idx = order[sl]
            x = crop_flip(images[idx], dy[sl], dx[sl], flip[sl], self.pad)
            yield self.normalize(x), self.train_labels[idx], idx

    def test_batches(self, batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised, un-augmented test batches in a fixed order."""
        for start in range(0, self.test_images.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            yield self.normalize(self.test_images[sl]), self.test_labels[sl]


def load_digits(device: str | torch.device = "cpu", image_size: int = 16) -> DeviceDataset:
    """scikit-learn's bundled 8x8 digits as a small 3-channel uint8 image dataset (offline, embedded).

    Fixed stratified split (80 % / 20 %, ``random_state=0``): 1,437 training points and 360 test images. The 8x8
    images (values 0..16) are scaled to 0..255 and upsampled bilinearly to ``image_size``; the channel is
    repeated three times so every CIFAR architecture accepts them. Padding is scaled with the image (4 at 32).
    """
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    if image_size < 16:
        raise UnknownName(f"digits image_size must be at least 16 (the zoo's smallest input), got {image_size}")
    bunch = sk_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.round().clamp_(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, stratify=bunch.target, random_state=0)
    tr, te = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(te))
    return DeviceDataset(
        "digits", 10, x[tr].contiguous(), y[tr], x[te].contiguous(), y[te], pad=max(1, image_size // 8)
    ).to(device)


def read_cifar100_split(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of the python version of CIFAR-100 (a pickled dict with ``data`` (N, 3072) uint8 in CHW order
    and ``fine_labels``) as ``(N, 3, 32, 32)`` uint8 images and int64 labels."""
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    images = torch.from_numpy(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).copy())
    return images, torch.as_tensor(entry["fine_labels"], dtype=torch.int64)


def load_cifar100(root: str, device: str | torch.device = "cpu", download: bool = False) -> DeviceDataset:
    """CIFAR-100 from ``root/cifar-100-python/{train,test}``, held on ``device``.

    ``download=True`` fetches the archive with torchvision first (needs internet access).
    """
    folder = os.path.join(root, "cifar-100-python")
    if download:
        from torchvision.datasets import CIFAR100

        CIFAR100(root, train=True, download=True)
    missing = [s for s in ("train", "test") if not os.path.isfile(os.path.join(folder, s))]
    if missing:
        raise DatasetMissing(
            f"CIFAR-100 was not found under '{os.path.abspath(root)}': expected the files 'train' and 'test' of "
            f"the python version in '{os.path.abspath(folder)}' (missing: {', '.join(missing)}). Download "
            "cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it into "
            f"'{os.path.abspath(root)}', or pass --download on a machine with internet access."
        )
    try:
        tr_x, tr_y = read_cifar100_split(os.path.join(folder, "train"))
        te_x, te_y = read_cifar100_split(os.path.join(folder, "test"))
    except (OSError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as err:
        raise DatasetMissing(f"CIFAR-100 under '{os.path.abspath(folder)}' could not be read: {err!r}") from err
    return DeviceDataset("cifar100", 100, tr_x, tr_y, te_x, te_y).to(device)


class ImageNetData:
    """ImageNet from ImageFolder ``root/train`` and ``root/val``, with torchvision's standard transforms.

    Same interface as :class:`DeviceDataset` (``train_batches`` yields ``(images, labels, point_indices)``), but
    the images are decoded by DataLoader workers and moved to ``device`` batch by batch.
    """

    name = "imagenet"
    num_classes = 1000
    pad = 0

    def __init__(self, root: str, device: str | torch.device = "cpu", workers: int = 8):
        from torchvision import datasets, transforms

        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(root, split)):
                raise DatasetMissing(
                    f"ImageNet was not found under '{os.path.abspath(root)}': expected ImageFolder directories "
                    f"'{os.path.join(root, 'train')}' and '{os.path.join(root, 'val')}', one sub-folder per class."
                )
        norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.train_set = datasets.ImageFolder(
            os.path.join(root, "train"),
            transforms.Compose(
                [
                    transforms.RandomResizedCrop(224),
                    transforms.RandomHorizontalFlip(),
                    transforms.ToTensor(),
                    norm,
                ]
            ),
        )
        self.test_set = datasets.ImageFolder(
            os.path.join(root, "val"),
            transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), norm]),
        )
        self.num_classes = len(self.train_set.classes)
        self.device = torch.device(device)
        self.workers = workers
        self.train_labels = torch.as_tensor(self.train_set.targets, dtype=torch.int64)

    @property
    def num_train(self) -> int:
        return len(self.train_set)

    @property
    def image_size(self) -> int:
        return 224

    def _loader(self, dataset, order, batch_size):
        return torch.utils.data.DataLoader(
            torch.utils.data.Subset(_Indexed(dataset), order.tolist()),
            batch_size=batch_size,
            shuffle=False,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    def train_batches(self, indices, batch_size, seed, epoch, images=None) -> Iterator[Batch]:
        if images is not None:
            raise NotImplementedError("ImageNet images are decoded from files; a replacement tensor is not possible")
        if indices is None:
            indices = torch.arange(self.num_train)
        g = epoch_generator(seed, epoch)
        order = indices.cpu()[torch.randperm(int(indices.numel()), generator=g)]
        # Workers draw the crop/flip randomness; seed them per epoch for reproducible augmentation.
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        for x, y, idx in self._loader(self.train_set, order, batch_size):
            yield (x.to(self.device, non_blocking=True), y.to(self.device), idx.to(self.device))

    def test_batches(self, batch_size: int = 256):
        for x, y, _ in self._loader(self.test_set, torch.arange(len(self.test_set)), batch_size):
            yield x.to(self.device, non_blocking=True), y.to(self.device)


class _Indexed(torch.utils.data.Dataset):
    """Wraps a dataset so each item also carries its point index."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return x, y, i


DATASETS = ("digits", "cifar100", "imagenet")


def load_dataset(name: str, root: str = "data", device: str | torch.device = "cpu", download: bool = False):
    """Load a dataset by name: ``digits`` (embedded), ``cifar100`` or ``imagenet`` (under ``root``)."""
    if name == "digits":
        return load_digits(device)
    if name == "cifar100":
        return load_cifar100(root, device, download)
    if name == "imagenet":
        return ImageNetData(root, device)
    raise UnknownName(f"unknown dataset '{name}'; known datasets: {', '.join(DATASETS)}")
