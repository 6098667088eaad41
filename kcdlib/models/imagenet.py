"""ImageNet ResNet18 / ResNet34: torchvision's networks with the zoo's ``forward(x, is_feat, preact)``.

They subclass torchvision's ``ResNet`` unchanged, so torchvision checkpoints load with strict=True.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet


def _block_preact(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Run a torchvision residual block; return (output, the residual sum before its final ReLU)."""
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        out = block.bn3(block.conv3(out))
    elif isinstance(block, BasicBlock):
        out = block.bn2(block.conv2(out))
    else:
        raise TypeError(f"unsupported block type {type(block).__name__}")
    identity = x if block.downsample is None else block.downsample(x)
    preact = out + identity
    return F.relu(preact), preact


def _run_stage(stage: nn.Sequential, x: Tensor) -> tuple[Tensor, Tensor]:
    *head, last = stage
    for block in head:
        x = block(x)
    return _block_preact(last, x)


class ImageNetResNet(ResNet):
    """torchvision ResNet whose forward also returns [stem, layer1..layer4, pooled] features on request."""

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False):
        """Logits, or ``(feats, logits)`` if ``is_feat``; the stem feature is taken before the max-pool.

        With ``preact`` the stage features are the residual sums of each stage's last block before its ReLU.
        """
        f0 = self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(f0)
        feats, pre = [f0], [f0]
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x, p = _run_stage(stage, x)
            feats.append(x)
            pre.append(p)
        pooled = torch.flatten(self.avgpool(x), 1)
        logits = self.fc(pooled)
        if not is_feat:
            return logits
        return (pre if preact else feats) + [pooled], logits


def ResNet18(num_classes: int = 1000) -> ImageNetResNet:
    """Same construction and initialisation as ``torchvision.models.resnet18(weights=None)``."""
    return ImageNetResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)


def ResNet34(num_classes: int = 1000) -> ImageNetResNet:
    """Same construction and initialisation as ``torchvision.models.resnet34(weights=None)``."""
    return ImageNetResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes)
