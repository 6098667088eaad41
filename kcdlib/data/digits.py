"""scikit-learn's bundled digits: the embedded dataset of the smoke profile (no download, CPU in minutes)."""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UnknownName
from .device import DeviceDataset


def load_digits(device: str | torch.device = "cpu", image_size: int = 16) -> DeviceDataset:
    """scikit-learn's bundled 8x8 digits as a small 3-channel uint8 image dataset (offline, embedded).

    Fixed stratified split (80 % / 20 %, ``random_state=0``): 1,437 training points and 360 test images. The 8x8
    images (values 0..16) are scaled to 0..255 and upsampled bilinearly to ``image_size``; the channel is
    repeated three times so every CIFAR architecture accepts them. Padding is scaled with the image (4 at 32).

    Read once per process and image size (:func:`_digits`): the images a process trains on are the very ones its
    fingerprint hashed, even if scikit-learn's file changes while it runs.
    """
    return _digits(image_size).to(device)


@functools.cache
def _digits(image_size: int) -> DeviceDataset:
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
    )


@functools.cache
def digits_fingerprint() -> dict:
    data = load_digits("cpu")

    def sha(images, labels) -> str:
        digest = hashlib.sha256(images.numpy().tobytes())
        digest.update(labels.numpy().tobytes())
        return digest.hexdigest()

    return {
        "name": "digits",
        "num_train": data.num_train,
        "num_test": int(data.test_images.shape[0]),
        "train_sha256": sha(data.train_images, data.train_labels),
        "test_sha256": sha(data.test_images, data.test_labels),
    }
