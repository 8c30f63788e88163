"""Subnets as sequences of parts (e.g. stem, blocks, head), for per-block latency lookup tables.

A part's key names everything its latency depends on (kind, channel counts, kernel, stride,
feature-map size), not where it sits in the network, so one measurement serves every slot and
every subnet that contains the same part (Once-for-All's latency table). Each family splits its
own subnets (`Supernet.parts`, `all_parts`, `build_part`); this module only asks it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from nestnas.supernet.base import Part, Supernet
from nestnas.supernet.config import SubnetConfig
from nestnas.supernet.families import supernet_class
from nestnas.supernet.space import SearchSpace


def parts(net: Supernet, config: SubnetConfig) -> list[Part]:
    """(key, recipe) of each part of the subnet `config` of `net`, in network order."""
    return type(net).parts(net.space, net.space.validate(config), net.spec())


def all_parts(net: Supernet) -> dict[str, Any]:
    """Every distinct part of every subnet of `net`'s space (key -> recipe), enumerated per
    slot rather than per subnet, so the table covers configs never profiled whole."""
    return net.all_parts()


def build_part(net: Supernet, recipe: Any, batch: int) -> tuple[nn.Module, tuple[int, ...]]:
    """A static module for one part (a recipe from `parts` or `all_parts`) and its input shape."""
    return net.build_part(recipe, batch)


def config_part_keys(space: SearchSpace, X, spec: dict) -> list[list[str]]:
    """Part keys of each encoded config (rows of `X`), from the space and the model spec
    alone (no module is built)."""
    family = supernet_class(space.family)
    return [[key for key, _ in family.parts(space, space.decode(row), spec)] for row in X]
