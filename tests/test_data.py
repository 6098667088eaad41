import os
import pickle

import numpy as np
import pytest
import torch

from kcdlib.data import crop_flip, load_cifar100, load_dataset, load_digits
from kcdlib.errors import DatasetMissing, UnknownName


def naive_crop_flip(images, dy, dx, flip, pad):
    """Per-sample reference: pad with zeros, slice, mirror (what torchvision does to one PIL image)."""
    out = []
    for img, y, x, f in zip(images, dy.tolist(), dx.tolist(), flip.tolist()):
        padded = torch.nn.functional.pad(img, (pad, pad, pad, pad))
        crop = padded[:, y : y + img.shape[1], x : x + img.shape[2]]
        out.append(crop.flip(2) if f else crop)
    return torch.stack(out)


def test_crop_flip_exact_pixels_on_a_tiny_image():
    img = torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4)
    # Offset (0, 0) with pad 1 shifts the image down-right by one, filling with zeros.
    out = crop_flip(img, torch.tensor([0]), torch.tensor([0]), torch.tensor([False]), pad=1)
    assert out[0, 0].tolist() == [[0, 0, 0, 0], [0, 1, 2, 3], [0, 5, 6, 7], [0, 9, 10, 11]]
    # Offset (2, 1) moves it up by one; then the flip mirrors each row.
    out = crop_flip(img, torch.tensor([2]), torch.tensor([1]), torch.tensor([True]), pad=1)
    assert out[0, 0].tolist() == [[8, 7, 6, 5], [12, 11, 10, 9], [16, 15, 14, 13], [0, 0, 0, 0]]


def test_crop_flip_matches_per_sample_reference_for_a_fixed_seed():
    g = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (32, 3, 12, 12), generator=g, dtype=torch.uint8)
    dy = torch.randint(0, 9, (32,), generator=g)
    dx = torch.randint(0, 9, (32,), generator=g)
    flip = torch.rand(32, generator=g) < 0.5
    assert torch.equal(crop_flip(images, dy, dx, flip, 4), naive_crop_flip(images, dy, dx, flip, 4))


def test_digits_is_a_fixed_stratified_uint8_split():
    data = load_digits()
    assert data.train_images.dtype == torch.uint8 and data.train_images.shape == (1437, 3, 16, 16)
    assert data.test_images.shape == (360, 3, 16, 16)
    assert data.num_classes == 10
    counts = torch.bincount(data.test_labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: 36 ± 1 per class
    assert torch.equal(load_digits().train_labels, data.train_labels)


def test_train_batches_cover_the_subset_once_in_a_seeded_order():
    data = load_digits()
    subset = torch.arange(0, 1437, 3)
    batches = list(data.train_batches(subset, 64, seed=1, epoch=1))
    seen = torch.cat([idx for _, _, idx in batches])
    assert sorted(seen.tolist()) == subset.tolist()
    x, y, idx = batches[0]
    assert x.dtype == torch.float32 and x.shape == (64, 3, 16, 16)
    assert torch.equal(y, data.train_labels[idx])
    again = torch.cat([idx for _, _, idx in data.train_batches(subset, 64, seed=1, epoch=1)])
    other = torch.cat([idx for _, _, idx in data.train_batches(subset, 64, seed=1, epoch=2)])
    assert torch.equal(seen, again) and not torch.equal(seen, other)
    assert torch.equal(next(iter(data.train_batches(subset, 64, seed=1, epoch=1)))[0], x)


def test_normalisation_uses_the_papers_mean_and_std():
    data = load_digits()
    white = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = data.normalize(white)[0, :, 0, 0]
    expected = (1 - torch.tensor([0.5071, 0.4867, 0.4408])) / torch.tensor([0.2675, 0.2565, 0.2761])
    assert torch.allclose(out, expected)


def write_fake_cifar100(root, n_train=20, n_test=10):
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 100, n).tolist()
        with open(os.path.join(folder, split), "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": labels}, f)
    return data, labels


def test_cifar100_reads_the_python_format(tmp_path):
    data, labels = write_fake_cifar100(str(tmp_path))
    ds = load_cifar100(str(tmp_path))
    assert ds.train_images.shape == (20, 3, 32, 32) and ds.test_images.shape == (10, 3, 32, 32)
    # CHW order: the first 1024 bytes of a row are the red plane.
    assert torch.equal(ds.test_images[3, 0].flatten(), torch.from_numpy(data[3, :1024]))
    assert ds.test_labels.tolist() == labels


def test_missing_cifar100_says_where_to_put_it(tmp_path):
    with pytest.raises(DatasetMissing, match="cifar-100-python"):
        load_cifar100(str(tmp_path))


def test_corrupt_cifar100_is_a_clear_error(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(b"not a pickle")
    (folder / "test").write_bytes(b"not a pickle")
    with pytest.raises(DatasetMissing, match="could not be read"):
        load_cifar100(str(tmp_path))


def test_unknown_dataset_and_missing_imagenet(tmp_path):
    with pytest.raises(UnknownName, match="digits"):
        load_dataset("mnist")
    with pytest.raises(DatasetMissing, match="train"):
        load_dataset("imagenet", str(tmp_path))


def test_imagenet_folder_yields_indexed_batches(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    data = load_dataset("imagenet", str(tmp_path))
    data.workers = 0
    assert data.num_train == 6 and data.num_classes == 2
    batches = list(data.train_batches(torch.tensor([0, 2, 5]), 2, seed=0, epoch=1))
    x, y, idx = batches[0]
    assert x.shape == (2, 3, 224, 224)
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == [0, 2, 5]
    assert torch.equal(torch.cat([b[1] for b in batches]), data.train_labels[torch.cat([b[2] for b in batches])])
    xt, yt = next(iter(data.test_batches(4)))
    assert xt.shape == (4, 3, 224, 224)
