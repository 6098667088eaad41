"""Data parallelism: one run trained by N processes under ``torchrun``, computing what one process computes.

``torchrun --nproc-per-node N -m kcdlib distill ...`` (or ``kcd distill --nproc N``, which launches it) trains one
run on N processes: NCCL on CUDA (process ``LOCAL_RANK`` on ``cuda:LOCAL_RANK``), gloo on CPU. The recipe stays
the paper's (global batch ``B``: 64 on CIFAR, 256 on ImageNet; its learning rate); each process trains ``B/N``.

- **Sharding.** Each epoch's order is drawn once from ``(seed, epoch)``, as in one process, and cut into the
  global batches of ``B`` (the last one shorter). Process ``r`` trains the ``r``-th contiguous part of every
  global batch (:func:`kcdlib.data.batch_part`: sizes differ by at most one, the first ``n mod N`` processes take
  one point more, ``torch.tensor_split``'s rule). Together the processes see the epoch's points (KCD: the
  condensed set), each once, and every step is one step on the global batch. A part may be empty (a last batch
  of fewer than N points): that process still takes its part in the step.
- **The loss.** Each process runs the teacher and the student on its own part; the step's logits, pooled
  features (``feats[-1]``, the only ones the paper's distillers use), labels and point indices are all-gathered
  (the student's with autograd) and every process computes the distiller's loss over the whole global batch. The
  gather's backward sums the N processes' gradients of that one loss and DistributedDataParallel divides by N, so
  the update is exactly the gradient of the global batch's loss: PKT's pairwise term, CRD's memory bank and
  negatives, the uneven last batch are as in one process, and every process holds the same CRD memory.
- **BatchNorm** is synchronised (:func:`sync_batchnorm`): batch statistics over the global batch, as one process
  computes them (torch's ``SyncBatchNorm`` on CUDA; on CPU, where torch's refuses, :class:`CpuSyncBatchNorm`).
  N then changes only the order of floating-point sums, never what is computed, so N is not part of a run's
  identity and a run may resume on another N. Per-process BatchNorm (torchvision's ImageNet default) would
  normalise over ``B/N`` samples and make the result depend on N.
- **KCD.** The entropies of the whole global batch come from the gathered logits, so every process keeps the
  same value record, ranks the same way and condenses to the same set; the engine compares a hash of each epoch's
  knowledge points across processes and stops on a mismatch (:class:`DistributedMismatch`).
- **UNIX.** Each process runs the selection forward on its part; inputs and uncertainties are gathered, the
  selection over the global batch is made the same way on every process (same seeds) and each trains its part of
  the ``k`` selected points: UNIX of the global batch, not of ``B/N``.
- **Evaluation.** Each process evaluates its contiguous part of the test split; hit counts are summed, so the
  accuracy is over the whole split.
- **The run store.** Process 0 decides (reuse, resume from which checkpoint, repair) and its decision is
  broadcast (:meth:`Group.decide`); it alone holds the lock and writes config, checkpoints, model and record.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import BadOption, KcdError

# torchrun sets these for every process it starts.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedMismatch(KcdError):
    """The processes of one run no longer hold the same state (their condensed sets differ)."""


def part_sizes(n: int, world_size: int) -> list[int]:
    """Sizes of the processes' parts of a global batch of ``n``: ``torch.tensor_split``'s rule."""
    q, r = divmod(n, world_size)
    return [q + (rank < r) for rank in range(world_size)]


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@dataclass
class Group:
    """The processes that train one run: this one is ``rank`` of ``world_size``, on ``device``.

    ``sizes`` are the processes' part sizes of the global batch of the current step (set by the engine with
    :meth:`layout`, and by a method that selects within the batch through :meth:`part`)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    sizes: list[int] = field(default_factory=list)

    @property
    def shard(self) -> tuple[int, int]:
        """``(rank, world_size)``: what the data's ``train_batches``/``test_batches`` take to yield this part."""
        return self.rank, self.world_size

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    # -- the step's global batch -----------------------------------------------------------------------------
    def layout(self, n: int) -> None:
        """The current step's global batch holds ``n`` points."""
        self.sizes = part_sizes(n, self.world_size)

    def gather(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor (this process's part: ``sizes[rank]`` rows) as the global batch: the parts of all processes
        concatenated in rank order. Differentiable: the gradient of a part is the sum of every process's gradient
        for it. Tensors of one dtype travel in one collective."""
        sizes, most = self.sizes, max(self.sizes)
        for t in tensors:
            if t.shape[0] != sizes[self.rank]:
                raise RuntimeError(f"rank {self.rank} holds {t.shape[0]} rows, the layout says {sizes[self.rank]}")
        out: list[torch.Tensor | None] = [None] * len(tensors)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        for ids in by_dtype.values():
            flat = [tensors[i].reshape(tensors[i].shape[0], math.prod(tensors[i].shape[1:])) for i in ids]
            widths = [f.shape[1] for f in flat]
            packed = torch.cat(flat, dim=1)
            # all_gather wants one shape everywhere: pad to the largest part, strip after.
            packed = torch.cat([packed, packed.new_zeros(most - packed.shape[0], packed.shape[1])])
            parts = _Gather.apply(packed, self.rank, self.world_size)
            whole = torch.cat([parts[r, :s] for r, s in enumerate(sizes)])
            for i, piece in zip(ids, whole.split(widths, dim=1)):
                out[i] = piece.reshape(piece.shape[0], *tensors[i].shape[1:])
        return out

    def part(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """This process's part of global-batch tensors (all of the same length), which becomes the layout."""
        self.layout(int(tensors[0].shape[0]))
        start = sum(self.sizes[: self.rank])
        return [t[start : start + self.sizes[self.rank]] for t in tensors]

    # -- agreement ------------------------------------------------------------------------------------------
    def sum(self, *numbers: torch.Tensor | float) -> list[float]:
        """Each number (a tensor or a float) summed over the processes, in float64 (exact for counts)."""
        t = torch.stack([torch.as_tensor(x, dtype=torch.float64).to(self.device) for x in numbers])
        dist.all_reduce(t)
        return t.tolist()

    def share(self, obj: Any) -> Any:
        """Process 0's ``obj``, on every process."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def decide(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` computed by process 0 alone (it may read and repair the store) and handed to all; an error
        of the user's (:class:`~kcdlib.errors.KcdError`) raised there is raised on every process."""
        result = error = None
        if self.is_writer:
            try:
                result = fn()
            except KcdError as err:
                error = err
        result, error = self.share((result, error))
        if error is not None:
            raise error
        return result

    def check_same(self, what: str, digest: str) -> None:
        """Stop unless every process holds the same ``digest`` of ``what``."""
        digests = [None] * self.world_size
        dist.all_gather_object(digests, digest)
        if len(set(digests)) > 1:
            ranks = ", ".join(f"rank {r}: {d}" for r, d in enumerate(digests))
            raise DistributedMismatch(
                f"the {self.world_size} processes of this run hold different {what} ({ranks}): they no longer "
                "train the same run, so it is stopped. The checkpoints of the epochs before are kept."
            )

    def barrier(self) -> None:
        dist.barrier()


class _Gather(torch.autograd.Function):
    """All-gather of equal-shaped tensors into ``(world_size, *shape)``; backward: the all-reduced gradient of
    this process's slot (every process's loss depends on every part). Any backend (gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        ctx.rank = rank
        parts = [torch.empty_like(t) for _ in range(world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank], None, None


class _AllReduce(torch.autograd.Function):
    """Sum over the processes; the gradient of each process's term is the sum of every process's gradient."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def digest(t: torch.Tensor | None) -> str:
    """16 hex digits of the SHA-256 of a tensor's bytes (int64 on the CPU), ``all`` for None."""
    if t is None:
        return "all"
    return hashlib.sha256(t.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


# -- the process group -----------------------------------------------------------------------------------------
def from_env(device: str = "auto", timeout_minutes: float = 30.0) -> Group | None:
    """The group of this process when torchrun started it (None otherwise), its process group initialised: NCCL
    on CUDA, gloo on CPU. ``device`` is ``auto``, ``cpu`` or ``cuda``: each process uses ``cuda:LOCAL_RANK``."""
    if not launched_by_torchrun():
        return None
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is not None and world_size > 1:
            raise BadOption(f"under torchrun each process trains on cuda:LOCAL_RANK: give --device cuda, not "
                            f"'{device}'")  # fmt: skip
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise BadOption(f"process {rank} (local rank {local_rank}) has no CUDA device: this machine has "
                            f"{torch.cuda.device_count()}; start at most that many per node")  # fmt: skip
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise BadOption(f"device '{device}' is not supported under torchrun: use cpu, cuda or auto")
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
        # torchrun's store outlives a restart of the processes: without a prefix per attempt, a restarted process
        # reads the addresses of the dead ones (gloo then fails to connect).
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"kcdlib/attempt-{attempt}", store)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return Group(rank, world_size, local_rank, dev)


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# -- the student, replicated -----------------------------------------------------------------------------------
class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the global batch, on any backend (torch's
    ``SyncBatchNorm`` accepts only accelerator tensors): one all-reduce of the per-channel count, sum and sum of
    squares, in float64 (so ``E[x²] − E[x]²`` loses nothing that matters), autograd-aware, so the gradient flows
    through the statistics as in one process. Running statistics as ``nn.BatchNorm2d`` keeps them (the unbiased
    variance)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        x64 = x.double()
        count = x64.new_full((1,), float(x.numel() // x.shape[1]))
        total = _AllReduce.apply(torch.cat([count, x64.sum(dims), x64.square().sum(dims)]))
        n, c = total[0], x.shape[1]
        mean = total[1 : 1 + c] / n
        var = (total[1 + c :] / n - mean.square()).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.float(), alpha=m)
                self.running_var.mul_(1 - m).add_((var * n / (n - 1).clamp(min=1)).float(), alpha=m)
        shape = (1, -1, *([1] * (x.dim() - 2)))
        scale = torch.rsqrt(var + self.eps).to(x.dtype)
        out = (x - mean.to(x.dtype).view(shape)) * scale.view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm synchronised over the process group (the same parameter and buffer
    tensors, so the optimizer and a state dict see no difference)."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        if module.weight is not None and module.weight.dim() != 1:
            return module
        bn = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)  # fmt: skip
        if module.affine:
            bn.weight, bn.bias = module.weight, module.bias
        if module.track_running_stats:
            bn.running_mean, bn.running_var = module.running_mean, module.running_var
            bn.num_batches_tracked = module.num_batches_tracked
        bn.train(module.training)
        return bn
    for name, child in module.named_children():
        module.add_module(name, sync_batchnorm(child, device))
    return module


def replicate(student: nn.Module, group: Group, channels_last: bool) -> nn.Module:
    """The student as DistributedDataParallel runs it (its BatchNorm synchronised first: see :func:`sync_batchnorm`).
    Channels-last is set before wrapping, so that the gradient buckets have the weights' layout."""
    from torch.nn.parallel import DistributedDataParallel

    if channels_last:
        student.to(memory_format=torch.channels_last)
    if group.device.type == "cpu":
        # CPU convolutions give a 1x1 kernel's gradient other strides over its size-1 dimensions than the bucket
        # (the same memory order): DDP's performance warning about it says nothing here.
        warnings.filterwarnings("ignore", "Grad strides do not match bucket view strides", UserWarning)
    ids = [group.device.index] if group.device.type == "cuda" else None
    return DistributedDataParallel(student, device_ids=ids, gradient_as_bucket_view=True)


def torchrun_command(nproc: int, argv: list[str], max_restarts: int = 0) -> list[str]:
    """``torchrun --standalone --nproc-per-node nproc -m kcdlib ARGV`` with this interpreter."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}", "-m", "kcdlib", *argv]  # fmt: skip


__all__ = [
    "CpuSyncBatchNorm", "DistributedMismatch", "Group", "close", "digest", "from_env", "part_sizes", "replicate",
    "sync_batchnorm", "torchrun_command",
]  # fmt: skip


def without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less its ``--nproc N`` (or ``--nproc=N``, or an abbreviation argparse accepted)."""
    out, skip = [], False
    for token in argv:
        flag = token.split("=", 1)[0]
        if skip:
            skip = False
        elif len(flag) > 4 and "--nproc".startswith(flag):
            skip = "=" not in token
        else:
            out.append(token)
    return out


def die_with(parent: int):
    """A ``preexec_fn``: the child gets SIGTERM when ``parent`` dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG),
    so a killed ``kcd --nproc`` leaves no torchrun training (torchrun stops its workers on SIGTERM)."""
    import ctypes
    import signal

    def preexec() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
        except AttributeError:  # no prctl (not Linux): the launcher's own signals still reach torchrun
            return
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return preexec
