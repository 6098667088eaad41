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
import functools
import hashlib
import os
import socket
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import data as datasets
from . import files, provenance, trainers
from .errors import BadOption, CheckpointError, Diverged, KcdError, StaleRun, StoreError
from .folders import check_root, locked, remove_if_abandoned, run_folder, sweep, tidy, version_of
from .identity import RunConfig, checkpoint_sha256, difference, identity, identity_digest
from .records import (
    Damaged,
    atomic_write,
    new_record,
    now,
    read_json,
    read_record,
    sha16,
    tensor_bytes,
    verified_tensors,
    write_json,
)
from .train import Trainer, evaluate

# What a store does with a finished record of the same options but other data or numerics.
STALE_POLICIES = ("stop", "rerun", "keep")


class StoreWarning(UserWarning):
    """Something in the store was damaged and set aside; the run goes on from what is intact."""


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
        """Everything that changes the run's result (:func:`kcdlib.identity.identity`), with this store's data."""
        return identity(cfg, self.fingerprint(cfg.dataset), self.code)

    def run_hash(self, cfg: RunConfig) -> str:
        return identity_digest(self.identity(cfg))

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
        own = identity_digest(here)
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
            found.append((folder, record, difference(config["identity"], here)))
        return found

    # -- training --------------------------------------------------------------------------------------------
    def ensure(self, cfg: RunConfig, progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Any]:
        """The record of ``cfg``: reused when finished, else trained (resuming its last intact checkpoint).

        ``log`` gets one-line notices (reused, waiting for another process); warnings report damage."""
        log = log if log is not None and self.writer else (lambda message: None)
        datasets.check_decode(cfg.dataset, cfg.decode, self.device)  # before the data is read or fingerprinted
        check_root(self.root)
        if self.writer and not self._tidied:
            self._tidied = True
            self.tidy()
        self.fingerprint(cfg.dataset)  # agreed on by every process of a group before any decision needs it
        if (rec := self._decide(lambda: self.record(cfg))) is not None:
            if self.writer:
                sweep(self.path(cfg))  # what a process killed right after writing the record left behind
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
        """What killed or refused runs left in the folders no process is training (:func:`kcdlib.folders.tidy`).
        Done at the first run a store is asked for."""
        tidy(self.root)

    def _check_teacher_model(self, teacher: RunConfig, progress: bool, log) -> None:
        """A teacher run's ``model.pt`` must be the one its record names: if it is gone or changed, the teacher
        is trained again (its record is set aside)."""
        path = self.model_path(teacher)

        def intact() -> bool:
            record = self.record(teacher)
            return record is not None and path.exists() and checkpoint_sha256(path) == record.get("model_sha256")

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
        if cfg.teacher is None and checkpoint_sha256(source) != cfg.teacher_sha256:
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
        here = self.identity(cfg)
        if self.writer:
            for leftover in run_dir.glob(".*.tmp"):  # writes a killed process left half done
                leftover.unlink(missing_ok=True)
            if os.path.lexists(run_dir / "record.json"):  # here only when damaged: keep it for a look, out of the way
                os.replace(run_dir / "record.json", run_dir / "record.json.damaged")
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": now()}
            write_json(run_dir / "owner.json", owner)  # who holds the lock, for a process that waits on it
            config = {"hash": run_hash, "options_hash": cfg.options_hash, "identity": here}
            write_json(run_dir / "config.json", config)
        try:
            trainer = self._resume(cfg, run_dir, progress)
            teacher = self._teacher_quality(trainer, cfg)
            trainer.run(on_epoch_end=lambda t: (files.failpoint("epoch"), self._save(t, run_dir), self._epoch_done(t)))
        except Diverged:
            if self.writer:  # it would diverge again from any of its checkpoints: nothing of it is worth keeping
                sweep(run_dir)
                remove_if_abandoned(run_dir)
            raise
        except KcdError:
            if self.writer:  # refused before its first epoch (a teacher's file, the data): nothing to resume from
                remove_if_abandoned(run_dir)
            raise
        model = tensor_bytes({"model": trainer.student.state_dict()})
        if self.writer:
            atomic_write(run_dir / "model.pt", model)
        record = new_record(run_hash, here, trainer, teacher, hashlib.sha256(model).hexdigest(), self.device)
        if self.writer:
            write_json(run_dir / "record.json", record)
            sweep(run_dir)
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
        versions = {version_of(p) for p in kept[: self.KEEP_CHECKPOINTS]}
        for old in run_dir.glob("images-v*.pt"):
            if version_of(old) not in versions:
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
        state = verified_tensors(path, self.device)
        if not isinstance(state, dict) or state.get("run") != run_dir.name:
            raise Damaged("it belongs to another run")
        if state.get("images_file"):
            images = run_dir / state["images_file"]
            try:
                state["images"] = verified_tensors(images, self.device)
            except Damaged:
                images.unlink(missing_ok=True)
                raise
            self._images_files.setdefault(run_dir, {})[int(version_of(images)[1:])] = images.name
        return state
