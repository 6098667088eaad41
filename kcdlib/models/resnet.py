"""CIFAR ResNets (He et al. 2016, 6n+2 layers, three stages) in RepDistiller's layout.

``resnet8x4`` / ``resnet32x4`` widen the stages to 64/128/256 channels after a 32-channel stem.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .common import features_or_logits, global_avg_pool, init_resnet, run_stages


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (output, the residual sum before the final ReLU)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        preact = out + shortcut
        return F.relu(preact), preact

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_preact(x)[0]


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stem, three stages of BasicBlocks, global average pool, ``fc``.

    ``widths`` = (stem, stage1, stage2, stage3) channels; ``depth`` = 6n + 2.
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_stage(widths[1], n, stride=1)
        self.layer2 = self._make_stage(widths[2], n, stride=2)
        self.layer3 = self._make_stage(widths[3], n, stride=2)
        self.fc = nn.Linear(widths[3], num_classes)

        init_resnet(self)

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_planes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.in_planes, planes, stride, downsample)]
        self.in_planes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False):
        """Logits, or ``(feats, logits)`` with feats = [stem, stage1, stage2, stage3, pooled] if ``is_feat``.

        With ``preact`` the stage features are the residual sums of each stage's last block before its ReLU.
        """
        f0 = self.relu(self.bn1(self.conv1(x)))
        feats, pres = run_stages(f0, (self.layer1, self.layer2, self.layer3))
        # The reference's fixed 8x8 kernel is the whole map at 32x32; pooling the whole map accepts any size.
        pooled = global_avg_pool(feats[-1])
        return features_or_logits(self.fc(pooled), is_feat, preact, [f0, *feats, pooled], [f0, *pres, pooled])


_THIN = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


def resnet8(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, _THIN, num_classes)


def resnet14(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(14, _THIN, num_classes)


def resnet20(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(20, _THIN, num_classes)


def resnet32(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, _THIN, num_classes)


def resnet44(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(44, _THIN, num_classes)


def resnet56(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(56, _THIN, num_classes)


def resnet110(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(110, _THIN, num_classes)


def resnet8x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, _WIDE, num_classes)


def resnet32x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, _WIDE, num_classes)
