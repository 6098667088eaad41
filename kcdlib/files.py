"""Files written whole or not at all: a temporary file in the same folder, then a rename.

Used by the run store and by the data fingerprint's cache. ``failpoint`` lets the kill-and-resume tests stop a
process at any of these writes.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

# Fault injection for the kill-and-resume tests: with KCD_KILL_AT="<point>:<n>" the process kills itself with
# SIGKILL the n-th time it passes <point>: "write:<file kind>" (a temporary file written, not yet renamed),
# "wrote:<file kind>" (renamed), or a point the caller names ("epoch" in the store). Unset, it costs nothing.
# Under torchrun, KCD_KILL_RANK=<r> kills process r only, and only in torchrun's first attempt (its restarts have
# TORCHELASTIC_RESTART_COUNT > 0): the kill-and-restart test.
_KILL_AT = os.environ.get("KCD_KILL_AT", "")
_KILL_RANK = os.environ.get("KCD_KILL_RANK")
_passes: dict[str, int] = {}


def failpoint(point: str) -> None:
    if not _KILL_AT:
        return
    attempt = (os.environ.get("RANK"), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if _KILL_RANK is not None and attempt != (_KILL_RANK, "0"):
        return
    _passes[point] = _passes.get(point, 0) + 1
    name, _, count = _KILL_AT.rpartition(":")
    if name == point and str(_passes[point]) == count:
        os.kill(os.getpid(), signal.SIGKILL)


def kind(path: Path) -> str:
    """``checkpoint`` for ``checkpoint-e000001-v0-<sha>.pt``, ``record`` for ``record.json``."""
    return path.name.split("-")[0].split(".")[0]


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` through a temporary file in the same folder, then rename: readers never see half a file.

    Files get the mode a plain ``open()`` would give them (0o666 less the umask: group-readable under the usual
    umask), not ``mkstemp``'s 0600: a run store or a data folder on a shared disk is shared. Raises ``OSError``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        failpoint(f"write:{kind(path)}")
        os.replace(tmp, path)
        failpoint(f"wrote:{kind(path)}")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
