"""Search: evaluation cache, algorithms, budgets, resume after a kill, Pareto fronts, CLI."""

import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from nestnas.errors import ArtifactError, ConfigError
from nestnas.search import (
    Budget,
    CacheWarning,
    EvalCache,
    Objective,
    ParetoFront,
    SearchError,
    accuracy_objective,
    macs_objective,
    params_objective,
    parse_budget,
    search,
)
from nestnas.search.front import non_dominated, normalise
from nestnas.search.presets import profile_latency
from nestnas.search.problem import Evaluator
from nestnas.supernet import SearchSpace
from nestnas.supernet.checkpoint import save_checkpoint
from nestnas.supernet.data import digits_loaders
from nestnas.supernet.train import train_supernet
from nestnas.supernet.transformer import ElasticTransformer

REPO = Path(__file__).resolve().parents[1]
SHIPPED_TR = REPO / "hw_profiles" / "data" / "xeon-2c-onnxruntime-transformer.json"
CNN = SearchSpace.mobilenet()


def nestnas(*args, env=None):
    return subprocess.run([sys.executable, "-m", "nestnas", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env)


def one_line_error(proc, *fragments):
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A transformer supernet trained briefly on digits, its checkpoint and the shipped profile's latency."""
    torch.manual_seed(0)
    net = ElasticTransformer(SearchSpace.transformer(), num_classes=10, num_tokens=8, token_dim=8)
    train_loader, val_loader = digits_loaders("transformer", batch_size=64, seed=0)
    train_supernet(net, train_loader, 4, seed=0, progress=False)
    path = tmp_path_factory.mktemp("ckpt") / "tr.ckpt"
    save_checkpoint(net, path)
    net.eval()
    acc = accuracy_objective(net, val_loader, train_loader, seed=0)
    return net, path, acc, profile_latency(SHIPPED_TR, space=net.space)


def counting(objective: Objective, calls: list) -> Objective:
    def fn(configs):
        calls.extend(configs)
        return objective.fn(configs)
    return Objective(objective.name, fn, objective.direction, objective.unit, objective.source, objective.context,
                     objective.expensive, objective.ideal)


def test_equivalent_configs_are_evaluated_once_and_the_cache_persists(tmp_path):
    calls: list = []
    macs = counting(macs_objective(CNN, num_classes=10, in_channels=1), calls)
    a = CNN.smallest()
    # Same subnet, different settings in a block the depth choice removes: one canonical hash.
    b = dataclasses.replace(a, kernel_sizes=tuple(k[:1] + (7,) * (len(k) - 1) for k in a.kernel_sizes))
    assert list(CNN.encode(a)) != list(CNN.encode(b)) and CNN.config_hash(a) == CNN.config_hash(b)
    db = tmp_path / "evals.sqlite"
    with EvalCache(db) as cache:
        ev = Evaluator(CNN, [macs], cache)
        out = ev.evaluate(np.array([CNN.encode(a), CNN.encode(b), CNN.encode(a)]))
        assert out["macs"][0] == out["macs"][1] == out["macs"][2] and len(ev) == 1 and len(calls) == 1
    with EvalCache(db) as cache:  # another process or search: served from disk
        ev = Evaluator(CNN, [macs], cache)
        again = ev.evaluate(np.array([CNN.encode(b)]))
        assert again["macs"][0] == out["macs"][0] and len(calls) == 1 and cache.hits == 1
        assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_corrupt_cache_is_recreated_with_a_warning(tmp_path):
    db = tmp_path / "evals.sqlite"
    db.write_bytes(b"SQLite format 3\x00" + b"this is not a database" * 100)  # only a SQLite file is moved aside
    with pytest.warns(CacheWarning, match="corrupt"):
        cache = EvalCache(db)
    cache.put("ctx", {"h": 1.5})
    assert cache.get("ctx", ["h", "g"]) == {"h": 1.5} and cache.hits == 1 and cache.misses == 1
    assert (tmp_path / "evals.sqlite.corrupt").exists()
    cache.close()


def _cheap_problem():
    macs = macs_objective(CNN, num_classes=10, in_channels=1)
    params = params_objective(CNN, num_classes=10, in_channels=1)
    # A real trade-off between two exact counts: capacity (params, maximised) against MACs.
    capacity = Objective("capacity", params.fn, "max", "params", "computed", params.context, ideal=2e6)
    return macs, capacity


@pytest.mark.parametrize("algorithm", ["nsga2", "agemoea", "random", "linas"])
def test_every_algorithm_returns_a_reproducible_non_dominated_front(algorithm):
    macs, capacity = _cheap_problem()
    kw = {"algorithm": algorithm, "evals": 80, "pop_size": 16, "seed": 3, "inner_evals": 800}
    front = search(CNN, [capacity, macs], **kw)
    again = search(CNN, [capacity, macs], **kw)
    assert [c.hash for c in front] == [c.hash for c in again]
    assert [c.hash for c in front.evaluated] == [c.hash for c in again.evaluated]
    assert 80 <= len(front.evaluated) < 80 + 16
    assert len({c.hash for c in front.evaluated}) == len(front.evaluated)  # never evaluated twice
    # No evaluated point dominates a front member, and the front is exactly the non-dominated set.
    u = normalise(front.values(front.evaluated), front.objectives, front.reference)
    nd = {tuple(u[i]) for i in non_dominated(u)}
    assert {tuple(r) for r in normalise(front.values(), front.objectives, front.reference)} == nd
    assert 0.0 < front.hypervolume < 1.0
    history = front.meta["history"]
    assert [h["evaluations"] for h in history] == sorted(h["evaluations"] for h in history)
    if algorithm == "linas":
        assert all("tau_capacity" not in h for h in history)  # computed objectives need no surrogate


def test_unsga3_for_three_objectives():
    macs, capacity = _cheap_problem()
    res = Objective("resolution", lambda cs: [c.resolution for c in cs], "min", "px", "computed", "res")
    front = search(CNN, [capacity, macs, res], algorithm="unsga3", evals=60, pop_size=20, seed=0)
    assert len(front) >= 3 and front.values().shape[1] == 3


def test_linas_learns_a_surrogate_and_logs_its_kendall_tau(trained):
    net, _, acc, lat = trained
    front = search(net.space, [acc, lat], algorithm="linas", evals=60, pop_size=20, seed=0, inner_evals=1000)
    history = front.meta["history"]
    assert len(history) == 3 and all("tau_accuracy" in h for h in history[1:])
    assert all(np.isfinite(h["hypervolume"]) for h in history)
    assert history[-1]["hypervolume"] >= history[0]["hypervolume"]
    knee = front.knee()
    assert knee in front.candidates and "accuracy" in knee.measured and "latency" in knee.predicted


def test_budgets_are_respected_and_an_impossible_one_names_the_closest(trained):
    net, _, acc, lat = trained
    largest = lat.evaluate([net.space.largest()])[0]
    smallest = lat.evaluate([net.space.smallest()])[0]
    limit = (largest + smallest) / 2
    front = search(net.space, [acc, lat], [f"latency={limit}"], evals=60, pop_size=20, seed=0)
    assert front.candidates and all(c.metrics["latency"] <= limit for c in front)
    assert any(c.metrics["latency"] > limit for c in front.evaluated)  # the budget did cut something
    with pytest.raises(SearchError, match="no subnet meets latency <= 0.0001.*closest is"):
        search(net.space, [acc, lat], [Budget("latency", "<=", 1e-4)], evals=40, pop_size=20, seed=0)
    with pytest.raises(ConfigError, match="unknown metric 'flops'"):
        parse_budget("flops=3", {"latency": "min"})
    assert parse_budget("macs=20M", {"macs": "min"}) == Budget("macs", "<=", 20e6)
    assert parse_budget("accuracy=0.9", {"accuracy": "max"}).op == ">="


def test_front_round_trips_and_answers_queries(trained, tmp_path):
    net, _, acc, lat = trained
    front = search(net.space, [acc, lat], evals=60, pop_size=20, seed=1)
    path = tmp_path / "front.json"
    front.save(path)
    back = ParetoFront.load(path, space=net.space)
    assert back.to_dict() == front.to_dict() and back.hypervolume == front.hypervolume
    assert all(c.config == net.space.canonical(c.config) for c in back.evaluated)
    budget = sorted(c.metrics["latency"] for c in front)[len(front) // 2]
    best = front.best(latency_ms=budget)
    assert best.metrics["latency"] <= budget
    assert best.metrics["accuracy"] == max(c.metrics["accuracy"] for c in front if c.metrics["latency"] <= budget)
    with pytest.raises(ConfigError, match="closest"):
        front.best(latency_ms=1e-6)
    with pytest.raises(ConfigError, match="unknown budget"):
        front.best(flops=3)
    png = tmp_path / "front.png"
    front.plot(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with pytest.raises(ArtifactError, match="another search space"):
        ParetoFront.load(path, space=CNN)
    broken = tmp_path / "broken.json"
    broken.write_text(path.read_text()[:200])
    with pytest.raises(ArtifactError, match="broken.json"):
        ParetoFront.load(broken)


def _state_generations(path: Path) -> int:
    try:
        return len(json.loads(path.read_text())["history"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow  # NSGA-II killed and resumed (~60 s); the LINAS kill test stays in the default run
def test_a_killed_search_resumes_to_the_same_front(trained, tmp_path):
    _, ckpt, _, _ = trained
    env = {**os.environ, "NESTNAS_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    common = ["search", "--checkpoint", ckpt, "--profile", SHIPPED_TR, "--objectives", "accuracy,latency,macs",
              "--evals", "240", "--pop-size", "20", "--seed", "5", "--json"]
    killed = tmp_path / "killed.json"
    state = tmp_path / "killed.json.state.json"
    proc = subprocess.Popen([sys.executable, "-m", "nestnas", *map(str, common), "--out", killed,
                             "--cache", tmp_path / "a.sqlite"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _state_generations(state) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the search finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = _state_generations(state)
    assert 3 <= stopped_at and not killed.exists()
    resumed = nestnas(*common, "--out", killed, "--cache", tmp_path / "a.sqlite", env=env)
    assert resumed.returncode == 0, resumed.stderr
    whole = tmp_path / "whole.json"
    fresh = nestnas(*common, "--out", whole, "--cache", tmp_path / "b.sqlite", env=env)
    assert fresh.returncode == 0, fresh.stderr
    a, b = json.loads(killed.read_text()), json.loads(whole.read_text())
    assert a["front"] == b["front"] and a["evaluated"] == b["evaluated"] and a["hypervolume"] == b["hypervolume"]
    assert a["meta"]["resumed"] and not b["meta"]["resumed"]
    assert len(a["meta"]["history"]) == len(b["meta"]["history"]) > stopped_at


@pytest.mark.slow  # three CLI searches and their plots: minutes
def test_search_and_show_cli(trained, tmp_path):
    _, ckpt, _, _ = trained
    env = {**os.environ, "NESTNAS_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    out, png = tmp_path / "f.json", tmp_path / "f.png"
    args = ["search", "--checkpoint", ckpt, "--profile", SHIPPED_TR, "--evals", "40", "--pop-size", "20",
            "--out", out, "--plot", png]
    proc = nestnas(*args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "knee" in proc.stdout and "hypervolume" in proc.stdout and png.is_file()
    assert (tmp_path / "home" / "evals.sqlite").is_file()
    again = nestnas(*args, "--json", "--state", tmp_path / "other.state", env=env)  # new state, same cache
    summary = json.loads(again.stdout)
    assert summary["cache_hit_rate"] > 0.9 and summary["size"] >= 1
    shown = nestnas("show", out)
    assert shown.returncode == 0 and "knee" in shown.stdout and "accuracy" in shown.stdout
    one_line_error(nestnas(*args[:-4], "--objectives", "accuracy,flops", "--out", tmp_path / "x.json", env=env),
                   "unknown objective 'flops'", "latency")
    one_line_error(nestnas(*args[:-4], "--budget", "latency=0.00001", "--out", tmp_path / "x.json", env=env),
                   "no subnet meets latency <= 1e-05", "closest")
    one_line_error(nestnas(*args[:-4], "--algorithm", "annealing", "--out", tmp_path / "x.json", env=env),
                   "--algorithm", "linas")
    cnn_profile = REPO / "hw_profiles" / "data" / "xeon-2c-onnxruntime-cnn.json"
    one_line_error(nestnas("search", "--checkpoint", ckpt, "--profile", cnn_profile, "--out", tmp_path / "x.json",
                           env=env), "another search space")
    assert not (tmp_path / "x.json").exists()
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    one_line_error(nestnas("show", bad), "bad.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (tmp_path / "home" / "evals.sqlite").write_bytes(b"SQLite format 3\x00" + b"garbage" * 1000)
        for suffix in ("-wal", "-shm"):
            Path(str(tmp_path / "home" / "evals.sqlite") + suffix).unlink(missing_ok=True)
        proc = nestnas(*args[:-2], "--state", tmp_path / "s3.json", env=env)
        assert proc.returncode == 0 and "warning: evaluation cache" in proc.stderr and "corrupt" in proc.stderr
