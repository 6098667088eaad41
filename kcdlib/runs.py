"""The run store: every number the book shows comes from a recorded run.

A run is defined by a :class:`RunConfig`; its canonical dict is hashed, and ``runs/<hash>/`` holds

- ``config.json``: the canonical config, written when the run starts;
- ``checkpoint.pt``: the state after the last finished epoch (replaced atomically each epoch);
- ``model.pt``: the trained network in RepDistiller's format ``{'model': state_dict}``;
- ``record.json``: the results (written atomically, last: its presence means the run is finished).

A finished run is reused, never retrained. A killed run resumes from its last epoch checkpoint and ends with the
same record. Two processes asking for the same run take turns on a file lock: the second waits, then reuses the
first's record.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__, cost, models
from .data import load_dataset
from .distillers import DistillContext
from .distillers import build as build_distiller
from .errors import BadOption, CheckpointError
from .methods import METHODS, MethodContext
from .methods import build as build_method
from .train import PRECISIONS, Recipe, Trainer, default_recipe


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run's result. ``teacher`` is the teacher's own run (trained and cached first),
    or ``teacher_checkpoint`` a RepDistiller checkpoint file, identified by its content hash."""

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
    # Where the checkpoint was found: not part of the identity (the same file elsewhere is the same teacher).
    teacher_checkpoint: str | None = field(default=None, compare=False)

    @property
    def kind(self) -> str:
        return "teacher" if self.distiller == "ce" else "distill"

    def canonical(self) -> dict[str, Any]:
        d = {
            "kind": self.kind,
            "dataset": self.dataset,
            "arch": self.arch,
            "recipe": self.recipe.as_dict(),
            "seed": self.seed,
            "distiller": self.distiller,
            "method": self.method,
            "method_options": dict(self.method_options),
            "precision": self.precision,
        }
        if self.kind == "distill":
            d["teacher_arch"] = self.teacher_arch
            d["teacher"] = self.teacher.canonical() if self.teacher else {"sha256": self.teacher_sha256}
        return d

    @property
    def hash(self) -> str:
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def teacher_config(
    dataset: str, arch: str, seed: int = 0, epochs: int | None = None, precision: str = "fp32"
) -> RunConfig:
    """A teacher trained with cross-entropy and the dataset's default recipe."""
    check_precision(precision)
    return RunConfig(
        dataset=dataset, arch=arch, recipe=default_recipe(dataset, arch, epochs), seed=seed, precision=precision
    )


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise BadOption(f"unknown precision '{precision}': one of {', '.join(PRECISIONS)}")


def distill_config(
    dataset: str,
    student: str,
    *,
    teacher: RunConfig | None = None,
    teacher_checkpoint: str | None = None,
    teacher_arch: str | None = None,
    distiller: str = "kd",
    method: str = "kd",
    method_options: dict[str, Any] | None = None,
    epochs: int | None = None,
    seed: int = 0,
    precision: str = "fp32",
) -> RunConfig:
    """A distillation run of ``student`` from a teacher run or from a checkpoint file of ``teacher_arch``."""
    check_precision(precision)
    if (teacher is None) == (teacher_checkpoint is None):
        raise BadOption("give exactly one teacher: a teacher run or a checkpoint file")
    sha = None
    if teacher_checkpoint is not None:
        if teacher_arch is None:
            raise BadOption("a teacher checkpoint needs its architecture (teacher_arch)")
        sha = file_sha256(teacher_checkpoint)
    else:
        teacher_arch = teacher.arch
    # A method whose loss is not plain KD (UNIX: KD alone) brings its own distiller.
    method_loss = getattr(METHODS.get(method), "loss", None)
    if method_loss is not None and distiller == "kd":
        distiller = method_loss
    return RunConfig(
        dataset=dataset,
        arch=student,
        recipe=default_recipe(dataset, student, epochs),
        seed=seed,
        distiller=distiller,
        method=method,
        method_options=tuple(sorted((method_options or {}).items())),
        teacher=teacher,
        teacher_arch=teacher_arch,
        teacher_sha256=sha,
        precision=precision,
        teacher_checkpoint=teacher_checkpoint,
    )


def file_sha256(path: str) -> str:
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    except OSError as err:
        raise CheckpointError(f"cannot read the teacher checkpoint '{path}': {err.strerror}") from err


# -- files -----------------------------------------------------------------------------------------------------
def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()))


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock held while the block runs; the OS drops it if the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# -- the store -------------------------------------------------------------------------------------------------
class RunStore:
    """Runs under ``root``, keyed by config hash."""

    def __init__(
        self, root: str | os.PathLike = "runs", data_root: str = "data", device: str = "cpu", compile: str = "off"
    ):
        self.compile = compile  # how the networks run (torch.compile mode): speed only, not the run's identity
        self.root = Path(root)
        self.data_root = data_root
        self.device = torch.device(device)
        self._datasets: dict[str, Any] = {}

    def path(self, cfg: RunConfig) -> Path:
        return self.root / cfg.hash

    def record(self, cfg: RunConfig) -> dict[str, Any] | None:
        """The finished run's record, or None."""
        p = self.path(cfg) / "record.json"
        return json.loads(p.read_text()) if p.exists() else None

    def dataset(self, name: str):
        if name not in self._datasets:
            self._datasets[name] = load_dataset(name, self.data_root, self.device)
        return self._datasets[name]

    def model_path(self, cfg: RunConfig) -> Path:
        return self.path(cfg) / "model.pt"

    def ensure(self, cfg: RunConfig, progress: bool = True) -> dict[str, Any]:
        """The record of ``cfg``: reused when finished, else trained (resuming a checkpoint if there is one)."""
        if (rec := self.record(cfg)) is not None:
            return rec
        self.method_for(cfg, fs_over_ft=1.0)  # refuse bad method options before training anything
        if cfg.teacher is not None:
            self.ensure(cfg.teacher, progress)
        run_dir = self.path(cfg)
        with locked(run_dir / "lock"):
            # Another process may have finished it while we waited for the lock.
            if (rec := self.record(cfg)) is not None:
                return rec
            return self._train(cfg, run_dir, progress)

    def load_teacher(self, cfg: RunConfig) -> torch.nn.Module:
        """The frozen teacher of a distillation run, on the store's device, in eval mode."""
        source = str(self.model_path(cfg.teacher)) if cfg.teacher else cfg.teacher_checkpoint
        num_classes = self.dataset(cfg.dataset).num_classes
        teacher = models.load_checkpoint(cfg.teacher_arch, source, num_classes=num_classes).to(self.device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def build_trainer(self, cfg: RunConfig, progress: bool = True) -> Trainer:
        data = self.dataset(cfg.dataset)
        torch.manual_seed(cfg.seed)
        student = models.create(cfg.arch, num_classes=data.num_classes).to(self.device)
        teacher = self.load_teacher(cfg) if cfg.kind == "distill" else None
        context = DistillContext(
            num_points=data.num_train,
            num_classes=data.num_classes,
            student_dim=models.penultimate_dim(student),
            teacher_dim=models.penultimate_dim(teacher) if teacher is not None else 0,
            labels=data.train_labels,
        )
        distiller = build_distiller(cfg.distiller, context).to(self.device)
        fs_over_ft = 1.0
        if teacher is not None:
            size = (3, data.image_size, data.image_size)
            fs_over_ft = cost.forward_macs(student, size) / cost.forward_macs(teacher, size)
        method = self.method_for(cfg, fs_over_ft)
        return Trainer(
            student, data, cfg.recipe, distiller, teacher, method, seed=cfg.seed, progress=progress,
            precision=cfg.precision, compile=self.compile,
        )  # fmt: skip

    def method_for(self, cfg: RunConfig, fs_over_ft: float):
        data = self.dataset(cfg.dataset)
        context = MethodContext(
            num_points=data.num_train,
            epochs=cfg.recipe.epochs,
            seed=cfg.seed,
            options=dict(cfg.method_options),
            batch_size=cfg.recipe.batch_size,
            device=str(self.device),
            fs_over_ft=fs_over_ft,
            images_in_memory=hasattr(data, "train_images"),
        )
        return build_method(cfg.method, context)

    def _train(self, cfg: RunConfig, run_dir: Path, progress: bool) -> dict[str, Any]:
        write_json(run_dir / "config.json", cfg.canonical())
        trainer = self.build_trainer(cfg, progress)
        ckpt = run_dir / "checkpoint.pt"
        if ckpt.exists():
            state = torch.load(ckpt, map_location=self.device, weights_only=False)
            if state.get("images_file"):
                state["images"] = torch.load(run_dir / state["images_file"], map_location=self.device)
            trainer.load_state_dict(state)

        def save(t: Trainer) -> None:
            state = t.state_dict()
            images = state.pop("images")
            if images is not None:
                # The run's own images (KCD mixes into them) change only at condensations: store each version
                # once, beside the checkpoint, instead of with every epoch's checkpoint.
                name = f"images-{t.method.images_version}.pt"
                if not (run_dir / name).exists():
                    atomic_write(run_dir / name, lambda f: torch.save(images.cpu(), f))
                state["images_file"] = name
            atomic_write(ckpt, lambda f: torch.save(state, f))
            for old in run_dir.glob("images-*.pt"):
                if old.name != state.get("images_file"):
                    old.unlink(missing_ok=True)

        trainer.run(on_epoch_end=save)
        atomic_write(self.model_path(cfg), lambda f: torch.save({"model": trainer.student.state_dict()}, f))
        record = {
            "hash": cfg.hash,
            "config": cfg.canonical(),
            **trainer.results(),
            "versions": {
                "kcdlib": __version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "device": device_name(self.device),
            "execution": trainer.execution(),
            "git_commit": git_commit(),
        }
        write_json(run_dir / "record.json", record)
        ckpt.unlink(missing_ok=True)
        for leftover in run_dir.glob("images-*.pt"):
            leftover.unlink(missing_ok=True)
        return record
