"""`nestnas quickstart`: the whole pipeline on the embedded default data (scikit-learn digits).

Stages so far: train the CNN supernet with the sandwich rule, then report shared-weight accuracy,
parameters and MACs of the largest, the smallest and three random subnets.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from nestnas.predictors.macs import count_module
from nestnas.supernet.checkpoint import save_checkpoint
from nestnas.supernet.cnn import ElasticCNN
from nestnas.supernet.data import digits_loaders
from nestnas.supernet.evaluate import subnet_accuracy
from nestnas.supernet.base import Supernet
from nestnas.supernet.config import SubnetConfig
from nestnas.supernet.train import DEFAULT_EPOCHS, train_supernet


def describe_subnet(net: Supernet, config: SubnetConfig, val_loader, calib_loader, seed: int = 0) -> dict[str, Any]:
    """Accuracy (batch norm recalibrated), MACs and params of one subnet, plus its identity."""
    acc = subnet_accuracy(net, config, val_loader, calib_loader, seed=seed)
    macs, params = count_module(net.extract(config), torch.zeros(net.input_shape(config)))
    return {"hash": net.space.config_hash(config), "config": config.to_dict(), "accuracy": acc, "macs": macs,
            "params": params}


def subnet_table(title: str, rows: list[tuple[str, dict[str, Any]]]) -> Table:
    table = Table(title=title)
    for col, justify in (("subnet", "left"), ("hash", "left"), ("val acc", "right"), ("params", "right"),
                         ("MACs", "right"), ("config", "left")):
        table.add_column(col, justify=justify)
    for name, r in rows:
        c = r["config"]
        summary = ", ".join(f"{k}={v}" for k, v in c.items() if k in ("resolution", "width_mult", "depths", "depth",
                                                                       "embed_dim"))
        table.add_row(name, r["hash"], f"{100 * r['accuracy']:.2f}%", f"{r['params']:,}", f"{r['macs'] / 1e6:.2f}M",
                      summary)
    return table


def run_quickstart(out_dir: str | Path = "nestnas-quickstart", epochs: int = DEFAULT_EPOCHS["cnn"], seed: int = 0,
                   console: Console | None = None, progress: bool = True) -> dict[str, Any]:
    console = console or Console()
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    train_loader, val_loader = digits_loaders("cnn", batch_size=64, seed=seed)
    net = ElasticCNN(num_classes=10, in_channels=1)
    space = net.space
    console.rule("[bold]1. train[/] the CNN supernet on scikit-learn digits (sandwich rule, in-place distillation)")
    console.print(f"search space: {space.size():,} distinct subnets; {epochs} epochs")
    result = train_supernet(net, train_loader, epochs, seed=seed, progress=progress)
    ckpt = out_dir / "supernet.ckpt"
    save_checkpoint(net, ckpt)
    console.print(f"trained in {result.seconds:.0f} s; checkpoint: {ckpt}")

    rng = np.random.default_rng(seed)
    picks = [("largest", space.largest()), ("smallest", space.smallest())]
    picks += [(f"random {i + 1}", space.sample(rng)) for i in range(3)]
    rows = [(name, describe_subnet(net, c, val_loader, train_loader, seed)) for name, c in picks]
    console.print(subnet_table("subnets on shared weights (batch norm recalibrated), digits validation split", rows))
    summary = {"checkpoint": str(ckpt), "train_seconds": result.seconds,
               "subnets": {name: r for name, r in rows}, "total_seconds": time.perf_counter() - t0}
    console.print(f"quickstart finished in {summary['total_seconds']:.0f} s")
    return summary
