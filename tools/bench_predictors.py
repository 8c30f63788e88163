"""Benchmark: latency predictors on held-out subnets, per backend and supernet family.

For each backend (ONNX Runtime; TVM untuned) and family (cnn, transformer) this profiles 300
space-filling subnets of the default space on this machine (plus every distinct block for the
lookup table: on ONNX Runtime always, on TVM with --tvm-blocks, since each TVM build takes
seconds and the CNN space has 375 distinct blocks), holds out 100 of them, fits every predictor on
the other 200 and scores it on the held-out 100: RMSE, MAPE, Kendall tau and the share within
+-10% of the measured latency.
Targets on ONNX Runtime: >= 95% within +-10% and tau >= 0.9; profiling 200 subnets in < 5 min.
ONNX Runtime profiles sweep twice (`profile_device(passes=2)`); the default predictor is also
scored on the first pass alone, to show what the second sweep buys.

Profiles are read from (and resumed into) `--profile-dir`, by default the shipped ones in
`hw_profiles/data/`, so an existing complete profile is scored without measuring again; the
profiling wall time reported is the one recorded in the profile.

With ``--transfer`` it benchmarks transfer profiles instead (it only fits, never measures):
leave one device out over the CNN fleet (`FLEET` in `--profile-dir`, or the files given with
``--fleet``). Each device D in turn is new and the others are the priors. 100 of D's subnets are
held out (seeded); the priors' default predictors are fitted with those configs removed from them,
so no prior saw a held-out config; from D's remaining subnets n = 5, 10, 20, 50 are chosen,
informatively as `profile_device(transfer=...)` would (farthest-point in the priors' predicted
log latency) or at random (mean of RANDOM_DRAWS draws), and scored on the 100 held out against
the same n subnets without transfer (the ensemble, today's default on a profile without blocks)
and against the full profile (today's default predictor on all of D's other subnets).
Target with n = 20: >= 90% within +-10% and tau >= 0.9. Untuned TVM left out misses it (about
half within +-10%, tau 0.95): its cost is not a mix of the ONNX Runtime devices' costs (a ridge on
the priors' *measured* latencies reaches only 27% on it, a config-feature ensemble on 200 of its
own subnets 56%); only its own block table predicts it (lut, 94%), which costs 375 TVM builds.

Reproduce (repository root, `pip install -e ".[tvm]"`)::

    python tools/bench_predictors.py                       # uses/creates hw_profiles/data/*.json
    python tools/bench_predictors.py --backends onnxruntime --profile-dir /tmp/profiles
    python tools/bench_predictors.py --transfer --out bench_transfer.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nestnas.fileio import write_json
from nestnas.hw_profiles import DeviceProfile, profile_device
from nestnas.hw_profiles.calibrate import remeasure
from nestnas.hw_profiles.profile import host_fingerprint
from nestnas.predictors.fitting import available_kinds, choose_kind, score_latency
from nestnas.supernet import SearchSpace

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_HELD = 200, 100
TARGET_WITHIN, TARGET_TAU, TARGET_PROFILE_S = 0.95, 0.9, 300.0
KINDS = ("lut", "ensemble", "hybrid")
N_REPEAT = 30  # held-out subnets measured a second time for the noise ceiling


def split(profile: DeviceProfile, seed: int) -> tuple[list[str], list[str], int]:
    """200 train / 100 held-out hashes among the stable measurements (flagged ones are left out)."""
    import numpy as np

    stable = sorted(k for k, m in profile.measurements.items() if m["stable"])
    order = np.random.default_rng(seed).permutation(len(stable))
    held = [stable[i] for i in order[:N_HELD]]
    train = [stable[i] for i in order[N_HELD : N_HELD + N_TRAIN]]
    return train, held, len(profile.measurements) - len(stable)


def first_pass_scores(profile: DeviceProfile, kind: str, train: list[str], held: list[str], seed: int):
    """`kind` fitted and scored on the first pass's measurements alone (subnets and blocks): what
    a one-sweep profile of the same run would have given. None for a one-pass profile."""
    if profile.meta.get("passes", 1) < 2:
        return None
    def first_pass(table):
        return {k: {**r, "median_ms": r.passes[0].median_ms} for k, r in table.items()}

    first = DeviceProfile(**{**profile.__dict__, "measurements": first_pass(profile.measurements),
                             "blocks": first_pass(profile.blocks)})
    return score_latency(first, [kind], train, held, seed)[kind]


def repeatability(profile: DeviceProfile, keys: list[str], seed: int) -> dict[str, float]:
    """Measure `keys` again now and compare with the profile: the noise ceiling of any predictor
    (a predictor cannot agree with a measurement better than the device agrees with itself)."""
    import numpy as np

    again = remeasure(profile, keys, passes=1, seed=seed)
    rel = np.abs(np.array([again[k] / profile.measurements[k]["median_ms"] for k in keys]) - 1.0)
    return {"n": len(keys), "within_10pct": float(np.mean(rel <= 0.10)), "median_rel_diff": float(np.median(rel))}


def run(backend: str, family: str, profile_dir: Path, seed: int, blocks: bool, console: Console,
        exporter: str | None = None) -> list[dict]:
    name = "xeon-2c-ort" if backend == "onnxruntime" else f"xeon-2c-{backend}"  # devices named by runtime
    path = profile_dir / f"xeon-2c-{backend}-{family}.json"
    if exporter is None:  # an existing profile is resumed with the exporter it was measured with
        exporter = (DeviceProfile.load(path).fingerprint.get("exporter", "torchscript") if path.exists()
                    else "torchscript")
    t0 = time.perf_counter()
    # A flag after two time-capped attempts is a property of the device, not bad luck: retrying it
    # on every rerun costs minutes (TVM) and changes nothing.
    profile = profile_device(SearchSpace.for_family(family), backend, N_TRAIN + N_HELD, seed, out=path, name=name,
                             blocks=blocks, remeasure_unstable=False, exporter=exporter)
    console.print(f"{backend}/{family}: profile {path} ready in {time.perf_counter() - t0:.0f} s "
                  f"(batch {profile.batch_size})")
    train, held, flagged = split(profile, seed)
    per_subnet = profile.meta.get("subnet_seconds", float("nan")) / max(len(profile.measurements), 1)
    kinds = available_kinds(profile)
    scores = score_latency(profile, kinds, train, held, seed)
    scores.pop("_predictors")
    chosen, cv = choose_kind(profile, kinds, train, seed)
    single = first_pass_scores(profile, chosen, train, held, seed)
    if single:
        console.print(f"{backend}/{family}: {chosen} on the first of {profile.meta['passes']} passes alone: "
                      f"{100 * single['within_10pct']:.0f}% within +-10%, MAPE {single['mape']:.2f}%, "
                      f"tau {single['kendall_tau']:.3f} (all passes: {100 * scores[chosen]['within_10pct']:.0f}%, "
                      f"{scores[chosen]['mape']:.2f}%, {scores[chosen]['kendall_tau']:.3f})")
    repeat = repeatability(profile, held[:N_REPEAT], seed)
    console.print(f"{backend}/{family}: re-measuring {repeat['n']} held-out subnets: "
                  f"{100 * repeat['within_10pct']:.0f}% within +-10% of the profile "
                  f"(median difference {100 * repeat['median_rel_diff']:.1f}%)")
    return [{"backend": backend, "family": family, "predictor": kind, "chosen": kind == chosen, "cv": cv.get(kind),
             **scores[kind], "n_train": len(train),
             "remeasure_within_10pct": repeat["within_10pct"], "remeasure_median_rel_diff": repeat["median_rel_diff"],
             "flagged_unstable": flagged, "passes": profile.meta.get("passes", 1),
             "first_pass_only": single if kind == chosen else None, "batch_size": profile.batch_size,
             "profile_200_subnets_s": 200 * per_subnet, "profile_blocks_s": profile.meta.get("block_seconds"),
             "blocks": len(profile.blocks)} for kind in kinds]


def print_table(console: Console, rows: list[dict]) -> None:
    table = Table(title=f"latency predictors on {N_HELD} held-out subnets (fitted on {N_TRAIN})")
    for col in ("backend", "family", "predictor", "RMSE ms", "MAPE %", "Kendall tau", "within +-10%",
                "re-measured within +-10%", "profile 200 (s)"):
        table.add_column(col, justify="right" if col[0].isupper() or "(" in col else "left")
    for r in rows:
        table.add_row(r["backend"], r["family"], r["predictor"] + (" (default)" if r["chosen"] else ""),
                      f"{r['rmse']:.4f}", f"{r['mape']:.2f}", f"{r['kendall_tau']:.3f}",
                      f"{100 * r['within_10pct']:.1f}%", f"{100 * r['remeasure_within_10pct']:.0f}%",
                      f"{r['profile_200_subnets_s']:.0f}")
    console.print(table)


# --- transfer profiles: leave one device out over the fleet ----------------------------------
FLEET = ("xeon-2c-onnxruntime-cnn.json", "xeon-2c-tvm-cnn.json", "xeon-2c-ort-1t-b32-onnxruntime-cnn.json",
         "xeon-2c-ort-b32-onnxruntime-cnn.json")
TRANSFER_NS = (5, 10, 20, 50)
RANDOM_DRAWS = 5
TARGET_TRANSFER_WITHIN, TARGET_TRANSFER_TAU, TARGET_N = 0.90, 0.90, 20
BLOCKS_VARIANT = "transfer + own blocks"  # the device's block table measured too (`profile --transfer --blocks`)


def transfer_device(new: Path, priors: list[Path], seed: int) -> list[dict]:
    """Every variant's held-out scores for device `new` with `priors` as the fleet's others."""
    import numpy as np

    from nestnas.fileio import sha256_file
    from nestnas.hw_profiles.profiler import block_table
    from nestnas.hw_profiles.transfer import informative_indices
    from nestnas.predictors import LatencyPredictor
    from nestnas.predictors.fitting import fit_and_select
    from nestnas.predictors.metrics import prediction_metrics
    from nestnas.predictors.transfer import DEFAULT_METHOD, TRANSFER_METHODS, prior_log_latency, prior_predictors

    d = DeviceProfile.load(new)
    space = d.search_space()
    stable = sorted(k for k, m in d.measurements.items() if m.stable)
    order = np.random.default_rng(seed).permutation(len(stable))
    held = [stable[i] for i in order[:N_HELD]]
    rest = [stable[i] for i in order[N_HELD:]]
    fitted = prior_predictors([(sha256_file(p), DeviceProfile.load(p)) for p in priors], exclude=frozenset(held),
                              seed=seed)
    X_held, y_held = d.to_xy(held)
    X_rest, y_rest = d.to_xy(rest)
    Z_rest = prior_log_latency(fitted, X_rest)
    rows = []

    def score(variant: str, n: int, predictor) -> None:
        rows.append({"device": d.name, "backend": d.backend, "threads": d.fingerprint.get("threads"),
                     "batch_size": d.batch_size, "variant": variant,
                     **prediction_metrics(y_held, predictor.predict(X_held)), "n": n, "n_heldout": N_HELD})

    def transfer(idx, method):
        return LatencyPredictor(space, "transfer", spec=d.spec, members=(method,), priors=tuple(fitted),
                                seed=seed).fit(X_rest[idx], y_rest[idx])

    FEW_METHODS = [m for m in TRANSFER_METHODS if m != "stacked"]  # noqa: N806 (stacked is for the priors)
    inform = informative_indices(Z_rest, max(TRANSFER_NS))  # greedy: each n's choice is a prefix of the next
    table = block_table(d) if d.blocks else None  # the device's own block table: a transfer profile's --blocks
    for n in TRANSFER_NS:
        idx = inform[:n]
        for method in FEW_METHODS:
            score(f"transfer:{method} informative", n, transfer(idx, method))
        if table:
            score(f"{BLOCKS_VARIANT} informative", n, LatencyPredictor(
                space, "transfer", spec=d.spec, block_table=table, members=(DEFAULT_METHOD,), priors=tuple(fitted),
                seed=seed).fit(X_rest[idx], y_rest[idx]))
        score("no transfer (ensemble) informative", n,
              LatencyPredictor(space, "ensemble", spec=d.spec, seed=seed).fit(X_rest[idx], y_rest[idx]))
        for method in FEW_METHODS:
            draws = []
            for r in range(RANDOM_DRAWS):
                ridx = np.random.default_rng([seed, n, r]).choice(len(rest), n, replace=False)
                draws.append(prediction_metrics(y_held, transfer(ridx, method).predict(X_held)))
            rows.append({**rows[-1], "variant": f"transfer:{method} random",
                         **{k: float(np.mean([m[k] for m in draws])) for k in draws[0] if k != "n"}})
        draws = []
        for r in range(RANDOM_DRAWS):
            ridx = np.random.default_rng([seed, n, r]).choice(len(rest), n, replace=False)
            draws.append(prediction_metrics(y_held, LatencyPredictor(space, "ensemble", spec=d.spec, seed=seed)
                                            .fit(X_rest[ridx], y_rest[ridx]).predict(X_held)))
        rows.append({**rows[-1], "variant": "no transfer (ensemble) random",
                     **{k: float(np.mean([m[k] for m in draws])) for k in draws[0] if k != "n"}})
    full = DeviceProfile(**{**d.__dict__, "measurements": {k: d.measurements[k] for k in rest}})
    chosen = fit_and_select(full, "auto", holdout=None, seed=seed)
    score(f"full profile ({chosen.kind})", len(rest), chosen.predictor)
    return rows


def run_transfer(fleet: list[Path], seed: int, out: Path, console: Console) -> int:
    from nestnas.predictors.transfer import DEFAULT_METHOD

    missing = [str(p) for p in fleet if not p.is_file()]
    if missing:
        console.print(f"fleet profile(s) missing: {', '.join(missing)}")
        return 1
    t0 = time.perf_counter()
    rows = []
    for i, new in enumerate(fleet):
        rows += transfer_device(new, fleet[:i] + fleet[i + 1:], seed)
        console.print(f"{new.name}: done ({time.perf_counter() - t0:.0f} s)")
    devices = list(dict.fromkeys(r["device"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows if not r["variant"].startswith("full")))
    table = Table(title=f"transfer: leave one device out, {N_HELD} held-out subnets per device "
                        "(within +-10% / Kendall tau / MAPE %)")
    for col in ("device", "variant", *[f"n={n}" for n in TRANSFER_NS]):
        table.add_column(col, justify="left" if col in ("device", "variant") else "right")

    def cell(r):
        return f"{100 * r['within_10pct']:.0f}% / {r['kendall_tau']:.3f} / {r['mape']:.1f}"

    for dev in devices:
        for v in variants:
            by_n = {r["n"]: r for r in rows if r["device"] == dev and r["variant"] == v}
            if by_n:  # the own-blocks variant exists only for devices whose table is measured
                table.add_row(dev, v, *[cell(by_n[n]) for n in TRANSFER_NS])
        full = next(r for r in rows if r["device"] == dev and r["variant"].startswith("full"))
        table.add_row(dev, f"{full['variant']}, n={full['n']}", cell(full), "", "", "", end_section=True)
    for v in variants:
        table.add_row("median", v, *[
            f"{100 * statistics.median(r['within_10pct'] for r in rows if r['variant'] == v and r['n'] == n):.0f}% / "
            f"{statistics.median(r['kendall_tau'] for r in rows if r['variant'] == v and r['n'] == n):.3f} / "
            f"{statistics.median(r['mape'] for r in rows if r['variant'] == v and r['n'] == n):.1f}"
            for n in TRANSFER_NS])
    console.print(table)
    default = f"transfer:{DEFAULT_METHOD} informative"
    at = {r["device"]: r for r in rows if r["variant"] == default and r["n"] == TARGET_N}
    summary = {dev: {"within_10pct": r["within_10pct"], "kendall_tau": r["kendall_tau"], "mape": r["mape"],
                     "met": r["within_10pct"] >= TARGET_TRANSFER_WITHIN and r["kendall_tau"] >= TARGET_TRANSFER_TAU}
               for dev, r in at.items()}
    med_w = statistics.median(s["within_10pct"] for s in summary.values())
    med_t = statistics.median(s["kendall_tau"] for s in summary.values())
    summary["median"] = {"within_10pct": med_w, "kendall_tau": med_t,
                         "met": med_w >= TARGET_TRANSFER_WITHIN and med_t >= TARGET_TRANSFER_TAU}
    blocks = f"{BLOCKS_VARIANT} informative"
    for r in rows:
        if r["variant"] == blocks and r["n"] == TARGET_N:
            summary[r["device"]]["with_own_blocks"] = {
                "within_10pct": r["within_10pct"], "kendall_tau": r["kendall_tau"], "mape": r["mape"],
                "met": r["within_10pct"] >= TARGET_TRANSFER_WITHIN and r["kendall_tau"] >= TARGET_TRANSFER_TAU}
    for dev, s in summary.items():
        for name, m in ((default, s), (blocks, s.get("with_own_blocks"))):
            if m:
                console.print(f"{name}, n={TARGET_N}, {dev}: {100 * m['within_10pct']:.0f}% within +-10%, "
                              f"tau {m['kendall_tau']:.3f} (target {100 * TARGET_TRANSFER_WITHIN:.0f}% and "
                              f"{TARGET_TRANSFER_TAU}: {'met' if m['met'] else 'NOT met'})")
    write_json(out, {"meta": {"host": host_fingerprint(), "seed": seed, "n_heldout": N_HELD, "ns": TRANSFER_NS,
                              "random_draws": RANDOM_DRAWS, "fleet": [str(p) for p in fleet],
                              "default_method": DEFAULT_METHOD, "seconds": time.perf_counter() - t0},
                     "rows": rows, "summary": summary})
    console.print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="onnxruntime,tvm")
    ap.add_argument("--families", default="cnn,transformer")
    ap.add_argument("--profile-dir", type=Path, default=REPO / "hw_profiles" / "data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench_predictors.json"))
    ap.add_argument("--tvm-blocks", action="store_true", help="also measure every block on TVM (slow)")
    ap.add_argument("--tvm-exporter", choices=("torchscript", "dynamo"),
                    help="exporter for new TVM profiles [default: an existing profile's, else torchscript]")
    ap.add_argument("--transfer", action="store_true", help="benchmark transfer profiles (leave one device out)")
    ap.add_argument("--fleet", type=Path, nargs="+", help=f"fleet profiles for --transfer [default: {FLEET} in "
                                                           "--profile-dir]")
    args = ap.parse_args(argv)
    console = Console(width=160)
    if args.transfer:
        fleet = args.fleet or [args.profile_dir / f for f in FLEET]
        return run_transfer(fleet, args.seed, args.out, console)
    rows = []
    for backend in args.backends.split(","):
        for family in args.families.split(","):
            rows += run(backend, family, args.profile_dir, args.seed, backend != "tvm" or args.tvm_blocks, console,
                        args.tvm_exporter if backend == "tvm" else None)
    print_table(console, rows)
    ort = [r for r in rows if r["backend"] == "onnxruntime"]
    # The figure quoted is the default predictor's, chosen by cross-validation on the fitting
    # subnets; picking the best on the held-out subnets would flatter it.
    best = {r["family"]: r for r in ort if r["chosen"]}
    summary = {f: {"default_predictor": r["predictor"], "within_10pct": r["within_10pct"],
                   "kendall_tau": r["kendall_tau"], "met_within": r["within_10pct"] >= TARGET_WITHIN,
                   "met_tau": r["kendall_tau"] >= TARGET_TAU,
                   "profile_200_subnets_s": r["profile_200_subnets_s"],
                   "met_profile_time": r["profile_200_subnets_s"] < TARGET_PROFILE_S} for f, r in best.items()}
    if ort:
        by_kind = {k: statistics.median(r["within_10pct"] for r in ort if r["predictor"] == k) for k in KINDS}
        summary["median_within_10pct_by_kind_onnxruntime"] = by_kind
    for family, s in summary.items():
        if family in best:
            console.print(f"onnxruntime/{family}: default {s['default_predictor']}: "
                          f"{100 * s['within_10pct']:.1f}% within +-10% "
                          f"(target {100 * TARGET_WITHIN:.0f}%: {'met' if s['met_within'] else 'NOT met'}), "
                          f"tau {s['kendall_tau']:.3f} (target {TARGET_TAU}: {'met' if s['met_tau'] else 'NOT met'}); "
                          f"200 subnets profiled in {s['profile_200_subnets_s']:.0f} s")
    write_json(args.out, {"meta": {"host": host_fingerprint(), "seed": args.seed, "n_train": N_TRAIN,
                                   "n_heldout": N_HELD}, "rows": rows, "summary": summary})
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
