"""What every elastic supernet family shares: the interface generic code calls, and the registry.

A family is one module under `supernet/` (see `cnn.py`, `transformer.py`) that defines its
`SubnetConfig`, its `SearchSpace` and a `Supernet` subclass decorated with
`@register_supernet("name")`. Generic code (profiling, predictors, search, compiling, export,
the command line) calls only the methods below and never names a family.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from nestnas.errors import ConfigError
from nestnas.supernet.config import SubnetConfig
from nestnas.supernet.families import (
    DEFAULT_FAMILY,
    SUPERNETS,
    family_names,
    register_supernet,
    supernet_class,
    unregister_supernet,
)
from nestnas.supernet.inputs import InputSpec
from nestnas.supernet.space import SearchSpace

__all__ = ["DEFAULT_FAMILY", "SUPERNETS", "Part", "Supernet", "build_supernet", "family_names", "part_key",
           "register_supernet",
           "supernet_class", "unregister_supernet"]

#: One measurable part of a subnet: (key, recipe). The key names everything the part's latency
#: depends on (not where it sits), so one measurement serves every subnet holding that part; the
#: recipe is what the family's `build_part` needs to build it. Keys are stored in device profiles:
#: a family must never change the keys it makes, or the profiles measured with them stop matching.
Part = tuple[str, Any]


def part_key(*fields) -> str:
    """A part key from its kind and the numbers its latency depends on: ``block:16:48:24:3:2:8``."""
    return ":".join(str(f) for f in fields)


def build_supernet(space: SearchSpace, **kwargs) -> Supernet:
    """The supernet of `space`'s family, built with constructor arguments `kwargs` (its spec)."""
    try:
        cls = supernet_class(space.family)
    except ConfigError:
        raise ConfigError(f"no supernet registered for family {space.family!r}; allowed: {family_names()}") from None
    return cls(space, **kwargs)


class Supernet(nn.Module):
    """An elastic network over a `SearchSpace`. `forward(x, config)` runs the subnet `config`
    (None = largest) on the shared weights; `extract(config)` returns it as a static module.

    The constructor takes the space and keyword arguments with defaults (the *spec*: what the
    data decides, e.g. classes and input channels); `spec()` returns them and checkpoints,
    profiles and the analytic counts carry them."""

    #: Registry name, set by `register_supernet`.
    family: ClassVar[str] = ""
    #: The family's `SearchSpace` subclass (its `config_type` is the family's config).
    space_type: ClassVar[type[SearchSpace]] = SearchSpace
    #: Default training recipe: epochs of `train_supernet` that reach the family's accuracy
    #: targets on the embedded digits data.
    default_epochs: ClassVar[int] = 10

    space: SearchSpace

    def resolve(self, config: SubnetConfig | None) -> SubnetConfig:
        return self.space.largest() if config is None else self.space.validate(config)

    # --- spec and data -----------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """Constructor arguments beyond the space (saved in checkpoints)."""
        raise NotImplementedError

    @classmethod
    def default_spec(cls) -> dict[str, Any]:
        """The spec of a supernet built without arguments: the constructor's defaults."""
        params = inspect.signature(cls.__init__).parameters
        return {k: p.default for k, p in params.items()
                if k not in ("self", "space") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

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
        """Shape of the input tensor the subnet `config` takes (after `prepare_input`)."""
        raise NotImplementedError

    def input_specs(self, config: SubnetConfig | None = None, batch: int = 1) -> tuple[InputSpec, ...]:
        """The typed inputs of `extract(config)`'s `forward`, in order (see `nestnas.supernet.inputs`):
        by default one float32 tensor named ``input`` of `input_shape(config, batch)`."""
        return (InputSpec("input", self.input_shape(config, batch)),)

    def prepare_input(self, x: torch.Tensor, config: SubnetConfig | None = None) -> torch.Tensor:
        """Bring a batch from the data set to the shape `config` takes (e.g. its resolution)."""
        return x

    # --- the model -----------------------------------------------------------------------------
    def extract(self, config: SubnetConfig | None = None) -> nn.Module:
        """The subnet as a static `torch.nn` module in eval mode, weights copied, computing the
        same function as ``self(x, config)``."""
        raise NotImplementedError

    def sort_channels(self) -> Supernet:
        """Reorder channels/heads by importance so that nested slices keep the most important
        ones. The largest network's function is unchanged."""
        raise NotImplementedError

    # --- analytic cost (see `nestnas.predictors.macs` for the counting convention) ----------------
    @classmethod
    def count_macs(cls, space: SearchSpace, config: SubnetConfig, spec: dict[str, int]) -> tuple[int, int]:
        """(MACs per sample, parameters) of the canonical, validated `config` built with the
        full `spec`, without building it; must equal the counts of `extract(config)` exactly."""
        raise NotImplementedError

    @classmethod
    def count_macs_encoded(cls, space: SearchSpace, X: np.ndarray,
                           spec: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
        """`count_macs` of every row of the checked index matrix `X`, as two int64 arrays. This
        default decodes row by row; a family with large searches overrides it with table lookups."""
        counts = [cls.count_macs(space, space.canonical(space.decode(row)), spec) for row in X]
        arr = np.array(counts, dtype=np.int64).reshape(len(counts), 2)
        return arr[:, 0], arr[:, 1]

    # --- measurable parts (the latency lookup table) ------------------------------------------
    @classmethod
    def parts(cls, space: SearchSpace, config: SubnetConfig, spec: dict[str, Any]) -> list[Part]:
        """The parts of the subnet `config` (built with `spec`) in network order, computed from
        the space and spec alone (no module is built), so that predictors can look them up."""
        raise NotImplementedError

    def all_parts(self) -> dict[str, Any]:
        """Every distinct part (key -> recipe) of every subnet of the space, enumerated per slot
        rather than per subnet, so that a table of them covers configs never profiled whole."""
        raise NotImplementedError

    def build_part(self, recipe: Any, batch: int) -> tuple[nn.Module, tuple[int, ...]]:
        """A static eval-mode module for one part (a recipe from `parts` or `all_parts`), with
        this net's weights, and the shape of its input at `batch`."""
        raise NotImplementedError

    def _check_input(self, x: torch.Tensor, config: SubnetConfig) -> None:
        expected = self.input_shape(config, batch=x.shape[0] if x.dim() else 1)
        if tuple(x.shape) != expected:
            raise ConfigError(
                f"input of shape {tuple(x.shape)} does not fit this subnet (expected {expected}); "
                "use net.prepare_input(x, config)"
            )
