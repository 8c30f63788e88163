"""A search's true evaluations on Ray actors (`search(..., ray_address=...)`, `nestnas search --ray`).

Each actor rebuilds the supernet once from what the driver put in Ray's object store (the space as a
dict, the constructor spec, the state dict, and the validation and calibration batches as tensors;
never a file path, so any machine of the cluster can host it) and evaluates chunks of canonical
configs. Only the computation moves: the driver's `Evaluator` still asks the cache and the replay
first and alone writes the SQLite cache and the state file, so functional hashing, resume and the
cache context are those of a local run. An actor computes what the local objective computes (the
same calibration batches, drawn on the driver under the seed; torch at one thread), so the same
seed gives the same front.

Faults: an actor whose process dies is replaced (up to MAX_RESTARTS times per slot) and its chunk is
submitted again; a result is taken once, when a chunk returns, so nothing is lost or counted twice. A chunk
that fails on every retry (or every actor gone) raises `EvaluationsLost`, which carries the values
finished so far for the driver to cache before it stops with one line.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import math
import os
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from nestnas.errors import ClusterError, ConfigError, NestnasError
from nestnas.supernet.config import SubnetConfig

MAX_RESTARTS = 3  # new actors per slot after the first (a dead process is replaced this often)
CHUNK_RETRIES = 3  # submissions of one chunk after its first
CHUNKS_PER_WORKER = 4  # smaller chunks balance subnets of unequal cost across actors
ACTOR_PREFIX = "nestnas-search"


@dataclass(frozen=True)
class AccuracyTask:
    """What an actor needs to compute `accuracy_objective`'s values: the supernet as data and the
    batches `subnet_accuracy` would read locally (the calibration ones drawn under `seed`)."""

    space: dict[str, Any]
    spec: dict[str, Any]
    weights: dict[str, torch.Tensor]
    val: list[Any]  # (x, y) batches of the validation loader, in its order
    calib: list[Any] | None  # the first `calib_batches` batches of the calibration loader under `seed`
    seed: int
    calib_batches: int

    def build(self):
        from nestnas.supernet.base import build_supernet
        from nestnas.supernet.space import SearchSpace

        net = build_supernet(SearchSpace.from_dict(self.space), **self.spec)
        net.load_state_dict(self.weights)
        return net.eval()

    def evaluate(self, net, configs: Sequence[dict[str, Any]]) -> list[float]:
        from nestnas.supernet.evaluate import subnet_accuracy

        with torch.no_grad():
            return [subnet_accuracy(net, SubnetConfig.from_dict(c), self.val, self.calib, self.calib_batches, self.seed)
                    for c in configs]


def accuracy_task(net, val_loader, calib_loader, *, seed: int, calib_batches: int) -> AccuracyTask:
    """The `AccuracyTask` of `accuracy_objective(net, val_loader, calib_loader, ...)`."""
    calib = None
    if calib_loader is not None:
        # as subnet_accuracy draws them: a shuffled loader takes its order from the seeded global RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            calib = list(itertools.islice(iter(calib_loader), calib_batches))
    return AccuracyTask(net.space.to_dict(), dict(net.spec()), {k: v.detach().cpu().clone() for k, v in
                                                                 net.state_dict().items()},
                        list(val_loader), calib, seed, calib_batches)


class EvalActor:
    """One Ray actor: the supernet rebuilt once, then chunks of configs evaluated on it."""

    def __init__(self, task: AccuracyTask):
        torch.set_num_threads(1)  # one CPU per actor
        self.task, self.net = task, task.build()

    def pid(self) -> int:
        return os.getpid()

    def evaluate(self, configs: list[dict[str, Any]]) -> tuple[int, list[float], float]:
        t0 = time.perf_counter()
        values = self.task.evaluate(self.net, configs)
        return os.getpid(), values, time.perf_counter() - t0


class EvaluationsLost(ClusterError):
    """Evaluations that failed on every retry; `done` maps the index of each config finished before
    the failure to its value (for the driver to cache)."""

    def __init__(self, message: str, done: dict[int, float]):
        super().__init__(message)
        self.done = done


@dataclass
class PoolStats:
    """What the pool did (kept in the front's meta under "ray")."""

    address: str
    workers: int
    startup_s: float = 0.0  # actors created and the supernet loaded in each
    evaluations: int = 0
    compute_s: float = 0.0  # summed inside the actors
    wall_s: float = 0.0  # the driver's time in `evaluate`, dispatch and waiting included
    calls: int = 0
    failures: int = 0  # chunks lost to a dead actor and submitted again
    pids: set[int] = field(default_factory=set)

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "workers": self.workers, "startup_s": self.startup_s,
                "evaluations": self.evaluations, "compute_s": self.compute_s, "wall_s": self.wall_s,
                "calls": self.calls, "failures": self.failures, "processes": len(self.pids)}


class ActorPool:
    """`workers` actors of one task; `evaluate(configs)` spreads chunks over them as they free up."""

    def __init__(self, ray, task: AccuracyTask, workers: int, address: str = ""):
        self.ray = ray
        self.stats = PoolStats(address, workers)
        t0 = time.perf_counter()
        ref = ray.put(task)  # once: every actor (and every restart) reads the same object
        self._ref = ref  # held while the actors live: a restarted one reads it again
        self._token = uuid.uuid4().hex[:8]
        self.restarts = [0] * workers
        self.actors = [self._spawn(i) for i in range(workers)]
        try:
            self.stats.pids.update(ray.get([a.pid.remote() for a in self.actors]))
        except ray.exceptions.RayActorError as exc:
            self.close()
            raise ClusterError(f"ray: the evaluation actors could not start: {_reason(exc)}") from None
        self.stats.startup_s = time.perf_counter() - t0

    def name(self, slot: int) -> str:
        """The actor's name (namespace `nestnas`): a test finds an actor's process by it."""
        return f"{ACTOR_PREFIX}-{self._token}-{slot}-{self.restarts[slot]}"

    def _spawn(self, slot: int):
        # Restarted here rather than by Ray's max_restarts: Ray warns that a restart may not find
        # object-store arguments; this pool holds the task's reference for as long as it lives.
        actor = self.ray.remote(EvalActor).options(name=self.name(slot), num_cpus=1, max_restarts=0)
        return actor.remote(self._ref)

    def _restart(self, slot: int) -> bool:
        """A new actor in `slot` after a failure, if the slot has restarts left."""
        with contextlib.suppress(Exception):  # a process that died is gone already
            self.ray.kill(self.actors[slot], no_restart=True)
        if self.restarts[slot] >= MAX_RESTARTS:
            return False
        self.restarts[slot] += 1
        self.actors[slot] = self._spawn(slot)
        return True

    def close(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):  # already gone
                self.ray.kill(a, no_restart=True)

    def evaluate(self, configs: Sequence[SubnetConfig]) -> list[float]:
        ray = self.ray
        t0 = time.perf_counter()
        dicts = [c.to_dict() for c in configs]
        size = max(1, math.ceil(len(dicts) / (len(self.actors) * CHUNKS_PER_WORKER)))
        chunks = [range(i, min(i + size, len(dicts))) for i in range(0, len(dicts), size)]
        pending = collections.deque(range(len(chunks)))
        tries = collections.Counter()
        idle = list(range(len(self.actors)))
        inflight: dict[Any, tuple[int, int]] = {}
        done: dict[int, float] = {}
        while pending or inflight:
            while pending and idle:
                a, c = idle.pop(0), pending.popleft()
                inflight[self.actors[a].evaluate.remote([dicts[i] for i in chunks[c]])] = (a, c)
            if not inflight:  # chunks left and every actor past its restarts
                raise EvaluationsLost(f"ray: every evaluation actor died more than {MAX_RESTARTS} times", done)
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            a, c = inflight.pop(ref)
            try:
                pid, values, seconds = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                tries[c] += 1
                self.stats.failures += 1
                if tries[c] > CHUNK_RETRIES:
                    self._drain(inflight, chunks, done)
                    raise EvaluationsLost(f"ray: evaluation actors died {tries[c]} times on the same "
                                          f"{len(chunks[c])} subnet(s) ({_reason(exc)})", done) from None
                pending.appendleft(c)
                if self._restart(a):
                    idle.append(a)  # the next call waits for the new process
                continue
            except ray.exceptions.RayTaskError as exc:  # the evaluation itself raised
                cause = getattr(exc, "cause", None)
                if isinstance(cause, NestnasError):
                    raise cause from None
                raise
            done.update(zip(chunks[c], values))
            idle.append(a)
            self.stats.pids.add(pid)
            self.stats.compute_s += seconds
            self.stats.evaluations += len(values)
        self.stats.calls += 1
        self.stats.wall_s += time.perf_counter() - t0
        return [done[i] for i in range(len(dicts))]


    def _drain(self, inflight: dict, chunks: list[range], done: dict[int, float]) -> None:
        """Collect the chunks still running elsewhere before giving up, so that what they finish is kept."""
        for ref, (_, c) in inflight.items():
            with contextlib.suppress(Exception):  # that one failed too
                done.update(zip(chunks[c], self.ray.get(ref, timeout=60)[1]))


def _reason(exc: Exception) -> str:
    """Ray's message in one line: what died and, where its traceback says, the error that killed it."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line and not set(line) <= set("^~ ")]
    if not lines:
        return type(exc).__name__
    first = lines[0].split(", ray::")[0].split(" (pid=")[0].rstrip(".")
    return first[:160] + (f": {lines[-1][:160]}" if len(lines) > 1 else "")


@contextlib.contextmanager
def remote_metrics(metrics: Sequence, ray_address, workers: int | None) -> Iterator[tuple[list, list[PoolStats]]]:
    """`metrics` with each one that can run on Ray (an `Objective` with `remote`) evaluated by a
    pool of actors on the cluster at `ray_address`, and the pools' stats; `metrics` as they are
    without an address."""
    metrics = list(metrics)
    if ray_address is None:
        if workers is not None:
            raise ConfigError("workers needs ray_address (the Ray cluster whose actors evaluate)")
        yield metrics, []
        return
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"workers {workers!r}: allowed: a positive integer (actors; default: the cluster's CPUs)")
    shipped = [m for m in metrics if getattr(m, "remote", None) is not None]
    if not shipped:
        raise ConfigError(f"ray_address: none of the metrics {[m.name for m in metrics]} runs on Ray (measured "
                          "accuracy does); drop ray_address")
    from nestnas.raycluster import cluster_cpus, connect

    with connect(ray_address, what="ray_address") as ray:
        cpus = cluster_cpus(ray)
        n = workers or cpus
        if n > cpus:
            raise ConfigError(f"workers {n}: the Ray cluster has {cpus} CPUs (one actor per CPU); allowed: 1 to {cpus}")
        pools: dict[int, ActorPool] = {}
        try:
            for m in shipped:
                pools[id(m)] = ActorPool(ray, m.remote(), n, str(ray_address))
            yield ([replace(m, fn=pools[id(m)].evaluate) if id(m) in pools else m for m in metrics],
                   [p.stats for p in pools.values()])
        finally:
            for p in pools.values():
                p.close()
