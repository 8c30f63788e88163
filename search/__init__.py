"""Multi-objective subnet search: objectives, budgets, the evaluation cache, LINAS, Pareto fronts."""

from nestnas.search.cache import CacheWarning, EvalCache
from nestnas.search.front import Candidate, ParetoFront
from nestnas.search.objectives import (
    Budget,
    MetricInfo,
    Objective,
    PredictorId,
    accuracy_objective,
    latency_objective,
    macs_objective,
    measured_latency_objective,
    params_objective,
    parse_budget,
    predicted_accuracy_objective,
)
from nestnas.search.run import SEARCH_ALGORITHMS, SearchError, search

__all__ = [
    "SEARCH_ALGORITHMS",
    "Budget",
    "CacheWarning",
    "Candidate",
    "EvalCache",
    "MetricInfo",
    "Objective",
    "ParetoFront",
    "PredictorId",
    "SearchError",
    "accuracy_objective",
    "latency_objective",
    "macs_objective",
    "measured_latency_objective",
    "params_objective",
    "parse_budget",
    "predicted_accuracy_objective",
    "search",
]


class _CallableModule(__import__("types").ModuleType):
    # `nestnas.search` is both this package and the function of the public API (`nestnas.search(...)`);
    # once the package is imported, Python binds the package to that name, so the package calls through.
    def __call__(self, *args, **kwargs):
        return search(*args, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
