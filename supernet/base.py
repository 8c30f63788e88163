"""What every elastic supernet family shares, and the registry of families by name."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from nestnas.errors import ConfigError
from nestnas.supernet.config import SubnetConfig
from nestnas.supernet.space import SearchSpace

SUPERNETS: dict[str, type[Supernet]] = {}


def register_supernet(family: str) -> Callable[[type[Supernet]], type[Supernet]]:
    """Class decorator: make a supernet family buildable by name (`build_supernet`)."""

    def wrap(cls):
        SUPERNETS[family] = cls
        return cls

    return wrap


def build_supernet(space: SearchSpace, **kwargs) -> Supernet:
    if space.family not in SUPERNETS:
        raise ConfigError(f"no supernet registered for family {space.family!r}; allowed: {sorted(SUPERNETS)}")
    return SUPERNETS[space.family](space, **kwargs)


class Supernet(nn.Module):
    """An elastic network over a `SearchSpace`. `forward(x, config)` runs the subnet `config`
    (None = largest) on the shared weights; `extract(config)` returns it as a static module."""

    space: SearchSpace

    def resolve(self, config: SubnetConfig | None) -> SubnetConfig:
        return self.space.largest() if config is None else self.space.validate(config)

    def spec(self) -> dict[str, Any]:
        """Constructor arguments beyond the space (saved in checkpoints)."""
        raise NotImplementedError

    @classmethod
    def spec_for_data(cls, space: SearchSpace, sample_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
        """Constructor arguments (beyond the space) for data whose samples have `sample_shape`
        (no batch dimension, e.g. (C, H, W) for images, (F,) for tables) and `num_classes`
        classes. Raises `DataError` naming the shapes this family takes if it cannot take these."""
        raise NotImplementedError

    @classmethod
    def image_size(cls, space: SearchSpace) -> int | None:
        """Side (pixels) to which a folder of images is resized for this family; None keeps
        the images' own size (they must then all have the same size)."""
        return None

    def sample_shape(self) -> tuple[int, ...]:
        """Per-sample shape this net takes from a data set, before `prepare_input`; data
        whose samples differ is refused (`DataError`)."""
        raise NotImplementedError

    def input_shape(self, config: SubnetConfig | None = None, batch: int = 1) -> tuple[int, ...]:
        raise NotImplementedError

    def prepare_input(self, x: torch.Tensor, config: SubnetConfig | None = None) -> torch.Tensor:
        """Bring a batch from the data set to the shape `config` takes (e.g. its resolution)."""
        return x

    def extract(self, config: SubnetConfig | None = None) -> nn.Module:
        raise NotImplementedError

    def sort_channels(self) -> Supernet:
        """Reorder channels/heads by importance so that nested slices keep the most important
        ones. The largest network's function is unchanged."""
        raise NotImplementedError

    def _check_input(self, x: torch.Tensor, config: SubnetConfig) -> None:
        expected = self.input_shape(config, batch=x.shape[0] if x.dim() else 1)
        if tuple(x.shape) != expected:
            raise ConfigError(
                f"input of shape {tuple(x.shape)} does not fit this subnet (expected {expected}); "
                "use net.prepare_input(x, config)"
            )
