"""Fit predictors on a profile or accuracy table and score them on held-out subnets."""

from __future__ import annotations

from typing import Any

import numpy as np

from nestnas.errors import ConfigError
from nestnas.hw_profiles.profile import DeviceProfile
from nestnas.predictors.accuracy_data import AccuracyTable
from nestnas.predictors.latency import LATENCY_KINDS
from nestnas.predictors.metrics import prediction_metrics
from nestnas.predictors.store import fit_accuracy, fit_latency


def split_hashes(keys, holdout: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held-out) split of measurement keys, a pure function of the keys and seed."""
    if not 0.0 < holdout < 1.0:
        raise ConfigError(f"--holdout must be between 0 and 1, got {holdout}")
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
    distinct block of its space (a profile may have been stopped while measuring blocks)."""
    from nestnas.hw_profiles.blocks import all_parts
    from nestnas.hw_profiles.profiler import block_table
    from nestnas.supernet.base import build_supernet

    parts = all_parts(build_supernet(profile.search_space(), **profile.spec))
    complete = bool(profile.blocks) and set(parts) <= set(block_table(profile))
    return [k for k in LATENCY_KINDS if complete or k == "ensemble"]


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
    lowest MAPE. Returns (kind, kind -> mean CV metrics)."""
    kinds = list(kinds)
    keys = sorted(train)
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
