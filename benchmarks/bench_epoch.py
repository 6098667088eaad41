"""Engine vs reference-style pipeline: images/s, multiply-add rate and the device's measured peak, as ONE JSON line.

    python benchmarks/bench_epoch.py --dataset digits --teacher resnet20 --student resnet8 --device cpu
    python benchmarks/bench_epoch.py --dataset synthetic --teacher resnet32x4 --student resnet8x4 --steps 20

Modes (``--mode``):

``compare`` (default)
    In one process, the same teacher/student pair (same initial weights, random: throughput does not depend on
    them), the same data, batch size and number of steps, first through ``reference_pipeline.py`` (the
    RepDistiller-shaped baseline: PIL + torchvision transforms in DataLoader workers, per-step host syncs), then
    through the engine (``Trainer.train_pass`` over as many points). Each pipeline runs ``--warmup`` steps
    first (worker start-up, allocator, cuDNN autotuning), untimed; the device is synchronised before and after
    the timed steps. Reports images/s of both, ``ratio_engine_over_reference``, each one's achieved
    multiply-add rate and the fraction of the device's peak it is.
``engine``
    The engine alone for ``--steps`` steps (``--steps 0``: one whole epoch over all points, the measured epoch
    time). With ``--barrier DIR --parties K``, K processes wait for each other after their warm-up, so that
    their timed windows overlap (several runs sharing one device); wall-clock start/end are reported.
``kcd-cost``
    KCD's per-epoch cost check: the engine's time for a pass over a random ``--subset`` of the points (sorted,
    as KCD keeps them) against a pass over the first ``--subset`` points, as KD; and the same random subset with
    KCD's method recording every step's entropies (its value record). Best of ``--repeats``.

Multiply-adds per image = ``3·F_s + F_t``: the student's forward ``F_s``, its backward taken as ``2·F_s``
(gradients with respect to activations and to weights), and the teacher's forward ``F_t``; ``F`` from
``kcdlib.cost.forward_macs`` at the data's image size (convolutions and linear layers only). The peak is
MEASURED in the same run on the same machine: a large matmul (``--peak-size``, 2048 on CPU, 8192 on CUDA)
timed a few times, ``n³`` multiply-adds each. On CPU: fp32 (and bf16 when the engine runs in bf16). On CUDA:
strict fp32 (TF32 off), TF32 and bf16; fractions are taken against the peak of the engine's precision (strict
fp32 for fp32; note cuDNN runs fp32 convolutions as TF32 by default, so ``*_fraction_of_tf32_peak`` is
given too).

``--dataset synthetic`` is CIFAR-shaped random uint8 data (``--points`` images of 3x32x32, 100 classes), for
machines where CIFAR-100 cannot be had; ``--dataset cifar100`` reads it from ``--data-root``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reference_pipeline as reference  # noqa: E402

from kcdlib import models  # noqa: E402
from kcdlib.cost import forward_macs  # noqa: E402
from kcdlib.data import DeviceDataset, load_dataset  # noqa: E402
from kcdlib.distillers import DistillContext, build  # noqa: E402
from kcdlib.fastpath import COMPILE_MODES, PRECISIONS  # noqa: E402
from kcdlib.train import Recipe, Trainer  # noqa: E402

GIGA = 1e9


def synthetic(points: int, seed: int = 0) -> DeviceDataset:
    """CIFAR-shaped random data on the CPU: ``points`` uint8 3x32x32 images, 100 classes, 256 test images."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (points, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 100, (points,), generator=g)
    return DeviceDataset("synthetic", 100, images, labels, images[:256].clone(), labels[:256].clone())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


COMPILE = "off"  # set from --compile: how the engine runs its networks (see kcdlib.fastpath.COMPILE_MODES)


def make_trainer(student, teacher, data, batch_size: int, precision: str, method=None, compile=None) -> Trainer:
    context = DistillContext(data.num_train, data.num_classes, models.penultimate_dim(student), 0)
    return Trainer(student, data, Recipe(1, batch_size=batch_size), build("kd", context), teacher, method=method,
                   progress=False, precision=precision, compile=compile or COMPILE)  # fmt: skip


def matmul_rate(n: int, dtype: torch.dtype, device: torch.device, repeats: int = 3) -> float:
    """Multiply-adds per second of an ``n x n @ n x n`` matmul in ``dtype``: best of ``repeats`` timed runs."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    inner = 10 if device.type == "cuda" else 1
    a @ b  # warm-up (library selection, page faults)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / inner)
    return n**3 / best


def measure_peaks(device: torch.device, size: int, precision: str) -> dict[str, float]:
    """Measured matmul rates (GMAC/s): fp32 (TF32 off) always; on CUDA also TF32 and bf16; bf16 on CPU when
    the engine runs in bf16."""
    peaks = {}
    if device.type == "cuda":
        matmul = torch.backends.cuda.matmul
        saved = matmul.allow_tf32
        try:
            matmul.allow_tf32 = False
            peaks["fp32"] = matmul_rate(size, torch.float32, device) / GIGA
            try:
                matmul.allow_tf32 = True
                peaks["tf32"] = matmul_rate(size, torch.float32, device) / GIGA
            except RuntimeError:  # a torch that refuses the switch: no TF32 figure
                pass
        finally:
            matmul.allow_tf32 = saved
        peaks["bf16"] = matmul_rate(size, torch.bfloat16, device) / GIGA
    else:
        peaks["fp32"] = matmul_rate(size, torch.float32, device) / GIGA
        if precision == "bf16":
            peaks["bf16"] = matmul_rate(size, torch.bfloat16, device) / GIGA
    return peaks


def engine_points(n: int, steps: int, batch_size: int, seed: int) -> list[torch.Tensor | None]:
    """The points of the timed engine passes: ``steps`` batches of random points, in passes of at most one
    epoch (whole batches); ``steps == 0``: one whole epoch (None = all points)."""
    if steps == 0:
        return [None]
    g = torch.Generator().manual_seed(seed)
    per_pass = max(batch_size, (n // batch_size) * batch_size)
    total, passes = steps * batch_size, []
    while total > 0:
        k = min(per_pass, total, n)
        passes.append(torch.randperm(n, generator=g)[:k])
        total -= k
    return passes


def warm_points(n: int, warmup: int, batch_size: int, timed: int, seed: int) -> torch.Tensor:
    """Warm-up points: ``warmup`` batches plus the timed passes' odd last batch, so that cuDNN's autotuner has
    seen every batch shape before the clock starts."""
    k = min(n, max(1, warmup * batch_size + timed % batch_size))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:k]


def time_engine(trainer: Trainer, passes, device: torch.device, warm=None) -> tuple[int, float, float]:
    """Warm up on the points ``warm`` (when given), then time the passes: ``(images, seconds, wall-clock start)``."""
    if warm is not None:
        trainer.train_pass(1, warm)
    sync(device)
    start_unix, start = time.time(), time.perf_counter()
    images = sum(trainer.train_pass(1, p)["points"] for p in passes)
    sync(device)
    return images, time.perf_counter() - start, start_unix


def time_reference(ref: reference.ReferenceKD, loader, steps: int, warmup: int, device) -> tuple[int, float]:
    """Warm up (worker start-up, first batches), then time ``steps`` steps: ``(images, seconds)``."""
    batches = reference.batches_forever(loader)
    try:
        for _ in range(warmup):
            ref.step(*next(batches))
        sync(device)
        start, images = time.perf_counter(), 0
        for _ in range(steps):
            x, y, idx = next(batches)
            ref.step(x, y, idx)
            images += x.shape[0]
        sync(device)
        return images, time.perf_counter() - start
    finally:
        batches.close()  # shuts the workers down


def count_syncs(run, steps: int) -> dict:
    """CUDA only: host-device synchronisations made by ``run()`` (``steps`` training steps), found with torch's
    sync debug mode, per step and by the Python line that caused them. Diagnostics: never fails the benchmark."""
    import warnings
    from collections import Counter

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        sites = Counter(
            f"{os.path.basename(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()
        )
        return {"syncs_per_step": round(sum(sites.values()) / steps, 2), "sync_sites": dict(sites.most_common(8))}
    except Exception as err:  # a diagnostic must not cost the measurement
        return {"syncs_error": f"{type(err).__name__}: {err}"}


def wait_at_barrier(path: str, parties: int, timeout: float = 90.0) -> None:
    """File barrier: announce this process in ``path`` and wait until ``parties`` processes have."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, f"ready.{os.getpid()}"), "w"):
        pass
    deadline = time.monotonic() + timeout
    while sum(name.startswith("ready.") for name in os.listdir(path)) < parties:
        if time.monotonic() > deadline:
            raise SystemExit(f"barrier {path}: fewer than {parties} processes arrived within {timeout:.0f} s")
        time.sleep(0.005)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="compare", choices=("compare", "engine", "kcd-cost"))
    p.add_argument("--dataset", default="digits", choices=("digits", "synthetic", "cifar100"))
    p.add_argument("--data-root", default="data", help="cifar100: the folder holding cifar-100-python")
    p.add_argument("--points", type=int, default=50_000, help="synthetic: number of training images")
    p.add_argument("--teacher", default="resnet20")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps (engine mode: 0 = one whole epoch)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the clock starts, each pipeline")
    p.add_argument("--workers", type=int, default=2, help="reference DataLoader worker processes (RepDistiller: 8)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="the engine's precision")
    p.add_argument("--compile", default="off", choices=COMPILE_MODES, help="torch.compile mode of the engine")
    p.add_argument("--peak-size", type=int, default=0, help="matmul size for the peak (0: 2048 CPU, 8192 CUDA)")
    p.add_argument("--subset", type=int, default=35_000, help="kcd-cost: points per pass")
    p.add_argument("--repeats", type=int, default=2, help="kcd-cost: passes of each kind (best is kept)")
    p.add_argument("--barrier", default="", help="engine: barrier folder shared by concurrent processes")
    p.add_argument("--parties", type=int, default=1, help="engine: processes meeting at --barrier")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 0 or (args.steps == 0 and args.mode != "engine"):
        p.error("--steps must be positive (0 only in engine mode: one whole epoch)")
    if args.batch_size <= 0 or args.warmup < 0 or args.workers < 0:
        p.error("--batch-size must be positive, --warmup and --workers not negative")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dataset == "synthetic":
        data = synthetic(args.points, args.seed)
    else:
        data = load_dataset(args.dataset, args.data_root, "cpu")
    n, size = data.num_train, data.image_size

    torch.manual_seed(args.seed)
    teacher = models.create(args.teacher, data.num_classes)
    student = models.create(args.student, data.num_classes)
    f_t = forward_macs(teacher, (3, size, size))
    f_s = forward_macs(student, (3, size, size))
    macs_per_image = 3 * f_s + f_t
    global COMPILE
    COMPILE = args.compile
    precision = args.precision

    row = {
        "benchmark": "bench_epoch", "mode": args.mode, "dataset": args.dataset, "points": n, "image_size": size,
        "teacher": args.teacher, "student": args.student, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch_size": args.batch_size, "steps": args.steps, "warmup_steps": args.warmup, "precision": precision,
        "compile": args.compile, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "student_forward_macs": f_s, "teacher_forward_macs": f_t, "macs_per_image": macs_per_image,
    }  # fmt: skip
    if device.type == "cuda":
        row["cudnn_allow_tf32"] = bool(torch.backends.cudnn.allow_tf32)

    if args.mode == "compare":
        peak_size = args.peak_size or (8192 if device.type == "cuda" else 2048)
        peaks = measure_peaks(device, peak_size, precision)  # before any worker process exists

        # Reference first (its own copies of the networks), so the engine's settings cannot leak into it.
        loader = reference.make_loader(
            data.train_images, data.train_labels, args.batch_size, args.workers, device, data.pad, data.mean,
            data.std, args.seed,
        )  # fmt: skip
        ref = reference.ReferenceKD(copy.deepcopy(student), copy.deepcopy(teacher), n, device)
        ref_images, ref_seconds = time_reference(ref, loader, args.steps, args.warmup, device)
        if device.type == "cuda":
            probe = reference.make_loader(data.train_images, data.train_labels, args.batch_size, 0, device,
                                          data.pad, data.mean, data.std, args.seed)  # fmt: skip
            batches = [next(iter(probe)) for _ in range(8)]
            syncs = count_syncs(lambda: [ref.step(*b) for b in batches], len(batches))
            row.update({f"reference_{k}": v for k, v in syncs.items()})
        del ref, loader

        on_device = data.to(device)
        trainer = make_trainer(copy.deepcopy(student).to(device), copy.deepcopy(teacher).to(device).eval(),
                               on_device, args.batch_size, precision)  # fmt: skip
        passes = engine_points(n, args.steps, args.batch_size, args.seed)
        timed = sum(int(p.numel()) for p in passes)
        warm = warm_points(n, args.warmup, args.batch_size, timed, args.seed)
        eng_images, eng_seconds, _ = time_engine(trainer, passes, device, warm)
        if device.type == "cuda":
            probe = warm_points(n, 8, args.batch_size, 0, args.seed + 2)
            row.update({f"engine_{k}": v for k, v in count_syncs(lambda: trainer.train_pass(1, probe), 8).items()})

        ref_rate, eng_rate = ref_images / ref_seconds, eng_images / eng_seconds
        ref_gmacs, eng_gmacs = ref_rate * macs_per_image / GIGA, eng_rate * macs_per_image / GIGA
        basis = "bf16" if precision == "bf16" and "bf16" in peaks else "fp32"
        row.update({
            "workers": args.workers,
            "reference_images": ref_images, "reference_seconds": round(ref_seconds, 4),
            "reference_images_per_second": round(ref_rate, 1),
            "engine_images": eng_images, "engine_seconds": round(eng_seconds, 4),
            "engine_images_per_second": round(eng_rate, 1),
            "ratio_engine_over_reference": round(eng_rate / ref_rate, 3),
            "reference_gmacs_per_second": round(ref_gmacs, 2), "engine_gmacs_per_second": round(eng_gmacs, 2),
            "peak_matmul_size": peak_size,
            **{f"peak_{k}_gmacs_per_second": round(v, 1) for k, v in peaks.items()},
            "reference_fraction_of_peak": round(ref_gmacs / peaks["fp32"], 4),
            "engine_fraction_of_peak": round(eng_gmacs / peaks[basis], 4), "engine_peak_basis": basis,
            "reference_epoch_seconds_extrapolated": round(n / ref_rate, 2),
            "engine_epoch_seconds_extrapolated": round(n / eng_rate, 2),
        })  # fmt: skip
        if "tf32" in peaks:
            row["reference_fraction_of_tf32_peak"] = round(ref_gmacs / peaks["tf32"], 4)
            row["engine_fraction_of_tf32_peak"] = round(eng_gmacs / peaks["tf32"], 4)

    elif args.mode == "engine":
        on_device = data.to(device)
        trainer = make_trainer(student.to(device), teacher.to(device).eval(), on_device, args.batch_size, precision)
        passes = engine_points(n, args.steps, args.batch_size, args.seed)
        timed = n if args.steps == 0 else sum(int(p.numel()) for p in passes)
        warm = warm_points(n, args.warmup, args.batch_size, timed, args.seed)
        trainer.train_pass(1, warm)
        sync(device)
        if args.barrier:
            wait_at_barrier(args.barrier, args.parties)
        eng_images, eng_seconds, start_unix = time_engine(trainer, passes, device)
        eng_rate = eng_images / eng_seconds
        row.update({
            "epoch": args.steps == 0, "parties": args.parties,
            "engine_images": eng_images, "engine_seconds": round(eng_seconds, 4),
            "engine_images_per_second": round(eng_rate, 1),
            "engine_gmacs_per_second": round(eng_rate * macs_per_image / GIGA, 2),
            "engine_epoch_seconds_extrapolated": round(n / eng_rate, 2),
            "start_unix": round(start_unix, 4), "end_unix": round(start_unix + eng_seconds, 4),
        })  # fmt: skip

    else:  # kcd-cost
        from kcdlib.methods import KCD, MethodContext

        k = min(args.subset, n)
        on_device = data.to(device)
        first = torch.arange(k)
        subset = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + 7))[:k].sort().values
        warm = warm_points(n, args.warmup, args.batch_size, k, args.seed)
        kd = make_trainer(copy.deepcopy(student).to(device), copy.deepcopy(teacher).to(device).eval(), on_device,
                          args.batch_size, precision)  # fmt: skip
        kcd_method = KCD(MethodContext(n, 240, args.seed, batch_size=args.batch_size, device=str(device)))
        kcd = make_trainer(copy.deepcopy(student).to(device), copy.deepcopy(teacher).to(device).eval(), on_device,
                           args.batch_size, precision, method=kcd_method)  # fmt: skip
        kd.train_pass(1, warm)
        kcd.train_pass(1, warm)
        best = {"kd_first": float("inf"), "kd_subset": float("inf"), "kcd_subset": float("inf")}
        for _ in range(max(1, args.repeats)):  # interleaved, so that drift hits all three alike
            for name, trainer, points in (("kd_first", kd, first), ("kd_subset", kd, subset),
                                          ("kcd_subset", kcd, subset)):  # fmt: skip
                best[name] = min(best[name], time_engine(trainer, [points], device)[1])
        row.update({"subset": k, "steps": -(-k // args.batch_size), "repeats": max(1, args.repeats)})
        for name, seconds in best.items():
            row[f"{name}_seconds"] = round(seconds, 4)
            row[f"{name}_images_per_second"] = round(k / seconds, 1)
        row["subset_over_first"] = round(best["kd_subset"] / best["kd_first"], 4)
        row["kcd_over_first"] = round(best["kcd_subset"] / best["kd_first"], 4)
        row["within_5_percent"] = bool(max(abs(row["subset_over_first"] - 1), abs(row["kcd_over_first"] - 1)) <= 0.05)

    row.update(trainer.execution())  # whether the engine really ran as asked (compilation can fall back)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
