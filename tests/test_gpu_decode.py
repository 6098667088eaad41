"""ImageNet decoded on the device (decode="gpu"): the tensor pipeline, run here on the CPU with torchvision's CPU
JPEG decoder (the same crop, flip and normalisation code as on CUDA); nvjpeg itself only where CUDA is."""

import math
import warnings

import numpy as np
import pytest
import torch

from kcdlib import cli
from kcdlib.data import IMAGENET_MEAN, IMAGENET_STD, check_decode, load_dataset
from kcdlib.data import gpu_decode as gd
from kcdlib.errors import BadOption
from kcdlib.identity import distill_config, teacher_config
from kcdlib.runs import RunStore

# (width, height) of the generated training JPEGs: ImageNet-like landscape and portrait, small, very wide.
SIZES = [(500, 375), (375, 500), (300, 200), (240, 60)]


def smooth(rng, height, width, channels=3):
    """A JPEG-friendly picture: a coarse random field, upsampled (noise would not survive quality 90 alike)."""
    coarse = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, channels)).astype(np.float64)
    rows = np.linspace(0, coarse.shape[0] - 1, height)
    cols = np.linspace(0, coarse.shape[1] - 1, width)
    r0, c0 = rows.astype(int).clip(max=coarse.shape[0] - 2), cols.astype(int).clip(max=coarse.shape[1] - 2)
    fr, fc = (rows - r0)[:, None, None], (cols - c0)[None, :, None]
    img = (coarse[r0][:, c0] * (1 - fr) * (1 - fc) + coarse[r0 + 1][:, c0] * fr * (1 - fc)
           + coarse[r0][:, c0 + 1] * (1 - fr) * fc + coarse[r0 + 1][:, c0 + 1] * fr * fc)  # fmt: skip
    return img.round().astype(np.uint8).squeeze()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An ImageFolder: two classes of JPEGs of SIZES, plus a greyscale JPEG, a CMYK JPEG and a PNG in train/."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            (root / split / cls).mkdir(parents=True)
            for i, (w, h) in enumerate(SIZES):
                Image.fromarray(smooth(rng, h, w)).save(root / split / cls / f"{i}.JPEG", quality=90)
    Image.fromarray(smooth(rng, 150, 200, 1)).save(root / "train" / "n01" / "grey.JPEG", quality=90)
    Image.fromarray(smooth(rng, 150, 200, 4), "CMYK").save(root / "train" / "n02" / "cmyk.JPEG", quality=90)
    Image.fromarray(smooth(rng, 150, 200)).save(root / "train" / "n02" / "png.png")
    return root


@pytest.fixture(scope="module")
def data(folder):
    return load_dataset("imagenet", str(folder), "cpu", decode="gpu")


def test_training_batches_are_normalised_224_crops_of_every_point_once(data):
    assert data.num_train == 11 and data.num_classes == 2
    batches = list(data.train_batches(None, 4, seed=0, epoch=1))
    assert [b[0].shape for b in batches] == [(4, 3, 224, 224)] * 2 + [(3, 3, 224, 224)]
    x, y, idx = (torch.cat(t) for t in zip(*batches))
    assert x.dtype == torch.float32 and y.dtype == idx.dtype == torch.int64
    assert sorted(idx.tolist()) == list(range(11)) and torch.equal(y, data.train_labels[idx])
    # Normalised with ImageNet's mean and std: 0..255 maps into [-mean/std, (1 - mean)/std] per channel.
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = x * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5 and 0.2 < float(pixels.mean()) < 0.8
    # A subset: just those points.
    some = torch.cat([b[2] for b in data.train_batches(torch.tensor([1, 4, 9]), 2, 0, 1)])
    assert sorted(some.tolist()) == [1, 4, 9]


def test_a_uniform_image_normalises_to_its_value(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        (tmp_path / split / "n01").mkdir(parents=True)
        Image.new("RGB", (320, 240), (200, 100, 30)).save(tmp_path / split / "n01" / "0.JPEG", quality=90)
    d = load_dataset("imagenet", str(tmp_path), "cpu", decode="gpu")
    expected = (torch.tensor([200, 100, 30]) / 255.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    for x in (next(d.train_batches(None, 1, 0, 1))[0], next(d.test_batches(1))[0]):
        # JPEG's chroma quantisation moves a flat colour by a level or two.
        assert torch.allclose(x[0].mean(dim=(1, 2)), expected, atol=3 / 255 / min(IMAGENET_STD))
        assert float(x[0].std(dim=(1, 2)).max()) < 0.02


def test_an_epoch_is_a_function_of_seed_and_epoch_alone(data):
    def epoch(seed, e, batch_size=4):
        return [torch.cat(t) for t in zip(*data.train_batches(None, batch_size, seed, e))]

    first = epoch(0, 3)
    again = epoch(0, 3, batch_size=5)  # another batching (a resume, another process count): the same crops
    assert torch.equal(first[2], again[2]) and torch.equal(first[0], again[0])
    assert not torch.equal(epoch(0, 4)[0], first[0]) and not torch.equal(epoch(1, 3)[0], first[0])


def reference_get_params(height, width, u):
    """torchvision's RandomResizedCrop.get_params, line for line, with its random numbers taken from ``u``."""
    area = height * width
    log_ratio = (math.log(gd.RATIO[0]), math.log(gd.RATIO[1]))
    for t in range(gd.TRIES):
        target_area = area * (gd.SCALE[0] + float(u[2 * t]) * (gd.SCALE[1] - gd.SCALE[0]))
        aspect_ratio = math.exp(log_ratio[0] + float(u[2 * t + 1]) * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(float(u[2 * gd.TRIES]) * (height - h + 1))
            j = int(float(u[2 * gd.TRIES + 1]) * (width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(gd.RATIO):
        w = width
        h = int(round(w / min(gd.RATIO)))
    elif in_ratio > max(gd.RATIO):
        h = height
        w = int(round(h * max(gd.RATIO)))
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


def test_crop_parameters_follow_torchvision_rule():
    from torchvision.transforms import RandomResizedCrop

    g = torch.Generator().manual_seed(0)
    n = 2000
    heights = torch.randint(64, 800, (n,), generator=g)  # small enough to round, large enough to stay in bounds
    widths = torch.randint(64, 800, (n,), generator=g)
    widths[:50] = heights[:50] * 20  # far too wide for any try: the fallback
    draws = gd.crop_draws(n, g)
    boxes = gd.resized_crop_params(heights, widths, draws)
    expected = [reference_get_params(int(h), int(w), u) for h, w, u in zip(heights, widths, draws)]
    assert boxes.tolist() == [list(e) for e in expected]
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= heights).all() and (left + w <= widths).all()
    tried = ~(widths > heights * 4)  # sampled crops: area and ratio within the bounds, up to the rounding
    frac, ratio = (h * w / (heights * widths))[tried], (w / h)[tried]
    assert frac.min() > 0.07 and frac.max() <= 1 and ratio.min() > 0.7 and ratio.max() < 1.4
    # The fallback is deterministic: exactly torchvision's own on images no try fits.
    for h, w in ((10, 1000), (1000, 10)):
        theirs = RandomResizedCrop.get_params(torch.zeros(3, h, w), list(gd.SCALE), list(gd.RATIO))
        assert gd.resized_crop_params(torch.tensor([h]), torch.tensor([w]), draws[:1]).tolist() == [list(theirs)]


def test_test_split_matches_pil_resize_256_center_crop_224(data, folder):
    from torchvision import transforms

    pil = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    ours = torch.cat([x for x, _ in data.test_batches(3)]) * std + mean
    for k, (path, _) in enumerate(data.test_set.samples):
        from PIL import Image

        with Image.open(path) as im:
            theirs = pil(im.convert("RGB"))
        diff = (ours[k] - theirs).abs() * 255
        # Tolerance, in levels of 255: torch's antialiased bilinear resize and rounding vs PIL's (on these
        # pictures: mean 0.14 to 0.19, max 1).
        assert float(diff.mean()) < 0.5 and float(diff.max()) <= 2, (path, float(diff.mean()), float(diff.max()))


def test_files_nvjpeg_refuses_go_to_the_cpu_and_are_counted(data, monkeypatch):
    import torchvision.io

    decoder = data.decoder
    real = torchvision.io.decode_jpeg
    calls = []

    def picky(blob, *args, **kwargs):  # stands in for nvjpeg: the batch fails on the small image, then one by one
        calls.append(isinstance(blob, list))
        blobs = blob if isinstance(blob, list) else [blob]
        if any(int(b.numel()) < 9000 for b in blobs):
            raise RuntimeError("nvjpeg refuses it")
        return real(blob, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    monkeypatch.setattr(decoder, "nvjpeg", True)
    samples = data.train_set.samples
    blobs = [gd.read_bytes(p) for p, _ in samples]
    small = sum(int(b.numel()) < 9000 and gd.jpeg_components(b) in (1, 3) for b in blobs)
    assert small > 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(data.train_batches(None, 11, 0, 1))
    assert batches[0][0].shape == (11, 3, 224, 224) and calls[0] is True and calls.count(False) == 9
    # The PNG and the CMYK JPEG are not offered to nvjpeg at all; the small ones it refuses.
    (warning,) = [w for w in caught if issubclass(w.category, gd.CpuDecodeWarning)]
    assert str(warning.message).startswith(f"{2 + small} of 11 images were decoded on the CPU")


def test_post_decode_sees_each_point_before_the_crop(data):
    seen = []

    def mix(point, decode):
        image = decode(point)
        seen.append((point, image.dtype, image.shape[0]))
        return torch.zeros_like(image) if point == 3 else image

    order = torch.arange(data.num_train)
    draws = gd.crop_draws(data.num_train, torch.Generator().manual_seed(0))
    batches = data.decoder.train_batches(data.train_set.samples, data.train_labels, order, draws, 4, mix)
    x, _, idx = (torch.cat(t) for t in zip(*batches))
    assert sorted(p for p, _, _ in seen) == list(range(11)) and {(d, c) for _, d, c in seen} == {(torch.uint8, 3)}
    black = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)
    assert torch.allclose(x[idx.tolist().index(3)], black.expand(3, 224, 224), atol=1e-5)


def test_decode_is_part_of_the_run_identity():
    teacher = teacher_config("imagenet", "ResNet34")
    student = distill_config("imagenet", "ResNet18", teacher=teacher)
    # The hashes main's code gave these runs before decode existed: the default leaves every identity as it was.
    assert (teacher.options_hash, student.options_hash) == ("ef7042b35f910544", "e86c12e34596c4c0")
    kcd = distill_config("imagenet", "ResNet18", teacher=teacher, method="kcd")
    assert kcd.options_hash == "7d160ac475d78f64"
    gpu = distill_config("imagenet", "ResNet18", teacher=teacher, decode="gpu")
    assert gpu.options_hash != student.options_hash and gpu.canonical()["decode"] == "gpu"
    assert "decode" not in student.canonical()
    assert teacher_config("imagenet", "ResNet34", decode="gpu").options_hash != teacher.options_hash
    with pytest.raises(BadOption, match="digits is held in memory"):
        teacher_config("digits", "resnet8", decode="gpu")
    with pytest.raises(BadOption, match="unknown decode 'dali'"):
        teacher_config("imagenet", "ResNet34", decode="dali")


def test_gpu_decode_on_a_cpu_device_is_refused_before_anything_is_read(tmp_path):
    cfg = teacher_config("imagenet", "ResNet34", decode="gpu")
    with pytest.raises(BadOption, match="decode 'gpu' decodes JPEGs with nvjpeg on a CUDA device"):
        RunStore(tmp_path / "runs", str(tmp_path / "no-data"), "cpu").ensure(cfg)  # no DatasetMissing first
    assert not (tmp_path / "runs").exists()
    check_decode("imagenet", "gpu")  # without a device: only the dataset is checked


def test_cli_decode_gpu_on_cpu_is_one_line(capsys, tmp_path):
    argv = ["distill", "--dataset", "imagenet", "--teacher", "ResNet34", "--student", "ResNet18", "--decode", "gpu",
            "--device", "cpu", "--data-root", str(tmp_path), "--runs-dir", str(tmp_path / "runs")]  # fmt: skip
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kcd: error: decode 'gpu' decodes JPEGs with nvjpeg")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvjpeg decodes on a CUDA device; this machine has none")
def test_nvjpeg_batches_match_the_cpu_pipeline(folder):
    cpu = load_dataset("imagenet", str(folder), "cpu", decode="gpu")
    gpu = load_dataset("imagenet", str(folder), "cuda", decode="gpu")
    for (xc, yc, ic), (xg, yg, ig) in zip(cpu.train_batches(None, 6, 0, 1), gpu.train_batches(None, 6, 0, 1)):
        assert xg.device.type == "cuda" and torch.equal(ic, ig.cpu()) and torch.equal(yc, yg.cpu())
        # The same crops of nvjpeg's pixels instead of libjpeg-turbo's: IDCT and chroma upsampling differ.
        assert float((xg.cpu() - xc).abs().mean()) < 0.05
    xt = torch.cat([x.cpu() for x, _ in gpu.test_batches(4)])
    assert xt.shape == (8, 3, 224, 224) and xt.isfinite().all()


def test_decode_benchmark_reports_both_paths_side_by_side(capsys, tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "decode_throughput.py"
    spec = importlib.util.spec_from_file_location("decode_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        bench.main(["--device", "cpu", "--files", "6", "--classes", "2", "--decode-images", "40", "--batch-size", "8",
                    "--workers", "0", "--threads", "1", "--torch-threads", "1", "--dir", str(tmp_path)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    decode, train = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert decode["part"] == "decode" and decode["files"] == 6 and decode["device_path"].startswith("cpu_tensor")
    assert decode["pil_timed_images"] == 40 - 2 * 8 and decode["device_timed_images"] == 40 - 2 * 8
    assert decode["pil_images_per_second"] > 0 and decode["ratio_device_over_pil"] > 0
    assert train["part"] == "train_step" and "CUDA only" in train["skipped"]
