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

:func:`fingerprint` identifies a dataset's training split by content, so a run store can tell when the data under a
root changed.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import os
import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import files
from .errors import DatasetInvalid, DatasetMissing, UnknownName

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct

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


# Everything the python version of CIFAR-100 asks a pickle loader for: numpy's array rebuilding, under its numpy 1
# (the published files) and numpy 2 module names. Dicts, lists, ints and strings need no global.
_CIFAR100_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    # Python 3 writes bytes in protocol 2 as _codecs.encode(text, "latin1"): a text codec, no code of the file's.
    ("_codecs", "encode"): codecs.encode,
}


class _Cifar100Unpickler(pickle.Unpickler):
    """An unpickler that builds only what a CIFAR-100 file holds, so a planted file cannot run code."""

    def __init__(self, file, where: str):
        super().__init__(file, encoding="latin1")
        self.where = where

    def find_class(self, module: str, name: str):
        # Every callable a pickle can call (REDUCE, INST, OBJ, NEWOBJ, extensions) is looked up here first.
        found = _CIFAR100_GLOBALS.get((module, name))
        if found is None:
            raise DatasetInvalid(
                f"{self.where} is not a CIFAR-100 file: it asks to load {module}.{name}, which the CIFAR-100 format "
                "never holds (refused, nothing was run)"
            )
        return found


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


def _load_cifar100_split(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One split file, unpickled without running code and checked: ``(N, 3072)`` uint8 data, ``N`` int64 labels."""
    where = os.path.abspath(path)

    def invalid(problem: str) -> DatasetInvalid:
        return DatasetInvalid(f"{where} is not a CIFAR-100 file: {problem}")

    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise invalid("it is empty")
        try:
            entry = _Cifar100Unpickler(f, where).load()
        except (DatasetInvalid, OSError):
            raise
        except (EOFError, pickle.UnpicklingError) as err:
            if isinstance(err, EOFError) or "truncated" in str(err):
                raise invalid("it ends early (an interrupted download or copy?)") from err
            raise invalid(f"it is not a pickle ({_one_line(err)})") from err
        except Exception as err:  # whatever a damaged pickle makes the loader or numpy raise
            raise invalid(f"it is not a pickle of the python version ({_one_line(err)})") from err
    if not isinstance(entry, dict):
        raise invalid(f"it holds a {type(entry).__name__}, expected a dict with 'data' and 'fine_labels'")
    found = {}
    for key in ("data", "fine_labels"):
        # Loaded with latin1, the published files have str keys; files written by Python 3 may have bytes keys.
        for k in (key, key.encode()):
            if k in entry:
                found[key] = entry[k]
                break
        else:
            keys = ", ".join(repr(k)[:40] for k in list(entry)[:8]) + (", ..." if len(entry) > 8 else "")
            raise invalid(f"it has no '{key}' entry (it has: {keys or 'nothing'})")
    data, labels = found["data"], found["fine_labels"]
    if not isinstance(data, np.ndarray):
        raise invalid(f"data is a {type(data).__name__}, expected a (N, 3072) uint8 array")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise invalid(f"data of shape {tuple(data.shape)} {data.dtype}, expected (N, 3072) uint8")
    n = data.shape[0]
    if n == 0:
        raise invalid("it holds no images (data of shape (0, 3072))")
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise invalid(f"fine_labels of shape {tuple(labels.shape)} {labels.dtype}, expected a list of ints")
        labels = labels.tolist()
    if not isinstance(labels, (list, tuple)):
        raise invalid(f"fine_labels is a {type(labels).__name__}, expected a list of ints")
    # bool is an int subclass, and a label list of True/False is no CIFAR-100 file.
    wrong = next((i for i, v in enumerate(labels) if type(v) is not int), None)
    if wrong is not None:
        raise invalid(f"label {labels[wrong]!r:.40} (image {wrong}) is a {type(labels[wrong]).__name__}, not an int")
    if len(labels) != n:
        raise invalid(f"it has {len(labels)} labels for {n} images")
    wrong = next((i for i, v in enumerate(labels) if not 0 <= v < 100), None)
    if wrong is not None:
        raise invalid(f"label {labels[wrong]} outside 0..99 (image {wrong})")
    return data, np.asarray(labels, dtype=np.int64)


def read_cifar100_split(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of the python version of CIFAR-100 (a pickled dict with ``data`` (N, 3072) uint8 in CHW order
    and ``fine_labels``) as ``(N, 3, 32, 32)`` uint8 images and int64 labels.

    The pickle is read by an unpickler that builds only dicts, lists, ints, strings and numpy arrays: a file that
    asks for anything else is refused before any of it runs. A file of another shape raises
    :class:`DatasetInvalid` naming the file and the problem.
    """
    data, labels = _load_cifar100_split(path)
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def _cifar100_files(root: str) -> tuple[str, str, str]:
    """``(folder, train, test)`` of CIFAR-100 under ``root``, or the error that says where to put them."""
    folder = os.path.join(root, "cifar-100-python")
    missing = [s for s in ("train", "test") if not os.path.isfile(os.path.join(folder, s))]
    if missing:
        raise DatasetMissing(
            f"CIFAR-100 was not found under '{os.path.abspath(root)}': expected the files 'train' and 'test' of "
            f"the python version in '{os.path.abspath(folder)}' (missing: {', '.join(missing)}). Download "
            "cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it into "
            f"'{os.path.abspath(root)}' (it unpacks to 'cifar-100-python/')."
        )
    return folder, os.path.join(folder, "train"), os.path.join(folder, "test")


def load_cifar100(root: str, device: str | torch.device = "cpu", download: bool = False) -> DeviceDataset:
    """CIFAR-100 from ``root/cifar-100-python/{train,test}``, held on ``device``.

    ``download=True`` fetches the archive with torchvision first (needs internet access).
    """
    if download:
        from torchvision.datasets import CIFAR100

        CIFAR100(root, train=True, download=True)
    folder, train, test = _cifar100_files(root)
    try:
        tr_x, tr_y = read_cifar100_split(train)
        te_x, te_y = read_cifar100_split(test)
    except OSError as err:
        raise DatasetMissing(f"CIFAR-100 under '{os.path.abspath(folder)}' could not be read: {err}") from err
    return DeviceDataset("cifar100", 100, tr_x, tr_y, te_x, te_y).to(device)


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
    the images are decoded by DataLoader workers and moved to ``device`` batch by batch.
    """

    name = "imagenet"
    num_classes = 1000
    pad = 0

    def __init__(self, root: str, device: str | torch.device = "cpu", workers: int = 8):
        from torchvision import transforms

        folder = _imagenet_folder(root)
        norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.train_set = _image_folder(
            os.path.join(folder, "train"),
            transforms.Compose(
                [
                    transforms.RandomResizedCrop(224),
                    transforms.RandomHorizontalFlip(),
                    transforms.ToTensor(),
                    norm,
                ]
            ),
        )
        self.test_set = _image_folder(
            os.path.join(folder, "val"),
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


# -- fingerprints ----------------------------------------------------------------------------------------------
_FINGERPRINT_FILE = ".kcd-fingerprint.json"
# A file rewritten within its file system's timestamp granularity keeps its mtime (2 s on FAT): a size-and-mtime
# key is written only for files that had not changed for longer than that when it was taken.
_SETTLED_NS = 2_000_000_000


def fingerprint(name: str, root: str = "data") -> dict:
    """What identifies a dataset's training split: ``{"name", "num_train", "num_test", "train_sha256"}``.

    A run store compares it to tell when the data under ``root`` changed. ``digits`` hashes its uint8 images and
    int64 labels (once per process); ``cifar100`` hashes the ``train`` file, ``imagenet`` every training image
    (read once, with a progress bar). Both cache the result beside the data in ``.kcd-fingerprint.json`` (under
    ``$XDG_CACHE_HOME/kcdlib/fingerprints`` when that folder is not writable), reused while the files' sizes and
    mtimes are those it was computed from.
    """
    if name == "digits":
        return dict(_digits_fingerprint())
    if name == "cifar100":
        return _cifar100_fingerprint(root)
    if name == "imagenet":
        return _imagenet_fingerprint(root)
    raise UnknownName(f"unknown dataset '{name}'; known datasets: {', '.join(DATASETS)}")


@functools.cache
def _digits_fingerprint() -> dict:
    data = load_digits("cpu")
    digest = hashlib.sha256(data.train_images.numpy().tobytes())
    digest.update(data.train_labels.numpy().tobytes())
    return {
        "name": "digits",
        "num_train": data.num_train,
        "num_test": int(data.test_images.shape[0]),
        "train_sha256": digest.hexdigest(),
    }


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cifar100_fingerprint(root: str) -> dict:
    folder, train, test = _cifar100_files(root)
    try:
        started = time.time_ns()
        stats = {"train": os.stat(train), "test": os.stat(test)}
        key = {split: [st.st_size, st.st_mtime_ns] for split, st in stats.items()}

        def compute() -> dict:
            return {
                "name": "cifar100",
                "num_train": len(_load_cifar100_split(train)[1]),
                "num_test": len(_load_cifar100_split(test)[1]),
                "train_sha256": _sha256_file(train),
            }

        settled = started - max(st.st_mtime_ns for st in stats.values()) > _SETTLED_NS
        return _cached_fingerprint(folder, "cifar100", key, settled, compute)
    except OSError as err:
        raise DatasetMissing(f"CIFAR-100 under '{os.path.abspath(folder)}' could not be read: {err}") from err


def _image_files(split: str) -> list[str]:
    """The files ImageFolder takes from ``split``, as sorted paths relative to it."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        samples = make_dataset(split, find_classes(split)[1], IMG_EXTENSIONS)
    except FileNotFoundError as err:  # torchvision's word for a split without class folders or images
        raise DatasetInvalid(f"ImageNet split '{os.path.abspath(split)}' holds no images: {err}") from err
    return sorted(os.path.relpath(path, split) for path, _ in samples)


def _imagenet_fingerprint(root: str) -> dict:
    from tqdm.auto import tqdm

    folder = _imagenet_folder(root)
    try:
        started = time.time_ns()
        listing = {split: _image_files(os.path.join(folder, split)) for split in ("train", "val")}
        stamp, newest = hashlib.sha256(), 0
        for split, files in listing.items():
            for rel in files:
                st = os.stat(os.path.join(folder, split, rel))
                stamp.update(os.fsencode(f"{split}/{rel}\0{st.st_size}\0{st.st_mtime_ns}\n"))
                newest = max(newest, st.st_mtime_ns)
        key = {"listing_sha256": stamp.hexdigest(), "files": sum(map(len, listing.values()))}

        def compute() -> dict:
            digest = hashlib.sha256()
            train = os.path.join(folder, "train")
            for rel in tqdm(listing["train"], desc="fingerprinting imagenet train", unit="img", dynamic_ncols=True):
                # Path and content hash per file: renaming a class or moving an image changes the fingerprint.
                digest.update(os.fsencode(rel) + b"\0" + bytes.fromhex(_sha256_file(os.path.join(train, rel))))
            return {
                "name": "imagenet",
                "num_train": len(listing["train"]),
                "num_test": len(listing["val"]),
                "train_sha256": digest.hexdigest(),
            }

        return _cached_fingerprint(folder, "imagenet", key, started - newest > _SETTLED_NS, compute)
    except OSError as err:
        raise DatasetMissing(f"ImageNet under '{os.path.abspath(folder)}' could not be read: {err}") from err


def _fingerprint_caches(folder: str) -> list[str]:
    """Where ``folder``'s fingerprint may be cached: beside the data, then in the user's cache directory."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec says a relative path is to be ignored
        base = os.path.join(os.path.expanduser("~"), ".cache")
    name = hashlib.sha256(os.fsencode(os.path.abspath(folder))).hexdigest()
    return [os.path.join(folder, _FINGERPRINT_FILE), os.path.join(base, "kcdlib", "fingerprints", f"{name}.json")]


def _cached_fingerprint(folder: str, name: str, key: dict, settled: bool, compute: Callable[[], dict]) -> dict:
    """The fingerprint cached for ``key``, else ``compute()``'s, cached where a file can be written when the data
    had ``settled`` (not changed for :data:`_SETTLED_NS` before its key was taken)."""
    caches = _fingerprint_caches(folder)
    for path in caches:
        cached = _read_fingerprint_cache(path, name, key)
        if cached is not None:
            return cached
    result = compute()
    if settled:
        for path in caches:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                _write_json_atomic(path, {"key": key, "fingerprint": result})
                break
            except OSError:
                continue  # a read-only data folder, then a read-only home: computed again next time
    return result


def _read_fingerprint_cache(path: str, name: str, key: dict) -> dict | None:
    """The fingerprint in the cache file at ``path`` if it is for ``key``; None for a missing or damaged file."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    fp = record.get("fingerprint")
    if not isinstance(fp, dict) or set(fp) != {"name", "num_train", "num_test", "train_sha256"}:
        return None
    counts = (fp["num_train"], fp["num_test"])
    sha = fp["train_sha256"]
    if fp["name"] != name or any(type(c) is not int or c < 0 for c in counts):
        return None
    if not isinstance(sha, str) or len(sha) != 64 or set(sha) - set("0123456789abcdef"):
        return None
    return fp


def _write_json_atomic(path: str, obj: dict) -> None:
    """The cache file, whole or not at all, readable by a group sharing the data (:mod:`kcdlib.files`)."""
    files.atomic_write(Path(path), (json.dumps(obj, indent=1) + "\n").encode())
