"""CPU time of one plain-KD training step, the same measurement on two checkouts of kcdlib, interleaved.

    python benchmarks/kd_step_time.py --old /path/to/old/checkout [--new /path/to/new/checkout]

Each round runs one child process per checkout (``PYTHONPATH`` set to it, the order alternating from round to
round so that neither always goes first on a machine whose load drifts), the same threads in both. A child builds
the same teacher/student pair from the same seed (random weights: the time does not depend on them), the engine's
``Trainer`` with the ``kd`` distiller and plain KD's method, runs ``--warmup`` steps, then times ``--steps`` steps
of ``Trainer.train_pass`` and prints one JSON line. The parent prints every child's line, then one summary line:
the median seconds per step of each checkout over the rounds and ``ratio_new_over_old``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> None:
    import torch

    import kcdlib
    from kcdlib import models
    from kcdlib.data import load_dataset
    from kcdlib.distillers import DistillContext, build
    from kcdlib.train import Recipe, Trainer

    torch.set_num_threads(args.threads)
    data = load_dataset("digits", device="cpu")
    torch.manual_seed(0)
    teacher = models.create(args.teacher, data.num_classes).eval()
    student = models.create(args.student, data.num_classes)
    context = DistillContext(data.num_train, data.num_classes, models.penultimate_dim(student), 0)
    trainer = Trainer(student, data, Recipe(1), build("kd", context), teacher, progress=False)
    batch = trainer.recipe.batch_size
    trainer.train_pass(1, torch.arange(args.warmup * batch))  # allocator, first-call costs
    points = torch.arange(min(data.num_train, args.steps * batch))
    start = time.perf_counter()
    trainer.train_pass(1, points)
    seconds = time.perf_counter() - start
    steps = -(-points.numel() // batch)
    print(json.dumps({"checkout": args.label, "kcdlib": str(Path(kcdlib.__file__).parent), "steps": steps,
                      "seconds_per_step": seconds / steps, "threads": torch.get_num_threads()}))  # fmt: skip


def measure(checkout: Path, label: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS=str(args.threads))
    command = [sys.executable, __file__, "--child", "--label", label, "--threads", str(args.threads),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--teacher", args.teacher,
               "--student", args.student]  # fmt: skip
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    row = json.loads(out.strip().splitlines()[-1])
    if Path(row["kcdlib"]).resolve() != (checkout / "kcdlib").resolve():
        raise SystemExit(f"the {label} child imported kcdlib from {row['kcdlib']}, not from {checkout}")
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", type=Path, help="the checkout to compare against (a git worktree of the base commit)")
    p.add_argument("--new", type=Path, default=REPO, help="default: this checkout")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="timed steps per child (digits: at most 23)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--teacher", default="resnet20")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--label", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if args.old is None:
        p.error("--old is required")
    times: dict[str, list[float]] = {"old": [], "new": []}
    for i in range(args.rounds):
        order = ("old", "new") if i % 2 == 0 else ("new", "old")
        for label in order:
            row = measure(getattr(args, label), label, args)
            print(json.dumps({"round": i + 1, **row}), flush=True)
            times[label].append(row["seconds_per_step"])
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    print(json.dumps({"benchmark": "kd_step_time", "teacher": args.teacher, "student": args.student,
                      "threads": args.threads, "rounds": args.rounds, "steps": args.steps,
                      "old_median_ms_per_step": round(1e3 * old, 2), "new_median_ms_per_step": round(1e3 * new, 2),
                      "ratio_new_over_old": round(new / old, 4)}))  # fmt: skip


if __name__ == "__main__":
    main()
