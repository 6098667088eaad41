"""Content fingerprints of a dataset's training split, cached beside the data (or in the user's cache)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from .. import files

FINGERPRINT_FILE = ".kcd-fingerprint.json"
# A file rewritten within its file system's timestamp granularity keeps its mtime (2 s on FAT): a size-and-mtime
# key is written only for files that had not changed for longer than that when it was taken.
SETTLED_NS = 2_000_000_000


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def caches_for(folder: str) -> list[str]:
    """Where ``folder``'s fingerprint may be cached: beside the data, then in the user's cache directory."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec says a relative path is to be ignored
        base = os.path.join(os.path.expanduser("~"), ".cache")
    name = hashlib.sha256(os.fsencode(os.path.abspath(folder))).hexdigest()
    return [os.path.join(folder, FINGERPRINT_FILE), os.path.join(base, "kcdlib", "fingerprints", f"{name}.json")]


def cached_fingerprint(folder: str, name: str, key: dict, settled: bool, compute: Callable[[], dict]) -> dict:
    """The fingerprint cached for ``key``, else ``compute()``'s, cached where a file can be written when the data
    had ``settled`` (not changed for :data:`SETTLED_NS` before its key was taken)."""
    caches = caches_for(folder)
    for path in caches:
        cached = read_cache(path, name, key)
        if cached is not None:
            return cached
    result = compute()
    if settled:
        for path in caches:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write_json_atomic(path, {"key": key, "fingerprint": result})
                break
            except OSError:
                continue  # a read-only data folder, then a read-only home: computed again next time
    return result


def read_cache(path: str, name: str, key: dict) -> dict | None:
    """The fingerprint in the cache file at ``path`` if it is for ``key``; None for a missing or damaged file."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    fp = record.get("fingerprint")
    if not isinstance(fp, dict) or set(fp) != {"name", "num_train", "num_test", "train_sha256"}:
        return None
    counts = (fp["num_train"], fp["num_test"])
    sha = fp["train_sha256"]
    if fp["name"] != name or any(type(c) is not int or c < 0 for c in counts):
        return None
    if not isinstance(sha, str) or len(sha) != 64 or set(sha) - set("0123456789abcdef"):
        return None
    return fp


def write_json_atomic(path: str, obj: dict) -> None:
    """The cache file, whole or not at all, readable by a group sharing the data (:mod:`kcdlib.files`)."""
    files.atomic_write(Path(path), (json.dumps(obj, indent=1) + "\n").encode())
