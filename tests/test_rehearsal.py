"""The paper rehearsal's pieces (benchmarks/paper_rehearsal.sh runs on a GPU machine, not here): the synthetic
CIFAR-100 it writes loads like the real one, and the script parses."""

import importlib.util
import json
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from kcdlib.data import ImageNetData, load_cifar100

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def synthetic():
    """benchmarks/make_synthetic_cifar100.py as a module (in-process: no interpreter start per call)."""
    spec = importlib.util.spec_from_file_location("make_synthetic_cifar100", BENCHMARKS / "make_synthetic_cifar100.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_cifar100_loads_with_every_class(tmp_path, synthetic, capsys):
    args = ["--train", "300", "--test", "200", "--imagenet-classes", "2", "--imagenet-train", "2",
            "--imagenet-val", "1", "--imagenet-size", "64x48"]  # fmt: skip
    assert synthetic.main([str(tmp_path), *args]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["train"], summary["test"], summary["classes"]) == (300, 200, 100)
    assert (summary["imagenet_train"], summary["imagenet_val"]) == (4, 2)

    data = load_cifar100(str(tmp_path), "cpu")
    assert data.train_images.shape == (300, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (200, 3, 32, 32)
    assert data.num_classes == 100
    for labels in (data.train_labels, data.test_labels):
        assert labels.dtype == torch.int64
        assert torch.equal(torch.unique(labels), torch.arange(100))  # every class present

    # The fields of the real files, beside the two the reader needs.
    entry = pickle.loads((tmp_path / "cifar-100-python" / "train").read_bytes())
    assert set(entry) == {"data", "fine_labels", "coarse_labels", "filenames", "batch_label"}
    assert entry["coarse_labels"] == [v // 5 for v in entry["fine_labels"]]
    assert len(entry["filenames"]) == 300 and entry["batch_label"] == "training batch 1 of 1"
    assert (tmp_path / "cifar-100-python" / "meta").is_file()

    # Class-dependent images: the mean colour of an image alone finds its class far above chance (1 %).
    colour = lambda x: x.float().mean((2, 3))  # noqa: E731
    centroids = torch.stack([colour(data.train_images)[data.train_labels == c].mean(0) for c in range(100)])
    nearest = torch.cdist(colour(data.test_images), centroids).argmin(1)
    assert (nearest == data.test_labels).float().mean() > 0.1

    # The ImageNet-shaped folder for Table 3.
    imagenet = ImageNetData(str(tmp_path), "cpu", workers=0)
    assert (imagenet.num_classes, imagenet.num_train, len(imagenet.test_set)) == (2, 4, 2)


def test_synthetic_cifar100_is_reproducible_and_checks_its_sizes(tmp_path, synthetic, capsys):
    for root in ("a", "b"):
        assert synthetic.main([str(tmp_path / root), "--train", "100", "--test", "100", "--seed", "3"]) == 0
    for split in ("train", "test"):
        a = (tmp_path / "a" / "cifar-100-python" / split).read_bytes()
        assert a == (tmp_path / "b" / "cifar-100-python" / split).read_bytes()  # a rerun keeps the run stores valid
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main([str(tmp_path / "c"), "--train", "50"])
    assert exit_info.value.code == 2 and "at least 100" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_paper_rehearsal_script_parses():
    proc = subprocess.run(["bash", "-n", str(BENCHMARKS / "paper_rehearsal.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
