"""Write a synthetic CIFAR-100 (and, optionally, a tiny ImageNet-shaped ImageFolder) for rehearsals.

    python benchmarks/make_synthetic_cifar100.py DATA_ROOT [--train N] [--test M] [--seed S]
                                                 [--imagenet-classes K --imagenet-train I --imagenet-val V]

``DATA_ROOT/cifar-100-python/{train,test,meta}`` are written in the python version's format: a pickled dict
(protocol 4, str keys) with ``data`` (N, 3072) uint8 in CHW order, ``fine_labels``, ``coarse_labels``,
``filenames`` and ``batch_label``, as in cifar-100-python.tar.gz; ``meta`` holds the label names. The images are
class-dependent, so a network can learn something: each class has a mean colour and an oriented stripe pattern
(a sinusoidal grating whose angle, frequency and colour direction depend on the class), drawn with a random
colour shift, phase and contrast per image, plus pixel noise. Every class is present in both splits (``N`` and
``M`` at least 100). The class prototypes depend on ``--seed`` only, so the train and test splits share them; the
same arguments write the same bytes (a rehearsal run again keeps its run store valid).

With ``--imagenet-classes K`` (default 0: none), ``DATA_ROOT/imagenet/{train,val}/<class>/<i>.JPEG`` are written
too: an ImageFolder of K classes with the same kind of class-dependent pattern, as JPEGs of an ImageNet-like
size (``--imagenet-size``, default 320x256), for a rehearsal of the book's Table 3 (``kcdlib.data.ImageNetData``
reads ``root/imagenet/{train,val}``).

Prints one JSON line: what was written, and how long it took.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import time

import numpy as np

CLASSES = 100
SIDE = 32
CHUNK = 5000  # images generated at a time (float32 work arrays stay small for a 50,000-image split)


def prototypes(seed: int, classes: int) -> dict[str, np.ndarray]:
    """Per-class parameters of the images (shared by every split)."""
    rng = np.random.default_rng([seed, 0xC1FA])
    return {
        "mean": rng.uniform(50, 205, (classes, 3)).astype(np.float32),  # mean colour
        "angle": rng.uniform(0, np.pi, classes).astype(np.float32),  # stripe orientation
        "freq": rng.uniform(1.0, 4.0, classes).astype(np.float32),  # stripe periods across the image
        "tint": rng.normal(0, 1, (classes, 3)).astype(np.float32),  # colour direction of the stripes
    }


def render(proto: dict[str, np.ndarray], labels: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 images ``(n, 3, side, side)`` of the classes ``labels``."""
    n = len(labels)
    tint = proto["tint"][labels]
    tint /= np.linalg.norm(tint, axis=1, keepdims=True) + 1e-6
    coords = (np.arange(side, dtype=np.float32) + 0.5) / side  # 0..1 across the image
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    angle = proto["angle"][labels][:, None, None]
    # A small per-image jitter of the angle and frequency keeps the classes from being a lookup table.
    angle = angle + rng.normal(0, 0.08, (n, 1, 1)).astype(np.float32)
    freq = proto["freq"][labels][:, None, None] * rng.uniform(0.9, 1.1, (n, 1, 1)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1)).astype(np.float32)
    wave = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)  # (n, side, side)
    contrast = rng.uniform(35, 70, (n, 1, 1, 1)).astype(np.float32)
    # A per-image shift of the colour: the mean colour alone does not give the class away, the stripes help.
    colour = proto["mean"][labels] + rng.normal(0, 20, (n, 3)).astype(np.float32)
    images = colour[:, :, None, None] + contrast * tint[:, :, None, None] * wave[:, None]
    images += rng.normal(0, 22, images.shape).astype(np.float32)
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def balanced_labels(n: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` labels, every class ``n // classes`` or one more times, shuffled."""
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    return labels


def write_cifar100(root: str, n_train: int, n_test: int, seed: int) -> dict:
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    proto = prototypes(seed, CLASSES)
    written = {}
    for split, n, salt in (("train", n_train, 1), ("test", n_test, 2)):
        rng = np.random.default_rng([seed, salt])
        labels = balanced_labels(n, CLASSES, rng)
        data = np.empty((n, 3 * SIDE * SIDE), dtype=np.uint8)
        for start in range(0, n, CHUNK):
            part = labels[start : start + CHUNK]
            data[start : start + len(part)] = render(proto, part, SIDE, rng).reshape(len(part), -1)
        fine = [int(v) for v in labels]
        entry = {
            "filenames": [f"synthetic_{split}_{i:05d}_c{v:02d}.png" for i, v in enumerate(fine)],
            "batch_label": f"{'training' if split == 'train' else 'testing'} batch 1 of 1",
            "fine_labels": fine,
            "coarse_labels": [v // 5 for v in fine],  # 20 superclasses of five classes each
            "data": data,
        }
        path = os.path.join(folder, split)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            # Protocol 4: Python 3's protocol 2 stores bytes through _codecs.encode, which kcdlib's safe unpickler
            # refuses (the published files are Python 2 pickles, whose byte strings need no global).
            pickle.dump(entry, f, protocol=4)
        os.replace(tmp, path)  # a reader never sees half a file
        written[split] = n
    meta = {
        "fine_label_names": [f"class_{c:02d}" for c in range(CLASSES)],
        "coarse_label_names": [f"superclass_{c:02d}" for c in range(CLASSES // 5)],
    }
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump(meta, f, protocol=4)
    return written


def write_imagenet(root: str, classes: int, n_train: int, n_val: int, size: tuple[int, int], seed: int) -> dict:
    """``root/imagenet/{train,val}/nXXXXXXXX/*.JPEG``: ``classes`` folders of ``n_train`` / ``n_val`` images."""
    from PIL import Image

    width, height = size
    proto = prototypes(seed + 1, classes)
    written = {}
    for split, n, salt in (("train", n_train, 3), ("val", n_val, 4)):
        rng = np.random.default_rng([seed, salt])
        for c in range(classes):
            folder = os.path.join(root, "imagenet", split, f"n{c:08d}")
            os.makedirs(folder, exist_ok=True)
            square = render(proto, np.full(n, c), max(width, height), rng)
            for i, img in enumerate(square):
                pixels = img.transpose(1, 2, 0)[:height, :width]
                Image.fromarray(np.ascontiguousarray(pixels)).save(
                    os.path.join(folder, f"n{c:08d}_{i}.JPEG"), quality=90
                )
        written[split] = classes * n
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_root", help="folder to write cifar-100-python/ (and imagenet/) into")
    parser.add_argument("--train", type=int, default=5000, help="training images (default 5,000; at least 100)")
    parser.add_argument("--test", type=int, default=1000, help="test images (default 1,000; at least 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the class prototypes and the draws")
    parser.add_argument("--imagenet-classes", type=int, default=0, help="ImageFolder classes (default 0: none)")
    parser.add_argument("--imagenet-train", type=int, default=4, help="training images per class (default 4)")
    parser.add_argument("--imagenet-val", type=int, default=2, help="validation images per class (default 2)")
    parser.add_argument("--imagenet-size", default="320x256", help="WIDTHxHEIGHT of the JPEGs (default 320x256)")
    args = parser.parse_args(argv)
    if args.train < CLASSES or args.test < CLASSES:
        parser.error(f"--train and --test must be at least {CLASSES} (every class present in both splits)")
    try:
        size = tuple(int(v) for v in args.imagenet_size.lower().split("x"))
        assert len(size) == 2 and min(size) >= 1
    except (ValueError, AssertionError):
        parser.error(f"--imagenet-size must be WIDTHxHEIGHT, got {args.imagenet_size!r}")
    if args.imagenet_classes < 0 or (args.imagenet_classes and min(args.imagenet_train, args.imagenet_val) < 1):
        parser.error("--imagenet-classes must be >= 0, and --imagenet-train/--imagenet-val at least 1")
    start = time.perf_counter()
    summary = {"synthetic_cifar100": os.path.abspath(os.path.join(args.data_root, "cifar-100-python"))}
    summary.update(write_cifar100(args.data_root, args.train, args.test, args.seed), classes=CLASSES)
    if args.imagenet_classes:
        written = write_imagenet(
            args.data_root, args.imagenet_classes, args.imagenet_train, args.imagenet_val, size, args.seed
        )
        summary["synthetic_imagenet"] = os.path.abspath(os.path.join(args.data_root, "imagenet"))
        summary.update({f"imagenet_{k}": v for k, v in written.items()}, imagenet_classes=args.imagenet_classes)
        summary["imagenet_size"] = f"{size[0]}x{size[1]}"
    summary["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
