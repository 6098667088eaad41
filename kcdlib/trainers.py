"""Building a run's trainer from its options: the student, the frozen teacher, the distiller and the method.

Everything here decides a run's numbers (the initialisation seed, the teacher's form, Fs/Ft), so this module is
part of the code a run's identity hashes (:data:`kcdlib.provenance.CODE_MODULES`); the store that finds the data
and the teacher's file (:mod:`kcdlib.runs`) is not.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import cost, distillers, methods, models
from .errors import CheckpointError
from .train import Trainer, first_nonfinite


def load_teacher(arch: str, source: str, num_classes: int, device: torch.device) -> torch.nn.Module:
    """The frozen teacher ``arch`` from the checkpoint file ``source``, on ``device``, in eval mode, checked to be
    finite."""
    teacher = models.load_checkpoint(arch, source, num_classes=num_classes).to(device).eval()
    if (bad := first_nonfinite(teacher.state_dict())) is not None:
        raise CheckpointError(f"the teacher checkpoint '{source}' holds non-finite weights (in '{bad}')")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def method_for(cfg, data, device: torch.device, fs_over_ft: float, group=None) -> methods.Method:
    """The method of run ``cfg`` (:class:`kcdlib.identity.RunConfig`) on ``data``; ``fs_over_ft`` is the student's
    forward cost over the teacher's, ``F_s/F_t``."""
    context = methods.MethodContext(
        num_points=data.num_train,
        epochs=cfg.recipe.epochs,
        seed=cfg.seed,
        options=dict(cfg.method_options),
        batch_size=cfg.recipe.batch_size,
        device=str(device),
        fs_over_ft=fs_over_ft,
        images_in_memory=hasattr(data, "train_images"),
        group=group,
    )
    return methods.build(cfg.method, context)


def build_trainer(
    cfg,
    data,
    device: torch.device,
    load_teacher: Callable[[], torch.nn.Module] | None,
    compile: str,
    group,
    progress: bool,
) -> Trainer:
    """The trainer of run ``cfg`` on ``data``: the student initialised from ``cfg.seed``, the teacher from
    ``load_teacher()``, the distiller and the method; under ``group`` (:class:`kcdlib.distributed.Group`) this
    process's part of the run."""
    torch.manual_seed(cfg.seed)
    student = models.create(cfg.arch, num_classes=data.num_classes).to(device)
    # The teacher is built after the student: its construction draws from the generator the distiller then uses.
    teacher = load_teacher() if load_teacher is not None else None
    context = distillers.DistillContext(
        num_points=data.num_train,
        num_classes=data.num_classes,
        student_dim=models.penultimate_dim(student),
        teacher_dim=models.penultimate_dim(teacher) if teacher is not None else 0,
        labels=data.train_labels,
        options=dict(cfg.distiller_options),
    )
    distiller = distillers.build(cfg.distiller, context).to(device)
    fs_over_ft = cost.fs_over_ft(student, teacher, data.image_size) if teacher is not None else 1.0
    method = method_for(cfg, data, device, fs_over_ft, group)
    return Trainer(
        student, data, cfg.recipe, distiller, teacher, method, seed=cfg.seed, progress=progress,
        precision=cfg.precision, compile=compile, group=group,
    )  # fmt: skip
