"""Benchmark: one per-device search of a fleet against one dedicated search per device.

The problem: the CNN supernet trained on digits (default recipe, trained once into --work, or
--checkpoint), shared-weight validation accuracy (the true, expensive evaluation) and latency
predicted from each of the four shipped CNN fleet profiles (ONNX Runtime at 2 threads batch 128,
at 2 threads batch 32, at 1 thread batch 32, and untuned TVM at batch 32). For each algorithm:

- per-device: ONE run optimising accuracy and the K = 4 latencies together, one front per device
  (`ParetoFront.for_device`), with a fresh evaluation cache;
- separate: K searches of (accuracy, that device's latency), same algorithm, evals and seed, with one
  fresh cache shared among them (so later searches reuse what earlier ones evaluated).

Reported: true evaluations (distinct subnets whose accuracy was computed: the per-device run; the
separate searches as K x evals without a cache and as unique subnets with the shared cache), wall
time, both as a ratio to ONE dedicated search (the first separate search, fresh cache; target
<= 1.3x for K = 4), and per device the hypervolume of the per-device front against the dedicated
search's front (same reference point: both come from the same anchors and predictor). The machine
is shared: wall times are noisy; ratios within one run are what to read.

Reproduce (repository root)::

    python tools/bench_fleet.py --quick        # a smoke run: 1 epoch, 60 evaluations, NSGA-II only
    python tools/bench_fleet.py                # 300 evaluations, NSGA-II and LINAS
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from nestnas.fileio import write_json
from nestnas.hw_profiles.profile import host_fingerprint
from nestnas.predictors.store import sha256_file
from nestnas.search import EvalCache, accuracy_objective, search
from nestnas.search.presets import profile_latency
from nestnas.supernet.checkpoint import load_supernet, save_checkpoint
from nestnas.supernet.cnn import ElasticCNN
from nestnas.supernet.data import digits_loaders
from nestnas.supernet.train import DEFAULT_EPOCHS, train_supernet

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "hw_profiles" / "data"
FLEET = {"xeon-2c-ort": DATA / "xeon-2c-onnxruntime-cnn.json",
         "xeon-2c-ort-b32": DATA / "xeon-2c-ort-b32-onnxruntime-cnn.json",
         "xeon-2c-ort-1t-b32": DATA / "xeon-2c-ort-1t-b32-onnxruntime-cnn.json",
         "xeon-2c-tvm": DATA / "xeon-2c-tvm-cnn.json"}
TARGET_RATIO = 1.3


def supernet(work: Path, epochs: int, checkpoint: Path | None, console: Console):
    ckpt = checkpoint or work / f"supernet-{epochs}ep.ckpt"
    if not ckpt.exists():
        console.print(f"training the CNN supernet ({epochs} epochs) into {ckpt}")
        torch.manual_seed(0)
        net = ElasticCNN(num_classes=10, in_channels=1)
        train_loader, _ = digits_loaders("cnn", batch_size=64, seed=0)
        train_supernet(net, train_loader, epochs, seed=0, progress=False)
        save_checkpoint(net, ckpt)
    return load_supernet(ckpt), ckpt


def counted(objective, counter: list, seconds: list):
    """The objective, counting every config it really evaluates (cache misses only) and the time."""
    def fn(configs):
        t0 = time.perf_counter()
        counter.append(len(configs))
        values = objective.fn(configs)
        seconds.append(time.perf_counter() - t0)
        return values
    return dataclasses.replace(objective, fn=fn)


def run_algorithm(algorithm: str, net, acc, latencies: dict, args, work: Path, console: Console) -> dict:
    K = len(latencies)
    stamp = f"{algorithm}-{args.evals}-{args.seed}-{time.time_ns()}"
    options = {"algorithm": algorithm, "evals": args.evals, "pop_size": args.pop_size, "seed": args.seed,
               "inner_evals": args.inner_evals}
    # one run, K devices
    calls: list[int] = []
    acc_s: list[float] = []
    t0 = time.perf_counter()
    with EvalCache(work / f"per-device-{stamp}.sqlite") as cache:
        joint = search(net.space, [counted(acc, calls, acc_s), *latencies.values()], cache=cache, per_device=True,
                       **options)
    per_device_s = time.perf_counter() - t0
    per_device_acc_s = sum(acc_s)
    joint.save(work / f"per-device-{stamp}.json")
    per_device_evals = sum(calls)
    assert per_device_evals == len(joint.evaluated), (per_device_evals, len(joint.evaluated))
    console.print(f"{algorithm} per-device (K={K}): {per_device_evals} true evaluations, {per_device_s:.1f} s "
                  f"({per_device_acc_s:.1f} s of them accuracy); fronts: "
                  + ", ".join(f"{d} {len(joint.for_device(d))}" for d in latencies))
    # K dedicated searches, one shared fresh cache
    separate, seconds, evals, unique, accuracy_s = {}, {}, {}, set(), {}
    with EvalCache(work / f"separate-{stamp}.sqlite") as cache:
        for device, lat in latencies.items():
            calls, acc_s = [], []
            t0 = time.perf_counter()
            front = search(net.space, [counted(acc, calls, acc_s), dataclasses.replace(lat, name="latency")],
                           cache=cache, **options)
            seconds[device] = time.perf_counter() - t0
            accuracy_s[device] = sum(acc_s)
            front.save(work / f"dedicated-{device}-{stamp}.json")
            separate[device], evals[device] = front, len(front.evaluated)
            unique |= {c.hash for c in front.evaluated}
            console.print(f"{algorithm} dedicated {device}: {evals[device]} evaluated ({sum(calls)} new with the "
                          f"shared cache), {seconds[device]:.1f} s")
    first = next(iter(latencies))
    one_evals, one_s = evals[first], seconds[first]
    # the same comparison at equal cost per accuracy evaluation (the shared machine's load varies):
    # the one search's cost per evaluation times the evaluations, plus each run's own other time
    per_eval = accuracy_s[first] / one_evals
    steady = (per_eval * per_device_evals + per_device_s - per_device_acc_s) / one_s
    devices = {}
    for device in latencies:
        mine, theirs = joint.for_device(device), separate[device]
        assert mine.reference == theirs.reference, (mine.reference, theirs.reference)
        devices[device] = {"per_device_hv": mine.hypervolume, "dedicated_hv": theirs.hypervolume,
                           "hv_ratio": mine.hypervolume / theirs.hypervolume if theirs.hypervolume else None,
                           "per_device_size": len(mine), "dedicated_size": len(theirs),
                           "dedicated_evals": evals[device], "dedicated_seconds": seconds[device]}
    return {"algorithm": algorithm, "K": K,
            "per_device": {"true_evals": per_device_evals, "seconds": per_device_s,
                           "accuracy_seconds": per_device_acc_s, "other_seconds": per_device_s - per_device_acc_s,
                           "joint_front_size": len(joint), "evals_ratio_to_one": per_device_evals / one_evals,
                           "seconds_ratio_to_one": per_device_s / one_s, "steady_seconds_ratio_to_one": steady},
            "separate": {"true_evals_without_cache": sum(evals.values()), "unique_subnets_shared_cache": len(unique),
                         "seconds_shared_cache": sum(seconds.values()),
                         "evals_ratio_to_one": sum(evals.values()) / one_evals,
                         "unique_ratio_to_one": len(unique) / one_evals,
                         "seconds_ratio_to_one": sum(seconds.values()) / one_s},
            "one_search": {"device": first, "true_evals": one_evals, "seconds": one_s,
                           "accuracy_seconds": accuracy_s[first], "other_seconds": one_s - accuracy_s[first]},
            "devices": devices}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("bench_fleet_work"))
    ap.add_argument("--checkpoint", type=Path, default=None, help="a trained CNN supernet (skips training)")
    ap.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS["cnn"])
    ap.add_argument("--evals", type=int, default=300)
    ap.add_argument("--pop-size", type=int, default=40)
    ap.add_argument("--inner-evals", type=int, default=5000, help="LINAS: predictor-only evaluations per iteration")
    ap.add_argument("--algorithms", default="nsga2,linas")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, 60 evaluations, NSGA-II")
    ap.add_argument("--out", type=Path, default=Path("bench_fleet.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.evals, args.pop_size, args.algorithms = 1, 60, 20, "nsga2"
    console = Console(width=160)
    args.work.mkdir(parents=True, exist_ok=True)
    missing = [str(p) for p in FLEET.values() if not p.is_file()]
    if missing:
        console.print(f"missing fleet profiles: {missing}")
        return 1
    net, ckpt = supernet(args.work, args.epochs, args.checkpoint, console)
    train_loader, val_loader = digits_loaders("cnn", batch_size=64, seed=0)
    acc = accuracy_objective(net, val_loader, train_loader, seed=args.seed, context=sha256_file(ckpt)[:16])
    latencies = {d: profile_latency(p, args.seed, net.space, name=f"latency@{d}", device=d) for d, p in FLEET.items()}
    results = []
    for algorithm in [a.strip() for a in args.algorithms.split(",") if a.strip()]:
        results.append(run_algorithm(algorithm, net, acc, latencies, args, args.work, console))
        report(results, args, ckpt, console)  # after each algorithm: a long run keeps what it finished
    return 0


def report(results: list[dict], args, ckpt: Path, console: Console) -> None:
    table = Table(title=f"K = {len(FLEET)} devices: one per-device run against {len(FLEET)} dedicated searches "
                        f"({args.evals} evaluations, population {args.pop_size}, seed {args.seed}; times noisy: "
                        "shared machine)")
    for col in ["algorithm", "mode", "true evaluations", "x one", "wall s", "x one (time)", "x one (equal cost)",
                *[f"HV ratio {d}" for d in FLEET]]:
        table.add_column(col, justify="left" if col in ("algorithm", "mode") else "right")
    for r in results:
        p, s = r["per_device"], r["separate"]
        table.add_row(r["algorithm"], "per-device (1 run)", str(p["true_evals"]), f"{p['evals_ratio_to_one']:.2f}",
                      f"{p['seconds']:.0f}", f"{p['seconds_ratio_to_one']:.2f}",
                      f"{p['steady_seconds_ratio_to_one']:.2f}",
                      *[f"{r['devices'][d]['hv_ratio']:.3f}" if r["devices"][d]["hv_ratio"] else "-" for d in FLEET])
        table.add_row("", "separate (K x evals)", str(s["true_evals_without_cache"]), f"{s['evals_ratio_to_one']:.2f}",
                      "", "", "", *["1" for _ in FLEET])
        table.add_row("", "separate (shared cache)", str(s["unique_subnets_shared_cache"]),
                      f"{s['unique_ratio_to_one']:.2f}", f"{s['seconds_shared_cache']:.0f}",
                      f"{s['seconds_ratio_to_one']:.2f}", "", *["" for _ in FLEET])
    console.print(table)
    for r in results:
        p = r["per_device"]
        met = p["evals_ratio_to_one"] <= TARGET_RATIO and p["steady_seconds_ratio_to_one"] <= TARGET_RATIO
        console.print(f"{r['algorithm']}: per-device run costs {p['evals_ratio_to_one']:.2f}x one search in true "
                      f"evaluations, {p['seconds_ratio_to_one']:.2f}x in wall time and "
                      f"{p['steady_seconds_ratio_to_one']:.2f}x at equal cost per accuracy evaluation (target <= "
                      f"{TARGET_RATIO}x: {'met' if met else 'NOT met'}); predictor-only time "
                      f"{p['other_seconds']:.1f} s against {r['one_search']['other_seconds']:.1f} s; hypervolume "
                      "per device vs dedicated: "
                      + ", ".join(f"{d} {v['hv_ratio']:.3f}" for d, v in r["devices"].items() if v["hv_ratio"]))
    write_json(args.out, {"meta": {"host": host_fingerprint(), "checkpoint": str(ckpt), "epochs": args.epochs,
                                   "evals": args.evals, "pop_size": args.pop_size, "seed": args.seed,
                                   "profiles": {d: str(p) for d, p in FLEET.items()},
                                   "note": "wall times on a shared machine are noisy"},
                          "results": results, "target_ratio": TARGET_RATIO})
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
