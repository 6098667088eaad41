"""A run's identity: which runs a list of runs stands for once the teachers they learn from are counted."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # RunConfig moves here from kcdlib.runs (the store layer, above this one)
    from .runs import RunConfig


def with_teachers(configs: Iterable[RunConfig]) -> list[RunConfig]:
    """``configs``, each once, in order, with before each distillation the teacher runs it learns from (the store
    trains a teacher before its student, so this is the order runs are made in)."""
    out: dict[str, RunConfig] = {}
    for cfg in configs:
        chain = []
        while cfg is not None:
            chain.append(cfg)
            cfg = cfg.teacher
        for c in reversed(chain):
            out.setdefault(c.options_hash, c)
    return list(out.values())
