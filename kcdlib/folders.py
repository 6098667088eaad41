"""A run's folder in the store: the lock a trainer holds on it, refusing links, and what killed or refused runs
leave behind (half-written temporary files, checkpoints of a finished run, folders abandoned before their first
epoch)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import StoreError
from .records import Damaged, read_json, store_error


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


def version_of(path: Path) -> str:
    return next((part for part in path.stem.split("-") if part.startswith("v")), "")


# The files a trainer writes (through temporary files named ".<name>.<pid>.tmp").
TRAINER_WRITES = ("checkpoint-", "images-", "model.pt", "record.json", "config.json", "owner.json")


def temporary_files(run_dir: Path) -> list[Path]:
    """The trainer's half-written files in ``run_dir`` (not other temporary files: a reader may be writing a cache
    beside a finished run)."""
    return [p for name in TRAINER_WRITES for p in run_dir.glob(f".{name}*.tmp")]


def sweep(run_dir: Path) -> None:
    """Remove what only an unfinished run needs: checkpoints, image snapshots, the trainer's half-written temporary
    files and the owner note."""
    for pattern in ("checkpoint-*.pt", "images-*.pt", "owner.json"):
        for leftover in run_dir.glob(pattern):
            leftover.unlink(missing_ok=True)
    for leftover in temporary_files(run_dir):
        leftover.unlink(missing_ok=True)


# What a run folder holds before its first epoch: a folder with nothing else was abandoned by a refused or
# diverged run (or a killed one that had not finished an epoch) and is removed.
STARTING_FILES = {"config.json", "owner.json"}


def remove_if_abandoned(run_dir: Path) -> bool:
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


def check_root(root: Path) -> None:
    """The store's folder, made when missing; one line when it cannot be a folder we write to."""
    if root.exists() and not root.is_dir():
        raise StoreError(f"the runs folder '{root}' is a file, not a folder: choose another (--runs-dir)")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise store_error(root, err) from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise StoreError(f"cannot write to the runs folder '{root}': choose another (--runs-dir)")


def tidy(root: Path) -> None:
    """What killed or refused runs left under ``root``, in the folders no process is training (their lock is free):
    the trainer's half-written temporary files, and folders that hold nothing but a run's first notes
    (:func:`remove_if_abandoned`)."""
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
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
            for leftover in temporary_files(folder):
                leftover.unlink(missing_ok=True)
            remove_if_abandoned(folder)
        finally:
            os.close(fd)
