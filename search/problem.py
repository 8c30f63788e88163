"""The evaluator (canonical hashing, cache, archive) and the pymoo problem over a space's encoding."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from pymoo.core.duplicate import DuplicateElimination
from pymoo.core.problem import Problem

from nestnas.errors import ClusterError
from nestnas.search.cache import EvalCache
from nestnas.search.objectives import Budget, Objective
from nestnas.search.remote import EvaluationsLost
from nestnas.supernet.config import SubnetConfig
from nestnas.supernet.space import SearchSpace


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Evaluations must not move any global RNG: a resumed search replays earlier generations from
    stored values, and its random stream has to be the one an uninterrupted run sees."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        yield
    np.random.set_state(np_state)
    random.setstate(py_state)


class Evaluator:
    """Evaluates metrics of encoded configs once per canonical hash and keeps an ordered archive
    of everything evaluated (the search's "true evaluations")."""

    def __init__(self, space: SearchSpace, metrics: Sequence[Objective], cache: EvalCache | None = None,
                 replay: dict[str, dict[str, float]] | None = None):
        self.space = space
        self.metrics = list(metrics)
        self.cache = cache if cache is not None else EvalCache()
        self.replay = replay or {}
        self.archive: dict[str, dict] = {}  # hash -> {"config", "metrics"}, in evaluation order

    def __len__(self) -> int:
        return len(self.archive)

    def configs(self, X: np.ndarray) -> tuple[list[SubnetConfig], list[str]]:
        configs = [self.space.canonical(self.space.decode(row)) for row in np.asarray(X, dtype=np.int64)]
        return configs, [self.space.config_hash(c) for c in configs]

    def evaluate(self, X: np.ndarray) -> dict[str, np.ndarray]:
        """name -> values for each row of `X` (rows may repeat or be equivalent)."""
        configs, hashes = self.configs(X)
        new = {h: c for h, c in zip(hashes, configs) if h not in self.archive}
        if new:
            values = {h: {} for h in new}
            for metric in self.metrics:
                todo = dict(new)
                for h in new:
                    if h in self.replay and metric.name in self.replay[h]:
                        values[h][metric.name] = self.replay[h][metric.name]
                        todo.pop(h)
                cached = self.cache.get(metric.cache_key, todo)
                for h, v in cached.items():
                    values[h][metric.name] = v
                    todo.pop(h)
                if todo:
                    with preserved_rng():
                        try:
                            fresh = metric.evaluate(list(todo.values()))
                        except EvaluationsLost as lost:  # a cluster failed: keep what it finished
                            raise self._kept(metric, list(todo), lost) from None
                    computed = dict(zip(todo, fresh.tolist()))
                    self.cache.put(metric.cache_key, computed)
                    for h, v in computed.items():
                        values[h][metric.name] = v
            for h, c in new.items():
                self.archive[h] = {"config": c, "metrics": values[h]}
        return {m.name: np.array([self.archive[h]["metrics"][m.name] for h in hashes]) for m in self.metrics}

    def _kept(self, metric: Objective, hashes: list[str], lost: EvaluationsLost) -> ClusterError:
        """Cache the values a failed remote evaluation finished; the one line says what is kept."""
        self.cache.put(metric.cache_key, {hashes[i]: v for i, v in lost.done.items()})
        if self.cache.path is None:
            return ClusterError(f"{lost}; {len(lost.done)} of this generation's {len(hashes)} evaluations are lost "
                                f"with the in-memory cache (give a cache file); the {len(self)} before are in the "
                                "state file, if the search keeps one")
        return ClusterError(f"{lost}; {len(lost.done)} of this generation's {len(hashes)} evaluations and the "
                            f"{len(self)} before are saved in the cache {self.cache.path}; rerun the same search "
                            "to resume")


class CanonicalDuplicates(DuplicateElimination):
    """Offspring equal to another under the space's canonical form are duplicates (functional
    hashing): the algorithm never spends an evaluation slot on an equivalent config."""

    def __init__(self, space: SearchSpace):
        super().__init__()
        self.space = space
        self._memo: dict[tuple, str] = {}  # populations repeat rows; hashing is the costly part

    def _keys(self, X) -> list[str]:
        keys = []
        for row in map(tuple, np.round(np.asarray(X, dtype=float)).astype(np.int64).tolist()):
            key = self._memo.get(row)
            if key is None:
                key = self._memo[row] = self.space.config_hash(self.space.decode(row))
            keys.append(key)
        return keys

    def _do(self, pop, other, is_duplicate):
        seen = set() if other is None else set(self._keys(other.get("X")))
        for i, key in enumerate(self._keys(pop.get("X"))):
            if key in seen:
                is_duplicate[i] = True
            else:
                seen.add(key)
        return is_duplicate


class SubnetProblem(Problem):
    """pymoo problem: minimise sign * objective, subject to budgets (G <= 0)."""

    def __init__(self, evaluator: Evaluator, objectives: Sequence[Objective], budgets: Sequence[Budget] = ()):
        space = evaluator.space
        super().__init__(n_var=space.n_var, n_obj=len(objectives), n_ieq_constr=len(budgets), xl=0,
                         xu=np.asarray(space.upper_bounds()), vtype=int)
        self.evaluator, self.objectives, self.budgets = evaluator, list(objectives), list(budgets)

    def _evaluate(self, X, out, *args, **kwargs):
        values = self.evaluator.evaluate(np.round(X).astype(np.int64))
        out["F"] = np.column_stack([o.sign * values[o.name] for o in self.objectives])
        if self.budgets:
            out["G"] = np.column_stack([b.violation(values[b.metric]) for b in self.budgets])
