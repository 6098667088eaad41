"""ImageNet as ImageFolder directories (1.28M full-size images fit on no device), decoded by DataLoader workers
with PIL (``decode="pil"``, the default) or on the training device (``decode="gpu"``: :mod:`.gpu_decode`)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import torch

from .. import files
from ..errors import BadOption, DatasetInvalid, DatasetMissing
from . import fingerprints
from .device import Batch, batch_part, epoch_generator
from .gpu_decode import SIZE, DeviceDecoder, crop_draws
from .mixing import MixedImageFolder, MixRecipes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# How training images are decoded and augmented: a run option (the pixels differ), see kcdlib.identity.RunConfig.
DECODES = ("pil", "gpu")


def _imagenet_folder(root: str) -> str:
    """The folder holding ImageNet's ``train`` and ``val``: ``root/imagenet`` (the README's layout), else ``root``."""
    for folder in (os.path.join(root, "imagenet"), root):
        if all(os.path.isdir(os.path.join(folder, s)) for s in ("train", "val")):
            return folder
    layout = os.path.join(os.path.abspath(root), "imagenet")
    raise DatasetMissing(
        f"ImageNet was not found under '{os.path.abspath(root)}': expected ImageFolder directories "
        f"'{os.path.join(layout, 'train')}' and '{os.path.join(layout, 'val')}', one sub-folder per class "
        "(or 'train' and 'val' directly under the data root)."
    )


def _image_folder(path: str, transform):
    from torchvision import datasets

    try:
        return datasets.ImageFolder(path, transform)
    except FileNotFoundError as err:  # torchvision's word for a split without class folders or images
        raise DatasetInvalid(f"ImageNet split '{os.path.abspath(path)}' holds no images: {err}") from err


class ImageNetData:
    """ImageNet from ImageFolder ``root/imagenet/train`` and ``root/imagenet/val``, with torchvision's standard
    transforms. Where ``root/imagenet`` lacks them, ``root/train`` and ``root/val`` are used.

    Same interface as :class:`DeviceDataset` (``train_batches`` yields ``(images, labels, point_indices)``), but
    the images are decoded from files batch by batch: ``decode="pil"`` by ``workers`` DataLoader processes with
    PIL and torchvision's transforms, moved to ``device``; ``decode="gpu"`` on ``device`` itself (nvjpeg on CUDA,
    libjpeg-turbo on a CPU), ``workers`` threads reading the files (:class:`.gpu_decode.DeviceDecoder`). ``crop``
    is the side of the training crop (the paper's 224; validation images are resized to ``crop · 256/224`` and
    centre-cropped; the device decoder crops 224 only).
    """

    name = "imagenet"
    num_classes = 1000
    pad = 0

    def __init__(
        self, root: str, device: str | torch.device = "cpu", workers: int = 8, crop: int = 224, decode: str = "pil"
    ):
        from torchvision import transforms

        if decode not in DECODES:
            raise BadOption(f"unknown decode '{decode}': one of {', '.join(DECODES)}")
        if decode == "gpu" and crop != SIZE:
            raise BadOption(f"decode 'gpu' crops {SIZE} x {SIZE} (the paper's), got crop {crop}")

        folder = _imagenet_folder(root)
        norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.train_set = _image_folder(
            os.path.join(folder, "train"),
            transforms.Compose(
                [
                    transforms.RandomResizedCrop(crop),
                    transforms.RandomHorizontalFlip(),
                    transforms.ToTensor(),
                    norm,
                ]
            ),
        )
        self.test_set = _image_folder(
            os.path.join(folder, "val"),
            transforms.Compose(
                [transforms.Resize(round(crop * 256 / 224)), transforms.CenterCrop(crop), transforms.ToTensor(), norm]
            ),
        )
        self.num_classes = len(self.train_set.classes)
        self.device = torch.device(device)
        self.workers = workers
        self.crop = crop
        self.train_labels = torch.as_tensor(self.train_set.targets, dtype=torch.int64)
        self.decode = decode
        self.decoder = DeviceDecoder(self.device, IMAGENET_MEAN, IMAGENET_STD, workers) if decode == "gpu" else None

    @property
    def num_train(self) -> int:
        return len(self.train_set)

    @property
    def image_size(self) -> int:
        return self.crop

    def _loader(self, dataset, order, batch_size=1, batches: list[slice] | None = None):
        """Batches of ``batch_size`` over ``order``, or the position ranges ``batches`` of it."""
        sampler = None if batches is None else [list(range(b.start, b.stop)) for b in batches]
        return torch.utils.data.DataLoader(
            torch.utils.data.Subset(_Indexed(dataset), order.tolist()),
            batch_size=1 if sampler else batch_size,
            batch_sampler=sampler,
            shuffle=False,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    def train_batches(self, indices, batch_size, seed, epoch, images=None, shard=None) -> Iterator[Batch]:
        """``images``: the run's knowledge augmentation as :class:`~kcdlib.data.mixing.MixRecipes` (KCD), or None.
        Files cannot be rewritten, so each mixed point is mixed in the worker after decoding, before the crop.
        ``shard``: as :meth:`DeviceDataset.train_batches`; only this process's parts are decoded."""
        if images is not None and not isinstance(images, MixRecipes):
            raise NotImplementedError("ImageNet images are decoded from files: the run's own images come as "
                                      "MixRecipes, a replacement tensor is not possible")  # fmt: skip
        train_set = self.train_set if images is None else MixedImageFolder(self.train_set, images)
        if indices is None:
            indices = torch.arange(self.num_train)
        g = epoch_generator(seed, epoch)
        order = indices.cpu()[torch.randperm(int(indices.numel()), generator=g)]
        n = int(order.numel())
        parts = [batch_part(start, min(start + batch_size, n), shard) for start in range(0, n, batch_size)]
        if self.decoder is not None:
            # The whole epoch's crops and flips, one row per position of the order, drawn before the first batch.
            draws = crop_draws(n, g)
            # Mixed points are mixed on the device, after decoding and before the crop, as the workers do.
            mix = None if images is None else images.image
            samples, labels = self.train_set.samples, self.train_labels
            if shard is None or batch_size % shard[1] == 0:
                # Every part but the last holds batch_size / N points: the rank's parts, in batches of that size.
                mine = torch.cat([torch.arange(p.start, p.stop) for p in parts])
                yield from self.decoder.train_batches(samples, labels, order[mine], draws[mine],
                                                      batch_size // (shard[1] if shard else 1), mix)  # fmt: skip
            else:
                for p in parts[:-1] if parts[-1].stop == parts[-1].start else parts:
                    yield from self.decoder.train_batches(samples, labels, order[p], draws[p], p.stop - p.start, mix)
        else:
            # Workers draw the crop/flip randomness; seed them per epoch (and process) for reproducible augmentation.
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)) + (shard[0] if shard else 0))
            batches = [p for p in parts if p.stop > p.start]
            for x, y, idx in self._loader(train_set, order, batches=batches):
                yield (x.to(self.device, non_blocking=True), y.to(self.device), idx.to(self.device))
        if parts and parts[-1].stop == parts[-1].start:  # a last batch of fewer points than processes: none here
            none = torch.empty(0, dtype=torch.int64, device=self.device)
            yield torch.empty(0, 3, self.image_size, self.image_size, device=self.device), none, none

    def test_batches(self, batch_size: int = 256, shard=None):
        part = batch_part(0, len(self.test_set), shard)  # with shard, this process's contiguous part of the split
        if self.decoder is not None:
            yield from self.decoder.test_batches(self.test_set.samples[part], batch_size)
            return
        for x, y, _ in self._loader(self.test_set, torch.arange(part.start, part.stop), batch_size):
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


def _image_files(split: str) -> list[str]:
    """The files ImageFolder takes from ``split``, as sorted paths relative to it."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        samples = make_dataset(split, find_classes(split)[1], IMG_EXTENSIONS)
    except FileNotFoundError as err:  # torchvision's word for a split without class folders or images
        raise DatasetInvalid(f"ImageNet split '{os.path.abspath(split)}' holds no images: {err}") from err
    return sorted(os.path.relpath(path, split) for path, _ in samples)


def imagenet_fingerprint(root: str) -> dict:
    """Every image of both splits hashed by path and content (once, with a progress bar: 1.33M files), cached in
    the user's cache for a key of each file's size, mtime, ctime and inode (:mod:`.fingerprints`)."""
    from tqdm.auto import tqdm

    folder = _imagenet_folder(root)
    try:
        listing = {split: _image_files(os.path.join(folder, split)) for split in ("train", "val")}
        key, settled = fingerprints.stat_key(folder, [f"{split}/{rel}" for split in listing for rel in listing[split]])

        def split_sha(split: str) -> str:
            digest = hashlib.sha256()
            where = os.path.join(folder, split)
            for rel in tqdm(listing[split], desc=f"fingerprinting imagenet {split}", unit="img", dynamic_ncols=True):
                # Path and content hash per file: renaming a class or moving an image changes the fingerprint.
                content = files.sha256_file(os.path.join(where, rel))
                digest.update(os.fsencode(rel) + b"\0" + bytes.fromhex(content))
            return digest.hexdigest()

        def compute() -> dict:
            return {
                "name": "imagenet",
                "num_train": len(listing["train"]),
                "num_test": len(listing["val"]),
                "train_sha256": split_sha("train"),
                "test_sha256": split_sha("val"),
            }

        return fingerprints.cached_fingerprint(folder, "imagenet", key, settled, compute)
    except OSError as err:
        raise DatasetMissing(f"ImageNet under '{os.path.abspath(folder)}' could not be read: {err}") from err
