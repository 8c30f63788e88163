"""Search algorithms by name (pymoo for the evolutionary ones), all over integer encodings."""

from __future__ import annotations

from collections.abc import Callable

from nestnas.errors import ConfigError
from nestnas.supernet.space import SearchSpace

ALGORITHMS: dict[str, Callable] = {}
DESCRIPTIONS: dict[str, str] = {}


def register_algorithm(name: str, description: str):
    def wrap(fn: Callable) -> Callable:
        ALGORITHMS[name] = fn
        DESCRIPTIONS[name] = description
        return fn
    return wrap


def integer_operators(space: SearchSpace) -> dict:
    from nestnas.search.problem import CanonicalDuplicates
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.operators.sampling.rnd import IntegerRandomSampling

    # SBX/PM on a relaxed integer grid, rounded back: the usual pymoo recipe for integer encodings.
    return {"sampling": IntegerRandomSampling(),
            "crossover": SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
            "mutation": PM(eta=20, vtype=float, repair=RoundingRepair()),
            "eliminate_duplicates": CanonicalDuplicates(space)}


@register_algorithm("nsga2", "NSGA-II (default)")
def _nsga2(space: SearchSpace, pop_size: int, n_obj: int):
    from pymoo.algorithms.moo.nsga2 import NSGA2

    return NSGA2(pop_size=pop_size, **integer_operators(space))


@register_algorithm("agemoea", "AGE-MOEA (for two objectives)")
def _agemoea(space: SearchSpace, pop_size: int, n_obj: int):
    try:
        import numba  # noqa: F401  (pymoo's AGE-MOEA is compiled with it)
    except ImportError:
        raise ConfigError("--algorithm agemoea needs numba: pip install 'nestnas[agemoea]'") from None
    from pymoo.algorithms.moo.age import AGEMOEA

    return AGEMOEA(pop_size=pop_size, **integer_operators(space))


@register_algorithm("unsga3", "U-NSGA-III (for three or more objectives)")
def _unsga3(space: SearchSpace, pop_size: int, n_obj: int):
    from pymoo.algorithms.moo.unsga3 import UNSGA3
    from pymoo.util.ref_dirs import get_reference_directions

    ref_dirs = get_reference_directions("energy", n_obj, max(pop_size, n_obj), seed=1)
    return UNSGA3(ref_dirs=ref_dirs, pop_size=pop_size, **integer_operators(space))


def make_algorithm(name: str, space: SearchSpace, pop_size: int, n_obj: int):
    if name not in ALGORITHMS:
        raise ConfigError(f"--algorithm: unknown algorithm {name!r}; allowed: {sorted([*ALGORITHMS, 'linas', 'random'])}")
    return ALGORITHMS[name](space, pop_size, n_obj)
