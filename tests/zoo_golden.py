"""Golden logits of the CIFAR model zoo: every architecture with fixed, formula-made weights on a fixed input.

The zoo was checked bit-identical against the reference code once (session 1); these numbers pin that forward
pass, so a refactor that moves a ReLU, a pooling or a shortcut changes them and fails ``test_models``. Weights
and inputs come from a formula (no random generator, which may change between torch releases), the forward runs
in float64 in eval mode. torchvision's ImageNet ResNets are torchvision's own code and are left out.

Another CPU (or another kernel: AVX-512 against AVX2, one thread against two) sums in another order, so the logits
agree to rounding, not bit for bit. The check is made to be well-conditioned, and its tolerance derived from it:

- **Calibrated BatchNorm**: every BN's running mean and variance are those of what reaches it from the fixed
  input, in eval mode, through the BNs calibrated before it, the variance plus 1 (:func:`calibrated`). Activations
  stay of order one through any depth (the uncalibrated resnet110 reached 6.6e7), and no BN divides by a near-zero
  variance, so no layer amplifies a rounding error. (Calibrating in train mode instead, where each BN divides by
  its batch's bare variance, amplified float32's rounding 4e4-fold in ResNet50.)
- **Tolerance** (:func:`tolerance`): a sum of ``n`` products in any order errs by at most about ``n`` units of
  rounding ``u`` relative to its terms' scale; with layers that pass errors on with a gain near one, the errors of
  the layers add. So two machines may differ by ``u * sum of the fan-ins of all conv and linear layers`` times the
  logits' scale (a bound that grows with depth: 4e-12 relative for resnet110), and a change of the forward (a
  leaky ReLU, a moved shortcut) moves logits by far more (tested).

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


def calibrated(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` with the fixed weights, in eval mode, each BN's running statistics set from what
    reaches it from the fixed input through the BNs calibrated before it: its mean, and its variance plus 1, so
    no BN divides by a near-zero variance."""
    model = fixed_weights(copy.deepcopy(model).double()).eval()

    def calibrate(bn: nn.Module, inputs: tuple[torch.Tensor]) -> None:
        x = inputs[0].transpose(0, 1).flatten(1)  # channels first, every other dimension pooled
        bn.running_mean.copy_(x.mean(1))
        bn.running_var.copy_(x.var(1) + 1.0)

    hooks = [
        m.register_forward_pre_hook(calibrate)
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    with torch.no_grad():
        model(fixed_input(32))
    for hook in hooks:
        hook.remove()
    return model


def logits(model: nn.Module) -> torch.Tensor:
    """``model``'s logits (calibrated, float64) on the fixed 32x32 input."""
    with torch.no_grad():
        return calibrated(model)(fixed_input(32))


def tolerance(model: nn.Module, scale: float) -> float:
    """How far two correct float64 forwards of ``model`` may differ: ``u * sum of fan-ins * scale``."""
    fan_ins = sum(m.weight[0].numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    return torch.finfo(torch.float64).eps * fan_ins * scale


if __name__ == "__main__":
    GOLDEN.parent.mkdir(exist_ok=True)
    # Every float as Python writes it (the shortest text that reads back to the same float64): exact here.
    table = {name: logits(create(name, CLASSES)).tolist() for name in CIFAR_ARCHS}
    GOLDEN.write_text(json.dumps(table, indent=0) + "\n")
    print(f"wrote {GOLDEN}: {len(table)} architectures")
