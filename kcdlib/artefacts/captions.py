"""What a table's caption says: the schedule and profile of the build, the pairs and seeds, the options that are
not the paper's (read from the runs' own configs), the teachers used."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .. import data as datasets
from .. import distillers
from ..identity import RunConfig
from ..methods import METHODS
from ..profiles import Profile, get_profile
from ..runs import RunStore
from .format import NOT_RUN


def changed_options(cfg: RunConfig) -> dict[str, Any]:
    """The run's method and distiller options that differ from their defaults (KCD's stage length: ``epochs/6``)."""
    changed = {}
    for name, value in cfg.method_options:
        spec = METHODS[cfg.method].option_specs[name]
        default = cfg.recipe.epochs // 6 if name == "stage_epochs" and cfg.recipe.epochs % 6 == 0 else spec.default
        if value != default:
            changed[name] = value
    for name, value in cfg.distiller_options:
        if value != distillers.DISTILLERS[cfg.distiller].option_specs[name].default:
            changed[name] = value
    return changed


def non_default_options(cfg: RunConfig) -> str:
    """:func:`changed_options` as ``rho=0.5 temperature=2`` (and a published teacher said)."""
    parts = [f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
             for name, value in changed_options(cfg).items()]  # fmt: skip
    if cfg.teacher_sha256 is not None:
        parts.append("published teacher")
    return " ".join(parts)


def resolution(dataset: str) -> str:
    """How fine a top-1 difference the test split can show: one test image in points of top-1 %."""
    spec = datasets.spec(dataset)
    return (f"Resolution: {spec.num_test:,} test images of {dataset}, one image = "
            f"{spec.points_per_test_image:.2f} points of top-1.")  # fmt: skip


def caption(
    title: str,
    profile: Profile,
    pairs: Iterable[str],
    dataset: str | None = None,
    paper_note: str = "paper: as published (CIFAR-100)",
    teachers: str = "",
    epochs: tuple[int, int] | None = None,
    runs: Iterable[RunConfig] = (),
    varied: Iterable[str] = (),
) -> str:
    """A table's caption: the schedule of this build first, then the profile, the pairs, seeds and what the
    columns mean. ``runs`` (the runs behind the table) name every option that differs from the paper's in them,
    except the ``varied`` ones (the table's rows say those)."""
    shown = [f"{p} → {'/'.join(profile.run_pair(p))}" if profile.pairs.get(p, p) != p else p for p in pairs]
    seed_list = ", ".join(map(str, profile.seeds))
    many = " (mean ± sd over seeds)" if len(profile.seeds) > 1 else ""
    other = f" Dataset: {dataset}." if dataset and dataset != profile.dataset else ""
    epochs, stage = epochs or (profile.epochs, profile.stage_epochs)
    own = get_profile(profile.name)
    rescheduled = (profile.epochs, profile.stage_epochs, profile.teacher_epochs) != (
        own.epochs, own.stage_epochs, own.teacher_epochs)  # fmt: skip
    return (
        f"{title}. This build: {epochs} epochs, KCD stages of {stage}{changed_settings(runs, varied)}. Profile "
        f"'{profile.name}'{' with its schedule changed by the parameters (its own: ' if rescheduled else ' ('}"
        f"{profile.description}).{other} Pairs run (paper → run): {'; '.join(shown) or 'none'}. Seeds: {seed_list}. "
        f"Ours: top-1 % at the last epoch / at the best epoch{many}; the paper most likely printed the best epoch "
        f"(the released KCD script reports the best test accuracy; RepDistiller, whose baselines it quotes, the "
        f"last). {resolution(dataset or profile.dataset)} "
        f"{paper_note}; '{NOT_RUN}': not run on this profile. C: counted computation relative to KD.{teachers}"
    )


# How a caption names an option (the paper's symbols where it has one).
OPTION_NAMES = {"temperature": "T", "gamma": "γ", "kd_weight": "α (KD term)", "cost_exponent": "α", "beta": "β",
                "rho": "ρ"}  # fmt: skip


def changed_settings(runs: Iterable[RunConfig], varied: Iterable[str] = ()) -> str:
    """``; not the paper's: T=2 (every run), ...``: the options of ``runs`` that differ from the paper's defaults,
    from the runs' own configs, ``varied`` left out, and KCD's stage length (the caption states it); "" when none."""
    seen: dict[str, list] = {}
    runs = [c for c in runs if c.kind == "distill"]
    for cfg in runs:
        for name, value in changed_options(cfg).items():
            if name not in (*varied, "stage_epochs") and value not in seen.setdefault(name, []):
                seen[name].append(value)
    if not seen:
        return ""
    parts = [f"{OPTION_NAMES.get(n, n)}={'/'.join(f'{v:g}' if isinstance(v, float) else str(v) for v in vs)}"
             for n, vs in seen.items()]  # fmt: skip
    return f"; not the paper's settings: {', '.join(parts)}"


def teachers(store: RunStore, configs: Iterable[RunConfig]) -> str:
    """Which teachers the runs distilled from, each with the accuracy measured here when it was used."""
    seen: dict[str, str] = {}
    for cfg in configs:
        if cfg.kind != "distill" or cfg.teacher_arch in seen:
            continue
        rec = store.record(cfg) or {}
        acc = (rec.get("teacher_accuracy") or {}).get("top1")
        where = "a published checkpoint" if cfg.teacher is None else "trained here"
        seen[cfg.teacher_arch] = f"{cfg.teacher_arch}, {where}" + ("" if acc is None else f" ({acc:.2f} % top-1)")
    return f" Teachers (top-1 measured here): {'; '.join(seen.values())}." if seen else ""
