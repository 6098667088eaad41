"""What the run store writes and reads back: strict JSON records sealed with their checksum and checked against the
fields the book reads (:data:`RECORD_FIELDS`), and tensor files named by the checksum of their content. Nothing read
runs code: tensors load with ``weights_only=True``; anything that fails a check raises :class:`Damaged`, which the
store turns into a warning and a retrain, never a traceback."""

from __future__ import annotations

import datetime
import errno
import hashlib
import io
import json
import math
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import __version__, files, provenance
from .data import fingerprints
from .errors import Diverged, StoreError
from .identity import canonical_json


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


def now() -> str:
    """The time, as a record or an owner note says it."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def new_record(run_hash: str, identity: dict[str, Any], trainer, teacher: dict | None, model_sha256: str, device):
    """The sealed record of a finished run: its identity's parts, the trainer's results, the teacher's measured
    accuracy, the model's hash, and where and by what it was made."""
    checkout = provenance.checkout()
    return sealed({
        "hash": run_hash,
        "config": identity["run"],
        "data": identity["data"],
        "numerics": identity["numerics"],
        "code": identity["code"],
        **trainer.results(),
        "teacher_accuracy": teacher,
        "model_sha256": model_sha256,
        "finished": now(),
        "versions": {"kcdlib": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "device": device_name(device),
        "execution": trainer.execution(),
        "git_commit": checkout["commit"],
        # The package's tracked files that differed from that commit: a run made from a modified tree says so.
        "git_modified": checkout["modified"],
    })  # fmt: skip


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


def verified_tensors(path: Path, device: torch.device) -> Any:
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
