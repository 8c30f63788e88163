"""`search()`: multi-objective subnet search (NSGA-II, AGE-MOEA, U-NSGA-III, random, LINAS).

Resume works by replay: the state file (saved atomically every generation) holds the settings and
every value evaluated so far; a resumed run starts the same seeded algorithm again, takes those
values instead of evaluating, and so passes through the same generations to the point where the
killed run stopped. Evaluations never touch the global RNGs (see `preserved_rng`), so the
resumed run's front equals an uninterrupted run's. Saves made during the replay keep what the
saved state holds beyond it, so a state never shrinks. Nothing is unpickled: the state is
standard JSON, checked against a schema when read.

LINAS (as in DyNAS-T): evaluate a space-filling population on the true objectives; then, each
iteration, fit a surrogate (the ensemble regressor of `AccuracyPredictor`, which also gives an
uncertainty) to every expensive objective, run a predictor-only NSGA-II for `inner_evals`
evaluations on the surrogates (optimistic by `kappa` standard deviations) and the cheap
objectives, and evaluate the best `pop_size` unseen candidates (rank, then crowding) for real.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from nestnas.errors import ConfigError, NestnasError
from nestnas.fileio import read_document, validate, write_standard_json
from nestnas.search.algorithms import integer_operators, make_algorithm
from nestnas.search.cache import EvalCache
from nestnas.search.front import Candidate, ParetoFront, hypervolume
from nestnas.search.objectives import Budget, Objective, parse_budget
from nestnas.search.problem import Evaluator, SubnetProblem, preserved_rng
from nestnas.supernet.space import SearchSpace
from pydantic import BaseModel, ConfigDict, Field
from pymoo.core.problem import Problem

STATE_FORMAT, STATE_VERSION = "nestnas-search-state", 1
SEARCH_ALGORITHMS = ("nsga2", "agemoea", "unsga3", "random", "linas")
REF_MARGIN = 0.1
INNER_POP = 100
# Tree models only: a surrogate fitted on a few dozen subnets must not extrapolate (a linear or
# MLP member predicts accuracies above 1 off the data, and the search then chases them).
SURROGATE_MEMBERS = ("gbt", "forest")
# Past these a run needs more memory than a machine has (every evaluated subnet stays in the
# archive; a population is materialised several times per generation).
MAX_EVALS, MAX_POP_SIZE = 1_000_000, 100_000
STALL_GENERATIONS = 20  # generations without a new subnet before a search stops early

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
) -> ParetoFront:
    """Search `space` for the Pareto front of `objectives` under `constraints`, spending at most
    about `evals` distinct subnet evaluations (a generation in flight is finished). `extra_metrics`
    are evaluated alongside (e.g. for a budget) without being optimised. With `state`, the run is
    saved every generation and resumed from that file if it exists."""
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
    if algorithm not in SEARCH_ALGORITHMS:
        raise ConfigError(f"--algorithm: unknown algorithm {algorithm!r}; allowed: {list(SEARCH_ALGORITHMS)}")
    size = space.size()
    for option, value, bound in (("--pop-size", pop_size, MAX_POP_SIZE), ("--evals", evals, MAX_EVALS)):
        if value > min(size, bound):
            why = f"the space has {size} distinct subnets" if size <= bound else "a larger run would not fit in memory"
            raise ConfigError(f"{option} {value} is too large; allowed: at most {min(size, bound)} ({why})")
    if evals < pop_size or pop_size < 4:
        raise ConfigError(f"--evals ({evals}) must be at least the population size ({pop_size}), which must be >= 4")
    cache = cache if isinstance(cache, EvalCache) or cache is None else EvalCache(cache)
    settings = {"space": space.fingerprint(), "objectives": [m.cache_key for m in objectives],
                "extra": [m.cache_key for m in metrics[len(objectives):]], "budgets": [str(b) for b in budgets],
                "algorithm": algorithm, "evals": evals, "pop_size": pop_size, "seed": seed,
                **({"inner_evals": inner_evals, "kappa": kappa} if algorithm == "linas" else {})}
    saved = _load_state(Path(state), settings, space) if state is not None and Path(state).exists() else None
    run = _Run(space, objectives, metrics, budgets, cache, settings, state, saved, progress)
    t0 = time.perf_counter()
    if algorithm == "linas":
        run.linas(evals, pop_size, seed, inner_evals, kappa)
    elif algorithm == "random":
        run.random(evals, pop_size, seed)
    else:
        run.evolve(algorithm, evals, pop_size, seed)
    run.save_state()
    meta = {"algorithm": algorithm, "seed": seed, "evals": len(run.ev), "pop_size": pop_size,
            "budgets": [str(b) for b in budgets], "history": run.history, "anchors": run.anchors,
            "cache": {"path": str(cache.path) if cache and cache.path else None,
                      "hits": run.ev.cache.hits, "misses": run.ev.cache.misses,
                      "hit_rate": run.ev.cache.hit_rate},
            "seconds": time.perf_counter() - t0, "resumed": saved is not None,
            "reference_rule": f"per objective, the worse of the largest and smallest subnets, moved {REF_MARGIN:g} "
                              "of their difference further towards worse"}
    front = ParetoFront.from_archive(space, [o.describe() for o in objectives],
                                     [{"metric": b.metric, "op": b.op, "value": b.value} for b in budgets],
                                     run.reference, run.candidates(), meta)
    if not front.front:
        closest = min(front.evaluated, key=lambda c: _violation(c.metrics, budgets))
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


def _violation(metrics: dict[str, float], budgets: list[Budget]) -> float:
    return sum(max(float(b.violation(np.array([metrics[b.metric]]))[0]), 0.0) / max(abs(b.value), 1e-12)
               for b in budgets)


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
        feasible = np.array([_violation(r["metrics"], self.budgets) <= 0 for r in rows], dtype=bool)
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

    # --- algorithms ------------------------------------------------------------------------
    def evolve(self, name: str, evals: int, pop_size: int, seed: int) -> None:
        from pymoo.termination.max_eval import MaximumFunctionCallTermination

        problem = SubnetProblem(self.ev, self.objectives, self.budgets)
        algo = make_algorithm(name, self.space, pop_size, len(self.objectives))
        algo.setup(problem, termination=MaximumFunctionCallTermination(10**12), seed=seed, verbose=False)
        generation, stalled = 0, 0
        while len(self.ev) < evals and stalled < STALL_GENERATIONS:
            before = len(self.ev)
            pop = algo.ask()
            algo.evaluator.eval(problem, pop)
            algo.tell(infills=pop)
            generation += 1
            stalled = stalled + 1 if len(self.ev) == before else 0
            self.step(generation)

    def random(self, evals: int, pop_size: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        upper = self.space.upper_bounds()
        generation, stalled = 0, 0
        while len(self.ev) < evals and stalled < STALL_GENERATIONS:  # a nearly exhausted space stops too
            before = len(self.ev)
            n = min(pop_size, evals - len(self.ev))
            self.ev.evaluate(rng.integers(0, upper + 1, size=(n, len(upper))))
            generation += 1
            stalled = stalled + 1 if len(self.ev) == before else 0
            self.step(generation)

    def linas(self, evals: int, pop_size: int, seed: int, inner_evals: int, kappa: float) -> None:
        from nestnas.hw_profiles.sampling import space_filling_sample

        init = space_filling_sample(self.space, pop_size, seed)
        self.ev.evaluate(np.array([self.space.encode(c) for c in init]))
        self.batches.append([self.space.encode(c).tolist() for c in init])  # JSON: plain ints
        self.step(1)
        iteration = 1
        while len(self.ev) < evals:
            iteration += 1
            n = min(pop_size, evals - len(self.ev))
            if iteration <= len(self.saved_batches):  # replayed iteration: its choice is on record
                X = np.array(self.saved_batches[iteration - 1], dtype=np.int64)
                self.ev.evaluate(X)
                self.batches.append(X.tolist())
                self.step(iteration)
                continue
            X, predicted = self._linas_candidates(n, seed + iteration, inner_evals, kappa)
            if len(X) == 0:
                break
            values = self.ev.evaluate(X)
            self.batches.append(X.tolist())
            taus = {}
            for name, pred in predicted.items():
                taus[f"tau_{name}"] = _kendall(pred, values[name])
            self.step(iteration, **taus)

    def _linas_candidates(self, n: int, seed: int, inner_evals: int, kappa: float):
        from nestnas.predictors.latency import AccuracyPredictor
        from pymoo.algorithms.moo.nsga2 import NSGA2, RankAndCrowding
        from pymoo.core.evaluator import Evaluator as PymooEvaluator
        from pymoo.core.population import Population
        from pymoo.optimize import minimize
        from pymoo.termination.max_eval import MaximumFunctionCallTermination

        rows = list(self.ev.archive.values())
        Xa = np.array([self.space.encode(r["config"]) for r in rows])
        surrogates = {}
        for m in self.metrics:
            if m.expensive:
                y = np.array([r["metrics"][m.name] for r in rows])
                surrogates[m.name] = AccuracyPredictor(self.space, members=SURROGATE_MEMBERS, seed=seed).fit(Xa, y)
        inner = _SurrogateProblem(self.space, self.objectives, self.budgets, self.metrics, surrogates, kappa)
        # Start the predictor-only search from the true front found so far (the rest random), so it
        # refines around what is known to be good instead of rediscovering it.
        vals, feasible = self.archive_values()
        from nestnas.search.front import non_dominated

        order = np.flatnonzero(feasible)
        best = Xa[order[non_dominated(np.column_stack([o.sign * vals[order, j]
                                                       for j, o in enumerate(self.objectives)]))]][:INNER_POP // 2]
        rng = np.random.default_rng(seed)
        upper = self.space.upper_bounds()
        start = np.vstack([best, rng.integers(0, upper + 1, size=(INNER_POP - len(best), len(upper)))])
        operators = {**integer_operators(self.space), "sampling": start}
        algo = NSGA2(pop_size=INNER_POP, **operators)
        with preserved_rng():
            res = minimize(inner, algo, MaximumFunctionCallTermination(inner_evals), seed=seed, verbose=False)
        pop = res.algorithm.pop
        _configs, hashes = self.ev.configs(pop.get("X"))
        keep, seen = [], set(self.ev.archive)
        for i, h in enumerate(hashes):
            if h not in seen:
                seen.add(h)
                keep.append(i)
        if not keep:
            return np.zeros((0, self.space.n_var), dtype=np.int64), {}
        pop = Population.new(X=pop.get("X")[keep])
        PymooEvaluator().eval(inner, pop)
        chosen = RankAndCrowding().do(inner, pop, n_survive=min(n, len(pop)), random_state=np.random.default_rng(seed))
        X = np.round(chosen.get("X")).astype(np.int64)
        predicted = {name: s.predict(X) for name, s in surrogates.items()}
        return X, predicted


def _kendall(a: np.ndarray, b: np.ndarray) -> float | None:
    """Kendall tau, or None where it is undefined (fewer than 3 points, or constant values)."""
    from scipy.stats import kendalltau

    if len(a) < 3:
        return None
    tau = kendalltau(a, b).statistic
    return float(tau) if np.isfinite(tau) else None


class _SurrogateProblem(Problem):
    """Predictor-only version of the problem: surrogates for expensive metrics (shifted by kappa
    standard deviations towards better, i.e. optimistic), the real function for cheap ones."""

    def __init__(self, space, objectives, budgets, metrics, surrogates, kappa):
        super().__init__(n_var=space.n_var, n_obj=len(objectives), n_ieq_constr=len(budgets), xl=0,
                         xu=np.asarray(space.upper_bounds()), vtype=int)
        self.space, self.objectives, self.budgets = space, objectives, budgets
        self.metrics = {m.name: m for m in metrics}
        self.surrogates, self.kappa = surrogates, kappa
        self._memo: dict[str, dict[tuple, float]] = {}  # cheap metrics are pure: never evaluate a row twice

    def _cheap(self, metric: Objective, X: np.ndarray) -> np.ndarray:
        memo = self._memo.setdefault(metric.name, {})
        rows = list(map(tuple, X.tolist()))
        todo = list(dict.fromkeys(r for r in rows if r not in memo))
        if todo:
            configs = [self.space.canonical(self.space.decode(r)) for r in todo]
            memo.update(zip(todo, metric.evaluate(configs).tolist()))
        return np.array([memo[r] for r in rows])

    def values(self, X) -> dict[str, np.ndarray]:
        X = np.round(X).astype(np.int64)
        needed = [o.name for o in self.objectives] + [b.metric for b in self.budgets]
        out = {}
        for name in dict.fromkeys(needed):
            m = self.metrics[name]
            if name in self.surrogates:
                mean, std = self.surrogates[name].predict(X, return_std=True)
                out[name] = mean - m.sign * self.kappa * std
            else:
                out[name] = self._cheap(m, X)
        return out

    def _evaluate(self, X, out, *args, **kwargs):
        v = self.values(X)
        out["F"] = np.column_stack([o.sign * v[o.name] for o in self.objectives])
        if self.budgets:
            out["G"] = np.column_stack([b.violation(v[b.metric]) for b in self.budgets])
