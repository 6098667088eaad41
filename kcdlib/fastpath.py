"""The fast path: how a training step runs on the hardware, never what it computes.

Everything here is speed: bf16 autocast for the networks' forwards (losses stay fp32), channels-last weights and
inputs and cuDNN's autotuner on CUDA, one fused SGD kernel, ``torch.compile`` and CUDA graphs. The protocol itself
(what a step and an epoch compute) is :mod:`kcdlib.train`; a run's identity records ``precision`` (it changes the
numbers) but not the compile mode (it does not).

Modes of ``compile`` (:data:`COMPILE_MODES`):

- ``off``: eager PyTorch.
- ``default``: the networks ``torch.compile``'d.
- ``reduce-overhead``: the same, each network's forward and backward as CUDA graphs (torch's).
- ``graph``: the whole step (both forwards, the losses, backward, SGD) recorded as one CUDA graph of eager
  kernels (:class:`StepGraph`).
- ``default+graph``: that, with compiled networks inside.

Whatever fails to compile or record falls back to eager with a warning; :meth:`FastPath.execution` says how the
steps really ran.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16")
COMPILE_MODES = ("off", "default", "reduce-overhead", "graph", "default+graph")
# The modes that record the whole step as one CUDA graph, and the network compilation inside each.
_GRAPH_MODES = {"graph": "off", "default+graph": "default"}


def autocast(device: torch.device, precision: str):
    """bf16 autocast for the networks' forwards (losses are computed in fp32 outside it).

    Without autocast's weight-cast cache: no weight is cast twice in one forward, and a cache filled while a CUDA
    graph records would hand later steps tensors in the graph's memory."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=False)


def fp32(feats):
    """Features cast back to fp32 for the losses (None stays None)."""
    return None if feats is None else [f.float() for f in feats]


@contextlib.contextmanager
def cudnn_autotune(enabled: bool) -> Iterator[None]:
    """cuDNN's autotuner (fixed shapes: pays off after the first batches) for the ``with`` block only.

    Set and restored around training, so that constructing or running a trainer changes no process-wide flag."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = before or enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


class FastPath:
    """The speed settings of one trainer on one device: ``precision`` (``fp32`` or ``bf16``) and ``compile``."""

    def __init__(self, device: torch.device, precision: str = "fp32", compile: str = "off"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
        self.device, self.precision, self.compile = device, precision, compile
        # Channels-last on CUDA (tensor-core friendly; the device crop's gather already yields channels-last
        # batches). On CPU tensors keep the default layout.
        self.channels_last = device.type == "cuda"
        self.graph_wanted = compile in _GRAPH_MODES
        self.network_mode = _GRAPH_MODES.get(compile, compile)
        self.compiled: list[_Compiled] = []
        self.step_graph: StepGraph | None = None

    def autocast(self):
        return autocast(self.device, self.precision)

    def training(self):
        """The ``with`` block of an epoch: cuDNN's autotuner on CUDA."""
        return cudnn_autotune(self.device.type == "cuda")

    def network(self, model: nn.Module | None):
        """What a step calls for ``model``: the model (channels-last on CUDA) or its ``torch.compile``'d form."""
        if model is None:
            return None
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.network_mode == "off":
            return model
        compiled = _Compiled(model, self.network_mode)
        self.compiled.append(compiled)
        return compiled

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def optimizer_options(self) -> dict[str, bool]:
        """One fused kernel for the SGD update on CUDA (no per-parameter launches); foreach elsewhere."""
        return {"fused": True} if self.device.type == "cuda" else {"foreach": True}

    def record_steps(self, step: Callable, optimizer: torch.optim.Optimizer) -> None:
        """Make :attr:`step_graph` a :class:`StepGraph` of ``step`` when the mode records the whole step (CUDA
        only; elsewhere a warning, and steps run eagerly)."""
        if not self.graph_wanted:
            return
        if self.device.type != "cuda":
            warnings.warn(f"compile {self.compile!r} records CUDA graphs and needs a CUDA device: "
                          f"steps on {self.device.type} run eagerly", stacklevel=3)  # fmt: skip
            return
        self.step_graph = StepGraph(step, optimizer)

    def execution(self) -> dict[str, Any]:
        """How the steps ran: the ``compile`` mode asked for, whether any of it fell back to eager (with a warning),
        and how many times the step was recorded as a CUDA graph."""
        graph = self.step_graph
        return {
            "compile": self.compile,
            "eager_fallback": any(m.failed for m in self.compiled)
            or (self.graph_wanted and (graph is None or graph.failed)),
            "graph_recordings": 0 if graph is None else graph.recordings,
        }


def capture_cuda_graph(fn: Callable[[], None], stream: torch.cuda.Stream) -> Callable[[], None]:
    """Record the kernels ``fn`` launches on ``stream`` as one CUDA graph (nothing runs yet); returns its replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    return graph.replay


class StepGraph:
    """The whole training step recorded once as a CUDA graph and replayed for every batch of the same shape.

    Eager PyTorch spends more host time launching a step's kernels than a GPU spends running them at batch 64; a
    replay launches them all at once. A graph replays its kernels on the memory it recorded them on, so each
    batch is copied into static inputs and the step's outputs are read from static outputs (valid until the next
    replay). What the graph bakes in is watched: it is recorded again when the learning rate changes (the
    milestones), and batches of another shape (an epoch's short last batch) run eagerly. Before the first
    recording, ``warmup`` eager steps on the stream it records on create what must not be created while
    recording (cuDNN's autotuned algorithms, cuBLAS's per-stream workspace, SGD's momentum buffers). If recording
    fails, a warning says why and every step from then on runs eagerly.
    """

    def __init__(self, step, optimizer: torch.optim.Optimizer, warmup: int = 3, capture=capture_cuda_graph):
        self.step, self.optimizer, self.warmup, self.capture = step, optimizer, warmup, capture
        self.shape: torch.Size | None = None  # the batch shape it records: the first batch's
        self.key: tuple[float, ...] | None = None  # the learning rates the recorded graph holds
        self.replay: Callable[[], None] | None = None
        self.inputs: tuple[torch.Tensor, ...] = ()
        self.outputs: tuple[torch.Tensor, ...] = ()
        self.gradients: list[torch.Tensor | None] = []
        self.recordings = 0
        self.failed = False
        self.stream: torch.cuda.Stream | None = None  # the side stream of warm-up and recording (CUDA only)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor):
        if self.shape is None:
            self.shape = x.shape
        if self.failed or x.shape != self.shape:
            return self.step(x, y, idx)
        key = tuple(float(group["lr"]) for group in self.optimizer.param_groups)
        if key != self.key:
            if self.warmup > 0:
                self.warmup -= 1
                return self._on_side_stream(x, y, idx)
            try:
                self._record(x, y, idx, key)
            except Exception as err:  # noqa: BLE001 - any recording failure means: run eagerly
                warnings.warn(f"recording the training step as a CUDA graph failed, running eagerly: {err!r:.300}",
                              stacklevel=2)  # fmt: skip
                self.failed, self.replay, self.key = True, None, None
                self.optimizer.zero_grad(set_to_none=True)
                return self.step(x, y, idx)
        for static, t in zip(self.inputs, (x, y, idx)):
            static.copy_(t)
        self.replay()
        return self.outputs

    def _record(self, x, y, idx, key) -> None:
        # Release the previous graph (and its memory) before recording the next.
        self.replay, self.key, self.gradients = None, None, []
        self.inputs = tuple(t.clone() for t in (x, y, idx))  # clone keeps channels-last strides
        # Gradients are then allocated while recording, in the graph's own memory, and rewritten by each replay.
        self.optimizer.zero_grad(set_to_none=True)

        def body():
            self.outputs = self.step(*self.inputs)

        self.replay = self.capture(body, self._side_stream(x))
        # The gradients the graph writes, kept allocated when an eager step (a short batch) sets .grad to None.
        self.gradients = [p.grad for group in self.optimizer.param_groups for p in group["params"]]
        self.key = key
        self.recordings += 1

    def _side_stream(self, x: torch.Tensor) -> torch.cuda.Stream | None:
        if self.stream is None and x.is_cuda:
            self.stream = torch.cuda.Stream(x.device)
        return self.stream

    def _on_side_stream(self, x, y, idx):
        stream = self._side_stream(x)
        if stream is None:
            return self.step(x, y, idx)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):
            out = self.step(x, y, idx)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        return out


class _Compiled:
    """``torch.compile(model, mode)``, falling back to the eager model (with a warning) if compilation fails,
    so the same code runs on any torch and device; ``reduce-overhead`` adds CUDA graphs (fixed shapes)."""

    def __init__(self, model: nn.Module, mode: str):
        self.model, self.failed = model, False
        self.graphs = mode == "reduce-overhead"
        self.fn = torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)

    def __call__(self, *args, **kwargs):
        if not self.failed:
            try:
                if not self.graphs:
                    return self.fn(*args, **kwargs)
                # A CUDA graph's outputs live in memory its next replay reuses, and the teacher's and the
                # student's graphs share one pool: start a new step and copy the outputs out at once.
                torch.compiler.cudagraph_mark_step_begin()
                return torch.utils._pytree.tree_map(lambda t: t.clone(), self.fn(*args, **kwargs))
            except Exception as err:  # noqa: BLE001 - any compiler failure means: run eagerly
                warnings.warn(f"torch.compile failed, running eagerly: {err!r:.300}", stacklevel=2)
                self.failed = True
        return self.model(*args, **kwargs)
