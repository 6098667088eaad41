"""Argument checks shared by the parts of the condensation: one message for one mistake, a :class:`BadOption`."""

from __future__ import annotations

import math
import operator

from ..errors import BadOption


def positive_int(name: str, value) -> int:
    """``value`` as an int if it is a whole number >= 1 (a bool is not), else :class:`BadOption` naming ``name``."""
    if isinstance(value, bool):
        raise BadOption(f"{name} must be a positive integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise BadOption(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise BadOption(f"{name} must be a positive integer, got {number}")
    return number


def finite_float(name: str, value) -> float:
    """``value`` as a finite float, else :class:`BadOption` naming ``name``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadOption(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise BadOption(f"{name} must be finite, got {value!r}")
    return number
