"""Runs made elsewhere, rendered here: ``kcd runs export``, ``kcd runs import`` (their command line here and in
:func:`kcdlib.plan.runs_command`), ``kcd book --from-records``.

An archive is a gzipped tar of ``manifest.json`` and, per run, ``runs/<run hash>/{config.json,record.json}``
(``model.pt`` too with ``--models``). The manifest lists every file with its SHA-256, the data fingerprints the
runs were made on, and the runs the profile needs that the exporting store lacked.

Import trusts nothing in it and runs nothing from it: members must be plain files with the expected names (no
absolute paths, no ``..``, no links or devices, no other files: a pickle is refused by its name alone) within size
limits; each file's SHA-256 must be the manifest's; each record must pass its own checksum
(:func:`kcdlib.records.read_record`), name its folder, and agree with its ``config.json``, whose identity must hash to
that name (:func:`kcdlib.identity.identity_digest`); a model must be the file its record
names. JSON is parsed strictly (no NaN). Any failure refuses the whole archive with one line, before anything is
written. Models are later loaded as tensors only (``weights_only=True``), as everything in a store.

``--from-records`` renders the book from the store alone: the store takes the data fingerprints from its records
(:func:`recorded_fingerprints`; ``RunStore(recorded_fingerprints=...)``) instead of reading the data, trains
nothing, and names every run it lacks before any notebook runs.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from . import files
from .errors import KcdError
from .files import atomic_write
from .identity import RunConfig, identity_digest, with_teachers
from .records import Damaged, read_record
from .runs import RunStore

FORMAT = "kcd-runs/1"
# What an archive may hold, and how large each file may be.
# (tar lists folders too when an archive is repacked by hand: the folders of these names are passed over.)
MEMBER = re.compile(r"^runs/([0-9a-f]{16})/(config\.json|record\.json|model\.pt)$")
MAX_SIZES = {"manifest.json": 64 << 20, "config.json": 1 << 20, "record.json": 16 << 20, "model.pt": 2 << 30}
MAX_MEMBERS = 100_000
# The environment variable with which ``kcd book --from-records`` tells its notebooks' sessions to take the data
# fingerprints from the store's records (papermill passes parameters only to notebooks that declare them).
FROM_RECORDS_ENV = "KCD_FROM_RECORDS"


class ArchiveError(KcdError):
    """An archive that cannot be trusted or read: refused whole, nothing imported."""


class MissingRuns(KcdError):
    """``--from-records``: the store lacks runs the book needs."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def strict_json(data: bytes, what: str) -> Any:
    """:func:`kcdlib.files.strict_json` (no NaN, no overflow, bounded depth); a refusal is an :class:`ArchiveError`."""
    try:
        return files.strict_json(data)
    except files.BadFile as err:
        raise ArchiveError(f"{what}: {err}") from None


# -- export ------------------------------------------------------------------------------------------------------
def export_runs(
    configs: Sequence[RunConfig], store: RunStore, out: str | Path, models: bool = False, profile: str = "",
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    """Write the records of ``configs`` (and their teachers) that ``store`` holds into the archive ``out``;
    returns the manifest. Runs the store lacks are listed in it (and said)."""
    files: dict[str, bytes] = {}
    runs, missing, data = [], [], {}
    for cfg in with_teachers(configs):
        rec = store.record(cfg)
        folder = store.path(cfg)
        if rec is None:
            missing.append(folder.name)
            continue
        names = ["config.json", "record.json"] + (["model.pt"] if models else [])
        for name in names:
            files[f"runs/{folder.name}/{name}"] = (folder / name).read_bytes()
        runs.append(folder.name)
        data[cfg.dataset] = rec["data"]
    manifest = {
        "format": FORMAT, "profile": profile, "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "runs": runs, "missing": missing, "data": data,
        "files": {name: _sha256(content) for name, content in sorted(files.items())},
    }  # fmt: skip
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in [("manifest.json", json.dumps(manifest, indent=1).encode()), *sorted(files.items())]:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), 0o644, 0
            tar.addfile(info, io.BytesIO(content))
    atomic_write(Path(out), buf.getvalue())
    echo(
        f"exported {len(runs)} runs{' with their models' if models else ''} to {out}"
        + (f"; the store lacks {len(missing)} runs the profile needs: {', '.join(missing)}" if missing else "")
    )
    return manifest


# -- import ------------------------------------------------------------------------------------------------------
def read_archive(path: str | Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and files of an archive, every check of the module's docstring passed."""
    try:
        tar = tarfile.open(path, mode="r:gz")
    except (OSError, tarfile.TarError) as err:
        raise ArchiveError(f"{path}: not a readable kcd runs archive ({err})") from None
    contents: dict[str, bytes] = {}
    with tar:
        for count, member in enumerate(tar, 1):
            name = member.name
            if count > MAX_MEMBERS:
                raise ArchiveError(f"{path}: more than {MAX_MEMBERS} members")
            if member.isdir() and re.fullmatch(r"runs(/[0-9a-f]{16})?/?", name):
                continue  # a folder entry of a repacked archive: nothing to read
            if not member.isfile():
                raise ArchiveError(f"{path}: member '{name}' is not a plain file (a link, device or folder)")
            match = MEMBER.match(name)
            if name != "manifest.json" and match is None:
                raise ArchiveError(f"{path}: unexpected member '{name}' (an archive holds manifest.json and "
                                   "runs/<hash>/{config.json,record.json,model.pt} only)")  # fmt: skip
            limit = MAX_SIZES["manifest.json" if match is None else match.group(2)]
            if member.size > limit:
                raise ArchiveError(f"{path}: member '{name}' is larger than {limit} bytes")
            if name in contents:
                raise ArchiveError(f"{path}: member '{name}' appears twice")
            contents[name] = tar.extractfile(member).read()
    if "manifest.json" not in contents:
        raise ArchiveError(f"{path}: no manifest.json")
    manifest = strict_json(contents.pop("manifest.json"), f"{path}: manifest.json")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"),
                                                                                            dict):  # fmt: skip
        raise ArchiveError(f"{path}: manifest.json is not a {FORMAT} manifest")
    if set(manifest["files"]) != set(contents):
        odd = sorted(set(manifest["files"]) ^ set(contents))
        raise ArchiveError(f"{path}: the manifest and the archive list different files ({', '.join(odd[:3])})")
    for name, content in contents.items():
        if _sha256(content) != manifest["files"][name]:
            raise ArchiveError(f"{path}: {name} is not the file the manifest names (SHA-256 mismatch)")
    _check_runs(path, contents)
    return manifest, contents


def _check_runs(path, contents: dict[str, bytes]) -> None:
    runs = {MEMBER.match(name).group(1) for name in contents}
    for run in sorted(runs):
        where = f"{path}: run {run}"
        if f"runs/{run}/record.json" not in contents or f"runs/{run}/config.json" not in contents:
            raise ArchiveError(f"{where} lacks its record.json or config.json")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "record.json").write_bytes(contents[f"runs/{run}/record.json"])
            try:
                record = read_record(Path(tmp) / "record.json")
            except Damaged as err:
                raise ArchiveError(f"{where}: its record is damaged or was changed ({err})") from None
        config = strict_json(contents[f"runs/{run}/config.json"], f"{where}: config.json")
        identity = config.get("identity") if isinstance(config, dict) else None
        if record.get("hash") != run or not isinstance(identity, dict) or config.get("hash") != run:
            raise ArchiveError(f"{where}: its record or config.json names another run")
        if identity_digest(identity) != run:
            raise ArchiveError(f"{where}: its identity does not hash to its name")
        if identity.get("run") != record.get("config") or identity.get("data") != record.get("data"):
            raise ArchiveError(f"{where}: its record's options or data differ from its identity")
        model = contents.get(f"runs/{run}/model.pt")
        if model is not None and _sha256(model) != record.get("model_sha256"):
            raise ArchiveError(f"{where}: model.pt is not the model its record names (SHA-256 mismatch)")


def import_runs(path: str | Path, store: RunStore, echo: Callable[[str], None] = print) -> list[str]:
    """Check the archive ``path`` whole, then add its runs to ``store`` (a run the store holds already is left as
    it is); returns the run hashes added."""
    manifest, contents = read_archive(path)
    added, kept = [], []
    runs = sorted({MEMBER.match(name).group(1) for name in contents})
    for run in runs:
        folder = Path(store.root) / run
        if (folder / "record.json").exists():
            kept.append(run)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.pt", "record.json"):  # the record last: its presence means finished
            if f"runs/{run}/{name}" in contents:
                atomic_write(folder / name, contents[f"runs/{run}/{name}"])
        added.append(run)
    datasets = ", ".join(f"{name} (training split {str(fp.get('train_sha256'))[:12]})"
                         for name, fp in manifest.get("data", {}).items())  # fmt: skip
    echo(f"imported {len(added)} runs into {store.root} ({len(kept)} already there), made on {datasets or 'no data'}")
    return added


@contextlib.contextmanager
def recorded_env(on: bool) -> Iterator[None]:
    """While it is open, the notebooks' sessions (kernels started now inherit it) take the recorded fingerprints."""
    if not on:
        yield
        return
    before = os.environ.get(FROM_RECORDS_ENV)
    os.environ[FROM_RECORDS_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(FROM_RECORDS_ENV, None)
        else:
            os.environ[FROM_RECORDS_ENV] = before


# -- rendering from records ----------------------------------------------------------------------------------------
def recorded_fingerprints(root: str | Path) -> dict[str, dict[str, Any]]:
    """The data fingerprint each dataset's records in the store were made on; a dataset recorded on two different
    data (two stores imported into one) is an error, since a run's identity needs one."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(Path(root).glob("*/record.json")):
        try:
            record = read_record(path)
        except Damaged:
            continue
        dataset, data = record.get("config", {}).get("dataset"), record.get("data")
        if not isinstance(data, dict) or dataset is None:
            continue
        if found.setdefault(dataset, data) != data:
            raise KcdError(f"the store {root} holds {dataset} runs made on two different data (training splits "
                           f"{str(found[dataset].get('train_sha256'))[:12]} and {str(data.get('train_sha256'))[:12]}):"
                           " render from a store of one")  # fmt: skip
    return found


def recorded_code(root: str | Path) -> str | None:
    """The code digest (:mod:`kcdlib.provenance`) the store's records were made by, None when none says; records of
    two codes are an error, since a run's identity needs one."""
    codes = set()
    for path in sorted(Path(root).glob("*/record.json")):
        try:
            code = read_record(path).get("code")
        except Damaged:
            continue
        if code:
            codes.add(code)
    if len(codes) > 1:
        raise KcdError(f"the store {root} holds runs made by {len(codes)} versions of the code "
                       f"({', '.join(sorted(codes))}): render from a store of one")  # fmt: skip
    return codes.pop() if codes else None


# Where ``kcd book`` says how this build got its runs; book/reproduce.md includes it.
PROVENANCE_PAGE = "book/_provenance.md"


def write_provenance(out: Path, runs_dir: Path, from_records: bool) -> None:
    """The reproduce page's paragraph on where the runs come from: trained (or reused) on the building machine's
    data, or, with ``--from-records``, only read from the store, with the data fingerprints recorded in it."""
    if not from_records:
        text = ("The runs of this build were trained, or reused from the run store, on the data of the machine "
                "that built it; each run's record holds the fingerprint of the data it was made on.")  # fmt: skip
    else:
        data = "; ".join(
            f"{name}: {fp.get('num_train')} training images, training split `{str(fp.get('train_sha256'))[:16]}`"
            for name, fp in recorded_fingerprints(runs_dir).items()
        )
        code = recorded_code(runs_dir)
        text = ("**This book was rendered from records** (`kcd book --from-records`): no run was trained and no "
                "dataset was read where it was rendered. Every run was imported with its record (`kcd runs "
                "import`), checked, and is identified with the data fingerprint and the code recorded with it, not "
                f"ones computed here: {data or 'no data'}; code `{code or 'not recorded'}` "
                "(kcdlib.provenance).")  # fmt: skip
    (out / PROVENANCE_PAGE).write_text(text + "\n")


def check_complete(configs: Sequence[RunConfig], store: RunStore, describe: Callable[[RunConfig], str]) -> None:
    """Raise :class:`MissingRuns` naming every run of ``configs`` (and their teachers) the store lacks, each as
    ``describe`` says it and by its hash."""
    lacking = [f"{describe(c)} ({store.run_hash(c)})" for c in with_teachers(configs)
               if store.record(c) is None]  # fmt: skip
    if lacking:
        raise MissingRuns(f"--from-records trains nothing, and the store {store.root} lacks {len(lacking)} runs the "
                          f"book needs: {'; '.join(lacking)}")  # fmt: skip


# -- the command line: kcd runs export|import ----------------------------------------------------------------------
def add_parsers(verbs) -> None:
    """``kcd runs export`` and ``kcd runs import``, under the ``runs`` command's sub-commands ``verbs``."""
    e = verbs.add_parser("export", help="write the records a profile's book needs into one archive")
    e.add_argument("--profile", default="smoke", help="the profile whose book's runs are exported")
    e.add_argument("--out", required=True, help="the archive to write (.tar.gz)")
    e.add_argument("--only", help="comma-separated notebooks (e.g. table1): only their runs")
    e.add_argument("--models", action="store_true", help="include the final models (model.pt)")
    e.add_argument("--runs-dir", default="runs", help="the run store (default: ./runs)")
    e.add_argument("--data-root", default="data", help="where the data the runs were made on lives")
    e.add_argument("--device", default="cpu", help=argparse_hidden())
    i = verbs.add_parser("import", help="check an archive and add its runs to the store")
    i.add_argument("archive", help="a .tar.gz written by kcd runs export")
    i.add_argument("--runs-dir", default="runs", help="the run store (default: ./runs)")


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS
