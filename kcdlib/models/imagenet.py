"""ImageNet ResNet18 / ResNet34: torchvision's networks with the zoo's ``forward(x, is_feat, preact)``.

They subclass torchvision's ``ResNet`` unchanged, so torchvision checkpoints load with strict=True.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .common import features_or_logits, run_stages


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


class ImageNetResNet(ResNet):
    """torchvision ResNet whose forward also returns [stem, layer1..layer4, pooled] features on request."""

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False):
        """Logits, or ``(feats, logits)`` if ``is_feat``; the stem feature ``f0`` is taken before the max-pool.

        With ``preact`` the stage features are the residual sums of each stage's last block before its ReLU.
        """
        f0 = self.relu(self.bn1(self.conv1(x)))
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        feats, pres = run_stages(self.maxpool(f0), stages, _block_preact)
        pooled = torch.flatten(self.avgpool(feats[-1]), 1)
        return features_or_logits(self.fc(pooled), is_feat, preact, [f0, *feats, pooled], [f0, *pres, pooled])


def ResNet18(num_classes: int = 1000) -> ImageNetResNet:
    """Same construction and initialisation as ``torchvision.models.resnet18(weights=None)``."""
    return ImageNetResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)


def ResNet34(num_classes: int = 1000) -> ImageNetResNet:
    """Same construction and initialisation as ``torchvision.models.resnet34(weights=None)``."""
    return ImageNetResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes)
