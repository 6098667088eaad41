"""ImageNet input at accelerator speed: PIL in DataLoader workers vs JPEGs decoded on the device, side by side.

    python3 benchmarks/decode_throughput.py                                  # a GPU machine: both parts
    .venv/bin/python benchmarks/decode_throughput.py --decode-images 1024    # a CPU: decoding only

Writes ``--files`` JPEGs of ImageNet-like sizes (about 500x375, landscape and portrait, quality 90, a photo-like
multi-scale texture so that files are of photo size, about 100 KB) as an ImageFolder in a temporary folder, and
prints JSON lines:

``decode``
    images/s of ``kcdlib.data.ImageNetData``'s two training paths over the same ``--decode-images`` images (the
    files repeated in a seeded order, read from the page cache), batch ``--batch-size``:
    ``pil`` (``decode="pil"``: PIL + torchvision's RandomResizedCrop/flip/ToTensor/Normalize in ``--workers``
    DataLoader processes, default all the machine's cores, then moved to the device) and ``device``
    (``decode="gpu"``: ``--threads`` threads read the bytes, nvjpeg decodes the batch, crop, flip and
    normalisation on the device). On a machine without CUDA the ``device`` path is the same tensor pipeline on
    the CPU (torchvision's libjpeg-turbo decoder, one process): labelled ``cpu_tensor_path``, not the GPU figure.
    The first batches are not timed (``pil``: two per worker, since the workers' first batches arrive in a
    burst; ``device``: two); the device is synchronised before the clock stops. ``ratio_device_over_pil``.
``train_step`` (CUDA only; on a CPU a line that says it was skipped)
    steps/s of ResNet34 -> ResNet18 KD (``kcdlib.train.Trainer``) at batch ``--train-batch`` in ``--precision``
    on in-memory tensors (a ``DeviceDataset`` of random 224x224 uint8 images on the device) vs fed by the device
    decoder from the files; ``ratio_in_memory_over_decoded`` (input is not the bottleneck when it is near 1).

Targets (issue #12, on a GPU): ``ratio_device_over_pil`` >= 3 with all cores for PIL; ``ratio_in_memory_over_decoded``
<= 2. Nothing is written outside the temporary folder (``--dir`` keeps the files somewhere else).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kcdlib import models  # noqa: E402
from kcdlib.data import IMAGENET_MEAN, IMAGENET_STD, DeviceDataset, ImageNetData  # noqa: E402
from kcdlib.distillers import DistillContext, build  # noqa: E402
from kcdlib.fastpath import COMPILE_MODES, PRECISIONS  # noqa: E402
from kcdlib.train import Recipe, Trainer  # noqa: E402


def texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A photo-like uint8 ``(H, W, 3)`` picture: smooth colour fields at three scales plus fine grain."""
    from PIL import Image

    img = np.zeros((height, width, 3), np.float32)
    for cell, amplitude in ((64, 90.0), (16, 45.0), (4, 30.0)):
        coarse = rng.normal(0, amplitude, (height // cell + 2, width // cell + 2, 3)).astype(np.float32)
        layer = [np.asarray(Image.fromarray(coarse[..., c], "F").resize((width, height), Image.BILINEAR))
                 for c in range(3)]  # fmt: skip
        img += np.stack(layer, axis=-1)
    img += rng.normal(128, 14, (height, width, 3)).astype(np.float32)
    return img.clip(0, 255).astype(np.uint8)


def write_jpegs(root: str, files: int, classes: int, quality: int, seed: int) -> dict:
    """``root/{train,val}/nXXXXXXXX/*.JPEG``: ``files`` training JPEGs over ``classes`` folders (and two
    validation images per class, which ImageNetData needs to open the folder)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes, total = [], 0
    for split, n in (("train", files), ("val", 2 * classes)):
        for k in range(n):
            w, h = int(rng.integers(440, 501)), int(rng.integers(330, 376))
            if rng.random() < 0.25:  # a quarter are portrait, as in ImageNet
                w, h = h, w
            folder = os.path.join(root, split, f"n{k % classes:08d}")
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{k}.JPEG")
            Image.fromarray(texture(rng, h, w)).save(path, quality=quality)
            if split == "train":
                sizes.append((w, h))
                total += os.path.getsize(path)
    return {
        "files": files, "classes": classes, "quality": quality, "mean_kb": round(total / files / 1024, 1),
        "mean_megapixels": round(float(np.mean([w * h for w, h in sizes])) / 1e6, 3),
    }  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batches(batches, device: torch.device, skip: int) -> tuple[int, float]:
    """Images and seconds of the batches after the first ``skip`` (the clock starts when batch ``skip`` has
    arrived); each batch is reduced on the device so that it is really made."""
    images, start, sink = 0, None, torch.zeros((), device=device)
    for k, (x, _, _) in enumerate(batches):
        sink += x[:, :, 0, 0].sum()  # one small kernel: the batch must exist, nothing is copied back
        if k + 1 == skip:
            sync(device)
            start = time.perf_counter()
        elif k + 1 > skip:
            images += x.shape[0]
    sync(device)
    if start is None or images == 0:
        raise SystemExit(f"too few batches: raise --decode-images above {skip} batches")
    return images, time.perf_counter() - start


def decode_rates(root: str, args, device: torch.device) -> dict:
    row = {}
    for path, decode, workers, skip in (("pil", "pil", args.workers, 2 * max(1, args.workers)),
                                        ("device", "gpu", args.threads, 2)):  # fmt: skip
        data = ImageNetData(root, device, workers=workers, decode=decode)
        reps = -(-args.decode_images // data.num_train)
        points = torch.arange(data.num_train).repeat(reps)[: args.decode_images]
        images, seconds = time_batches(data.train_batches(points, args.batch_size, args.seed, 1), device, skip)
        row[f"{path}_images_per_second"] = round(images / seconds, 1)
        row[f"{path}_timed_images"] = images
        row[f"{path}_seconds"] = round(seconds, 3)
    row["pil_workers"] = args.workers
    row["device_threads"] = args.threads
    row["device_path"] = "nvjpeg (gpu_decode)" if device.type == "cuda" else "cpu_tensor_path (no CUDA: libjpeg-turbo)"
    row["ratio_device_over_pil"] = round(row["device_images_per_second"] / row["pil_images_per_second"], 3)
    return row


def kd_trainer(data, args, device: torch.device) -> Trainer:
    torch.manual_seed(args.seed)
    teacher = models.create(args.teacher, 1000).to(device).eval()
    student = models.create(args.student, 1000).to(device)
    context = DistillContext(data.num_train, 1000, models.penultimate_dim(student), 0)
    recipe = Recipe(1, batch_size=args.train_batch, lr=0.1, weight_decay=1e-4)
    return Trainer(student, data, recipe, build("kd", context), teacher, progress=False, precision=args.precision,
                   compile=args.compile)  # fmt: skip


def step_rate(trainer: Trainer, n: int, args, device: torch.device) -> float:
    """Steps per second of ``--train-steps`` steps after ``--train-warmup`` untimed ones, over random points."""
    g = torch.Generator().manual_seed(args.seed)
    points = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-args.train_steps * args.train_batch // n))])
    warm = points[: args.train_warmup * args.train_batch]
    timed = points[: args.train_steps * args.train_batch]
    trainer.train_pass(1, warm)
    sync(device)
    start = time.perf_counter()
    trainer.train_pass(1, timed)
    sync(device)
    return args.train_steps / (time.perf_counter() - start)


def train_rates(root: str, args, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    m = 4 * args.train_batch
    images = torch.randint(0, 256, (m, 3, 224, 224), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 1000, (m,), generator=g)
    memory = DeviceDataset("in-memory", 1000, images, labels, images[:256], labels[:256], IMAGENET_MEAN,
                           IMAGENET_STD, pad=0).to(device)  # fmt: skip
    in_memory = step_rate(kd_trainer(memory, args, device), m, args, device)
    del memory
    files = ImageNetData(root, device, workers=args.threads, decode="gpu")
    decoded = step_rate(kd_trainer(files, args, device), files.num_train, args, device)
    return {
        "teacher": args.teacher, "student": args.student, "batch_size": args.train_batch,
        "precision": args.precision, "compile": args.compile, "steps": args.train_steps,
        "in_memory_steps_per_second": round(in_memory, 3), "decoded_steps_per_second": round(decoded, 3),
        "in_memory_images_per_second": round(in_memory * args.train_batch, 1),
        "decoded_images_per_second": round(decoded * args.train_batch, 1),
        "ratio_in_memory_over_decoded": round(in_memory / decoded, 3),
    }  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--files", type=int, default=400, help="JPEG files written (default 400)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--decode-images", type=int, default=16384, help="images decoded by each path (files repeated)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=cores, help=f"PIL DataLoader processes (default: all, {cores})")
    p.add_argument("--threads", type=int, default=cores, help="threads reading files for the device path")
    p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--teacher", default="ResNet34")
    p.add_argument("--student", default="ResNet18")
    p.add_argument("--train-batch", type=int, default=256)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--train-warmup", type=int, default=3)
    p.add_argument("--precision", default="bf16", choices=PRECISIONS)
    p.add_argument("--compile", default="off", choices=COMPILE_MODES)
    p.add_argument("--skip-train", action="store_true", help="decoding only")
    p.add_argument("--dir", help="write the JPEGs here (kept) instead of a temporary folder")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.files, args.classes, args.decode_images, args.batch_size, args.train_batch, args.threads) < 1:
        p.error("--files, --classes, --decode-images, --batch-size, --train-batch and --threads must be positive")
    if args.workers < 0 or args.train_steps < 1 or args.train_warmup < 0:
        p.error("--workers must not be negative, --train-steps positive, --train-warmup not negative")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    common = {
        "benchmark": "decode_throughput", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_cores": os.cpu_count(), "torch": torch.__version__,
    }  # fmt: skip
    import torchvision

    common["torchvision"] = torchvision.__version__
    with tempfile.TemporaryDirectory(prefix="kcd-jpegs-") as tmp:
        root = args.dir or tmp
        start = time.perf_counter()
        written = write_jpegs(root, args.files, args.classes, args.quality, args.seed)
        written["write_seconds"] = round(time.perf_counter() - start, 1)
        row = {**common, "part": "decode", **written, "batch_size": args.batch_size}
        print(json.dumps({**row, **decode_rates(root, args, device)}), flush=True)
        if args.skip_train:
            return
        row = {**common, "part": "train_step"}
        if device.type != "cuda":
            print(json.dumps({**row, "skipped": "the training step rate is measured on CUDA only"}), flush=True)
            return
        print(json.dumps({**row, **train_rates(root, args, device)}), flush=True)


if __name__ == "__main__":
    main()
