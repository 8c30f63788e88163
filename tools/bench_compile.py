"""Benchmark: deployable artifacts side by side at batch 1, per family.

For the Pareto subnets of each family (a front searched on MACs and shared-weight accuracy of a
briefly trained supernet; --subnets of them, spread along the front), one run measures:
ONNX Runtime bundle, TVM untuned, TVM tuned with one shared MetaSchedule database, torch eager on
the extracted module, and torch eager on the supernet with the config. It also reports the tuning
cost of the shared database against tuning each subnet alone, counted in MetaSchedule tasks (every
task gets the same trial budget, so task counts set the cost) and measured in seconds for the
shared run, and deployment fidelity: each ONNX Runtime artifact at its profile's batch against the
latency predictor of the shipped profile.

Targets: ONNX Runtime >= 2x faster than the supernet run eagerly; TVM tuned within 1.25x of
ONNX Runtime; shared tuning <= half of tuning each alone; fidelity within +-10%.

Reproduce (repository root, `pip install -e ".[tvm]"`)::

    python tools/bench_compile.py --trials 4          # ~20 min on 2 cores, most of it TVM tuning
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from nestnas.compile.bundle import Subnet, export_bundles, load_bundle
from nestnas.compile.tuning import TuneOptions, extract_tasks, prepare, relax_module, task_key
from nestnas.compile.tvm_util import host_target
from nestnas.fileio import write_json
from nestnas.hw_profiles.profile import host_fingerprint
from nestnas.search.presets import profile_latency
from nestnas.supernet import SearchSpace, build_supernet
from nestnas.supernet.data import digits_loaders
from nestnas.supernet.train import train_supernet

REPO = Path(__file__).resolve().parents[1]
PROFILES = {f: REPO / "hw_profiles" / "data" / f"xeon-2c-onnxruntime-{f}.json" for f in ("cnn", "transformer")}
SPEC = {"cnn": {"num_classes": 10, "in_channels": 1}, "transformer": {"num_classes": 10, "num_tokens": 8,
                                                                       "token_dim": 8}}


def pick_subnets(net, n: int, seed: int):
    """n configs spread along the MACs range (smallest, largest and a ladder between)."""
    return [net.space.canonical(c) for c in net.space.ladder(n)]


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


def run_family(family: str, n: int, trials: int, seed: int, console: Console) -> dict:
    space = SearchSpace.for_family(family)
    torch.manual_seed(seed)
    net = build_supernet(space, **SPEC[family])
    train_loader, _ = digits_loaders(family, batch_size=64, seed=seed)
    train_supernet(net, train_loader, 1, seed=seed, progress=False)  # realistic weights and BN statistics
    net.eval()
    configs = pick_subnets(net, n, seed)
    subnets = [Subnet(space.config_hash(c), net.extract(c), tuple(net.input_shape(c, 1)), {}) for c in configs]
    work = Path(tempfile.mkdtemp(prefix=f"bench-compile-{family}-"))
    target = host_target(2)
    # Tuning cost: tasks of each subnet alone against the unique tasks of the whole front.
    per_subnet = []
    for sub in subnets:
        x = torch.zeros(sub.input_shape)
        from nestnas.compile.onnx_export import INPUT_NAME, export_onnx

        path = export_onnx(sub.module, x, work / f"{sub.name}.onnx", exporter="torchscript")
        per_subnet.append({task_key(t) for t in extract_tasks(prepare(relax_module(path, sub.input_shape,
                                                                                   INPUT_NAME), target), target)})
    alone_tasks = sum(len(s) for s in per_subnet)
    unique_tasks = len(set().union(*per_subnet))
    t0 = time.perf_counter()
    untuned = export_bundles(subnets, [work / "untuned" / s.name for s in subnets], formats=("onnx", "tvm"),
                             tune=TuneOptions(trials=0), measure=True, seed=seed)
    t1 = time.perf_counter()
    tuned = export_bundles(subnets, [work / "tuned" / s.name for s in subnets], formats=("tvm",),
                           tune=TuneOptions(trials=trials, database=work / "db"), measure=True, seed=seed)
    shared_s = tuned["tuning"]["seconds"]
    console.print(f"{family}: untuned bundles in {t1 - t0:.0f} s; shared tuning {shared_s:.0f} s "
                  f"({tuned['tuning']['unique_tasks']} unique of {tuned['tuning']['total_tasks']} tasks)")
    lat = profile_latency(PROFILES[family], space=space)
    batch = int(lat.unit.rsplit(" ", 1)[-1])
    rows = []
    for i, (c, sub) in enumerate(zip(configs, subnets)):
        x = torch.randn(sub.input_shape, generator=torch.Generator().manual_seed(i))
        ort_ms = untuned["manifests"][i]["measured"]["onnxruntime"]["median_ms"]
        tvm_untuned_ms = untuned["manifests"][i]["measured"]["tvm"]["median_ms"]
        tvm_tuned_ms = tuned["manifests"][i]["measured"]["tvm"]["median_ms"]
        eager_ext = time_eager(sub.module, x)
        eager_super = time_eager(lambda inp, c=c: net(inp, c), x)
        # Fidelity: the ONNX artifact at the profile's batch against the shipped predictor.
        fid_dir = work / "fidelity" / sub.name
        fid = export_bundles([Subnet(sub.name, sub.module, tuple(net.input_shape(c, batch)), {})], [fid_dir],
                             formats=("onnx",), measure=True, seed=seed)
        measured_b = fid["manifests"][0]["measured"]["onnxruntime"]["median_ms"]
        predicted_b = float(lat.evaluate([c])[0])
        model = load_bundle(work / "untuned" / sub.name, "onnxruntime")
        assert np.abs(model(x.numpy()) - sub.module(x).detach().numpy()).max() <= 1e-4
        rows.append({"family": family, "subnet": sub.name, "onnxruntime_ms": ort_ms, "tvm_untuned_ms": tvm_untuned_ms,
                     "tvm_tuned_ms": tvm_tuned_ms, "eager_extracted_ms": eager_ext, "eager_supernet_ms": eager_super,
                     "speedup_ort_vs_supernet": eager_super / ort_ms, "tvm_tuned_vs_ort": tvm_tuned_ms / ort_ms,
                     "tvm_tuned_vs_untuned": tvm_untuned_ms / tvm_tuned_ms,
                     "fidelity_batch": batch, "fidelity_measured_ms": measured_b, "fidelity_predicted_ms": predicted_b,
                     "fidelity_ratio": measured_b / predicted_b})
    return {"rows": rows, "tuning": {**tuned["tuning"], "alone_tasks": alone_tasks, "unique_tasks_front": unique_tasks,
                                     "shared_vs_alone_task_ratio": unique_tasks / alone_tasks}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default="cnn,transformer")
    ap.add_argument("--subnets", type=int, default=5)
    ap.add_argument("--trials", type=int, default=4, help="MetaSchedule trials per unique workload")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench_compile.json"))
    args = ap.parse_args(argv)
    console = Console(width=170)
    results = {f: run_family(f, args.subnets, args.trials, args.seed, console) for f in args.families.split(",")}
    rows = [r for res in results.values() for r in res["rows"]]
    table = Table(title="batch-1 latency (ms, medians) per artifact, side by side in one run")
    cols = ["family", "subnet", "ORT", "TVM untuned", "TVM tuned", "eager extracted", "eager supernet",
            "supernet/ORT", "TVM tuned/ORT", "fidelity (ORT at profile batch / predicted)"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("family", "subnet") else "right")
    for r in rows:
        table.add_row(r["family"], r["subnet"], f"{r['onnxruntime_ms']:.4f}", f"{r['tvm_untuned_ms']:.4f}",
                      f"{r['tvm_tuned_ms']:.4f}", f"{r['eager_extracted_ms']:.4f}", f"{r['eager_supernet_ms']:.4f}",
                      f"{r['speedup_ort_vs_supernet']:.1f}x", f"{r['tvm_tuned_vs_ort']:.2f}",
                      f"{r['fidelity_ratio']:.3f} (batch {r['fidelity_batch']})")
    console.print(table)
    summary = {
        "median_speedup_ort_vs_supernet": statistics.median(r["speedup_ort_vs_supernet"] for r in rows),
        "min_speedup_ort_vs_supernet": min(r["speedup_ort_vs_supernet"] for r in rows),
        "median_tvm_tuned_vs_ort": statistics.median(r["tvm_tuned_vs_ort"] for r in rows),
        "fidelity_within_10pct": float(np.mean([abs(r["fidelity_ratio"] - 1) <= 0.10 for r in rows])),
        "tuning": {f: res["tuning"] for f, res in results.items()},
    }
    for f, t in summary["tuning"].items():
        console.print(f"{f}: shared tuning covers {t['unique_tasks_front']} unique tasks where tuning each subnet "
                      f"alone would tune {t['alone_tasks']} ({t['shared_vs_alone_task_ratio']:.2f} of the cost; "
                      f"target <= 0.5); {t['trials_per_task']} trials each took {t['seconds']:.0f} s")
    console.print(f"ONNX Runtime artifact vs eager supernet: median {summary['median_speedup_ort_vs_supernet']:.1f}x, "
                  f"min {summary['min_speedup_ort_vs_supernet']:.1f}x (target >= 2x); TVM tuned / ORT median "
                  f"{summary['median_tvm_tuned_vs_ort']:.2f} (target <= 1.25); fidelity within +-10%: "
                  f"{100 * summary['fidelity_within_10pct']:.0f}% (target 100%)")
    write_json(args.out, {"meta": {"host": host_fingerprint(), "trials": args.trials, "subnets": args.subnets},
                          "rows": rows, "summary": summary})
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
