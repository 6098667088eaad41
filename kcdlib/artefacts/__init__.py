"""The book's tables and figures, one module each, and the one registry of them.

Each artefact module declares its rows once and makes an :class:`~kcdlib.artefacts.declare.Artefact` of them
(``ARTEFACT = Artefact(name, title, part, order, declare, build)``); its notebook is ``notebooks/<name>.md``. This
package finds every module that holds an ``ARTEFACT``, and everything that lists artefacts is derived from
:data:`ARTEFACTS`: the notebooks ``kcd book`` executes and their order, the book's table of contents, the runs a
profile needs (``kcd book --plan``). Adding a table: one module here, one notebook.

A notebook works through a :class:`~kcdlib.artefacts.session.Session`::

    session = setup(profile, runs_dir, data_root, device, seeds=seeds)
    session.ensure(table1.ARTEFACT.runs(session.profile))
    table1.build(session)
"""

from __future__ import annotations

import importlib
import pkgutil

from ..identity import RunConfig
from ..profiles import Profile, get_profile
from ..registry import Registry
from .declare import Artefact, unique
from .format import Figure, Table
from .session import Session, setup

__all__ = ["ARTEFACTS", "Artefact", "Figure", "Session", "Table", "all_runs", "get", "names", "notebook_runs",
           "register", "setup", "unique"]  # fmt: skip

# name -> artefact, in the order the modules were found (reading order: names()).
ARTEFACTS: Registry[Artefact] = Registry("artefact")


def register(artefact: Artefact) -> Artefact:
    """Add ``artefact`` to the book (its notebook: ``notebooks/<name>.md``). A name is registered once."""
    if not artefact.name.isidentifier():
        raise ValueError(f"an artefact's name is a notebook's file name, a Python identifier: {artefact.name!r}")
    return ARTEFACTS.register(artefact.name, artefact)


def names() -> tuple[str, ...]:
    """The notebooks in reading order: by part (the method, then the paper), then by ``order``."""
    parts = {"method": 0, "paper": 1}
    ordered = sorted(ARTEFACTS.values(), key=lambda a: (parts.get(a.part, len(parts)), a.order, a.name))
    return tuple(a.name for a in ordered)


def get(name: str) -> Artefact:
    return ARTEFACTS[name]


def notebook_runs(profile: Profile | str) -> dict[str, list[RunConfig]]:
    """The runs each notebook asks for with its default parameters, in the order ``kcd book`` executes them."""
    p = get_profile(profile)
    return {name: ARTEFACTS[name].runs(ARTEFACTS[name].notebook_profile(p)) for name in names()}


def all_runs(profile: Profile | str) -> list[RunConfig]:
    """Every run the book needs for ``profile``, each once (for planning: count, estimate time)."""
    return unique(c for runs in notebook_runs(profile).values() for c in runs)


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if isinstance(getattr(module, "ARTEFACT", None), Artefact):
            register(module.ARTEFACT)


_discover()
