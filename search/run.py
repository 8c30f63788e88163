"""`search()`: multi-objective subnet search with any registered algorithm (`search.algorithms`:
NSGA-II, AGE-MOEA, U-NSGA-III, random; LINAS in `search.linas`).

Resume works by replay: the state file (saved atomically every generation) holds the settings and
every value evaluated so far; a resumed run starts the same seeded algorithm again, takes those
values instead of evaluating, and so passes through the same generations to the point where the
killed run stopped. Evaluations never touch the global RNGs (see `preserved_rng`), so the
resumed run's front equals an uninterrupted run's. Saves made during the replay keep what the
saved state holds beyond it, so a state never shrinks. Nothing is unpickled: the state is
standard JSON, checked against a schema when read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from nestnas.errors import ConfigError, NestnasError
from nestnas.fileio import read_document, validate, write_standard_json
from nestnas.search.algorithms import ALGORITHMS, get_algorithm
from nestnas.search.cache import EvalCache
from nestnas.search.front import Candidate, ParetoFront, hypervolume
from nestnas.search.objectives import Budget, Objective, device_of, parse_budget, total_violation
from nestnas.search.problem import Evaluator
from nestnas.search.remote import remote_metrics
from nestnas.supernet.space import SearchSpace

STATE_FORMAT, STATE_VERSION = "nestnas-search-state", 1
SEARCH_ALGORITHMS = tuple(ALGORITHMS)  # the built-in ones; `ALGORITHMS` also holds any registered later
REF_MARGIN = 0.1
# Past these a run needs more memory than a machine has (every evaluated subnet stays in the
# archive; a population is materialised several times per generation).
MAX_EVALS, MAX_POP_SIZE = 1_000_000, 100_000

Progress = Callable[[dict[str, Any]], None]


class SearchError(NestnasError):
    """A search that cannot produce a result (e.g. no subnet meets the budgets)."""


def search(
    space: SearchSpace,
    objectives: Sequence[Objective],
    constraints: Sequence[Budget | str] = (),
    *,
    algorithm: str = "nsga2",
    evals: int = 500,
    pop_size: int = 40,
    seed: int = 0,
    extra_metrics: Sequence[Objective] = (),
    cache: EvalCache | str | Path | None = None,
    state: str | Path | None = None,
    inner_evals: int = 5000,
    kappa: float = 1.0,
    progress: Progress | None = None,
    per_device: bool = False,
    ray_address: str | None = None,
    workers: int | None = None,
) -> ParetoFront:
    """Search `space` for the Pareto front of `objectives` under `constraints`, spending at most
    about `evals` distinct subnet evaluations (a generation in flight is finished). `extra_metrics`
    are evaluated alongside (e.g. for a budget) without being optimised. With `state`, the run is
    saved every generation and resumed from that file if it exists.

    Several devices are several `latency@DEVICE` objectives. By default they make one joint front
    (subnets good across the fleet; every budget applies). With `per_device`, one run optimises
    all of them together and yields one front per device (`ParetoFront.for_device`), each the
    non-dominated set of the shared archive in that device's latency and the other objectives: the
    true evaluations (accuracy) are those of one search. A budget on one device's latency then
    bounds that device's front only; budgets on other metrics bound the search.

    With `ray_address` (`local:N`, `auto` or `HOST:PORT`, see `nestnas.raycluster`), the measured
    accuracy is computed by `workers` Ray actors (default: one per CPU of the cluster), each holding
    the supernet; this process still alone reads and writes the cache and the state, so the front
    is the one a local run with the same seed finds."""
    objectives = list(objectives)
    if not objectives:
        raise ConfigError("give at least one objective")
    names = [o.name for o in objectives]
    metrics = objectives + [m for m in extra_metrics if m.name not in names]
    if len({m.name for m in metrics}) != len(metrics):
        raise ConfigError(f"objective names repeat: {[m.name for m in metrics]}")
    directions = {m.name: m.direction for m in metrics}
    budgets = [b if isinstance(b, Budget) else parse_budget(b, directions) for b in constraints]
    for b in budgets:
        if b.metric not in directions:
            raise ConfigError(f"budget {b} is on {b.metric!r}, which is not evaluated; allowed: {sorted(directions)}")
    devices = [d for d in (device_of(o.name) for o in objectives) if d]
    if per_device and not devices:
        raise ConfigError("per_device needs latency@DEVICE objectives, one per device (e.g. several profiles)")
    # per-device mode: a device's latency budget bounds its own front, never the shared search
    searched = [b for b in budgets if not (per_device and device_of(b.metric))]
    algo = get_algorithm(algorithm)
    size = space.size()
    for option, value, bound in (("pop_size", pop_size, MAX_POP_SIZE), ("evals", evals, MAX_EVALS)):
        if value > min(size, bound):
            why = f"the space has {size} distinct subnets" if size <= bound else "a larger run would not fit in memory"
            raise ConfigError(f"{option} {value} is too large; allowed: at most {min(size, bound)} ({why})")
    if evals < pop_size or pop_size < 4:
        raise ConfigError(f"evals ({evals}) must be at least the population size pop_size ({pop_size}), "
                          "which must be >= 4")
    cache = cache if isinstance(cache, EvalCache) or cache is None else EvalCache(cache)
    settings = {"space": space.fingerprint(), "objectives": [m.cache_key for m in objectives],
                "extra": [m.cache_key for m in metrics[len(objectives):]], "budgets": [str(b) for b in budgets],
                "algorithm": algorithm, "evals": evals, "pop_size": pop_size, "seed": seed}
    if per_device:
        settings["per_device"] = True
    options = {k: v for k, v in {"inner_evals": inner_evals, "kappa": kappa}.items() if k in algo.options}
    settings.update(options)
    saved = _load_state(Path(state), settings, space) if state is not None and Path(state).exists() else None
    with remote_metrics(metrics, ray_address, workers) as (evaluated, pools):
        run = _Run(space, evaluated[:len(objectives)], evaluated, searched, cache, settings, state, saved, progress)
        t0 = time.perf_counter()
        algo.drive(run, evals=evals, pop_size=pop_size, seed=seed, **options)
    run.save_state()
    meta = {"algorithm": algorithm, "seed": seed, "evals": len(run.ev), "pop_size": pop_size,
            "budgets": [str(b) for b in budgets], "history": run.history, "anchors": run.anchors,
            "cache": {"path": str(cache.path) if cache and cache.path else None,
                      "hits": run.ev.cache.hits, "misses": run.ev.cache.misses,
                      "hit_rate": run.ev.cache.hit_rate},
            "seconds": time.perf_counter() - t0, "resumed": saved is not None,
            "reference_rule": f"per objective, the worse of the largest and smallest subnets, moved {REF_MARGIN:g} "
                              "of their difference further towards worse"}
    if devices:
        meta.update(devices=devices, per_device=per_device)
    if pools:
        meta["ray"] = pools[0].to_dict()
    front = ParetoFront.from_archive(space, [o.describe() for o in objectives], budgets, run.reference,
                                     run.candidates(), meta)
    for device in devices if per_device else []:
        if not front.for_device(device).front:
            own = [b for b in budgets if device_of(b.metric) in (None, device)]
            closest = min(front.evaluated, key=lambda c: total_violation(c.metrics, own))
            shown = ", ".join(f"{b.metric} {closest.metrics[b.metric]:.4g}" for b in own)
            raise SearchError(f"device {device}: no subnet meets {' and '.join(str(b) for b in own)} among "
                              f"{len(front.evaluated)} evaluated; the closest is {closest.hash} with {shown}")
    if not front.front:
        closest = min(front.evaluated, key=lambda c: total_violation(c.metrics, budgets))
        shown = ", ".join(f"{b.metric} {closest.metrics[b.metric]:.4g}" for b in budgets)
        raise SearchError(f"no subnet meets {' and '.join(str(b) for b in budgets)} among {len(front.evaluated)} "
                          f"evaluated; the closest is {closest.hash} with {shown}")
    return front


def reference_value(objective: Objective, a: float, b: float) -> float:
    """Hypervolume reference for one objective from its values on the two anchor subnets (the
    largest and the smallest): the worse one, moved REF_MARGIN of their gap further. A reference
    at the anchors keeps the hypervolume about the trade-off itself; one at zero accuracy would
    make every front look 95% complete."""
    worse, better = (max(a, b), min(a, b)) if objective.direction == "min" else (min(a, b), max(a, b))
    gap = abs(worse - better) or abs(worse) or 1.0
    return worse + objective.sign * REF_MARGIN * gap


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")


class _StateRecord(_Strict):
    hash: str
    metrics: dict[str, float]


class _StateGeneration(_Strict):
    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, float | None] = Field(init=False)  # tau_* (null where undefined)
    generation: int
    evaluations: int
    hypervolume: float
    cache_hits: int
    cache_misses: int
    seconds: float


class _StateSchema(_Strict):
    format: str
    version: int
    settings: dict[str, Any]
    archive: list[_StateRecord]
    batches: list[list[list[int]]] = []
    history: list[_StateGeneration] = []


def _load_state(path: Path, settings: dict, space: SearchSpace) -> dict:
    data = read_document(path, "search state file", STATE_FORMAT, STATE_VERSION, ConfigError, version_key="version")
    validate(data, _StateSchema, path, "search state file", ConfigError)
    upper = space.upper_bounds()
    for b, batch in enumerate(data.get("batches", [])):
        for r, row in enumerate(batch):
            if len(row) != len(upper) or any(not 0 <= v <= u for v, u in zip(row, upper)):
                raise ConfigError(f"search state file {path}: field batches.{b}.{r}: not a subnet of this space "
                                  f"({len(upper)} choices, each from 0 to its count - 1)")
    for g, record in enumerate(data.get("history", [])):
        if record["generation"] != g + 1:
            raise ConfigError(f"search state file {path}: field history.{g}.generation: expected {g + 1}, "
                              f"got {record['generation']}")
    if data.get("settings") != settings:
        diff = sorted(k for k in set(settings) | set(data.get("settings", {}))
                      if settings.get(k) != data.get("settings", {}).get(k))
        raise ConfigError(f"search state {path} belongs to another search (differs in {', '.join(diff)}); "
                          "remove it or choose another --state")
    return data


class _Run:
    def __init__(self, space, objectives, metrics, budgets, cache, settings, state, saved, progress):
        self.space, self.objectives, self.metrics, self.budgets = space, objectives, metrics, budgets
        self.settings, self.state_path, self.progress = settings, state, progress
        self.saved_archive = saved["archive"] if saved else []
        replay = {r["hash"]: r["metrics"] for r in self.saved_archive}
        self.saved_batches = saved.get("batches", []) if saved else []
        self.saved_history = saved.get("history", []) if saved else []
        self.ev = Evaluator(space, metrics, cache, replay)
        self.history: list[dict] = []
        self.batches: list[list[str]] = []
        self.t0 = time.perf_counter()
        largest, smallest = space.largest(), space.smallest()
        X = np.array([space.encode(largest), space.encode(smallest)])
        values = self.ev.evaluate(X)
        self.anchors = {"largest": space.config_hash(largest), "smallest": space.config_hash(smallest)}
        self.reference = {o.name: reference_value(o, float(values[o.name][0]), float(values[o.name][1]))
                          for o in objectives}
        self.described = [o.describe() for o in objectives]

    # --- bookkeeping -------------------------------------------------------------------------
    def archive_values(self) -> tuple[np.ndarray, np.ndarray]:
        rows = list(self.ev.archive.values())
        vals = np.array([[r["metrics"][o.name] for o in self.objectives] for r in rows]).reshape(len(rows), -1)
        feasible = np.array([total_violation(r["metrics"], self.budgets) <= 0 for r in rows], dtype=bool)
        return vals, feasible

    def hv(self) -> float:
        vals, feasible = self.archive_values()
        return hypervolume(vals[feasible], self.described, self.reference)

    def step(self, generation: int, **extra: Any) -> None:
        record = {"generation": generation, "evaluations": len(self.ev), "hypervolume": self.hv(),
                  "cache_hits": self.ev.cache.hits, "cache_misses": self.ev.cache.misses, **extra,
                  "seconds": time.perf_counter() - self.t0}
        if generation <= len(self.saved_history):  # replayed: keep the original timing and logs
            record = {**self.saved_history[generation - 1], "cache_hits": record["cache_hits"],
                      "cache_misses": record["cache_misses"]}
        self.history.append(record)
        self.save_state()
        if self.progress:
            self.progress({**record, "total": self.settings["evals"]})

    def save_state(self) -> None:
        if self.state_path is None:
            return
        # While replaying, the saved state still holds more than this run has reached: keep it, so
        # a kill during the replay never loses what an earlier run evaluated.
        archive = [{"hash": h, "metrics": r["metrics"]} for h, r in self.ev.archive.items()]
        archive += [r for r in self.saved_archive if r["hash"] not in self.ev.archive]
        write_standard_json(self.state_path, {
            "format": STATE_FORMAT, "version": STATE_VERSION, "settings": self.settings, "archive": archive,
            "batches": self.batches + self.saved_batches[len(self.batches):],
            "history": self.history + self.saved_history[len(self.history):]})

    def candidates(self) -> list[Candidate]:
        measured = tuple(m.name for m in self.metrics if m.source != "predicted")
        predicted = tuple(m.name for m in self.metrics if m.source == "predicted")
        return [Candidate(r["config"], h, dict(r["metrics"]), measured, predicted) for h, r in self.ev.archive.items()]
