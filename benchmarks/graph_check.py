"""Does the training step recorded as one CUDA graph train like the eager step? One JSON line.

    python benchmarks/graph_check.py --device cuda            # on the GPU machine (gpu_check.sh runs it first)

Three trainers start from the same weights on the same CIFAR-shaped synthetic points: eager, eager again (the
noise floor: cuDNN's autotuned algorithms may differ from one trainer to the next) and ``--compile graph``. Each
makes two passes of ``--steps`` full batches and one short batch: warm-up, recording, replays, an eager short
batch, then a new learning rate and a second recording. Reported: each run's largest parameter difference from
the first eager run and its loss per pass; ``ok`` when the graph's difference is within ten times the floor
(1e-6 when the floor is 0), the graph was recorded twice and nothing fell back to eager; on CUDA the exit status
is 1 when not ``ok``. Without CUDA the graph run falls back to eager (``eager_fallback``), so ``ok`` is false
there by design and the exit status 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_epoch import make_trainer, synthetic  # noqa: E402

from kcdlib import models  # noqa: E402


def train(teacher, student, data, args, compile: str) -> tuple[torch.Tensor, list[float], dict]:
    trainer = make_trainer(copy.deepcopy(student), copy.deepcopy(teacher), data, args.batch_size, args.precision,
                           compile=compile)  # fmt: skip
    points = torch.arange(args.steps * args.batch_size + args.batch_size // 4)
    losses = [trainer.train_pass(epoch, points)["train_loss"] for epoch in (1, 2)]  # lr 0.05, then decayed
    weights = torch.cat([p.detach().float().flatten().cpu() for p in trainer.student.parameters()])
    return weights, losses, trainer.execution()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--steps", type=int, default=20, help="full batches a pass")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    data = synthetic(args.steps * args.batch_size + args.batch_size).to(device)
    torch.manual_seed(0)
    teacher = models.create(args.teacher, data.num_classes).to(device).eval()
    student = models.create(args.student, data.num_classes).to(device)
    reference, ref_losses, _ = train(teacher, student, data, args, "off")
    again, again_losses, _ = train(teacher, student, data, args, "off")
    graph, graph_losses, execution = train(teacher, student, data, args, "graph")
    floor = float((again - reference).abs().max())
    diff = float((graph - reference).abs().max())
    ok = diff <= max(10 * floor, 1e-6) and execution["graph_recordings"] == 2 and not execution["eager_fallback"]
    print(json.dumps({
        "benchmark": "graph_check", "device": str(device), "teacher": args.teacher, "student": args.student,
        "precision": args.precision, "steps_per_pass": args.steps, "max_abs_weight": float(reference.abs().max()),
        "max_abs_diff_eager_again": floor, "max_abs_diff_graph": diff,
        "loss_eager": ref_losses, "loss_eager_again": again_losses, "loss_graph": graph_losses, **execution,
        "ok": ok,
    }), flush=True)  # fmt: skip
    if device.type == "cuda" and not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
