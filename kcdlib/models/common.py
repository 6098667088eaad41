"""What the zoo's networks share: whole-map pooling, stages run for their pre-activation features, the
``(feats, logits)`` convention, and the reference's weight initialisations."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

# How the last block of a stage gives ``(output, pre-ReLU output)``: the zoo's blocks have ``forward_preact``.
Preact = Callable[[nn.Module, Tensor], tuple[Tensor, Tensor]]


def block_preact(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    return block.forward_preact(x)


def global_avg_pool(x: Tensor) -> Tensor:
    """Average each channel over the whole map: (B, C, H, W) -> (B, C), for any H, W.

    This is adaptive average pooling to 1x1, written as ``avg_pool2d`` with a full-map kernel because at
    32x32 it is then the very operation of the reference's fixed kernels (bit-identical results).
    """
    return F.avg_pool2d(x, kernel_size=x.shape[-2:]).flatten(1)


def run_stage(stage: nn.Sequential, x: Tensor, preact: Preact = block_preact) -> tuple[Tensor, Tensor]:
    """Run a stage of blocks; return (output, pre-ReLU output of its last block)."""
    *head, last = stage
    for block in head:
        x = block(x)
    return preact(last, x)


def run_stages(
    x: Tensor, stages: Sequence[nn.Sequential], preact: Preact = block_preact
) -> tuple[list[Tensor], list[Tensor]]:
    """Run ``stages`` one after the other from ``x``: each stage's output, and each one's pre-ReLU output."""
    outs, pres = [], []
    for stage in stages:
        x, pre = run_stage(stage, x, preact)
        outs.append(x)
        pres.append(pre)
    return outs, pres


def features_or_logits(logits: Tensor, is_feat: bool, preact: bool, feats: list[Tensor], pres: list[Tensor]):
    """The zoo's forward result: ``logits``, or ``(feats, logits)`` (``pres`` in place of ``feats`` with
    ``preact``) when ``is_feat``."""
    if not is_feat:
        return logits
    return (pres if preact else feats), logits


def init_resnet(model: nn.Module) -> None:
    """RepDistiller's ResNets: Kaiming-normal convolutions (fan out), BN weight 1 and bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_fan_out(model: nn.Module, conv_bias: bool = False, linear_std: float | None = None) -> None:
    """The VGG, WRN and MobileNetV2 references: convolutions N(0, 2/fan_out), BN weight 1 and bias 0, linear bias
    0. ``conv_bias``: zero the convolutions' biases too (VGG); ``linear_std``: draw the linear weights from
    N(0, std²) (VGG, MobileNetV2; WRN keeps PyTorch's default). Modules in the reference's order, so the same
    seed gives the same weights."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if conv_bias:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
