"""Distillers' losses against small independent computations, and CRD's memory bookkeeping."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from kcdlib.distillers import CRD, DISTILLERS, DistillContext, build, kd_loss, pkt_loss
from kcdlib.errors import UnknownName


def softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def test_unknown_distiller_name():
    with pytest.raises(UnknownName, match="nope"):
        build("nope", DistillContext(10, 2, 4, 4))


def test_registered_with_flags():
    assert {"ce", "kd", "unix_kd", "pkt", "crd"} <= set(DISTILLERS)
    for name in ("pkt", "crd"):
        cls = DISTILLERS[name]
        assert cls.needs_features and cls.needs_teacher and cls.name == name


def test_kd_loss_two_samples_by_hand():
    s = [[1.0, 0.0], [0.0, 0.0]]
    t = [[0.0, 1.0], [2.0, 0.0]]
    temperature = 2.0
    kl = 0.0
    for zs, zt in zip(s, t):
        p_s = softmax([v / temperature for v in zs])
        p_t = softmax([v / temperature for v in zt])
        kl += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    expected = temperature**2 * kl / 2  # T²·KL, summed over classes, averaged over the 2 samples
    got = kd_loss(torch.tensor(s), torch.tensor(t), temperature)
    assert got.item() == pytest.approx(expected, rel=1e-6)


# PKT --------------------------------------------------------------------------------------------------------------


def pkt_reference(f_s, f_t, eps=1e-7):
    """PKT written out with Python floats: conditional probabilities from (cos + 1)/2, KL over all B² pairs."""

    def probabilities(rows):
        unit = []
        for r in rows:
            norm = math.sqrt(sum(v * v for v in r))
            unit.append([v / (norm + eps) for v in r])
        sim = [[(sum(a * b for a, b in zip(u, w)) + 1.0) / 2.0 for w in unit] for u in unit]
        return [[v / sum(row) for v in row] for row in sim]

    p_s, p_t = probabilities(f_s), probabilities(f_t)
    b = len(f_s)
    total = sum(p_t[i][j] * math.log((p_t[i][j] + eps) / (p_s[i][j] + eps)) for i in range(b) for j in range(b))
    return total / (b * b)


F_S = [[1.0, 2.0, 0.5], [-0.3, 0.8, 1.1], [0.0, -1.0, 2.0], [0.7, 0.7, -0.2]]
F_T = [[0.5, -1.0, 0.2, 1.0], [1.5, 0.3, 0.0, -0.4], [-0.2, 0.9, 0.8, 0.1], [0.3, 0.3, 0.3, 0.3]]


def test_pkt_loss_matches_reference():
    got = pkt_loss(torch.tensor(F_S), torch.tensor(F_T)).item()
    expected = pkt_reference(F_S, F_T)
    assert expected > 0
    assert got == pytest.approx(expected, rel=1e-4)


def test_pkt_loss_zero_feature_is_finite():
    f_s = [row[:] for row in F_S]
    f_s[1] = [0.0, 0.0, 0.0]
    got = pkt_loss(torch.tensor(f_s), torch.tensor(F_T)).item()
    assert math.isfinite(got)
    assert got == pytest.approx(pkt_reference(f_s, F_T), rel=1e-4)


def test_pkt_distiller_weights():
    pkt = build("pkt", DistillContext(num_points=10, num_classes=3, student_dim=3, teacher_dim=4))
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.2, 0.3, 0.1], [0.0, 0.0, 2.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([0, 2, 2, 1])
    f_s = torch.tensor(F_S, requires_grad=True)
    f_t = torch.tensor(F_T, requires_grad=True)
    losses = pkt([torch.zeros(1), f_s], logits, [f_t], None, labels, torch.arange(4))
    assert set(losses) == {"ce", "pkt"}
    assert losses["ce"].item() == pytest.approx(F.cross_entropy(logits, labels).item())
    assert losses["pkt"].item() == pytest.approx(30000 * pkt_reference(F_S, F_T), rel=1e-4)
    sum(losses.values()).backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert f_t.grad is None


# CRD --------------------------------------------------------------------------------------------------------------

N, B, DS, DT, CLASSES = 50, 4, 6, 8, 5


def make_crd(seed=0, num_points=N, labels=None, classes=CLASSES):
    torch.manual_seed(seed)
    labels = torch.arange(num_points) % classes if labels is None else labels
    context = DistillContext(num_points=num_points, num_classes=classes, student_dim=DS, teacher_dim=DT, labels=labels)
    return build("crd", context)


def batch(seed=1, indices=(3, 17, 42, 8)):
    g = torch.Generator().manual_seed(seed)
    f_s = torch.randn(len(indices), DS, generator=g)
    f_t = torch.randn(len(indices), DT, generator=g)
    logits = torch.randn(len(indices), CLASSES, generator=g)
    labels = torch.randint(CLASSES, (len(indices),), generator=g)
    return f_s, f_t, logits, labels, torch.tensor(indices, dtype=torch.long)


def run(crd, f_s, f_t, logits, labels, idx):
    return crd([f_s], logits, [f_t], None, labels, idx)


def draw_after_seed(crd, seed, idx):
    """The negatives CRD draws for the anchors ``idx`` right after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return crd.negatives(crd.labels[idx])


@torch.no_grad()
def crd_reference(crd, f_s, f_t, idx, sample, memory_s, memory_t):
    """CRD's NCE loss and memory update in float64 with explicit loops, from the memory before the step."""
    n, k = crd.context.num_points, sample.shape[1] - 1
    mem_s, mem_t = memory_s.double().clone(), memory_t.double().clone()

    def embed(head, f):
        v = f.double() @ head.linear.weight.double().t() + head.linear.bias.double()
        return v / v.norm(dim=1, keepdim=True)

    v_s, v_t = embed(crd.embed_s, f_s), embed(crd.embed_t, f_t)
    total = 0.0
    for anchor, bank in ((v_s, mem_t), (v_t, mem_s)):
        scores = torch.tensor([[math.exp(float(bank[j] @ anchor[i]) / 0.07) for j in sample[i]] for i in range(B)])
        z = float(scores.mean()) * n
        p = scores / z
        noise = k / n
        loss = 0.0
        for i in range(B):
            loss -= math.log(p[i, 0] / (p[i, 0] + noise + 1e-7))
            for j in range(1, k + 1):
                loss -= math.log(noise / (p[i, j] + noise + 1e-7))
        total += loss / B
    new_s = {int(i): (0.5 * mem_s[i] + 0.5 * v_s[r]) for r, i in enumerate(idx)}
    new_t = {int(i): (0.5 * mem_t[i] + 0.5 * v_t[r]) for r, i in enumerate(idx)}
    return total, {i: v / v.norm() for i, v in new_s.items()}, {i: v / v.norm() for i, v in new_t.items()}


def test_crd_construction():
    crd = make_crd()
    assert crd.memory_s.shape == crd.memory_t.shape == (N, 128)
    stdv = 1 / math.sqrt(128 / 3)
    assert crd.memory_s.abs().max() <= stdv and crd.memory_t.abs().max() <= stdv
    assert not torch.equal(crd.memory_s, crd.memory_t)
    assert crd.z.tolist() == [-1.0, -1.0]
    assert crd.num_negatives == N  # min(16384, N)
    assert {"memory_s", "memory_t", "z"} <= set(crd.state_dict())
    assert sorted(n for n, _ in crd.named_parameters()) == [
        "embed_s.linear.bias",
        "embed_s.linear.weight",
        "embed_t.linear.bias",
        "embed_t.linear.weight",
    ]
    with pytest.raises(ValueError, match="teacher"):
        build("crd", DistillContext(num_points=N, num_classes=CLASSES, student_dim=DS, teacher_dim=0))
    with pytest.raises(ValueError, match="labels"):
        build("crd", DistillContext(num_points=N, num_classes=CLASSES, student_dim=DS, teacher_dim=DT))


def test_crd_full_size_negatives():
    crd = make_crd(num_points=20000, classes=100)  # CIFAR-100's shape: 19,800 points of other classes
    assert crd.num_negatives == 16384 and crd.replacement == "never"
    f_s, f_t, logits, labels, idx = batch(indices=(19999, 0))
    losses = run(crd, f_s, f_t, logits, labels, idx)
    assert math.isfinite(losses["crd"].item()) and losses["crd"].item() > 0


def test_crd_negatives_are_a_uniform_subset_of_the_other_classes():
    """K of 19,800 other-class points: without replacement, as RepDistiller's np.random.choice(..., replace=False)."""
    crd = make_crd(num_points=20000, classes=100)
    anchors = torch.tensor([0, 0, 7, 99])
    torch.manual_seed(0)
    neg = crd.negatives(anchors)
    assert neg.shape == (4, 16384)
    for row, c in zip(neg, anchors.tolist()):
        assert row.unique().numel() == 16384  # no repeats
        assert not (crd.labels[row] == c).any()
    assert not torch.equal(neg[0].sort().values, neg[1].sort().values)  # independent draws


def test_crd_negatives_with_replacement_are_uniform_over_the_other_classes():
    """Digits-sized sets: K = N exceeds the other classes' points, so draws repeat (RepDistiller: replace=True)."""
    crd = make_crd()  # 50 points, 5 classes of 10: K = 50 > 40
    assert crd.replacement == "always"
    torch.manual_seed(0)
    neg = crd.negatives(torch.full((2000,), 3))
    assert not (crd.labels[neg] == 3).any()
    counts = torch.bincount(neg.flatten(), minlength=N)[crd.labels != 3]
    expected = neg.numel() / 40  # 2,500 each, standard deviation about 49
    assert counts.min() > expected - 300 and counts.max() < expected + 300


def test_crd_negatives_by_class_when_only_some_classes_are_small():
    # Class 0 holds half of 20,000 points (10,000 others: with replacement); the other 99 classes share the
    # rest (about 19,900 others each: without).
    labels = torch.cat([torch.zeros(10000, dtype=torch.long), 1 + torch.arange(10000) % 99])
    crd = make_crd(num_points=20000, labels=labels, classes=100)
    assert crd.replacement == "by class"
    torch.manual_seed(0)
    neg = crd.negatives(torch.tensor([0, 5]))
    assert not (labels[neg[0]] == 0).any() and not (labels[neg[1]] == 5).any()
    assert neg[0].unique().numel() < 16384 and neg[1].unique().numel() == 16384


def test_crd_loss_and_memory_match_reference():
    crd = make_crd()
    f_s, f_t, logits, labels, idx = batch()
    drawn, draw = [], crd.negatives
    crd.negatives = lambda anchor_labels: drawn.append(draw(anchor_labels)) or drawn[-1]
    before_s, before_t = crd.memory_s.clone(), crd.memory_t.clone()

    torch.manual_seed(7)
    losses = run(crd, f_s, f_t, logits, labels, idx)
    assert len(drawn) == 1 and drawn[0].shape == (B, N)
    assert torch.equal(drawn[0], draw_after_seed(crd, 7, idx))
    sample = torch.cat([idx.view(-1, 1), drawn[0]], dim=1)
    expected, new_s, new_t = crd_reference(crd, f_s, f_t, idx, sample, before_s, before_t)
    assert set(losses) == {"ce", "crd"}
    assert losses["ce"].item() == pytest.approx(F.cross_entropy(logits, labels).item())
    assert losses["crd"].shape == ()
    assert losses["crd"].item() > 0
    assert losses["crd"].item() == pytest.approx(0.8 * expected, rel=1e-4)

    # Z set from the first batch, kept afterwards.
    z = crd.z.clone()
    assert (z > 0).all()
    run(crd, *batch(seed=2))
    assert torch.equal(crd.z, z)

    # The first step moved exactly the batch's rows, to the renormalised momentum average.
    crd_one = make_crd()
    torch.manual_seed(7)
    run(crd_one, f_s, f_t, logits, labels, idx)
    changed = (crd_one.memory_s != before_s).any(dim=1)
    assert changed.nonzero().flatten().tolist() == sorted(idx.tolist())
    assert torch.equal((crd_one.memory_t != before_t).any(dim=1), changed)
    for i in idx.tolist():
        assert torch.allclose(crd_one.memory_s[i].double(), new_s[i], atol=1e-6)
        assert torch.allclose(crd_one.memory_t[i].double(), new_t[i], atol=1e-6)
        assert crd_one.memory_s[i].norm().item() == pytest.approx(1.0, abs=1e-6)


def test_crd_uses_original_indices_of_a_subset():
    """A condensed subset: only the rows of the original indices passed change, over several steps."""
    crd = make_crd(num_points=60)
    before = crd.memory_s.clone(), crd.memory_t.clone()
    subset = [59, 5, 31, 44, 12, 27]
    torch.manual_seed(0)
    for step in range(3):
        picked = tuple(subset[(step + j) % len(subset)] for j in range(B))
        run(crd, *batch(seed=step, indices=picked))
    for memory, old in zip((crd.memory_s, crd.memory_t), before):
        changed = (memory != old).any(dim=1).nonzero().flatten().tolist()
        assert changed == sorted(subset)


def test_crd_gradients():
    crd = make_crd()
    f_s, f_t, logits, labels, idx = batch()
    f_s.requires_grad_(True)
    f_t.requires_grad_(True)
    losses = run(crd, f_s, f_t, logits, labels, idx)
    losses["crd"].backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert f_t.grad is None
    for p in crd.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert not crd.memory_s.requires_grad and not crd.z.requires_grad


def test_crd_two_forwards_then_backward():
    """The engine never does this, but the buffers' in-place updates must not break a pending backward."""
    crd = make_crd()
    first = run(crd, *batch(seed=1))
    run(crd, *batch(seed=2))
    first["crd"].backward()


def test_crd_state_dict_round_trip_resumes_exactly():
    crd = make_crd(seed=0)
    torch.manual_seed(1)
    for step in range(2):
        run(crd, *batch(seed=step))
    resumed = make_crd(seed=5)
    assert not torch.equal(resumed.memory_s, crd.memory_s)
    resumed.load_state_dict(crd.state_dict())
    for name, value in crd.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name

    torch.manual_seed(3)
    a = run(crd, *batch(seed=9))
    torch.manual_seed(3)
    b = run(resumed, *batch(seed=9))
    assert a["crd"].item() == b["crd"].item()
    assert torch.equal(crd.memory_s, resumed.memory_s) and torch.equal(crd.memory_t, resumed.memory_t)


def test_crd_deterministic_under_seed():
    crd = make_crd()
    twin = copy.deepcopy(crd)
    other = copy.deepcopy(crd)
    torch.manual_seed(11)
    a = run(crd, *batch())
    torch.manual_seed(11)
    b = run(twin, *batch())
    torch.manual_seed(12)
    c = run(other, *batch())
    assert a["crd"].item() == b["crd"].item()
    assert torch.equal(crd.memory_s, twin.memory_s)
    assert a["crd"].item() != c["crd"].item()  # other negatives


def test_crd_is_the_registered_class():
    assert isinstance(make_crd(), CRD)
