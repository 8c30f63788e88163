"""What a subnet of a supernet is (accuracy on shared weights, MACs, params), as a record and as
a table; shared by `nestnas eval` and the quickstart."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from nestnas.predictors.macs import count_macs, count_module
from nestnas.supernet.base import Supernet
from nestnas.supernet.config import SubnetConfig
from nestnas.supernet.evaluate import subnet_accuracy
from nestnas.supernet.inputs import example_inputs


def describe_subnet(net: Supernet, config: SubnetConfig, val_loader, calib_loader, seed: int = 0) -> dict[str, Any]:
    """Accuracy (batch norm recalibrated), MACs and params of one subnet, plus its identity."""
    acc = subnet_accuracy(net, config, val_loader, calib_loader, seed=seed)
    try:  # the family's analytic counts: what searches and fronts report (hooks miss functional attention)
        macs, params = count_macs(net.space, config, **net.spec())
    except NotImplementedError:
        macs, params = count_module(net.extract(config), example_inputs(net.input_specs(config, 1), seed))
    return {"hash": net.space.config_hash(config), "config": config.to_dict(), "summary": config.summary(),
            "accuracy": acc, "macs": macs, "params": params}


def subnet_table(title: str, rows: list[tuple[str, dict[str, Any]]]) -> Table:
    table = Table(title=title)
    for col, justify in (("subnet", "left"), ("hash", "left"), ("val acc", "right"), ("params", "right"),
                         ("MACs", "right"), ("config", "left")):
        table.add_column(col, justify=justify)
    for name, r in rows:
        table.add_row(name, r["hash"], f"{100 * r['accuracy']:.2f}%", f"{r['params']:,}", f"{r['macs'] / 1e6:.2f}M",
                      r["summary"])
    return table
