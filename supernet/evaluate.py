"""Honest shared-weight accuracy: extract a subnet, recalibrate its batch norm, evaluate."""

from __future__ import annotations

import itertools
from typing import Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader

from nestnas.errors import ConfigError
from nestnas.supernet.base import Supernet
from nestnas.supernet.config import SubnetConfig
from nestnas.supernet.data import PACKED_TEXT


@torch.no_grad()
def recalibrate_bn(module: nn.Module, batches: Iterable[torch.Tensor], num_batches: int | None = None) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics of `module` as the exact average over
    `batches` (the supernet's shared statistics are a blend of all subnets, so a subnet needs its
    own). Leaves `module` in eval mode."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return module.eval()
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    module.train()
    seen = 0
    for x in itertools.islice(batches, num_batches):
        module(*x) if isinstance(x, tuple) else module(x)
        seen += 1
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    if seen == 0:
        raise ValueError("recalibrate_bn needs at least one batch")
    return module.eval()


@torch.no_grad()
def accuracy(module: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy of a static module over (x, y) batches; an x that is a tuple is the
    module's positional inputs."""
    module.eval()
    correct = total = 0
    for x, y in loader:
        logits = module(*x) if isinstance(x, tuple) else module(x)
        correct += (logits.argmax(dim=1) == y).sum().item()
        total += len(y)
    return correct / max(total, 1)


def module_inputs(net: Supernet, config: SubnetConfig, x) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The positional inputs of `net.extract(config)` for a batch `x` prepared for `config`: `x`
    itself for a one-input subnet; for several typed inputs (`Supernet.input_specs`), a dict's
    or tuple's items, or the slices of one packed tensor whose dim 1 stacks them in the order of
    `nestnas.supernet.data.PACKED_TEXT` (input_ids, attention_mask, token_type_ids), by name."""
    first = next(iter(x.values())) if isinstance(x, dict) else x[0] if isinstance(x, (tuple, list)) else x
    specs = net.input_specs(config, batch=len(first))
    if len(specs) == 1:
        return x
    if isinstance(x, dict):
        return tuple(x[s.name] for s in specs)
    if isinstance(x, (tuple, list)):
        return tuple(x)
    missing = [s.name for s in specs if s.name not in PACKED_TEXT]
    if missing or x.dim() < 2 or x.shape[1] != len(PACKED_TEXT):
        raise ConfigError(f"a batch of shape {tuple(x.shape)} cannot feed the subnet's inputs "
                          f"{[s.name for s in specs]}; expected a packed (B, {len(PACKED_TEXT)}, L) tensor of "
                          f"{list(PACKED_TEXT)}")
    return tuple(x[:, PACKED_TEXT.index(s.name)] for s in specs)


class _Prepared:
    """(x, y) batches brought to a subnet's input shape (and split into its inputs)."""

    def __init__(self, net: Supernet, config: SubnetConfig, loader: DataLoader):
        self.net, self.config, self.loader = net, config, loader

    def __iter__(self):
        for x, y in self.loader:
            yield module_inputs(self.net, self.config, self.net.prepare_input(x, self.config)), y


def prepared(net: Supernet, config: SubnetConfig, loader: DataLoader) -> Iterable:
    """`loader`'s (x, y) batches as `net.extract(config)` takes them (for `accuracy`)."""
    return _Prepared(net, config, loader)


def recalibrated_subnet(net: Supernet, config: SubnetConfig | None, calib_loader: DataLoader | None = None,
                        calib_batches: int | None = 8, seed: int = 0) -> nn.Module:
    """`net.extract(config)` with batch norm recalibrated on up to `calib_batches` batches of
    `calib_loader` (all of them for None; skipped when the loader is None), drawn under `seed`
    with the global RNG left untouched."""
    config = net.resolve(config)
    sub = net.extract(config)
    if calib_loader is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            recalibrate_bn(sub, (x for x, _ in _Prepared(net, config, calib_loader)), calib_batches)
    return sub


def subnet_accuracy(net: Supernet, config: SubnetConfig | None, val_loader: DataLoader,
                    calib_loader: DataLoader | None = None, calib_batches: int = 8, seed: int = 0) -> float:
    """Validation accuracy of `config` on the shared weights, after batch-norm recalibration
    on up to `calib_batches` batches of `calib_loader` (skipped when it is None). The
    calibration batches are drawn under `seed`, leaving the global RNG untouched."""
    config = net.resolve(config)
    sub = recalibrated_subnet(net, config, calib_loader, calib_batches, seed)
    return accuracy(sub, _Prepared(net, config, val_loader))
