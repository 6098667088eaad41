"""The run store: every number the book shows comes from a recorded run.

A run's identity is computed here, in one place, from everything that changes its result: its canonical options
(:class:`RunConfig`: every option of the recipe, the distiller and the method, defaults filled in, numbers
normalised, so each run has one spelling), a fingerprint of the data (name, split sizes, content hashes of the
training and test splits), a digest of the code that computes it (:mod:`kcdlib.provenance`) and
:data:`kcdlib.NUMERICS_VERSION`. ``runs/<identity hash>/`` holds

- ``config.json``: the identity, written when the run starts;
- ``checkpoint-e<epoch>-v<images version>-<sha256[:16]>.pt``: the state after each of the last two finished
  epochs, and ``images-v<version>-<sha256[:16]>.pt``, the run's own training images (KCD mixes into them), each
  named by the checksum of its content, so damage is detected before anything is resumed from it;
- ``model.pt``: the trained network in RepDistiller's format ``{'model': state_dict}``;
- ``record.json``: the results (strict JSON with its own checksum, written atomically, last: its presence means
  the run is finished).

A finished run is reused, never retrained. A killed run resumes from its last intact checkpoint and ends with the
same record. Every run folder is a folder of the store itself (a link is refused, nothing is written through one),
and every file read from it is checked before use: records are strict JSON of bounded size and depth with a
checksum and the fields the book reads (:data:`RECORD_FIELDS`); a damaged one is named and set aside, never a
traceback, and one bad folder never blocks the others.

A run trained by several processes (torchrun, :mod:`kcdlib.distributed`) is the same run: its process
0 decides what the store holds and alone writes, and every process resumes from the checkpoint it chose. A record
of the same options made on other data or by other code is never reused silently (see
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
import math
import os
import platform
import socket
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import NUMERICS_VERSION, __version__, distillers, files, methods, models, provenance, trainers
from . import data as datasets
from .data import fingerprints
from .errors import BadOption, CheckpointError, Diverged, KcdError, StaleRun, StoreError
from .fastpath import PRECISIONS
from .recipe import Recipe
from .train import Trainer, evaluate

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
    methods.METHODS.check(method)
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


def _number(low: float = 0.0, high: float = math.inf) -> Callable[[Any], bool]:
    return lambda v: type(v) in (int, float) and low <= v <= high


def _hex(n: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and len(v) == n and not set(v) - set("0123456789abcdef")


def _epoch_rows(rows: Any) -> bool:
    top = _number(0, 100)
    return isinstance(rows, list) and all(
        isinstance(r, dict) and type(r.get("epoch")) is int and top(r.get("top1")) and top(r.get("top5")) for r in rows
    )


# The fields of a record that the book, the CLI and the plan read, and what each must be. Records made before a
# field existed lack it: the optional ones are checked only where present.
RECORD_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "hash": (_hex(16), "16 hex digits"),
    "config": (lambda v: isinstance(v, dict), "an object"),
    "data": (fingerprints.valid_fingerprint, "a data fingerprint"),
    "final_top1": (_number(0, 100), "a percentage"),
    "best_top1": (_number(0, 100), "a percentage"),
    "final_top5": (_number(0, 100), "a percentage"),
    "computation": (_number(), "a non-negative number"),
    "points_distilled": (lambda v: type(v) is int and v >= 0, "a count"),
    "wall_seconds": (_number(), "a non-negative number"),
    "epochs": (_epoch_rows, "a list of epoch rows with top1 and top5"),
    "model_sha256": (_hex(64), "64 hex digits"),
    "finished": (lambda v: isinstance(v, str), "a date"),
}
OPTIONAL_RECORD_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "numerics": (lambda v: type(v) is int, "a whole number"),
    "code": (_hex(16), "16 hex digits"),
    "teacher_accuracy": (
        lambda v: v is None or (isinstance(v, dict) and _number(0, 100)(v.get("top1"))),
        "null or an object with top1",
    ),  # fmt: skip
    "stages": (lambda v: isinstance(v, list), "a list"),
}


def check_record(record: Any) -> dict[str, Any]:
    """``record`` if it has every field the book reads, of the right type; :class:`Damaged` names the first that
    has not. (A resealed record can still lie about its numbers: ``kcd runs verify`` re-measures them.)"""
    if not isinstance(record, dict):
        raise Damaged(f"it holds a {type(record).__name__}, not a record")
    if missing := [name for name in RECORD_FIELDS if name not in record]:
        raise Damaged(f"it has no '{missing[0]}'")
    for name, (ok, what) in (RECORD_FIELDS | OPTIONAL_RECORD_FIELDS).items():
        if name in record and not ok(record[name]):
            raise Damaged(f"its '{name}' is {json.dumps(record[name])[:40]}, not {what}")
    return record


def read_json(path: Path) -> Any:
    """A JSON file of the store, read defensively (:func:`kcdlib.files.read_json`); :class:`Damaged` says why not."""
    try:
        return files.read_json(path)
    except files.BadFile as err:
        raise Damaged(str(err)) from None
    except OSError as err:
        raise Damaged(err.strerror or str(err)) from None


def read_record(path: Path) -> dict[str, Any]:
    """A record, verified against its checksum and :data:`RECORD_FIELDS`; :class:`Damaged` says what is wrong."""
    record = read_json(path)
    if not isinstance(record, dict) or "checksum" not in record:
        raise Damaged("no checksum")
    if sealed(record)["checksum"] != record["checksum"]:
        raise Damaged("checksum mismatch: its content changed after it was written")
    return check_record(record)


@contextlib.contextmanager
def locked(folder: Path, log: Callable[[str], None]) -> Iterator[None]:
    """An exclusive lock on the run's folder itself, held while the block runs: there is no lock file that could be
    deleted under a running trainer, and the OS drops the lock when the process dies. A folder removed while we
    waited (:meth:`RunStore.tidy` removes abandoned ones) is made again and locked anew."""
    while True:
        fd = _open_folder(folder)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for {_owner(folder)}, which is training {folder} ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.stat(folder, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)


def _open_folder(folder: Path) -> int:
    """A descriptor of the run folder ``folder`` (made when missing), never of a link."""
    try:
        for attempt in range(3):
            folder.mkdir(parents=True, exist_ok=True)
            try:
                return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except FileNotFoundError:  # another process's tidy() removed it between our mkdir and open
                if attempt == 2:
                    raise
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StoreError(f"'{folder}' is a link or a file, not a run folder: refused (nothing is written "
                             "through a link; remove it)") from None  # fmt: skip
        raise store_error(folder, err) from None


def _owner(folder: Path) -> str:
    try:
        owner = read_json(folder / "owner.json")
        return f"process {int(owner['pid'])} on {str(owner['host'])[:64]} (since {str(owner['since'])[:32]})"
    except (Damaged, KeyError, TypeError, ValueError):
        return "another process"


def run_folder(root: Path, name: str) -> Path:
    """``root/name``, a run's folder, refused with one line when it is a link or not a folder: a run's files are
    written only into a folder of the store itself (a link could lead them into another run or out of the store)."""
    folder = root / name
    if folder.is_symlink():
        raise StoreError(
            f"the run folder '{folder}' is a link (to '{os.readlink(folder)}'): refused, nothing is read or written "
            "through a link; remove the link (the run is then trained or reused there)"
        )
    if folder.exists() and not folder.is_dir():
        raise StoreError(f"'{folder}' is a file where a run folder belongs: refused; remove it")
    return folder


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


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

    ``recorded_fingerprints`` (``kcd book --from-records``: runs made elsewhere, no dataset here) maps a dataset to
    the data fingerprint its runs were recorded on (:func:`kcdlib.archive.recorded_fingerprints`), used instead of
    one computed from the data, and ``recorded_code`` the code digest they were made by
    (:func:`kcdlib.archive.recorded_code`), used instead of this code's: the records are rendered as they were
    made. Such a store renders only, it trains nothing.
    """

    def __init__(
        self,
        root: str | os.PathLike = "runs",
        data_root: str = "data",
        device: str = "cpu",
        compile: str = "off",
        stale: str = "stop",
        group=None,
        recorded_fingerprints: dict[str, dict[str, Any]] | None = None,
        recorded_code: str | None = None,
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
        self.recorded_fingerprints = recorded_fingerprints
        self._fingerprints: dict[str, dict[str, Any]] = dict(recorded_fingerprints or {})
        self.code = recorded_code or provenance.code_digest()
        self._warned: set[str] = set()
        self._tidied = False
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
        """Everything that changes the run's result: its options, its data, the code that computes it."""
        return {
            "run": cfg.canonical(),
            "data": self.fingerprint(cfg.dataset),
            "numerics": NUMERICS_VERSION,
            "code": self.code,
        }

    def run_hash(self, cfg: RunConfig) -> str:
        return digest(self.identity(cfg))

    def path(self, cfg: RunConfig) -> Path:
        """The run's folder: a folder of the store itself, never a link (refused with one line naming it)."""
        return run_folder(self.root, self.run_hash(cfg))

    def model_path(self, cfg: RunConfig) -> Path:
        return self.path(cfg) / "model.pt"

    # -- reading ---------------------------------------------------------------------------------------------
    def record(self, cfg: RunConfig) -> dict[str, Any] | None:
        """The finished run's record, or None (also when the record is damaged: it is then trained again)."""
        path = self.path(cfg) / "record.json"
        if not os.path.lexists(path):
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
            if folder.is_symlink() or not folder.is_dir():
                continue  # not a run folder of this store: never read through
            try:
                config = read_json(folder / "config.json")
            except Damaged:
                continue
            if not isinstance(config, dict) or config.get("options_hash") != cfg.options_hash:
                continue
            if folder.name == own or not (folder / "record.json").exists():
                continue
            try:
                record = read_record(folder / "record.json")
            except Damaged:
                continue
            if not isinstance(config.get("identity"), dict):
                continue
            found.append((folder, record, _difference(config["identity"], here)))
        return found

    # -- training --------------------------------------------------------------------------------------------
    def ensure(self, cfg: RunConfig, progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
        """The record of ``cfg``: reused when finished, else trained (resuming its last intact checkpoint).

        ``log`` gets one-line notices (reused, waiting for another process); warnings report damage."""
        log = log if log is not None and self.writer else (lambda message: None)
        datasets.check_decode(cfg.dataset, cfg.decode, self.device)  # before the data is read or fingerprinted
        self._check_root()
        if self.writer and not self._tidied:
            self._tidied = True
            self.tidy()
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
            when = rec.get("finished", "earlier")
            log(f"reused {folder / 'record.json'} (trained {when}) although it was {why} (--keep-stale)")
            return rec
        if self.recorded_fingerprints is not None:
            raise StoreError(f"run {self.run_hash(cfg)} is not in the store, and a store rendering from records "
                             "trains nothing: import it (kcd runs import) or build without --from-records")  # fmt: skip
        # Refuse options that do not fit the data before training anything.
        trainers.method_for(cfg, self.dataset(cfg.dataset, cfg.decode), self.device, fs_over_ft=1.0)
        if cfg.teacher is not None:
            self.ensure(cfg.teacher, progress, log)
            self._check_teacher_model(cfg.teacher, progress, log)
        run_dir = self.path(cfg)
        with locked(run_dir, log) if self.writer else contextlib.nullcontext():
            # Another process may have finished it while we waited for the lock.
            if (rec := self._decide(lambda: self.record(cfg))) is not None:
                return rec
            return self._train(cfg, run_dir, progress)

    def tidy(self) -> None:
        """What killed or refused runs left, in the folders no process is training (their lock is free): the
        trainer's half-written temporary files, and folders that hold nothing but a run's first notes
        (:func:`_remove_if_abandoned`). Done at the first run a store is asked for."""
        for folder in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if folder.is_symlink() or not folder.is_dir():
                continue
            try:
                fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # being trained
            try:
                for leftover in _temporary_files(folder):
                    leftover.unlink(missing_ok=True)
                _remove_if_abandoned(folder)
            finally:
                os.close(fd)

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
        """The frozen teacher of a distillation run: its teacher run's model, or the checkpoint file it names,
        which must still be the file whose content the run's identity holds."""
        source = str(self.model_path(cfg.teacher)) if cfg.teacher else cfg.teacher_checkpoint
        if cfg.teacher is None and file_sha256(source) != cfg.teacher_sha256:
            raise CheckpointError(f"the teacher checkpoint '{source}' changed since this run was configured")
        num_classes = self.dataset(cfg.dataset, cfg.decode).num_classes
        return trainers.load_teacher(cfg.teacher_arch, source, num_classes, self.device)

    def build_trainer(self, cfg: RunConfig, progress: bool = True, alone: bool = False) -> Trainer:
        """The trainer of ``cfg`` (:func:`kcdlib.trainers.build_trainer`): this process's part of the run under a
        group, unless ``alone`` (a trainer of this process only, to try a checkpoint on while the others wait)."""
        teacher = functools.partial(self.load_teacher, cfg) if cfg.kind == "distill" else None
        group = None if alone else self.group
        data = self.dataset(cfg.dataset, cfg.decode)
        return trainers.build_trainer(cfg, data, self.device, teacher, self.compile, group, progress and self.writer)

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
            if os.path.lexists(run_dir / "record.json"):  # here only when damaged: keep it for a look, out of the way
                os.replace(run_dir / "record.json", run_dir / "record.json.damaged")
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
            write_json(run_dir / "owner.json", owner)  # who holds the lock, for a process that waits on it
            config = {"hash": run_hash, "options_hash": cfg.options_hash, "identity": identity}
            write_json(run_dir / "config.json", config)
        try:
            trainer = self._resume(cfg, run_dir, progress)
            teacher = self._teacher_quality(trainer, cfg)
            trainer.run(on_epoch_end=lambda t: (files.failpoint("epoch"), self._save(t, run_dir), self._epoch_done(t)))
        except Diverged:
            if self.writer:  # it would diverge again from any of its checkpoints: nothing of it is worth keeping
                _sweep(run_dir)
                _remove_if_abandoned(run_dir)
            raise
        except KcdError:
            if self.writer:  # refused before its first epoch (a teacher's file, the data): nothing to resume from
                _remove_if_abandoned(run_dir)
            raise
        model = tensor_bytes({"model": trainer.student.state_dict()})
        if self.writer:
            atomic_write(run_dir / "model.pt", model)
        record = {
            "hash": run_hash,
            "config": cfg.canonical(),
            "data": identity["data"],
            "numerics": NUMERICS_VERSION,
            "code": identity["code"],
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
            "git_commit": provenance.checkout()["commit"],
            # The package's tracked files that differed from that commit: a run made from a modified tree says so.
            "git_modified": provenance.checkout()["modified"],
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


def _temporary_files(run_dir: Path) -> list[Path]:
    """The trainer's half-written files in ``run_dir`` (not other temporary files: a reader may be writing a cache
    beside a finished run)."""
    return [p for name in TRAINER_WRITES for p in run_dir.glob(f".{name}*.tmp")]


def _sweep(run_dir: Path) -> None:
    """Remove what only an unfinished run needs: checkpoints, image snapshots, the trainer's half-written temporary
    files and the owner note."""
    for pattern in ("checkpoint-*.pt", "images-*.pt", "owner.json"):
        for leftover in run_dir.glob(pattern):
            leftover.unlink(missing_ok=True)
    for leftover in _temporary_files(run_dir):
        leftover.unlink(missing_ok=True)


# What a run folder holds before its first epoch: a folder with nothing else was abandoned by a refused or
# diverged run (or a killed one that had not finished an epoch) and is removed.
STARTING_FILES = {"config.json", "owner.json"}


def _remove_if_abandoned(run_dir: Path) -> bool:
    """Remove ``run_dir`` if it holds only :data:`STARTING_FILES` (and temporary files); whether it did."""
    try:
        names = {p.name for p in run_dir.iterdir()}
    except OSError:
        return False
    if {n for n in names if not n.endswith(".tmp")} - STARTING_FILES:
        return False
    for name in names:
        (run_dir / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        run_dir.rmdir()
    return True


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
