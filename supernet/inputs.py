"""Typed inputs of a subnet: what generic code (export, profiling, bundles) needs to make example
inputs for a network that takes more than one tensor, or tensors that are not float images.

A family describes its subnets' inputs with `Supernet.input_specs(config, batch)`: one
`InputSpec` per positional argument of `extract(config)`'s `forward`, in order. The default is
one float32 tensor named ``input`` of `input_shape(config, batch)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from nestnas.errors import ConfigError

#: dtypes an input may have (names as numpy and the manifests write them).
DTYPES = {"float32": torch.float32, "int64": torch.int64, "int32": torch.int32, "bool": torch.bool}


@dataclass(frozen=True)
class InputSpec:
    """One input: its name (the ONNX input name and the keyword of the model's own API), its
    shape with the batch first, its dtype, and for integer inputs the range ``[low, high)``
    example values are drawn from (token ids below the vocabulary size; ``low == high - 1`` for
    a constant, e.g. an attention mask of ones)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    low: int = 0
    high: int | None = None

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ConfigError(f"input name {self.name!r} must be an identifier")
        if self.dtype not in DTYPES:
            raise ConfigError(f"input {self.name!r}: dtype {self.dtype!r} is not one of {sorted(DTYPES)}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.dtype != "float32" and self.dtype != "bool" and (self.high is None or self.high <= self.low):
            raise ConfigError(f"input {self.name!r}: an integer input needs high > low, got [{self.low}, {self.high})")

    def example(self, generator: torch.Generator) -> torch.Tensor:
        """A random tensor of this spec (normal floats; integers uniform in [low, high))."""
        if self.dtype == "float32":
            return torch.randn(self.shape, generator=generator)
        if self.dtype == "bool":
            return torch.ones(self.shape, dtype=torch.bool)
        return torch.randint(self.low, self.high, self.shape, generator=generator, dtype=DTYPES[self.dtype])

    def with_batch(self, batch: int) -> InputSpec:
        return InputSpec(self.name, (batch, *self.shape[1:]), self.dtype, self.low, self.high)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "low": self.low, "high": self.high}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> InputSpec:
        return InputSpec(data["name"], tuple(data["shape"]), data.get("dtype", "float32"), data.get("low", 0),
                         data.get("high"))


def example_inputs(specs: Sequence[InputSpec], seed: int = 0) -> dict[str, torch.Tensor]:
    """One random tensor per spec, by name, in the specs' order (reproducible from `seed`)."""
    generator = torch.Generator().manual_seed(seed)
    return {s.name: s.example(generator) for s in specs}


def specs_of(inputs: dict[str, Any]) -> tuple[InputSpec, ...]:
    """Specs of concrete example inputs (a dict name -> tensor or array), e.g. those a user passes
    to `export`; integer ranges are taken from the values."""
    out = []
    for name, value in inputs.items():
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        dtype = str(array.dtype)
        if dtype not in DTYPES:
            raise ConfigError(f"example input {name!r}: dtype {dtype} is not one of {sorted(DTYPES)}")
        low, high = (0, None) if dtype in ("float32", "bool") else (int(array.min()), int(array.max()) + 1)
        out.append(InputSpec(name, array.shape, dtype, low, high))
    return tuple(out)
