"""The engine: teacher training and distillation with the paper's protocol, one epoch at a time.

Every epoch: the method names the knowledge points to train on (``K^t``), the data yields augmented batches over
them, the frozen teacher gives its hint on each batch, the distiller turns both forwards into losses, and SGD
steps. A method that declares a per-step signal (KCD: the entropy of the student's softmax, OGVE's value; with
``value="ce"`` the cross-entropy with the label) gets it from that same forward with each sample's point index, no
extra pass; for one that declares none (plain KD) the step computes nothing beyond its losses. After the epoch
the engine evaluates top-1/top-5 on the test split and lets the method end the epoch (KCD's E-step at stage
boundaries).

Protocol (RepDistiller, which the paper follows): SGD momentum 0.9, weight decay 5e-4, batch 64, lr 0.05 (0.01
for MobileNetV2/ShuffleNets), ×0.1 at 150/240, 180/240 and 210/240 of the epochs; the reported accuracy is the
last epoch's top-1, the best is recorded too.

All randomness of epoch ``e`` is seeded by ``(seed, e)``, so a run resumed from the checkpoint of epoch ``e - 1``
continues exactly as an uninterrupted one (on CPU; cuDNN may differ in the last bits).

Under torchrun the same trainer runs on N processes (``group``): each trains its part of every global batch and
the step's loss is the global batch's (:mod:`kcdlib.distributed` says how, and why N changes no result).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from . import distributed
from .data import epoch_generator
from .distillers import Distiller
from .errors import Diverged
from .fastpath import FastPath, fp32
from .methods import Method
from .recipe import Recipe


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None.

    One host synchronisation for all of them (a check per tensor would wait for the device hundreds of times)."""
    floats = [(name, t) for name, t in tensors.items() if t.is_floating_point()]
    if not floats:
        return None
    finite = torch.stack([torch.isfinite(t).all() for _, t in floats]).cpu()
    return next((name for (name, _), ok in zip(floats, finite.tolist()) if not ok), None)


def forward(model: nn.Module, x: torch.Tensor, features: bool):
    """``(feats, logits)`` when ``features`` else ``(None, logits)``."""
    if features:
        return model(x, is_feat=True)
    return None, model(x)


@torch.no_grad()
def evaluate(
    model: nn.Module, data, batch_size: int = 256, precision: str = "fp32", group: distributed.Group | None = None
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) on the test split (under ``group``, each process its part, the counts summed:
    the accuracy over the whole split)."""
    model.eval()
    top1 = top5 = total = 0
    fast = FastPath(data.device, precision)
    for x, y in data.test_batches(batch_size, **_shard(group)):
        x = fast.batch(x)
        with fast.autocast():
            logits = model(x)
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices.eq(y.view(-1, 1))
        top1 += hits[:, 0].sum()
        top5 += hits.any(dim=1).sum()
        total += y.shape[0]
    if group is not None:
        top1, top5, total = group.sum(top1, top5, total)
    return 100.0 * float(top1) / total, 100.0 * float(top5) / total


def _shard(group: distributed.Group | None) -> dict[str, Any]:
    """The data's keyword for this process's part (none in one process, so any data object serves there)."""
    return {} if group is None else {"shard": group.shard}


class Trainer:
    """Trains ``student`` (from ``teacher`` when the distiller needs one) on ``data`` for ``recipe.epochs``.

    Counts ``points_distilled``: knowledge points fed to the teacher (KD: ``N`` per epoch). Resumable through
    ``state_dict``/``load_state_dict`` between epochs. With ``group`` (torchrun), this process's part of the run:
    the student's BatchNorm synchronised, the student wrapped in DistributedDataParallel, the counts those of the
    global batches (the sum over the processes).
    """

    def __init__(
        self,
        student: nn.Module,
        data,
        recipe: Recipe,
        distiller: Distiller,
        teacher: nn.Module | None = None,
        method: Method | None = None,
        seed: int = 0,
        progress: bool = True,
        precision: str = "fp32",
        compile: str = "off",
        group: distributed.Group | None = None,
    ):
        from .methods import MethodContext

        if distiller.needs_teacher and teacher is None:
            raise ValueError(f"distiller '{distiller.name}' needs a teacher")
        if group is not None:
            if group.world_size > recipe.batch_size:
                raise ValueError(f"{group.world_size} processes cannot share batches of {recipe.batch_size}")
            student = distributed.sync_batchnorm(student, data.device)
        self.group = group
        self.student, self.data, self.recipe, self.distiller = student, data, recipe, distiller
        self.teacher = teacher if distiller.needs_teacher else None
        self.method = method or Method(MethodContext(data.num_train, recipe.epochs, seed))
        self.seed, self.progress, self.precision = seed, progress, precision
        # How the steps run on the hardware (precision, layout, compilation, CUDA graphs): kcdlib.fastpath.
        self.fast = FastPath(data.device, precision, compile)
        replica = student if group is None else distributed.replicate(student, group, self.fast.channels_last)
        self._student, self._teacher = self.fast.network(replica), self.fast.network(self.teacher)
        params = list(student.parameters()) + list(distiller.parameters())
        self.optimizer = torch.optim.SGD(
            params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
            **self.fast.optimizer_options(),
        )  # fmt: skip
        if group is None:
            self.fast.record_steps(self.step, self.optimizer)
        elif self.fast.graph_wanted:  # collectives inside a recorded graph: not attempted
            warnings.warn(f"compile {compile!r} records the step as one CUDA graph, which is single-process: "
                          "under torchrun the steps run eagerly", stacklevel=2)  # fmt: skip
        # The run's own copy of the training images, only when the method writes into it (KCD's augmentation):
        # the dataset the user handed in stays as it was.
        self.images = data.train_images.clone() if self.method.modifies_images else None
        self.epoch = 0  # epochs completed
        # Which knowledge points the teacher has seen at least once (a method may leave some out for good).
        self.distilled = torch.zeros(data.num_train, dtype=torch.bool, device=data.device)
        self.points_distilled = 0
        self.points_trained = 0
        self.history: list[dict[str, Any]] = []
        self.wall_seconds = 0.0

    # -- one epoch -------------------------------------------------------------------------------------------
    def train_pass(self, epoch: int, points: torch.Tensor | None) -> dict[str, Any]:
        """One pass of SGD over the knowledge points ``points`` (all when None) with epoch ``epoch``'s seeds.

        Returns the number of samples trained, their mean loss and training accuracy.
        """
        # Seed everything random inside the epoch (CRD's negatives, UNIX's mixup) from (seed, epoch).
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=epoch_generator(self.seed, epoch, salt=1))))
        lr = self.recipe.lr_at(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        n_points = self.data.num_train if points is None else int(points.numel())
        self.student.train()
        self.distiller.train()
        if self.teacher is not None:
            self.teacher.eval()
        device = self.data.device
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        steps = -(-n_points // self.recipe.batch_size)
        # The run's own images: a tensor in memory, or the method's mix recipes for a dataset decoded from files.
        images = self.images if self.images is not None else self.method.mix_recipes
        batch = self.recipe.batch_size
        batches = self.data.train_batches(points, batch, self.seed, epoch, images=images, **_shard(self.group))
        step = self.fast.step_graph or self.step
        for i, (x, y, idx) in enumerate(_bar(batches, steps, f"epoch {epoch}/{self.recipe.epochs}", self.progress)):
            if self.group is not None:
                self.group.layout(min(batch, n_points - i * batch))
            x = self.fast.batch(x)
            with self.fast.autocast():
                x, y, idx = self.method.select((x, y, idx), self.student)
            if self.group is not None:  # from here on, labels and point indices are the global batch's
                y, idx = self.group.gather(y, idx)
            n = idx.shape[0]
            if self.teacher is not None:
                self.points_distilled += n
                self.distilled[idx] = True
            loss, signal, hits = step(x, y, idx)
            if signal is not None:
                self.method.observe(idx, signal)
            loss_sum += loss * n
            correct += hits
            seen += n
        self.points_trained += seen
        # One host synchronisation per epoch, here, not per step.
        return {
            "lr": lr,
            "points": seen,
            "train_loss": float(loss_sum) / max(seen, 1),
            "train_top1": 100.0 * float(correct) / max(seen, 1),
        }

    def step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
        """One SGD step on a batch: the teacher's hint, the student's forward, the distiller's losses, backward,
        update. Returns ``(loss, signal, hits)``, all on the device: the batch's mean loss, the method's per-sample
        ``signal`` of this same forward (KCD: the softmax entropy ``H(p_s)`` OGVE records; None for a method that
        declares none, which then costs the step nothing) and the number of correct top-1 predictions. Nothing in it
        waits for the device, so it can be recorded as a CUDA graph.

        Under a group, ``x`` is this process's part and ``y``, ``idx`` are the global batch's: the forwards run on
        the part, their outputs are gathered, and everything after is the global batch's, on every process."""
        features = self.distiller.needs_features
        with self.fast.autocast():
            t_feats = t_logits = None
            if self.teacher is not None:
                with torch.no_grad():
                    t_feats, t_logits = forward(self._teacher, x, features)
            s_feats, s_logits = forward(self._student, x, features)
        # Losses in fp32 whatever the networks ran in.
        s_feats, t_feats = fp32(s_feats), fp32(t_feats)
        s_logits, t_logits = s_logits.float(), None if t_logits is None else t_logits.float()
        if self.group is not None:
            s_feats, s_logits, t_feats, t_logits = self._gather_outputs(s_feats, s_logits, t_feats, t_logits)
        losses = self.distiller(s_feats, s_logits, t_feats, t_logits, y, idx)
        loss = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        logits = s_logits.detach()
        signal = None if self.method.signal is None else self.method.signal(logits, y)
        return loss.detach(), signal, logits.argmax(dim=1).eq(y).sum()

    def _gather_outputs(self, s_feats, s_logits, t_feats, t_logits):
        """The forwards' outputs of the global batch (one collective): logits and the pooled features
        ``feats[-1]`` (the only ones the paper's distillers read), the student's with their gradient."""
        outputs = [s_logits, *(f[-1] for f in (s_feats, t_feats) if f is not None), t_logits]
        outputs = self.group.gather(*(t for t in outputs if t is not None))
        s_logits = outputs.pop(0)
        s_feats = None if s_feats is None else [outputs.pop(0)]
        t_feats = None if t_feats is None else [outputs.pop(0)]
        t_logits = outputs.pop(0) if t_logits is not None else None
        return s_feats, s_logits, t_feats, t_logits

    def train_epoch(self) -> dict[str, Any]:
        """Train the next epoch on the method's points, evaluate, and let the method end the epoch."""
        epoch = self.epoch + 1
        start = time.perf_counter()
        points = self.method.epoch_points(epoch)
        # Which knowledge points the epoch trains (KCD: the condensed set), by hash: in the record, and the same on
        # every process of a group, else it stops.
        points_sha = distributed.digest(points)
        if self.group is not None:
            self.group.check_same(f"knowledge points for epoch {epoch}", points_sha)
        with self.fast.training():
            row = {"epoch": epoch, **self.train_pass(epoch, points), "points_sha": points_sha}
        self.check_finite(epoch, row["train_loss"])
        row["top1"], row["top5"] = evaluate(self.student, self.data, precision=self.precision, group=self.group)
        row.update(self.method.end_epoch(epoch, self.images))
        row["seconds"] = time.perf_counter() - start
        self.wall_seconds += row["seconds"]
        self.epoch = epoch
        self.history.append(row)
        return row

    def check_finite(self, epoch: int, loss: float) -> None:
        """Stop a run whose loss or weights are no longer finite: its accuracy would be chance, recorded as if it
        were a result. Checked once an epoch, before the epoch is checkpointed."""
        bad = None if math.isfinite(loss) else f"the training loss is {loss}"
        name = first_nonfinite({**self.student.state_dict(), **self.distiller.state_dict()})
        if bad is None and name is not None:
            bad = f"'{name}' holds non-finite values"
        if bad is not None:
            raise Diverged(f"the run diverged in epoch {epoch}: {bad}. Nothing is recorded; the checkpoints of the "
                           "epochs before it are kept. Try a smaller learning rate or other loss weights.")  # fmt: skip

    def run(self, on_epoch_end: Callable[[Trainer], None] | None = None) -> None:
        """Train the remaining epochs; ``on_epoch_end`` is the place to checkpoint."""
        bar = _bar(range(self.epoch, self.recipe.epochs), self.recipe.epochs, "epochs", self.progress, self.epoch)
        for _ in bar:
            row = self.train_epoch()
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(top1=f"{row['top1']:.2f}", loss=f"{row['train_loss']:.3f}")
            if on_epoch_end is not None:
                on_epoch_end(self)

    # -- results ---------------------------------------------------------------------------------------------
    def results(self) -> dict[str, Any]:
        """Accuracies, counted passes and computation.

        ``computation`` is the supplement's Eq. 18 with ``B_s ≈ F_s`` on the counted passes, relative to KD on
        the same data and epochs: ``(N_t + (N_s1 + N_s2)·Fs/Ft) / (N·I·(1 + 2·Fs/Ft))``. It is exactly the
        fraction of knowledge points distilled when every distilled point is also a student step (KD, KCD), and
        UNIX's cost when the student also runs a selection pass.
        """
        top1 = [r["top1"] for r in self.history]
        full = self.data.num_train * self.recipe.epochs
        n_t = self.points_distilled
        n_s1 = self.points_trained + self.method.extra_student_forwards
        n_s2 = self.points_trained
        if self.teacher is None:
            computation = n_s2 / full
        else:
            # In exact rationals, so that equal pass counts give exactly the schedule's fraction (KD: 1.0).
            r = Fraction(self.method.context.fs_over_ft)
            computation = float((n_t + (n_s1 + n_s2) * r) / (full * (1 + 2 * r)))
        return {
            "final_top1": top1[-1] if top1 else None,
            "best_top1": max(top1) if top1 else None,
            "final_top5": self.history[-1]["top5"] if self.history else None,
            "points_distilled": n_t,
            # Points the teacher never saw (KCD's untrained='last' leaves stage 1's left-outs out for good).
            "never_distilled": None if self.teacher is None else int((~self.distilled).sum()),
            "points_trained": n_s2,
            "passes": {"N_t": n_t, "N_s1": n_s1, "N_s2": n_s2},
            "computation": computation,
            "computation_formula": 1.0,
            "wall_seconds": self.wall_seconds,
            "world_size": 1 if self.group is None else self.group.world_size,  # processes that trained it
            "epochs": self.history,
            **self.method.summary(),
        }

    def execution(self) -> dict[str, Any]:
        """How the steps ran (:meth:`kcdlib.fastpath.FastPath.execution`)."""
        return self.fast.execution()

    # -- checkpointing ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "student": self.student.state_dict(),
            "distiller": self.distiller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "extra_student_forwards": self.method.extra_student_forwards,
            "images": self.images,
            "points_distilled": self.points_distilled,
            "distilled": self.distilled.cpu(),
            "points_trained": self.points_trained,
            "history": self.history,
            "wall_seconds": self.wall_seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.student.load_state_dict(state["student"])
        self.distiller.load_state_dict(state["distiller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"])
        self.method.extra_student_forwards = state["extra_student_forwards"]
        if state.get("images") is not None:
            self.images = state["images"].to(self.data.device)
        self.points_distilled = state["points_distilled"]
        self.distilled = state["distilled"].to(self.data.device)
        self.points_trained = state["points_trained"]
        self.history = state["history"]
        self.wall_seconds = state["wall_seconds"]


def _bar(iterable, total, desc, enabled, initial=0):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, initial=initial, leave=desc == "epochs", dynamic_ncols=True)
