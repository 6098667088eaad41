"""Files written whole or not at all (a temporary file in the same folder, then a rename), and read defensively
(never through a link, bounded in size, strict JSON bounded in depth).

Used by the run store and by the data fingerprint's cache. ``failpoint`` lets the kill-and-resume tests stop a
process at any of these writes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import signal
import stat
from pathlib import Path
from typing import Any

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


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's content, read in 1 MiB chunks (a checkpoint, a data split); raises ``OSError``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a leftover of a killed process of the same pid, or a planted link: never written through
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
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


# -- reading ---------------------------------------------------------------------------------------------------
MAX_JSON_DEPTH = 32  # a record nests 4 deep; a file nested deeper is no file of ours


class BadFile(ValueError):
    """A file that is not what the store writes there: a link, too large, not strict JSON. Says which, in words."""


def read_bytes(path: Path, max_bytes: int) -> bytes:
    """The bytes of the regular file at ``path``, never through a link and at most ``max_bytes``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise BadFile(f"it is a link (to '{os.readlink(path)}'), not a file of the store") from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise BadFile("it is not a regular file")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise BadFile(f"it is larger than {max_bytes} bytes")
    return data


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadFile(f"it holds the number {text}, which is not finite")
    return value


def _no_constant(name: str):
    raise BadFile(f"it holds a bare {name}, which strict JSON has not")


def strict_json(data: bytes | str) -> Any:
    """``data`` parsed as strict JSON: no NaN or Infinity, no number that overflows a float, nesting at most
    :data:`MAX_JSON_DEPTH`. Raises :class:`BadFile` saying what is wrong."""
    try:
        value = json.loads(data, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise BadFile(f"it is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except UnicodeDecodeError:
        raise BadFile("it is not text") from None
    except json.JSONDecodeError as err:
        raise BadFile(f"it is not JSON ({'empty' if not data.strip() else err.msg})") from None
    except ValueError as err:  # a BadFile from a hook, or an integer of too many digits
        raise err if isinstance(err, BadFile) else BadFile(f"it is not strict JSON ({err})") from None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise BadFile(f"it is nested deeper than {MAX_JSON_DEPTH} levels")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return value


def read_json(path: Path, max_bytes: int = 16 << 20) -> Any:
    """Strict JSON (:func:`strict_json`) from the regular file at ``path`` (:func:`read_bytes`)."""
    return strict_json(read_bytes(path, max_bytes))
