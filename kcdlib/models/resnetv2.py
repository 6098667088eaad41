"""ResNet50 for CIFAR (bottleneck blocks, 3x3 stem without max-pool) in RepDistiller's layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .resnet import run_stage


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), each with BN; shortcut = 1x1 conv + BN when the shape changes."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (output, the residual sum before the final ReLU)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        preact = out + self.shortcut(x)
        return F.relu(preact), preact

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_preact(x)[0]


class ResNetV2(nn.Module):
    """Four stages (64, 128, 256, 512 bottleneck planes) after a stride-1 3x3 stem; classifier ``linear``."""

    def __init__(self, num_blocks: tuple[int, int, int, int], num_classes: int = 100):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_stage(64, num_blocks[0], stride=1)
        self.layer2 = self._make_stage(128, num_blocks[1], stride=2)
        self.layer3 = self._make_stage(256, num_blocks[2], stride=2)
        self.layer4 = self._make_stage(512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * Bottleneck.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(Bottleneck(self.in_planes, planes, s))
            self.in_planes = planes * Bottleneck.expansion
        return nn.Sequential(*layers)

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False):
        """Logits, or ``(feats, logits)`` with feats = [stem, stage1..stage4, pooled] if ``is_feat``.

        With ``preact`` the stage features are the residual sums of each stage's last block before its ReLU.
        """
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1, f1_pre = run_stage(self.layer1, f0)
        f2, f2_pre = run_stage(self.layer2, f1)
        f3, f3_pre = run_stage(self.layer3, f2)
        f4, f4_pre = run_stage(self.layer4, f3)
        f5 = torch.flatten(self.avgpool(f4), 1)
        logits = self.linear(f5)
        if not is_feat:
            return logits
        if preact:
            return [f0, f1_pre, f2_pre, f3_pre, f4_pre, f5], logits
        return [f0, f1, f2, f3, f4, f5], logits


def ResNet50(num_classes: int = 100) -> ResNetV2:
    return ResNetV2((3, 4, 6, 3), num_classes)
