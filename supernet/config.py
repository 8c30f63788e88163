"""`SubnetConfig`: the one currency passed between every part of nestnas.

A config is frozen data: hashable, comparable, and JSON round-trips exactly. Each supernet
family has its own subclass; `SubnetConfig.from_dict` dispatches on the ``family`` key.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from nestnas.errors import ConfigError

_CONFIG_TYPES: dict[str, type[SubnetConfig]] = {}


def _register(cls):
    _CONFIG_TYPES[cls.family] = cls
    return cls


def _as_int(field: str, value: Any) -> int:
    # bool is an int subclass, but `true` is never a valid depth or width
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config field {field!r}: expected an integer, got {value!r}")
    return value


def _as_float(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config field {field!r}: expected a number, got {value!r}")
    return float(value)


def _as_tuple(field: str, value: Any, item) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"config field {field!r}: expected a list, got {value!r}")
    return tuple(item(f"{field}[{i}]", v) for i, v in enumerate(value))


@dataclass(frozen=True)
class SubnetConfig:
    """Base of the per-family configs. Use `SubnetConfig.from_dict` / `from_json` to parse."""

    family: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"family": self.family}
        for f in dataclasses.fields(self):
            out[f.name] = _to_jsonable(getattr(self, f.name))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_dict(data: Any) -> SubnetConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        family = data.get("family")
        if family not in _CONFIG_TYPES:
            raise ConfigError(
                f"config field 'family': unknown value {family!r}; allowed: {sorted(_CONFIG_TYPES)}"
            )
        cls = _CONFIG_TYPES[family]
        names = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(data) - names - {"family"})
        if extra:
            raise ConfigError(f"config has unknown field(s) {extra} for family {family!r}; allowed: {sorted(names)}")
        missing = sorted(names - set(data))
        if missing:
            raise ConfigError(f"config for family {family!r} is missing field(s) {missing}")
        return cls._parse(data)

    @staticmethod
    def from_json(text: str) -> SubnetConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"malformed config JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        return SubnetConfig.from_dict(data)

    @classmethod
    def _parse(cls, data: dict[str, Any]) -> SubnetConfig:
        raise NotImplementedError


def _to_jsonable(value):
    if isinstance(value, tuple):
        return [_to_jsonable(v) for v in value]
    return value


@_register
@dataclass(frozen=True)
class CNNConfig(SubnetConfig):
    """A MobileNetV3-style subnet: input resolution, width multiplier, depth per stage, and
    kernel size and expand ratio per block slot (``kernel_sizes[stage][block]``)."""

    family: ClassVar[str] = "cnn"
    resolution: int
    width_mult: float
    depths: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    expand_ratios: tuple[tuple[int, ...], ...]

    @classmethod
    def _parse(cls, data):
        def nested(field, value):
            return _as_tuple(field, value, lambda f, v: _as_tuple(f, v, _as_int))

        return cls(
            resolution=_as_int("resolution", data["resolution"]),
            width_mult=_as_float("width_mult", data["width_mult"]),
            depths=_as_tuple("depths", data["depths"], _as_int),
            kernel_sizes=nested("kernel_sizes", data["kernel_sizes"]),
            expand_ratios=nested("expand_ratios", data["expand_ratios"]),
        )


@_register
@dataclass(frozen=True)
class TransformerConfig(SubnetConfig):
    """A ViT/BERT-style encoder subnet: number of layers, embedding width, and heads and MLP
    ratio per layer slot."""

    family: ClassVar[str] = "transformer"
    depth: int
    embed_dim: int
    num_heads: tuple[int, ...]
    mlp_ratios: tuple[float, ...]

    @classmethod
    def _parse(cls, data):
        return cls(
            depth=_as_int("depth", data["depth"]),
            embed_dim=_as_int("embed_dim", data["embed_dim"]),
            num_heads=_as_tuple("num_heads", data["num_heads"], _as_int),
            mlp_ratios=_as_tuple("mlp_ratios", data["mlp_ratios"], _as_float),
        )
