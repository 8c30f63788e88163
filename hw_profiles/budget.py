"""A profiling run's time limit (`--max-minutes`), its ETA and its closing report.

Not a search budget: `nestnas.search.objectives.Budget` bounds a metric of a subnet (latency <= 5)
and decides which subnets are feasible; this limits the wall-clock time one profiling run may
spend measuring, and decides when the run stops.

On a busy host every measurement can spend its whole retry cap, so a run of ~800 measurements
that takes a minute on a quiet machine can take hours. `ProfilingTimeLimit` stops a run after the
measurement during which its budget ran out, accepts first attempts once half the budget is
gone (retries are what a busy host wastes time on), estimates the remaining time from this
run's own seconds per measurement (retries included, per kind: subnets and blocks differ) and
writes what happened (unstable measurements, retries, load average at start and end) into a
report that goes to the profile's ``meta["last_run"]`` and the CLI's output.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from nestnas.errors import ConfigError

MAX_MINUTES = 7 * 24 * 60.0  # a week: anything longer is a typo
BUSY_UNSTABLE_SHARE = 0.25  # this share of unstable measurements means the host was busy
MIN_USABLE_SUBNETS = 7  # what `nestnas fit` needs: 5 subnets to fit and 2 held out


def check_minutes(max_minutes: float | None) -> float | None:
    if max_minutes is not None and not (math.isfinite(max_minutes) and 0 < max_minutes <= MAX_MINUTES):
        raise ConfigError(f"max_minutes {max_minutes} is out of range; allowed: more than 0, at most {MAX_MINUTES:g}")
    return max_minutes


def load_average() -> float | None:
    """The host's one-minute load average, or None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


class ProfilingTimeLimit:
    """Time accounting of one profiling run; `max_minutes=None` is no time limit."""

    def __init__(self, max_minutes: float | None, max_attempts: int, remaining: dict[str, int] | None = None):
        self.max_minutes = check_minutes(max_minutes)
        self.max_attempts = max_attempts
        self.start = time.perf_counter()
        self.deadline_wall = None if max_minutes is None else time.time() + 60.0 * max_minutes
        self.load_start = load_average()
        self.remaining = dict(remaining or {})
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.unstable = self.retries = self.first_attempt_only = 0
        self.stopped = False

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def spent(self) -> bool:
        """True once the budget is used up (and from then on: the run stops)."""
        if self.max_minutes is not None and self.elapsed >= 60.0 * self.max_minutes:
            self.stopped = True
        return self.stopped

    def attempts_cap(self) -> int:
        """The runner's retry cap, or 1 once half the budget is gone."""
        if self.max_minutes is not None and self.elapsed >= 30.0 * self.max_minutes:
            return 1
        return self.max_attempts

    def record(self, kind: str, stats: dict[str, Any], seconds: float, cap: int) -> None:
        """One measurement of `kind` that took `seconds` (build and retries included)."""
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.remaining[kind] = max(self.remaining.get(kind, 0) - 1, 0)
        self.retries += max(int(stats.get("attempts", 1)) - 1, 0)
        if not stats["stable"]:
            self.unstable += 1
            self.first_attempt_only += cap < self.max_attempts

    def add_work(self, kind: str, n: int) -> None:
        self.remaining[kind] = self.remaining.get(kind, 0) + n

    @property
    def measured(self) -> int:
        return sum(self.counts.values())

    def per_measurement(self, kind: str) -> float | None:
        """Mean seconds per measurement of `kind` in this run, else of any kind measured."""
        if self.counts.get(kind):
            return self.seconds[kind] / self.counts[kind]
        return sum(self.seconds.values()) / self.measured if self.measured else None

    def eta_seconds(self) -> float | None:
        """Seconds the remaining measurements will take at this run's pace, retries included."""
        if not self.measured:
            return None
        return sum(n * self.per_measurement(kind) for kind, n in self.remaining.items())

    def describe(self, kind: str) -> str:
        """Progress-bar text: pace, finish estimate and the budget's end."""
        parts = [kind]
        pace, eta = self.per_measurement(kind), self.eta_seconds()
        if pace is not None:
            parts.append(f"{pace:.2f} s/measurement incl. {self.retries} retries")
        if eta is not None:
            parts.append(f"done ~{time.strftime('%H:%M:%S', time.localtime(time.time() + eta))}")
        if self.deadline_wall is not None:
            parts.append(f"budget ends {time.strftime('%H:%M:%S', time.localtime(self.deadline_wall))}")
        return " · ".join(parts)

    def report(self, done: int, total: int, subnets: int, complete: bool) -> dict[str, Any]:
        """What this run did, for ``meta["last_run"]`` and the CLI; `done`/`total` count
        measurements (a subnet or block in one pass) of the whole profile, `subnets` those it
        holds."""
        load_end, cores = load_average(), os.cpu_count() or 1
        loads = [v for v in (self.load_start, load_end) if v is not None]
        reasons = []
        if loads and max(loads) > cores:
            reasons.append(f"load average {max(loads):.2f} exceeded the {cores} cores")
        if self.measured >= 4 and self.unstable >= BUSY_UNSTABLE_SHARE * self.measured:
            reasons.append(f"{self.unstable} of {self.measured} measurements were unstable")
        return {"complete": complete, "stopped_by_budget": self.stopped, "max_minutes": self.max_minutes,
                "seconds": round(self.elapsed, 3), "done": done, "total": total, "measured": self.measured,
                "unstable": self.unstable, "retries": self.retries, "first_attempt_only": self.first_attempt_only,
                "seconds_per_measurement": (round(sum(self.seconds.values()) / self.measured, 4) if self.measured
                                            else None),
                "load_start": self.load_start, "load_end": load_end, "cores": cores, "busy": bool(reasons),
                "busy_reason": "; ".join(reasons) or None, "usable": subnets >= MIN_USABLE_SUBNETS}
