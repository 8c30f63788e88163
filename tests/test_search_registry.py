"""One registry of search algorithms: `search()` dispatches every name through it (no if/elif),
LINAS included, and an algorithm registered by a user runs with resume bookkeeping for free."""
import numpy as np
import pytest

from nestnas.errors import ConfigError
from nestnas.search import SEARCH_ALGORITHMS, macs_objective, search
from nestnas.search.algorithms import ALGORITHMS, get_algorithm, register_algorithm
from nestnas.search.objectives import Objective
from nestnas.supernet.space import SearchSpace

TINY_TR = SearchSpace.transformer(depth_choices=(1, 2), embed_choices=(16, 32), head_choices=(1, 2),
                                  mlp_ratio_choices=(2.0, 4.0), head_dim=8)


def cheap():
    return [Objective("embed", lambda cs: [c.embed_dim for c in cs], "max", "", "computed", "e", ideal=64.0),
            Objective("depth", lambda cs: [c.depth for c in cs], "min", "", "computed", "d")]


def test_every_builtin_is_in_the_one_registry():
    assert SEARCH_ALGORITHMS == ("nsga2", "agemoea", "unsga3", "random", "linas") == tuple(ALGORITHMS)
    assert get_algorithm("linas").drive.__module__ == "nestnas.search.linas"
    assert get_algorithm("linas").options == ("inner_evals", "kappa") and get_algorithm("nsga2").options == ()
    with pytest.raises(ConfigError, match=r"^algorithm 'annealing': unknown; allowed: \['nsga2', .*'linas'\]"):
        search(TINY_TR, cheap(), algorithm="annealing", evals=8, pop_size=4)
    with pytest.raises(ConfigError, match="registered twice"):
        register_algorithm("nsga2", "again")(lambda run, **kw: None)


def test_a_registered_algorithm_runs_and_saves_its_state(tmp_path):
    @register_algorithm("all_at_once", "every subnet of a small space in one generation")
    def drive(run, *, evals, pop_size, seed):
        upper = run.space.upper_bounds()
        grid = np.array(np.meshgrid(*[np.arange(u + 1) for u in upper], indexing="ij")).reshape(len(upper), -1).T
        run.ev.evaluate(grid)
        run.step(1)

    try:
        front = search(TINY_TR, cheap(), algorithm="all_at_once", evals=40, pop_size=4, state=tmp_path / "s.json")
    finally:
        ALGORITHMS.pop("all_at_once")
    assert front.meta["algorithm"] == "all_at_once" and len(front.meta["history"]) == 1
    assert len(front.evaluated) == TINY_TR.size() == 40
    assert {(c.config.embed_dim, c.config.depth) for c in front} == {(32, 1)}
    assert (tmp_path / "s.json").is_file()


@pytest.mark.parametrize("algorithm", ["nsga2", "agemoea", "unsga3"])
def test_evolution_on_a_space_smaller_than_its_mating_needs(algorithm):
    """On a 40-subnet space pymoo's mating can return no new subnet (ask() gives None); that is a
    stalled generation, not a TypeError from inside pymoo."""
    macs = macs_objective(TINY_TR, num_classes=10)
    objectives = [Objective("latency", lambda cs: macs.evaluate(cs) / 1e4, "min", "ms", "predicted", "m"), macs]
    front = search(TINY_TR, objectives, algorithm=algorithm, evals=8, pop_size=4, seed=0)
    hashes = [TINY_TR.config_hash(c.config) for c in front.evaluated]
    assert 4 <= len(hashes) <= 8 and len(set(hashes)) == len(hashes)
    again = search(TINY_TR, objectives, algorithm=algorithm, evals=8, pop_size=4, seed=0)
    assert [TINY_TR.config_hash(c.config) for c in again.evaluated] == hashes  # seeded: same run
