"""Latency and accuracy predictors with the scikit-learn estimator contract.

`X` is always a matrix of encoded configs (rows of `space.encode(config)`), `y` the measured
median latency in ms (or the shared-weight accuracy). Three latency predictors:

- ``lut``: Once-for-All's lookup table. The latencies of a subnet's parts (stem, blocks, head)
  measured in isolation, summed per kind of part, then combined by a non-negative least-squares
  fit with a per-part and a per-run overhead (what a table of isolated parts cannot see: data
  handed between layers, the run's fixed cost). The fit weighs relative error, like the +-10%
  target.
- ``ensemble``: ridge, gradient-boosted trees and a small MLP on config features, fitted to
  log latency (errors are relative); the prediction is the members' mean and the uncertainty
  their spread.
- ``hybrid``: the table's estimate times a learned residual: ridge and boosted trees on the
  config features and the log table estimate, fitted to log(measured / table estimate).
- ``transfer``: for a transfer profile (a few subnets of a new device): a ridge of log latency on
  the log predictions of other devices' default predictors (`priors`) and log MACs
  (`nestnas.predictors.transfer`; `members` names the method, by default ``("anchored",)``).
  With a `block_table` of the new device (a transfer profile measured with blocks), that
  table's sum, scaled on the same few subnets, is one more prior.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import nnls
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import RidgeCV
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

from nestnas.errors import ConfigError
from nestnas.predictors.features import check_encoded, config_features, nesting_features
from nestnas.supernet.space import SearchSpace

LATENCY_KINDS = ("lut", "ensemble", "hybrid", "transfer")
MEMBERS = ("ridge", "gbt", "mlp")
# The residual of the table is small and smooth: the MLP only adds variance there.
DEFAULT_MEMBERS = {"ensemble": MEMBERS, "hybrid": ("ridge", "gbt")}


def _member(name: str, seed: int):
    if name == "ridge":
        return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-4, 3, 15)))
    if name == "gbt":
        return HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05, max_leaf_nodes=15, min_samples_leaf=5,
                                             l2_regularization=1e-3, random_state=seed)
    if name == "mlp":
        return make_pipeline(StandardScaler(), MLPRegressor(hidden_layer_sizes=(64, 64), alpha=1e-3, max_iter=3000,
                                                            learning_rate_init=3e-3, random_state=seed))
    if name == "forest":
        from sklearn.ensemble import RandomForestRegressor

        return RandomForestRegressor(n_estimators=100, min_samples_leaf=2, max_features=0.5, random_state=seed)
    raise ConfigError(f"unknown ensemble member {name!r}; allowed: {[*MEMBERS, 'forest']}")


class _Ensemble:
    """Members fitted on the same features and target; mean and spread of their predictions."""

    def __init__(self, members: tuple[str, ...], seed: int):
        self.models = [_member(m, seed) for m in members]

    def fit(self, F: np.ndarray, t: np.ndarray) -> _Ensemble:
        # One thread: a few hundred rows gain nothing from OpenMP, and spinning threads would
        # fight a runtime being profiled on the same cores.
        with threadpool_limits(1):
            for model in self.models:
                model.fit(F, t)
        return self

    def predict(self, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with threadpool_limits(1):
            preds = np.stack([m.predict(F) for m in self.models])
        return preds.mean(axis=0), preds.std(axis=0)


def default_spec(space: SearchSpace) -> dict:
    """The constructor spec of the family's default supernet (e.g. 10 classes, 1 channel)."""
    from nestnas.supernet.families import supernet_class

    return supernet_class(space.family).default_spec()


def _check_xy(space: SearchSpace, X, y, positive: bool) -> tuple[np.ndarray, np.ndarray]:
    X = check_encoded(space, X)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if len(y) != len(X):
        raise ConfigError(f"X has {len(X)} rows but y has {len(y)} values")
    if len(y) < 5:
        raise ConfigError(f"a predictor needs at least 5 measured subnets to fit, got {len(y)}")
    if not np.all(np.isfinite(y)) or (positive and np.any(y <= 0)):
        raise ConfigError("targets must be finite" + (" and positive latencies" if positive else ""))
    return X, y


class LatencyPredictor(RegressorMixin, BaseEstimator):
    """Predicts a subnet's latency (ms) on one device and backend from its encoded config.

    Parameters are stored as given (scikit-learn contract). `spec` is the supernet's
    constructor spec (`net.spec()`), needed for MACs; `block_table` maps part keys to median
    ms (`DeviceProfile.block_table()`), needed by ``lut`` and ``hybrid``; `priors` are fitted
    latency predictors of other devices of the same space, needed by ``transfer`` (give them as
    `nestnas.predictors.transfer.PriorSet` for `sklearn.base.clone` to keep them fitted)."""

    def __init__(self, space: SearchSpace, kind: str = "hybrid", spec: dict | None = None,
                 block_table: dict[str, float] | None = None, members: tuple[str, ...] | None = None, seed: int = 0,
                 priors: tuple | None = None):
        self.space = space
        self.kind = kind
        self.spec = spec
        self.block_table = block_table
        self.members = members
        self.seed = seed
        self.priors = priors

    def _check_params(self) -> None:
        if self.kind not in LATENCY_KINDS:
            raise ConfigError(f"unknown latency predictor kind {self.kind!r}; allowed: {list(LATENCY_KINDS)}")
        if self.kind in ("lut", "hybrid") and not self.block_table:
            raise ConfigError(f"latency predictor kind {self.kind!r} needs a block table (profile with blocks)")
        if self.kind == "transfer" and not self.priors:
            raise ConfigError("latency predictor kind 'transfer' needs the priors' fitted predictors (a transfer "
                              "profile names them)")

    def _spec(self) -> dict:
        return self.spec if self.spec is not None else default_spec(self.space)

    def lut_terms(self, X) -> np.ndarray:
        """Per config: the table's summed latency (ms) of each kind of part, the number of parts
        and a constant 1 (the design matrix of the table's fit)."""
        from nestnas.hw_profiles.blocks import config_part_keys

        X = check_encoded(self.space, X)
        keys = config_part_keys(self.space, X, self._spec())
        missing = sorted({k for row in keys for k in row if k not in self.block_table})
        if missing:
            raise ConfigError(f"the block table lacks {len(missing)} part(s), e.g. {missing[0]!r}; "
                              "re-profile with blocks")
        kinds = sorted({k.split(":", 1)[0] for k in self.block_table})
        return np.array([[sum(self.block_table[k] for k in row if k.split(":", 1)[0] == kind) for kind in kinds]
                         + [len(row), 1.0] for row in keys])

    def fit(self, X, y) -> LatencyPredictor:
        self._check_params()
        X, y = _check_xy(self.space, X, y, positive=True)
        if self.kind in ("lut", "hybrid"):
            A = self.lut_terms(X)
            self.lut_coef_ = nnls(A / y[:, None], np.ones_like(y))[0]  # minimises relative error
        if self.kind == "transfer":
            from nestnas.predictors.transfer import DEFAULT_METHOD, TransferFit

            if self.block_table:
                self.lut_coef_ = nnls(self.lut_terms(X) / y[:, None], np.ones_like(y))[0]
            method = (self.members or (DEFAULT_METHOD,))[0]
            self.transfer_ = TransferFit(method, self.seed, self.space.n_var).fit(
                self._prior_z(X), self._design(X), np.log(y))
        if self.kind in ("ensemble", "hybrid"):
            F, target = self._design(X), np.log(y)
            if self.kind == "hybrid":
                target = target - np.log(self._lut_fitted(X))
            members = self.members or DEFAULT_MEMBERS[self.kind]
            self.ensemble_ = _Ensemble(tuple(members), self.seed).fit(F, target)
        self.n_features_in_ = self.space.n_var
        return self

    def _prior_z(self, X) -> np.ndarray:
        """A transfer fit's features: the priors' log predictions, and with this device's own block
        table its table sum (fitted on the same few subnets) as one more prior. A runtime unlike
        every prior (TVM among ONNX Runtime devices) needs it: 53% -> 91% within +-10% at 20
        subnets (tools/bench_predictors.py --transfer)."""
        from nestnas.predictors.transfer import prior_log_latency

        Z = prior_log_latency(self.priors, X)
        return np.column_stack([Z, np.log(self._lut_fitted(X))]) if self.block_table else Z

    def _lut_fitted(self, X) -> np.ndarray:
        return np.maximum(self.lut_terms(X) @ self.lut_coef_, 1e-6)

    def _design(self, X) -> np.ndarray:
        F = config_features(self.space, X, self._spec())
        if self.kind == "hybrid":
            F = np.column_stack([F, np.log(self._lut_fitted(X))])
        return F

    def predict(self, X, return_std: bool = False):
        """Latency in ms; with `return_std`, also a 1-sigma uncertainty in ms (the ensemble
        members' spread; zero for the lookup table, which has no second opinion)."""
        check_is_fitted(self, "n_features_in_")
        X = check_encoded(self.space, X)
        if self.kind == "lut":
            mean, std = self._lut_fitted(X), np.zeros(len(X))
        elif self.kind == "transfer":
            log_mean, log_std = self.transfer_.predict(self._prior_z(X), self._design(X))
            mean = np.exp(log_mean)
            std = mean * log_std
        else:
            log_mean, log_std = self.ensemble_.predict(self._design(X))
            if self.kind == "hybrid":
                log_mean = log_mean + np.log(self._lut_fitted(X))
            mean = np.exp(log_mean)
            std = mean * log_std  # first-order: relative spread in log space
        return (mean, std) if return_std else mean


class AccuracyPredictor(RegressorMixin, BaseEstimator):
    """Predicts a subnet's shared-weight validation accuracy from its encoded config; the same
    ensemble as `LatencyPredictor` on the same features, fitted to accuracy directly."""

    def __init__(self, space: SearchSpace, spec: dict | None = None, members: tuple[str, ...] | None = None,
                 seed: int = 0):
        self.space = space
        self.spec = spec
        self.members = members
        self.seed = seed

    def _features(self, X) -> np.ndarray:
        spec = self.spec if self.spec is not None else default_spec(self.space)
        return np.column_stack([config_features(self.space, X, spec), nesting_features(self.space, X)])

    def fit(self, X, y) -> AccuracyPredictor:
        X, y = _check_xy(self.space, X, y, positive=False)
        self.ensemble_ = _Ensemble(tuple(self.members or MEMBERS), self.seed).fit(self._features(X), y)
        self.n_features_in_ = self.space.n_var
        return self

    def predict(self, X, return_std: bool = False):
        check_is_fitted(self, "n_features_in_")
        X = check_encoded(self.space, X)
        mean, std = self.ensemble_.predict(self._features(X))
        return (mean, std) if return_std else mean
