"""Benchmark: deployable artifacts side by side at batch 1, per family.

For each family, a supernet is trained briefly (realistic weights and batch-norm statistics) and
its front of shared-weight accuracy against MACs is searched; --subnets members spread along it
are exported. One run measures, per subnet: the ONNX Runtime bundle, TVM untuned, TVM tuned with
one MetaSchedule database shared by the front (or TVM's default schedules where they run the
whole subnet faster, as the bundle ships), torch eager on the extracted module, and torch
eager on the supernet with the config (ONNX Runtime and tuned TVM measured alternately in three
sweeps, median). Tuning (--strategy, default evolutionary) cost: the shared run's seconds against tuning each
subnet alone (a fresh database each, the same options; with transfer, each alone run can only
draw on relatives within its own subnet). Deployment fidelity: each ONNX
Runtime and (untuned) TVM artifact, exported at its profile's batch and measured in three interleaved
sweeps (median), against the predictor of the
shipped profile of that backend, raw and scaled by the device's speed now relative to the
profile's (`nestnas.speed_factor`: five of the profile's subnets re-measured).

Targets: ONNX Runtime >= 2x faster than the supernet run eagerly; TVM tuned within 1.25x of
ONNX Runtime; shared tuning <= half of tuning each alone; fidelity within +-10%.

Reproduce (repository root, `pip install -e ".[tvm]"`)::

    python tools/bench_compile.py --work bench-compile   # ~2 h on 2 cores, most of it TVM tuning
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from nestnas.compile.bundle import Subnet, export_bundles, load_bundle, measure_bundle
from nestnas.compile.stats import interleaved_sweeps
from nestnas.compile.tuning import TuneOptions
from nestnas.fileio import write_json
from nestnas.hw_profiles import DeviceProfile, speed_factor
from nestnas.hw_profiles.profile import host_fingerprint
from nestnas.search import accuracy_objective, macs_objective
from nestnas.search import search as nestnas_search
from nestnas.search.presets import profile_latency
from nestnas.supernet import SearchSpace, build_supernet
from nestnas.supernet.data import digits_loaders
from nestnas.supernet.train import train_supernet

REPO = Path(__file__).resolve().parents[1]
PROFILES = {(b, f): REPO / "hw_profiles" / "data" / f"xeon-2c-{b}-{f}.json"
            for b in ("onnxruntime", "tvm") for f in ("cnn", "transformer")}
SPEC = {"cnn": {"num_classes": 10, "in_channels": 1}, "transformer": {"num_classes": 10, "num_tokens": 8,
                                                                       "token_dim": 8}}


def pareto_subnets(net, n: int, train_loader, val_loader, seed: int, evals: int):
    """n members of a searched front (shared-weight accuracy against MACs), spread along its MACs
    range: the two ends and evenly spaced members between."""
    objectives = [accuracy_objective(net, val_loader, train_loader, seed=seed, calib_batches=4),
                  macs_objective(net.space, **net.spec())]
    front = nestnas_search(net.space, objectives, algorithm="nsga2", evals=evals, pop_size=40, seed=seed)
    members = sorted(front.candidates, key=lambda c: c.metrics["macs"])
    if len(members) < n:
        raise SystemExit(f"the front has {len(members)} members, fewer than --subnets {n}; raise --search-evals")
    picks = np.unique(np.round(np.linspace(0, len(members) - 1, n)).astype(int))
    return [members[i] for i in picks], len(members)


FIDELITY_PASSES = 3


def measure_fidelity(family: str, net, configs, subnets, lat, work: Path, seed: int, console: Console):
    """Each backend's artifact at its profile's batch against that profile's predictor (TVM
    untuned, as its profile was measured), measured as profiles are: FIDELITY_PASSES sweeps over
    the subnets, median per artifact, so that one burst of a neighbour on this shared host does
    not decide a subnet's figure. Also reported scaled by the device's speed now against the
    profile's (`speed_factor`)."""
    folders, out = {}, {sub.name: {} for sub in subnets}
    for backend, fmt in (("onnxruntime", "onnx"), ("tvm", "tvm")):
        batch = lat[backend].batch_size
        for c, sub in zip(configs, subnets):
            folder = work / f"fidelity-{backend}" / sub.name
            export_bundles([Subnet(sub.name, sub.module, tuple(net.input_shape(c, batch)), {})], [folder],
                           formats=(fmt,), measure=False, seed=seed, tune=TuneOptions(trials=0))
            folders[backend, sub.name] = (folder, fmt, batch, float(lat[backend].evaluate([c])[0]))
    # The host's speed drifts (10-25% within the hour on this machine): re-measure a few of each
    # profile's own subnets now.
    speed = {b: speed_factor(DeviceProfile.load(PROFILES[b, family]), n_anchors=5) for b in ("onnxruntime", "tvm")}
    for b, cal in speed.items():
        console.print(f"{family}/{b}: device now {cal.factor:.3f}x the profile's latency "
                      f"(anchors {cal.spread[0]:.3f} to {cal.spread[1]:.3f})")
    runs = interleaved_sweeps(list(folders), lambda _, key: measure_bundle(
        folders[key][0], formats=(folders[key][1],))[key[0]]["median_ms"], FIDELITY_PASSES)
    for (backend, name), (_, _, batch, predicted) in folders.items():
        measured = float(np.median(runs[backend, name]))
        out[name][backend] = {"batch": batch, "measured_ms": measured, "passes_ms": runs[backend, name],
                              "predicted_ms": predicted, "ratio": measured / predicted,
                              "speed_factor": speed[backend].factor,
                              "calibrated_ratio": measured / (predicted * speed[backend].factor)}
    return out, speed


def measure_batch1(subnets, work: Path) -> dict:
    """ONNX Runtime and tuned TVM bundles measured alternately in FIDELITY_PASSES sweeps (median per
    artifact): sub-millisecond models measured minutes apart differ by more than the 1.25 target."""
    def measure(_, key):
        name, backend = key
        folder = work / ("untuned" if backend == "onnxruntime" else "tuned") / name
        return measure_bundle(folder, formats=("onnx" if backend == "onnxruntime" else "tvm",))[backend]["median_ms"]

    keys = [(sub.name, b) for sub in subnets for b in ("onnxruntime", "tvm")]
    return {key: float(np.median(v)) for key, v in interleaved_sweeps(keys, measure, FIDELITY_PASSES).items()}


def time_eager(fn, x, runs: int = 30) -> float:
    with torch.no_grad():
        for _ in range(5):
            fn(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_family(family: str, n: int, trials: int, search_evals: int, seed: int, console: Console,
               work: Path | None, strategy: str, alone_too: bool, transfer: bool = True) -> dict:
    space = SearchSpace.for_family(family)
    torch.manual_seed(seed)
    net = build_supernet(space, **SPEC[family])
    train_loader, val_loader = digits_loaders(family, batch_size=64, seed=seed)
    train_supernet(net, train_loader, 3, seed=seed, progress=False)  # realistic weights and BN statistics
    net.eval()
    front_members, front_size = pareto_subnets(net, n, train_loader, val_loader, seed, search_evals)
    configs = [m.config for m in front_members]
    subnets = [Subnet(space.config_hash(c), net.extract(c), tuple(net.input_shape(c, 1)), {}) for c in configs]
    work = work / family if work else Path(tempfile.mkdtemp(prefix=f"bench-compile-{family}-"))
    work.mkdir(parents=True, exist_ok=True)
    # Tuning reports of an earlier run on this --work folder are kept (the databases hold its
    # schedules, so a rerun would tune nothing and time nothing).
    cached = work / "tuning.json"
    previous = json.loads(cached.read_text()) if cached.is_file() else None
    t0 = time.perf_counter()
    untuned = export_bundles(subnets, [work / "untuned" / s.name for s in subnets], formats=("onnx", "tvm"),
                             tune=TuneOptions(trials=0), measure=True, seed=seed)
    t1 = time.perf_counter()
    tuned = export_bundles(subnets, [work / "tuned" / s.name for s in subnets], formats=("tvm",),
                           tune=TuneOptions(trials=trials, database=work / "db", strategy=strategy, transfer=transfer),
                           measure=True,
                           seed=seed)
    if previous:
        shared, alone = previous["shared"], previous["alone"]
    else:
        shared = tuned["tuning"]
        # Tuning each subnet alone: a fresh database per subnet, the same trials per workload.
        alone = [export_bundles([sub], [work / "alone" / sub.name], formats=("tvm",), measure=False, seed=seed,
                                tune=TuneOptions(trials=trials, database=work / f"db-{sub.name}",
                                                 strategy=strategy, transfer=transfer))["tuning"]
                 for sub in subnets] if alone_too else None
        write_json(cached, {"shared": shared, "alone": alone})
    alone_s = sum(a["seconds"] for a in alone) if alone else float("nan")
    alone_tasks = sum(a["unique_tasks"] for a in alone) if alone else 0
    console.print(f"{family}: front of {front_size}, {len(subnets)} picked; untuned bundles in {t1 - t0:.0f} s; "
                  f"shared tuning ({strategy}) {shared['seconds']:.0f} s for {shared['unique_tasks']} unique of "
                  f"{shared['total_tasks']} tasks ({shared.get('transplanted', 0)} from tuned relatives); "
                  f"alone {alone_s:.0f} s for {alone_tasks} tasks "
                  f"({sum(a.get('transplanted', 0) for a in alone or [])} from tuned relatives)")
    batch1 = measure_batch1(subnets, work)
    lat = {b: profile_latency(PROFILES[b, family], space=space) for b in ("onnxruntime", "tvm")}
    # The host's speed drifts (10% within the hour on this machine): re-measure a few of each
    # profile's own subnets now, and report fidelity both raw and scaled by that factor.
    fidelity_all, speed = measure_fidelity(family, net, configs, subnets, lat, work, seed, console)
    rows = []
    for i, (c, sub) in enumerate(zip(configs, subnets)):
        x = torch.randn(sub.input_shape, generator=torch.Generator().manual_seed(i))
        ort_ms = batch1[sub.name, "onnxruntime"]
        tvm_untuned_ms = untuned["manifests"][i]["measured"]["tvm"]["median_ms"]
        tvm_tuned_ms = batch1[sub.name, "tvm"]
        eager_ext = time_eager(sub.module, x)
        eager_super = time_eager(lambda inp, c=c: net(inp, c), x)
        fidelity = fidelity_all[sub.name]
        model = load_bundle(work / "untuned" / sub.name, "onnxruntime")
        assert np.abs(model(x.numpy()) - sub.module(x).detach().numpy()).max() <= 1e-4
        rows.append({"family": family, "subnet": sub.name, "onnxruntime_ms": ort_ms, "tvm_untuned_ms": tvm_untuned_ms,
                     "tvm_tuned_ms": tvm_tuned_ms, "tvm_schedules": tuned["manifests"][i]["tuning"]["schedules"],
                     "eager_extracted_ms": eager_ext, "eager_supernet_ms": eager_super,
                     "speedup_ort_vs_supernet": eager_super / ort_ms, "tvm_tuned_vs_ort": tvm_tuned_ms / ort_ms,
                     "tvm_tuned_vs_untuned": tvm_untuned_ms / tvm_tuned_ms,
                     "fidelity": fidelity})
    return {"rows": rows, "speed": {b: c.to_dict() for b, c in speed.items()},
            "tuning": {**shared, "alone_seconds": alone_s, "alone_tasks": alone_tasks,
                       "shared_vs_alone_seconds": shared["seconds"] / alone_s if alone else None,
                       "shared_vs_alone_tasks": shared["unique_tasks"] / alone_tasks if alone else None}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default="cnn,transformer")
    ap.add_argument("--subnets", type=int, default=5)
    ap.add_argument("--trials", type=int, default=32, help="MetaSchedule trials per unique workload")
    ap.add_argument("--strategy", default="evolutionary", choices=("evolutionary", "replay-trace"),
                    help="MetaSchedule search strategy")
    ap.add_argument("--no-transfer", action="store_true", help="tune every workload by search, also those "
                                                                  "whose relative is already tuned")
    ap.add_argument("--no-alone", action="store_true", help="skip tuning each subnet alone (the cost comparison)")
    ap.add_argument("--search-evals", type=int, default=400, help="subnets evaluated to find each family's front")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench_compile.json"))
    ap.add_argument("--work", type=Path, help="keep bundles and tuning databases here; a rerun reuses their "
                                              "tuning reports")
    args = ap.parse_args(argv)
    console = Console(width=170)
    results = {f: run_family(f, args.subnets, args.trials, args.search_evals, args.seed, console, args.work,
                                args.strategy, not args.no_alone, not args.no_transfer)
               for f in args.families.split(",")}
    rows = [r for res in results.values() for r in res["rows"]]
    table = Table(title="batch-1 latency (ms, medians) per artifact, side by side in one run")
    cols = ["family", "subnet", "ORT", "TVM untuned", "TVM tuned", "eager extracted", "eager supernet",
            "supernet/ORT", "TVM tuned/ORT", "fidelity ORT: measured / predicted (calibrated)",
            "fidelity TVM untuned"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("family", "subnet") else "right")
    for r in rows:
        table.add_row(r["family"], r["subnet"], f"{r['onnxruntime_ms']:.4f}", f"{r['tvm_untuned_ms']:.4f}",
                      f"{r['tvm_tuned_ms']:.4f}" + ("" if r["tvm_schedules"]["used"] == "tuned" else " (default)"),
                      f"{r['eager_extracted_ms']:.4f}", f"{r['eager_supernet_ms']:.4f}",
                      f"{r['speedup_ort_vs_supernet']:.1f}x", f"{r['tvm_tuned_vs_ort']:.2f}",
                      *(f"{r['fidelity'][b]['ratio']:.3f} ({r['fidelity'][b]['calibrated_ratio']:.3f}) "
                        f"b{r['fidelity'][b]['batch']}" for b in ("onnxruntime", "tvm")))
    console.print(table)
    summary = {
        "median_speedup_ort_vs_supernet": statistics.median(r["speedup_ort_vs_supernet"] for r in rows),
        "min_speedup_ort_vs_supernet": min(r["speedup_ort_vs_supernet"] for r in rows),
        "median_tvm_tuned_vs_ort": statistics.median(r["tvm_tuned_vs_ort"] for r in rows),
        "fidelity_within_10pct": {b: {kind: float(np.mean([abs(r["fidelity"][b][kind] - 1) <= 0.10 for r in rows]))
                                      for kind in ("ratio", "calibrated_ratio")} for b in ("onnxruntime", "tvm")},
        "tuning": {f: res["tuning"] for f, res in results.items()},
    }
    for f, t in summary["tuning"].items():
        if t["shared_vs_alone_seconds"] is None:
            console.print(f"{f}: shared tuning {t['seconds']:.0f} s ({t['unique_tasks']} unique of {t['total_tasks']} "
                          f"workloads); tuning each subnet alone not run (--no-alone)")
            continue
        console.print(f"{f}: shared tuning {t['seconds']:.0f} s ({t['unique_tasks']} unique workloads) against "
                      f"{t['alone_seconds']:.0f} s tuning each subnet alone ({t['alone_tasks']} workloads): "
                      f"{t['shared_vs_alone_seconds']:.2f} of the time (target <= 0.5), "
                      f"{t['trials_per_task']} trials per workload")
    console.print(f"ONNX Runtime artifact vs eager supernet: median {summary['median_speedup_ort_vs_supernet']:.1f}x, "
                  f"min {summary['min_speedup_ort_vs_supernet']:.1f}x (target >= 2x); TVM tuned / ORT median "
                  f"{summary['median_tvm_tuned_vs_ort']:.2f} (target <= 1.25); fidelity within +-10% "
                  f"(raw / calibrated to the device's current speed): " + ", ".join(
                      f"{b} {100 * f['ratio']:.0f}% / {100 * f['calibrated_ratio']:.0f}%"
                      for b, f in summary["fidelity_within_10pct"].items()) + " (target 100%)")
    write_json(args.out, {"meta": {"host": host_fingerprint(), "trials": args.trials, "subnets": args.subnets,
                                   "strategy": args.strategy, "transfer": not args.no_transfer},
                          "rows": rows, "summary": summary})
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
