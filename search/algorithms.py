"""Search algorithms by name: one registry (timm-style), name -> `Algorithm`, for every algorithm
`search()` can run. Each entry's `drive(run, *, evals, pop_size, seed, **options)` spends about
`evals` true evaluations through the run's evaluator and calls `run.step(generation)` after every
generation (which saves the state and reports progress). The pymoo ones (NSGA-II, AGE-MOEA,
U-NSGA-III) share one driver over integer encodings; random sampling is here; LINAS lives in
`nestnas.search.linas` and registers itself on import (at the end of this module)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from nestnas.errors import ConfigError
from nestnas.supernet.space import SearchSpace

STALL_GENERATIONS = 20  # generations without a new subnet before a search stops early


@dataclass(frozen=True)
class Algorithm:
    """A registered search algorithm: its `drive` function and the names of the `search()`
    keyword options it takes (recorded in the search state, so a resume checks them)."""

    name: str
    description: str
    drive: Callable[..., None]
    options: tuple[str, ...] = ()


ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(name: str, description: str, options: tuple[str, ...] = ()):
    """Decorator: register `drive(run, *, evals, pop_size, seed, **options)` under `name`."""
    def wrap(fn: Callable) -> Callable:
        if name in ALGORITHMS:
            raise ConfigError(f"search algorithm {name!r} is registered twice")
        ALGORITHMS[name] = Algorithm(name, description, fn, tuple(options))
        return fn
    return wrap


def register_pymoo_algorithm(name: str, description: str):
    """Decorator: register a pymoo algorithm factory `(space, pop_size, n_obj) -> algorithm`,
    driven generation by generation over the run's integer encoding."""
    def wrap(factory: Callable) -> Callable:
        register_algorithm(name, description)(
            lambda run, *, evals, pop_size, seed: _evolve(run, factory, evals, pop_size, seed))
        return factory
    return wrap


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise ConfigError(f"algorithm {name!r}: unknown; allowed: {list(ALGORITHMS)}")
    return ALGORITHMS[name]


def integer_operators(space: SearchSpace) -> dict:
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.operators.sampling.rnd import IntegerRandomSampling

    from nestnas.search.problem import CanonicalDuplicates

    # SBX/PM on a relaxed integer grid, rounded back: the usual pymoo recipe for integer encodings.
    return {"sampling": IntegerRandomSampling(),
            "crossover": SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
            "mutation": PM(eta=20, vtype=float, repair=RoundingRepair()),
            "eliminate_duplicates": CanonicalDuplicates(space)}


def _evolve(run, factory: Callable, evals: int, pop_size: int, seed: int) -> None:
    from pymoo.termination.max_eval import MaximumFunctionCallTermination

    from nestnas.search.problem import SubnetProblem

    problem = SubnetProblem(run.ev, run.objectives, run.budgets)
    algo = factory(run.space, pop_size, len(run.objectives))
    algo.setup(problem, termination=MaximumFunctionCallTermination(10**12), seed=seed, verbose=False)
    generation, stalled = 0, 0
    while len(run.ev) < evals and stalled < STALL_GENERATIONS:
        before = len(run.ev)
        pop = algo.ask()
        if pop is None or len(pop) == 0:  # mating found no subnet not seen yet (a small space)
            stalled += 1
            continue
        algo.evaluator.eval(problem, pop)
        algo.tell(infills=pop)
        generation += 1
        stalled = stalled + 1 if len(run.ev) == before else 0
        run.step(generation)


@register_pymoo_algorithm("nsga2", "NSGA-II (default)")
def _nsga2(space: SearchSpace, pop_size: int, n_obj: int):
    from pymoo.algorithms.moo.nsga2 import NSGA2

    return NSGA2(pop_size=pop_size, **integer_operators(space))


@register_pymoo_algorithm("agemoea", "AGE-MOEA (for two objectives)")
def _agemoea(space: SearchSpace, pop_size: int, n_obj: int):
    try:
        import numba  # noqa: F401  (pymoo's AGE-MOEA is compiled with it)
    except ImportError:
        raise ConfigError("algorithm 'agemoea' needs numba: pip install 'nestnas[agemoea]'") from None
    from pymoo.algorithms.moo.age import AGEMOEA

    return AGEMOEA(pop_size=pop_size, **integer_operators(space))


@register_pymoo_algorithm("unsga3", "U-NSGA-III (for three or more objectives)")
def _unsga3(space: SearchSpace, pop_size: int, n_obj: int):
    from pymoo.algorithms.moo.unsga3 import UNSGA3
    from pymoo.util.ref_dirs import get_reference_directions

    ref_dirs = get_reference_directions("energy", n_obj, max(pop_size, n_obj), seed=1)
    return UNSGA3(ref_dirs=ref_dirs, pop_size=pop_size, **integer_operators(space))


@register_algorithm("random", "uniform random sampling (a baseline)")
def _random(run, *, evals: int, pop_size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    upper = run.space.upper_bounds()
    generation, stalled = 0, 0
    while len(run.ev) < evals and stalled < STALL_GENERATIONS:  # a nearly exhausted space stops too
        before = len(run.ev)
        n = min(pop_size, evals - len(run.ev))
        run.ev.evaluate(rng.integers(0, upper + 1, size=(n, len(upper))))
        generation += 1
        stalled = stalled + 1 if len(run.ev) == before else 0
        run.step(generation)


from nestnas.search import linas as _linas  # noqa: E402, F401  (registers "linas")
