"""Objectives and budgets of a subnet search.

An `Objective` is a name, a function from a list of (canonical) configs to one value per config,
a direction and a unit. `source` says where its values come from ("measured": evaluated on the
real thing, e.g. shared-weight accuracy; "predicted": from a fitted predictor; "computed": exact
analytic counts) and `context` names everything its values depend on besides the config, which
keys the evaluation cache. `expensive` objectives are the ones LINAS learns a surrogate for.

Facts that later stages act on travel as typed fields, never inside the display string: the unit
("ms"), the batch size the values hold for, and where predicted or measured values come from
(`PredictorId`). `MetricInfo` bundles them; `MetricInfo.display` ("ms @ batch 8") is derived.
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
# A metric of one device of a fleet is `BASE@DEVICE` (e.g. `latency@pi5`); a device name is a profile name.
DEVICE_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
METRIC_PATTERN = rf"[a-z][a-z0-9_]*(?:@{DEVICE_PATTERN})?"


def device_of(name: str) -> str | None:
    """The device a metric name carries (`latency@pi5` -> `pi5`), None for a plain metric."""
    return name.split("@", 1)[1] if "@" in name else None


def base_metric(name: str) -> str:
    """The metric without its device (`latency@pi5` -> `latency`)."""
    return name.split("@", 1)[0]


def check_device_name(name: str, where: str = "device") -> str:
    if not isinstance(name, str) or not re.fullmatch(DEVICE_PATTERN, name):
        raise ConfigError(f"{where} {name!r}: a device name is letters, digits, '.', '_' and '-', starting with a "
                          "letter or digit")
    return name


@dataclass(frozen=True)
class PredictorId:
    """Where an objective's values come from: a predictor `kind` ("hybrid", "lut", "ensemble", ...,
    or "measured" for a runtime timed live), the profile or predictor `file` it was fitted on or
    loaded from and that file's `sha256`, and the `device` (profile name), `backend` and `threads`
    it was measured with, where known."""

    kind: str
    file: str = ""
    sha256: str = ""
    device: str = ""
    backend: str = ""
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "file": self.file, "sha256": self.sha256, "device": self.device,
                "backend": self.backend, "threads": self.threads}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PredictorId:
        known = {f: data[f] for f in ("kind", "file", "sha256", "device", "backend", "threads") if f in data}
        return cls(**known)


@dataclass(frozen=True)
class MetricInfo:
    """The typed facts of one metric: its `unit`, the `batch_size` its values hold for (None where
    batch does not apply) and its `predictor` identity (None for exact counts and accuracies)."""

    unit: str = ""
    batch_size: int | None = None
    predictor: PredictorId | None = None

    def __post_init__(self) -> None:
        if "@" in self.unit:
            raise ConfigError(f"unit {self.unit!r}: give the bare unit (e.g. 'ms') and the batch as batch_size")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                                            or self.batch_size < 1):
            raise ConfigError(f"batch_size {self.batch_size!r}: allowed: a positive integer or None")

    @property
    def display(self) -> str:
        """For people only (tables, plot axes); nothing parses it back."""
        return f"{self.unit} @ batch {self.batch_size}" if self.unit and self.batch_size else self.unit

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "batch_size": self.batch_size,
                "predictor": self.predictor.to_dict() if self.predictor else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetricInfo:
        """From an `Objective.describe()` record (or a front file's objective)."""
        pred = data.get("predictor")
        return cls(data.get("unit", ""), data.get("batch_size"), PredictorId.from_dict(pred) if pred else None)


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
    batch_size: int | None = None  # the batch the values hold for (latency); exports build at it
    predictor: PredictorId | None = None
    # What a Ray actor needs to compute the values away from the driver (`search.remote`), made
    # only when a search runs on Ray; None: evaluated in this process only.
    remote: Callable[[], Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not re.fullmatch(METRIC_PATTERN, self.name):
            raise ConfigError(f"objective name {self.name!r}: use lower-case letters, digits and _, optionally "
                              "followed by @DEVICE (letters, digits, '.', '_', '-'), e.g. latency@pi5")
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"objective {self.name}: direction {self.direction!r}; allowed: {list(DIRECTIONS)}")
        if self.source not in SOURCES:
            raise ConfigError(f"objective {self.name}: source {self.source!r}; allowed: {list(SOURCES)}")
        MetricInfo(self.unit, self.batch_size, self.predictor)  # checks unit and batch_size

    @property
    def info(self) -> MetricInfo:
        return MetricInfo(self.unit, self.batch_size, self.predictor)

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
                "context": self.context, "ideal": self.ideal, "batch_size": self.batch_size,
                "predictor": self.predictor.to_dict() if self.predictor else None}


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

    def remote():  # the same values on a Ray actor (search(..., ray_address=...))
        from nestnas.search.remote import accuracy_task

        return accuracy_task(net, val_loader, calib_loader, seed=seed, calib_batches=calib_batches)

    ctx = f"{net.space.fingerprint()}|w={context or weights_digest(net)}|seed={seed}|calib={calib_batches}"
    return Objective("accuracy", fn, "max", "", "measured", ctx, expensive=True, ideal=1.0, remote=remote)


def predicted_accuracy_objective(predictor, context: str = "") -> Objective:
    space = predictor.space
    return Objective("accuracy", lambda cs: np.clip(predictor.predict(_encoded(space, cs)), 0.0, 1.0), "max", "",
                     "predicted", f"{space.fingerprint()}|{context}", ideal=1.0)


def latency_objective(predictor, *, unit: str = "ms", batch_size: int | None = None, context: str = "",
                      identity: PredictorId | None = None, name: str = "latency") -> Objective:
    """Latency predicted by a fitted `LatencyPredictor` (units of its profile: ms per batch of
    `batch_size`, the profile's batch size; exported bundles are built at that batch). `name` is
    `latency`, or `latency@DEVICE` for one device of a fleet search."""
    space = predictor.space
    identity = identity or PredictorId(getattr(predictor, "kind", ""))
    return Objective(name, lambda cs: predictor.predict(_encoded(space, cs)), "min", unit, "predicted",
                     f"{space.fingerprint()}|{context}", batch_size=batch_size, predictor=identity)


def measured_latency_objective(net, backend: str = "onnxruntime", batch_size: int = 1, *, threads: int | None = None,
                               seed: int = 0) -> Objective:
    """Latency measured on the runtime (builds and times each subnet; expensive)."""
    from nestnas.compile import get_backend, get_runner
    from nestnas.hw_profiles.profiler import measure_module

    be = get_backend(backend, threads=threads, exporter="torchscript")
    runner = get_runner(backend)

    def fn(configs: list[SubnetConfig]) -> list[float]:
        return [measure_module(be, runner, net.extract(c), net.input_specs(c, batch_size), seed)["median_ms"]
                for c in configs]

    fingerprint = be.fingerprint()
    ctx = f"{net.space.fingerprint()}|{sorted(fingerprint.items())}|batch={batch_size}"
    identity = PredictorId("measured", backend=backend, threads=fingerprint.get("threads"))
    return Objective("latency", fn, "min", "ms", "measured", ctx, expensive=True, batch_size=batch_size,
                     predictor=identity)


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


BUDGET_OPS = ("<=", ">=")


@dataclass(frozen=True)
class Budget:
    """A constraint `metric op value`, e.g. latency <= 5 (ms) or accuracy >= 0.9. The one budget
    type of a search: the search, its Pareto front and `ParetoFront.best` all use it."""

    metric: str
    op: str
    value: float
    text: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.op not in BUDGET_OPS:
            raise ConfigError(f"budget on {self.metric}: op {self.op!r}; allowed: {list(BUDGET_OPS)}")

    def violation(self, values: np.ndarray) -> np.ndarray:
        """Signed gap, pymoo convention: <= 0 where satisfied."""
        values = np.asarray(values, dtype=float)
        return values - self.value if self.op == "<=" else self.value - values

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "op": self.op, "value": self.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Budget:
        return cls(data["metric"], data["op"], float(data["value"]))

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


def as_budgets(budgets) -> list[Budget]:
    """Budgets given as `Budget`s or their `to_dict()` records."""
    return [b if isinstance(b, Budget) else Budget.from_dict(b) for b in budgets]


def total_violation(metrics: dict[str, float], budgets) -> float:
    """How far `metrics` are from meeting every budget: the sum of each budget's positive gap
    relative to its bound (0 where all are met). The one measure of infeasibility used to rank
    infeasible subnets and to decide feasibility, in the search and on its front."""
    total = 0.0
    for b in budgets:
        gap = float(b.violation(np.array([metrics[b.metric]]))[0])
        total += max(gap, 0.0) / max(abs(b.value), 1e-12)
    return total


def parse_budget(text: str, directions: dict[str, str], aliases: dict[str, str] | None = None) -> Budget:
    """`latency=5`, `latency<=5`, `latency@pi5=20`, `macs=20M`, `accuracy>=0.9`. With `=`, the bound
    points the way the metric improves (an upper bound on a minimised metric, a lower bound on a
    maximised one). `aliases` maps other names to metrics of `directions` (e.g. `latency@pi5` to
    `latency` in a search of that one device)."""
    aliases = aliases or {}
    m = re.fullmatch(rf"\s*([a-z_]+(?:@{DEVICE_PATTERN})?)\s*(<=|>=|=)\s*([0-9.eE+-]+)([kKMG]?)\s*", text)
    if not m:
        raise ConfigError(f"budget {text!r}: expected METRIC=VALUE, METRIC<=VALUE or METRIC>=VALUE "
                          "(e.g. latency=5, latency@pi5=20, macs=20M, accuracy>=0.9)")
    name, op, number, suffix = m.groups()
    name = aliases.get(name, name)
    if name not in directions:
        device = device_of(name)
        known = [*directions, *aliases]
        devices = sorted({device_of(n) for n in known if device_of(n) and base_metric(n) == base_metric(name)})
        if device is not None and (devices or base_metric(name) in directions):
            raise ConfigError(f"budget {text!r}: unknown device {device!r}; devices: {devices}")
        raise ConfigError(f"budget {text!r}: unknown metric {name!r}; allowed: {sorted(directions)}")
    try:
        value = float(number) * _SUFFIX.get(suffix, 1.0)
    except ValueError:
        raise ConfigError(f"budget {text!r}: {number!r} is not a number") from None
    if op == "=":
        op = "<=" if directions[name] == "min" else ">="
    return Budget(name, op, value, text)
