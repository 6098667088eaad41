"""A run's identity, computed here and nowhere else, from everything that changes its result.

- its options (:class:`RunConfig`): every option of the recipe, the distiller and the method, defaults filled in,
  numbers normalised, so each run has one spelling (:meth:`RunConfig.canonical`; :attr:`RunConfig.options_hash`);
- a fingerprint of the data (name, split sizes, content hashes of the training and test splits);
- :data:`kcdlib.NUMERICS_VERSION` and a digest of the code that computes it (:mod:`kcdlib.provenance`).

:func:`identity` puts them together and :func:`identity_digest` hashes it: the run's folder name in the store
(:mod:`kcdlib.runs`). :func:`teacher_config` and :func:`distill_config` make the runs the command line and the
notebooks ask for; :func:`with_teachers` orders runs so a teacher comes before its students.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from . import NUMERICS_VERSION, distillers, files, methods, models
from . import data as datasets
from .errors import BadOption, CheckpointError
from .fastpath import PRECISIONS
from .recipe import Recipe

# Seeds feed torch.manual_seed and the epoch generators: 31 bits keep every derived seed in range.
MAX_SEED = 2**31 - 1


def _items(options: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(options.items()))


@dataclass(frozen=True)
class RunConfig:
    """Everything in a run's options that defines its result. ``teacher`` is the teacher's own run (trained and
    cached first), or ``teacher_sha256`` identifies a RepDistiller checkpoint file by its content.

    Construction checks every option and makes it canonical: the distiller's and the method's options are
    completed with their defaults, so a run spelled with or without its defaults is one run."""

    dataset: str
    arch: str
    recipe: Recipe
    seed: int = 0
    distiller: str = "ce"
    method: str = "kd"
    method_options: tuple[tuple[str, Any], ...] = ()
    teacher: RunConfig | None = None
    teacher_arch: str | None = None
    teacher_sha256: str | None = None
    precision: str = "fp32"
    distiller_options: tuple[tuple[str, Any], ...] = ()
    # How training images are decoded from files (ImageNet): "pil" or "gpu" (nvjpeg), other pixels, so part of the
    # identity; recorded only when it is not "pil", so identities made before the option existed stand.
    decode: str = "pil"
    # Where the checkpoint was found: not part of the identity (the same file elsewhere is the same teacher).
    teacher_checkpoint: str | None = field(default=None, compare=False)

    def __post_init__(self):
        datasets.DATASETS.check(self.dataset)
        models.ARCHS.check(self.arch)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise BadOption(f"the seed must be a whole number in [0, {MAX_SEED}], got {self.seed!r}")
        if self.precision not in PRECISIONS:
            raise BadOption(f"unknown precision '{self.precision}': one of {', '.join(PRECISIONS)}")
        datasets.check_decode(self.dataset, self.decode)
        if self.kind == "distill":
            if self.teacher_arch is None or (self.teacher is None) == (self.teacher_sha256 is None):
                raise BadOption("a distillation run needs one teacher: a teacher run or a checkpoint's sha256")
            models.ARCHS.check(self.teacher_arch)
        elif self.teacher is not None or self.teacher_sha256 is not None:
            raise BadOption("'ce' trains without a teacher")
        d = distillers.canonical_options(self.distiller, dict(self.distiller_options))
        r = self.recipe
        m = methods.canonical_options(self.method, dict(self.method_options), r.epochs, r.batch_size)
        object.__setattr__(self, "distiller_options", _items(d))
        object.__setattr__(self, "method_options", _items(m))

    @property
    def kind(self) -> str:
        return "teacher" if self.distiller == "ce" else "distill"

    def canonical(self) -> dict[str, Any]:
        """The run's options as one JSON-able dict: what its identity hashes."""
        d = {
            "kind": self.kind,
            "dataset": self.dataset,
            "arch": self.arch,
            "recipe": self.recipe.as_dict(),
            "seed": self.seed,
            "distiller": self.distiller,
            "distiller_options": dict(self.distiller_options),
            "method": self.method,
            "method_options": dict(self.method_options),
            "precision": self.precision,
        }
        if self.decode != "pil":
            d["decode"] = self.decode
        if self.kind == "distill":
            d["teacher_arch"] = self.teacher_arch
            d["teacher"] = self.teacher.canonical() if self.teacher else {"sha256": self.teacher_sha256}
        return d

    @property
    def options_hash(self) -> str:
        """The hash of the options alone (the store's folder names add the data and the numerics version)."""
        return digest(as_hashed(self.canonical()))


# Options renamed after runs were recorded under their old names, hashed under those names so that every identity
# made before stands: (whose options, the name now) -> the name hashed. The paper writes both α: the KD term's weight
# and the exponent of KCD's value score.
HASHED_AS = {("distiller_options", "kd_weight"): "alpha", ("method_options", "cost_exponent"): "alpha"}


def as_hashed(run: dict[str, Any]) -> dict[str, Any]:
    """A run's canonical options (:meth:`RunConfig.canonical`, its teacher's included) as its hash spells them."""
    out = dict(run)
    for (owner, name), hashed in HASHED_AS.items():
        if isinstance(out.get(owner), dict) and name in out[owner]:
            out[owner] = {(hashed if k == name else k): v for k, v in out[owner].items()}
    if isinstance(out.get("teacher"), dict) and "kind" in out["teacher"]:
        out["teacher"] = as_hashed(out["teacher"])
    return out


def identity_digest(identity: dict[str, Any]) -> str:
    """The hash of a run's identity (:func:`identity`): the name of its folder in the store."""
    run = identity.get("run")
    return digest({**identity, "run": as_hashed(run)} if isinstance(run, dict) else identity)


def digest(obj: Any) -> str:
    """16 hex digits of the SHA-256 of ``obj`` as canonical JSON."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:16]


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def identity(cfg: RunConfig, data: dict[str, Any], code: str) -> dict[str, Any]:
    """Everything that changes ``cfg``'s result: its options, the fingerprint of its ``data``, the numerics version
    and the digest of the ``code`` that computes it. Its :func:`identity_digest` names the run's folder."""
    return {"run": cfg.canonical(), "data": data, "numerics": NUMERICS_VERSION, "code": code}


def loss_of(distiller: str, method: str) -> str:
    """The distiller a run of ``method`` trains with: a method whose loss is not plain KD (UNIX: KD alone, γ = 0,
    α = 1) brings its own in place of the default ``kd``; any other distiller is as named."""
    own = methods.METHODS[method].loss
    return own if own is not None and distiller == "kd" else distiller


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """The content hash that identifies a teacher checkpoint file in a run's identity."""
    try:
        return files.sha256_file(path)
    except OSError as err:
        raise CheckpointError(f"cannot read the teacher checkpoint '{path}': {err.strerror}") from err


def teacher_config(
    dataset: str, arch: str, seed: int = 0, epochs: int | None = None, precision: str = "fp32", decode: str = "pil"
) -> RunConfig:
    """A teacher trained with cross-entropy and the dataset's default recipe."""
    recipe = datasets.spec(dataset).recipe(arch, epochs)  # an unknown dataset is refused here
    return RunConfig(dataset=dataset, arch=arch, recipe=recipe, seed=seed, precision=precision, decode=decode)


def distill_config(
    dataset: str,
    student: str,
    *,
    teacher: RunConfig | None = None,
    teacher_checkpoint: str | None = None,
    teacher_arch: str | None = None,
    distiller: str = "kd",
    distiller_options: dict[str, Any] | None = None,
    method: str = "kd",
    method_options: dict[str, Any] | None = None,
    epochs: int | None = None,
    seed: int = 0,
    precision: str = "fp32",
    decode: str = "pil",
) -> RunConfig:
    """A distillation run of ``student`` from a teacher run or from a checkpoint file of ``teacher_arch``."""
    spec = datasets.spec(dataset)  # an unknown dataset is refused first
    if (teacher is None) == (teacher_checkpoint is None):
        raise BadOption("give exactly one teacher: a teacher run or a checkpoint file")
    if distiller == "ce":
        raise BadOption("'ce' trains without a teacher: train it as a teacher run")
    sha = None
    if teacher_checkpoint is not None:
        if teacher_arch is None:
            raise BadOption("a teacher checkpoint needs its architecture (teacher_arch)")
        sha = checkpoint_sha256(teacher_checkpoint)
    else:
        if teacher_arch is not None and teacher_arch != teacher.arch:
            raise BadOption(f"teacher_arch '{teacher_arch}' contradicts the teacher run's '{teacher.arch}'")
        teacher_arch = teacher.arch
    distiller = loss_of(distiller, method)
    return RunConfig(
        dataset=dataset,
        arch=student,
        recipe=spec.recipe(student, epochs),
        seed=seed,
        distiller=distiller,
        distiller_options=_items(distiller_options or {}),
        method=method,
        method_options=_items(method_options or {}),
        teacher=teacher,
        teacher_arch=teacher_arch,
        teacher_sha256=sha,
        precision=precision,
        decode=decode,
        teacher_checkpoint=teacher_checkpoint,
    )


def difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Why a record of the same options is not this run, in words."""
    reasons = []
    if old.get("numerics") != new["numerics"]:
        reasons.append(f"made by numerics version {old.get('numerics')} (this code: {new['numerics']})")
    if old.get("code") != new["code"]:
        reasons.append(f"made by other code (code {old.get('code') or 'unrecorded'}, this code: {new['code']}: "
                       f"see kcdlib.provenance)")  # fmt: skip
    a, b = old.get("data") if isinstance(old.get("data"), dict) else {}, new["data"]
    if a != b:
        if (a.get("num_train"), a.get("num_test")) != (b["num_train"], b["num_test"]):
            reasons.append(f"made on other data ({a.get('num_train')}/{a.get('num_test')} train/test images, "
                           f"now {b['num_train']}/{b['num_test']})")  # fmt: skip
        splits = [split for split in ("train", "test") if a.get(f"{split}_sha256") != b[f"{split}_sha256"]]
        for split in splits:
            reasons.append(f"made on other data ({split} split {str(a.get(f'{split}_sha256'))[:12]}, now "
                           f"{b[f'{split}_sha256'][:12]})")  # fmt: skip
    return " and ".join(reasons) or "made under another identity"


def with_teachers(configs: Iterable[RunConfig]) -> list[RunConfig]:
    """``configs``, each once, in order, with before each distillation the teacher runs it learns from (the store
    trains a teacher before its student, so this is the order runs are made in)."""
    out: dict[str, RunConfig] = {}
    for cfg in configs:
        chain = []
        while cfg is not None:
            chain.append(cfg)
            cfg = cfg.teacher
        for c in reversed(chain):
            out.setdefault(c.options_hash, c)
    return list(out.values())
