"""How fast this device runs now, relative to when its profile was measured.

A shared host's speed drifts: on this project's two-core machine the same subnet measured 10%
slower forty minutes after its profile was taken, which no predictor fitted to the profile can
know. `speed_factor` re-measures a few of the profile's own subnets (anchors spread over its
latency range, measured exactly as the profiler did) and returns the median ratio now/then, by
which predictions for this moment are scaled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nestnas.errors import ConfigError
from nestnas.hw_profiles.profile import DeviceProfile


@dataclass(frozen=True)
class SpeedCalibration:
    """`factor` = median over anchors of (latency now / latency in the profile); > 1: slower now."""

    factor: float
    anchors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def spread(self) -> tuple[float, float]:
        ratios = [a["ratio"] for a in self.anchors]
        return min(ratios), max(ratios)

    def to_dict(self) -> dict[str, Any]:
        return {"factor": self.factor, "anchors": self.anchors}


def pick_anchors(profile: DeviceProfile, n: int) -> list[str]:
    """`n` stable measurements at evenly spaced quantiles of the profile's latencies."""
    stable = sorted((m["median_ms"], k) for k, m in profile.measurements.items() if m["stable"])
    if n < 1:
        raise ConfigError(f"n_anchors must be at least 1, got {n}")
    if len(stable) < n:
        raise ConfigError(f"profile {profile.name!r} has {len(stable)} stable measurements, fewer than {n} anchors")
    picks = np.unique(np.round(np.linspace(0, len(stable) - 1, n + 2)[1:-1]).astype(int))
    return [stable[i][1] for i in picks]


def remeasure(profile: DeviceProfile, keys: list[str], passes: int = 1, seed: int = 0) -> dict[str, float]:
    """Median ms now of the profile's subnets `keys`, measured as the profiler did (its backend,
    exporter, threads, batch and model spec), over `passes` interleaved sweeps."""
    from nestnas.compile import get_backend, get_runner
    from nestnas.compile.stats import interleaved_sweeps
    from nestnas.hw_profiles.profiler import measure_module
    from nestnas.supernet.base import build_supernet
    from nestnas.supernet.config import SubnetConfig

    torch.manual_seed(profile.meta.get("seed", seed))
    net = build_supernet(profile.search_space(), **profile.spec).eval()
    backend = get_backend(profile.backend, threads=profile.fingerprint.get("threads"),
                          exporter=profile.fingerprint.get("exporter", "torchscript"))
    runner = get_runner(profile.backend)

    def measure(i: int, key: str) -> float:
        config = SubnetConfig.from_dict(profile.measurements[key]["config"])
        return measure_module(backend, runner, net.extract(config), net.input_specs(config, profile.batch_size),
                              seed + i)["median_ms"]

    return {k: float(np.median(v)) for k, v in interleaved_sweeps(keys, measure, passes).items()}


def speed_factor(profile: DeviceProfile, n_anchors: int = 5, passes: int = 2, seed: int = 0) -> SpeedCalibration:
    """Re-measure `n_anchors` of `profile`'s subnets on this device (`remeasure`, `passes` sweeps)
    and compare with the profile."""
    now = remeasure(profile, pick_anchors(profile, n_anchors), passes, seed)
    anchors = [{"hash": k, "profile_ms": profile.measurements[k]["median_ms"], "now_ms": ms,
                "ratio": ms / profile.measurements[k]["median_ms"]} for k, ms in now.items()]
    factor = float(np.exp(np.median([np.log(a["ratio"]) for a in anchors])))
    return SpeedCalibration(factor, anchors)
