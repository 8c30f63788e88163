"""Benchmark: a search's true evaluations on 1 against 2 Ray workers, and where more stop helping.

The fixed search: NSGA-II (seed 0, --evals true evaluations, population --pop-size) of shared-weight
accuracy (batch norm recalibrated: the true, expensive objective) and MACs on the default CNN
supernet trained --epochs on digits (trained here once, or --checkpoint). It runs on a private
local:2 Ray cluster with workers=1 and workers=2 (torch at one thread in each actor), each with a
fresh in-memory cache so every subnet is evaluated, --repeats times, interleaved; medians are
quoted. One local run (no Ray, torch at one thread) is the reference.

Measured: wall time (the actors' start, which a long search pays once, is reported apart), the
efficiency t1 / (2 * t2), the per-evaluation cost c (inside the actors) and the driver's overhead
per evaluation d (pymoo, the cache, the state, dispatch and collection: the 1-worker wall time less
c per evaluation). Projected, Amdahl-style, per generation of n subnets: T(w) = sum over
generations of (d * n + ceil(n / w) * c). The driver is the bottleneck once its serial share d * n
exceeds the parallel ceil(n / w) * c, i.e. from about w = c / d workers (and no search gains from
more workers than its population).

The machine is shared (2 cores, other jobs running): the numbers are noisy; quote them as such.

Reproduce (repository root)::

    python tools/bench_scale.py --out /tmp/bench_scale.json      # ~4 min on 2 busy cores (1 min of it training)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from nestnas.fileio import write_json
from nestnas.search import EvalCache, accuracy_objective, macs_objective, search

PROJECT = (1, 2, 8, 64, 256)


def supernet(checkpoint: Path | None, epochs: int, work: Path):
    """(net, accuracy objective, macs objective) on digits."""
    from nestnas.supernet.checkpoint import load_supernet, save_checkpoint
    from nestnas.supernet.cnn import ElasticCNN
    from nestnas.supernet.data import digits_loaders
    from nestnas.supernet.space import SearchSpace
    from nestnas.supernet.train import train_supernet

    train_loader, val_loader = digits_loaders("cnn", batch_size=64, seed=0)
    if checkpoint is None:
        checkpoint = work / f"digits-cnn-{epochs}ep.safetensors"
    if not checkpoint.exists():
        work.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        net = ElasticCNN(SearchSpace.mobilenet(), num_classes=10, in_channels=1)
        train_supernet(net, train_loader, epochs, seed=0, progress=False)
        save_checkpoint(net, checkpoint)
    net = load_supernet(checkpoint)
    return net, accuracy_objective(net, val_loader, train_loader, seed=0), macs_objective(net.space, **net.spec())


def timed(net, objectives, args, **ray) -> dict:
    t0 = time.perf_counter()
    with EvalCache() as cache:
        front = search(net.space, objectives, evals=args.evals, pop_size=args.pop_size, seed=0, cache=cache, **ray)
    wall = time.perf_counter() - t0
    history = [h["evaluations"] for h in front.meta["history"]]
    record = {"wall_s": wall, "evaluations": len(front.evaluated), "front": sorted(c.hash for c in front),
              "generations": [b - a for a, b in zip([0, *history], history)]}
    if "ray" in front.meta:
        meta = front.meta["ray"]
        record.update(startup_s=meta["startup_s"], compute_s=meta["compute_s"], search_s=wall - meta["startup_s"])
    else:
        record["search_s"] = wall
    return record


def project(generations: list[int], c: float, d: float, workers: int) -> float:
    return sum(d * n + math.ceil(n / workers) * c for n in generations)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a trained CNN checkpoint on digits [default: train one]")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--evals", type=int, default=32)
    parser.add_argument("--pop-size", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "nestnas-bench-scale",
                        help="folder that keeps the trained checkpoint between runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big-pop", type=int, default=256, help="population of the projected larger search")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    console = Console()
    from nestnas.raycluster import connect

    t0 = time.perf_counter()
    net, acc, macs = supernet(args.checkpoint, args.epochs, args.work)
    console.print(f"supernet ready in {time.perf_counter() - t0:.0f} s")
    objectives = [acc, macs]
    runs: dict[str, list[dict]] = {"local": [timed(net, objectives, args)], "ray-1": [], "ray-2": []}  # reference
    with connect("local:2"):
        for _ in range(args.repeats):  # interleaved, so that load on the machine hits both alike
            runs["ray-1"].append(timed(net, objectives, args, ray_address="local:2", workers=1))
            runs["ray-2"].append(timed(net, objectives, args, ray_address="local:2", workers=2))
    fronts = {tuple(r["front"]) for rs in runs.values() for r in rs}
    med = {k: {f: statistics.median(r[f] for r in rs) for f in rs[0] if isinstance(rs[0][f], float)}
           for k, rs in runs.items()}
    n = runs["ray-1"][0]["evaluations"]
    c = med["ray-1"]["compute_s"] / n
    d = max(med["ray-1"]["search_s"] - med["ray-1"]["compute_s"], 0.0) / n
    t1, t2 = med["ray-1"]["search_s"], med["ray-2"]["search_s"]
    generations = runs["ray-1"][0]["generations"]
    big = [args.big_pop] * 10
    crossover = c / d if d > 0 else float("inf")
    c2 = med["ray-2"]["compute_s"] / n  # slower than c where two actors do not get two free cores
    cores = 2 * c / c2
    result = {
        "search": {"evals": args.evals, "pop_size": args.pop_size, "evaluated": n, "generations": generations,
                   "repeats": args.repeats, "same_front_everywhere": len(fronts) == 1},
        "median": med, "runs": runs, "efficiency": t1 / (2 * t2),
        "per_eval_s": c, "driver_per_eval_s": d, "driver_per_generation_s": d * args.pop_size,
        "startup_s": med["ray-2"]["startup_s"], "per_eval_s_two_workers": c2, "cores_got_by_two_workers": cores,
        "projection_s": {str(w): project(generations, c, d, w) for w in PROJECT},
        "projection_big_s": {str(w): project(big, c, d, w) for w in PROJECT},
        "driver_bound_from_workers": crossover,
        "note": "shared 2-core machine with other jobs running: noisy",
    }
    table = Table(title=f"NSGA-II, {n} true evaluations, population {args.pop_size} (medians of {args.repeats}; "
                        "noisy shared 2-core machine)")
    for col in ("run", "wall s", "actor start s", "search s"):
        table.add_column(col, justify="right")
    for k, m in med.items():
        table.add_row(k, f"{m['wall_s']:.1f}", f"{m.get('startup_s', 0):.1f}", f"{m['search_s']:.1f}")
    console.print(table)
    console.print(f"efficiency t1/(2*t2) = {result['efficiency']:.2f}; per evaluation c = {1e3 * c:.0f} ms; "
                  f"driver d = {1e3 * d:.1f} ms per evaluation ({1e3 * d * args.pop_size:.0f} ms per generation); "
                  f"same front in every run: {len(fronts) == 1}")
    console.print(f"with two workers an evaluation took {1e3 * c2:.0f} ms: the two actors got {cores:.2f} cores' "
                  "worth of CPU (other jobs share the machine)")
    proj = Table(title="projected search time (s), T(w) = sum_g d*n + ceil(n/w)*c")
    proj.add_column("workers", justify="right")
    proj.add_column(f"this search (pop {args.pop_size})", justify="right")
    proj.add_column(f"pop {args.big_pop}, 10 generations", justify="right")
    for w in PROJECT:
        proj.add_row(str(w), f"{result['projection_s'][str(w)]:.1f}", f"{result['projection_big_s'][str(w)]:.1f}")
    console.print(proj)
    console.print(f"the driver becomes the bottleneck from about c/d = {crossover:.0f} workers")
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
