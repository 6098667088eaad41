"""The one registry type of every extension point: architectures, datasets, distillers, methods, value signals,
profiles, artefacts.

A :class:`Registry` maps names to entries in registration order and reads like a read-only mapping (``in``,
iteration, ``len``, ``keys``/``values``/``items``, ``get``). Entries are added once, with :meth:`Registry.register`
(a call, or a decorator); a second entry under a taken name is refused. Looking up a name that is not there raises
:class:`~kcdlib.errors.UnknownName` with one line a user can act on: the known names, and the closest one when the
name looks like a typo.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

from .errors import UnknownName

T = TypeVar("T")
_NOTHING = object()


def did_you_mean(name: Any, known: Iterable[str]) -> str:
    """`` (did you mean 'kcd'?)`` for a near miss of one of ``known``, else ``""``: what every refusal of an unknown
    name adds (a registry's, a build option's, a notebook's parameter)."""
    close = difflib.get_close_matches(name, list(known), n=1) if isinstance(name, str) else []
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(Mapping[str, T], Generic[T]):
    """Named entries of one ``kind`` (the word the error messages use: ``'architecture'``, ``'method'`` ...)."""

    def __init__(self, kind: str, entries: Mapping[str, T] | Iterable[tuple[str, T]] = ()):
        self.kind = kind
        self._entries: dict[str, T] = {}
        for name, entry in entries.items() if isinstance(entries, Mapping) else entries:
            self.register(name, entry)

    def register(self, name: str, entry: Any = _NOTHING) -> Any:
        """Add ``entry`` under ``name`` and return it; without ``entry``, a decorator that adds what it decorates.

        Registering the same entry again is a no-op; another entry under a taken name is a :class:`ValueError`
        (two things would answer to one name)."""
        if entry is _NOTHING:
            return lambda decorated: self.register(name, decorated)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind}'s name is a non-empty string, got {name!r}")
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"two {self.kind}s are called '{name}'")
        self._entries[name] = entry
        return entry

    def check(self, name: Any) -> str:
        """``name`` if it is registered, else :class:`UnknownName`: the known names and, for a near miss, the
        closest one (``unknown method 'kdc' (did you mean 'kcd'?); known methods: kcd, kd, unix``)."""
        if name in self:
            return name
        known = ", ".join(sorted(self._entries)) or "none"
        raise UnknownName(
            f"unknown {self.kind} '{name}'{did_you_mean(name, self._entries)}; known {self.kind}s: {known}"
        )

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    @contextmanager
    def override(self, name: str, entry: T) -> Iterator[T]:
        """``entry`` under ``name`` (added, or in place of the registered one) for the duration of a ``with`` block:
        a test's or a notebook's experiment that leaves the registry as it found it."""
        before = self._entries.get(name, _NOTHING)
        self._entries[name] = entry
        try:
            yield entry
        finally:
            if before is _NOTHING:
                del self._entries[name]
            else:
                self._entries[name] = before

    def __getitem__(self, name: str) -> T:
        return self._entries[self.check(name)]

    def get(self, name: str, default: Any = None) -> Any:
        return self._entries[name] if name in self else default

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._entries
        except TypeError:  # an unhashable "name" (a list from a JSON file) is simply not one
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"
