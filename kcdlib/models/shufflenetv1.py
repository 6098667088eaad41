"""ShuffleNet (v1, Zhang et al. 2018) for CIFAR, groups=3, in RepDistiller's layout (``ShuffleV1``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import features_or_logits, global_avg_pool, run_stages


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channels of ``groups`` equal groups: [g0c0, g1c0, ..., g0c1, g1c1, ...]."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """Grouped 1x1, channel shuffle, depthwise 3x3, grouped 1x1; added to the input, or concatenated to its
    3x3 average pool when the unit halves the resolution (stride 2)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, first_groups: int):
        super().__init__()
        self.stride = stride
        self.first_groups = first_groups
        mid_planes = out_planes // 4
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = nn.Conv2d(
            mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (output, the sum or concatenation before the final ReLU)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        preact = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return F.relu(preact), preact

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_preact(x)[0]


class ShuffleNetV1(nn.Module):
    """1x1 stem to 24 channels (no downsampling), three stages that each start with a stride-2 unit,
    global average pool, classifier ``linear``."""

    stem_planes = 24

    def __init__(
        self,
        out_planes: tuple[int, int, int] = (240, 480, 960),
        num_blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
    ):
        super().__init__()
        self.in_planes = self.stem_planes
        self.conv1 = nn.Conv2d(3, self.stem_planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.stem_planes)
        self.layer1 = self._make_stage(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_stage(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_stage(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_stage(self, out_planes: int, blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            # The stride-2 unit concatenates its input, so its own branch only makes the missing channels.
            branch_planes = out_planes - self.in_planes if i == 0 else out_planes
            # The stem has too few channels to split into groups for the first pointwise conv.
            first_groups = 1 if self.in_planes == self.stem_planes else groups
            layers.append(ShuffleUnit(self.in_planes, branch_planes, 2 if i == 0 else 1, groups, first_groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False):
        """Logits, or ``(feats, logits)`` with feats = [stem, stage1, stage2, stage3, pooled] if ``is_feat``.

        With ``preact`` the stage features are taken before the last unit's final ReLU.
        """
        f0 = F.relu(self.bn1(self.conv1(x)))
        feats, pres = run_stages(f0, (self.layer1, self.layer2, self.layer3))
        # The reference's fixed 4x4 kernel is the whole map at 32x32.
        pooled = global_avg_pool(feats[-1])
        return features_or_logits(self.linear(pooled), is_feat, preact, [f0, *feats, pooled], [f0, *pres, pooled])


def ShuffleV1(num_classes: int = 100) -> ShuffleNetV1:
    return ShuffleNetV1(num_classes=num_classes)
