"""Device-resident datasets: the whole split as one uint8 tensor on the training device, augmented a batch at a
time there (random crop with zero padding, horizontal flip, normalisation), and the seeded epoch generators that
make an epoch the same on any device and after a resume."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# The paper's (RepDistiller's) CIFAR-100 normalisation, used for every device-resident dataset.
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)

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
