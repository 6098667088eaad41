"""Golden logits of the CIFAR model zoo: every architecture with fixed, formula-made weights on a fixed input.

The zoo was checked bit-identical against the reference code once (session 1); these numbers pin that forward
pass, so a refactor that moves a ReLU, a pooling or a shortcut changes them and fails ``test_models``. Weights
and inputs come from a formula (no random generator, which may change between torch releases), the forward runs
in float64 in eval mode (BN from its running statistics), so the values agree across machines to ~1e-12.
torchvision's ImageNet ResNets are torchvision's own code and are left out.

Regenerate, only when a change of the forward is intended and checked against the reference code:
``python tests/zoo_golden.py`` (writes ``tests/golden/zoo_logits.json``).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from torch import nn

from kcdlib.models import ARCHS, create

GOLDEN = Path(__file__).parent / "golden" / "zoo_logits.json"
CLASSES = 100
BATCH = 2
CIFAR_ARCHS = [name for name in ARCHS if name not in ("ResNet18", "ResNet34")]


def _wave(n: int, phase: float) -> torch.Tensor:
    return torch.sin(torch.arange(n, dtype=torch.float64) * 0.7311 + phase)


def fixed_weights(model: nn.Module) -> nn.Module:
    """Every parameter and buffer from a sine wave scaled as an initialiser would, BN variances positive."""
    with torch.no_grad():
        for k, (name, t) in enumerate(model.state_dict().items()):
            if not t.is_floating_point():
                continue
            w = _wave(t.numel(), k).view(t.shape)
            if name.endswith("running_var"):
                w = 1.0 + 0.5 * w.abs()
            elif name.endswith("running_mean") or name.endswith("bias"):
                w = 0.1 * w
            elif t.dim() == 1:  # BN (and other 1-d) weights
                w = 1.0 + 0.1 * w
            else:
                fan_in = t[0].numel()
                w = w * math.sqrt(3.0 / fan_in)
            t.copy_(w)
    return model


def fixed_input(side: int) -> torch.Tensor:
    return _wave(BATCH * 3 * side * side, 0.5).view(BATCH, 3, side, side)


def logits(model: nn.Module) -> torch.Tensor:
    """``model``'s logits (a copy of it in float64 with the fixed weights) on the fixed 32x32 input."""
    model = fixed_weights(copy.deepcopy(model).double().eval())
    with torch.no_grad():
        return model(fixed_input(32))


if __name__ == "__main__":
    GOLDEN.parent.mkdir(exist_ok=True)
    table = {name: [[float(f"{v:.15g}") for v in row] for row in logits(create(name, CLASSES)).tolist()]
             for name in CIFAR_ARCHS}  # fmt: skip
    GOLDEN.write_text(json.dumps(table, indent=0) + "\n")
    print(f"wrote {GOLDEN}: {len(table)} architectures")
