"""`nestnas quickstart`: the whole pipeline on the embedded default data (scikit-learn digits).

Stages: train the CNN supernet with the sandwich rule and report shared-weight accuracy,
parameters and MACs of the largest, the smallest and three random subnets; profile this CPU on
ONNX Runtime, then a second device (ONNX Runtime at one thread) from 20 subnets with the first
as the prior (transfer); fit latency predictors and print their figures on held-out subnets;
search one Pareto front per device in one LINAS run (accuracy evaluated once per subnet) and plot
them; export the first device's knee subnet as a bundle, reload it and compare its measured
latency with the prediction, and time the second device's knee against its transfer prediction.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from nestnas.fileio import check_output
from nestnas.progress import SearchProgress, StageBar
from nestnas.report import describe_subnet, subnet_table
from nestnas.supernet.base import Supernet, build_supernet
from nestnas.supernet.checkpoint import save_checkpoint
from nestnas.supernet.data import load_data
from nestnas.supernet.families import DEFAULT_FAMILY
from nestnas.supernet.space import SearchSpace
from nestnas.supernet.train import DEFAULT_EPOCHS, train_supernet

FIRST_DEVICE, SECOND_DEVICE = "local", "local-1t"
TRANSFER_SAMPLES = 20
# A quick profile: a median pinned to +-5% (95% CI) after at least 10 timed calls, where
# `nestnas profile` asks +-2% after 20; it halves the profiling time, and the profile records it.
QUICK_RUNNER = {"target_rel_ci": 0.05, "min_repeats": 10, "warmup": 3}


def profile_and_fit(net: Supernet, out_dir: Path, samples: int, seed: int, console: Console,
                    progress: bool) -> dict[str, Any]:
    """Stages 2 and 3: profile this CPU on ONNX Runtime, fit the latency predictors, score them."""
    from nestnas.hw_profiles.profiler import LocalMeasurer, profile_device
    from nestnas.predictors.fitting import fit_and_select
    from nestnas.predictors.store import save_predictor

    console.rule("[bold]2. profile[/] this CPU on ONNX Runtime (space-filling subnets, and every block)")
    path = out_dir / "profile-local-onnxruntime-cnn.json"
    t0 = time.perf_counter()
    with StageBar("profile", progress, console) as bar:
        # One pass keeps the quickstart under five minutes; `nestnas profile` makes two.
        profile = profile_device(net.space, "onnxruntime", samples, seed, out=path, name=FIRST_DEVICE, spec=net.spec(),
                                 passes=1, progress=bar, measurer=LocalMeasurer("onnxruntime",
                                                                                runner_options=QUICK_RUNNER))
    medians = sorted(m.median_ms for m in profile.measurements.values())
    console.print(f"{len(profile.measurements)} subnets and {len(profile.blocks)} blocks at batch "
                  f"{profile.batch_size} in {time.perf_counter() - t0:.0f} s: "
                  f"{medians[0]:.2f} to {medians[-1]:.2f} ms; "
                  f"profile: {path}")

    console.rule(f"[bold]2b. profile[/] a second device, ONNX Runtime at one thread, from {TRANSFER_SAMPLES} subnets "
                 "(transfer: chosen and fitted with the first device as the prior)")
    second = out_dir / f"profile-{SECOND_DEVICE}-onnxruntime-cnn.json"
    t1 = time.perf_counter()
    with StageBar("profile", progress, console) as bar:
        other = profile_device(net.space, "onnxruntime", TRANSFER_SAMPLES, seed, out=second, name=SECOND_DEVICE,
                               spec=net.spec(), threads=1, passes=1, transfer=[path], progress=bar,
                               measurer=LocalMeasurer("onnxruntime", threads=1, runner_options=QUICK_RUNNER))
    medians = sorted(m.median_ms for m in other.measurements.values())
    console.print(f"{len(other.measurements)} subnets at batch {other.batch_size} in {time.perf_counter() - t1:.0f} s "
                  f"({medians[0]:.2f} to {medians[-1]:.2f} ms), chosen to spread over {path.name}'s predicted "
                  f"latency; profile: {second}")

    console.rule("[bold]3. fit[/] latency predictors, scored on held-out subnets never used in fitting")
    chosen = fit_and_select(profile, "auto", 1 / 3, seed)
    if chosen.warning:  # a busy host flags most medians; they are still the best estimates there are
        console.print(f"warning: the host was busy: {chosen.warning}", markup=False)
    train, held, scores, kind = chosen.train, chosen.held, chosen.scores, chosen.kind
    table = Table(title=f"latency predictors: {len(train)} subnets to fit, {len(held)} held out")
    for col in ("predictor", "RMSE ms", "MAPE %", "Kendall tau", "within +-10%"):
        table.add_column(col, justify="left" if col == "predictor" else "right")
    for name, m in scores.items():
        table.add_row(name + (" (chosen)" if name == kind else ""), f"{m['rmse']:.3f}", f"{m['mape']:.1f}",
                      f"{m['kendall_tau']:.3f}",
                      f"{100 * m['within_10pct']:.0f}%")
    console.print(table)
    pred_path = out_dir / "latency-predictor.json"
    save_predictor(pred_path, "latency", path, kind, seed, train, scores[kind])
    console.print(f"saved the {kind} predictor (chosen by cross-validation on the fitting subnets): {pred_path}")
    second_fit = fit_and_select(other, "auto", None, seed)
    console.print(f"{SECOND_DEVICE}: the {second_fit.kind} predictor fitted on its {len(second_fit.train)} subnets and "
                  f"the prior {path.name} (its figures against a full profile: tools/bench_predictors.py --transfer)")
    return {"profile": str(path), "profile_subnets": len(profile.measurements), "profile_blocks": len(profile.blocks),
            "second_profile": str(second), "second_device": SECOND_DEVICE, "second_subnets": len(other.measurements),
            "second_kind": second_fit.kind,
            "predictor_kind": kind,
            "batch_size": profile.batch_size, "predictor": str(pred_path), "latency_heldout": scores}


def search_front(net: Supernet, out_dir: Path, profiles: dict[str, Path], train_loader, val_loader, evals: int,
                 seed: int, console: Console, progress: bool) -> dict[str, Any]:
    """Stage 4: one LINAS run of accuracy (shared weights) against every device's predicted latency,
    one front per device; their tables and one plot."""
    from nestnas.search import EvalCache, accuracy_objective, search
    from nestnas.search.presets import profile_latency

    console.rule("[bold]4. search[/] accuracy against each device's predicted latency, one front per device from one "
                 "LINAS run (NSGA-II on predictors, true evaluations of the best)")
    acc = accuracy_objective(net.eval(), val_loader, train_loader, seed=seed)
    lats = [profile_latency(p, seed, net.space, name=f"latency@{d}", device=d) for d, p in profiles.items()]
    front_path, plot_path = out_dir / "front.json", out_dir / "front.png"
    with EvalCache(out_dir / "evals.sqlite") as cache, SearchProgress(progress, evals, console) as bar:
        front = search(net.space, [acc, *lats], algorithm="linas", evals=evals, pop_size=max(evals // 5, 8),
                       seed=seed, cache=cache, inner_evals=3000, progress=bar, per_device=True)
    front.save(front_path, plot=plot_path)
    knees = {}
    for device in front.devices:
        own = front.for_device(device)
        console.print(own.table())
        knees[device] = own.knee()
    console.print(f"{len(front.evaluated)} subnets evaluated (accuracy once each, for both devices) in "
                  f"{front.meta['seconds']:.0f} s; knees: "
                  + "; ".join(f"{d} {k.hash}: {100 * k.metrics['accuracy']:.2f}% at {k.metrics['latency']:.3f} ms"
                              for d, k in knees.items()) + f"; front: {front_path}; plot: {plot_path}")
    return {"front": str(front_path), "plot": str(plot_path), "devices": front.devices,
            "front_size": {d: len(front.for_device(d)) for d in front.devices},
            "front_hypervolume": {d: front.for_device(d).hypervolume for d in front.devices},
            "searched": len(front.evaluated), "knee": {d: k.to_dict() for d, k in knees.items()},
            "search_seconds": front.meta["seconds"]}


def export_knee(net: Supernet, out_dir: Path, front_path: Path, tune_trials: int, tune_seconds: float | None,
                seed: int, console: Console, progress: bool) -> dict[str, Any]:
    """Stage 5: the knee subnet as a bundle (ONNX, and TVM when installed), reloaded from disk
    with its checksums verified, measured against the predicted latency."""
    from nestnas.compile.bundle import check_formats, load_bundle
    from nestnas.compile.runners import get_runner
    from nestnas.errors import BackendUnavailable
    from nestnas.exporting import export
    from nestnas.search import ParetoFront

    try:
        formats = check_formats(("onnx", "tvm"))
    except BackendUnavailable:
        formats = ("onnx",)
    tvm_note = ("TVM " + (f"tuned, {tune_trials} replay-trace trials per workload"
                          + (f", at most {tune_seconds:.0f} s" if tune_seconds else "") if tune_trials else "untuned")
                if "tvm" in formats else "TVM extra not installed")
    console.rule(f"[bold]5. export[/] the knee subnet as a deployable bundle (ONNX; {tvm_note})")
    fleet = ParetoFront.load(front_path, space=net.space)
    front = fleet.for_device(FIRST_DEVICE)
    knee = front.knee()
    bundle = out_dir / "bundle-knee"
    with StageBar("export", progress, console) as bar:
        # Replay-trace: a few trials per workload; evolutionary search only pays off with more.
        result = export(knee, bundle, net=net, front=front, formats=formats, tune_trials=tune_trials,
                        tune_seconds=tune_seconds, tune_strategy="replay-trace", seed=seed, progress=bar)
    manifest = result["manifests"][0]
    x = np.load(bundle / "check_input.npy", allow_pickle=False)
    pred = manifest["predicted_latency"]
    table = Table(title=f"bundle {bundle} reloaded (checksums verified), batch {manifest['input']['shape'][0]}")
    for col in ("backend", "max |diff| vs torch", "measured ms (p10-p90)", "predicted ms", "measured/predicted"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    rows = {}
    for backend in ("onnxruntime", "tvm") if "tvm" in formats else ("onnxruntime",):
        model = load_bundle(bundle, backend)
        diff = float(np.abs(model(x) - np.load(bundle / "check_output.npy", allow_pickle=False)).max())
        # export measured the bundle as reloaded from disk (checksums verified): no second timing
        m = manifest.get("measured", {}).get(backend) or get_runner(backend).measure(model, x).to_dict()
        ratio = m["median_ms"] / pred["ms"] if backend == "onnxruntime" else None  # the predictor is ORT's
        rows[backend] = {"max_abs_diff": diff, "median_ms": m["median_ms"], "p10_ms": m["p10_ms"],
                         "p90_ms": m["p90_ms"], "predicted_ms": pred["ms"] if backend == "onnxruntime" else None,
                         "ratio": ratio}
        table.add_row(backend, f"{diff:.1e}", f"{m['median_ms']:.3f} ({m['p10_ms']:.3f}-{m['p90_ms']:.3f})",
                      f"{pred['ms']:.3f}" if ratio else "-", f"{ratio:.2f}" if ratio else "-")
    console.print(table)
    if result.get("tuning"):
        t = result["tuning"]
        console.print(f"TVM tuning: {t['tuned']} of {t['unique_tasks']} workloads tuned in {t['seconds']:.0f} s "
                      f"({t['reused_from_database']} reused from {t['database']}, {t['skipped_for_time']} left "
                      "untuned for time)")
        if rows["tvm"]["median_ms"] > 1.25 * rows["onnxruntime"]["median_ms"]:
            # The machine's database already holds this run's brief schedules, so point at a fresh one.
            console.print(f"TVM is slower here because this budget tunes briefly and leaves workloads untuned; "
                          f"`nestnas export --front {front_path} --checkpoint {out_dir / 'supernet.ckpt'} --out DIR "
                          f"--tune-trials 32 --tune-db {out_dir / 'tuning'}` tunes every one with evolutionary "
                          "search")
    second = second_knee(net, fleet.for_device(SECOND_DEVICE), seed, console)
    return {"bundle": str(bundle), "bundle_formats": list(formats), "bundle_measured": rows,
            "tuning": result.get("tuning"), "second_knee": second}


def second_knee(net: Supernet, front, seed: int, console: Console) -> dict[str, Any]:
    """The second device's knee subnet measured at one thread against its transfer prediction."""
    from nestnas.compile import get_backend, get_runner
    from nestnas.hw_profiles.profiler import measure_module

    knee = front.knee()
    batch = front.info("latency").batch_size
    be = get_backend("onnxruntime", threads=1, exporter="torchscript")
    ms = measure_module(be, get_runner("onnxruntime"), net.extract(knee.config), net.input_specs(knee.config, batch),
                        seed)["median_ms"]
    pred = knee.metrics["latency"]
    console.print(f"{SECOND_DEVICE} knee {knee.hash} at one thread: measured {ms:.3f} ms, predicted {pred:.3f} ms by "
                  f"transfer from {TRANSFER_SAMPLES} subnets (measured/predicted {ms / pred:.2f})")
    return {"hash": knee.hash, "measured_ms": ms, "predicted_ms": pred, "ratio": ms / pred}


def run_quickstart(out_dir: str | Path = "nestnas-quickstart", epochs: int = DEFAULT_EPOCHS[DEFAULT_FAMILY],
                   seed: int = 0,
                   console: Console | None = None, progress: bool = True,
                   profile_samples: int = 48, search_evals: int = 96, tune_trials: int = 4,
                   tune_seconds: float | None = 10.0) -> dict[str, Any]:
    console = console or Console()
    out_dir = check_output(out_dir, "quickstart folder", kind="dir")  # before minutes of training
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    space = SearchSpace.for_family(DEFAULT_FAMILY)
    data = load_data("digits", space, seed=seed)
    train_loader, val_loader = data.loaders(batch_size=64)
    net = build_supernet(space, **data.spec_for(space))
    console.rule("[bold]1. train[/] the CNN supernet on scikit-learn digits (sandwich rule, in-place distillation)")
    console.print(f"search space: {space.size():,} distinct subnets; {epochs} epochs")
    result = train_supernet(net, train_loader, epochs, seed=seed, progress=progress)
    ckpt = out_dir / "supernet.ckpt"
    save_checkpoint(net, ckpt, data=data)
    console.print(f"trained in {result.seconds:.0f} s; checkpoint: {ckpt}")

    rng = np.random.default_rng(seed)
    picks = [("largest", space.largest()), ("smallest", space.smallest())]
    picks += [(f"random {i + 1}", space.sample(rng)) for i in range(3)]
    rows = [(name, describe_subnet(net, c, val_loader, train_loader, seed)) for name, c in picks]
    console.print(subnet_table("subnets on shared weights (batch norm recalibrated), digits validation split", rows))
    summary = {"checkpoint": str(ckpt), "train_seconds": result.seconds, "subnets": {name: r for name, r in rows}}
    summary.update(profile_and_fit(net, out_dir, profile_samples, seed, console, progress))
    profiles = {FIRST_DEVICE: Path(summary["profile"]), SECOND_DEVICE: Path(summary["second_profile"])}
    summary.update(search_front(net, out_dir, profiles, train_loader, val_loader, search_evals, seed, console,
                                progress))
    summary.update(export_knee(net, out_dir, Path(summary["front"]), tune_trials, tune_seconds, seed, console,
                               progress))
    summary["total_seconds"] = time.perf_counter() - t0
    console.print(f"quickstart finished in {summary['total_seconds']:.0f} s")
    return summary
