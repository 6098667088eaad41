"""The benchmarks: bench_epoch runs and reports, and the reference-style baseline computes the same experiment."""

import copy
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from kcdlib import models
from kcdlib.condense import softmax_entropy
from kcdlib.data import crop_flip, load_digits
from kcdlib.distillers import DistillContext, build
from kcdlib.train import Recipe, Trainer

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

COMPARE_KEYS = {
    "reference_images_per_second", "engine_images_per_second", "ratio_engine_over_reference",
    "reference_gmacs_per_second", "engine_gmacs_per_second", "peak_fp32_gmacs_per_second",
    "reference_fraction_of_peak", "engine_fraction_of_peak", "macs_per_image", "student_forward_macs",
    "teacher_forward_macs", "precision", "steps", "batch_size", "workers",
}  # fmt: skip


def load(name):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def digits():
    return load_digits("cpu")


@pytest.fixture
def one_thread():
    """Run the benchmark with one intra-op thread (a shared 2-core machine), and restore the count after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_epoch_prints_one_json_line(capsys, one_thread):
    bench = load("bench_epoch")
    bench.main(["--dataset", "digits", "--device", "cpu", "--steps", "3", "--warmup", "1", "--workers", "0",
                "--peak-size", "256", "--threads", "1"])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    row = json.loads(lines[0])
    assert COMPARE_KEYS <= row.keys(), COMPARE_KEYS - row.keys()
    assert row["reference_images"] == row["engine_images"] == 3 * 64
    for key in ("reference_images_per_second", "engine_images_per_second", "ratio_engine_over_reference",
                "reference_gmacs_per_second", "engine_gmacs_per_second", "peak_fp32_gmacs_per_second",
                "reference_fraction_of_peak", "engine_fraction_of_peak"):  # fmt: skip
        assert row[key] > 0, (key, row[key])
    assert row["macs_per_image"] == 3 * row["student_forward_macs"] + row["teacher_forward_macs"]
    assert row["precision"] in ("fp32", "bf16")


def test_reference_step_is_the_kd_experiment(digits):
    """Same networks, same batch: the baseline's loss is kcdlib's KD loss, its SGD step the engine's optimiser
    step, and its per-sample record the engine's entropy."""
    ref_mod = load("reference_pipeline")
    loader = ref_mod.make_loader(digits.train_images, digits.train_labels, 64, 0, "cpu", digits.pad, digits.mean,
                                 digits.std, seed=0)  # fmt: skip
    x, y, idx = next(iter(loader))

    torch.manual_seed(0)
    teacher = models.create("resnet20", 10).eval()
    student = models.create("resnet8", 10)
    s_ref, s_eng = copy.deepcopy(student), copy.deepcopy(student)
    ref = ref_mod.ReferenceKD(s_ref, teacher, digits.num_train, "cpu")
    context = DistillContext(digits.num_train, 10, models.penultimate_dim(student), 0)
    trainer = Trainer(s_eng, digits, Recipe(1), build("kd", context), teacher, progress=False)

    s_eng.train()
    with torch.no_grad():
        t_logits = teacher(x)
    s_logits = s_eng(x)
    expected = sum(trainer.distiller(None, s_logits, None, t_logits, y, idx).values())
    got = ref.step(x, y, idx)
    assert got == pytest.approx(expected.item(), rel=1e-6)

    trainer.optimizer.zero_grad(set_to_none=True)
    expected.backward()
    trainer.optimizer.step()
    for (name, a), b in zip(s_ref.state_dict().items(), s_eng.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    entropy = softmax_entropy(s_logits.detach())
    assert torch.allclose(torch.from_numpy(ref.entropy[idx.numpy()]), entropy, atol=1e-6)


def test_reference_augmentation_is_the_engines(digits):
    """A reference sample is one of the engine's crop/flip outcomes of the same image, normalised the same way."""
    ref_mod = load("reference_pipeline")
    transform = ref_mod.train_transform(digits.image_size, digits.pad, digits.mean, digits.std)
    image = digits.train_images[5]
    torch.manual_seed(1)
    sample = transform(Image.fromarray(image.permute(1, 2, 0).numpy()))
    offsets = torch.arange(2 * digits.pad + 1)
    dy, dx, flip = torch.meshgrid(offsets, offsets, torch.tensor([0, 1]), indexing="ij")
    n = dy.numel()
    candidates = digits.normalize(crop_flip(image.expand(n, -1, -1, -1), dy.flatten(), dx.flatten(),
                                            flip.flatten().bool(), digits.pad))  # fmt: skip
    assert (candidates - sample).abs().flatten(1).amax(1).min() < 1e-5


def test_graph_check_reports_the_fallback_on_a_cpu(capsys, one_thread):
    torch.set_num_threads(1)
    with pytest.warns(UserWarning, match="needs a CUDA device"):
        load("graph_check").main(["--device", "cpu", "--teacher", "resnet8", "--student", "resnet8", "--steps", "1"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Without CUDA the "graph" run is the eager step: equal to the eager runs, but not ok (nothing was recorded).
    assert row["max_abs_diff_graph"] == row["max_abs_diff_eager_again"] == 0.0
    assert row["eager_fallback"] and row["graph_recordings"] == 0 and not row["ok"]
    assert len(row["loss_graph"]) == 2 and row["loss_graph"] == row["loss_eager"]


def test_gpu_figures_are_written_from_gpu_checks_results_as_the_estimate_reads_them(tmp_path, capsys):
    """benchmarks/gpu_figures.py on the H200 log's epoch and concurrency lines (the concurrency line as the
    current gpu_check.sh prints it, with torch and compile) writes the figures kcdlib ships."""
    from kcdlib import estimate

    log = (BENCHMARKS / "results" / "gpu_check_h200_2026-11-28.log").read_text().splitlines()
    after = {log[i - 1]: line for i, line in enumerate(log) if i and line.startswith("{")}
    epoch = json.loads(next(v for k, v in after.items() if k.startswith("## epoch_fp32 ")))
    conc = json.loads(next(v for k, v in after.items() if k.startswith("## concurrency ")))
    conc |= {"torch": epoch["torch"], "compile": "off"}
    for name, row in (("epoch", epoch), ("concurrency", conc)):
        (tmp_path / f"{name}.json").write_text(json.dumps(row))
    out = tmp_path / "gpu_figures.json"
    argv = [
        "--epoch",
        str(tmp_path / "epoch.json"),
        "--epoch-command",
        "python3 benchmarks/bench_epoch.py ...",
        "--concurrency",
        str(tmp_path / "concurrency.json"),
        "--concurrency-command",
        "bash gpu_check.sh",
        "--source",
        "benchmarks/results/gpu_check_h200_2026-11-28.log",
        "--date",
        "2026-11-28",
        "--out",
        str(out),
    ]
    assert load("gpu_figures").main(argv) == 0
    assert json.loads(capsys.readouterr().out)["ok"]
    written, shipped = estimate.figures(out), estimate.figures()
    assert written == shipped
    # A result measured at another setting is refused, and nothing is written.
    (tmp_path / "epoch.json").write_text(json.dumps(epoch | {"precision": "bf16"}))
    out.unlink()
    assert load("gpu_figures").main(argv) == 1
    assert "the estimate is of the book's defaults" in json.loads(capsys.readouterr().out)["error"]
    assert not out.exists()
