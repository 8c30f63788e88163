"""Fit predictors on a profile or accuracy table and score them on held-out subnets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from nestnas.errors import ConfigError
from nestnas.hw_profiles.budget import MIN_USABLE_SUBNETS
from nestnas.hw_profiles.profile import DeviceProfile
from nestnas.predictors.accuracy_data import AccuracyTable
from nestnas.predictors.latency import LATENCY_KINDS
from nestnas.predictors.metrics import prediction_metrics
from nestnas.predictors.store import fit_accuracy, fit_latency


def split_hashes(keys, holdout: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held-out) split of measurement keys, a pure function of the keys and seed."""
    if not 0.0 < holdout < 1.0:
        raise ConfigError(f"holdout {holdout}: allowed: between 0 and 1 (exclusive)")
    keys = sorted(keys)
    n_hold = int(round(holdout * len(keys)))
    if n_hold < 2 or len(keys) - n_hold < 5:
        raise ConfigError(f"{len(keys)} measured subnets are too few for a held-out split of {holdout}; "
                          "need at least 5 to fit and 2 to test")
    order = np.random.default_rng(seed).permutation(len(keys))
    held = [keys[i] for i in order[:n_hold]]
    return [keys[i] for i in order[n_hold:]], held


def available_kinds(profile: DeviceProfile) -> list[str]:
    """The latency predictors a profile supports: the table-based ones only when it holds every
    distinct block of its space (a profile may have been stopped while measuring blocks), the
    transfer one only on a transfer profile (which names its priors)."""
    from nestnas.hw_profiles.blocks import all_parts
    from nestnas.hw_profiles.profiler import block_table
    from nestnas.hw_profiles.transfer import is_transfer
    from nestnas.supernet.base import build_supernet

    complete = False
    if profile.blocks:
        parts = all_parts(build_supernet(profile.search_space(), **profile.spec))
        complete = set(parts) <= set(block_table(profile))
    allowed = {"ensemble", *(("lut", "hybrid") if complete else ()), *(("transfer",) if is_transfer(profile) else ())}
    return [k for k in LATENCY_KINDS if k in allowed]


def score_latency(profile: DeviceProfile, kinds, train: list[str], held: list[str], seed: int = 0) -> dict[str, Any]:
    """kind -> held-out metrics (and the fitted predictor under "_predictors")."""
    X_held, y_held = profile.to_xy(held)
    out: dict[str, Any] = {"_predictors": {}}
    for kind in kinds:
        predictor = fit_latency(profile, kind, train, seed)
        out[kind] = prediction_metrics(y_held, predictor.predict(X_held))
        out["_predictors"][kind] = predictor
    return out


MIN_CV_FIT = 8  # subnets each cross-validation fit needs at least


def choose_kind(profile: DeviceProfile, kinds, train: list[str], seed: int = 0, folds: int = 4) -> tuple[str, dict]:
    """The latency predictor to use for `profile`, chosen by K-fold cross-validation on the
    training subnets only (held-out subnets stay unseen): highest share within +-10%, then
    lowest MAPE; on a transfer profile, the transfer predictor. Returns (kind, kind -> mean CV
    metrics)."""
    kinds = list(kinds)
    keys = sorted(train)
    if "transfer" in kinds:
        # A transfer profile's few subnets cannot cross-validate much; the transfer predictor beats
        # the same subnets without priors at every count measured (tools/bench_predictors.py --transfer).
        return "transfer", {}
    if len(kinds) == 1 or len(keys) < 2 * MIN_CV_FIT:
        # Too few subnets to cross-validate: the table-based hybrid, the best on every shipped profile.
        return ("hybrid" if "hybrid" in kinds else kinds[0]), {}
    folds = max(2, min(folds, len(keys) // MIN_CV_FIT))
    order = np.random.default_rng(seed + 1).permutation(len(keys))
    cv: dict[str, dict[str, float]] = {}
    for kind in kinds:
        runs = []
        for f in range(folds):
            test = np.zeros(len(keys), bool)
            test[order[f::folds]] = True
            X, y = profile.to_xy([k for k, t in zip(keys, test) if t])
            fit = [k for k, t in zip(keys, test) if not t]
            runs.append(prediction_metrics(y, fit_latency(profile, kind, fit, seed).predict(X)))
        cv[kind] = {m: float(np.mean([r[m] for r in runs])) for m in ("within_10pct", "mape", "kendall_tau")}
    best = max(kinds, key=lambda k: (round(cv[k]["within_10pct"], 3), -cv[k]["mape"]))
    return best, cv


def score_accuracy(table: AccuracyTable, train: list[str], held: list[str], seed: int = 0):
    X_held, y_held = table.to_xy(held)
    predictor = fit_accuracy(table, train, seed)
    return predictor, prediction_metrics(y_held, predictor.predict(X_held))


# --- fit and select: the one policy every caller (CLI, quickstart, search presets) uses --------
MIN_STABLE = MIN_USABLE_SUBNETS  # 5 subnets to fit and 2 to test


def fitting_hashes(profile: DeviceProfile, min_stable: int = MIN_STABLE) -> tuple[list[str], str | None]:
    """(measurement keys to fit on, warning or None). The stable measurements; where fewer than
    `min_stable` are stable (a busy host flags most medians, which are still the best estimates
    there are), all of them, with a warning saying so."""
    stable = sorted(k for k, m in profile.measurements.items() if m.stable)
    if len(stable) >= min_stable:
        return stable, None
    n = len(profile.measurements)
    return sorted(profile.measurements), (f"only {len(stable)} of {n} subnet measurements of profile "
                                          f"{profile.name!r} are stable (fewer than {min_stable}); fitting on all "
                                          f"{n}")


@dataclass(frozen=True)
class LatencyFit:
    """What `fit_and_select` chose: the `kind`, its `predictor` fitted on `train`, the held-out
    `scores` of every available kind (empty without a hold-out), the cross-validation figures
    behind an automatic choice and the warning of `fitting_hashes`."""

    kind: str
    predictor: Any
    kinds: list[str]
    train: list[str]
    held: list[str]
    scores: dict[str, dict[str, float]]
    cv: dict[str, dict[str, float]]
    warning: str | None


def fit_and_select(profile: DeviceProfile, kind: str = "auto", holdout: float | None = 1 / 3,
                   seed: int = 0) -> LatencyFit:
    """Fit the latency predictors a profile supports and choose one: `kind` "auto" picks by
    cross-validation on the fitting subnets only. With `holdout`, that share of the usable
    subnets is kept out of fitting and every kind is scored on it; with None, all are fitted on."""
    if kind not in ("auto", *LATENCY_KINDS):
        raise ConfigError(f"kind {kind!r}: unknown latency predictor; allowed: {['auto', *LATENCY_KINDS]}")
    kinds = available_kinds(profile)
    if kind != "auto" and kind not in kinds:
        if kind == "transfer":
            raise ConfigError(f"kind 'transfer' needs a transfer profile (`nestnas profile --transfer`); profile "
                              f"{profile.name!r} is a full one; allowed here: {kinds}")
        raise ConfigError(f"kind {kind!r} needs every block measured, which profile {profile.name!r} lacks "
                          f"(resume its profiling run); allowed here: {kinds}")
    usable, warning = fitting_hashes(profile)
    if holdout is None:
        if len(usable) < MIN_STABLE:
            raise ConfigError(f"profile {profile.name!r} has {len(usable)} measured subnets; at least {MIN_STABLE} "
                              "are needed to fit a latency predictor")
        train, held, scores, fitted = usable, [], {}, {}
    else:
        train, held = split_hashes(usable, holdout, seed)
        scores = score_latency(profile, kinds, train, held, seed)
        fitted = scores.pop("_predictors")
    cv: dict[str, dict[str, float]] = {}
    if kind == "auto":
        kind, cv = choose_kind(profile, kinds, train, seed)
    predictor = fitted.get(kind) or fit_latency(profile, kind, train, seed)
    return LatencyFit(kind, predictor, kinds, train, held, scores, cv, warning)
