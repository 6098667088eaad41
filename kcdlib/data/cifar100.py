"""CIFAR-100, the python version: read through an unpickler that builds only what the format holds."""

from __future__ import annotations

import codecs
import os
import pickle

import numpy as np
import torch

from .. import files
from ..errors import DatasetInvalid, DatasetMissing
from .device import DeviceDataset

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct

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


def cifar100_fingerprint(root: str) -> dict:
    """Both split files hashed by content, every time: reading 180 MB costs about a second, and a cache keyed by
    file times could be fooled (a label edited with the mtime put back)."""
    folder, train, test = _cifar100_files(root)
    try:
        return {
            "name": "cifar100",
            "num_train": len(_load_cifar100_split(train)[1]),
            "num_test": len(_load_cifar100_split(test)[1]),
            "train_sha256": files.sha256_file(train),
            "test_sha256": files.sha256_file(test),
        }
    except OSError as err:
        raise DatasetMissing(f"CIFAR-100 under '{os.path.abspath(folder)}' could not be read: {err}") from err
