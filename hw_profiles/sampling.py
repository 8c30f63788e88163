"""Space-filling samples of a search space for profiling.

Uniform sampling of each choice makes total cost a sum of many independent terms, so it
clusters around the middle of the space (central limit) and misses the small and large ends
that a Pareto front lives on. Here every sample first draws a size level from a Latin
hypercube over [0, 1], then draws each choice around that level, so small, medium and large
subnets are all covered while choices still vary within a level.
"""

from __future__ import annotations

import numpy as np

from nestnas.errors import ConfigError
from nestnas.supernet.config import SubnetConfig
from nestnas.supernet.space import SearchSpace

MAX_SAMPLES = 10_000  # hours of profiling at two passes; the sampler's arrays stay small


def sample_range(space: SearchSpace, low: int = 2) -> tuple[int, int]:
    """(lowest, highest) sample count allowed for `space`: no more than its distinct subnets,
    nor MAX_SAMPLES."""
    return low, max(low, min(space.size(), MAX_SAMPLES))


def check_sample_count(space: SearchSpace, n: int, option: str = "n_samples", low: int = 2) -> int:
    """`n` if it is within `sample_range`, else a ConfigError naming the allowed range."""
    lo, hi = sample_range(space, low)
    if not lo <= n <= hi:
        raise ConfigError(f"{option} {n} is out of range; allowed: {lo} to {hi} (this space has {space.size()} "
                          f"distinct subnets; at most {MAX_SAMPLES} are sampled)")
    return n


def space_filling_sample(space: SearchSpace, n: int, seed: int = 0, spread: float = 0.25,
                         include_extremes: bool = True) -> list[SubnetConfig]:
    """`n` configs with distinct canonical forms (fewer only if the space is smaller)."""
    if n > MAX_SAMPLES:
        raise ConfigError(f"{n} samples are too many; at most {MAX_SAMPLES} are drawn")
    rng = np.random.default_rng(seed)
    top = space.upper_bounds()
    out: list[SubnetConfig] = []
    seen: set[str] = set()

    def keep(config: SubnetConfig) -> None:
        key = space.config_hash(config)
        if key not in seen:
            seen.add(key)
            out.append(config)

    if include_extremes and n >= 2:
        keep(space.smallest())
        keep(space.largest())
    attempts = 0
    while len(out) < n and attempts < 50 * n:
        remaining = n - len(out)
        levels = (rng.permutation(remaining) + rng.random(remaining)) / remaining  # Latin hypercube
        for t in levels:
            p = np.clip(t + rng.normal(0.0, spread, size=len(top)), 0.0, 1.0 - 1e-9)
            keep(space.decode(np.floor(p * (top + 1)).astype(np.int64)))
            attempts += 1
            if len(out) >= n:
                break
    return out
