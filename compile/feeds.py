"""Typed inputs of a built model: what a shape or a tuple of `InputSpec` means, and the checks that
turn what a caller hands a model (one array, or a dict of arrays by input name) into its feed.

A model of one float32 input named ``input`` is the classic case: it takes a bare array, cast to
float32 as before. Any other model (several inputs, or integer ones) takes a dict by input name
(a bare array too if it has exactly one input); a missing or unknown name, a dtype of another kind
(floats for token ids) or a wrong shape is one `ConfigError`. Integer inputs whose range is known
(`bounds`) are checked against ``[low, high)``: TVM's gathers have no bounds check, so an id past
the vocabulary would read outside the embedding table instead of failing.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from nestnas.compile.onnx_export import INPUT_NAME
from nestnas.errors import ConfigError
from nestnas.supernet.inputs import InputSpec

# numpy dtype kinds accepted for each input dtype (a safe cast follows): floats for floats,
# integers for integers, booleans for booleans.
_KINDS = {"float32": "f", "int64": "iu", "int32": "iu", "bool": "b"}
_WORDS = {"f": "floats", "iu": "integers", "b": "booleans"}


def as_specs(shape_or_specs: Any) -> tuple[InputSpec, ...]:
    """A tuple of `InputSpec` from a shape (one float32 input named ``input``), one `InputSpec`,
    or a sequence of them."""
    if isinstance(shape_or_specs, InputSpec):
        return (shape_or_specs,)
    items = tuple(shape_or_specs)
    if items and all(isinstance(s, InputSpec) for s in items):
        names = [s.name for s in items]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ConfigError(f"inputs: the name {dup!r} is given twice; each input needs its own name")
        return items
    if not items or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in items):
        raise ConfigError(f"input shape {shape_or_specs!r}: give positive integers (e.g. (1, 3, 32, 32)) "
                          "or a tuple of InputSpec")
    return (InputSpec(INPUT_NAME, tuple(int(d) for d in items)),)


def is_classic(specs: Sequence[InputSpec]) -> bool:
    """One float32 input named ``input``: the form bundles and models had before typed inputs."""
    return len(specs) == 1 and specs[0].name == INPUT_NAME and specs[0].dtype == "float32"


def describe(specs: Sequence[InputSpec]) -> str:
    return ", ".join(f"{s.name} ({s.dtype} {tuple(s.shape)})" for s in specs)


def declared_bounds(specs: Sequence[InputSpec]) -> dict[str, tuple[int, int]]:
    """The ``[low, high)`` of each integer input of declared specs, by name. A range of one value
    (``low == high - 1``) only says how examples are drawn (an attention mask of ones), not which
    values the model takes (a padded mask holds zeros too), so it bounds nothing."""
    return {s.name: (s.low, s.high) for s in specs
            if s.dtype in ("int64", "int32") and s.high is not None and s.high - s.low > 1}


def check_feed(specs: Sequence[InputSpec], x: Any, backend: str,
               bounds: Mapping[str, tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
    """`x` (an array, or a dict name -> array) as a dict of contiguous arrays of the specs' dtypes,
    in the specs' order, integer inputs within their `bounds` ``[low, high)``; a `ConfigError`
    naming the input and what the `backend` model takes otherwise."""
    what = f"this {backend} model"
    if not isinstance(x, dict):
        if len(specs) != 1:
            raise ConfigError(f"{what} takes {len(specs)} inputs, {describe(specs)}: give a dict of arrays by name")
        if is_classic(specs):  # as before typed inputs: any array castable to float32
            return {INPUT_NAME: _shaped(specs[0], np.ascontiguousarray(x, dtype=np.float32), what, classic=True)}
        x = {specs[0].name: x}
    names = [s.name for s in specs]
    missing = [n for n in names if n not in x]
    unknown = [n for n in x if n not in names]
    if missing or unknown:
        bad = f"input {missing[0]!r} is missing" if missing else f"unknown input {unknown[0]!r}"
        raise ConfigError(f"{bad}; {what} takes {describe(specs)}")
    return {s.name: _typed(s, x[s.name], what, (bounds or {}).get(s.name)) for s in specs}


def _typed(spec: InputSpec, value: Any, what: str, bound: tuple[int, int] | None) -> np.ndarray:
    array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    kinds = _KINDS[spec.dtype]
    if array.dtype.kind not in kinds:
        raise ConfigError(f"input {spec.name!r} holds {array.dtype} values; {what} takes {spec.dtype} "
                          f"({_WORDS[kinds]}) there")
    array = _shaped(spec, np.ascontiguousarray(array, dtype=spec.dtype), what)
    if bound is not None and array.size:
        lo, hi = int(array.min()), int(array.max())
        if lo < bound[0] or hi >= bound[1]:
            bad = lo if lo < bound[0] else hi
            raise ConfigError(f"input {spec.name!r} holds {bad}; {what} takes values in [{bound[0]}, {bound[1]}) "
                              "there")
    return array


def _shaped(spec: InputSpec, array: np.ndarray, what: str, classic: bool = False) -> np.ndarray:
    if array.shape != tuple(spec.shape):
        name = "" if classic else f" {spec.name!r}"  # single-input models keep their message
        raise ConfigError(f"input{name} of shape {array.shape} does not fit {what} (expected {tuple(spec.shape)}"
                          f"{'' if classic else '; shapes are static'})")
    return array
