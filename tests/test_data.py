import hashlib
import io
import json
import os
import pickle
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import kcdlib.data.fingerprints as fingerprints_module
import kcdlib.files
from kcdlib.data import crop_flip, fingerprint, load_cifar100, load_dataset, load_digits, read_cifar100_split
from kcdlib.errors import DatasetInvalid, DatasetMissing, KcdError, UnknownName


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


class Py2Pickler(pickle._Pickler):
    """Protocol 2 with bytes written as Python 2 ``str``, as the published CIFAR-100 files were written."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        n = len(obj)
        self.write(
            pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256 else pickle.BINSTRING + struct.pack("<i", n) + obj
        )
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def published_pickle(obj):
    """``obj`` pickled like the files of cifar-100-python.tar.gz (Python 2, numpy 1 module names)."""
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def write_fake_cifar100(root, n_train=20, n_test=10):
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 100, n).tolist()
        entry = {
            b"data": data,
            b"fine_labels": labels,
            b"coarse_labels": labels,
            b"batch_label": b"fake " + split.encode(),
        }
        with open(os.path.join(folder, split), "wb") as f:
            f.write(published_pickle(entry))
    return data, labels


def test_cifar100_reads_the_python_format(tmp_path):
    data, labels = write_fake_cifar100(str(tmp_path))
    assert b"numpy.core.multiarray\n_reconstruct" in (tmp_path / "cifar-100-python" / "train").read_bytes()
    ds = load_cifar100(str(tmp_path))
    assert ds.train_images.shape == (20, 3, 32, 32) and ds.test_images.shape == (10, 3, 32, 32)
    # CHW order: the first 1024 bytes of a row are the red plane.
    assert torch.equal(ds.test_images[3, 0].flatten(), torch.from_numpy(data[3, :1024]))
    assert ds.test_labels.tolist() == labels


def test_cifar100_written_by_python3_with_bytes_keys_loads(tmp_path):
    path = tmp_path / "train"
    data = np.arange(2 * 3072).astype(np.uint8).reshape(2, 3072)
    path.write_bytes(pickle.dumps({b"data": data, b"fine_labels": np.array([7, 99])}, protocol=4))
    images, labels = read_cifar100_split(str(path))
    assert torch.equal(images.flatten(), torch.from_numpy(data).flatten()) and labels.tolist() == [7, 99]
    assert labels.dtype == torch.int64


class Payload:
    """Pickles as a call of ``func(*args)``: what a planted file does to run code on loading."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("how", ["os.system", "builtins.exec", "nested exec"])
def test_a_planted_cifar100_file_runs_nothing(tmp_path, how):
    marker = tmp_path / "ran"
    payload = {
        "os.system": Payload(os.system, f"touch {marker}"),
        "builtins.exec": Payload(exec, f"open({str(marker)!r}, 'w').close()"),
        "nested exec": {
            "data": np.zeros((1, 3072), np.uint8),
            "fine_labels": [Payload(exec, f"open({str(marker)!r}, 'w').close()")],
        },
    }[how]
    planted = pickle.dumps(payload, protocol=4)
    pickle.loads(planted)  # the payload is live: a plain pickle.load runs it
    assert marker.exists()
    marker.unlink()
    write_fake_cifar100(str(tmp_path))
    (tmp_path / "cifar-100-python" / "train").write_bytes(planted)
    with pytest.raises(DatasetInvalid, match=r"asks to load (posix\.system|builtins\.exec).*refused, nothing was run"):
        load_cifar100(str(tmp_path))
    with pytest.raises(DatasetInvalid, match="is not a CIFAR-100 file"):
        fingerprint("cifar100", str(tmp_path))
    assert not marker.exists()


def test_missing_cifar100_says_where_to_put_it(tmp_path):
    with pytest.raises(DatasetMissing, match="cifar-100-python") as caught:
        load_cifar100(str(tmp_path))
    message = str(caught.value)
    assert "cifar-100-python.tar.gz" in message and "https://www.cs.toronto.edu/~kriz/cifar.html" in message
    assert str(tmp_path) in message and "--download" not in message
    with pytest.raises(DatasetMissing) as again:
        fingerprint("cifar100", str(tmp_path))
    assert str(again.value) == message


GOOD = np.zeros((4, 3072), np.uint8)
BAD_CIFAR100 = {
    "empty file": (b"", "it is empty"),
    "truncated": (published_pickle({"data": GOOD, "fine_labels": [1, 2, 3, 4]})[:5000], "ends early"),
    "not a pickle": (b"not a pickle", "it is not a pickle"),
    "a list": ([GOOD, [1, 2, 3, 4]], "holds a list, expected a dict with 'data' and 'fine_labels'"),
    "no data": ({"fine_labels": [1, 2, 3, 4]}, "has no 'data' entry"),
    "no labels": ({"data": GOOD, "labels": [1, 2, 3, 4]}, "has no 'fine_labels' entry"),
    "data a list": ({"data": [[0] * 3072] * 4, "fine_labels": [1, 2, 3, 4]}, "data is a list"),
    "wrong width": (
        {"data": np.zeros((4, 100), np.uint8), "fine_labels": [1, 2, 3, 4]},
        "data of shape (4, 100) uint8, expected (N, 3072) uint8",
    ),
    "image shaped": (
        {"data": np.zeros((4, 3, 32, 32), np.uint8), "fine_labels": [1, 2, 3, 4]},
        "data of shape (4, 3, 32, 32) uint8",
    ),
    "float data": (
        {"data": np.zeros((4, 3072), np.float32), "fine_labels": [1, 2, 3, 4]},
        "data of shape (4, 3072) float32",
    ),
    "object data": (
        {"data": np.zeros((4, 3072), object), "fine_labels": [1, 2, 3, 4]},
        "data of shape (4, 3072) object",
    ),
    "no images": ({"data": np.zeros((0, 3072), np.uint8), "fine_labels": []}, "holds no images"),
    "labels a dict": ({"data": GOOD, "fine_labels": {0: 1}}, "fine_labels is a dict"),
    "too few labels": ({"data": GOOD, "fine_labels": [1, 2, 3]}, "has 3 labels for 4 images"),
    "label 100": ({"data": GOOD, "fine_labels": [1, 2, 3, 100]}, "label 100 outside 0..99"),
    "negative label": ({"data": GOOD, "fine_labels": [-1, 2, 3, 4]}, "label -1 outside 0..99"),
    "str label": ({"data": GOOD, "fine_labels": [1, "2", 3, 4]}, "label '2' (image 1) is a str, not an int"),
    "bool label": ({"data": GOOD, "fine_labels": [True, 2, 3, 4]}, "is a bool, not an int"),
    "float labels": ({"data": GOOD, "fine_labels": np.ones(4)}, "fine_labels of shape (4,) float64"),
    "object labels": ({"data": GOOD, "fine_labels": np.ones(4, object)}, "fine_labels of shape (4,) object"),
}


@pytest.mark.parametrize("case", list(BAD_CIFAR100))
def test_a_bad_cifar100_file_is_one_clear_line(tmp_path, case):
    content, problem = BAD_CIFAR100[case]
    write_fake_cifar100(str(tmp_path))
    train = tmp_path / "cifar-100-python" / "train"
    train.write_bytes(content if isinstance(content, bytes) else published_pickle(content))
    with pytest.raises(DatasetInvalid) as caught:
        load_cifar100(str(tmp_path))
    message = str(caught.value)
    assert message.startswith(f"{train} is not a CIFAR-100 file: ") and problem in message
    assert "\n" not in message and isinstance(caught.value, KcdError)


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


def age(*paths, seconds=3600):
    """Backdate files: the fingerprint cache trusts sizes and mtimes only of files that have settled."""
    then = time.time_ns() - seconds * 1_000_000_000
    for path in paths:
        os.utime(path, ns=(then, then))


def fake_cifar100_for_fingerprints(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = tmp_path / "data"
    write_fake_cifar100(str(root))
    folder = root / "cifar-100-python"
    age(folder / "train", folder / "test")
    return str(root), folder


def test_digits_fingerprint_is_stable():
    fp = fingerprint("digits")
    assert fp == fingerprint("digits") and fp["name"] == "digits"
    assert fp["num_train"] == 1437 and fp["num_test"] == 360
    assert len(fp["train_sha256"]) == 64 and int(fp["train_sha256"], 16) >= 0
    fp["num_train"] = 0  # the caller's copy, not the process-wide one
    assert fingerprint("digits")["num_train"] == 1437


def test_fingerprint_of_unknown_or_missing_data(tmp_path):
    with pytest.raises(UnknownName, match="known datasets: cifar100, digits, imagenet"):
        fingerprint("mnist", str(tmp_path))
    with pytest.raises(DatasetMissing, match="imagenet"):
        fingerprint("imagenet", str(tmp_path))


def test_cifar100_fingerprint_follows_one_training_pixel(tmp_path, monkeypatch):
    root, folder = fake_cifar100_for_fingerprints(tmp_path, monkeypatch)
    before = fingerprint("cifar100", root)
    assert before == {
        "name": "cifar100",
        "num_train": 20,
        "num_test": 10,
        "train_sha256": hashlib.sha256((folder / "train").read_bytes()).hexdigest(),
        "test_sha256": hashlib.sha256((folder / "test").read_bytes()).hexdigest(),
    }
    entry = pickle.loads((folder / "train").read_bytes(), encoding="latin1")
    entry["data"] = entry["data"].copy()
    entry["data"][5, 700] ^= 1
    (folder / "train").write_bytes(published_pickle(entry))
    after = fingerprint("cifar100", root)
    assert after["train_sha256"] != before["train_sha256"]
    assert after == {**before, "train_sha256": hashlib.sha256((folder / "train").read_bytes()).hexdigest()}


def test_cifar100_test_label_edited_with_its_mtime_put_back_is_other_data(tmp_path, monkeypatch):
    """Every test label changed and the file's times restored (as the probes did): another fingerprint, and no
    cache file is read or written (CIFAR-100 is hashed by content every time)."""
    root, folder = fake_cifar100_for_fingerprints(tmp_path, monkeypatch)
    before = fingerprint("cifar100", root)
    st = os.stat(folder / "test")
    entry = pickle.loads((folder / "test").read_bytes(), encoding="latin1")
    entry["fine_labels"] = [(label + 1) % 100 for label in entry["fine_labels"]]
    (folder / "test").write_bytes(published_pickle(entry))
    os.utime(folder / "test", ns=(st.st_atime_ns, st.st_mtime_ns))
    after = fingerprint("cifar100", root)
    assert after["test_sha256"] != before["test_sha256"]
    assert after == {**before, "test_sha256": hashlib.sha256((folder / "test").read_bytes()).hexdigest()}
    assert list(tmp_path.rglob("*.json")) == [] and not list(folder.glob(".*"))


def write_image_folder(base, rng, classes=("n01", "n02"), per_class=3):
    from PIL import Image

    for split in ("train", "val"):
        for cls in classes:
            (base / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(base / split / cls / f"{i}.JPEG", quality=90)


def test_imagenet_in_the_readme_layout(tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    write_image_folder(tmp_path / "imagenet", np.random.default_rng(0))
    data = load_dataset("imagenet", str(tmp_path))
    data.workers = 0
    assert data.num_train == 6 and data.num_classes == 2
    x, y, idx = next(iter(data.train_batches(None, 4, 0, 1)))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and idx.dtype == torch.int64
    assert torch.equal(y, data.train_labels[idx]) and len(set(idx.tolist())) == 4

    fp = fingerprint("imagenet", str(tmp_path))
    assert fp["name"] == "imagenet" and fp["num_train"] == 6 and fp["num_test"] == 6
    assert "fingerprinting imagenet train" in capsys.readouterr().err
    assert fingerprint("imagenet", str(tmp_path)) == fp
    # One training image changed: another fingerprint; one validation image too.
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "imagenet" / "train" / "n02" / "1.JPEG")
    changed = fingerprint("imagenet", str(tmp_path))
    assert changed["train_sha256"] != fp["train_sha256"] and changed["test_sha256"] == fp["test_sha256"]
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "imagenet" / "val" / "n02" / "1.JPEG")
    changed = {**changed, "test_sha256": fingerprint("imagenet", str(tmp_path))["test_sha256"]}
    assert changed["test_sha256"] != fp["test_sha256"]


def test_imagenet_fingerprint_cache_is_the_users_own_and_keyed_by_ctime(tmp_path, monkeypatch):
    """Settled files: cached in the user's cache folder (never beside the data) and read from there; a file
    rewritten with its mtime put back changes its ctime, so the cache no longer answers; a cache file planted
    beside the data is never read."""
    from PIL import Image

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    write_image_folder(tmp_path / "imagenet", np.random.default_rng(0))
    images = sorted((tmp_path / "imagenet").rglob("*.JPEG"))
    age(*images)
    time.sleep(2.1)  # ctimes cannot be backdated: let them settle (fingerprints.SETTLED_NS)
    fp = fingerprint("imagenet", str(tmp_path))
    cache = fingerprints_module.cache_for(str(tmp_path / "imagenet"))
    assert json.loads(Path(cache).read_text())["fingerprint"] == fp and cache.startswith(str(tmp_path / "xdg"))
    assert sorted(p.name for p in (tmp_path / "imagenet").iterdir()) == ["train", "val"]
    hashed = []
    sha256_file = kcdlib.files.sha256_file
    monkeypatch.setattr(kcdlib.files, "sha256_file", lambda path: hashed.append(path) or sha256_file(path))
    assert fingerprint("imagenet", str(tmp_path)) == fp and hashed == []
    # A planted cache beside the data, holding another hash: not read.
    planted = {"key": json.loads(Path(cache).read_text())["key"], "fingerprint": {**fp, "test_sha256": "0" * 64}}
    (tmp_path / "imagenet" / ".kcd-fingerprint.json").write_text(json.dumps(planted))
    assert fingerprint("imagenet", str(tmp_path)) == fp
    # One validation label's image rewritten and its mtime restored: its ctime moved, the data is hashed again.
    target = tmp_path / "imagenet" / "val" / "n01" / "0.JPEG"
    st = os.stat(target)
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = fingerprint("imagenet", str(tmp_path))
    assert hashed and after["test_sha256"] != fp["test_sha256"]


@pytest.mark.parametrize(
    "damage", ["not json {", "[]", "no key", "missing field", "other name", "str count", "short sha"]
)
def test_a_damaged_fingerprint_cache_is_ignored(damage):
    fp = {"name": "imagenet", "num_train": 6, "num_test": 6, "train_sha256": "a" * 64, "test_sha256": "b" * 64}
    key = {"stat_sha256": "c" * 64, "files": 12}
    forged = {k: v for k, v in fp.items() if k != "num_test"}
    content = {
        "not json {": "not json {",
        "[]": "[]",
        "no key": json.dumps({"fingerprint": fp}),
        "missing field": json.dumps({"key": key, "fingerprint": forged}),
        "other name": json.dumps({"key": key, "fingerprint": {**fp, "name": "cifar100"}}),
        "str count": json.dumps({"key": key, "fingerprint": {**fp, "num_train": "6"}}),
        "short sha": json.dumps({"key": key, "fingerprint": {**fp, "train_sha256": "abc"}}),
    }[damage]
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "cache.json")
        Path(path).write_text(content)
        assert fingerprints_module.read_cache(path, "imagenet", key) is None
        Path(path).write_text(json.dumps({"key": key, "fingerprint": fp}))
        assert fingerprints_module.read_cache(path, "imagenet", key) == fp


def test_cifar100_written_by_python3_in_protocol_2_loads(tmp_path):
    """Python 3 pickles bytes in protocol 2 through _codecs.encode: admitted, it runs no code of the file's."""
    entry = {b"data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072), b"fine_labels": [1, 99],
             b"filenames": [b"a.png", b"b.png"]}  # fmt: skip
    path = tmp_path / "train"
    path.write_bytes(pickle.dumps(entry, protocol=2))
    images, labels = read_cifar100_split(str(path))
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [1, 99]
