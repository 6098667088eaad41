"""The paper's published numbers, shipped with the package so every table can print them beside ours.

Each CSV keeps its comment header (lines starting with ``#``) saying where the numbers come from.
"""

from __future__ import annotations

from importlib import resources

import pandas as pd


def _read(name: str) -> pd.DataFrame:
    with resources.files(__package__).joinpath(name).open() as f:
        return pd.read_csv(f, comment="#", na_values=["-"])


def paper_table1() -> pd.DataFrame:
    """Table 1 of the main paper (CIFAR-100 top-1 %), indexed by method; columns ``teacher/student``."""
    return _read("paper_table1_cifar100.csv").set_index("method")


def paper_tables5to7() -> pd.DataFrame:
    """Tables 5-7 of the supplement (KC-KD top-1 % on CIFAR-100): ``table, setting, value`` and one column
    per ``teacher/student`` pair. ``value`` is a string (a number for α and ρ, a variant name for Table 7)."""
    return _read("paper_tables5to7_cifar100.csv").astype({"value": str})


def unix_published() -> pd.DataFrame:
    """UNIX's published CIFAR-100 results (its official README), one row per teacher/student pair."""
    return _read("unix_reference_cifar100.csv")
