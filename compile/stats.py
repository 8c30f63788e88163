"""Distribution-free statistics of latency samples.

Latencies are skewed and heavy-tailed (preemption, cache misses), so the median is reported and
its confidence interval comes from order statistics: with n samples, the interval between the
j-th smallest and j-th largest sample covers the true median with probability
1 - 2 P(B <= j - 1), B ~ Binomial(n, 1/2), whatever the distribution (Le Boudec, "Performance
Evaluation of Computer and Communication Systems", 2.2). j is computed from the exact binomial,
so the interval is valid at small n too; below 6 samples no 95% interval exists.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Sequence

import numpy as np


@functools.lru_cache(maxsize=4096)
def median_ci_ranks(n: int, confidence: float = 0.95) -> tuple[int, int] | None:
    """0-based indices (lo, hi) into the sorted samples bounding the median's CI, or None."""
    half_alpha = (1.0 - confidence) / 2.0
    log_half = n * math.log(0.5)
    cdf, k = 0.0, -1
    while k + 1 <= n // 2:  # largest k with P(B <= k) <= alpha/2
        nxt = cdf + math.exp(math.lgamma(n + 1) - math.lgamma(k + 2) - math.lgamma(n - k) + log_half)
        if nxt > half_alpha:
            break
        cdf, k = nxt, k + 1
    return None if k < 0 else (k, n - 1 - k)


def rel_median_ci(samples: Sequence[float], confidence: float = 0.95) -> float:
    """Half-width of the median's CI relative to the median: the larger of (median - lo) and
    (hi - median), divided by the median. ``inf`` when too few samples for an interval."""
    ordered = np.sort(np.asarray(samples, dtype=float))
    ranks = median_ci_ranks(len(ordered), confidence)
    median = float(np.median(ordered))
    if ranks is None or median <= 0.0:
        return math.inf
    lo, hi = ordered[ranks[0]], ordered[ranks[1]]
    return float(max(median - lo, hi - median) / median)


def summarize(samples: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Median, 10th/90th percentiles, coefficient of variation and relative median CI."""
    arr = np.asarray(samples, dtype=float)
    mean = float(arr.mean())
    cv = float(arr.std(ddof=1) / mean) if len(arr) > 1 and mean > 0 else math.inf
    p10, median, p90 = (float(v) for v in np.percentile(arr, [10, 50, 90]))
    return {"median": median, "p10": p10, "p90": p90, "cv": cv, "rel_ci": rel_median_ci(arr, confidence)}


def interleaved_sweeps(keys: Sequence[Hashable], measure: Callable[[int, Hashable], float],
                       sweeps: int) -> dict[Hashable, list[float]]:
    """`measure(i, key)` for every key, `sweeps` times, every other sweep in reverse order, so that
    a drift of the host's speed over the sweeps falls on every key alike (take each list's median)."""
    runs: dict[Hashable, list[float]] = {k: [] for k in keys}
    for step in range(sweeps):
        order = list(enumerate(keys))
        for i, key in (order if step % 2 == 0 else order[::-1]):
            runs[key].append(measure(i, key))
    return runs
