"""One object for a build's options: made once, from the command line (``kcd book``, ``kcd notebook``) or from a
notebook's ``build`` parameter, checked once, and handed down to the session, the plan, the cluster and the run pages.

A notebook declares one build parameter, ``build = {}``; ``kcd book`` fills it, ``kcd notebook table5 -p temperature
2`` sets one of its fields, and so does ``papermill ... -y 'build: {temperature: 2}'`` (or ``-p temperature 2``:
a field given on its own is taken too, see :meth:`BuildOptions.from_notebook`). Every field's default keeps the
profile's (or the paper's) value.

The loss and KCD knobs are run options, named as the options they set (:data:`KNOBS`): ``kd_weight`` is the KD
term's weight α, ``cost_exponent`` the exponent α of KCD's value score (F/T)^α · V; the paper writes both α.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from . import distillers, methods
from .errors import BadOption
from .fastpath import COMPILE_MODES
from .identity import MAX_SEED
from .options import checked_list
from .options import device as resolve_device
from .profiles import Profile, get_profile
from .registry import did_you_mean
from .runs import STALE_POLICIES

# The course's knobs: a build option named as the run option it sets -> whose option it is. A loss knob sets that
# option of every distiller that has it (UNIX's own loss is UNIX's protocol and keeps its values); a KCD knob sets
# it on every KCD run (the tables that vary one keep their own value).
KNOBS = {"temperature": "loss", "gamma": "loss", "kd_weight": "loss", "beta": "loss", "rho": "kcd",
         "cost_exponent": "kcd"}  # fmt: skip

NOTEBOOK_DEFAULTS = {"data_root": "../data", "runs_dir": "../runs"}


@dataclass(frozen=True)
class BuildOptions:
    """A build of the book (or of one notebook): which profile, where the data and the run store are, where and
    how missing runs train, a shorter schedule for a rehearsal, and the knobs that make other runs.
    ``None`` keeps the profile's value."""

    profile: str = "smoke"  # smoke (CPU, minutes), course (one GPU), paper (the paper's protocol), tiny (tests)
    data_root: str = "data"  # where CIFAR-100 / ImageNet live (digits is embedded in scikit-learn)
    runs_dir: str = "runs"  # the run store: finished runs are reused, never retrained
    device: str | None = None  # the profile's device, or "cpu", "cuda", "cuda:1"
    devices: tuple[str, ...] | None = None  # spread the missing runs over these devices
    jobs_per_device: int = 1  # runs at once on each device (small CIFAR networks leave a GPU mostly idle)
    compile: str = "off"  # how steps run: kcdlib.fastpath.COMPILE_MODES
    stale: str = "stop"  # a record of these options made on other data or code: stop, rerun or keep
    teachers_dir: str | None = None  # RepDistiller's published teachers, used wherever one exists
    seeds: tuple[int, ...] | None = None  # e.g. (0, 1, 2) for mean ± sd
    epochs: int | None = None  # a rehearsal shortens the schedule (the paper: 240)
    stage_epochs: int | None = None  # KCD's stage length T (the paper: 40)
    teacher_epochs: int | None = None
    temperature: float | None = field(default=None, metadata={"help": "KD temperature T (4)"})
    gamma: float | None = field(default=None, metadata={
        "help": "weight γ of the cross-entropy with the labels (KD 0.1, PKT and CRD 1)"})  # fmt: skip
    kd_weight: float | None = field(default=None, metadata={"help": "weight α of the KD term (KD 0.9)"})
    beta: float | None = field(default=None, metadata={"help": "weight β of the feature term (PKT 30000, CRD 0.8)"})
    rho: float | None = field(default=None, metadata={"help": "KCD's final keep-ratio ρ (0.7)"})
    cost_exponent: float | None = field(default=None, metadata={
        "help": "exponent α of KCD's cost-aware value score (F/T)^α · V (0.03)"})  # fmt: skip
    progress_file: str | None = None  # kcd book's: where the session reports the run and epoch in progress
    book_root: str | None = None  # kcd book's: paths are shown relative to the book

    def __post_init__(self):
        get_profile(self.profile)
        for name in ("data_root", "runs_dir", "teachers_dir", "progress_file", "book_root"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str | Path):
                raise BadOption(f"build option {name} must be a folder path, got {value!r}")
            if value is not None:
                object.__setattr__(self, name, str(value))
        if self.device is not None:
            resolve_device(self.device)
        devices = checked_list("build option devices", self.devices, lambda d: isinstance(d, str), "device names")
        object.__setattr__(self, "devices", devices)
        for d in self.devices or ():
            resolve_device(d)
        seeds = checked_list("build option seeds", self.seeds, lambda s: _whole(s) and 0 <= s <= MAX_SEED,
                             f"whole numbers in [0, {MAX_SEED}]")  # fmt: skip
        object.__setattr__(self, "seeds", seeds)
        for name in ("jobs_per_device", "epochs", "stage_epochs", "teacher_epochs"):
            value = getattr(self, name)
            if (value is not None or name == "jobs_per_device") and not (_whole(value) and value >= 1):
                raise BadOption(f"build option {name} must be a whole number >= 1, got {value!r}")
        if self.compile not in COMPILE_MODES:
            raise BadOption(f"build option compile must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        if self.stale not in STALE_POLICIES:
            raise BadOption(f"build option stale must be one of {', '.join(STALE_POLICIES)}, got {self.stale!r}")
        for name in KNOBS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not math.isfinite(value)):  # fmt: skip
                raise BadOption(f"build option {name} must be a number, got {value!r}")
        self.applied()  # the profile with these options: the schedule and the knobs' own rules

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def help(cls, name: str) -> str:
        """What the field ``name`` sets (the command line's help)."""
        return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)

    @classmethod
    def from_mapping(cls, given: Mapping[str, Any]) -> BuildOptions:
        """From a mapping of field names (a notebook's ``build``, ``kcd book``'s flags); an unknown name is refused
        with the closest field."""
        for name in given:
            if name not in cls.names():
                hint = did_you_mean(str(name), cls.names())
                raise BadOption(f"unknown build option '{name}'{hint}: one of {', '.join(cls.names())}")
        return cls(**given)

    @classmethod
    def from_notebook(cls, namespace: Mapping[str, Any]) -> BuildOptions:
        """A notebook's build: its ``build`` dict, and any field papermill injected on its own (``-p profile course``
        sets ``profile`` beside ``build``), which wins."""
        build = namespace.get("build") or {}
        if not isinstance(build, Mapping):
            raise BadOption(f"parameter build must be a mapping of build options, got {build!r}")
        # A notebook runs in notebooks/: its data and its run store are the checkout's.
        return cls.from_mapping(
            {**NOTEBOOK_DEFAULTS, **build, **{n: namespace[n] for n in cls.names() if n in namespace}}
        )

    def as_parameters(self) -> dict[str, Any]:
        """The fields that differ from their defaults, as a notebook's ``build`` parameter (JSON-able)."""
        default = BuildOptions()
        out = {}
        for name, value in asdict(self).items():
            if value != getattr(default, name):
                out[name] = list(value) if isinstance(value, tuple) else value
        return out

    def with_(self, **changes: Any) -> BuildOptions:
        """A copy with some fields changed (checked again)."""
        return replace(self, **changes)

    def schedule(self) -> dict[str, int]:
        """The schedule this build sets (a rehearsal of a long profile): ``epochs``, ``stage_epochs``,
        ``teacher_epochs``, those given."""
        return {k: getattr(self, k) for k in ("epochs", "stage_epochs", "teacher_epochs") if getattr(self, k)}

    def applied(self, profile: Profile | str | None = None) -> Profile:
        """The profile with these options: seeds, the schedule (Table 3's follows it), the knobs as run options."""
        p = get_profile(profile or self.profile)
        schedule = self.schedule()
        knobs = {"loss": {}, "kcd": {}}
        for name, owner in KNOBS.items():
            if getattr(self, name) is not None:
                knobs[owner][name] = getattr(self, name)
        p = p.with_options(seeds=self.seeds, **schedule, loss_options={**p.loss_options, **knobs["loss"]},
                           kcd_options={**p.kcd_options, **knobs["kcd"]})  # fmt: skip
        # KCD's own rules (I a multiple of T, ρ in (0, 1], ...) are KCD's options' (kcdlib.methods); the book's is
        # that a run shows KCD condensing: two stages at least.
        methods.canonical_options("kcd", {**p.kcd_options, "stage_epochs": p.stage_epochs}, p.epochs, 64)
        if p.epochs < 2 * p.stage_epochs:
            raise BadOption(f"build option epochs ({p.epochs}) must be at least two stages of stage_epochs "
                            f"({p.stage_epochs}): the book shows KCD condensing")  # fmt: skip
        for name, cls in distillers.DISTILLERS.items():
            given = {k: v for k, v in p.loss_options.items() if k in cls.option_specs}
            if given:
                distillers.canonical_options(name, given)
        return p


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
