"""Run options: each option's paper default, its type and its rule, declared once and checked before any training.

A distiller or a method declares its options as a dict of :class:`Option`; :func:`canonical` turns what a user gave
(any subset, numbers spelled as ``10`` or ``10.0``) into the one canonical dict that the run identity hashes: every
option present, defaults filled in, numbers of the declared type. The command line, the notebooks and the library
all go through it, so they refuse the same values with the same message and spell one run one way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import BadOption


@dataclass(frozen=True)
class Option:
    """One option: its default (the paper's), its type (``int``, ``float`` or ``str``), and its rule: a predicate
    with the words that say it (``"in (0, 1]"``), or the allowed ``choices`` of a string."""

    default: Any
    kind: type = float
    rule: str = ""
    check: Callable[[Any], bool] | None = None
    choices: tuple[str, ...] = ()


def checked_list(what: str, value: Any, ok: Callable[[Any], bool], elements: str) -> tuple | None:
    """``value`` (None, or a list given as ``-y 'name: [0, 1]'``) as a tuple, each element checked: ``what`` names
    the parameter in the message (``"build option seeds"``), ``elements`` says what each must be."""
    if value is None:
        return None
    if not isinstance(value, list | tuple):
        raise BadOption(f"{what} must be a list of {elements} (-y 'name: [...]'), got {value!r}")
    if not value or any(not ok(v) for v in value):
        raise BadOption(f"{what} must be a non-empty list of {elements}, got {list(value)!r}")
    return tuple(value)


def positive() -> dict[str, Any]:
    return {"rule": "> 0", "check": lambda v: v > 0}


def non_negative() -> dict[str, Any]:
    return {"rule": ">= 0", "check": lambda v: v >= 0}


def between(low: float, high: float, low_open: bool = False, high_open: bool = False) -> dict[str, Any]:
    """The interval rule, e.g. ``between(0, 1, low_open=True)`` is ``(0, 1]``."""
    text = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(v: float) -> bool:
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    return {"rule": text, "check": check}


def normalize(owner: str, name: str, spec: Option, value: Any) -> Any:
    """``value`` as the option's type, checked against its rule; a :class:`BadOption` names the owner and rule."""
    where = f"{owner} option {name}"
    if spec.kind is str:
        if not isinstance(value, str) or (spec.choices and value not in spec.choices):
            raise BadOption(f"{where} must be one of {', '.join(spec.choices)}, got {value!r}")
        return value
    # bool is an int to Python, never a number to a user.
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:
            value = float(value) if isinstance(value, str) else value
        except ValueError:
            pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadOption(f"{where} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise BadOption(f"{where} must be a finite number, got {value}")
    if spec.kind is int:
        if value != int(value):
            raise BadOption(f"{where} must be a whole number, got {value}")
        value = int(value)
    else:
        value = float(value)
    if spec.check is not None and not spec.check(value):
        raise BadOption(f"{where} must be {spec.rule}, got {value:g}")
    return value


def canonical(owner: str, specs: Mapping[str, Option], given: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every option of ``specs`` (``None`` or absent: the default), normalised and checked; unknown names refused."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(specs))
    if unknown:
        known = ", ".join(sorted(specs)) or "none"
        raise BadOption(f"{owner} has no option {', '.join(unknown)}; its options: {known}")
    out = {}
    for name, spec in specs.items():
        value = given.get(name)
        out[name] = spec.default if value is None else normalize(owner, name, spec, value)
    return out


def device(name: Any) -> str:
    """A device name checked before anything runs: ``auto`` (CUDA when there is one), ``cpu``, ``cuda``, ``cuda:N``."""
    import torch

    if not isinstance(name, str):
        raise BadOption(f"a device is a name such as cpu, cuda or cuda:1, got {name!r}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise BadOption(f"unknown device '{name}': use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise BadOption(f"device '{name}' is not supported: use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BadOption(f"device '{name}' was asked for, but this machine has no CUDA device; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BadOption(f"device '{name}' does not exist: this machine has {torch.cuda.device_count()} CUDA "
                            "device(s)")  # fmt: skip
    return name
