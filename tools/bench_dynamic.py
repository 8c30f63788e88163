"""Benchmark: dynamic networks rewritten into static subgraphs and a host module, at batch 1.

For each network of the suite (tests/dynamic_nets.py: early exit, SkipNet gating, adaptive depth,
top-1 mixture of experts, a branch on input resolution, a supernet switched by a latency budget),
one run measures on the same 100 inputs (every branch taken): eager PyTorch, the rewritten
network on ONNX Runtime and on TVM (untuned), and the share of the rewritten run's time spent in
the host module (outside the compiled subgraphs). It also builds the switchable bundle of K
subnets and K separate bundles of the same subnets and compares their sizes.

Target: median speedup on ONNX Runtime at least 1.5x over eager.

Reproduce (repository root, `pip install -e ".[tvm]"`)::

    python tools/bench_dynamic.py             # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from nestnas.compile.bundle import Subnet, export_bundles  # noqa: E402
from nestnas.compile.dynamic import load_dynamic, rewrite  # noqa: E402
from nestnas.compile.switch import export_switchable  # noqa: E402
from nestnas.fileio import write_json  # noqa: E402
from nestnas.hw_profiles.profile import host_fingerprint  # noqa: E402

import dynamic_nets as dn  # noqa: E402


class Timed:
    """Wraps a host module's subgraph runner to add up the time spent inside subgraphs."""

    def __init__(self, run):
        self.run, self.inside = run, 0.0

    def __call__(self, *a):
        t0 = time.perf_counter()
        out = self.run(*a)
        self.inside += time.perf_counter() - t0
        return out


def per_input_ms(fn, inputs, repeats: int) -> list[float]:
    out = []
    for args in inputs:
        fn(*args)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
        out.append(statistics.median(times))
    return out


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per input (median taken)")
    ap.add_argument("--threads", type=int, default=1, help="runtime threads (eager torch uses the same)")
    ap.add_argument("--out", type=Path, default=Path("bench_dynamic.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console(width=160)
    work = Path(tempfile.mkdtemp(prefix="bench-dynamic-"))
    rows = []
    for name, model in dn.suite().items():
        inputs = dn.inputs_for(name, model, args.inputs)
        if hasattr(model, "calibrate"):
            model.calibrate([a[0] for a in inputs])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "no subnet meets the budget")
            t0 = time.perf_counter()
            program = rewrite(model, inputs)
            folder = program.save(work / name, threads=args.threads)
            build_s = time.perf_counter() - t0
            np_inputs = [tuple(a.numpy() if isinstance(a, torch.Tensor) else a for a in call) for call in inputs]
            with torch.no_grad():
                eager = per_input_ms(model, inputs, args.repeats)
            row = {"network": name, "segments": len(program.segments), "subgraphs": len(program.records),
                   "branches": len(program.branches), "coverage": program.coverage(), "build_s": build_s,
                   "eager_ms": statistics.median(eager)}
            for backend in ("onnxruntime", "tvm"):
                compiled = load_dynamic(folder, backend, args.threads)
                timed = Timed(compiled.run)
                compiled.run = timed
                worst = max(float(np.abs(compiled(*a) - model(*t).detach().numpy()).max())
                            for a, t in zip(np_inputs, inputs))
                timed.inside = 0.0
                t0 = time.perf_counter()
                ms = per_input_ms(compiled, np_inputs, args.repeats)
                total = time.perf_counter() - t0
                row[f"{backend}_ms"] = statistics.median(ms)
                row[f"{backend}_speedup"] = row["eager_ms"] / row[f"{backend}_ms"]
                row[f"{backend}_host_share"] = 1 - timed.inside / total
                row[f"{backend}_max_abs_diff"] = worst
        rows.append(row)
        console.print(f"{name}: {row['subgraphs']} subgraphs, eager {row['eager_ms']:.3f} ms, "
                      f"ORT {row['onnxruntime_ms']:.3f} ms, TVM {row['tvm_ms']:.3f} ms")

    table = Table(title=f"batch-1 latency (ms; median over {args.inputs} inputs of the median of {args.repeats} "
                        f"runs), {args.threads} thread(s), side by side in one run")
    for col in ("network", "subgraphs", "eager", "ORT", "ORT speedup", "ORT host share", "TVM", "TVM speedup",
                "TVM host share", "max |diff|"):
        table.add_column(col, justify="left" if col == "network" else "right")
    for r in rows:
        table.add_row(r["network"], str(r["subgraphs"]), f"{r['eager_ms']:.3f}", f"{r['onnxruntime_ms']:.3f}",
                      f"{r['onnxruntime_speedup']:.2f}x", f"{100 * r['onnxruntime_host_share']:.1f}%",
                      f"{r['tvm_ms']:.3f}", f"{r['tvm_speedup']:.2f}x", f"{100 * r['tvm_host_share']:.1f}%",
                      f"{max(r['onnxruntime_max_abs_diff'], r['tvm_max_abs_diff']):.1e}")
    console.print(table)

    # Switchable bundle against K separate bundles of the same subnets.
    switch = dn.switched_supernet(k=3)
    sw = export_switchable(switch.net, switch.configs, work / "switchable", threads=args.threads)
    subs = [Subnet(switch.net.space.config_hash(c), switch.net.extract(c), tuple(switch.net.input_shape(c, 1)), {})
            for c in switch.configs]
    export_bundles(subs, [work / "separate" / s.name for s in subs], formats=("onnx", "tvm"), measure=False)
    separate = folder_bytes(work / "separate")
    sizes = {"switchable_bytes": sw["bytes"], "separate_bytes": separate, "ratio": sw["bytes"] / separate,
             "k": sw["subnets"], "switch_latencies_ms": sw["latencies_ms"]}
    summary = {"median_speedup_onnxruntime": statistics.median(r["onnxruntime_speedup"] for r in rows),
               "median_speedup_tvm": statistics.median(r["tvm_speedup"] for r in rows),
               "all_within_1e-4": all(max(r["onnxruntime_max_abs_diff"], r["tvm_max_abs_diff"]) <= 1e-4 for r in rows),
               "bundle_sizes": sizes}
    console.print(f"median speedup over eager: ONNX Runtime {summary['median_speedup_onnxruntime']:.2f}x "
                  f"(target >= 1.5x), TVM untuned {summary['median_speedup_tvm']:.2f}x")
    console.print(f"switchable bundle of {sizes['k']} subnets: {sizes['switchable_bytes'] / 1e6:.2f} MB against "
                  f"{sizes['separate_bytes'] / 1e6:.2f} MB for {sizes['k']} separate bundles ({sizes['ratio']:.2f}x)")
    write_json(args.out, {"meta": {"host": host_fingerprint(), "inputs": args.inputs, "repeats": args.repeats,
                                   "threads": args.threads}, "rows": rows, "summary": summary})
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
