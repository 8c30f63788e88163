"""Latency measurement: warm up, then time repeats until the median is pinned down.

`Runner.measure` does the plumbing (warm-up, batching of very short calls, stopping rule, one
re-measurement, flagging) and subclasses fill `_call(compiled, x)`: one inference, with the input
already in the runtime's own form (`_prepare` converts it once, outside the timed region).

Stopping rule: after at least `min_repeats` samples, stop as soon as the relative half-width of
the distribution-free 95% confidence interval of the median (order statistics, exact binomial;
see `nestnas.compile.stats`) is at most `target_rel_ci`, or when `max_seconds` have passed. An
unstable attempt is re-measured once (`max_attempts=2`); if that is unstable too, the tighter of
the two comes back with ``stable=False``, never passed off as stable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import torch

from nestnas.compile.backends import OrtModel, TvmModel
from nestnas.compile.onnx_export import INPUT_NAME
from nestnas.compile.stats import rel_median_ci, summarize
from nestnas.errors import ConfigError, ProfileError

RUNNERS: dict[str, type[Runner]] = {}


def register_runner(name: str) -> Callable[[type[Runner]], type[Runner]]:
    """Class decorator: make a runner available by backend name (`get_runner`)."""

    def wrap(cls: type[Runner]) -> type[Runner]:
        cls.name = name
        RUNNERS[name] = cls
        return cls

    return wrap


def get_runner(name: str, **options: Any) -> Runner:
    """The runner for backend `name` (``onnxruntime``, ``tvm``, ``torch`` or ``callable``)."""
    if name not in RUNNERS:
        raise ConfigError(f"unknown runner {name!r}; allowed: {sorted(RUNNERS)}")
    return RUNNERS[name](**options)


@dataclass(frozen=True)
class Measurement:
    """Per-call latency statistics of one measurement (milliseconds)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    cv: float
    repeats: int
    rel_ci: float
    stable: bool
    attempts: int
    calls_per_sample: int = 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: infinite values (too few samples) become None."""
        return {k: (None if isinstance(v, float) and math.isinf(v) else v)
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in data]
        if missing:
            raise ProfileError(f"measurement record lacks field(s) {missing}; expected: {required}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (math.inf if v is None else v) for k, v in data.items() if k in known})


class Runner:
    """Times a compiled model. Subclasses fill `_call` and may override `_prepare`."""

    name: ClassVar[str] = ""
    model_type: ClassVar[type | tuple[type, ...] | None] = None  # what `measure` accepts; None: any

    def __init__(self, warmup: int = 5, min_repeats: int = 20, target_rel_ci: float = 0.02,
                 max_seconds: float = 2.0, max_attempts: int = 2, min_sample_ms: float = 0.2,
                 confidence: float = 0.95):
        _check_options({"warmup": warmup, "min_repeats": min_repeats, "target_rel_ci": target_rel_ci,
                        "max_seconds": max_seconds, "max_attempts": max_attempts, "min_sample_ms": min_sample_ms,
                        "confidence": confidence})
        self.warmup, self.min_repeats, self.target_rel_ci = warmup, min_repeats, target_rel_ci
        self.max_seconds, self.max_attempts, self.min_sample_ms = max_seconds, max_attempts, min_sample_ms
        self.confidence = confidence

    def measure(self, compiled: Any, x: Any, *, max_attempts: int | None = None) -> Measurement:
        """Latency of one call of `compiled` on input `x`. `max_attempts` lowers the retry cap
        for this call (a profiler short of time accepts the first attempt, flagged if unstable)."""
        cap = self.max_attempts if max_attempts is None else max_attempts
        _check_options({"max_attempts": cap})
        self._check_model(compiled)
        prepared = self._prepare(compiled, x)

        def call() -> None:
            self._call(compiled, prepared)

        with _gc_paused():
            per_sample = self._warm_up(call)
            best = None
            for attempt in range(1, cap + 1):
                result = self._attempt(call, per_sample, attempt)
                if result.stable:
                    return result
                best = result if best is None or result.rel_ci < best.rel_ci else best
        return dataclasses.replace(best, attempts=cap)

    def fingerprint(self) -> dict[str, Any]:
        """The runner's settings, recorded next to its measurements."""
        return {"runner": self.name, "warmup": self.warmup, "min_repeats": self.min_repeats,
                "target_rel_ci": self.target_rel_ci, "max_seconds": self.max_seconds,
                "max_attempts": self.max_attempts, "min_sample_ms": self.min_sample_ms,
                "confidence": self.confidence}

    def _prepare(self, compiled: Any, x: Any) -> Any:
        """Convert `x` once into what `_call` takes (runs before timing)."""
        return x

    def _call(self, compiled: Any, x: Any) -> Any:
        raise NotImplementedError

    def _check_model(self, compiled: Any) -> None:
        if self.model_type is not None and not isinstance(compiled, self.model_type):
            expected = getattr(self.model_type, "__name__", str(self.model_type))
            raise ConfigError(f"runner {self.name!r} cannot time a {type(compiled).__name__}; it takes a {expected}")

    def _warm_up(self, call: Callable[[], None]) -> int:
        """Run the warm-up calls and return how many calls each timed sample batches: enough
        that one sample lasts at least `min_sample_ms`, so timer overhead stays negligible."""
        times = []
        for _ in range(max(self.warmup, 1)):
            start = time.perf_counter_ns()
            call()
            times.append(time.perf_counter_ns() - start)
        one_ms = max(float(np.median(times)), 1.0) / 1e6
        return 1 if one_ms >= self.min_sample_ms else min(math.ceil(self.min_sample_ms / one_ms), 100_000)

    def _attempt(self, call: Callable[[], None], per_sample: int, attempt: int) -> Measurement:
        samples = self._sample(call, per_sample)
        stats = summarize(samples, self.confidence)
        stable = len(samples) >= self.min_repeats and stats["rel_ci"] <= self.target_rel_ci
        return Measurement(stats["median"], stats["p10"], stats["p90"], stats["cv"], len(samples),
                           stats["rel_ci"], stable, attempt, per_sample)

    def _sample(self, call: Callable[[], None], per_sample: int) -> list[float]:
        """Per-call milliseconds of successive samples, until the CI is tight or time is up.
        The CI is re-checked every ~10% more samples, keeping the stopping rule O(n log n)."""
        samples: list[float] = []
        deadline = time.perf_counter() + self.max_seconds
        next_check = self.min_repeats
        while True:
            start = time.perf_counter_ns()
            for _ in range(per_sample):
                call()
            samples.append((time.perf_counter_ns() - start) / per_sample / 1e6)
            if len(samples) >= next_check:
                if rel_median_ci(samples, self.confidence) <= self.target_rel_ci:
                    return samples
                next_check = max(len(samples) + 1, int(len(samples) * 1.1))
            if time.perf_counter() >= deadline:
                return samples


_OPTION_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "warmup": (lambda v: v >= 0, ">= 0"),
    "min_repeats": (lambda v: v >= 6, ">= 6 (fewer samples have no 95% median CI)"),
    "target_rel_ci": (lambda v: v > 0, "> 0"),
    "max_seconds": (lambda v: v > 0, "> 0"),
    "max_attempts": (lambda v: v >= 1, ">= 1"),
    "min_sample_ms": (lambda v: v >= 0, ">= 0"),
    "confidence": (lambda v: 0 < v < 1, "in (0, 1)"),
}


def _check_options(values: dict[str, float]) -> None:
    for name, value in values.items():
        ok, allowed = _OPTION_RULES[name]
        if not ok(value):
            raise ConfigError(f"runner option {name}={value!r} is not allowed; must be {allowed}")


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Keep Python's garbage collector from pausing inside timed samples (as `timeit` does);
    restores the previous state."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@register_runner("callable")
class CallableRunner(Runner):
    """Times any Python callable `f(x)`, e.g. a `CompiledModel` through its checked `__call__`."""

    def _call(self, compiled: Callable[[Any], Any], x: Any) -> Any:
        return compiled(x)


@register_runner("onnxruntime")
class OrtRunner(Runner):
    """Calls the session directly with a prepared feed: no input checks inside the timing."""

    model_type = OrtModel

    def _prepare(self, compiled: OrtModel, x: np.ndarray) -> dict[str, np.ndarray]:
        return {INPUT_NAME: compiled.check_input(x)}

    def _call(self, compiled: OrtModel, feed: dict[str, np.ndarray]) -> Any:
        return compiled.session.run(None, feed)


@register_runner("tvm")
class TvmRunner(Runner):
    """Input copied to a TVM tensor and the thread pool sized once, before timing."""

    model_type = TvmModel

    def _prepare(self, compiled: TvmModel, x: np.ndarray) -> Any:
        return compiled.to_device(compiled.check_input(x))

    def _call(self, compiled: TvmModel, x: Any) -> Any:
        return compiled.run_device(x)


@register_runner("torch")
class TorchRunner(Runner):
    """Eager PyTorch under `inference_mode`, with torch's current thread settings."""

    model_type = torch.nn.Module

    def _prepare(self, compiled: torch.nn.Module, x: Any) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))

    def _call(self, compiled: torch.nn.Module, x: torch.Tensor) -> Any:
        with torch.inference_mode():
            return compiled(x)
