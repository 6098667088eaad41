"""ShuffleNetV2 (Ma et al. 2018) for CIFAR, net size 1x, in RepDistiller's layout (``ShuffleV2``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import features_or_logits, global_avg_pool, run_stages
from .shufflenetv1 import channel_shuffle


class SplitUnit(nn.Module):
    """Keep the first half of the channels, transform the second (1x1, depthwise 3x3, 1x1), concatenate,
    shuffle."""

    def __init__(self, channels: int, split_ratio: float = 0.5):
        super().__init__()
        self.split_ratio = split_ratio
        branch = int(channels * split_ratio)
        self.conv1 = nn.Conv2d(branch, branch, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(branch)
        self.conv2 = nn.Conv2d(branch, branch, kernel_size=3, stride=1, padding=1, groups=branch, bias=False)
        self.bn2 = nn.BatchNorm2d(branch)
        self.conv3 = nn.Conv2d(branch, branch, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(branch)

    def forward_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (output, the concatenation before the branch's last ReLU and before the shuffle)."""
        c = int(x.shape[1] * self.split_ratio)
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        pre = self.bn3(self.conv3(out))
        out = channel_shuffle(torch.cat([x1, F.relu(pre)], 1), 2)
        return out, torch.cat([x1, pre], 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_preact(x)[0]


class DownUnit(nn.Module):
    """Two stride-2 branches over the whole input (depthwise-pointwise, pointwise-depthwise-pointwise),
    concatenated and shuffled: halves the resolution and sets the stage width."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, kernel_size=3, stride=2, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    """1x1 stem to 24 channels, three stages (a ``DownUnit``, then ``SplitUnit``s), 1x1 conv, pool, linear."""

    def __init__(
        self,
        out_channels: tuple[int, int, int, int] = (116, 232, 464, 1024),
        num_blocks: tuple[int, int, int] = (3, 7, 3),
        num_classes: int = 100,
    ):
        super().__init__()
        self.in_channels = 24
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.layer1 = self._make_stage(out_channels[0], num_blocks[0])
        self.layer2 = self._make_stage(out_channels[1], num_blocks[1])
        self.layer3 = self._make_stage(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_stage(self, out_channels: int, blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [DownUnit(self.in_channels, out_channels)]
        layers += [SplitUnit(out_channels) for _ in range(blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False):
        """Logits, or ``(feats, logits)`` with feats = [stem, stage1, stage2, stage3, pooled] if ``is_feat``.

        With ``preact`` the stage features are the last unit's concatenation before its ReLU, unshuffled
        (so their channel order differs from the regular features).
        """
        f0 = F.relu(self.bn1(self.conv1(x)))
        feats, pres = run_stages(f0, (self.layer1, self.layer2, self.layer3))
        out = F.relu(self.bn2(self.conv2(feats[-1])))
        # The reference's fixed 4x4 kernel is the whole map at 32x32.
        pooled = global_avg_pool(out)
        return features_or_logits(self.linear(pooled), is_feat, preact, [f0, *feats, pooled], [f0, *pres, pooled])


def ShuffleV2(num_classes: int = 100) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes=num_classes)
