"""Search spaces: the choices a supernet offers, and everything done with configs over them.

A `SearchSpace` creates, validates, samples, encodes and decodes `SubnetConfig`s. Its integer
encoding (one variable per choice, value = index into that choice's sorted options) is what
pymoo and the predictors see; `decode(encode(c)) == c` for every config in the space.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np

from nestnas.errors import ConfigError
from nestnas.supernet.config import SubnetConfig
from nestnas.supernet.families import family_names, space_class


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of `divisor`, never dropping below 90% of it
    (the MobileNet rule, so that width multipliers give hardware-friendly sizes)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


def _short_hash(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_choices(name: str, values: Sequence, positive: bool = True) -> None:
    if len(values) == 0:
        raise ConfigError(f"search space field {name!r}: needs at least one choice")
    if list(values) != sorted(set(values)):
        raise ConfigError(f"search space field {name!r}: choices must be unique and ascending, got {list(values)}")
    if positive and min(values) <= 0:
        raise ConfigError(f"search space field {name!r}: choices must be positive, got {list(values)}")


@dataclass(frozen=True)
class Variable:
    """One integer-encoded decision: its dotted name in the config (for messages only) and its
    sorted options, and where it sits, for the predictors' features: a choice that belongs to
    slot `slot` of stage `stage` is active only while that stage's depth variable (the one with
    ``depth=True`` and the same `stage`) is greater than `slot`. Global choices leave both None."""

    name: str
    options: tuple
    stage: int | None = None
    slot: int | None = None
    depth: bool = False


@dataclass(frozen=True)
class SearchSpace:
    """Base of the per-family spaces. Build one with `SearchSpace.for_family(name)`,
    `SearchSpace.mobilenet()` or `SearchSpace.transformer()`, or with a family's dataclass
    constructor directly. A family fills the hooks below; the rest is generic."""

    family: ClassVar[str] = ""
    config_type: ClassVar[type[SubnetConfig]] = SubnetConfig

    # --- constructors -------------------------------------------------------------------
    @staticmethod
    def mobilenet(**kwargs) -> SearchSpace:
        return SearchSpace.for_family("cnn", **kwargs)

    @staticmethod
    def transformer(**kwargs) -> SearchSpace:
        return SearchSpace.for_family("transformer", **kwargs)

    @staticmethod
    def for_family(family: str, **kwargs) -> SearchSpace:
        cls = space_class(family)
        if cls is None:
            raise ConfigError(f"unknown supernet family {family!r}; allowed: {family_names()}")
        return cls(**kwargs)

    # --- family hooks ---------------------------------------------------------------------
    def variables(self) -> tuple[Variable, ...]:
        """The encoded decisions, in encoding order, with their structure (stage, slot, depth)."""
        raise NotImplementedError

    def _flatten(self, config) -> list:
        """Values of `config` in `variables()` order (shape already checked)."""
        raise NotImplementedError

    def _build(self, values: list) -> SubnetConfig:
        raise NotImplementedError

    def _check_shape(self, config) -> None:
        raise NotImplementedError

    def canonical(self, config: SubnetConfig) -> SubnetConfig:
        """The representative of `config`'s class of functionally equivalent configs."""
        raise NotImplementedError

    def size(self) -> int:
        """Number of functionally distinct configs (distinct canonical forms)."""
        raise NotImplementedError

    def option_values(self, X: np.ndarray) -> np.ndarray:
        """(n, n_var) float option value of every choice of the encoded configs `X` (a kernel
        of 7 is 7, not its index), as the predictors see it. A family whose canonical form
        changes a value (e.g. an effective kernel size) overrides this to show that value."""
        variables = self.variables()
        return np.stack([np.asarray(v.options, dtype=np.float64)[X[:, j]] for j, v in enumerate(variables)], 1)

    # --- generic machinery ----------------------------------------------------------------
    @property
    def n_var(self) -> int:
        return len(self.variables())

    def upper_bounds(self) -> np.ndarray:
        """Largest index of each encoded variable (lower bounds are all 0)."""
        return np.array([len(v.options) - 1 for v in self.variables()], dtype=np.int64)

    def validate(self, config: SubnetConfig) -> SubnetConfig:
        """Return `config` if it lies in this space, else raise `ConfigError` naming the field,
        the bad value and the allowed values."""
        if not isinstance(config, self.config_type):
            raise ConfigError(
                f"config of family {getattr(config, 'family', type(config).__name__)!r} "
                f"does not belong to a {self.family!r} search space"
            )
        self._check_shape(config)
        for var, value in zip(self.variables(), self._flatten(config)):
            if value not in var.options:
                raise ConfigError(f"config field {var.name!r}: value {value!r} not allowed; "
                                  f"allowed: {list(var.options)}")
        return config

    def parse(self, data: dict | str) -> SubnetConfig:
        """Parse a config from a dict or JSON text and validate it against this space."""
        config = SubnetConfig.from_json(data) if isinstance(data, str) else SubnetConfig.from_dict(data)
        return self.validate(config)

    def encode(self, config: SubnetConfig) -> np.ndarray:
        self.validate(config)
        return np.array(
            [var.options.index(v) for var, v in zip(self.variables(), self._flatten(config))], dtype=np.int64
        )

    def decode(self, vector: Sequence[int]) -> SubnetConfig:
        variables = self.variables()
        vec = np.asarray(vector)
        if vec.shape != (len(variables),):
            raise ConfigError(f"encoded config must have shape ({len(variables)},), got {vec.shape}")
        values = []
        for var, idx in zip(variables, vec.tolist()):
            if not (isinstance(idx, int) and 0 <= idx < len(var.options)):
                raise ConfigError(
                    f"encoded variable {var.name!r}: index {idx!r} out of range 0..{len(var.options) - 1}"
                )
            values.append(var.options[idx])
        return self._build(values)

    def sample(self, rng: np.random.Generator | int | None = None) -> SubnetConfig:
        """A config with every choice drawn uniformly (not canonicalised)."""
        rng = np.random.default_rng(rng)
        return self.decode([int(rng.integers(len(v.options))) for v in self.variables()])

    def largest(self) -> SubnetConfig:
        return self.decode(self.upper_bounds())

    def smallest(self) -> SubnetConfig:
        return self.decode(np.zeros(self.n_var, dtype=np.int64))

    def ladder(self, n: int) -> list[SubnetConfig]:
        """`n` distinct nested configs from smallest to largest: the sorted sub-network sequence
        of SortedNet. Along a chain that raises one choice at a time, round-robin over the
        variables, every rung is at least as large as the one before in every choice."""
        top = self.upper_bounds()
        steps = int(top.sum())
        if not 2 <= n <= steps + 1:
            raise ConfigError(f"a ladder of this space has 2 to {steps + 1} rungs, got {n}")
        chain, cur = [top * 0], top * 0
        while len(chain) <= steps:
            for i in range(len(top)):
                if cur[i] < top[i]:
                    cur = cur.copy()
                    cur[i] += 1
                    chain.append(cur)
        return [self.decode(chain[int(p)]) for p in np.linspace(0, steps, n).round()]

    def config_hash(self, config: SubnetConfig) -> str:
        """Stable hash (same across processes and machines) of the canonical form."""
        return _short_hash(self.canonical(self.validate(config)).to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, **_jsonable(dataclasses.asdict(self))}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> SearchSpace:
        cls = space_class(data.get("family")) if isinstance(data, dict) else None
        if cls is None:
            raise ConfigError(f"not a search space description (family must be one of {family_names()})")
        return cls._from_fields({k: v for k, v in data.items() if k != "family"})

    @classmethod
    def _from_fields(cls, fields: dict[str, Any]) -> SearchSpace:
        return cls(**{k: _tuplify(v) for k, v in fields.items()})

    def fingerprint(self) -> str:
        """Stable hash of the space description: profiles, fronts and checkpoints carry it."""
        return _short_hash(self.to_dict())


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _tuplify(value):
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


def __getattr__(name: str):
    # The built-in families' spaces live in their family modules; these names stay importable.
    if name in ("CNNSpace", "StageSpec", "TransformerSpace"):
        from nestnas.supernet import cnn, transformer

        return getattr(transformer if name == "TransformerSpace" else cnn, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
