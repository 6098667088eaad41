"""Content fingerprints of a dataset's splits, and the cache that spares hashing ImageNet twice.

A fingerprint is ``{"name", "num_train", "num_test", "train_sha256", "test_sha256"}``: both splits, so a changed
test label is another run's data too. digits and CIFAR-100 are hashed by content every time (cheap); ImageNet's
1.33M files are hashed once and the result cached, under these rules:

- The cache lives only in the user's own cache folder (``$XDG_CACHE_HOME/kcdlib/fingerprints``, one file per data
  folder), never beside the data: a file found beside the data (copied with it, or planted) may hold any hash, and
  is never read.
- Its key is every file's size, mtime, ctime and inode (and the file system's device). A file rewritten with its
  old mtime put back (``touch -d``) still gets a new ctime, which no user can set, and a copied or restored file a
  new inode: either makes the key miss and the data is hashed again.
- A key is written only for files that had settled (no mtime or ctime within :data:`SETTLED_NS` of the moment it
  was taken), so a file written during the hashing is never cached as what it was before.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from .. import files

FINGERPRINT_FIELDS = ("name", "num_train", "num_test", "train_sha256", "test_sha256")
# A file rewritten within its file system's timestamp granularity keeps its times (2 s on FAT).
SETTLED_NS = 2_000_000_000


def stat_key(folder: str, relative: list[str]) -> tuple[dict, bool]:
    """The cache key of the files ``relative`` to ``folder`` (a digest of each one's device, inode, size, mtime
    and ctime), and whether they had all settled when it was taken."""
    started = time.time_ns()
    stamp, newest = hashlib.sha256(), 0
    for rel in relative:
        st = os.stat(os.path.join(folder, rel))
        stamp.update(
            os.fsencode(f"{rel}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n")
        )
        newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
    return {"stat_sha256": stamp.hexdigest(), "files": len(relative)}, started - newest > SETTLED_NS


def cache_for(folder: str) -> str:
    """The one place ``folder``'s fingerprint is cached: the user's cache folder."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec says a relative path is to be ignored
        base = os.path.join(os.path.expanduser("~"), ".cache")
    name = hashlib.sha256(os.fsencode(os.path.abspath(folder))).hexdigest()
    return os.path.join(base, "kcdlib", "fingerprints", f"{name}.json")


def cached_fingerprint(folder: str, name: str, key: dict, settled: bool, compute: Callable[[], dict]) -> dict:
    """The fingerprint cached for ``key``, else ``compute()``'s, cached when the files had ``settled``."""
    path = cache_for(folder)
    cached = read_cache(path, name, key)
    if cached is not None:
        return cached
    result = compute()
    if settled:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            files.atomic_write(Path(path), (json.dumps({"key": key, "fingerprint": result}, indent=1) + "\n").encode())
        except OSError:
            pass  # a read-only home: computed again next time
    return result


def valid_fingerprint(fp: object, name: str | None = None) -> bool:
    """Whether ``fp`` has a fingerprint's fields and types (of dataset ``name``, when given)."""
    if not isinstance(fp, dict) or set(fp) != set(FINGERPRINT_FIELDS):
        return False
    if not isinstance(fp["name"], str) or (name is not None and fp["name"] != name):
        return False
    if any(type(fp[c]) is not int or fp[c] < 0 for c in ("num_train", "num_test")):
        return False
    shas = (fp["train_sha256"], fp["test_sha256"])
    return all(isinstance(s, str) and len(s) == 64 and not set(s) - set("0123456789abcdef") for s in shas)


def read_cache(path: str, name: str, key: dict) -> dict | None:
    """The fingerprint in the cache file at ``path`` if it is for ``key``; None for a missing or damaged file."""
    try:
        record = files.read_json(Path(path), max_bytes=1 << 16)
    except (OSError, ValueError):  # missing, or not strict JSON (files.BadFile)
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    fp = record.get("fingerprint")
    return fp if valid_fingerprint(fp, name) else None
