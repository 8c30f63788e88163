"""Search spaces: the choices a supernet offers, and everything done with configs over them.

A `SearchSpace` creates, validates, samples, encodes and decodes `SubnetConfig`s. Its integer
encoding (one variable per choice, value = index into that choice's sorted options) is what
pymoo and the predictors see; `decode(encode(c)) == c` for every config in the space.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np

from nestnas.errors import ConfigError
from nestnas.supernet.config import CNNConfig, SubnetConfig, TransformerConfig

_SPACE_TYPES: dict[str, type[SearchSpace]] = {}


def _register(cls):
    _SPACE_TYPES[cls.family] = cls
    return cls


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
    """One integer-encoded decision: its dotted name in the config and its sorted options."""

    name: str
    options: tuple


@dataclass(frozen=True)
class SearchSpace:
    """Base of the per-family spaces. Build one with `SearchSpace.mobilenet()` or
    `SearchSpace.transformer()`, or with the dataclass constructors directly."""

    family: ClassVar[str] = ""
    config_type: ClassVar[type[SubnetConfig]] = SubnetConfig

    # --- constructors -------------------------------------------------------------------
    @staticmethod
    def mobilenet(**kwargs) -> CNNSpace:
        return CNNSpace(**kwargs)

    @staticmethod
    def transformer(**kwargs) -> TransformerSpace:
        return TransformerSpace(**kwargs)

    @staticmethod
    def for_family(family: str, **kwargs) -> SearchSpace:
        if family not in _SPACE_TYPES:
            raise ConfigError(f"unknown supernet family {family!r}; allowed: {sorted(_SPACE_TYPES)}")
        return _SPACE_TYPES[family](**kwargs)

    # --- family hooks ---------------------------------------------------------------------
    def variables(self) -> tuple[Variable, ...]:
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
                raise ConfigError(f"config field {var.name!r}: value {value!r} not allowed; allowed: {list(var.options)}")
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
        if not isinstance(data, dict) or data.get("family") not in _SPACE_TYPES:
            raise ConfigError(f"not a search space description (family must be one of {sorted(_SPACE_TYPES)})")
        return _SPACE_TYPES[data["family"]]._from_fields({k: v for k, v in data.items() if k != "family"})

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


@dataclass(frozen=True)
class StageSpec:
    """One stage of the CNN: base output channels (at width 1.0), stride of its first block,
    and the depths it may take."""

    channels: int
    stride: int
    depth_choices: tuple[int, ...]

    @property
    def max_depth(self) -> int:
        return self.depth_choices[-1]


def _default_stages() -> tuple[StageSpec, ...]:
    return (
        StageSpec(16, 1, (1, 2, 3)),
        StageSpec(24, 2, (1, 2, 3)),
        StageSpec(40, 2, (1, 2, 3)),
        StageSpec(64, 1, (1, 2, 3)),
    )


@_register
@dataclass(frozen=True)
class CNNSpace(SearchSpace):
    """MobileNetV3-style space: inverted-residual blocks with elastic depth per stage, kernel
    size and expand ratio per block, a global width multiplier and input resolution."""

    family: ClassVar[str] = "cnn"
    config_type: ClassVar[type[SubnetConfig]] = CNNConfig

    stages: tuple[StageSpec, ...] = dataclasses.field(default_factory=_default_stages)
    kernel_choices: tuple[int, ...] = (3, 5, 7)
    expand_choices: tuple[int, ...] = (3, 4, 6)
    width_choices: tuple[float, ...] = (0.5, 0.75, 1.0)
    resolution_choices: tuple[int, ...] = (16, 24, 32)
    stem_channels: int = 16
    stem_stride: int = 2
    head_channels: int = 128
    channel_divisor: int = 8

    def __post_init__(self):
        stages = tuple(s if isinstance(s, StageSpec) else StageSpec(*s) for s in self.stages)
        object.__setattr__(self, "stages", stages)
        if not stages:
            raise ConfigError("search space field 'stages': needs at least one stage")
        for i, st in enumerate(stages):
            _check_choices(f"stages[{i}].depth_choices", st.depth_choices)
            if st.stride not in (1, 2) or st.channels <= 0:
                raise ConfigError(f"search space field 'stages[{i}]': stride must be 1 or 2 and channels positive")
        _check_choices("kernel_choices", self.kernel_choices)
        if any(k % 2 == 0 for k in self.kernel_choices):
            raise ConfigError(f"search space field 'kernel_choices': kernel sizes must be odd, got {list(self.kernel_choices)}")
        _check_choices("expand_choices", self.expand_choices)
        _check_choices("width_choices", self.width_choices)
        _check_choices("resolution_choices", self.resolution_choices)

    @classmethod
    def _from_fields(cls, fields):
        fields = {k: _tuplify(v) for k, v in fields.items()}
        fields["stages"] = tuple(StageSpec(s["channels"], s["stride"], tuple(s["depth_choices"]))
                                 if isinstance(s, dict) else StageSpec(*s) for s in fields.get("stages", ()))
        return cls(**fields)

    # --- derived architecture ---------------------------------------------------------------
    def channels(self, width_mult: float) -> tuple[int, tuple[int, ...], int]:
        """(stem, per-stage, head) channel counts at a width multiplier."""
        d = self.channel_divisor
        return (
            make_divisible(self.stem_channels * width_mult, d),
            tuple(make_divisible(s.channels * width_mult, d) for s in self.stages),
            make_divisible(self.head_channels * width_mult, d),
        )

    def hidden_channels(self, in_channels: int, expand_ratio: int) -> int:
        return make_divisible(in_channels * expand_ratio, self.channel_divisor)

    def block_input_sizes(self, resolution: int) -> list[list[int]]:
        """Spatial size of the feature map entering each block slot (``[stage][block]``)."""
        size = (resolution - 1) // self.stem_stride + 1
        out = []
        for st in self.stages:
            sizes = [size]
            size = (size - 1) // st.stride + 1
            sizes += [size] * (st.max_depth - 1)
            out.append(sizes)
        return out

    def effective_kernel(self, kernel: int, feature_size: int) -> int:
        """Smallest kernel choice that computes the same function as `kernel` on a
        `feature_size` map: with zero padding, taps farther than ``size - 1`` from the centre
        only ever see padding, and centre-cropped (nested) kernels share their inner taps."""
        reach = 2 * feature_size - 1
        if kernel <= reach:
            return kernel
        return min(k for k in self.kernel_choices if k >= reach)

    # --- hooks ----------------------------------------------------------------------------
    @functools.lru_cache(maxsize=64)  # noqa: B019 (spaces are frozen, few and long-lived)
    def variables(self):
        out = [Variable("resolution", self.resolution_choices), Variable("width_mult", self.width_choices)]
        out += [Variable(f"depths[{i}]", st.depth_choices) for i, st in enumerate(self.stages)]
        for i, st in enumerate(self.stages):
            for b in range(st.max_depth):
                out.append(Variable(f"kernel_sizes[{i}][{b}]", self.kernel_choices))
                out.append(Variable(f"expand_ratios[{i}][{b}]", self.expand_choices))
        return tuple(out)

    def _check_shape(self, config):
        n = len(self.stages)
        if len(config.depths) != n:
            raise ConfigError(f"config field 'depths': expected {n} stages, got {len(config.depths)}")
        for field in ("kernel_sizes", "expand_ratios"):
            per_stage = getattr(config, field)
            if len(per_stage) != n:
                raise ConfigError(f"config field {field!r}: expected {n} stages, got {len(per_stage)}")
            for i, st in enumerate(self.stages):
                if len(per_stage[i]) != st.max_depth:
                    raise ConfigError(
                        f"config field '{field}[{i}]': expected {st.max_depth} block slots, got {len(per_stage[i])}"
                    )

    def _flatten(self, config):
        out = [config.resolution, config.width_mult, *config.depths]
        for i in range(len(self.stages)):
            for k, e in zip(config.kernel_sizes[i], config.expand_ratios[i]):
                out += [k, e]
        return out

    def _build(self, values):
        n = len(self.stages)
        resolution, width, depths, rest = values[0], values[1], values[2 : 2 + n], values[2 + n :]
        kernels, expands, pos = [], [], 0
        for st in self.stages:
            chunk = rest[pos : pos + 2 * st.max_depth]
            pos += 2 * st.max_depth
            kernels.append(tuple(chunk[0::2]))
            expands.append(tuple(chunk[1::2]))
        return CNNConfig(resolution, float(width), tuple(depths), tuple(kernels), tuple(expands))

    def canonical(self, config):
        self.validate(config)
        sizes = self.block_input_sizes(config.resolution)
        kernels, expands = [], []
        for i, st in enumerate(self.stages):
            d = config.depths[i]
            kernels.append(tuple(
                self.effective_kernel(k, sizes[i][b]) if b < d else self.kernel_choices[0]
                for b, k in enumerate(config.kernel_sizes[i])
            ))
            expands.append(tuple(e if b < d else self.expand_choices[0] for b, e in enumerate(config.expand_ratios[i])))
        return dataclasses.replace(config, kernel_sizes=tuple(kernels), expand_ratios=tuple(expands))

    def size(self):
        total = 0
        n_expand = len(self.expand_choices)
        for res in self.resolution_choices:
            sizes = self.block_input_sizes(res)
            per_res = len(self.width_choices)
            for i, st in enumerate(self.stages):
                per_block = [len({self.effective_kernel(k, s) for k in self.kernel_choices}) * n_expand for s in sizes[i]]
                per_res *= sum(math.prod(per_block[:d]) for d in st.depth_choices)
            total += per_res
        return total


@_register
@dataclass(frozen=True)
class TransformerSpace(SearchSpace):
    """ViT/BERT-style encoder space: elastic depth, embedding width, and heads and MLP ratio
    per layer. Heads have a fixed width (`head_dim`), so fewer heads is a leading slice."""

    family: ClassVar[str] = "transformer"
    config_type: ClassVar[type[SubnetConfig]] = TransformerConfig

    depth_choices: tuple[int, ...] = (2, 3, 4)
    embed_choices: tuple[int, ...] = (32, 48, 64)
    head_choices: tuple[int, ...] = (2, 3, 4)
    mlp_ratio_choices: tuple[float, ...] = (2.0, 3.0, 4.0)
    head_dim: int = 16

    def __post_init__(self):
        _check_choices("depth_choices", self.depth_choices)
        _check_choices("embed_choices", self.embed_choices)
        _check_choices("head_choices", self.head_choices)
        _check_choices("mlp_ratio_choices", self.mlp_ratio_choices)
        object.__setattr__(self, "mlp_ratio_choices", tuple(float(r) for r in self.mlp_ratio_choices))
        if self.head_dim <= 0:
            raise ConfigError(f"search space field 'head_dim': must be positive, got {self.head_dim}")

    @property
    def max_depth(self) -> int:
        return self.depth_choices[-1]

    def mlp_hidden(self, embed_dim: int, ratio: float) -> int:
        return int(round(embed_dim * ratio))

    @functools.lru_cache(maxsize=64)  # noqa: B019 (spaces are frozen, few and long-lived)
    def variables(self):
        out = [Variable("depth", self.depth_choices), Variable("embed_dim", self.embed_choices)]
        for i in range(self.max_depth):
            out.append(Variable(f"num_heads[{i}]", self.head_choices))
            out.append(Variable(f"mlp_ratios[{i}]", self.mlp_ratio_choices))
        return tuple(out)

    def _check_shape(self, config):
        for field in ("num_heads", "mlp_ratios"):
            if len(getattr(config, field)) != self.max_depth:
                raise ConfigError(
                    f"config field {field!r}: expected {self.max_depth} layer slots, got {len(getattr(config, field))}"
                )

    def _flatten(self, config):
        out = [config.depth, config.embed_dim]
        for h, r in zip(config.num_heads, config.mlp_ratios):
            out += [h, r]
        return out

    def _build(self, values):
        return TransformerConfig(
            depth=values[0], embed_dim=values[1],
            num_heads=tuple(values[2::2]), mlp_ratios=tuple(float(r) for r in values[3::2]),
        )

    def canonical(self, config):
        self.validate(config)
        d = config.depth
        return dataclasses.replace(
            config,
            num_heads=tuple(h if i < d else self.head_choices[0] for i, h in enumerate(config.num_heads)),
            mlp_ratios=tuple(r if i < d else self.mlp_ratio_choices[0] for i, r in enumerate(config.mlp_ratios)),
        )

    def size(self):
        per_layer = len(self.head_choices) * len(self.mlp_ratio_choices)
        return len(self.embed_choices) * sum(per_layer**d for d in self.depth_choices)
