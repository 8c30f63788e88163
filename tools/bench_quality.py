"""Supernet quality (issue 20, section 1): does shared-weight accuracy rank subnets as stand-alone training would?

Run as ``python tools/bench_supernet.py --quality`` (or this file directly). Steps:

1. Train (or load, ``--checkpoint``) an ``ElasticCNN`` supernet on the task with the default
   recipe (``train_supernet``: sandwich, distillation, AdamW 4e-3, wd 0.02, cosine, 5% warm-up).
2. Pick N subnets spread over MACs: a seeded sample of 2000 configs plus the smallest and
   largest, distinct canonical forms, sorted by ``count_macs``, taken at N evenly spaced quantiles.
3. Shared-weight accuracy of each (``subnet_accuracy``, batch norm recalibrated on 8 training batches).
4. Stand-alone: ``net.extract(config)``, every module with ``reset_parameters`` re-initialised
   (seeded), trained from scratch with the same recipe, epochs and batch (plain cross entropy).
5. Evaluation: the training set is fixed; the held-out pool is cut into K stratified folds
   (``StratifiedKFold``, seeded) and every accuracy is the mean over the folds with its standard
   error. Report Kendall tau / Spearman rho (of the fold means), mean and worst gap (shared minus
   stand-alone, points), tau of the top half by stand-alone accuracy, and the "middle" check:
   shared accuracy minus the line between smallest and largest interpolated in log MACs.

Tasks. No installed package ships an offline image dataset besides digits (sklearn's ``load_*``
are digits plus tabular sets and two sample photos; ``fetch_*`` download and are not used), so
``digits-hard`` is built from digits, fixed once under seed 0: every image rotated by a uniform
angle in [-25, 25] degrees (scipy.ndimage.rotate, order 1), shifted by an integer in [-1, 1]
pixels on each axis, plus Gaussian noise of sigma 0.5 (pixels in [-1, 1]); then only 40
training images per class (400) are kept and the remaining 1397 form the evaluation pool.
``digits`` is the plain set: 50% training, 50% pool.

Reproduce::

    python tools/bench_supernet.py --quality                     # default: digits-hard, 20 subnets
    python tools/bench_supernet.py --quality --quick --out q.json
"""

from __future__ import annotations

import argparse
import datetime as dt
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
from nestnas.supernet.evaluate import accuracy, module_inputs, subnet_accuracy
from nestnas.supernet.train import TrainOptions, make_optimizer, recipe_for, train_supernet

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
        img = rotate(img, rng.uniform(-25, 25), reshape=False, order=1, mode="constant", cval=-1.0)
        img = np.roll(img, tuple(rng.integers(-1, 2, size=2)), axis=(0, 1))
        out[i] = img + rng.normal(0, 0.5, size=img.shape)
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
    for _ in range(epochs):
        for x, y in loader:
            logits = module(module_inputs(net, config, net.prepare_input(x, config)))
            F.cross_entropy(logits, y).backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return module.eval()


# --- statistics ----------------------------------------------------------------------------------
def _mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0


def summarise(rows: list[dict]) -> dict:
    from scipy.stats import kendalltau, spearmanr

    shared = np.array([r["shared"] for r in rows])
    alone = np.array([r["standalone"] for r in rows])
    gaps = (shared - alone) * 100
    top = np.argsort(-alone)[: max(2, len(rows) // 2)]
    logm = np.log([r["macs"] for r in rows])
    line = shared[0] + (shared[-1] - shared[0]) * (logm - logm[0]) / max(logm[-1] - logm[0], 1e-12)
    below = ((shared - line) * 100)[1:-1]
    for r, b in zip(rows[1:-1], below):
        r["vs_line_points"] = float(b)
    tau = float(kendalltau(shared, alone).statistic)
    out = {
        "kendall_tau": tau, "spearman_rho": float(spearmanr(shared, alone).statistic),
        "kendall_tau_top_half": float(kendalltau(shared[top], alone[top]).statistic),
        "mean_gap_points": float(gaps.mean()), "worst_gap_points": float(gaps.min()),
        "middle_worst_vs_line_points": float(below.min()) if len(below) else 0.0,
    }
    out = {k: (0.0 if math.isnan(v) else v) for k, v in out.items()}  # constant accuracies: no ranking
    out["targets"] = {
        "kendall_tau >= 0.8": out["kendall_tau"] >= TARGETS["kendall_tau"],
        "mean_gap >= -0.5 points": out["mean_gap_points"] >= TARGETS["mean_gap_points"],
        "no middle subnet > 3 points below the line": bool((below >= -TARGETS["middle_max_below_points"]).all()),
    }
    return out


# --- the run --------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block: the tool's bad-input contract
        self.exit(2, f"bench_supernet.py --quality: error: {message}\n")


def parse(argv):
    ap = _Parser(prog="bench_supernet.py --quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quality", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--task", default="digits-hard", help=f"one of {list(TASKS)}")
    ap.add_argument("--variant", default="default", help=f"training variant, one of {list(VARIANTS)}")
    ap.add_argument("--subnets", type=int, default=None, help="subnets to compare (default 20, --quick 4)")
    ap.add_argument("--folds", type=int, default=None, help="stratified folds of the evaluation pool (default 5)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs of supernet and stand-alone (family default)")
    ap.add_argument("--checkpoint", default=None, help="load this trained supernet instead of training")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--quick", action="store_true", help="a small smoke run (4 subnets, 1 epoch, 3 folds)")
    ap.add_argument("--out", default="bench_quality.json", help="JSON report path (written atomically)")
    args = ap.parse_args(argv)
    if args.task not in TASKS:
        ap.error(f"unknown task {args.task!r}; allowed: {list(TASKS)}")
    if args.variant not in VARIANTS:
        ap.error(f"unknown variant {args.variant!r}; allowed: {list(VARIANTS)}")
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
    return args


def run(args) -> dict:
    t0 = time.perf_counter()
    x_tr, y_tr, x_pool, y_pool = task_arrays(args.task, args.seed)
    train_ds = TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr))
    folds = fold_loaders(x_pool, y_pool, args.folds, args.seed)
    torch.manual_seed(args.seed)
    net = ElasticCNN(SearchSpace.mobilenet(), num_classes=10, in_channels=1)
    if args.checkpoint:
        from nestnas.supernet.checkpoint import load_supernet

        net = load_supernet(args.checkpoint)
    else:
        options = VARIANTS[args.variant]
        # the same training cost (subnet passes) as the default's 4 per step: epochs scaled by 4 / passes
        epochs = max(1, round(args.epochs * 4 / (2 + options.get("sandwich", 2))))
        train_supernet(net, DataLoader(train_ds, batch_size=recipe_for(net).batch_size, shuffle=True,
                                       drop_last=True), epochs=epochs, seed=args.seed, progress=False, **options)
    calib = DataLoader(train_ds, batch_size=64, shuffle=True)
    subnets = pick_subnets(net, args.subnets, args.seed)
    if len(subnets) < args.subnets:
        raise SystemExit(f"only {len(subnets)} distinct subnets found among {POOL_SAMPLES} samples")
    rows = []
    for i, (config, macs) in enumerate(subnets):
        shared = [subnet_accuracy(net, config, f, calib, seed=args.seed) for f in folds]
        module = standalone(net, config, train_ds, args.epochs, args.seed + 1 + i)
        alone = [accuracy(module, ((module_inputs(net, config, net.prepare_input(x, config)), y) for x, y in f))
                 for f in folds]
        (s, s_se), (a, a_se) = _mean_se(shared), _mean_se(alone)
        rows.append({"config": config.to_dict(),
                     "macs": int(macs), "shared": s, "shared_se": s_se, "standalone": a, "standalone_se": a_se,
                     "gap_points": (s - a) * 100})
    summary = summarise(rows)
    return {"meta": {"task": args.task, "variant": args.variant, "subnets": args.subnets, "folds": args.folds,
                     "epochs": args.epochs, "seed": args.seed, "quick": args.quick, "train_images": len(y_tr),
                     "pool_images": len(y_pool), "evaluation": f"{args.folds} stratified folds of the held-out pool; "
                     "mean and standard error over folds", "task_construction": __doc__.split("Tasks. ")[1]
                     .split("\n\nReproduce")[0].replace("\n", " "),
                     "seconds": round(time.perf_counter() - t0, 1),
                     "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
            "rows": rows, "summary": summary}


def show(result: dict, console: Console) -> None:
    table = Table(title=f"supernet quality on {result['meta']['task']} ({result['meta']['folds']} folds)")
    for col in ("#", "MACs", "shared %", "alone %", "gap pts", "vs line pts"):
        table.add_column(col, justify="right")
    for i, r in enumerate(result["rows"]):
        table.add_row(str(i), f"{r['macs']:,}", f"{100 * r['shared']:.1f} ± {100 * r['shared_se']:.1f}",
                      f"{100 * r['standalone']:.1f} ± {100 * r['standalone_se']:.1f}", f"{r['gap_points']:+.1f}",
                      f"{r['vs_line_points']:+.1f}" if "vs_line_points" in r else "")
    console.print(table)
    s = result["summary"]
    console.print(f"Kendall tau {s['kendall_tau']:.3f} (top half {s['kendall_tau_top_half']:.3f}), Spearman rho "
                  f"{s['spearman_rho']:.3f}; gap mean {s['mean_gap_points']:+.2f}, worst {s['worst_gap_points']:+.2f} "
                  f"points; middle worst vs line {s['middle_worst_vs_line_points']:+.2f} points")
    for name, met in s["targets"].items():
        console.print(f"  {name}: {'met' if met else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    console = Console()
    result = run(args)
    show(result, console)
    write_json(args.out, result)
    console.print(f"wrote {args.out} in {result['meta']['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
