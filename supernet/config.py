"""`SubnetConfig`: the one currency passed between every part of nestnas.

A config is frozen data: hashable, comparable, and JSON round-trips exactly. Each supernet
family defines its own subclass in its family module; `SubnetConfig.from_dict` dispatches on the
``family`` key through the family registry.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from nestnas.errors import ConfigError
from nestnas.fileio import parse_json
from nestnas.supernet.families import config_class, family_names


def _name(field) -> str:
    # item names are built only for an error message: ("depths", 1) -> 'depths[1]'
    return field if isinstance(field, str) else f"{_name(field[0])}[{field[1]}]"


def _as_int(field, value: Any, exact: bool = True) -> int:
    # bool is an int subclass, but `true` is never a valid depth or width; numpy integers become
    # int so that equal configs hash and serialise equally. JSON (exact=False) may write 32.0.
    if type(value) is int:
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if not exact and isinstance(value, float) and value.is_integer():
        return int(value)
    raise ConfigError(f"config field {_name(field)!r}: expected an integer, got {value!r}")


def _as_float(field, value: Any, exact: bool = True) -> float:
    if type(value) is float and math.isfinite(value):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"config field {_name(field)!r}: expected a finite number, got {value!r}")
    return float(value)


def _as_tuple(field, value: Any, item, exact: bool = True) -> tuple:
    if not isinstance(value, (list, tuple)) and getattr(value, "ndim", 0) < 1:  # a numpy array is a list too
        raise ConfigError(f"config field {_name(field)!r}: expected a list, got {value!r}")
    return tuple([item((field, i), v, exact) for i, v in enumerate(value)])


def _is_ints(value) -> bool:  # the common case, already normal: checked without rebuilding
    return type(value) is tuple and all(type(v) is int for v in value)


def _ints(field, value: Any, exact: bool = True) -> tuple[int, ...]:
    return value if _is_ints(value) else _as_tuple(field, value, _as_int, exact)


def _floats(field, value: Any, exact: bool = True) -> tuple[float, ...]:
    if type(value) is tuple and all(type(v) is float and math.isfinite(v) for v in value):
        return value
    return _as_tuple(field, value, _as_float, exact)


def _nested_ints(field, value: Any, exact: bool = True) -> tuple[tuple[int, ...], ...]:
    if type(value) is tuple and all(_is_ints(v) for v in value):
        return value
    return _as_tuple(field, value, _ints, exact)


@dataclass(frozen=True)
class SubnetConfig:
    """Base of the per-family configs. Use `SubnetConfig.from_dict` / `from_json` to parse."""

    family: ClassVar[str] = ""
    # field -> normaliser(field, value, exact): checks the type and returns the canonical value
    _types: ClassVar[dict[str, Callable[..., Any]]] = {}
    # fields `summary` shows; None: the scalar ones
    summary_fields: ClassVar[tuple[str, ...] | None] = None

    def __post_init__(self):
        for name, normalise in self._types.items():
            object.__setattr__(self, name, normalise(name, getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"family": self.family}
        for f in dataclasses.fields(self):
            out[f.name] = _to_jsonable(getattr(self, f.name))
        return out

    def summary(self) -> str:
        """A short line naming the config's main choices (`summary_fields`: the family's own
        choice, or its scalar fields), e.g. for a front's table."""
        d = self.to_dict()
        names = self.summary_fields or [f.name for f in dataclasses.fields(self) if not isinstance(d[f.name], list)]
        return ", ".join(f"{k}={d[k]}" for k in names)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def from_dict(data: Any) -> SubnetConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        family = data.get("family")
        cls = config_class(family)  # a list is not even hashable: config_class checks for a str
        if cls is None:
            raise ConfigError(f"config field 'family': unknown value {family!r}; allowed: {family_names()}")
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
            data = parse_json(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"malformed config JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        except ValueError as exc:  # nested too deeply, a number too long
            raise ConfigError(f"malformed config JSON: {exc}") from None
        return SubnetConfig.from_dict(data)

    @classmethod
    def _parse(cls, data: dict[str, Any]) -> SubnetConfig:
        return cls(**{name: normalise(name, data[name], False) for name, normalise in cls._types.items()})


def _to_jsonable(value):
    if isinstance(value, tuple):
        return [_to_jsonable(v) for v in value]
    return value


# Normalisers a family's config declares in `_types` (field -> normaliser(field, value, exact)).
as_int, as_float, ints, floats, nested_ints = _as_int, _as_float, _ints, _floats, _nested_ints


def __getattr__(name: str):
    # The built-in families' configs live in their family modules; these names stay importable.
    if name in ("CNNConfig", "TransformerConfig"):
        from nestnas.supernet import cnn, transformer

        return getattr(cnn if name == "CNNConfig" else transformer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
