"""Distillers: what the student learns from the teacher on one batch, as named losses.

``L = γ·CE(z_s, y) + α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) + β·L_other`` (RepDistiller's conventions, which the
paper follows). A distiller is a small ``nn.Module`` registered here with :func:`register`; its ``forward`` gets the
student's and the teacher's features and logits of the same augmented batch, the labels and the knowledge-point
indices, and returns a dict of already-weighted losses whose sum is minimised. Adding a distiller touches only
this file. Trainable parts (CRD's embeddings) are the module's parameters; the engine optimises them with the
student.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .options import Option, between, canonical, non_negative, positive
from .registry import Registry


@dataclass(frozen=True)
class DistillContext:
    """What a distiller may need to know to build itself."""

    num_points: int  # N, size of the knowledge set (CRD's memory is indexed by point)
    num_classes: int
    student_dim: int  # size of the student's pooled feature (feats[-1])
    teacher_dim: int  # same for the teacher; 0 when there is no teacher
    labels: torch.Tensor | None = None  # each point's class (CRD draws its negatives from the other classes)
    options: dict | None = None  # the run's distiller options (missing ones take the defaults)


DISTILLERS: Registry[Callable[[DistillContext], Distiller]] = Registry("distiller")


def register(name: str, label: str | None = None):
    """Register a distiller under ``name``; ``label`` is how the book's tables name it (default: ``name`` in
    capitals, e.g. ``KD``; a KCD run of it is ``KC-<label>``)."""

    def add(cls):
        DISTILLERS.register(name, cls)
        cls.name = name
        cls.label = label or name.upper()
        return cls

    return add


def canonical_options(name: str, options: dict | None) -> dict:
    """Every option of distiller ``name``, defaults filled in, checked (the form the run identity hashes)."""
    return canonical(f"distiller '{name}'", DISTILLERS[name].option_specs, options)


def build(name: str, context: DistillContext) -> Distiller:
    return DISTILLERS[name](context)


class Distiller(nn.Module):
    """Base: ``needs_teacher`` says whether the engine runs the teacher; ``needs_features`` whether it asks the
    networks for their intermediate features (``is_feat=True``) rather than logits only."""

    name = "base"
    label = "base"
    needs_teacher = True
    needs_features = False
    option_specs: dict[str, Option] = {}

    def __init__(self, context: DistillContext):
        super().__init__()
        self.context = context
        self.options = canonical(f"distiller '{self.name}'", self.option_specs, context.options)

    def forward(self, s_feats, s_logits, t_feats, t_logits, labels, indices) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def kd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))`` averaged over the batch (Hinton et al.; RepDistiller's DistillKL)."""
    log_p_s = F.log_softmax(s_logits / temperature, dim=1)
    p_t = F.softmax(t_logits / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="sum") * temperature**2 / s_logits.shape[0]


@register("ce")
class CrossEntropy(Distiller):
    """No teacher: plain cross-entropy training (how teachers are trained)."""

    needs_teacher = False

    def forward(self, s_feats, s_logits, t_feats, t_logits, labels, indices):
        return {"ce": F.cross_entropy(s_logits, labels)}


@register("kd")
class KD(Distiller):
    """Vanilla KD: ``γ = 0.1, α = 0.9, T = 4`` (``gamma``, ``kd_weight``, ``temperature``)."""

    option_specs = {
        "gamma": Option(0.1, **non_negative()),
        "kd_weight": Option(0.9, **non_negative()),
        "temperature": Option(4.0, **positive()),
    }

    def forward(self, s_feats, s_logits, t_feats, t_logits, labels, indices):
        o = self.options
        return {
            "ce": o["gamma"] * F.cross_entropy(s_logits, labels),
            "kd": o["kd_weight"] * kd_loss(s_logits, t_logits, o["temperature"]),
        }


@register("unix_kd", label="UNIX's KD")
class UnixKD(KD):
    """UNIX's loss: KD alone (``γ = 0, α = 1, T = 4``), as in its official code."""

    option_specs = {**KD.option_specs, "gamma": Option(0.0, **non_negative()),
                    "kd_weight": Option(1.0, **non_negative())}  # fmt: skip


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic Knowledge Transfer (Passalis & Tefas; RepDistiller's PKT): the batch's cosine similarities,
    mapped to [0, 1] and normalised per row into conditional probabilities ``p(j | i)``, for teacher and student;
    the loss is the KL divergence between them averaged over all ``B²`` pairs.

    ``eps`` as RepDistiller: added to the norms (a zero feature stays a zero vector, NaNs are set to 0) and to both
    probabilities inside the logarithm.
    """

    def probabilities(f: torch.Tensor) -> torch.Tensor:
        f = f.flatten(1)
        f = f / (f.norm(dim=1, keepdim=True) + eps)
        f = torch.where(torch.isnan(f), torch.zeros_like(f), f)
        similarity = (f @ f.t() + 1.0) / 2.0
        return similarity / similarity.sum(dim=1, keepdim=True)

    p_s, p_t = probabilities(f_s), probabilities(f_t)
    return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))


@register("pkt")
class PKT(Distiller):
    """PKT on the pooled penultimate features ``feats[-1]``: ``γ = 1, α = 0, β = 30000``."""

    needs_features = True
    option_specs = {"gamma": Option(1.0, **non_negative()), "beta": Option(30000.0, **non_negative())}

    def forward(self, s_feats, s_logits, t_feats, t_logits, labels, indices):
        return {
            "ce": self.options["gamma"] * F.cross_entropy(s_logits, labels),
            "pkt": self.options["beta"] * pkt_loss(s_feats[-1], t_feats[-1].detach()),
        }


class Embed(nn.Module):
    """CRD's projection head: a linear map to the contrast space followed by L2 normalisation."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


def contrast_nce_loss(scores: torch.Tensor, num_points: int, eps: float = 1e-7) -> torch.Tensor:
    """RepDistiller's ``ContrastLoss`` (CRD's Eq. 18): NCE with the positive's score in column 0 and ``m`` noise
    scores after it, noise distribution ``Pn = 1/N``. ``scores`` are the normalised ``exp(v·w/τ)/Z``, ``[B, m + 1]``.
    """
    m = scores.shape[1] - 1
    noise = m / float(num_points)  # m·Pn
    log_d1 = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    log_d0 = torch.log(noise / (scores[:, 1:] + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


@register("crd")
class CRD(Distiller):
    """Contrastive Representation Distillation (Tian et al., RepDistiller's CRDLoss): ``γ = 1, α = 0, β = 0.8``.

    The pooled features ``feats[-1]`` of student and teacher are embedded (linear + L2 norm) into 128-d; each
    embedding is contrasted, at temperature 0.07, against the other network's memory bank: its own point's row
    (the positive; RepDistiller's ``exact`` mode) and ``K`` rows of points of the other classes, drawn uniformly
    (negatives, as RepDistiller's sampling dataset draws them: without replacement, or with replacement when the
    other classes have fewer than ``K`` points). The two NCE losses are summed. Both banks (``N × 128``) are
    indexed by the original knowledge-point index, so a condensed subset (KC-CRD) updates and contrasts against
    the same rows as full training; after the loss, the batch's rows are moved towards the new embeddings with
    momentum 0.5 and renormalised.

    ``K = min(16384, N)``: RepDistiller's 16384 whenever ``N ≥ 16384`` (CIFAR-100, ImageNet); on smaller sets
    (digits, tests) drawing more negatives than there are points only repeats rows, multiplies the memory traffic
    and tilts the NCE prior ``K/N`` above 1, so ``K`` stops at ``N``.

    Random draws use torch's global RNG (seeded per epoch by the engine); the banks and the normalisation
    constants ``Z`` (estimated on the first batch as ``N·mean(exp(v·w/τ))``, ``-1`` until then) are buffers, so
    ``state_dict()`` checkpoints and resumes them exactly.
    """

    needs_features = True
    option_specs = {
        "gamma": Option(1.0, **non_negative()),
        "beta": Option(0.8, **non_negative()),
        "feat_dim": Option(128, int, **positive()),
        "nce_k": Option(16384, int, **positive()),
        "nce_t": Option(0.07, **positive()),
        "nce_m": Option(0.5, **between(0, 1, high_open=True)),
    }

    def __init__(self, context: DistillContext):
        super().__init__(context)
        if context.teacher_dim <= 0:
            raise ValueError("distiller 'crd' needs a teacher (teacher_dim is 0)")
        n = context.num_points
        if context.labels is None or context.labels.shape != (n,):
            raise ValueError(f"distiller 'crd' draws negatives from the other classes: it needs the {n} points' labels")
        self.num_negatives = min(self.options["nce_k"], n)
        labels = context.labels.detach().to("cpu", torch.int64)
        counts = torch.bincount(labels, minlength=context.num_classes)
        # The points sorted by class: the other classes of class c are the positions outside
        # [start[c], start[c] + counts[c]).
        self.register_buffer("labels", labels, persistent=False)
        self.register_buffer("by_class", torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer("class_start", torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer("class_count", counts, persistent=False)
        # Per class, as RepDistiller: with replacement only when the other classes hold fewer than K points.
        replace = self.num_negatives > n - counts[counts > 0]
        self.replacement = "always" if bool(replace.all()) else "never" if not bool(replace.any()) else "by class"
        self.embed_s = Embed(context.student_dim, self.options["feat_dim"])
        self.embed_t = Embed(context.teacher_dim, self.options["feat_dim"])
        stdv = (self.options["feat_dim"] / 3) ** -0.5
        self.register_buffer("memory_s", torch.rand(n, self.options["feat_dim"]).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(n, self.options["feat_dim"]).mul_(2 * stdv).add_(-stdv))
        # Z for the student anchor (scored against memory_t) and the teacher anchor (against memory_s).
        self.register_buffer("z", torch.full((2,), -1.0))

    def negatives(self, anchor_labels: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` point indices of other classes than each anchor's, drawn uniformly with torch's RNG."""
        b, k, n = anchor_labels.shape[0], self.num_negatives, self.labels.shape[0]
        device = anchor_labels.device
        drawn = []
        if self.replacement != "never":
            # Uniform ranks among the other classes' m points, skipping the anchor's class in the sorted order.
            start, count = self.class_start[anchor_labels].view(b, 1), self.class_count[anchor_labels].view(b, 1)
            m = n - count
            rank = torch.minimum((torch.rand(b, k, device=device) * m).long(), m - 1)
            drawn.append(self.by_class[rank + (rank >= start) * count])
        if self.replacement != "always":
            # A uniform k-subset: the k smallest of independent uniform keys, the anchor's class keyed out.
            keys = torch.rand(b, n, device=device).masked_fill_(self.labels.view(1, n) == anchor_labels.view(b, 1), 2.0)
            drawn.append(keys.topk(k, dim=1, largest=False, sorted=False).indices)
        if len(drawn) == 1:
            return drawn[0]
        return torch.where((k > n - self.class_count[anchor_labels]).view(b, 1), drawn[0], drawn[1])

    def _scores(self, anchor: torch.Tensor, memory: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        rows = memory[sample]  # [B, K + 1, d], a copy: the memory itself never needs a gradient
        return torch.exp(torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2) / self.options["nce_t"])

    @torch.no_grad()
    def _update(self, memory: torch.Tensor, indices: torch.Tensor, v: torch.Tensor) -> None:
        rows = memory[indices] * self.options["nce_m"] + v * (1.0 - self.options["nce_m"])
        memory.index_copy_(0, indices, F.normalize(rows, dim=1))

    def forward(self, s_feats, s_logits, t_feats, t_logits, labels, indices):
        v_s = self.embed_s(s_feats[-1])
        v_t = self.embed_t(t_feats[-1].detach())
        n = self.memory_s.shape[0]
        sample = torch.cat([indices.view(-1, 1), self.negatives(self.labels[indices])], dim=1)
        out_s = self._scores(v_s, self.memory_t, sample)
        out_t = self._scores(v_t, self.memory_s, sample)
        # Set Z once, from the first batch, without a host synchronisation.
        estimate = torch.stack([out_s.detach().mean(), out_t.detach().mean()]) * n
        self.z.copy_(torch.where(self.z < 0, estimate, self.z))
        z = self.z.clone()  # autograd keeps the divisor; a later in-place update of the buffer must not touch it
        loss = contrast_nce_loss(out_s / z[0], n) + contrast_nce_loss(out_t / z[1], n)
        self._update(self.memory_s, indices, v_s.detach())
        self._update(self.memory_t, indices, v_t.detach())
        return {"ce": self.options["gamma"] * F.cross_entropy(s_logits, labels), "crd": self.options["beta"] * loss}
