"""Supernet quality (issue 20): does shared-weight accuracy rank subnets as stand-alone training would?

Run as ``python tools/bench_supernet.py --quality`` (or this file directly). Steps:

1. Pick N subnets spread over MACs (from the space alone, so every variant is scored on the same
   ones): a seeded sample of 2000 configs plus the smallest and largest, distinct canonical
   forms, sorted by ``count_macs``, taken at N evenly spaced quantiles.
2. Stand-alone: ``net.extract(config)``, every module with ``reset_parameters`` re-initialised
   (seeded), trained from scratch with the supernet's recipe, epochs and batch (plain cross
   entropy). With ``--ceiling`` (the default) each is trained a second time under another seed:
   the Kendall tau between the two runs is the noise ceiling of any tau against one run.
   ``--standalone-seeds K`` trains K runs: every variant is also scored against their mean, and
   each run against the mean of the others bounds what a tau against a mean of seeds can reach.
   Stand-alone training runs in channels-last layout, as the supernet's does (faster on CPU).
3. For each training variant (``--variant a,b`` or ``all``): train an ``ElasticCNN`` supernet on
   the task at the same cost as the default (epochs scaled by 4 / (2 + sandwich) subnet passes
   per step), then the shared-weight accuracy of every subnet, batch norm recalibrated on the
   training images in batches of 32: the primary figure uses all of them; the sweep also uses
   2 and 4 batches (64 and 128 images), each under 3 calibration seeds.
4. Evaluation: the training set is fixed; the held-out pool is cut into K stratified folds
   (``StratifiedKFold``, seeded) and every accuracy is the mean over the folds with its standard
   error. Per variant: Kendall tau / Spearman rho (of the fold means), mean and worst gap (shared
   minus stand-alone, points), tau of the top half by stand-alone accuracy, and the "middle"
   check: shared accuracy minus the line between smallest and largest interpolated in log MACs.

Jobs (variants, stand-alone subnets) run in ``--jobs`` processes of one thread each.
``--standalone-from REPORT`` reuses the stand-alone results of an earlier report of the same task,
epochs, seed, folds and subnets.

Tasks. No installed package ships an offline image dataset besides digits (sklearn's ``load_*``
are digits plus tabular sets and two sample photos; ``fetch_*`` download and are not used), so
``digits-hard`` is built from digits, fixed once under seed 0: every image rotated by a uniform
angle in [-15, 15] degrees (scipy.ndimage.rotate, order 1), shifted by an integer in [-1, 1]
pixels on each axis, plus Gaussian noise of sigma 0.25 (pixels in [-1, 1]); then only 40
training images per class (400) are kept and the remaining 1397 form the evaluation pool.
``digits`` is the plain set: 50% training, 50% pool.

Reproduce::

    python tools/bench_supernet.py --quality --variant all --epochs 32 --jobs 2   # the issue-20 table
    python tools/bench_supernet.py --quality --epochs 32 --standalone-seeds 3 --jobs 2   # a 3-seed reference
    python tools/bench_supernet.py --quality                     # default variant: digits-hard, 20 subnets
    python tools/bench_supernet.py --quality --quick --out q.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, TensorDataset

from nestnas.fileio import write_json
from nestnas.predictors.macs import count_macs
from nestnas.supernet import ElasticCNN, SearchSpace
from nestnas.supernet.config import SubnetConfig
from nestnas.supernet.evaluate import accuracy, module_inputs, prepared, recalibrated_subnet
from nestnas.supernet.train import TrainOptions, channels_last, make_optimizer, recipe_for, train_supernet

TASKS = ("digits", "digits-hard")
#: Training variants of section 2 (train_supernet options); passes per step are 2 + sandwich.
VARIANTS = {
    "default": {},
    "sandwich-4": {"sandwich": 4},
    "ladder": {"sorted_ladder": True},
    "macs": {"sampling": "macs"},
    "progressive": {"progressive": True},
    "distill-t2": {"distill_temperature": 2.0},
    "distill-previous": {"distill_from": "previous"},
    "log-macs": {"sampling": "log-macs"},
    "log-macs+t2": {"sampling": "log-macs", "distill_temperature": 2.0},
    "progressive+t2": {"progressive": True, "distill_temperature": 2.0},
    "log-macs+progressive+t2": {"sampling": "log-macs", "progressive": True, "distill_temperature": 2.0},
    "step-res": {"step_resolution": True},
    "step-res+log-macs+t2": {"step_resolution": True, "sampling": "log-macs", "distill_temperature": 2.0},
    "step-res+progressive+t2": {"step_resolution": True, "progressive": True, "distill_temperature": 2.0},
    # scoring 3 candidates per subnet on a quarter of the batch costs about an eighth of a step
    "attentive": {"sampling": "attentive", "cost": 0.89},
    "attentive+t2": {"sampling": "attentive", "distill_temperature": 2.0, "cost": 0.89},
    # not at the default's cost: what twice the training buys (Once-for-All trains far longer than one net)
    "default-2x": {"cost": 2.0},
    "step-res+log-macs+t2-2x": {"step_resolution": True, "sampling": "log-macs", "distill_temperature": 2.0,
                                "cost": 2.0},
}
SEED = 0
POOL_SAMPLES = 2000
TARGETS = {"kendall_tau": 0.8, "mean_gap_points": -0.5, "middle_max_below_points": 3.0}


# --- data ---------------------------------------------------------------------------------------
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images.astype(np.float32) / 16.0 - 0.5) / 0.5, d.target.astype(np.int64)


def _harden(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import rotate

    out = np.empty_like(x)
    for i, img in enumerate(x):
        img = rotate(img, rng.uniform(-15, 15), reshape=False, order=1, mode="constant", cval=-1.0)
        img = np.roll(img, tuple(rng.integers(-1, 2, size=2)), axis=(0, 1))
        out[i] = img + rng.normal(0, 0.25, size=img.shape)
    return out.astype(np.float32)


def task_arrays(task: str, seed: int = SEED):
    """(x_train, y_train, x_pool, y_pool) of `task`, images shaped (n, 1, 8, 8)."""
    x, y = _digits()
    rng = np.random.default_rng(seed)
    if task == "digits-hard":
        x = _harden(x, rng)
        train = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:40] for c in range(10)])
    else:
        train = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: (y == c).sum() // 2] for c in range(10)])
    mask = np.zeros(len(y), bool)
    mask[train] = True
    x = x.reshape(-1, 1, 8, 8)
    return x[mask], y[mask], x[~mask], y[~mask]


def fold_loaders(x_pool, y_pool, folds: int, seed: int) -> list[DataLoader]:
    from sklearn.model_selection import StratifiedKFold

    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [DataLoader(TensorDataset(torch.from_numpy(x_pool[idx]), torch.from_numpy(y_pool[idx])), batch_size=256)
            for _, idx in skf.split(x_pool, y_pool)]


# --- subnets ------------------------------------------------------------------------------------
def pick_subnets(net, n: int, seed: int) -> list[tuple[object, int]]:
    """`n` distinct subnets at evenly spaced MACs quantiles (smallest and largest included)."""
    space = net.space
    rng = np.random.default_rng(seed)
    seen: dict[str, tuple[object, int]] = {}
    for c in [space.smallest(), space.largest(), *(space.sample(rng) for _ in range(POOL_SAMPLES))]:
        c = space.canonical(c)
        seen.setdefault(space.config_hash(c), (c, count_macs(space, c, **net.spec())[0]))
    pool = sorted(seen.values(), key=lambda cm: cm[1])
    idx = sorted(set(np.linspace(0, len(pool) - 1, n).round().astype(int).tolist()))
    return [pool[i] for i in idx]


def _reinit(module: torch.nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def standalone(net, config, train_ds, epochs: int, seed: int) -> torch.nn.Module:
    """The extracted static module, re-initialised and trained alone with the supernet's recipe."""
    recipe = recipe_for(net)
    module = net.extract(config)
    _reinit(module, seed)
    opts = TrainOptions(epochs, lr=recipe.lr, weight_decay=recipe.weight_decay, warmup_fraction=recipe.warmup,
                        schedule=recipe.schedule, seed=seed)
    loader = DataLoader(train_ds, batch_size=recipe.batch_size, shuffle=True, drop_last=True)
    optimizer, scheduler = make_optimizer(module, opts, len(loader))
    torch.manual_seed(seed)
    module.train()
    with channels_last(module):  # as the supernet trains
        for _ in range(epochs):
            for x, y in loader:
                x = net.prepare_input(x, config).contiguous(memory_format=torch.channels_last)
                F.cross_entropy(module(module_inputs(net, config, x)), y).backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
    return module.eval()


# --- statistics ----------------------------------------------------------------------------------
def _mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0


def vs_line(acc, macs) -> np.ndarray:
    """Points above (+) or below (-) the line from the smallest to the largest subnet in log MACs,
    for the subnets between them (``acc`` sorted by MACs)."""
    acc, logm = np.asarray(acc, float), np.log(np.asarray(macs, float))
    line = acc[0] + (acc[-1] - acc[0]) * (logm - logm[0]) / max(logm[-1] - logm[0], 1e-12)
    return ((acc - line) * 100)[1:-1]


def summarise(rows: list[dict]) -> dict:
    from scipy.stats import kendalltau, spearmanr

    shared = np.array([r["shared"] for r in rows])
    alone = np.array([r["standalone"] for r in rows])
    gaps = (shared - alone) * 100
    top = np.argsort(-alone)[: max(2, len(rows) // 2)]
    below = vs_line(shared, [r["macs"] for r in rows])
    alone_below = vs_line(alone, [r["macs"] for r in rows])
    for r, b, ab in zip(rows[1:-1], below, alone_below):
        r["vs_line_points"], r["standalone_vs_line_points"] = float(b), float(ab)
    tau = float(kendalltau(shared, alone).statistic)
    out = {
        "kendall_tau": tau, "spearman_rho": float(spearmanr(shared, alone).statistic),
        "kendall_tau_top_half": float(kendalltau(shared[top], alone[top]).statistic),
        "mean_gap_points": float(gaps.mean()), "worst_gap_points": float(gaps.min()),
        "middle_worst_vs_line_points": float(below.min()) if len(below) else 0.0,
        # the same check on stand-alone accuracy: how far the space itself dips below its line
        "standalone_middle_worst_vs_line_points": float(alone_below.min()) if len(alone_below) else 0.0,
    }
    out = {k: (0.0 if math.isnan(v) else v) for k, v in out.items()}  # constant accuracies: no ranking
    out["targets"] = {
        "kendall_tau >= 0.8": out["kendall_tau"] >= TARGETS["kendall_tau"],
        "mean_gap >= -0.5 points": out["mean_gap_points"] >= TARGETS["mean_gap_points"],
        "no middle subnet > 3 points below the line": bool((below >= -TARGETS["middle_max_below_points"]).all()),
    }
    return out


# --- jobs (each runs in its own process, one thread) ---------------------------------------------
CALIB_BATCH = 32
CALIB_SWEEP = (2, 4, None)  # batches of CALIB_BATCH; None: every training image (the primary figure)
CALIB_SEEDS = 3
CEILING_SEED_OFFSET = 1000


@functools.lru_cache(maxsize=2)
def _context(task: str, seed: int, folds: int):
    x_tr, y_tr, x_pool, y_pool = task_arrays(task, seed)
    return TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr)), fold_loaders(x_pool, y_pool, folds, seed)


def _fresh_net(seed: int) -> ElasticCNN:
    torch.manual_seed(seed)
    return ElasticCNN(SearchSpace.mobilenet(), num_classes=10, in_channels=1)


def _fold_accuracies(net, module, config, folds) -> list[float]:
    return [accuracy(module, prepared(net, config, f)) for f in folds]


def shared_folds(net, config, folds, calib: DataLoader, calib_batches: int | None, seed: int) -> list[float]:
    """Shared-weight accuracy on every fold, batch norm recalibrated once (as `subnet_accuracy`)."""
    return _fold_accuracies(net, recalibrated_subnet(net, config, calib, calib_batches, seed), config, folds)


def variant_job(task: str, variant: str, epochs: int, seed: int, folds: int, configs: list) -> dict:
    """Train the variant's supernet at the default's cost; shared accuracies for the calibration sweep."""
    torch.set_num_threads(1)
    train_ds, fold_dl = _context(task, seed, folds)
    net = _fresh_net(seed)
    options = dict(VARIANTS[variant])
    cost = options.pop("cost", 1.0)
    scaled = max(1, round(epochs * cost * 4 / (2 + options.get("sandwich", 2))))
    t0 = time.perf_counter()
    train_supernet(net, DataLoader(train_ds, batch_size=recipe_for(net).batch_size, shuffle=True, drop_last=True),
                   epochs=scaled, seed=seed, progress=False, **options)
    train_s = time.perf_counter() - t0
    calib = DataLoader(train_ds, batch_size=CALIB_BATCH, shuffle=True)
    sweep = {}
    for nb in CALIB_SWEEP:
        sweep[_calib_key(nb)] = [[shared_folds(net, c, fold_dl, calib, nb, seed + k) for c in configs]
                                 for k in range(CALIB_SEEDS)]
    return {"variant": variant, "epochs": scaled, "train_seconds": round(train_s, 1), "sweep": sweep}


def standalone_job(task: str, epochs: int, seed: int, folds: int, config, train_seed: int) -> list[float]:
    torch.set_num_threads(1)
    train_ds, fold_dl = _context(task, seed, folds)
    net = _fresh_net(seed)
    module = standalone(net, config, train_ds, epochs, train_seed)
    return _fold_accuracies(net, module, config, fold_dl)


def _finite(v) -> float:
    return 0.0 if math.isnan(v) else float(v)  # constant accuracies: no ranking


def _run_name(b: int) -> str:
    return "abcdefghij"[b]


def _ceiling(base: list[dict], runs: int) -> dict:
    """Seed-to-seed agreement of the stand-alone runs: Kendall tau and mean |difference| over
    every pair of runs, and (3 runs or more) each run against the mean of the others, the
    ceiling of a tau against a mean of runs - 1 seeds (a mean of more seeds agrees better)."""
    from itertools import combinations

    from scipy.stats import kendalltau

    acc = np.array([[np.mean(r["standalone_runs_folds"][b]) for r in base] for b in range(runs)])
    pairs = list(combinations(range(runs), 2))
    taus = [_finite(kendalltau(acc[a], acc[b]).statistic) for a, b in pairs]
    out = {"runs": runs, "kendall_tau_seed_to_seed": float(np.mean(taus)),
           "kendall_tau_pairs": {f"{_run_name(a)}-{_run_name(b)}": t for (a, b), t in zip(pairs, taus)},
           "mean_abs_diff_points": float(np.mean([np.abs(acc[a] - acc[b]).mean() for a, b in pairs]) * 100)}
    if runs >= 3:
        rest = [_finite(kendalltau(acc[b], np.delete(acc, b, axis=0).mean(axis=0)).statistic) for b in range(runs)]
        out["kendall_tau_one_vs_rest_mean"] = float(np.mean(rest))
    macs = [r["macs"] for r in base]
    out["middle_worst_vs_line_points_per_run"] = [float(vs_line(a, macs).min()) for a in acc]
    out["middle_worst_vs_line_points_of_mean"] = float(vs_line(acc.mean(axis=0), macs).min())
    return out


def _calib_key(nb: int | None) -> str:
    return "all" if nb is None else f"{nb * CALIB_BATCH}"


# --- the run --------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block: the tool's bad-input contract
        self.exit(2, f"bench_supernet.py --quality: error: {message}\n")


def parse(argv):
    ap = _Parser(prog="bench_supernet.py --quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quality", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--task", default="digits-hard", help=f"one of {list(TASKS)}")
    ap.add_argument("--variant", default="default",
                    help=f"training variants, comma-separated or 'all', from {list(VARIANTS)}")
    ap.add_argument("--subnets", type=int, default=None, help="subnets to compare (default 20, --quick 4)")
    ap.add_argument("--folds", type=int, default=None, help="stratified folds of the evaluation pool (default 5)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs of supernet and stand-alone (family default)")
    ap.add_argument("--jobs", type=int, default=1, help="processes running variants and stand-alone trainings")
    ap.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                    help="train every stand-alone subnet twice to measure the seed-to-seed tau (default on)")
    ap.add_argument("--standalone-seeds", type=int, default=None, metavar="K",
                    help="stand-alone runs per subnet, each under its own seed (default 2, 1 with --no-ceiling): "
                         "with 3 or more the tau against their mean has a ceiling (each run against the others' mean)")
    ap.add_argument("--standalone-from", default=None, metavar="REPORT",
                    help="reuse the stand-alone results of this earlier report (same task, epochs, seed, folds)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--quick", action="store_true", help="a small smoke run (4 subnets, 1 epoch, 3 folds)")
    ap.add_argument("--out", default="bench_quality.json", help="JSON report path (written atomically)")
    args = ap.parse_args(argv)
    if args.task not in TASKS:
        ap.error(f"unknown task {args.task!r}; allowed: {list(TASKS)}")
    names = list(VARIANTS) if args.variant == "all" else [v.strip() for v in args.variant.split(",") if v.strip()]
    for v in names or [args.variant]:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; allowed: {list(VARIANTS)} or 'all'")
    if len(set(names)) != len(names):
        ap.error(f"--variant {args.variant!r}: a variant is listed twice")
    args.variants = names
    args.subnets = args.subnets if args.subnets is not None else 4 if args.quick else 20
    args.folds = args.folds if args.folds is not None else 3 if args.quick else 5
    args.epochs = args.epochs if args.epochs is not None else 1 if args.quick else ElasticCNN.default_epochs
    size = SearchSpace.mobilenet().size()
    if not 3 <= args.subnets <= min(size, POOL_SAMPLES):
        ap.error(f"--subnets {args.subnets}: must be 3 to {min(size, POOL_SAMPLES)} (the space has {size} "
                 f"distinct subnets; picked from a sample of {POOL_SAMPLES})")
    if not 2 <= args.folds <= 20:
        ap.error(f"--folds {args.folds}: must be 2 to 20")
    if args.epochs < 1:
        ap.error(f"--epochs {args.epochs}: must be at least 1")
    if not 1 <= args.jobs <= 64:
        ap.error(f"--jobs {args.jobs}: must be 1 to 64")
    if args.standalone_seeds is not None and not 1 <= args.standalone_seeds <= 10:
        ap.error(f"--standalone-seeds {args.standalone_seeds}: must be 1 to 10")
    if args.standalone_seeds is not None and args.standalone_seeds > 1 and not args.ceiling:
        ap.error(f"--standalone-seeds {args.standalone_seeds} with --no-ceiling: --no-ceiling means one run")
    args.runs = args.standalone_seeds or (2 if args.ceiling else 1)
    args.ceiling = args.runs >= 2
    args.reuse = _load_reuse(ap, args) if args.standalone_from else None
    return args


def _load_reuse(ap, args) -> dict:
    import json

    try:
        with open(args.standalone_from, encoding="utf-8") as f:
            old = json.load(f)
        meta, rows = old["meta"], old["standalone"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        ap.error(f"--standalone-from {args.standalone_from}: not a readable quality report ({type(e).__name__}: {e})")
    for key in ("task", "epochs", "seed", "folds", "subnets"):
        if meta.get(key) != getattr(args, key):
            ap.error(f"--standalone-from {args.standalone_from}: {key} is {meta.get(key)!r} there, "
                     f"{getattr(args, key)!r} here")
    return {SubnetConfig.from_dict(r["config"]).to_json(): _runs_of(r) for r in rows}  # runs it lacks are trained


def _runs_of(row: dict) -> list[list[float]]:
    """A report row's stand-alone runs (fold accuracies each), in seed order; older reports hold
    runs a and b only."""
    if "standalone_runs_folds" in row:
        return row["standalone_runs_folds"]
    return [row["standalone_folds"]] + ([row["standalone_b_folds"]] if "standalone_b_folds" in row else [])


def _pool(jobs: int):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))


def _sweep_stats(sweep: dict, alone: np.ndarray) -> dict:
    from scipy.stats import kendalltau

    out = {}
    for key, runs in sweep.items():
        means = [float(np.mean([np.mean(folds) for folds in run])) for run in runs]
        taus = [float(kendalltau([np.mean(f) for f in run], alone).statistic) for run in runs]
        out[key] = {"images": key, "mean_accuracy": float(np.mean(means)), "mean_accuracy_std": float(np.std(means)),
                    "kendall_tau": float(np.nanmean(taus)), "kendall_tau_std": float(np.nanstd(taus)),
                    "per_subnet_std_points": float(np.mean(np.std([[np.mean(f) for f in run] for run in runs],
                                                                  axis=0)) * 100)}
    return out


def run(args, console: Console | None = None) -> dict:
    from concurrent.futures import as_completed

    from rich.progress import Progress
    from scipy.stats import kendalltau, spearmanr

    t0 = time.perf_counter()
    x_tr, y_tr, _, y_pool = task_arrays(args.task, args.seed)
    subnets = pick_subnets(_fresh_net(args.seed), args.subnets, args.seed)
    if len(subnets) < args.subnets:
        raise SystemExit(f"only {len(subnets)} distinct subnets found among {POOL_SAMPLES} samples")
    configs = [c for c, _ in subnets]
    alone: dict[tuple[int, int], list[float]] = {}
    if args.reuse is not None:
        for i, c in enumerate(configs):
            runs = args.reuse.get(c.to_json())
            if runs is None:
                raise SystemExit(f"--standalone-from {args.standalone_from}: subnet {i} is not in it")
            for b, folds in enumerate(runs[:args.runs]):
                alone[i, b] = folds
    variants: dict[str, dict] = {}
    jobs = {}
    with _pool(args.jobs) as pool, Progress(console=console, transient=True) as bar:
        # longest first: the variants (a supernet each), then stand-alone subnets from the largest down
        for v in args.variants:
            jobs[pool.submit(variant_job, args.task, v, args.epochs, args.seed, args.folds, configs)] = ("v", v)
        for i in reversed(range(len(configs))):
            for b in range(args.runs):
                if (i, b) not in alone:
                    seed = args.seed + 1 + i + b * CEILING_SEED_OFFSET
                    jobs[pool.submit(standalone_job, args.task, args.epochs, args.seed, args.folds, configs[i],
                                     seed)] = ("s", (i, b))
        task = bar.add_task("variants and stand-alone subnets", total=len(jobs))
        for fut in as_completed(jobs):
            kind, key = jobs[fut]
            if kind == "v":
                variants[key] = fut.result()
            else:
                alone[key] = fut.result()
            bar.advance(task)
            if console is not None and not console.is_terminal:  # a log gets one line per finished job
                what = f"variant {key}" if kind == "v" else f"stand-alone subnet {key[0]} run {_run_name(key[1])}"
                console.print(f"[{time.perf_counter() - t0:7.0f} s] {what} done "
                              f"({int(bar.tasks[0].completed)}/{len(jobs)})")
    base = []
    for i, (config, macs) in enumerate(subnets):
        (a, a_se) = _mean_se(alone[i, 0])
        row = {"config": config.to_dict(), "macs": int(macs), "standalone": a, "standalone_se": a_se,
               "standalone_folds": alone[i, 0]}
        if args.ceiling:
            row["standalone_b"], row["standalone_b_se"] = _mean_se(alone[i, 1])
            row["standalone_b_folds"] = alone[i, 1]
            runs = [alone[i, b] for b in range(args.runs)]
            row["standalone_runs_folds"] = runs
            row["standalone_mean"] = float(np.mean([np.mean(f) for f in runs]))
        base.append(row)
    alone_a = np.array([r["standalone"] for r in base])
    ceiling = _ceiling(base, args.runs) if args.ceiling else None
    report = {}
    for v in args.variants:
        res = variants[v]
        primary = res["sweep"]["all"][0]
        rows = []
        for i, r in enumerate(base):
            s, s_se = _mean_se(primary[i])
            rows.append({"config": r["config"], "macs": r["macs"], "shared": s, "shared_se": s_se,
                         "standalone": r["standalone"], "standalone_se": r["standalone_se"],
                         "gap_points": (s - r["standalone"]) * 100})
        summary = summarise(rows)
        if args.ceiling:
            mean_alone = np.array([r["standalone_mean"] for r in base])
            shared = np.array([r["shared"] for r in rows])
            summary["kendall_tau_vs_seed_mean"] = _finite(kendalltau(shared, mean_alone).statistic)
            summary["spearman_rho_vs_seed_mean"] = _finite(spearmanr(shared, mean_alone).statistic)
            summary["mean_gap_vs_seed_mean_points"] = float((shared - mean_alone).mean() * 100)
        report[v] = {"epochs": res["epochs"], "train_seconds": res["train_seconds"], "rows": rows,
                     "summary": summary, "calib_sweep": _sweep_stats(res["sweep"], alone_a)}
    first = report[args.variants[0]]
    return {"meta": {"task": args.task, "variants": args.variants, "subnets": args.subnets, "folds": args.folds,
                     "epochs": args.epochs, "seed": args.seed, "quick": args.quick, "train_images": len(y_tr),
                     "pool_images": len(y_pool), "jobs": args.jobs, "ceiling": args.ceiling,
                     "standalone_seeds": args.runs,
                     "evaluation": f"{args.folds} stratified folds of the held-out pool; "
                     "mean and standard error over folds",
                     "calibration": f"batch norm recalibrated in batches of {CALIB_BATCH} training images; primary: "
                     f"all of them; sweep: {[_calib_key(n) for n in CALIB_SWEEP]} images x {CALIB_SEEDS} seeds",
                     "training_cost": "each variant's epochs scaled by 4 / (2 + sandwich) subnet passes per step; "
                     "variants named -2x train twice as long",
                     "task_construction": __doc__.split("Tasks. ")[1].split("\n\nReproduce")[0].replace("\n", " "),
                     "seconds": round(time.perf_counter() - t0, 1),
                     "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
            "standalone": base, "ceiling": ceiling, "variants": report,
            "rows": first["rows"], "summary": first["summary"]}


def show(result: dict, console: Console) -> None:
    meta = result["meta"]
    for v, res in result["variants"].items():
        table = Table(title=f"variant {v}: supernet quality on {meta['task']} ({meta['folds']} folds, "
                            f"{res['epochs']} supernet epochs, {meta['epochs']} stand-alone)")
        for col in ("#", "MACs", "shared %", "alone %", "gap pts", "vs line pts", "alone vs line"):
            table.add_column(col, justify="right")
        for i, r in enumerate(res["rows"]):
            table.add_row(str(i), f"{r['macs']:,}", f"{100 * r['shared']:.1f} ± {100 * r['shared_se']:.1f}",
                          f"{100 * r['standalone']:.1f} ± {100 * r['standalone_se']:.1f}", f"{r['gap_points']:+.1f}",
                          f"{r['vs_line_points']:+.1f}" if "vs_line_points" in r else "",
                          f"{r['standalone_vs_line_points']:+.1f}" if "standalone_vs_line_points" in r else "")
        console.print(table)
    table = Table(title="variants side by side (same subnets, same stand-alone runs, same training cost)")
    runs = meta.get("standalone_seeds", 2 if result["ceiling"] else 1)
    for col in ("variant", "tau", "tau top", "rho", f"tau vs mean of {runs}", "gap mean", "gap worst",
                "middle vs line", "targets", "tau by calib 64 / 128 / all (std over seeds)", "train s"):
        table.add_column(col, justify="right")
    for v, res in result["variants"].items():
        s, cs = res["summary"], res["calib_sweep"]
        vs_mean = f"{s['kendall_tau_vs_seed_mean']:.3f}" if "kendall_tau_vs_seed_mean" in s else "-"
        table.add_row(v, f"{s['kendall_tau']:.3f}", f"{s['kendall_tau_top_half']:.3f}", f"{s['spearman_rho']:.3f}",
                      vs_mean,
                      f"{s['mean_gap_points']:+.2f}", f"{s['worst_gap_points']:+.2f}",
                      f"{s['middle_worst_vs_line_points']:+.2f}", f"{sum(s['targets'].values())}/3",
                      " / ".join(f"{cs[k]['kendall_tau']:.2f} ({cs[k]['kendall_tau_std']:.2f})"
                                 for k in (_calib_key(n) for n in CALIB_SWEEP)), f"{res['train_seconds']:.0f}")
    console.print(table)
    if result["ceiling"]:
        c = result["ceiling"]
        rest = (f"; each run against the mean of the other {c['runs'] - 1}: {c['kendall_tau_one_vs_rest_mean']:.3f}"
                if "kendall_tau_one_vs_rest_mean" in c else "")
        console.print(f"noise ceiling: stand-alone seed-to-seed Kendall tau {c['kendall_tau_seed_to_seed']:.3f} "
                      f"(mean of {len(c.get('kendall_tau_pairs', [0]))} pairs), mean |difference| "
                      f"{c['mean_abs_diff_points']:.2f} points{rest}")
        if "middle_worst_vs_line_points_of_mean" in c:
            per_run = ", ".join(f"{v:+.1f}" for v in c["middle_worst_vs_line_points_per_run"])
            console.print(f"stand-alone middle vs line (the space's own dip): {per_run} per run, "
                          f"{c['middle_worst_vs_line_points_of_mean']:+.1f} for the mean of {c['runs']} runs")
    for v, res in result["variants"].items():
        s = res["summary"]
        console.print(f"{v}: " + "; ".join(f"{name}: {'met' if met else 'NOT met'}"
                                           for name, met in s["targets"].items()))


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    console = Console() if sys.stdout.isatty() else Console(width=150)  # a log keeps whole tables
    result = run(args, console)
    show(result, console)
    write_json(args.out, result)
    console.print(f"wrote {args.out} in {result['meta']['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
