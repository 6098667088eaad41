"""A reference-style KD training loop: the BASELINE that ``bench_epoch.py`` measures the engine against.

This is not a product path and nothing in ``kcdlib`` uses it. It is written here, with our own networks
(``kcdlib.models``), in the shape of the training loop of RepDistiller (``train_student.py`` /
``helper/loops.py:train_distill``) and of the released KCD code built on it, so that the engine's speed can be
compared with how the paper's experiments were run:

- a ``torch.utils.data.Dataset`` holding the split as HWC uint8 arrays and returning, per sample, a PIL image
  passed through torchvision transforms: ``RandomCrop(size, padding)``, ``RandomHorizontalFlip()``,
  ``ToTensor()``, ``Normalize`` with the paper's CIFAR-100 mean/std (and the sample's index, as RepDistiller's
  ``CIFAR100Instance``);
- a ``DataLoader`` with worker processes (RepDistiller uses 8; an argument here), ``shuffle=True``, batch 64,
  ``pin_memory`` on CUDA; fp32 throughout, ``cudnn.benchmark = True`` on CUDA as RepDistiller sets it;
- per step: the batch copied to the device, the teacher's forward under ``no_grad``, the student's forward, the
  KD loss ``γ·CE + α·T²·KL`` with ``γ = 0.1, α = 0.9, T = 4`` (as ``kcdlib.distillers.KD``), SGD (momentum 0.9,
  weight decay 5e-4, lr 0.05);
- the per-step host synchronisations of those loops: ``loss.item()`` and the top-1 accuracy into
  ``AverageMeter``s (RepDistiller), and the entropy of the student's softmax copied to the host with ``.cpu()``
  into a numpy array indexed by the samples' indices (the released KCD code's value record).

The networks are called for logits only (RepDistiller asks for features too, which costs the same
convolutions): the comparison is about the pipeline around the same forwards and backwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

# The paper's (RepDistiller's) CIFAR-100 normalisation.
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


class IndexedImages(Dataset):
    """RepDistiller's ``CIFAR100Instance``: ``(transform(PIL image), target, index)`` per sample.

    ``images`` are uint8 ``(N, C, H, W)`` (kept as HWC numpy, as torchvision's CIFAR datasets keep them).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.data = images.detach().cpu().permute(0, 2, 3, 1).contiguous().numpy()
        self.targets = [int(t) for t in labels.detach().cpu().tolist()]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img, target = self.data[index], self.targets[index]
        img = Image.fromarray(img)
        if self.transform is not None:
            img = self.transform(img)
        return img, target, index


def train_transform(size: int = 32, padding: int = 4, mean=CIFAR100_MEAN, std=CIFAR100_STD):
    """RepDistiller's CIFAR-100 training transform."""
    return transforms.Compose(
        [
            transforms.RandomCrop(size, padding=padding),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def make_loader(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 64,
    workers: int = 2,
    device: str | torch.device = "cpu",
    padding: int = 4,
    mean=CIFAR100_MEAN,
    std=CIFAR100_STD,
    seed: int = 0,
) -> DataLoader:
    """The training DataLoader: shuffled, ``workers`` worker processes, pinned memory on CUDA."""
    size = int(images.shape[-1])
    dataset = IndexedImages(images, labels, train_transform(size, padding, mean, std))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=torch.device(device).type == "cuda",
        generator=torch.Generator().manual_seed(seed),
    )


def batches_forever(loader: DataLoader) -> Iterator:
    """Epoch after epoch of the loader (workers restart at each epoch, as in RepDistiller's loop)."""
    while True:
        yield from loader


class DistillKL(nn.Module):
    """RepDistiller's ``DistillKL``: ``T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))`` summed, divided by the batch."""

    def __init__(self, T: float):
        super().__init__()
        self.T = T

    def forward(self, y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
        p_s = F.log_softmax(y_s / self.T, dim=1)
        p_t = F.softmax(y_t / self.T, dim=1)
        return F.kl_div(p_s, p_t, reduction="sum") * (self.T**2) / y_s.shape[0]


class AverageMeter:
    """RepDistiller's running average (``update`` takes host numbers: one sync per call)."""

    def __init__(self):
        self.val = self.avg = self.sum = 0.0
        self.count = 0

    def update(self, val: float, n: int = 1) -> None:
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count


class ReferenceKD:
    """One student distilled from one frozen teacher, a step at a time, the way RepDistiller's loop does it."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        num_points: int,
        device: str | torch.device = "cpu",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        gamma: float = 0.1,
        alpha: float = 0.9,
        temperature: float = 4.0,
    ):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.student, self.teacher = student.to(self.device), teacher.to(self.device)
        self.gamma, self.alpha = gamma, alpha
        self.criterion_cls = nn.CrossEntropyLoss()
        self.criterion_div = DistillKL(temperature)
        self.optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.losses, self.top1 = AverageMeter(), AverageMeter()
        # The released KCD code's per-sample record, on the host.
        self.entropy = np.zeros(num_points, dtype=np.float32)
        self.train()

    def train(self) -> None:
        """Start of an epoch: student in training mode, teacher in eval mode."""
        self.student.train()
        self.teacher.eval()

    def loss(self, s_logits: torch.Tensor, t_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.gamma * self.criterion_cls(s_logits, target) + self.alpha * self.criterion_div(s_logits, t_logits)

    def step(self, x: torch.Tensor, target: torch.Tensor, index: torch.Tensor) -> float:
        """One SGD step on a batch from the loader; returns the batch's loss (``loss.item()``)."""
        x = x.float().to(self.device)
        target = target.to(self.device)
        with torch.no_grad():
            logit_t = self.teacher(x)
        logit_s = self.student(x)
        loss = self.loss(logit_s, logit_t, target)

        n = x.shape[0]
        value = loss.item()
        self.losses.update(value, n)
        correct = logit_s.detach().argmax(dim=1).eq(target).float().sum()
        self.top1.update(correct.item() * 100.0 / n, n)

        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

        # KCD's released code: the entropy of the student's softmax, copied to the host every step.
        with torch.no_grad():
            logp = F.log_softmax(logit_s.detach(), dim=1)
            entropy = -(logp.exp() * logp).sum(dim=1)
        self.entropy[index.numpy()] = entropy.cpu().numpy()
        return value
