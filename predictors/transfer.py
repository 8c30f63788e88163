"""The transfer latency predictor: a new device's latency from a few measured subnets, with the
default predictors of other devices' profiles (the priors) as features.

Each prior's default predictor (`fit_and_select(prior, "auto", holdout=None)`) predicts the log
latency of a config on its device; on devices of one space those predictions are nearly
collinear with the new device's log latency up to a device-specific mix (threads, batch size and
runtime change some blocks more than others). The method is picked by measurement
(`tools/bench_predictors.py --transfer`, leave one device out over the fleet):

- ``anchored``: ridge of log latency on the priors' log predictions and log MACs, shrunk towards
  the priors' mean (the target is log latency minus the mean of the priors' log predictions, so a
  strong penalty gives "the average prior, rescaled" rather than a constant). The default.
- ``ridge``: the same ridge shrunk towards zero (plain RidgeCV on standardised features).
- ``anchored+config``: ``anchored``, then a strongly penalised ridge of its residual on the config
  features (what no prior saw, e.g. an operator that only this runtime makes slow).
- ``anchored+gbt``: ``anchored``, then small boosted trees on its residual.

Measured (leave one device out over the 4-device CNN fleet, 100 held-out subnets, 20 informative
subnets): the four are within 2 points of each other in the median (92-94% within +-10%, tau
0.96), ``anchored+gbt`` a little better at 50 subnets on TVM and worse at 10 on ONNX Runtime;
``anchored`` is the default as the simplest with the best worst case. Without priors the same 20
subnets give 42% and tau 0.88.

The priors' own predictions bound what any of these can reach, and a prior profiled without its
block table has only the config-feature ensemble as default (about 80% within +-10% on the CNN
fleet, against 97% for the table-based hybrid). `prior_predictors` therefore stacks such a prior
on the priors that have a table: ridge and boosted trees on the config features and the table
priors' log predictions, fitted on all of that prior's subnets (method ``stacked``; 87% -> 99%
within +-10% on the fleet's one-thread profile), which lifts the transfer fit by up to 14 points.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from nestnas.errors import ConfigError
from nestnas.hw_profiles.profile import DeviceProfile

TRANSFER_METHODS = ("anchored", "ridge", "anchored+config", "anchored+gbt", "stacked")
DEFAULT_METHOD = "anchored"
ALPHAS = np.logspace(-3, 4, 15)
_CACHE_SIZE = 32
_prior_cache: OrderedDict[tuple, Any] = OrderedDict()


def prior_predictor(profile: DeviceProfile, sha256: str, exclude: frozenset[str] = frozenset(), seed: int = 0):
    """The default latency predictor of prior `profile` (whose file has checksum `sha256`), fitted on
    all its usable subnets but `exclude`; kept in memory per (checksum, exclude, seed), since a
    transfer profile's every fit (hold-out, cross-validation, reload) needs the same priors."""
    from nestnas.predictors.fitting import fit_and_select  # fitting imports this module's users

    key = (sha256, frozenset(exclude), seed)
    if key in _prior_cache:
        _prior_cache.move_to_end(key)
        return _prior_cache[key]
    sub = profile
    if exclude:
        sub = DeviceProfile(**{**profile.__dict__,
                               "measurements": {k: r for k, r in profile.measurements.items() if k not in exclude}})
    predictor = fit_and_select(sub, "auto", holdout=None, seed=seed).predictor
    _prior_cache[key] = predictor
    while len(_prior_cache) > _CACHE_SIZE:
        _prior_cache.popitem(last=False)
    return predictor


class PriorSet(tuple):
    """The fitted prior predictors of a transfer predictor. A tuple of its own type so that
    `sklearn.base.clone` copies it whole (a plain tuple of estimators would be cloned member by
    member into unfitted ones, and the clone could not predict)."""

    __slots__ = ()


def _has_table(predictor) -> bool:
    return getattr(predictor, "kind", None) in ("lut", "hybrid")


def prior_predictors(priors, exclude: frozenset[str] = frozenset(), seed: int = 0) -> tuple:
    """The predictors of `priors` ((sha256, DeviceProfile) pairs, in order) that a transfer fit
    uses: each prior's default predictor, except that a prior without a block table is stacked on
    the priors that have one (see the module's docstring)."""
    from nestnas.predictors.latency import LatencyPredictor

    base = [prior_predictor(p, sha, exclude, seed) for sha, p in priors]
    tables = tuple(b for b in base if _has_table(b))
    table_shas = tuple(sha for (sha, _), b in zip(priors, base) if _has_table(b))
    out = []
    for (sha, p), b in zip(priors, base):
        if _has_table(b) or not tables:
            out.append(b)
            continue
        key = ("stacked", sha, table_shas, frozenset(exclude), seed)
        if key not in _prior_cache:
            from nestnas.predictors.fitting import fitting_hashes

            keys = [k for k in fitting_hashes(p)[0] if k not in exclude]
            X, y = p.to_xy(keys)
            _prior_cache[key] = LatencyPredictor(p.search_space(), "transfer", spec=p.spec, members=("stacked",),
                                                 priors=tables, seed=seed).fit(X, y)
            while len(_prior_cache) > _CACHE_SIZE:
                _prior_cache.popitem(last=False)
        out.append(_prior_cache[key])
    return PriorSet(out)


def transfer_priors(profile: DeviceProfile, seed: int = 0) -> tuple:
    """The predictors of every prior a transfer profile names (checksums verified), as
    `prior_predictors` makes them."""
    from nestnas.hw_profiles.transfer import load_priors

    return prior_predictors([(ref.sha256, prior) for ref, prior in load_priors(profile)], seed=seed)


def prior_log_latency(priors, X) -> np.ndarray:
    """(n, priors) log latency of encoded configs `X` predicted by each prior."""
    return np.column_stack([np.log(np.maximum(p.predict(X), 1e-9)) for p in priors])


class TransferFit:
    """The regression behind ``LatencyPredictor(kind="transfer")``: `Z` the priors' log
    predictions, `F` the config features (log MACs in column `macs_col`), `t` log latency."""

    def __init__(self, method: str, seed: int, macs_col: int):
        if method not in TRANSFER_METHODS:
            raise ConfigError(f"unknown transfer method {method!r}; allowed: {list(TRANSFER_METHODS)}")
        self.method, self.seed, self.macs_col = method, seed, macs_col

    def _base(self, Z: np.ndarray, F: np.ndarray) -> np.ndarray:
        return np.column_stack([Z, F[:, self.macs_col]])

    def _offset(self, Z: np.ndarray) -> np.ndarray:
        return np.zeros(len(Z)) if self.method == "ridge" else Z.mean(axis=1)

    def fit(self, Z: np.ndarray, F: np.ndarray, t: np.ndarray) -> TransferFit:
        if self.method == "stacked":
            from nestnas.predictors.latency import _Ensemble

            self.stack_ = _Ensemble(("ridge", "gbt"), self.seed).fit(np.column_stack([F, Z]), t)
            self.sigma_ = 0.0
            return self
        with threadpool_limits(1):
            self.base_ = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS)).fit(self._base(Z, F),
                                                                                       t - self._offset(Z))
            resid = t - self._offset(Z) - self.base_.predict(self._base(Z, F))
            self.residual_ = None
            if self.method == "anchored+config":
                # Strong penalties only: a few points must not buy a config feature much weight.
                self.residual_ = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(1, 5, 9))).fit(F, resid)
            elif self.method == "anchored+gbt":
                self.residual_ = HistGradientBoostingRegressor(
                    max_iter=100, learning_rate=0.05, max_leaf_nodes=7, min_samples_leaf=max(3, len(t) // 8),
                    l2_regularization=1.0, random_state=self.seed).fit(F, resid)
            fitted = self._predict(Z, F)
        # One spread for every config: the fit's root-mean-square error in log space, widened for
        # its degrees of freedom (a handful of points fit themselves too well).
        dof = max(len(t) - Z.shape[1] - 2, 1)
        self.sigma_ = float(np.sqrt(np.sum((t - fitted) ** 2) / dof))
        return self

    def _predict(self, Z: np.ndarray, F: np.ndarray) -> np.ndarray:
        out = self._offset(Z) + self.base_.predict(self._base(Z, F))
        if self.residual_ is not None:
            out = out + self.residual_.predict(F)
        return out

    def predict(self, Z: np.ndarray, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.method == "stacked":
            return self.stack_.predict(np.column_stack([F, Z]))
        with threadpool_limits(1):
            return self._predict(Z, F), np.full(len(Z), self.sigma_)
