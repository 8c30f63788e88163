"""LINAS (as in DyNAS-T): predictor-guided search for expensive objectives.

Evaluate a space-filling population on the true objectives; then, each iteration, fit a
surrogate (the ensemble regressor of `AccuracyPredictor`, which also gives an uncertainty) to
every expensive objective, run a predictor-only NSGA-II for `inner_evals` evaluations on the
surrogates (optimistic by `kappa` standard deviations) and the cheap objectives, and evaluate the
best `pop_size` unseen candidates (rank, then crowding) for real. Each iteration's choice is kept
in the run's `batches`, so a resumed run replays it instead of refitting.
"""

from __future__ import annotations

import numpy as np
from pymoo.core.problem import Problem

from nestnas.search.algorithms import integer_operators, register_algorithm
from nestnas.search.objectives import Objective
from nestnas.search.problem import preserved_rng

INNER_POP = 100
# Tree models only: a surrogate fitted on a few dozen subnets must not extrapolate (a linear or
# MLP member predicts accuracies above 1 off the data, and the search then chases them).
SURROGATE_MEMBERS = ("gbt", "forest")


@register_algorithm("linas", "LINAS: surrogates for the expensive objectives, predictor-only inner NSGA-II",
                    options=("inner_evals", "kappa"))
def linas(run, *, evals: int, pop_size: int, seed: int, inner_evals: int = 5000, kappa: float = 1.0) -> None:
    from nestnas.hw_profiles.sampling import space_filling_sample

    space = run.space
    init = space_filling_sample(space, pop_size, seed)
    run.ev.evaluate(np.array([space.encode(c) for c in init]))
    run.batches.append([space.encode(c).tolist() for c in init])  # JSON: plain ints
    run.step(1)
    iteration = 1
    while len(run.ev) < evals:
        iteration += 1
        n = min(pop_size, evals - len(run.ev))
        if iteration <= len(run.saved_batches):  # replayed iteration: its choice is on record
            X = np.array(run.saved_batches[iteration - 1], dtype=np.int64)
            run.ev.evaluate(X)
            run.batches.append(X.tolist())
            run.step(iteration)
            continue
        X, predicted = _candidates(run, n, seed + iteration, inner_evals, kappa)
        if len(X) == 0:
            break
        values = run.ev.evaluate(X)
        run.batches.append(X.tolist())
        taus = {f"tau_{name}": _kendall(pred, values[name]) for name, pred in predicted.items()}
        run.step(iteration, **taus)


def _candidates(run, n: int, seed: int, inner_evals: int, kappa: float):
    from pymoo.algorithms.moo.nsga2 import NSGA2, RankAndCrowding
    from pymoo.core.evaluator import Evaluator as PymooEvaluator
    from pymoo.core.population import Population
    from pymoo.optimize import minimize
    from pymoo.termination.max_eval import MaximumFunctionCallTermination

    from nestnas.predictors.latency import AccuracyPredictor
    from nestnas.search.front import non_dominated

    space = run.space
    rows = list(run.ev.archive.values())
    Xa = np.array([space.encode(r["config"]) for r in rows])
    surrogates = {}
    for m in run.metrics:
        if m.expensive:
            y = np.array([r["metrics"][m.name] for r in rows])
            surrogates[m.name] = AccuracyPredictor(space, members=SURROGATE_MEMBERS, seed=seed).fit(Xa, y)
    inner = SurrogateProblem(space, run.objectives, run.budgets, run.metrics, surrogates, kappa)
    # Start the predictor-only search from the true front found so far (the rest random), so it
    # refines around what is known to be good instead of rediscovering it.
    vals, feasible = run.archive_values()
    order = np.flatnonzero(feasible)
    best = Xa[order[non_dominated(np.column_stack([o.sign * vals[order, j]
                                                   for j, o in enumerate(run.objectives)]))]][:INNER_POP // 2]
    rng = np.random.default_rng(seed)
    upper = space.upper_bounds()
    start = np.vstack([best, rng.integers(0, upper + 1, size=(INNER_POP - len(best), len(upper)))])
    operators = {**integer_operators(space), "sampling": start}
    algo = NSGA2(pop_size=INNER_POP, **operators)
    with preserved_rng():
        res = minimize(inner, algo, MaximumFunctionCallTermination(inner_evals), seed=seed, verbose=False)
    pop = res.algorithm.pop
    _configs, hashes = run.ev.configs(pop.get("X"))
    keep, seen = [], set(run.ev.archive)
    for i, h in enumerate(hashes):
        if h not in seen:
            seen.add(h)
            keep.append(i)
    if not keep:
        return np.zeros((0, space.n_var), dtype=np.int64), {}
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


class SurrogateProblem(Problem):
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
