"""Is the run store's lock good across nodes here? Several Slurm jobs on several nodes share one run store, and
two trainers on one run are kept apart by ``flock`` on the run's folder (:func:`kcdlib.folders.locked`). That lock
holds across nodes on a local file system (one node), on NFS (v4; v3 through the NLM lock manager) unless it is
mounted with ``local_lock=flock|all`` or ``nolock`` (then each node locks alone), and on Lustre only when it is
mounted with ``-o flock`` (``localflock`` locks per node; without either, flock fails). :func:`check_lock`
refuses, with one line, a folder where it would not hold, rather than risk two trainers on one run."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from .errors import StoreError


def mount_of(path: str | os.PathLike) -> tuple[str, str, set[str]]:
    """``(mount point, file system type, mount and super options)`` of the mount holding ``path``."""
    path = os.path.realpath(path)
    best = ("/", "", set())
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return best
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) < 6 or len(rest) < 3:
            continue
        point = fields[4].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, rest[0], set(fields[5].split(",")) | set(rest[2].split(",")))
    return best


def lock_problem(fstype: str, opts: set[str]) -> str | None:
    """Why ``flock`` would not keep nodes apart on this mount, or None."""
    if fstype == "lustre" and "flock" not in opts:
        how = "localflock (each node locks alone)" if "localflock" in opts else "neither flock nor localflock"
        return f"Lustre mounted with {how}: mount it with -o flock"
    if fstype.startswith("nfs"):
        if "nolock" in opts or "local_lock=flock" in opts or "local_lock=all" in opts:
            return "NFS mounted with nolock or local_lock=flock|all (each node locks alone): mount it without"
    return None


def check_lock(folder: str | os.PathLike) -> None:
    """Refuse (:class:`StoreError`, one line) a run store or log folder where the run lock would not hold across
    nodes: by the mount's type and options, then by taking the lock once."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(f"cannot create '{folder}': {err.strerror}") from None
    point, fstype, opts = mount_of(folder)
    if (why := lock_problem(fstype, opts)) is not None:
        raise StoreError(f"'{folder}' is on {point} ({fstype}), where the run lock does not hold across nodes: "
                         f"{why}, or choose another folder")  # fmt: skip
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError as err:
        if err.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL):
            raise StoreError(f"'{folder}' is on {point} ({fstype}), which does not support the run lock (flock: "
                             f"{err.strerror}): choose another folder") from None  # fmt: skip
    finally:
        os.close(fd)
