"""One policy on unstable measurements for every caller that fits a latency predictor (the CLI's
`fit`, the quickstart, the search presets): the stable ones; all of them, with a warning, when
fewer than MIN_STABLE are stable."""
import numpy as np
import pytest

from nestnas.compile.runners import Measurement
from nestnas.errors import ConfigError
from nestnas.hw_profiles.profile import DeviceProfile
from nestnas.predictors.fitting import MIN_STABLE, fit_and_select, fitting_hashes
from nestnas.supernet.space import SearchSpace

TINY_TR = SearchSpace.transformer(depth_choices=(1, 2), embed_choices=(16, 32), head_choices=(1, 2),
                                  mlp_ratio_choices=(2.0, 4.0), head_dim=8)


def synthetic(n: int, n_stable: int) -> DeviceProfile:
    """n distinct subnets, the first n_stable flagged stable; latency grows with the encoding."""
    profile = DeviceProfile("box", {"backend": "onnxruntime", "threads": 1}, TINY_TR.to_dict(), {"num_classes": 10}, 1)
    rng = np.random.default_rng(0)
    while len(profile.measurements) < n:
        x = rng.integers(0, np.asarray(TINY_TR.upper_bounds()) + 1)
        config = TINY_TR.canonical(TINY_TR.decode(x))
        if TINY_TR.config_hash(config) in profile.measurements:
            continue
        ms = 0.1 + 0.05 * float(x.sum())
        stats = Measurement(ms, ms, ms, 0.01, 20, 0.01, len(profile.measurements) < n_stable, 1).to_dict()
        profile.add(config, {**stats, "passes": [stats]})
    return profile


def test_stable_measurements_only_when_there_are_enough():
    profile = synthetic(12, MIN_STABLE)
    keys, warning = fitting_hashes(profile)
    assert warning is None and keys == sorted(k for k, m in profile.measurements.items() if m["stable"])
    fit = fit_and_select(profile, "auto", holdout=None)
    assert fit.kind == "ensemble" and fit.train == keys and fit.warning is None  # no blocks: ensemble only


def test_all_measurements_with_a_warning_when_too_few_are_stable():
    profile = synthetic(12, MIN_STABLE - 1)
    keys, warning = fitting_hashes(profile)
    assert keys == sorted(profile.measurements)
    assert warning == f"only {MIN_STABLE - 1} of 12 subnet measurements of profile 'box' are stable " \
                      f"(fewer than {MIN_STABLE}); fitting on all 12"
    fit = fit_and_select(profile, "auto", holdout=1 / 3)
    assert fit.warning == warning and len(fit.train) == 8 and len(fit.held) == 4
    assert set(fit.scores) == {"ensemble"} and set(fit.train) | set(fit.held) == set(keys)


def test_bad_kind_and_too_few_subnets_name_the_parameter():
    with pytest.raises(ConfigError, match=r"^kind 'magic': unknown latency predictor; allowed: \['auto'"):
        fit_and_select(synthetic(12, 12), "magic")
    with pytest.raises(ConfigError, match=r"^kind 'hybrid' needs every block measured"):
        fit_and_select(synthetic(12, 12), "hybrid")
    with pytest.raises(ConfigError, match="has 6 measured subnets; at least 7"):
        fit_and_select(synthetic(6, 6), holdout=None)
