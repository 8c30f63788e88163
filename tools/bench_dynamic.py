"""Benchmark: dynamic networks rewritten into static subgraphs and a host module, at batch 1.

The whole suite: the six networks of tests/dynamic_nets.py (early exit, SkipNet gating, adaptive
depth, top-1 mixture of experts, a branch on input resolution, a supernet switched by a latency
budget) and those of tests/dynamic_literature.py (written as their papers' code writes them: SDN
early exits on VGG/ResNet/Wide-ResNet/MobileNet, SkipNet with an LSTM gate, BlockDrop, a greedy
captioning decoder, DeeBERT, PABEE, an ACT halting loop). For each network, one run rewrites it
on its inputs, saves it untuned (ONNX Runtime and TVM) and tuned (TVM, MetaSchedule with one
database shared by every network of the run and by later runs), reloads each, checks every
output against eager PyTorch on every input (the bundles' relative tolerance), and measures on
the same inputs, interleaved input by input: eager PyTorch, ONNX Runtime, TVM untuned and TVM
tuned, with the share of each compiled run's time spent in the host module (outside the
subgraphs). A network compiles when rewrite, both saves and the three loads succeed with parity.
The full run also compares a switchable bundle of K subnets with K separate bundles (sizes).

Targets: every network compiles; median speedup over eager at batch 1 at least 1.5x on ONNX
Runtime and at least 1.5x on tuned TVM.

Reproduce (repository root, `pip install -e ".[tvm]"`)::

    python tools/bench_dynamic.py --inputs 20 --repeats 3 --trials 16 --tune-seconds 120
        # the figures quoted in README: 24 min on 2 busy cores with the database already holding
        # the six dynamic_nets networks' and the SDNs' workloads (626 s of it tuning); 31 min
        # from an empty database at --tune-seconds 150 (1159 s tuning, six networks failing early)
    python tools/bench_dynamic.py --quick      # 20 inputs, 8 trials, tuning capped at 60 s a network
    python tools/bench_dynamic.py --networks early_exit,sdn_vgg --trials 4

Tuning dominates the run and is cached: a second run on the same database tunes nothing new and
takes the measuring time only (1-2 minutes a network here). A network whose tuning is cut short
by --tune-seconds keeps TVM's default schedules for the workloads left.

The tuning database defaults to the one `nestnas export` shares (`$NESTNAS_HOME/tuning/...`);
`--database` picks another folder (an empty one measures tuning from scratch).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from nestnas.compile.bundle import Subnet, export_bundles, tolerance  # noqa: E402
from nestnas.compile.dynamic import load_dynamic, rewrite  # noqa: E402
from nestnas.compile.switch import export_switchable  # noqa: E402
from nestnas.compile.tuning import TuneOptions  # noqa: E402
from nestnas.errors import NestnasError  # noqa: E402
from nestnas.fileio import write_json  # noqa: E402
from nestnas.hw_profiles.profile import host_fingerprint  # noqa: E402

import dynamic_nets as dn  # noqa: E402

try:
    import dynamic_literature as dl  # noqa: E402
except ImportError:  # an older checkout: the six networks only
    dl = None

VARIANTS = ("eager", "onnxruntime", "tvm", "tvm_tuned")
TARGET = 1.5


class Timed:
    """Wraps a host module's subgraph runner to add up the time spent inside subgraphs."""

    def __init__(self, run):
        self.run, self.inside = run, 0.0

    def __call__(self, *a):
        t0 = time.perf_counter()
        out = self.run(*a)
        self.inside += time.perf_counter() - t0
        return out


def suite(names: list[str] | None, n: int) -> list[tuple[str, Callable[[], tuple[torch.nn.Module, list[tuple]]]]]:
    """(name, build) for every network of the suite: build gives the calibrated model and n inputs."""
    out = []

    def from_nets(name):
        def build():
            model = dn.suite()[name]
            inputs = dn.inputs_for(name, model, n)
            if hasattr(model, "calibrate"):
                model.calibrate([a[0] for a in inputs])
            return model, inputs
        return build

    def from_literature(name):
        return lambda: (dl.build(name), dl.inputs_for(name, n))

    out += [(name, from_nets(name)) for name in dn.suite()]
    if dl is not None:
        out += [(name, from_literature(name)) for name in dl.BUILDERS]
    if names:
        known = [k for k, _ in out]
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise SystemExit(f"unknown networks {unknown}; the suite has {known}")
        out = [(k, b) for k, b in out if k in names]
    return out


def arrays(out: Any) -> list[np.ndarray]:
    """A model's output (tensor, array or a tuple/list of them) as a flat list of arrays."""
    if isinstance(out, (tuple, list)):
        return [a for o in out for a in arrays(o)]
    return [out.detach().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)]


def worst_excess(want: Any, got: Any) -> tuple[float, float]:
    """(max |diff|, the largest diff / tolerance) over every output array; inf on a shape mismatch."""
    worst, excess = 0.0, 0.0
    w, g = arrays(want), arrays(got)
    if len(w) != len(g):
        return float("inf"), float("inf")
    for a, b in zip(w, g):
        if a.shape != b.shape:
            return float("inf"), float("inf")
        d = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0
        worst, excess = max(worst, d), max(excess, d / tolerance(a))
    return worst, excess


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: " + (str(exc).strip().splitlines() or [""])[0][:200]


def measure(fns: dict[str, Callable], inputs: list[tuple], repeats: int, timed: dict[str, Timed]) -> dict:
    """Per variant: median over inputs of the median of `repeats` runs (variants interleaved input by
    input), and the host share of each compiled variant's time."""
    per = {k: [] for k in fns}
    total = {k: 0.0 for k in fns}
    inside = {k: 0.0 for k in timed}
    for args in inputs:
        for k, fn in fns.items():
            a = args[k]
            fn(*a)  # warm (a first call of a specialisation)
            before = timed[k].inside if k in timed else 0.0
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn(*a)
                times.append(time.perf_counter() - t0)
            if k in timed:
                inside[k] += timed[k].inside - before
            total[k] += sum(times)
            per[k].append(statistics.median(times) * 1e3)
    out = {f"{k}_ms": statistics.median(v) for k, v in per.items()}
    for k in timed:
        out[f"{k}_host_share"] = max(0.0, 1 - inside[k] / total[k]) if total[k] else 0.0
    return out


def bench_network(name: str, build: Callable, args, tune: TuneOptions, work: Path, console: Console) -> dict:
    row: dict[str, Any] = {"network": name, "compiled": False}
    stage = "build"
    try:
        model, inputs = build()
        model.eval()
        stage = "rewrite"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", "no subnet meets the budget")
            program = rewrite(model, inputs)
            row["warnings"] = sorted({str(w.message).splitlines()[0][:200] for w in caught
                                      if not issubclass(w.category, DeprecationWarning)})
            row.update(segments=len(program.segments), subgraphs=len(program.records),
                       branches=len(program.branches), coverage=program.coverage())
            stage = "save"
            t0 = time.perf_counter()
            untuned = program.save(work / name / "untuned", threads=args.threads)
            row["save_s"] = time.perf_counter() - t0
            tuned = None
            if tune.enabled:
                stage = "tuned save"
                t0 = time.perf_counter()
                tuned = program.save(work / name / "tuned", backends=("tvm",), threads=args.threads, tune=tune)
                row["tuned_save_s"] = time.perf_counter() - t0
                import json

                report = json.loads((tuned / "manifest.json").read_text())["tuning"]
                row["tuning"] = {k: report[k] for k in ("unique_tasks", "reused_from_database", "tuned",
                                                        "transplanted", "skipped_for_time", "trials", "seconds")}
            stage = "load"
            compiled = {"onnxruntime": load_dynamic(untuned, "onnxruntime", args.threads),
                        "tvm": load_dynamic(untuned, "tvm", args.threads)}
            if tuned is not None:
                compiled["tvm_tuned"] = load_dynamic(tuned, "tvm", args.threads)
            stage = "parity"
            np_inputs = [tuple(a.numpy() if isinstance(a, torch.Tensor) else a for a in call) for call in inputs]
            with torch.no_grad():
                wants = [model(*a) for a in inputs]
            for k, m in compiled.items():
                diffs = [worst_excess(w, m(*a)) for w, a in zip(wants, np_inputs)]
                row[f"{k}_max_abs_diff"] = max(d for d, _ in diffs)
                row[f"{k}_diff_over_tolerance"] = max(e for _, e in diffs)
            bad = [k for k in compiled if not row[f"{k}_diff_over_tolerance"] <= 1.0]
            if bad:
                raise AssertionError(f"{', '.join(bad)} differ from eager beyond the tolerance")
            row["compiled"] = True
            stage = "measure"
            timed = {}
            for k, m in compiled.items():
                timed[k] = Timed(m.run)
                m.run = timed[k]
            fns = {"eager": torch.no_grad()(model), **compiled}
            calls = [{"eager": t, **{k: a for k in compiled}} for t, a in zip(inputs, np_inputs)]
            row.update(measure(fns, calls, args.repeats, timed))
        for k in compiled:
            row[f"{k}_speedup"] = row["eager_ms"] / row[f"{k}_ms"]
    except (NestnasError, AssertionError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        row["error"] = f"{stage}: {first_line(exc)}"
    return row


def main(argv: list[str] | None = None) -> int:  # noqa: C901
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--networks", help="comma-separated subset of the suite (default: all)")
    ap.add_argument("--quick", action="store_true", help="20 inputs, 3 repeats, 8 trials, tuning capped at 60 s "
                                                         "a network, no bundle-size comparison")
    ap.add_argument("--inputs", type=int, help="inputs per network (default 100; --quick 20)")
    ap.add_argument("--repeats", type=int, help="timed runs per input, median taken (default 7; --quick 3)")
    ap.add_argument("--trials", type=int, help="TVM MetaSchedule trials per unique workload (default 16; "
                                               "--quick 8; 0: no tuned TVM)")
    ap.add_argument("--tune-seconds", type=float, help="stop tuning new workloads of a network after this many "
                                                       "seconds (default none; --quick 60)")
    ap.add_argument("--strategy", default="evolutionary", help="evolutionary or replay-trace")
    ap.add_argument("--database", type=Path, help="tuning database folder (default: the one nestnas export uses)")
    ap.add_argument("--threads", type=int, default=1, help="runtime threads (eager torch uses the same)")
    ap.add_argument("--out", type=Path, default=Path("bench_dynamic.json"))
    args = ap.parse_args(argv)
    args.inputs = args.inputs or (20 if args.quick else 100)
    args.repeats = args.repeats or (3 if args.quick else 7)
    trials = args.trials if args.trials is not None else (8 if args.quick else 16)
    seconds = args.tune_seconds if args.tune_seconds is not None else (60.0 if args.quick else None)
    torch.set_num_threads(args.threads)
    console = Console(width=170)
    work = Path(tempfile.mkdtemp(prefix="bench-dynamic-"))
    database = None
    if trials:
        from nestnas.exporting import default_tuning_database

        database = args.database or default_tuning_database()
    tune = TuneOptions(trials=trials, max_seconds=seconds, database=database, strategy=args.strategy)
    networks = suite(args.networks.split(",") if args.networks else None, args.inputs)
    rows = []
    start = time.perf_counter()
    for name, build in networks:
        row = bench_network(name, build, args, tune, work, console)
        rows.append(row)
        if row.get("error"):
            console.print(f"{name}: FAILED at {row['error']}", markup=False)
        else:
            console.print(f"{name}: {row['subgraphs']} subgraphs, eager {row['eager_ms']:.3f} ms, ORT "
                          f"{row['onnxruntime_ms']:.3f}, TVM {row['tvm_ms']:.3f}, TVM tuned "
                          f"{row.get('tvm_tuned_ms', float('nan')):.3f} ms", markup=False)

    table = Table(title=f"batch-1 latency (ms; median over {args.inputs} inputs of the median of {args.repeats} "
                        f"runs), {args.threads} thread(s), interleaved; TVM tuned: {trials} trials/workload "
                        f"({args.strategy}{f', <= {seconds:.0f} s a network' if seconds else ''})")
    cols = ("network", "subgraphs", "eager", "ORT", "ORT x", "TVM", "TVM x", "TVM tuned", "tuned x",
            "host share ORT/tuned", "tuned tasks (reused)", "diff/tol")
    for col in cols:
        table.add_column(col, justify="left" if col == "network" else "right")

    def f(r, k, fmt):
        return format(r[k], fmt) if k in r else "-"

    for r in rows:
        if r.get("error"):
            table.add_row(r["network"], str(r.get("subgraphs", "-")), "failed: " + r["error"][:60], *[""] * 9)
            continue
        t = r.get("tuning") or {}
        table.add_row(r["network"], str(r["subgraphs"]), f(r, "eager_ms", ".3f"), f(r, "onnxruntime_ms", ".3f"),
                      f(r, "onnxruntime_speedup", ".2f") + "x", f(r, "tvm_ms", ".3f"), f(r, "tvm_speedup", ".2f") + "x",
                      f(r, "tvm_tuned_ms", ".3f"), f(r, "tvm_tuned_speedup", ".2f") + "x",
                      f"{100 * r['onnxruntime_host_share']:.0f}%/"
                      f"{100 * r['tvm_tuned_host_share']:.0f}%" if "tvm_tuned_host_share" in r else "-",
                      f"{t['unique_tasks']} ({t['reused_from_database']})" if t else "-",
                      f"{max(r.get(k + '_diff_over_tolerance', 0.0) for k in VARIANTS[1:]):.2f}")
    console.print(table)

    ok = [r for r in rows if r["compiled"] and "eager_ms" in r]

    def median_of(key):
        values = [r[key] for r in ok if key in r]
        return statistics.median(values) if values else None

    summary = {"networks": len(rows), "compiled": sum(r["compiled"] for r in rows),
               "compile_rate": sum(r["compiled"] for r in rows) / len(rows) if rows else 0.0,
               "failures": {r["network"]: r["error"] for r in rows if r.get("error")},
               "median_speedup_onnxruntime": median_of("onnxruntime_speedup"),
               "median_speedup_tvm_untuned": median_of("tvm_speedup"),
               "median_speedup_tvm_tuned": median_of("tvm_tuned_speedup"), "target_speedup": TARGET,
               "tuning_seconds": sum((r.get("tuning") or {}).get("seconds", 0.0) for r in rows),
               "wall_s": time.perf_counter() - start}

    def x(v):
        return f"{v:.2f}x" if v is not None else "-"

    console.print(f"compiled {summary['compiled']}/{summary['networks']} networks "
                  f"({100 * summary['compile_rate']:.0f}%); median speedup over eager: ONNX Runtime "
                  f"{x(summary['median_speedup_onnxruntime'])}, TVM untuned {x(summary['median_speedup_tvm_untuned'])},"
                  f" TVM tuned {x(summary['median_speedup_tvm_tuned'])} (targets >= {TARGET}x); tuning "
                  f"{summary['tuning_seconds']:.0f} s, run {summary['wall_s']:.0f} s", markup=False)
    for name, why in summary["failures"].items():
        console.print(f"  {name} failed at {why}", markup=False)

    if not args.quick and not args.networks:
        # Switchable bundle against K separate bundles of the same subnets.
        switch = dn.switched_supernet(k=3)
        sw = export_switchable(switch.net, switch.configs, work / "switchable", threads=args.threads)
        subs = [Subnet(switch.net.space.config_hash(c), switch.net.extract(c), tuple(switch.net.input_shape(c, 1)),
                       {}) for c in switch.configs]
        export_bundles(subs, [work / "separate" / s.name for s in subs], formats=("onnx", "tvm"), measure=False)
        separate = sum(p.stat().st_size for p in (work / "separate").rglob("*") if p.is_file())
        sizes = {"switchable_bytes": sw["bytes"], "separate_bytes": separate, "ratio": sw["bytes"] / separate,
                 "k": sw["subnets"], "switch_latencies_ms": sw["latencies_ms"]}
        summary["bundle_sizes"] = sizes
        console.print(f"switchable bundle of {sizes['k']} subnets: {sizes['switchable_bytes'] / 1e6:.2f} MB against "
                      f"{sizes['separate_bytes'] / 1e6:.2f} MB for {sizes['k']} separate bundles "
                      f"({sizes['ratio']:.2f}x)")
    write_json(args.out, {"meta": {"host": host_fingerprint(), "inputs": args.inputs, "repeats": args.repeats,
                                   "threads": args.threads, "trials": trials, "tune_seconds": seconds,
                                   "strategy": args.strategy, "database": str(database) if database else None,
                                   "argv": sys.argv[1:] if argv is None else argv},
                          "rows": rows, "summary": summary})
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
