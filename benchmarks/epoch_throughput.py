"""Images per second of one KD epoch for a teacher/student pair: one JSON line on standard output.

    python benchmarks/epoch_throughput.py --dataset digits --teacher resnet20 --student resnet8 --device cpu

``--dataset synthetic`` uses CIFAR-shaped random uint8 tensors (50,000 x 3 x 32 x 32 by default; ``--points``
sets how many), so the CIFAR-100 pipeline can be measured where the dataset cannot be had. Teacher weights are
random: throughput does not depend on them. A warm-up of a few steps is excluded from the timing.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kcdlib import models
from kcdlib.data import DeviceDataset, load_dataset
from kcdlib.distillers import DistillContext, build
from kcdlib.train import Recipe, Trainer


def synthetic(points: int, device: str) -> DeviceDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (points, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 100, (points,), generator=g)
    return DeviceDataset("synthetic", 100, images, labels, images[:256], labels[:256]).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", help="digits, cifar100 or synthetic")
    p.add_argument("--data-root", default="data")
    p.add_argument("--teacher", default="resnet20")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--points", type=int, default=50_000, help="synthetic: number of training points")
    p.add_argument("--steps", type=int, default=0, help="time only this many steps (0 = a whole epoch)")
    args = p.parse_args()

    device = torch.device(args.device)
    if args.dataset == "synthetic":
        data = synthetic(args.points, args.device)
    else:
        data = load_dataset(args.dataset, args.data_root, args.device)
    torch.manual_seed(0)
    teacher = models.create(args.teacher, data.num_classes).to(device).eval()
    student = models.create(args.student, data.num_classes).to(device)
    context = DistillContext(data.num_train, data.num_classes, models.penultimate_dim(student), 0)
    trainer = Trainer(student, data, Recipe(1, batch_size=args.batch_size), build("kd", context), teacher,
                      progress=False)  # fmt: skip
    points = data.num_train if args.steps == 0 else min(data.num_train, args.steps * args.batch_size)
    subset = torch.arange(points)
    trainer.train_pass(1, subset[: 4 * args.batch_size])  # warm-up: allocator, cuDNN autotuning
    sync(device)
    start = time.perf_counter()
    trainer.train_pass(1, subset)
    sync(device)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "benchmark": "epoch_throughput", "dataset": args.dataset, "teacher": args.teacher, "student": args.student,
        "device": str(device), "batch_size": args.batch_size, "images": points, "seconds": round(seconds, 3),
        "images_per_second": round(points / seconds, 1), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
