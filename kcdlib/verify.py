"""Numbers you can verify: each stored final model re-evaluated on its test split against its record.

A record's checksum (:func:`kcdlib.records.read_record`) proves only that the record is the one that was sealed; anyone
can seal another. :func:`verify_run` checks what the book's numbers stand on, in one pass over the test split:

- the record reads with its checksum, and its ``hash`` is its folder's name;
- ``model.pt`` is a regular file (not a link) whose SHA-256 is the record's ``model_sha256``, read once and loaded
  as tensors only (``weights_only=True``: a planted pickle is refused, never run), strictly into the record's
  architecture;
- the data under the data root has the fingerprint the record names (every field);
- the model's top-1 and top-5 on the test split are the record's ``final_top1`` and ``final_top5`` (and the
  record's last epoch row says the same).

Accuracies are compared in whole test images, since an accuracy is a count of them. A record made on a CPU in
fp32, eager and by one process, and verified on a CPU, is required to match exactly: the same kernels on the same
batches of the same images give the same logits. Otherwise (a GPU, bf16 autocast, compiled kernels, shards of
several processes) the logits differ by rounding, which can flip the top class of an image that sits on a
decision boundary; up to :func:`allowed_images` images may then differ (max(2, 0.1 % of the split): digits 2,
CIFAR-100 10, ImageNet 50), far fewer than a changed model or a changed number moves. The difference is reported
in images either way.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import data as datasets
from . import files, models
from .errors import KcdError, StoreError
from .records import Damaged, load_tensors, read_record
from .runs import RunStore
from .train import evaluate

# The largest final model of the zoo (ResNet50 for ImageNet would be ~100 MB) with room to spare.
MAX_MODEL_BYTES = 1 << 30


class VerificationFailed(KcdError):
    """A stored run does not stand up to re-evaluation (``kcd book --verify``)."""


@dataclass
class Verdict:
    """What :func:`verify_run` found for one run: ``checked`` and ``differs`` in words (``ok``: nothing differs)."""

    run: str
    checked: list[str] = field(default_factory=list)
    differs: list[str] = field(default_factory=list)
    dataset: str | None = None
    arch: str | None = None
    top1: float | None = None
    hits: int | None = None  # test images the model classifies right (top-1), of ``num_test``
    num_test: int | None = None
    images_off: int | None = None  # |re-evaluated - recorded|, in images (top-1 and top-5, the larger)
    allowed: int | None = None

    @property
    def ok(self) -> bool:
        return not self.differs and bool(self.checked)

    def line(self) -> str:
        """One line: ``ok <hash> <dataset> <arch> top-1 ... re-evaluated, model sha ok, data ok`` or
        ``FAILED <hash>: <why>``."""
        if not self.ok:
            return f"FAILED {self.run}: {'; '.join(self.differs) or 'nothing was checked'}"
        rule = "exact required" if self.allowed == 0 else f"at most {self.allowed} allowed"
        return (
            f"ok {self.run} {self.dataset} {self.arch} top-1 {self.top1:.2f} % ({self.hits}/{self.num_test} images) "
            f"re-evaluated, {self.images_off} images from the record ({rule}), model sha ok, data ok"
        )


def allowed_images(num_test: int, exact: bool) -> int:
    """Test images a re-evaluation may differ by: 0 when ``exact``, else max(2, 0.1 % of the split)."""
    return 0 if exact else max(2, math.ceil(num_test / 1000))


def exact_rule(record: dict[str, Any], device: torch.device) -> bool:
    """Whether the record was made as the verification runs: on a CPU, in fp32, eager, by one process (several
    evaluate their shards in other batches), and verified on a CPU."""
    config = record.get("config") or {}
    compiled = (record.get("execution") or {}).get("compile", "off") != "off"
    made_on_cpu = str(record.get("device", "")).startswith("cpu") and record.get("world_size", 1) in (1, None)
    return device.type == "cpu" and made_on_cpu and config.get("precision", "fp32") == "fp32" and not compiled


def _images(percent: float, num_test: int) -> int:
    return round(percent * num_test / 100)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text[:12] if isinstance(value, str) and len(value) > 16 else text


def data_difference(recorded: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """The fingerprint fields that differ, each as ``field (record X, here Y)``."""
    keys = sorted(set(recorded) | set(here))
    return [
        f"{k} (record {_short(recorded.get(k, 'none'))}, here {_short(here.get(k, 'none'))})"
        for k in keys
        if recorded.get(k) != here.get(k)
    ]


def verify_run(
    folder: str | Path, data_root: str = "data", device: str | torch.device = "cpu", store: RunStore | None = None
) -> Verdict:
    """Check the finished run in ``folder`` against its record (see the module's docstring); never raises for what
    it finds in the folder or the data: the verdict says it."""
    folder = Path(folder)
    device = torch.device(device)
    # The store reads each dataset and its fingerprint once for all the runs of a verification.
    store = store or RunStore(folder.parent, data_root, device)
    v = Verdict(run=folder.name)
    # Each check stops the verification when it fails: what follows would rest on it.
    if folder.is_symlink() or not folder.is_dir():
        v.differs.append(f"{folder} is {'a link' if folder.is_symlink() else 'not a folder'}")
        return v
    try:
        record = read_record(folder / "record.json")  # a link is refused there
    except Damaged as err:
        v.differs.append(f"record.json is damaged ({err})")
        return v
    if record.get("hash") != folder.name:
        v.differs.append(f"the record is run {record.get('hash')}'s, not {folder.name}'s")
        return v
    v.checked.append("record checksum and hash")
    config = record.get("config") or {}
    v.dataset, v.arch = config.get("dataset"), config.get("arch")

    try:  # read once: the bytes hashed are the bytes loaded
        blob = files.read_bytes(folder / "model.pt", MAX_MODEL_BYTES)
    except (files.BadFile, OSError) as err:
        v.differs.append(f"model.pt cannot be used: {getattr(err, 'strerror', None) or err}")
        return v
    if hashlib.sha256(blob).hexdigest() != record.get("model_sha256"):
        v.differs.append(f"model.pt is not the model the record names (sha256 {hashlib.sha256(blob).hexdigest()[:12]},"
                         f" record {str(record.get('model_sha256'))[:12]})")  # fmt: skip
        return v
    v.checked.append("model sha256")

    try:
        fingerprint = store.fingerprint(v.dataset)
        data = store.dataset(v.dataset, config.get("decode", "pil"))
    except KcdError as err:
        v.differs.append(f"data: {err}")
        return v
    if fields := data_difference(record.get("data") or {}, fingerprint):
        v.differs.append(f"the data under '{data_root}' is not the record's: {', '.join(fields)}")
        return v
    v.checked.append("data fingerprint")

    try:
        state = load_tensors(blob)
    except Exception as err:  # noqa: BLE001 - anything but plain tensors is refused, unread
        v.differs.append(f"model.pt is not tensors only: refused unread ({type(err).__name__})")
        return v
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        v.differs.append("model.pt is not {'model': state_dict}")
        return v
    try:
        model = models.create(v.arch, num_classes=datasets.spec(v.dataset).num_classes)
        model.load_state_dict(state["model"], strict=True)
    except (KcdError, RuntimeError) as err:
        v.differs.append(f"model.pt does not fit {v.arch}: {str(err).splitlines()[0][:200]}")
        return v
    v.checked.append("model loads strictly")

    top1, top5 = evaluate(model.to(device), data, precision=config.get("precision", "fp32"))
    n = v.num_test = int(fingerprint["num_test"])
    v.top1, v.hits = top1, _images(top1, n)
    v.allowed = allowed_images(n, exact_rule(record, device))
    offs = []
    for name, measured in (("top-1", top1), ("top-5", top5)):
        recorded = record.get(f"final_{name.replace('-', '')}")
        if not isinstance(recorded, (int, float)):
            v.differs.append(f"the record has no final {name}")
            continue
        off = abs(_images(measured, n) - _images(recorded, n))
        offs.append(off)
        if off > v.allowed:
            v.differs.append(
                f"{name} re-evaluated {measured:.2f} % ({_images(measured, n)}/{n} images), the record says "
                f"{recorded:.2f} %: {off} images apart (at most {v.allowed} allowed)"
            )
    rows = record.get("epochs") or []
    last = rows[-1] if rows and isinstance(rows[-1], dict) else {}
    if (last.get("top1"), last.get("top5")) != (record.get("final_top1"), record.get("final_top5")):
        v.differs.append("the record's last epoch row and its final accuracies disagree")
    v.images_off = max(offs, default=None)
    v.checked.append(f"top-1/top-5 on {n} test images")
    return v


def finished_runs(root: str | Path) -> list[Path]:
    """The run folders under ``root`` that hold a record (damaged or not), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise StoreError(f"no runs folder '{root}'")
    found = sorted(p for p in root.iterdir() if os.path.lexists(p / "record.json"))
    if not found:
        raise StoreError(f"no finished run in '{root}': nothing to verify")
    return found


def resolve_runs(root: str | Path, runs: Iterable[str]) -> list[Path]:
    """Run folders from run hashes (folders under ``root``) or paths of run folders; an unknown one is an error."""
    root = Path(root)
    folders = []
    for run in runs:
        path = Path(run)
        folder = path if path.is_dir() and (path / "record.json").exists() else root / run
        if not os.path.lexists(folder / "record.json"):
            raise StoreError(f"no finished run '{run}' in '{root}' (a run hash, or the folder of a finished run)")
        folders.append(folder)
    return folders


def verify_store(
    root: str | Path, runs: Iterable[str] | None = None, data_root: str = "data", device: str = "cpu", echo=None
) -> list[Verdict]:
    """:func:`verify_run` for every finished run under ``root``, or for ``runs`` (hashes or folders); ``echo``
    gets each verdict's line as it comes."""
    folders = finished_runs(root) if runs is None else resolve_runs(root, list(runs))
    store = RunStore(root, data_root, device)
    verdicts = []
    for folder in folders:
        verdicts.append(verify_run(folder, data_root, device, store))
        if echo is not None:
            echo(verdicts[-1].line())
    return verdicts


def verify_or_fail(root: str | Path, data_root: str, device: str, echo=print) -> list[Verdict]:
    """Every finished run under ``root`` verified, a line each and a summary; :class:`VerificationFailed` (one
    line) when any fails."""
    verdicts = verify_store(root, None, data_root, device, echo)
    echo(summary(verdicts, root))
    if failed := [v.run for v in verdicts if not v.ok]:
        raise VerificationFailed(f"{len(failed)} of {len(verdicts)} runs in {root} failed verification: "
                                 f"{', '.join(failed)}")  # fmt: skip
    return verdicts


def summary(verdicts: list[Verdict], root: str | Path) -> str:
    """``verified 37 runs in <root>: 37 ok`` (or how many failed)."""
    n, failed = len(verdicts), sum(not v.ok for v in verdicts)
    return f"verified {n} run{'s' * (n != 1)} in {root}: {n - failed} ok" + (f", {failed} FAILED" if failed else "")
