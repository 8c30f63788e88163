"""A search's true evaluations on Ray actors: the same front as a local run, the same cache, dead
actors survived, and one line when the cluster is lost (with what was saved)."""

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from nestnas.errors import ClusterError, ConfigError
from nestnas.search import EvalCache, Objective, ParetoFront, accuracy_objective, macs_objective, search
from nestnas.supernet import SearchSpace
from nestnas.supernet.checkpoint import save_checkpoint
from nestnas.supernet.cnn import ElasticCNN
from nestnas.supernet.data import digits_datasets
from nestnas.supernet.space import StageSpec
from nestnas.supernet.train import train_supernet

SPACE = SearchSpace.mobilenet(stages=(StageSpec(8, 2, (1, 2)), StageSpec(16, 2, (1, 2))), kernel_choices=(3, 5),
                              expand_choices=(2, 3), width_choices=(0.5, 1.0), resolution_choices=(8,),
                              stem_channels=8, head_channels=16)
RUN = {"evals": 24, "pop_size": 8, "seed": 0}


@contextlib.contextmanager
def one_thread():
    """The actors run torch at one thread; a local run compared with them does too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    """A small CNN supernet trained briefly on 600 digits: (net, [accuracy, macs])."""
    train, val = digits_datasets("cnn", 0)
    torch.manual_seed(0)
    net = ElasticCNN(SPACE, num_classes=10, in_channels=1)
    train_loader = DataLoader(Subset(train, range(600)), batch_size=64, shuffle=True, drop_last=True)
    with one_thread():
        train_supernet(net, train_loader, 3, seed=0, progress=False)
    net.eval()
    val_loader = DataLoader(val, batch_size=256, shuffle=False)
    return net, [accuracy_objective(net, val_loader, train_loader, seed=0), macs_objective(SPACE, **net.spec())]


@pytest.fixture(scope="module")
def local(tiny, tmp_path_factory):
    """The reference: the search run in this process, with its cache file."""
    db = tmp_path_factory.mktemp("local") / "evals.sqlite"
    with one_thread(), EvalCache(db) as cache:
        front = search(SPACE, tiny[1], cache=cache, **RUN)
    return front, db


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    from nestnas.raycluster import connect

    with connect("local:2") as joined:
        assert joined is ray
        yield ray


def summary(front):
    return ([(c.hash, c.metrics) for c in front], sorted((c.hash, c.metrics["accuracy"]) for c in front.evaluated))


def rows(db):
    with contextlib.closing(sqlite3.connect(db)) as con:
        return sorted(con.execute("SELECT context, hash, value FROM evals").fetchall())


def test_ray_search_gives_the_local_front_and_the_local_cache(tiny, local, cluster, tmp_path):
    front, local_db = local
    db = tmp_path / "evals.sqlite"
    with EvalCache(db) as cache:
        remote = search(SPACE, tiny[1], cache=cache, ray_address="local:2", **RUN)
    assert summary(remote) == summary(front) and len(remote.evaluated) == len(front.evaluated) >= RUN["evals"]
    ray_meta = remote.meta["ray"]
    assert ray_meta["workers"] == 2 and ray_meta["processes"] == 2 and ray_meta["failures"] == 0
    assert ray_meta["evaluations"] == len(front.evaluated)  # every accuracy was computed on an actor, once
    # The same contexts, hashes and values: a local run's cache serves a Ray run and back.
    assert rows(db) == rows(local_db)


def _kill_actor_mid_run(ray, generation: int):
    """A progress callback that, after `generation`, SIGKILLs one evaluation actor's process a moment
    into the next generation (while it evaluates); returns (callback, killed pids)."""
    killed: list[int] = []

    def progress(record):
        if record["generation"] != generation:
            return
        name = next(n for n in ray.util.list_named_actors() if n.startswith("nestnas-search-") and n.endswith("-0-0"))
        pid = ray.get(ray.get_actor(name).pid.remote())
        killed.append(pid)
        threading.Timer(0.05, os.kill, (pid, signal.SIGKILL)).start()

    return progress, killed


def test_a_killed_actor_is_replaced_and_nothing_is_lost_or_counted_twice(tiny, local, cluster, tmp_path):
    front, _ = local
    progress, killed = _kill_actor_mid_run(cluster, generation=1)
    with EvalCache(tmp_path / "evals.sqlite") as cache:
        remote = search(SPACE, tiny[1], cache=cache, state=tmp_path / "state.json", ray_address="local:2",
                        progress=progress, **RUN)
    assert killed, "the actor was never killed"
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)  # that process is gone
    ray_meta = remote.meta["ray"]
    assert ray_meta["failures"] >= 1 and ray_meta["processes"] == 3  # a new process took over the slot
    assert summary(remote) == summary(front)
    assert len(remote.evaluated) == len(front.evaluated) == ray_meta["evaluations"]
    assert remote.meta["cache"]["misses"] == front.meta["cache"]["misses"]


@pytest.mark.slow
def test_a_lost_cluster_is_one_line_saying_what_is_saved_and_a_rerun_resumes(tiny, local, cluster, tmp_path):
    front, _ = local
    db, state = tmp_path / "evals.sqlite", tmp_path / "state.json"

    stop = threading.Event()

    def kill_every_actor():  # each one the pool starts, as soon as it is there
        while not stop.wait(0.02):
            for name in cluster.util.list_named_actors():
                if name.startswith("nestnas-search-"):
                    with contextlib.suppress(ValueError):  # gone already
                        cluster.kill(cluster.get_actor(name), no_restart=True)

    def lose_the_cluster(record):
        if record["generation"] == 1:
            threading.Thread(target=kill_every_actor, daemon=True).start()

    try:
        with EvalCache(db) as cache, pytest.raises(ClusterError) as err:
            search(SPACE, tiny[1], cache=cache, state=state, ray_address="local:2", progress=lose_the_cluster, **RUN)
    finally:
        stop.set()
    message = str(err.value)
    assert "\n" not in message and f"saved in the cache {db}" in message and "rerun" in message
    kept = re.search(r"; (\d+) of this generation's \d+ evaluations and the (\d+) before", message)
    done, before = map(int, kept.groups())
    per_metric = Counter(context for context, _, _ in rows(db))  # accuracy runs first, so only it has this generation's
    assert 0 < before < len(front.evaluated) and sorted(per_metric.values()) == sorted([before, before + done])
    with one_thread(), EvalCache(db) as cache:  # the rerun (here locally) picks up what was saved
        resumed = search(SPACE, tiny[1], cache=cache, state=state, **RUN)
    assert summary(resumed) == summary(front) and resumed.meta["resumed"]


def test_bad_options_are_one_line(tiny, cluster):
    with pytest.raises(ConfigError, match="workers needs ray_address"):
        search(SPACE, tiny[1], workers=2, **RUN)
    with pytest.raises(ConfigError, match="workers 3: the Ray cluster has 2 CPUs"):
        search(SPACE, tiny[1], ray_address="local:2", workers=3, **RUN)
    cheap = [tiny[1][1], Objective("params", lambda cs: [1.0] * len(cs))]
    with pytest.raises(ConfigError, match="none of the metrics .* runs on Ray"):
        search(SPACE, cheap, ray_address="local:2", **RUN)


def test_without_ray_the_option_names_the_extra(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an import of an uninstalled package does
    with pytest.raises(ClusterError, match=r'install the extra: pip install -e "\.\[ray\]"'):
        search(SPACE, tiny[1], ray_address="local:2", **RUN)


def _nestnas(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torch at one thread, as in the actors
    return subprocess.run([sys.executable, "-m", "nestnas", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env)


def test_cli_workers_without_ray_is_one_line(tmp_path):
    proc = _nestnas("search", "--checkpoint", tmp_path / "none.ckpt", "--out", tmp_path / "f.json", "--workers", "2")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: --workers needs --ray (the Ray cluster whose actors evaluate)"], proc.stderr


@pytest.mark.slow
def test_cli_search_on_ray_gives_the_local_front(tiny, tmp_path):
    pytest.importorskip("ray")
    ckpt = tmp_path / "tiny.ckpt"
    save_checkpoint(tiny[0], ckpt)
    fronts = {}
    for where, extra in (("local", ()), ("ray", ("--ray", "local:2", "--workers", "2"))):
        out = tmp_path / f"{where}.json"
        proc = _nestnas("search", "--checkpoint", ckpt, "--out", out, "--objectives", "accuracy,macs", "--evals", 16,
                        "--pop-size", 8, "--cache", tmp_path / f"{where}.sqlite", "--json",
                        *extra)
        assert proc.returncode == 0, proc.stderr
        fronts[where] = ParetoFront.load(out)
    assert summary(fronts["ray"]) == summary(fronts["local"]) and fronts["ray"].meta["ray"]["workers"] == 2
