"""Benchmark: what weight sharing costs in training, and what extraction saves at inference.

Measured side by side in one run, for both supernet families (``cnn`` and ``transformer``):

1. Training. One sandwich step on the elastic supernet (as in ``supernet/train.py``: the
   largest subnet on cross entropy, then every other subnet on KL distillation to the
   largest's detached logits, one backward each, one AdamW step over the shared weights)
   against k plain training steps of the same k subnets extracted as static modules (forward,
   the same loss, backward and an AdamW step each; every static module has its own
   optimizer, created outside the timed region). k = 4 subnets: largest, smallest and two
   seeded random ones; one batch of 64 digits images. Target: sandwich / plain <= 1.2.
   (The plain side pays k optimizer steps over k weight copies, the sandwich one step over the
   shared weights; that is part of what is compared.)
2. Inference. Batch-1 forward latency (eval mode, ``torch.no_grad``) of the supernet running
   a config against the static module extracted for that config, for the largest, the
   smallest and three seeded random configs. Ratio supernet / extracted.

How it is timed: ``time.perf_counter``, warm-up calls first, then the variants are
interleaved (A B, then B A, and so on, so neither always runs first) and each sample
repeats a call often enough to last about ``SAMPLE_S``; medians over the repeats are
reported, since the machine is noisy. The share of CPU time other processes took during the
run is recorded (``meta.foreign_cpu_share``) and warned about: torch's OpenMP threads stall
badly when the cores are oversubscribed, inflating absolute times many-fold. Only ratios
within one run mean anything; absolute times do not compare across runs or machines.
Torch's thread count is left at its default and recorded.

Reproduce (from the repository root, ``pip install -e .`` done)::

    python tools/bench_supernet.py                    # ~1.5 min on 2 idle cores (under 3)
    python tools/bench_supernet.py --quick            # ~15-30 s smoke run
    python tools/bench_supernet.py --repeats 31 --out bench_supernet.json
    python tools/bench_supernet.py --quality          # shared vs stand-alone accuracy (tools/bench_quality.py)
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from nestnas.fileio import write_json
from nestnas.supernet import ElasticCNN, ElasticTransformer, SearchSpace, SubnetConfig, Supernet
from nestnas.supernet.data import digits_loaders
from nestnas.supernet.train import distill_loss, sandwich_backward

FAMILIES = ("cnn", "transformer")
TARGET = 1.2  # sandwich / plain training time
SEED = 0
BATCH = 64
K_SUBNETS = 4  # largest + smallest + 2 random
N_RANDOM_INFERENCE = 3
LR, WEIGHT_DECAY = 4e-3, 0.02  # the defaults of train_supernet
DEFAULT_REPEATS, QUICK_REPEATS = 25, 7
WARMUP = 3  # calls of every variant before timing
SAMPLE_S = {False: 0.1, True: 0.02}  # least duration of one timing sample (by --quick)
FOREIGN_CPU_WARN = 0.1  # warn when other processes took more than this share of the CPUs


# --- building blocks ------------------------------------------------------------------------
def build(family: str) -> Supernet:
    torch.manual_seed(SEED)
    if family == "cnn":
        return ElasticCNN(SearchSpace.mobilenet(), num_classes=10, in_channels=1)
    return ElasticTransformer(SearchSpace.transformer(), num_classes=10, num_tokens=8, token_dim=8)


def digits_batch(family: str) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(SEED)  # the loader shuffles with torch's global generator
    train_loader, _ = digits_loaders(family, batch_size=BATCH, seed=SEED)
    return next(iter(train_loader))


def training_configs(net: Supernet) -> list[tuple[str, SubnetConfig]]:
    space, rng = net.space, np.random.default_rng(SEED)
    randoms = [(f"random-{i}", space.sample(rng)) for i in range(K_SUBNETS - 2)]
    return [("largest", space.largest()), ("smallest", space.smallest()), *randoms]


def inference_configs(net: Supernet) -> list[tuple[str, SubnetConfig]]:
    space, rng = net.space, np.random.default_rng(SEED + 1)
    randoms = [(f"random-{i}", space.sample(rng)) for i in range(N_RANDOM_INFERENCE)]
    return [("largest", space.largest()), ("smallest", space.smallest()), *randoms]


# --- the two training variants ----------------------------------------------------------------
# Inputs are resized to each config's resolution (prepare_input) OUTSIDE the timed region in
# both variants, so only the network cost (forward, loss, backward, optimizer) is compared.
def sandwich_step(net: Supernet, configs: list[SubnetConfig], x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    net.train()
    inputs = [net.prepare_input(x, c) for c in configs]
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        sandwich_backward(net, list(zip(configs, inputs)), y)
        optimizer.step()

    return step


def plain_steps(net: Supernet, configs: list[SubnetConfig], x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    modules = [net.extract(c).train() for c in configs]
    inputs = [net.prepare_input(x, c) for c in configs]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=WEIGHT_DECAY) for m in modules]

    def step() -> None:
        teacher = None
        for module, xi, optimizer in zip(modules, inputs, optimizers):
            optimizer.zero_grad(set_to_none=True)
            logits = module(xi)
            loss = F.cross_entropy(logits, y) if teacher is None else distill_loss(logits, teacher)
            loss.backward()
            optimizer.step()
            if teacher is None:  # the first config is the largest: it teaches the others
                teacher = logits.detach()

    return step


# --- timing -----------------------------------------------------------------------------------
def calls_per_sample(fn: Callable[[], None], sample_s: float) -> int:
    """Warm `fn` up and return how many calls make one sample of at least `sample_s`."""
    for _ in range(WARMUP - 1):
        fn()
    t0 = time.perf_counter()
    fn()
    return max(1, math.ceil(sample_s / max(time.perf_counter() - t0, 1e-9)))


def interleaved_medians(variants: dict[str, Callable[[], None]], repeats: int, sample_s: float) -> dict[str, float]:
    """Median milliseconds per call of each variant; samples interleaved A B, B A, A B, ..."""
    calls = {name: calls_per_sample(fn, sample_s) for name, fn in variants.items()}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            fn, n = variants[name], calls[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


# --- the two measurements ---------------------------------------------------------------------
def bench_training(family: str, repeats: int, sample_s: float) -> dict:
    net = build(family)
    x, y = digits_batch(family)
    configs = [c for _, c in training_configs(net)]
    plain = plain_steps(net, configs, x, y)  # extract before the sandwich steps change the weights
    sandwich = sandwich_step(net, configs, x, y)
    ms = interleaved_medians({"sandwich": sandwich, "plain": plain}, repeats, sample_s)
    ratio = ms["sandwich"] / ms["plain"]
    return {"family": family, "k": len(configs), "sandwich_ms": ms["sandwich"], "plain_ms": ms["plain"],
            "ratio": ratio, "target": TARGET, "met": ratio <= TARGET}


def bench_inference(family: str, repeats: int, sample_s: float) -> list[dict]:
    net = build(family).eval()
    rows = []
    for name, config in inference_configs(net):
        extracted = net.extract(config)
        x = torch.randn(net.input_shape(config, batch=1))

        @torch.no_grad()
        def supernet_call(x=x, config=config):
            net(x, config)

        @torch.no_grad()
        def extracted_call(x=x, extracted=extracted):
            extracted(x)

        ms = interleaved_medians({"supernet": supernet_call, "extracted": extracted_call}, repeats, sample_s)
        rows.append({"family": family, "subnet": name, "config_hash": net.space.config_hash(config),
                     "supernet_ms": ms["supernet"], "extracted_ms": ms["extracted"],
                     "ratio": ms["supernet"] / ms["extracted"]})
    return rows


def summarise(training: list[dict], inference: list[dict]) -> dict:
    out = {}
    for family in FAMILIES:
        train_rows = [r for r in training if r["family"] == family]
        inf_rows = [r for r in inference if r["family"] == family]
        out[family] = {
            "training_ratio_median": statistics.median(r["ratio"] for r in train_rows),
            "training_target_met": all(r["met"] for r in train_rows),
            "inference_ratio_median": statistics.median(r["ratio"] for r in inf_rows),
        }
    return out


def meta(repeats: int, quick: bool, foreign_cpu: float | None) -> dict:
    return {
        "torch": torch.__version__, "num_threads": torch.get_num_threads(), "python": platform.python_version(),
        "platform": platform.platform(), "processor": platform.processor(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "repeats": repeats, "quick": quick, "warmup_calls": WARMUP,
        "min_sample_s": SAMPLE_S[quick], "batch_training": BATCH, "batch_inference": 1, "seed": SEED,
        "statistic": "median over interleaved repeats, ms per call",
        "input_preparation": "prepare_input outside the timed region (both training variants)",
        "foreign_cpu_share": foreign_cpu,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


class ForeignLoad:
    """Share of all CPU time that other processes used while the benchmark ran (Linux
    /proc/stat; None elsewhere): the honest caveat on a shared, noisy machine."""

    def __init__(self):
        self.t0, self.own0, self.busy0 = time.perf_counter(), time.process_time(), self._busy_s()

    @staticmethod
    def _busy_s() -> float | None:
        try:
            with open("/proc/stat") as f:
                ticks = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def share(self) -> float | None:
        busy = self._busy_s()
        if busy is None or self.busy0 is None:
            return None
        wall = (time.perf_counter() - self.t0) * (os.cpu_count() or 1)
        foreign = (busy - self.busy0) - (time.process_time() - self.own0)
        return round(min(1.0, max(0.0, foreign / wall)), 3) if wall > 0 else None


# --- report -----------------------------------------------------------------------------------
def print_report(console: Console, result: dict) -> None:
    m = result["meta"]
    train = Table(title=f"Training step, batch {m['batch_training']} (median of {m['repeats']})")
    for col in ("family", "k", "sandwich ms", "plain ms", "sandwich/plain", "target", "met"):
        train.add_column(col, justify="left" if col in ("family", "met") else "right")
    for r in result["training"]:
        train.add_row(r["family"], str(r["k"]), f"{r['sandwich_ms']:.1f}", f"{r['plain_ms']:.1f}",
                      f"{r['ratio']:.2f}", f"<= {r['target']}", "yes" if r["met"] else "[red]no[/]")
    console.print(train)

    infer = Table(title=f"Batch-1 inference latency (median of {m['repeats']}), ratio = supernet / extracted")
    for col in ("family", "subnet", "config hash", "supernet ms", "extracted ms", "ratio"):
        infer.add_column(col, justify="left" if col in ("family", "subnet", "config hash") else "right", no_wrap=True)
    for r in result["inference"]:
        infer.add_row(r["family"], r["subnet"], r["config_hash"], f"{r['supernet_ms']:.3f}",
                      f"{r['extracted_ms']:.3f}", f"{r['ratio']:.2f}")
    console.print(infer)

    summary = Table(title="Summary (ratios)")
    for col in ("family", "train sandwich/plain", "target met", "infer supernet/extracted (median)"):
        summary.add_column(col, no_wrap=True)
    for family, s in result["summary"].items():
        summary.add_row(family, f"{s['training_ratio_median']:.2f}", "yes" if s["training_target_met"] else "no",
                        f"{s['inference_ratio_median']:.2f}")
    console.print(summary)
    cpu = m["processor"] or m["machine"]
    console.print(f"torch {m['torch']}, {m['num_threads']} threads, {m['cpu_count']} CPUs ({cpu})")
    if (m["foreign_cpu_share"] or 0.0) > FOREIGN_CPU_WARN:
        console.print(f"[yellow]warning:[/] other processes used {m['foreign_cpu_share']:.0%} of the CPUs during "
                      "the run: absolute times are inflated (torch's OpenMP threads stall when the cores are "
                      "oversubscribed); compare ratios only, or re-run on an idle machine")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_supernet.json", help="JSON report path (written atomically)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed samples per variant (default {DEFAULT_REPEATS}, {QUICK_REPEATS} with --quick)")
    parser.add_argument("--quick", action="store_true", help="a ~30 s smoke run")
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    sample_s = SAMPLE_S[args.quick]

    console = Console()
    console.width = max(console.width, 100)  # piped output defaults to 80 columns: too narrow
    watch = ForeignLoad()
    training, inference = [], []
    for family in FAMILIES:
        with console.status(f"training step: {family}"):
            training.append(bench_training(family, repeats, sample_s))
        with console.status(f"inference: {family}"):
            inference += bench_inference(family, repeats, sample_s)
    result = {"meta": meta(repeats, args.quick, watch.share()), "training": training, "inference": inference,
              "summary": summarise(training, inference)}
    result["meta"]["seconds"] = round(time.perf_counter() - watch.t0, 1)
    write_json(args.out, result)
    print_report(console, result)
    console.print(f"wrote {args.out} in {result['meta']['seconds']} s")
    return 0


if __name__ == "__main__":
    if "--quality" in sys.argv[1:]:  # the quality benchmark (issue 20) lives in its own file
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_quality import main as quality_main

        sys.exit(quality_main())
    sys.exit(main())
