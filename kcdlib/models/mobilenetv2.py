"""MobileNetV2 for CIFAR as used by RepDistiller (``mobile_half``: expansion T=6, width multiplier 0.5)."""

from __future__ import annotations

from torch import Tensor, nn

from .common import global_avg_pool, init_fan_out


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Pointwise expand (x``expand_ratio``), depthwise 3x3, linear pointwise project; identity shortcut
    when the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """Stride-2 stem, seven groups of inverted residuals, 1x1 conv to ``last_channel``, pool, classifier."""

    def __init__(self, num_classes: int = 100, expand_ratio: int = 6, width_mult: float = 0.5):
        super().__init__()
        settings = [  # expansion, channels, repeats, first stride
            (1, 16, 1, 1),
            (expand_ratio, 24, 2, 1),
            (expand_ratio, 32, 3, 2),
            (expand_ratio, 64, 4, 2),
            (expand_ratio, 96, 3, 1),
            (expand_ratio, 160, 3, 2),
            (expand_ratio, 320, 1, 1),
        ]
        in_channels = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, in_channels, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in settings:
            out_channels = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(in_channels, out_channels, stride, t))
                in_channels = out_channels
            self.blocks.append(nn.Sequential(*layers))
        # The reference keeps 1280 for width multipliers up to 1 (so mobile_half still has a 1280-d feature).
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(in_channels, self.last_channel, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))

        init_fan_out(self, linear_std=0.01)

    def forward(self, x: Tensor, is_feat: bool = False, preact: bool = False):
        """Logits, or ``(feats, logits)`` with feats = [stem, 16x16, 8x8, 4x4, 2x2 maps (at 32x32), pooled].

        ``preact`` is accepted for interface compatibility and changes nothing, as in the reference.
        """
        f0 = self.conv1(x)
        f1 = self.blocks[1](self.blocks[0](f0))
        f2 = self.blocks[2](f1)
        f3 = self.blocks[4](self.blocks[3](f2))
        f4 = self.blocks[6](self.blocks[5](f3))
        # The reference fixes AvgPool2d(2, ceil_mode=True) for 32x32 inputs, where the final map is 2x2.
        f5 = global_avg_pool(self.conv2(f4))
        logits = self.classifier(f5)
        if is_feat:
            return [f0, f1, f2, f3, f4, f5], logits
        return logits


def mobile_half(num_classes: int = 100) -> MobileNetV2:
    return MobileNetV2(num_classes, expand_ratio=6, width_mult=0.5)
