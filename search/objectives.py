"""Objectives and budgets of a subnet search.

An `Objective` is a name, a function from a list of (canonical) configs to one value per config,
a direction and a unit. `source` says where its values come from ("measured": evaluated on the
real thing, e.g. shared-weight accuracy; "predicted": from a fitted predictor; "computed": exact
analytic counts) and `context` names everything its values depend on besides the config, which
keys the evaluation cache. `expensive` objectives are the ones LINAS learns a surrogate for.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from nestnas.errors import ConfigError
from nestnas.supernet.config import SubnetConfig
from nestnas.supernet.space import SearchSpace

DIRECTIONS = ("min", "max")
SOURCES = ("measured", "predicted", "computed")


@dataclass(eq=False)
class Objective:
    name: str
    fn: Callable[[list[SubnetConfig]], Sequence[float]]
    direction: str = "min"
    unit: str = ""
    source: str = "computed"
    context: str = ""
    expensive: bool = False
    ideal: float = 0.0  # best conceivable value, for hypervolume normalisation (accuracy: 1.0)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ConfigError(f"objective name {self.name!r}: use lower-case letters, digits and _")
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"objective {self.name}: direction {self.direction!r}; allowed: {list(DIRECTIONS)}")
        if self.source not in SOURCES:
            raise ConfigError(f"objective {self.name}: source {self.source!r}; allowed: {list(SOURCES)}")

    @property
    def sign(self) -> float:
        """Multiplier that turns the objective into one to minimise."""
        return 1.0 if self.direction == "min" else -1.0

    @property
    def cache_key(self) -> str:
        return f"{self.name}|{self.source}|{self.context}"

    def evaluate(self, configs: list[SubnetConfig]) -> np.ndarray:
        values = np.asarray(self.fn(configs), dtype=float).reshape(-1)
        if values.shape != (len(configs),) or not np.all(np.isfinite(values)):
            raise ConfigError(f"objective {self.name} returned {values.shape} values for {len(configs)} configs "
                              "or a non-finite value")
        return values

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "direction": self.direction, "unit": self.unit, "source": self.source,
                "context": self.context, "ideal": self.ideal}


def _encoded(space: SearchSpace, configs: list[SubnetConfig]) -> np.ndarray:
    return np.array([space.encode(c) for c in configs], dtype=np.int64).reshape(len(configs), space.n_var)


def weights_digest(net: torch.nn.Module) -> str:
    """sha256 (first 16 hex digits) of a module's state dict: the context of its accuracies."""
    digest = hashlib.sha256()
    for key, value in sorted(net.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def accuracy_objective(net, val_loader, calib_loader, *, seed: int = 0, calib_batches: int = 8,
                       context: str | None = None) -> Objective:
    """Shared-weight validation accuracy with batch norm recalibrated per subnet (measured)."""
    from nestnas.supernet.evaluate import subnet_accuracy

    def fn(configs: list[SubnetConfig]) -> list[float]:
        with torch.no_grad():
            return [subnet_accuracy(net, c, val_loader, calib_loader, calib_batches, seed) for c in configs]

    ctx = f"{net.space.fingerprint()}|w={context or weights_digest(net)}|seed={seed}|calib={calib_batches}"
    return Objective("accuracy", fn, "max", "", "measured", ctx, expensive=True, ideal=1.0)


def predicted_accuracy_objective(predictor, context: str = "") -> Objective:
    space = predictor.space
    return Objective("accuracy", lambda cs: np.clip(predictor.predict(_encoded(space, cs)), 0.0, 1.0), "max", "",
                     "predicted", f"{space.fingerprint()}|{context}", ideal=1.0)


def latency_objective(predictor, *, unit: str = "ms", context: str = "") -> Objective:
    """Latency predicted by a fitted `LatencyPredictor` (units of its profile: ms per batch)."""
    space = predictor.space
    return Objective("latency", lambda cs: predictor.predict(_encoded(space, cs)), "min", unit, "predicted",
                     f"{space.fingerprint()}|{context}")


def measured_latency_objective(net, backend: str = "onnxruntime", batch_size: int = 1, *, threads: int | None = None,
                               seed: int = 0) -> Objective:
    """Latency measured on the runtime (builds and times each subnet; expensive)."""
    from nestnas.compile import get_backend, get_runner
    from nestnas.hw_profiles.profiler import measure_module

    be = get_backend(backend, threads=threads, exporter="torchscript")
    runner = get_runner(backend)

    def fn(configs: list[SubnetConfig]) -> list[float]:
        return [measure_module(be, runner, net.extract(c), net.input_shape(c, batch_size), seed)["median_ms"]
                for c in configs]

    ctx = f"{net.space.fingerprint()}|{sorted(be.fingerprint().items())}|batch={batch_size}"
    return Objective("latency", fn, "min", f"ms @ batch {batch_size}", "measured", ctx, expensive=True)


def macs_objective(space: SearchSpace, **spec: int) -> Objective:
    from nestnas.predictors.macs import count_macs_encoded

    return Objective("macs", lambda cs: count_macs_encoded(space, _encoded(space, cs), **spec)[0], "min", "MACs",
                     "computed", f"{space.fingerprint()}|{sorted(spec.items())}")


def params_objective(space: SearchSpace, **spec: int) -> Objective:
    from nestnas.predictors.macs import count_macs_encoded

    return Objective("params", lambda cs: count_macs_encoded(space, _encoded(space, cs), **spec)[1], "min", "params",
                     "computed", f"{space.fingerprint()}|{sorted(spec.items())}")


# --- budgets ---------------------------------------------------------------------------------

_SUFFIX = {"k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}


@dataclass(frozen=True)
class Budget:
    """A constraint `metric op value`, e.g. latency <= 5 (ms) or accuracy >= 0.9."""

    metric: str
    op: str
    value: float
    text: str = field(default="", compare=False)

    def violation(self, values: np.ndarray) -> np.ndarray:
        """pymoo convention: <= 0 where satisfied."""
        return values - self.value if self.op == "<=" else self.value - values

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


def parse_budget(text: str, directions: dict[str, str]) -> Budget:
    """`latency=5`, `latency<=5`, `macs=20M`, `accuracy>=0.9`. With `=`, the bound points the way
    the metric improves (an upper bound on a minimised metric, a lower bound on a maximised one)."""
    m = re.fullmatch(r"\s*([a-z_]+)\s*(<=|>=|=)\s*([0-9.eE+-]+)([kKMG]?)\s*", text)
    if not m:
        raise ConfigError(f"--budget {text!r}: expected METRIC=VALUE, METRIC<=VALUE or METRIC>=VALUE "
                          "(e.g. latency=5, macs=20M, accuracy>=0.9)")
    name, op, number, suffix = m.groups()
    if name not in directions:
        raise ConfigError(f"--budget {text!r}: unknown metric {name!r}; allowed: {sorted(directions)}")
    try:
        value = float(number) * _SUFFIX.get(suffix, 1.0)
    except ValueError:
        raise ConfigError(f"--budget {text!r}: {number!r} is not a number") from None
    if op == "=":
        op = "<=" if directions[name] == "min" else ">="
    return Budget(name, op, value, text)
