"""Counted computation.

``forward_macs`` counts the multiply-adds of one forward pass; ``unix_computation`` is UNIX's training cost
relative to vanilla KD (supplement Eq. 19), which the paper compares against its relative cost C.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import BadOption


def forward_macs(model: nn.Module, input_size: tuple[int, ...] = (3, 32, 32)) -> int:
    """Multiply-adds of ``nn.Conv2d`` and ``nn.Linear`` layers for ONE image of ``input_size`` (C, H, W).

    A convolution costs out_elements * in_channels/groups * kh * kw, a linear layer in * out; biases,
    BN, activations, pooling and additions are not counted. Counted with forward hooks on a zero batch of
    one image in eval mode; every module's train/eval mode is restored afterwards.
    """
    total = 0

    def count_conv(m: nn.Conv2d, _inputs, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += (out.numel() // out.shape[0]) * (m.in_channels // m.groups) * kh * kw

    def count_linear(m: nn.Linear, _inputs, out: torch.Tensor) -> None:
        nonlocal total
        total += (out.numel() // out.shape[0]) * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(count_conv))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(count_linear))
    modes = {m: m.training for m in model.modules()}
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return total


def fs_over_ft(student: nn.Module, teacher: nn.Module, image_size: int) -> float:
    """UNIX's ``Fs/Ft``: the student's forward multiply-adds over the teacher's, for one image of the dataset's size."""
    size = (3, image_size, image_size)
    return forward_macs(student, size) / forward_macs(teacher, size)


def _check(batch: int, fs_over_ft: float) -> None:
    if batch <= 0:
        raise BadOption(f"batch must be positive, got {batch}")
    if not fs_over_ft > 0:
        raise BadOption(f"Fs/Ft must be positive, got {fs_over_ft}")


def unix_computation(k: float, batch: int, fs_over_ft: float) -> float:
    """UNIX's cost relative to KD (supplement Eq. 19): (k + (N + 2k) r) / (N + 2N r).

    ``k`` = samples per batch that get the teacher forward and the student backward (UNIX's N_k per batch),
    N = ``batch``, r = Fs/Ft the student/teacher forward cost ratio; the student backward is taken as
    costing one student forward (B_s = F_s).
    """
    _check(batch, fs_over_ft)
    if not 0 <= k <= batch:
        raise BadOption(f"k must lie in [0, batch={batch}], got {k}")
    r = fs_over_ft
    return (k + (batch + 2 * k) * r) / (batch + 2 * batch * r)


def unix_k_for(target: float, batch: int, fs_over_ft: float) -> float:
    """The (real-valued) k for which ``unix_computation(k, batch, fs_over_ft) == target``; round it yourself.

    Raises ``BadOption`` when ``target`` lies outside [unix_computation(0), unix_computation(batch)].
    """
    _check(batch, fs_over_ft)
    low, high = unix_computation(0, batch, fs_over_ft), unix_computation(batch, batch, fs_over_ft)
    # A tolerance of a few ulps so that round trips through unix_computation at the ends succeed.
    eps = 1e-12
    if not low - eps <= target <= high + eps:
        raise BadOption(
            f"a UNIX computation of {target:.4g} cannot be reached with batch {batch} and Fs/Ft "
            f"{fs_over_ft:.4g}: the achievable range is [{low:.4g}, {high:.4g}]"
        )
    r = fs_over_ft
    k = (target * batch * (1 + 2 * r) - batch * r) / (1 + 2 * r)
    return min(max(k, 0.0), float(batch))
