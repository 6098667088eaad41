"""VGG with batch norm for CIFAR (no fully connected stack: one linear classifier), RepDistiller's layout.

The registered ``vggN`` are RepDistiller's ``vggN_bn`` variants, which its published teachers use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import features_or_logits, init_fan_out

# Output channels of the 3x3 convolutions in each of the five blocks.
_CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _make_block(widths: list[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        in_channels = width
    # The block ends at its last BN so the forward can keep the pre-ReLU output as a feature.
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """Five conv blocks separated by 2x2 max-pools, global average pool, linear ``classifier``."""

    def __init__(self, config: list[list[int]], num_classes: int = 100):
        super().__init__()
        self.block0 = _make_block(config[0], 3)
        self.block1 = _make_block(config[1], config[0][-1])
        self.block2 = _make_block(config[2], config[1][-1])
        self.block3 = _make_block(config[3], config[2][-1])
        self.block4 = _make_block(config[4], config[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(config[4][-1], num_classes)

        init_fan_out(self, conv_bias=True, linear_std=0.01)

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False):
        """Logits, or ``(feats, logits)`` with feats = [block0..block4 outputs, pooled] if ``is_feat``.

        With ``preact`` the outputs of block1..block4 are taken before their final ReLU.
        """
        f0 = F.relu(self.block0(x))
        f1_pre = self.block1(self.pool0(f0))
        f1 = F.relu(f1_pre)
        f2_pre = self.block2(self.pool1(f1))
        f2 = F.relu(f2_pre)
        f3_pre = self.block3(self.pool2(f2))
        f3 = F.relu(f3_pre)
        x = f3
        # The reference applies pool3 only for 64x64 inputs, so block4 runs on 4x4 maps for both 32x32
        # (CIFAR) and 64x64 (Tiny-ImageNet) inputs; pooling whenever the map is 8x8 or larger keeps that
        # and generalises it to other sizes.
        if x.shape[-2] >= 8:
            x = self.pool3(x)
        f4_pre = self.block4(x)
        f4 = F.relu(f4_pre)
        f5 = torch.flatten(self.pool4(f4), 1)
        feats, pres = [f0, f1, f2, f3, f4, f5], [f0, f1_pre, f2_pre, f3_pre, f4_pre, f5]
        return features_or_logits(self.classifier(f5), is_feat, preact, feats, pres)


def vgg8(num_classes: int = 100) -> VGG:
    return VGG(_CONFIGS["vgg8"], num_classes)


def vgg11(num_classes: int = 100) -> VGG:
    return VGG(_CONFIGS["vgg11"], num_classes)


def vgg13(num_classes: int = 100) -> VGG:
    return VGG(_CONFIGS["vgg13"], num_classes)


def vgg16(num_classes: int = 100) -> VGG:
    return VGG(_CONFIGS["vgg16"], num_classes)


def vgg19(num_classes: int = 100) -> VGG:
    return VGG(_CONFIGS["vgg19"], num_classes)
