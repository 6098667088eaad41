"""The run store: every number the book shows comes from a recorded run.

A run's identity is computed here, in one place, from everything that changes its result: its canonical options
(:class:`RunConfig`: every option of the recipe, the distiller and the method, defaults filled in, numbers
normalised, so each run has one spelling), a fingerprint of the data (name, split sizes, a content hash of the
training split) and :data:`kcdlib.NUMERICS_VERSION`. ``runs/<identity hash>/`` holds

- ``config.json``: the identity, written when the run starts;
- ``checkpoint-e<epoch>-v<images version>-<sha256[:16]>.pt``: the state after each of the last two finished
  epochs, and ``images-v<version>-<sha256[:16]>.pt``, the run's own training images (KCD mixes into them), each
  named by the checksum of its content, so damage is detected before anything is resumed from it;
- ``model.pt``: the trained network in RepDistiller's format ``{'model': state_dict}``;
- ``record.json``: the results (strict JSON with its own checksum, written atomically, last: its presence means
  the run is finished).

A finished run is reused, never retrained. A killed run resumes from its last intact checkpoint and ends with the
same record. A run trained by several processes (torchrun, :mod:`kcdlib.distributed`) is the same run: its process
0 decides what the store holds and alone writes, and every process resumes from the checkpoint it chose. A record
of the same options made on other data or by other numerics is never reused silently (see
:class:`RunStore`). Two processes asking for the same run take turns on a lock held on the run's folder. Nothing
read from the store runs code: tensors are loaded with ``weights_only=True``, everything else is JSON.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import functools
import hashlib
import io
import json
import os
import platform
import socket
import subprocess
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import NUMERICS_VERSION, __version__, cost, distillers, files, methods, models
from . import data as datasets
from .errors import BadOption, CheckpointError, Diverged, StaleRun, StoreError
from .fastpath import PRECISIONS
from .options import check_name
from .recipe import Recipe
from .train import Trainer, evaluate, first_nonfinite

# Seeds feed torch.manual_seed and the epoch generators: 31 bits keep every derived seed in range.
MAX_SEED = 2**31 - 1
# What a store does with a finished record of the same options but other data or numerics.
STALE_POLICIES = ("stop", "rerun", "keep")


class StoreWarning(UserWarning):
    """Something in the store was damaged and set aside; the run goes on from what is intact."""


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
        check_name("dataset", self.dataset, datasets.DATASETS)
        check_name("architecture", self.arch, models.ARCHS)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise BadOption(f"the seed must be a whole number in [0, {MAX_SEED}], got {self.seed!r}")
        if self.precision not in PRECISIONS:
            raise BadOption(f"unknown precision '{self.precision}': one of {', '.join(PRECISIONS)}")
        datasets.check_decode(self.dataset, self.decode)
        if self.kind == "distill":
            if self.teacher_arch is None or (self.teacher is None) == (self.teacher_sha256 is None):
                raise BadOption("a distillation run needs one teacher: a teacher run or a checkpoint's sha256")
            check_name("architecture", self.teacher_arch, models.ARCHS)
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
        return digest(self.canonical())


def digest(obj: Any) -> str:
    """16 hex digits of the SHA-256 of ``obj`` as canonical JSON."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:16]


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


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
        sha = file_sha256(teacher_checkpoint)
    else:
        if teacher_arch is not None and teacher_arch != teacher.arch:
            raise BadOption(f"teacher_arch '{teacher_arch}' contradicts the teacher run's '{teacher.arch}'")
        teacher_arch = teacher.arch
    check_name("method", method, methods.METHODS)
    # A method whose loss is not plain KD (UNIX: KD alone) brings its own distiller.
    method_loss = methods.METHODS[method].loss
    if method_loss is not None and distiller == "kd":
        distiller = method_loss
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


def file_sha256(path: str | os.PathLike) -> str:
    try:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    except OSError as err:
        raise CheckpointError(f"cannot read the teacher checkpoint '{path}': {err.strerror}") from err


# -- files -----------------------------------------------------------------------------------------------------
def store_error(path: Path, err: OSError) -> StoreError:
    """One clear line for what the environment refused."""
    hints = {
        errno.ENOSPC: "the disk is full: free some space and run the same command again (the run resumes)",
        errno.EDQUOT: "the disk quota is used up: free some space and run the same command again",
        errno.EROFS: "the file system is read-only: choose another runs folder (--runs-dir)",
        errno.EACCES: "permission denied: choose a runs folder you can write to (--runs-dir)",
        errno.EPERM: "permission denied: choose a runs folder you can write to (--runs-dir)",
        errno.ENOTDIR: "a part of that path is a file, not a folder: choose another runs folder (--runs-dir)",
        errno.EEXIST: "a file stands where a folder should be: choose another runs folder (--runs-dir)",
    }
    hint = hints.get(err.errno, err.strerror or str(err))
    return StoreError(f"cannot write '{path}': {hint}")


def atomic_write(path: Path, data: bytes) -> None:
    """:func:`kcdlib.files.atomic_write`, with what the environment refused as one clear line."""
    try:
        files.atomic_write(path, data)
    except OSError as err:
        raise store_error(path, err) from None


def tensor_bytes(obj: Any) -> bytes:
    """``torch.save`` into memory: the disk write is then ours, with ours errors, and the checksum is free."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load_tensors(data: bytes, device: torch.device | str = "cpu") -> Any:
    """Tensors, numbers, strings, lists and dicts only: a planted pickle is refused, never run."""
    return torch.load(io.BytesIO(data), map_location=device, weights_only=True)


def sha16(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON (a NaN is an error, never a bare ``NaN``), written atomically."""
    try:
        text = json.dumps(obj, indent=1, allow_nan=False)
    except ValueError as err:
        raise Diverged(f"refusing to write {path}: it would hold a non-finite number ({err})") from None
    atomic_write(path, (text + "\n").encode())


def sealed(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with its checksum: the SHA-256 of the rest as canonical JSON."""
    rest = {k: v for k, v in record.items() if k != "checksum"}
    return {**rest, "checksum": hashlib.sha256(canonical_json(rest).encode()).hexdigest()}


class Damaged(Exception):
    """A store file that cannot be trusted (internal: the store sets it aside and goes on)."""


def read_record(path: Path) -> dict[str, Any]:
    """A record, verified against its checksum; :class:`Damaged` says what is wrong."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise Damaged("not text") from None
    except OSError as err:
        raise Damaged(err.strerror or str(err)) from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise Damaged(f"not JSON ({'empty' if not text.strip() else err.msg})") from None
    if not isinstance(record, dict) or "checksum" not in record:
        raise Damaged("no checksum")
    if sealed(record)["checksum"] != record["checksum"]:
        raise Damaged("checksum mismatch: its content changed after it was written")
    return record


@contextlib.contextmanager
def locked(folder: Path, log: Callable[[str], None]) -> Iterator[None]:
    """An exclusive lock on the run's folder itself, held while the block runs: there is no lock file that could be
    deleted under a running trainer, and the OS drops the lock when the process dies."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as err:
        raise store_error(folder, err) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for {_owner(folder)}, which is training {folder} ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _owner(folder: Path) -> str:
    try:
        owner = json.loads((folder / "owner.json").read_text())
        return f"process {owner['pid']} on {owner['host']} (since {owner['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@functools.cache
def git_commit() -> str | None:
    """The checkout's commit when this process first asked (the code it loaded), or None outside a checkout."""
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
    """Runs under ``root``, one folder per run identity.

    ``stale`` says what to do when a run is missing but the store holds a finished record of the same options
    made on other data or by other numerics: ``stop`` (default) raises :class:`StaleRun` naming it and why,
    ``rerun`` trains the run anew (the old folder stays), ``keep`` reuses the old record as it is.
    """

    def __init__(
        self,
        root: str | os.PathLike = "runs",
        data_root: str = "data",
        device: str = "cpu",
        compile: str = "off",
        stale: str = "stop",
        group=None,
    ):
        if stale not in STALE_POLICIES:
            raise BadOption(f"unknown stale policy '{stale}': one of {', '.join(STALE_POLICIES)}")
        self.compile = compile  # how the networks run (torch.compile mode): speed only, not the run's identity
        self.root = Path(root)
        self.data_root = data_root
        self.device = torch.device(device)
        self.stale = stale
        # kcdlib.distributed.Group when one run trains on several processes: process 0 decides and writes.
        self.group = group
        self.writer = group is None or group.is_writer
        self._deciding = False
        self._datasets: dict[tuple[str, str], Any] = {}
        self._fingerprints: dict[str, dict[str, Any]] = {}
        self._warned: set[str] = set()
        # Per run folder being trained: images version -> the file this process wrote or verified for it.
        self._images_files: dict[Path, dict[int, str]] = {}
        # Called with (epoch, epochs) after each epoch a run trains here: a notebook's one-line progress.
        self.on_epoch: Callable[[int, int], None] | None = None

    # -- identity --------------------------------------------------------------------------------------------
    def fingerprint(self, dataset: str) -> dict[str, Any]:
        """The data under this store's data root: name, split sizes, content hash of the training split."""
        if dataset not in self._fingerprints:
            self._fingerprints[dataset] = self._decide(lambda: datasets.fingerprint(dataset, self.data_root))
        return self._fingerprints[dataset]

    def identity(self, cfg: RunConfig) -> dict[str, Any]:
        """Everything that changes the run's result: its options, its data, the numerics of this code."""
        return {"run": cfg.canonical(), "data": self.fingerprint(cfg.dataset), "numerics": NUMERICS_VERSION}

    def run_hash(self, cfg: RunConfig) -> str:
        return digest(self.identity(cfg))

    def path(self, cfg: RunConfig) -> Path:
        return self.root / self.run_hash(cfg)

    def model_path(self, cfg: RunConfig) -> Path:
        return self.path(cfg) / "model.pt"

    # -- reading ---------------------------------------------------------------------------------------------
    def record(self, cfg: RunConfig) -> dict[str, Any] | None:
        """The finished run's record, or None (also when the record is damaged: it is then trained again)."""
        path = self.path(cfg) / "record.json"
        if not path.exists():
            return None
        try:
            record = read_record(path)
        except Damaged as err:
            self._warn(f"{path} is damaged ({err}): the run will be trained again")
            return None
        if record.get("hash") != path.parent.name:
            self._warn(f"{path} belongs to run {record.get('hash')}, not {path.parent.name}: the run will be "
                       "trained again")  # fmt: skip
            return None
        return record

    def dataset(self, name: str, decode: str = "pil"):
        if (name, decode) not in self._datasets:
            self._datasets[name, decode] = datasets.load_dataset(name, self.data_root, self.device, decode)
        return self._datasets[name, decode]

    def _decide(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, or under a group process 0's ``fn()`` (it alone reads and repairs the store), on every process.

        A decision inside a decision is part of it: process 0 makes it alone."""
        if self.group is None or self._deciding:
            return fn()
        self._deciding = True
        try:
            return self.group.decide(fn)
        finally:
            self._deciding = False

    def _warn(self, message: str) -> None:
        if self.writer and message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, StoreWarning, stacklevel=3)

    # -- stale records ---------------------------------------------------------------------------------------
    def stale_records(self, cfg: RunConfig) -> list[tuple[Path, dict[str, Any], str]]:
        """Finished runs of the same options under another identity: ``(folder, record, why)``."""
        if not self.root.is_dir():
            return []
        here = self.identity(cfg)
        own = digest(here)
        found = []
        for folder in sorted(self.root.iterdir()):
            try:
                config = json.loads((folder / "config.json").read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(config, dict) or config.get("options_hash") != cfg.options_hash:
                continue
            if folder.name == own or not (folder / "record.json").exists():
                continue
            try:
                record = read_record(folder / "record.json")
            except Damaged:
                continue
            found.append((folder, record, _difference(config.get("identity", {}), here)))
        return found

    # -- training --------------------------------------------------------------------------------------------
    def ensure(self, cfg: RunConfig, progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
        """The record of ``cfg``: reused when finished, else trained (resuming its last intact checkpoint).

        ``log`` gets one-line notices (reused, waiting for another process); warnings report damage."""
        log = log if log is not None and self.writer else (lambda message: None)
        datasets.check_decode(cfg.dataset, cfg.decode, self.device)  # before the data is read or fingerprinted
        self._check_root()
        self.fingerprint(cfg.dataset)  # agreed on by every process of a group before any decision needs it
        if (rec := self._decide(lambda: self.record(cfg))) is not None:
            if self.writer:
                _sweep(self.path(cfg))  # what a process killed right after writing the record left behind
            log(f"reused {self.path(cfg)} (trained {rec.get('finished', 'earlier')})")
            return rec
        # --rerun trains whatever the store holds: no need to look for stale records.
        stale = [] if self.stale == "rerun" else self._decide(lambda: self.stale_records(cfg))
        if stale and self.stale == "stop":
            lines = [f"{folder} (trained {rec.get('finished', 'earlier')}) {why}" for folder, rec, why in stale]
            raise StaleRun(
                "the store holds this run's options, but not this run: " + "; ".join(lines) + ". It is not reused."
                " Train the run anew with --rerun (the old folder stays as it is), or reuse the old record as it"
                " is with --keep-stale."
            )
        if stale and self.stale == "keep":
            folder, rec, why = stale[-1]
            log(
                f"reused {folder / 'record.json'} (trained {rec.get('finished', 'earlier')}) although it was {why} "
                "(--keep-stale)"
            )
            return rec
        self.method_for(cfg, fs_over_ft=1.0)  # refuse options that do not fit the data before training anything
        if cfg.teacher is not None:
            self.ensure(cfg.teacher, progress, log)
            self._check_teacher_model(cfg.teacher, progress, log)
        run_dir = self.path(cfg)
        with locked(run_dir, log) if self.writer else contextlib.nullcontext():
            # Another process may have finished it while we waited for the lock.
            if (rec := self._decide(lambda: self.record(cfg))) is not None:
                return rec
            return self._train(cfg, run_dir, progress)

    def _check_root(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"the runs folder '{self.root}' is a file, not a folder: choose another (--runs-dir)")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise store_error(self.root, err) from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(f"cannot write to the runs folder '{self.root}': choose another (--runs-dir)")

    def _check_teacher_model(self, teacher: RunConfig, progress: bool, log) -> None:
        """A teacher run's ``model.pt`` must be the one its record names: if it is gone or changed, the teacher
        is trained again (its record is set aside)."""
        path = self.model_path(teacher)

        def intact() -> bool:
            record = self.record(teacher)
            return record is not None and path.exists() and file_sha256(path) == record.get("model_sha256")

        if self._decide(intact):
            return
        why = "missing" if not path.exists() else "not the file its record names (checksum mismatch)"
        self._warn(f"the teacher's weights {path} are {why}: the teacher is trained again")
        if self.writer:
            with locked(path.parent, log):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(path.parent / "record.json", path.parent / "record.json.damaged")
        self.ensure(teacher, progress, log)

    def load_teacher(self, cfg: RunConfig) -> torch.nn.Module:
        """The frozen teacher of a distillation run, on the store's device, in eval mode, checked to be finite."""
        source = str(self.model_path(cfg.teacher)) if cfg.teacher else cfg.teacher_checkpoint
        if cfg.teacher is None and file_sha256(source) != cfg.teacher_sha256:
            raise CheckpointError(f"the teacher checkpoint '{source}' changed since this run was configured")
        num_classes = self.dataset(cfg.dataset, cfg.decode).num_classes
        teacher = models.load_checkpoint(cfg.teacher_arch, source, num_classes=num_classes).to(self.device).eval()
        if (bad := first_nonfinite(teacher.state_dict())) is not None:
            raise CheckpointError(f"the teacher checkpoint '{source}' holds non-finite weights (in '{bad}')")
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def build_trainer(self, cfg: RunConfig, progress: bool = True, alone: bool = False) -> Trainer:
        """The trainer of ``cfg``: this process's part of the run under a group, unless ``alone`` (a trainer of
        this process only, to try a checkpoint on while the others wait)."""
        group = None if alone else self.group
        data = self.dataset(cfg.dataset, cfg.decode)
        torch.manual_seed(cfg.seed)
        student = models.create(cfg.arch, num_classes=data.num_classes).to(self.device)
        teacher = self.load_teacher(cfg) if cfg.kind == "distill" else None
        context = distillers.DistillContext(
            num_points=data.num_train,
            num_classes=data.num_classes,
            student_dim=models.penultimate_dim(student),
            teacher_dim=models.penultimate_dim(teacher) if teacher is not None else 0,
            labels=data.train_labels,
            options=dict(cfg.distiller_options),
        )
        distiller = distillers.build(cfg.distiller, context).to(self.device)
        fs_over_ft = 1.0
        if teacher is not None:
            size = (3, data.image_size, data.image_size)
            fs_over_ft = cost.forward_macs(student, size) / cost.forward_macs(teacher, size)
        method = self.method_for(cfg, fs_over_ft, group)
        return Trainer(
            student, data, cfg.recipe, distiller, teacher, method, seed=cfg.seed, progress=progress and self.writer,
            precision=cfg.precision, compile=self.compile, group=group,
        )  # fmt: skip

    def method_for(self, cfg: RunConfig, fs_over_ft: float, group=None):
        data = self.dataset(cfg.dataset, cfg.decode)
        context = methods.MethodContext(
            num_points=data.num_train,
            epochs=cfg.recipe.epochs,
            seed=cfg.seed,
            options=dict(cfg.method_options),
            batch_size=cfg.recipe.batch_size,
            device=str(self.device),
            fs_over_ft=fs_over_ft,
            images_in_memory=hasattr(data, "train_images"),
            group=group,
        )
        return methods.build(cfg.method, context)

    def _teacher_quality(self, trainer: Trainer, cfg: RunConfig) -> dict[str, Any] | None:
        """The teacher's test accuracy, measured here; a teacher near chance is most likely the wrong file."""
        if trainer.teacher is None:
            return None
        top1, top5 = evaluate(trainer.teacher, trainer.data, precision=cfg.precision, group=self.group)
        chance = 100.0 / trainer.data.num_classes
        source = cfg.teacher_checkpoint or f"run {self.run_hash(cfg.teacher)}"
        if top1 < 2 * chance:
            self._warn(f"the teacher ({source}) scores {top1:.2f} % top-1 on {cfg.dataset}'s test split (chance: "
                       f"{chance:.2f} %): is it the right file?")  # fmt: skip
        return {"top1": top1, "top5": top5, "source": source}

    def _train(self, cfg: RunConfig, run_dir: Path, progress: bool) -> dict[str, Any]:
        run_hash = run_dir.name
        self._images_files[run_dir] = {}
        identity = self.identity(cfg)
        if self.writer:
            for leftover in run_dir.glob(".*.tmp"):  # writes a killed process left half done
                leftover.unlink(missing_ok=True)
            if (run_dir / "record.json").exists():  # here only when damaged: keep it for a look, out of the way
                os.replace(run_dir / "record.json", run_dir / "record.json.damaged")
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
            write_json(run_dir / "owner.json", owner)  # who holds the lock, for a process that waits on it
            config = {"hash": run_hash, "options_hash": cfg.options_hash, "identity": identity}
            write_json(run_dir / "config.json", config)
        trainer = self._resume(cfg, run_dir, progress)
        teacher = self._teacher_quality(trainer, cfg)
        trainer.run(on_epoch_end=lambda t: (files.failpoint("epoch"), self._save(t, run_dir), self._epoch_done(t)))
        model = tensor_bytes({"model": trainer.student.state_dict()})
        if self.writer:
            atomic_write(run_dir / "model.pt", model)
        record = {
            "hash": run_hash,
            "config": cfg.canonical(),
            "data": identity["data"],
            "numerics": NUMERICS_VERSION,
            **trainer.results(),
            "teacher_accuracy": teacher,
            "model_sha256": hashlib.sha256(model).hexdigest(),
            "finished": _now(),
            "versions": {
                "kcdlib": __version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "device": device_name(self.device),
            "execution": trainer.execution(),
            "git_commit": git_commit(),
        }
        record = sealed(record)
        if self.writer:
            write_json(run_dir / "record.json", record)
            _sweep(run_dir)
        # Every process returns the record process 0 wrote (its times, its device), once it is written.
        return record if self.group is None else self.group.share(record)

    def _epoch_done(self, trainer: Trainer) -> None:
        if self.on_epoch is not None:
            self.on_epoch(trainer.epoch, trainer.recipe.epochs)

    # -- checkpoints -----------------------------------------------------------------------------------------
    # A checkpoint's name carries its epoch, the version of the images it needs and the checksum of its content.
    KEEP_CHECKPOINTS = 2  # the last and the one before: a damaged last one still leaves an intact point

    def _save(self, trainer: Trainer, run_dir: Path) -> None:
        if not self.writer:  # every process holds the same state: process 0's is written
            return
        state = trainer.state_dict()
        images = state.pop("images")
        version = trainer.method.images_version
        state["run"] = run_dir.name
        if images is not None:
            # The run's own images change only at condensations: each version is stored once, beside the
            # checkpoints, instead of in every epoch's checkpoint. Only a file this process wrote or verified is
            # referenced again: one left by another process may hold other pixels.
            known = self._images_files.setdefault(run_dir, {})
            if version not in known or not (run_dir / known[version]).exists():
                data = tensor_bytes(images.cpu())
                known[version] = f"images-v{version}-{sha16(data)}.pt"
                atomic_write(run_dir / known[version], data)
            state["images_file"] = known[version]
        data = tensor_bytes(state)
        atomic_write(run_dir / f"checkpoint-e{trainer.epoch:06d}-v{version}-{sha16(data)}.pt", data)
        kept = sorted(run_dir.glob("checkpoint-e*.pt"), reverse=True)
        for old in kept[self.KEEP_CHECKPOINTS :]:
            old.unlink(missing_ok=True)
        versions = {_version_of(p) for p in kept[: self.KEEP_CHECKPOINTS]}
        for old in run_dir.glob("images-v*.pt"):
            if _version_of(old) not in versions:
                old.unlink(missing_ok=True)

    def _resume(self, cfg: RunConfig, run_dir: Path, progress: bool) -> Trainer:
        """A trainer at the last intact checkpoint (damaged ones are named, removed, and the one before tried).

        Under a group, process 0 chooses (and repairs) as one process does; the others then load its choice."""
        if self.group is not None:
            chosen = self.group.decide(lambda: self._last_intact(cfg, run_dir, progress)[1])
            trainer = self.build_trainer(cfg, progress)
            if chosen is not None:
                trainer.load_state_dict(self._read_checkpoint(run_dir / chosen, run_dir))
            return trainer
        trainer, _ = self._last_intact(cfg, run_dir, progress)
        return trainer or self.build_trainer(cfg, progress)

    def _last_intact(self, cfg: RunConfig, run_dir: Path, progress: bool) -> tuple[Trainer | None, str | None]:
        """The trainer loaded from the last checkpoint that loads, and its name (``None, None`` when none does);
        under a group, a trainer of this process alone."""
        candidates = sorted(run_dir.glob("checkpoint-e*.pt"), reverse=True)
        trainer = None
        for path in candidates:
            try:
                state = self._read_checkpoint(path, run_dir)
                trainer = trainer or self.build_trainer(cfg, progress, alone=self.group is not None)
                trainer.load_state_dict(state)
                return trainer, path.name
            except Damaged as err:
                self._warn(f"{path} is damaged ({err}): removed, trying the checkpoint before it")
            except (KeyError, RuntimeError, ValueError, TypeError) as err:
                self._warn(f"{path} does not fit this run ({type(err).__name__}: {str(err)[:200]}): removed")
            path.unlink(missing_ok=True)
            trainer = None  # a half-loaded trainer is not to be trusted
        if candidates:
            self._warn(f"no intact checkpoint left in {run_dir}: the run starts again from its first epoch")
        return None, None

    def _read_checkpoint(self, path: Path, run_dir: Path) -> dict[str, Any]:
        state = _verified_tensors(path, self.device)
        if not isinstance(state, dict) or state.get("run") != run_dir.name:
            raise Damaged("it belongs to another run")
        if state.get("images_file"):
            images = run_dir / state["images_file"]
            try:
                state["images"] = _verified_tensors(images, self.device)
            except Damaged:
                images.unlink(missing_ok=True)
                raise
            self._images_files.setdefault(run_dir, {})[int(_version_of(images)[1:])] = images.name
        return state


def _version_of(path: Path) -> str:
    return next((part for part in path.stem.split("-") if part.startswith("v")), "")


# The files a trainer writes (through temporary files named ".<name>.<pid>.tmp").
TRAINER_WRITES = ("checkpoint-", "images-", "model.pt", "record.json", "config.json", "owner.json")


def _sweep(run_dir: Path) -> None:
    """Remove what only an unfinished run needs: checkpoints, image snapshots, their half-written temporary files
    and the owner note (not other temporary files: a reader may be writing a cache beside a finished run)."""
    trainer_files = ("checkpoint-*.pt", "images-*.pt", "owner.json", *(f".{name}*.tmp" for name in TRAINER_WRITES))
    for pattern in trainer_files:
        for leftover in run_dir.glob(pattern):
            leftover.unlink(missing_ok=True)


def _verified_tensors(path: Path, device: torch.device) -> Any:
    """The tensors of a store file whose name ends in the first 16 hex digits of its content's SHA-256."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise Damaged(f"{path.name}: {err.strerror}") from None
    if sha16(data) != path.stem.rsplit("-", 1)[-1]:
        raise Damaged(f"{path.name}: checksum mismatch")
    try:
        return load_tensors(data, device)
    except Exception as err:  # noqa: BLE001 - any failure to unpickle means the file cannot be used
        raise Damaged(f"{path.name}: unreadable ({type(err).__name__})") from None


def _difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Why a record of the same options is not this run, in words."""
    reasons = []
    if old.get("numerics") != new["numerics"]:
        reasons.append(f"made by numerics version {old.get('numerics')} (this code: {new['numerics']})")
    a, b = old.get("data") or {}, new["data"]
    if a != b:
        if (a.get("num_train"), a.get("num_test")) != (b["num_train"], b["num_test"]):
            reasons.append(f"made on other data ({a.get('num_train')}/{a.get('num_test')} train/test images, "
                           f"now {b['num_train']}/{b['num_test']})")  # fmt: skip
        else:
            reasons.append(f"made on other data (training split {str(a.get('train_sha256'))[:12]}, now "
                           f"{b['train_sha256'][:12]})")  # fmt: skip
    return " and ".join(reasons) or "made under another identity"
