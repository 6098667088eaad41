"""Wiring: each test fails when one connection of the engine, KCD or UNIX is cut, even where every formula is right.

The formulas (schedules, the score, the ranking, mixing, the losses) have their own tests; these check that the
right tensors reach them: the student's entropies are what KCD records, the condensed set is the top of the value
ranking under the run's own options, training reads the mixed images after a condensation, UNIX distils the most
uncertain samples, and bf16 really runs the networks in bf16.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import short_kd
from torch.overrides import TorchFunctionMode

from kcdlib import condense, methods
from kcdlib.condense import softmax_entropy
from kcdlib.methods import UNIX, MethodContext


def kcd_trainer(store, teacher, epochs=4, **options):
    cfg = short_kd(teacher, epochs=epochs, method="kcd", method_options={"stage_epochs": 1, **options})
    return store.build_trainer(cfg, progress=False)


def subset(trainer, n=192):
    """Train on the first ``n`` points of the condensed set only: the wiring is the same, the epoch shorter."""
    real = trainer.method.epoch_points

    def first(epoch):
        points = real(epoch)
        return (torch.arange(trainer.data.num_train) if points is None else points)[:n]

    trainer.method.epoch_points = first


@pytest.mark.parametrize("value", ["entropy", "ce"])
def test_kcd_records_the_students_signal_of_the_training_forward(store, digits_teacher, value):
    """The paper's entropy of the student's softmax, or with value="ce" its cross-entropy with the labels."""
    trainer = kcd_trainer(store, digits_teacher, value=value)
    logits, observed = [], []
    trainer.student.register_forward_hook(lambda module, args, out: logits.append(out.detach().clone()))
    real = trainer.method.observe
    trainer.method.observe = lambda idx, sig: (observed.append((idx.clone(), sig.clone())), real(idx, sig))
    trainer.train_pass(1, torch.arange(128))
    assert len(observed) == len(logits) == 2
    for out, (idx, sig) in zip(logits, observed):
        labels = trainer.data.train_labels[idx]
        expected = softmax_entropy(out) if value == "entropy" else F.cross_entropy(out, labels, reduction="none")
        assert torch.allclose(sig, expected)
        other = F.cross_entropy(out, labels, reduction="none") if value == "entropy" else softmax_entropy(out)
        assert not torch.allclose(sig, other)


class Calls(TorchFunctionMode):
    """Counts the calls of one torch function made while the mode is on (the calls themselves run unchanged)."""

    def __init__(self, func):
        super().__init__()
        self.func, self.count = func, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func is self.func
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method, per_step", [("kd", 0), ("kcd", 1)])
def test_the_step_computes_a_signal_only_for_a_method_that_declares_one(store, digits_teacher, method, per_step):
    """KCD's entropy (softmax_entropy's torch.log_softmax; the KD loss goes through F.log_softmax) runs once per
    step; plain KD declares no signal and its steps compute none."""
    options = {"stage_epochs": 1} if method == "kcd" else {}
    trainer = store.build_trainer(short_kd(digits_teacher, method=method, method_options=options), progress=False)
    assert (trainer.method.signal is None) == (method == "kd")
    with Calls(torch.log_softmax) as calls:
        trainer.train_pass(1, torch.arange(128))  # two steps
    assert calls.count == 2 * per_step


def test_the_condensed_set_is_the_top_of_the_ranking_under_the_runs_alpha(store, digits_teacher):
    alpha = 2.0  # far from the default 0.03: a run that ignored its alpha would keep another set
    trainer = kcd_trainer(store, digits_teacher, cost_exponent=alpha, augment="none")
    for _ in range(2):  # two condensations: F then differs between points, so alpha matters
        trainer.train_epoch()
    method = trainer.method
    new = method.sizes[2]
    ranking = condense.untrained_first(method.values.ranking(alpha, 1), method.values.frequency)
    assert set(method.points.tolist()) == set(ranking[:new].tolist())
    default = condense.untrained_first(method.values.ranking(0.03, 1), method.values.frequency)
    assert set(default[:new].tolist()) != set(ranking[:new].tolist()), "alpha must change this set for the test"


def test_every_kcd_option_reaches_the_summary(store, digits_teacher, monkeypatch):
    calls = []
    real = condense.summarize
    monkeypatch.setattr(methods.condense, "summarize", lambda *a, **kw: (calls.append(kw), real(*a, **kw))[1])
    options = {"cost_exponent": 0.5, "augment": "K1H", "eps_m": 0.4, "untrained": "last", "value": "random"}
    trainer = kcd_trainer(store, digits_teacher, epochs=2, **options)
    subset(trainer, 64)
    trainer.train_epoch()
    (kw,) = calls
    assert kw["alpha"] == options["cost_exponent"]  # summarize's α
    assert {k: kw[k] for k in ("augment", "eps_m", "untrained")} == {k: options[k] for k in kw if k in options}
    assert kw["stage_epochs"] == 1
    assert kw["ranking"] is not None, "--value random must replace the value ranking"


def test_training_reads_the_mixed_images_after_a_condensation(store, digits_teacher, monkeypatch):
    trainer = kcd_trainer(store, digits_teacher, epochs=3)
    subset(trainer)
    original = trainer.data.train_images.clone()
    trainer.train_epoch()
    mixed = (trainer.images != original).flatten(1).any(1)
    assert int(mixed.sum()) > 0, "the condensation mixed no image"
    handed = []
    real = type(trainer.data).train_batches

    def spy(self, indices, batch_size, seed, epoch, images=None):
        handed.append(images)
        return real(self, indices, batch_size, seed, epoch, images=images)

    monkeypatch.setattr(type(trainer.data), "train_batches", spy)
    trainer.train_epoch()
    assert handed and handed[0] is trainer.images, "the epoch after a condensation must train on the mixed images"


class Peaked(torch.nn.Module):
    """A stand-in student whose logits make sample ``i``'s entropy grow with ``uncertainty[i]``."""

    def __init__(self, uncertainty):
        super().__init__()
        self.uncertainty = uncertainty

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 10)
        logits[:, 0] = 10.0 * (1 - self.uncertainty)
        return logits


def test_unix_distils_the_most_uncertain_samples_of_the_batch():
    torch.manual_seed(0)
    n, k = 64, 8
    uncertainty = torch.rand(n)
    method = UNIX(MethodContext(1000, 1, 0, options={"k": k}, batch_size=n))
    x, y, idx = torch.rand(n, 3, 4, 4), torch.randint(0, 10, (n,)), torch.arange(100, 100 + n)
    _, y_k, idx_k = method.select((x, y, idx), Peaked(uncertainty))
    most = torch.argsort(uncertainty, descending=True)[:k]
    assert idx_k.tolist() == (100 + most).tolist()
    assert torch.equal(y_k, y[most])


def test_bf16_runs_the_networks_in_bf16(store, digits_teacher):
    trainer = store.build_trainer(short_kd(digits_teacher, epochs=1, precision="bf16"), progress=False)
    dtypes = set()
    for model in (trainer.student, trainer.teacher):
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    trainer.train_pass(1, torch.arange(64))
    assert dtypes == {torch.bfloat16}
