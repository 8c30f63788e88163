"""`ParetoFront`: the result of a search, with every evaluated point, saved and loaded as JSON.

Hypervolume convention: each objective is normalised to a minimisation between its ideal value
(0 for latency, MACs and params; 1.0 for accuracy), mapped to 0, and the reference point, mapped
to 1; the reference is the worse of the largest and smallest subnets' values moved 10% of their
gap further (see `search.run.reference_value`). The hypervolume dominated inside that unit box is
reported: 1.0 would be a single subnet with perfect accuracy at zero cost, and subnets worse than
the reference in any objective add nothing.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from nestnas.errors import ArtifactError, ConfigError
from nestnas.fileio import atomic_path, read_document, validate, write_standard_json
from nestnas.search.objectives import (
    BUDGET_OPS,
    Budget,
    MetricInfo,
    as_budgets,
    base_metric,
    device_of,
    total_violation,
)
from nestnas.supernet.config import SubnetConfig
from nestnas.supernet.space import SearchSpace

# Version 1 throughout: an objective's typed `batch_size` and `predictor` are optional fields, so
# fronts written before them still load, and older readers keep them as unknown extras.
FORMAT, VERSION = "nestnas-pareto-front", 1


# --- the schema of a front file (checked on load; extra keys are kept, for newer writers) ----------
class _Doc(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")


class _PredictorDoc(_Doc):  # search.objectives.PredictorId
    kind: str
    file: str = ""
    sha256: str = ""
    device: str = ""
    backend: str = ""
    threads: Optional[int] = None


class _ObjectiveDoc(_Doc):
    name: str
    direction: Literal["min", "max"]
    unit: str
    source: str
    context: str = ""
    ideal: float
    batch_size: Optional[int] = Field(default=None, ge=1)
    predictor: Optional[_PredictorDoc] = None


class _BudgetDoc(_Doc):  # search.objectives.Budget.to_dict()
    metric: str
    op: Literal[BUDGET_OPS]
    value: float


class _CandidateDoc(_Doc):
    hash: str
    config: dict[str, Any]
    metrics: dict[str, float]
    measured: list[str]
    predicted: list[str]


class _CheckpointDoc(_Doc):
    path: str
    sha256: str = ""


class _MetaDoc(_Doc):  # the fields that `show`, `export` and `anchors()` read
    algorithm: Optional[str] = None
    seed: Optional[int] = None
    budgets: list[str] = []
    anchors: dict[str, str] = {}
    history: list[dict[str, Any]] = []
    checkpoint: Optional[_CheckpointDoc] = None


class _FrontDoc(_Doc):
    space: dict[str, Any]
    objectives: list[_ObjectiveDoc] = Field(min_length=1)
    budgets: list[_BudgetDoc]
    reference: dict[str, float]
    front: list[int]
    evaluated: list[_CandidateDoc]
    meta: _MetaDoc = _MetaDoc()


def _check_front_doc(data: dict, path: Path) -> None:
    """What the schema cannot say: every metric a front needs is present, indices are in range."""
    def bad(where: str, message: str):
        return ArtifactError(f"Pareto front file {path}: field {where}: {message}")

    names = [o["name"] for o in data["objectives"]]
    if len(set(names)) != len(names):
        raise bad("objectives", f"names repeat: {names}")
    missing = [n for n in names if n not in data["reference"]]
    if missing:
        raise bad("reference", f"no value for objective {missing[0]!r}")
    needed = list(dict.fromkeys(names + [b["metric"] for b in data["budgets"]]))
    for i, c in enumerate(data["evaluated"]):
        missing = [n for n in needed if n not in c["metrics"]]
        if missing:
            raise bad(f"evaluated.{i}.metrics", f"no value for {missing[0]!r}")
    n = len(data["evaluated"])
    for j, i in enumerate(data["front"]):
        if not 0 <= i < n:
            raise bad(f"front.{j}", f"index {i} is out of range (the file has {n} evaluated subnets)")


@dataclass(frozen=True)
class Candidate:
    config: SubnetConfig
    hash: str
    metrics: dict[str, float]
    measured: tuple[str, ...] = ()   # metrics evaluated on the real thing (or counted exactly)
    predicted: tuple[str, ...] = ()  # metrics from a predictor

    def to_dict(self) -> dict[str, Any]:
        return {"hash": self.hash, "config": self.config.to_dict(), "metrics": self.metrics,
                "measured": list(self.measured), "predicted": list(self.predicted)}


def normalise(values: np.ndarray, objectives: list[dict], reference: dict[str, float]) -> np.ndarray:
    """(n, k) metric values -> (n, k) minimisation values, 0 at the ideal and 1 at the reference."""
    cols = []
    for j, o in enumerate(objectives):
        ideal, ref = o["ideal"], reference[o["name"]]
        span = (ref - ideal) if o["direction"] == "min" else (ideal - ref)
        cols.append((values[:, j] - ideal) / span if o["direction"] == "min" else (ideal - values[:, j]) / span)
    return np.column_stack(cols) if cols else np.zeros((len(values), 0))


def hypervolume(values: np.ndarray, objectives: list[dict], reference: dict[str, float]) -> float:
    from pymoo.indicators.hv import HV

    if len(values) == 0:
        return 0.0
    u = normalise(np.asarray(values, float), objectives, reference)
    u = u[np.all(u < 1.0, axis=1)]
    return float(HV(ref_point=np.ones(u.shape[1]))(u)) if len(u) else 0.0


def non_dominated(u: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated rows of a minimisation matrix (duplicates kept once)."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    if len(u) == 0:
        return np.zeros(0, dtype=int)
    return np.sort(NonDominatedSorting().do(u, only_non_dominated_front=True))


@dataclass
class ParetoFront:
    space: SearchSpace
    objectives: list[dict]          # Objective.describe() of each optimised objective
    budgets: list[Budget]           # given as Budgets or their to_dict() records
    reference: dict[str, float]     # hypervolume reference point per objective
    evaluated: list[Candidate]      # every distinct subnet evaluated, in order
    front: list[int]                # indices into `evaluated`, sorted by the first objective
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.budgets = as_budgets(self.budgets)

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def from_archive(cls, space: SearchSpace, objectives: list[dict], budgets: list,
                     reference: dict[str, float], evaluated: list[Candidate], meta: dict[str, Any]) -> ParetoFront:
        budgets = as_budgets(budgets)
        names = [o["name"] for o in objectives]
        values = np.array([[c.metrics[n] for n in names] for c in evaluated]).reshape(len(evaluated), len(names))
        # In per-device mode a budget on one device's latency bounds that device's front only.
        applied = [b for b in budgets if not (meta.get("per_device") and device_of(b.metric))]
        feasible = np.array([_feasible(c.metrics, applied) for c in evaluated], dtype=bool)
        idx = np.flatnonzero(feasible)
        front = idx[non_dominated(normalise(values[idx], objectives, reference))] if len(idx) else idx
        # One representative per objective vector; equal vectors add nothing to a front.
        seen, unique = set(), []
        for i in front:
            key = tuple(values[i])
            if key not in seen:
                seen.add(key)
                unique.append(int(i))
        first = objectives[0]
        unique.sort(key=lambda i: first_sign(first) * values[i, 0])
        return cls(space, objectives, budgets, reference, evaluated, unique, meta)

    # --- queries ---------------------------------------------------------------------------
    @property
    def candidates(self) -> list[Candidate]:
        return [self.evaluated[i] for i in self.front]

    def __len__(self) -> int:
        return len(self.front)

    def __iter__(self):
        return iter(self.candidates)

    def __getitem__(self, i: int) -> Candidate:
        return self.candidates[i]

    @property
    def names(self) -> list[str]:
        return [o["name"] for o in self.objectives]

    def values(self, candidates: list[Candidate] | None = None) -> np.ndarray:
        cands = self.candidates if candidates is None else candidates
        return np.array([[c.metrics[n] for n in self.names] for c in cands]).reshape(len(cands), len(self.names))

    @property
    def hypervolume(self) -> float:
        return hypervolume(self.values(), self.objectives, self.reference)

    @property
    def devices(self) -> list[str]:
        """The devices of a fleet front (from its `latency@DEVICE` objectives, in order); [] for a
        front of one device (see `device`)."""
        return [d for d in (device_of(n) for n in self.names) if d]

    @property
    def per_device(self) -> bool:
        """True for a front searched in per-device mode (one front per device from one run)."""
        return bool(self.meta.get("per_device"))

    @property
    def device(self) -> str | None:
        """The device of a single-device front: the one it was taken for (`for_device`), else its
        latency predictor's device; None where unknown or for a fleet front."""
        if self.devices:
            return None
        latency = self.info("latency")
        return self.meta.get("device") or (latency.predictor.device if latency and latency.predictor else None) \
            or None

    def for_device(self, name: str) -> ParetoFront:
        """Device `name`'s front as an ordinary single-device front: its `latency@name` objective
        renamed `latency` (predictor identity naming the device), the other devices' latencies left
        out, budgets on other devices dropped, `meta["device"] = name`. In per-device mode it is the
        non-dominated set of the shared archive in (the other objectives, that device's latency),
        under that device's budgets and the others; for a joint front it is the joint front's
        subnets (good across the fleet) seen on that device. A single-device front answers its own
        device with itself."""
        devices = self.devices
        if not devices:
            if name == self.device:
                return self
            raise ConfigError(f"--device {name!r} matches no front; devices: {[self.device] if self.device else []}")
        if name not in devices:
            raise ConfigError(f"--device {name!r} matches no front; devices: {devices}")
        key = f"latency@{name}"
        others = {f"latency@{d}" for d in devices if d != name}

        def rename(metric: str) -> str:
            return base_metric(metric) if metric == key else metric

        objectives = []
        for o in self.objectives:
            if o["name"] in others:
                continue
            if o["name"] == key:
                o = {**o, "name": "latency"}
                if o.get("predictor"):
                    o["predictor"] = {**o["predictor"], "device": name}
            objectives.append(o)
        budgets = [Budget(rename(b.metric), b.op, b.value, b.text) for b in self.budgets if b.metric not in others]
        reference = {rename(k): v for k, v in self.reference.items() if k not in others}
        evaluated = [Candidate(c.config, c.hash, {rename(k): v for k, v in c.metrics.items() if k not in others},
                               tuple(rename(m) for m in c.measured if m not in others),
                               tuple(rename(m) for m in c.predicted if m not in others)) for c in self.evaluated]
        meta = {k: v for k, v in self.meta.items() if k not in ("devices", "per_device")}
        meta.update(device=name, budgets=[str(b) for b in budgets], fleet=devices)
        if self.per_device:
            return ParetoFront.from_archive(self.space, objectives, budgets, reference, evaluated, meta)
        first = objectives[0]
        order = sorted(self.front, key=lambda i: first_sign(first) * evaluated[i].metrics[first["name"]])
        return ParetoFront(self.space, objectives, budgets, reference, evaluated, order, meta)

    def info(self, name: str) -> MetricInfo | None:
        """The typed facts (unit, batch size, predictor identity) of objective `name`, or None
        where the front does not optimise it."""
        o = next((o for o in self.objectives if o["name"] == name), None)
        return None if o is None else MetricInfo.from_dict(o)

    def _metric_of(self, key: str) -> str:
        units = {o["name"]: o["unit"].split()[0].lower() if o["unit"] else "" for o in self.objectives}
        known = set(self.evaluated[0].metrics) if self.evaluated else set(self.names)
        if key in known:
            return key
        for name in known:
            if key.startswith(name + "_") and key[len(name) + 1:] in (units.get(name, ""), "ms", "m", "mmacs"):
                return name
        raise ConfigError(f"unknown budget {key!r}; allowed: {sorted(known)} (optionally with a unit suffix, "
                          "e.g. latency_ms)")

    def best(self, by: str | None = None, **budgets: float) -> Candidate:
        """The best front member on `by` (default: the first maximised objective, else the first
        objective) that meets every budget, e.g. `best(latency_ms=5.0)` or `best(macs=20e6)`.
        Upper bounds for minimised metrics, lower bounds for maximised ones."""
        directions = {o["name"]: o["direction"] for o in self.objectives}
        by = by or next((o["name"] for o in self.objectives if o["direction"] == "max"), self.names[0])
        if by not in directions:
            raise ConfigError(f"best(by={by!r}): allowed: {self.names}")
        limits = [Budget(m, ">=" if directions.get(m) == "max" else "<=", float(v))
                  for m, v in ((self._metric_of(k), v) for k, v in budgets.items())]
        ok = [c for c in self.candidates if _feasible(c.metrics, limits)]
        if not ok:
            text = ", ".join(str(lim) for lim in limits)
            closest = min(self.candidates, key=lambda c: total_violation(c.metrics, limits))
            raise ConfigError(f"no subnet on the front meets {text}; closest: {_short(closest)}")
        sign = -1.0 if directions[by] == "max" else 1.0
        return min(ok, key=lambda c: sign * c.metrics[by])

    def knee(self) -> Candidate:
        """The front member closest to the ideal point in the normalised objective space."""
        if not self.front:
            raise ConfigError("the front is empty")
        u = normalise(self.values(), self.objectives, self.reference)
        return self.candidates[int(np.argmin(np.linalg.norm(u, axis=1)))]

    def anchors(self) -> dict[str, Candidate]:
        by_hash = {c.hash: c for c in self.evaluated}
        return {k: by_hash[h] for k, h in self.meta.get("anchors", {}).items() if h in by_hash}

    # --- persistence -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "space": self.space.to_dict(),
                "space_fingerprint": self.space.fingerprint(), "objectives": self.objectives,
                "budgets": [b.to_dict() for b in self.budgets], "reference": self.reference,
                "hypervolume": self.hypervolume,
                "front": self.front, "evaluated": [c.to_dict() for c in self.evaluated], "meta": self.meta}

    def save(self, path: str | os.PathLike, plot: str | os.PathLike | None = None) -> None:
        """Write the front as JSON and, with `plot`, its PNG: both or neither (the plot, the likelier
        to fail, is rendered first; each file is renamed into place only when both are written)."""
        with atomic_path(path) as tmp, (atomic_path(plot) if plot is not None else nullcontext()) as plot_tmp:
            if plot_tmp is not None:
                self.plot(plot_tmp)
            write_standard_json(tmp, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike, space: SearchSpace | None = None) -> ParetoFront:
        path = Path(path)
        data = read_document(path, "Pareto front file", FORMAT, VERSION, ArtifactError, version_key="version")
        validate(data, _FrontDoc, path, "Pareto front file", ArtifactError)
        _check_front_doc(data, path)
        for o in data["objectives"]:
            _upgrade_legacy_unit(o)
        try:
            for o in data["objectives"]:
                MetricInfo.from_dict(o)  # a unit with a batch inside, a bad batch size
            stored = SearchSpace.from_dict(data["space"])
            if space is not None and stored.fingerprint() != space.fingerprint():
                raise ArtifactError(f"front file {path} was searched on another search space "
                                    f"({stored.fingerprint()}, expected {space.fingerprint()})")
            evaluated = [Candidate(stored.validate(SubnetConfig.from_dict(c["config"])), c["hash"],
                                   {k: float(v) for k, v in c["metrics"].items()}, tuple(c["measured"]),
                                   tuple(c["predicted"])) for c in data["evaluated"]]
            front = cls(stored, data["objectives"], data["budgets"], data["reference"], evaluated,
                        [int(i) for i in data["front"]], data.get("meta", {}))
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            if isinstance(exc, ArtifactError):
                raise
            raise ArtifactError(f"front file {path} is corrupt: {str(exc).splitlines()[0]}") from None
        return front

    # --- display -----------------------------------------------------------------------------
    def table(self, title: str | None = None):
        from rich.table import Table

        of = f" of device {self.meta['device']}" if self.meta.get("device") else ""
        table = Table(title=title or f"Pareto front{of}: {len(self)} subnets of {len(self.evaluated)} evaluated, "
                                     f"hypervolume {self.hypervolume:.4f}")
        table.add_column("#", justify="right")
        for o in self.objectives:
            unit = MetricInfo.from_dict(o).display
            table.add_column(f"{o['name']}" + (f" ({unit})" if unit and unit != "MACs" else "")
                             + (" *" if o["source"] == "predicted" else ""), justify="right")
        table.add_column("hash")
        table.add_column("config")
        knee = self.knee().hash if self.front else None
        for i, c in enumerate(self.candidates):
            table.add_row(str(i) + (" knee" if c.hash == knee else ""),
                          *[format_metric(o, c.metrics[o["name"]]) for o in self.objectives], c.hash,
                          _summary(c.config))
        return table

    def plot(self, path: str | os.PathLike) -> None:
        """PNG: every evaluated point, the front, and the largest and smallest subnets."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = self.names
        if len(names) < 2:
            raise ConfigError("a front plot needs at least two objectives")
        if self.devices:
            self._plot_devices(path, plt)
            return
        acc = next((o for o in self.objectives if o["direction"] == "max"), self.objectives[0])
        cost = next(o for o in self.objectives if o is not acc)
        third = next((o for o in self.objectives if o is not acc and o is not cost), None)
        def col(cands, o):
            return np.array([c.metrics[o["name"]] for c in cands])

        fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
        kw = {"c": col(self.evaluated, third), "cmap": "viridis"} if third else {"color": "0.7"}
        sc = ax.scatter(col(self.evaluated, cost), col(self.evaluated, acc), s=10, alpha=0.6, label="evaluated", **kw)
        if third:
            fig.colorbar(sc, ax=ax, label=axis_label(third))
        front = sorted(self.candidates, key=lambda c: c.metrics[cost["name"]])
        ax.step(col(front, cost), col(front, acc), where="post", color="C3", lw=1.2)
        ax.scatter(col(front, cost), col(front, acc), s=28, color="C3", label=f"Pareto front ({len(front)})",
                   zorder=3)
        for (label, c), marker in zip(self.anchors().items(), ("^", "v")):
            ax.scatter([c.metrics[cost["name"]]], [c.metrics[acc["name"]]], marker=marker, s=90, color="k",
                       label=f"{label} subnet", zorder=4)
        ax.set_xlabel(axis_label(cost))
        ax.set_ylabel(axis_label(acc))
        ax.set_title(f"{len(self.evaluated)} subnets evaluated, hypervolume {self.hypervolume:.4f}")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)


    def _plot_devices(self, path, plt) -> None:
        """One step curve per device (its own colour), accuracy against latency on a log axis."""
        acc = next((o for o in self.objectives if not device_of(o["name"])), None)
        if acc is None:
            raise ConfigError("a fleet front plot needs an objective besides the devices' latencies")
        fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
        for i, device in enumerate(self.devices):
            sub = self.for_device(device)
            front = sorted(sub.candidates, key=lambda c: c.metrics["latency"])
            x = np.array([c.metrics["latency"] for c in front])
            y = np.array([c.metrics[acc["name"]] for c in front])
            info = sub.info("latency")
            label = f"{device}: {len(front)} subnets" + (f", batch {info.batch_size}" if info.batch_size else "")
            ax.step(x, y, where="post", color=f"C{i}", lw=1.4, label=label)
            ax.scatter(x, y, s=22, color=f"C{i}", zorder=3)
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms per batch of each device's profile, predicted; log scale)")
        ax.set_ylabel(axis_label(acc))
        mode = "one front per device" if self.per_device else "the joint front on each device"
        ax.set_title(f"{len(self.evaluated)} subnets evaluated, {mode}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="lower right", fontsize=8, title="device")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)


def first_sign(o: dict) -> float:
    return 1.0 if o["direction"] == "min" else -1.0


def axis_label(o: dict) -> str:
    if o["name"] == "accuracy":
        return "accuracy (shared weights, validation)" if o["source"] == "measured" else "accuracy (predicted)"
    unit = {"MACs": "millions of MACs", "params": "millions of parameters"}.get(o["unit"],
                                                                                 MetricInfo.from_dict(o).display)
    return f"{o['name']} ({unit})" + (", predicted" if o["source"] == "predicted" else "")


def format_metric(o: dict, v: float) -> str:
    if o["name"] == "accuracy":
        return f"{100 * v:.2f}%"
    if o["unit"] in ("MACs", "params"):
        return f"{v / 1e6:.2f}M"
    return f"{v:.3f}"


def _upgrade_legacy_unit(o: dict) -> None:
    """Fronts written before typed fields kept the batch only inside the unit ("ms @ batch 8").
    Read once here, for those files only, into the typed `batch_size`; nothing else parses units."""
    import re

    m = re.fullmatch(r"(\S+) @ batch (\d+)", o.get("unit", ""))
    if m and o.get("batch_size") is None:
        o["unit"], o["batch_size"] = m.group(1), int(m.group(2))


def _feasible(metrics: dict[str, float], budgets: list[Budget]) -> bool:
    return total_violation(metrics, budgets) <= 0.0


def _short(c: Candidate) -> str:
    parts = []
    for k, v in c.metrics.items():
        parts.append(f"{k} {100 * v:.2f}%" if k == "accuracy" else f"{k} {v / 1e6:.2f}M" if k in ("macs", "params")
                     else f"{k} {v:.3g}")
    return f"{c.hash} ({', '.join(parts)})"


def _summary(config: SubnetConfig) -> str:
    return config.summary()
