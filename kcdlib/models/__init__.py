"""The model zoo: RepDistiller's CIFAR architectures and torchvision's ImageNet ResNet18/34, by name.

Every model's ``forward(x, is_feat=False, preact=False)`` returns logits, or ``(feats, logits)`` when
``is_feat``; ``feats[-1]`` is the pooled feature fed to the classifier. Checkpoints are RepDistiller's
``{'model': state_dict}`` files.
"""

from __future__ import annotations

import functools
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..registry import Registry
from . import mobilenetv2, resnet, resnetv2, shufflenetv1, shufflenetv2, vgg, wrn

ARCHS: Registry[Callable[[int], nn.Module]] = Registry(
    "architecture",
    {
        "resnet8": resnet.resnet8,
        "resnet14": resnet.resnet14,
        "resnet20": resnet.resnet20,
        "resnet32": resnet.resnet32,
        "resnet44": resnet.resnet44,
        "resnet56": resnet.resnet56,
        "resnet110": resnet.resnet110,
        "resnet8x4": resnet.resnet8x4,
        "resnet32x4": resnet.resnet32x4,
        "ResNet50": resnetv2.ResNet50,
        "wrn_16_1": wrn.wrn_16_1,
        "wrn_16_2": wrn.wrn_16_2,
        "wrn_40_1": wrn.wrn_40_1,
        "wrn_40_2": wrn.wrn_40_2,
        "vgg8": vgg.vgg8,
        "vgg11": vgg.vgg11,
        "vgg13": vgg.vgg13,
        "vgg16": vgg.vgg16,
        "vgg19": vgg.vgg19,
        "MobileNetV2": mobilenetv2.mobile_half,
        "ShuffleV1": shufflenetv1.ShuffleV1,
        "ShuffleV2": shufflenetv2.ShuffleV2,
        "ResNet18": lambda num_classes=1000: _imagenet("ResNet18", num_classes),
        "ResNet34": lambda num_classes=1000: _imagenet("ResNet34", num_classes),
    },
)


def _imagenet(name: str, num_classes: int) -> nn.Module:
    # Imported on use: torchvision.models costs seconds to import, which every notebook kernel would pay.
    from . import imagenet

    return getattr(imagenet, name)(num_classes)


# How many keys of each kind a checkpoint error message names.
_SHOWN = 5

__all__ = ["ARCHS", "create", "load_checkpoint", "save_checkpoint", "penultimate_dim"]


def create(name: str, num_classes: int = 100) -> nn.Module:
    """Build the registered architecture ``name`` with freshly initialised weights.

    The model carries its name in ``model.arch`` (used in error messages).
    """
    model = ARCHS[name](num_classes)
    model.arch = name
    return model


def _arch_of(model: nn.Module) -> str:
    return getattr(model, "arch", type(model).__name__)


def _listing(what: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN]) + (", ..." if len(keys) > _SHOWN else "")
    return f"{len(keys)} {what} ({shown})"


def _read_state_dict(path: Path, arch: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to read or unpickle means the file is unusable
        raise CheckpointError(
            f"cannot read checkpoint {path} for architecture {arch}: {type(err).__name__}: {err}"
        ) from err
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not (
        isinstance(obj, Mapping)
        and obj
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise CheckpointError(
            f"checkpoint {path} for architecture {arch} holds neither {{'model': state_dict}} "
            "nor a state_dict of tensors"
        )
    state = dict(obj)
    # Models saved while wrapped in nn.DataParallel carry this prefix on every key.
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_checkpoint(model_or_arch_name: nn.Module | str, path: str | os.PathLike, num_classes: int = 100):
    """Load a ``{'model': state_dict}`` (or bare state_dict) file strictly; return the model.

    Given a name, the model is created first with ``num_classes``. Raises ``CheckpointError`` for an
    unreadable file or one whose keys or shapes do not fit the architecture.
    """
    if isinstance(model_or_arch_name, str):
        model = create(model_or_arch_name, num_classes)
        arch = f"'{model_or_arch_name}' (num_classes={num_classes})"
    else:
        model = model_or_arch_name
        arch = f"'{_arch_of(model)}'"
    path = Path(path)
    state = _read_state_dict(path, arch)

    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} (file {list(state[k].shape)}, model {list(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong_shape:
        problems = [
            _listing(what, keys)
            for what, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("keys with the wrong shape", wrong_shape),
            )
            if keys
        ]
        raise CheckpointError(f"checkpoint {path} does not fit architecture {arch}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    return model


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``{'model': model.state_dict()}`` to ``path`` atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory, so the rename is atomic: readers see the old file or the complete new one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save({"model": model.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@functools.cache
def _penultimate_dim_of_arch(name: str) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return penultimate_dim(create(name))


def penultimate_dim(model_or_name: nn.Module | str) -> int:
    """Size of ``feats[-1]``, the pooled feature that the classifier (the model's last Linear) reads."""
    if isinstance(model_or_name, str):
        return _penultimate_dim_of_arch(model_or_name)
    linears = [m for m in model_or_name.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{_arch_of(model_or_name)} has no linear classifier")
    return linears[-1].in_features
