"""Supernet checkpoints: one safetensors file. Its tensors are the weights (under their state-dict
names) and the training state's tensors (optimiser moments, step counts); everything else (space,
constructor spec, training options, history, optimiser scalars, data record) is JSON in the
file's metadata. Nothing is ever unpickled: a checkpoint written by an older nestnas with
`torch.save` is still read, with `weights_only=True`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Mapping, Optional

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, InstanceOf, JsonValue

from nestnas.errors import CheckpointError, ConfigError
from nestnas.fileio import parse_json, validate, write_bytes
from nestnas.supernet.base import Supernet, build_supernet
from nestnas.supernet.families import supernet_class
from nestnas.supernet.space import SearchSpace

FORMAT = "nestnas.supernet"
VERSION = 2  # safetensors; version 1 was a torch.save file (still read)
_LEGACY_VERSION = 1
_METADATA_KEY = "nestnas"  # the JSON document in the safetensors metadata (str -> str)


class DataRecordSchema(BaseModel):
    """What a checkpoint keeps of the data it was trained on (`Data.record()`)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    spec: Optional[str]  # None: datasets given in Python
    seed: Annotated[int, Field(ge=0)]  # of the train/validation split
    sample_shape: list[Annotated[int, Field(ge=1)]]
    num_classes: Annotated[int, Field(ge=2)]
    fingerprint: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    classes: Optional[list[str]] = None


class CheckpointSchema(BaseModel):
    """What `save_checkpoint` writes; the training state's own schema is `train.TrainStateSchema`.
    The spec's values are any JSON; those whose constructor default is an integer are checked to
    be integers (`spec_problem`)."""

    model_config = ConfigDict(strict=True)
    space: dict[str, Any]
    spec: dict[str, JsonValue]  # the supernet's constructor arguments
    model: dict[str, InstanceOf[torch.Tensor]]
    train: Optional[dict[str, Any]] = None
    data: Optional[DataRecordSchema] = None  # absent in checkpoints written before data specs


# --- the spec: constructor arguments, JSON values -------------------------------------------
def spec_problem(family: type[Supernet], spec: Mapping[str, Any], max_int: int | None = None,
                 unknown: bool = True) -> tuple[str, str] | None:
    """The first field of `spec` that does not fit `family`'s constructor, as (field, reason), or
    None. Only fields whose default is an integer are typed: they must be integers (not bool),
    at least 1 where the default is (a count: classes, channels, tokens) and at most `max_int`;
    other fields take any JSON value. With `unknown`, a field the constructor lacks is one."""
    defaults = family.default_spec()
    for name, value in spec.items():
        if name not in defaults:
            if unknown:
                return name, f"unknown field for family {family.family!r}; allowed: {sorted(defaults)}"
            continue
        default = defaults[name]
        if isinstance(default, bool) or not isinstance(default, int):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            return name, "expected an integer"
        if default >= 1 and value < 1:
            return name, "expected a positive integer"
        if max_int is not None and value > max_int:
            return name, f"expected at most {max_int}"
    return None


def check_spec(family: type[Supernet], spec: Mapping[str, Any]) -> dict[str, Any]:
    """`spec` completed with the constructor's defaults, numpy integers made `int`; `ConfigError`
    naming the field that does not fit (`spec_problem`)."""
    problem = spec_problem(family, spec)
    if problem is not None:
        name, reason = problem
        raise ConfigError(f"spec field {name!r}: {reason}, got {spec[name]!r:.60}")
    out = {**family.default_spec(), **spec}
    return {k: int(v) if isinstance(v, np.integer) else v for k, v in out.items()}


def _family_of(space: Any) -> type[Supernet] | None:
    try:
        return supernet_class(space.get("family")) if isinstance(space, dict) else None
    except ConfigError:
        return None  # reported when the space is built


# --- encoding: tensors to safetensors, the rest to JSON -------------------------------------
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_MARKERS = {_TENSOR, _TUPLE, _ITEMS}


def _encode(value: Any, where: str, tensors: dict[str, torch.Tensor], seen: set[int]) -> Any:
    """`value` as JSON, each tensor replaced by ``{"__tensor__": name}`` (stored in `tensors`),
    tuples and dicts with keys other than strings (an optimiser's parameter ids) tagged so that
    decoding gives back the same Python structure."""
    if isinstance(value, torch.Tensor):
        name = where
        while name in tensors:
            name += "'"
        tensor = value.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if tensor.numel() and (ptr in seen or tensor.untyped_storage().nbytes() != tensor.nbytes):
            tensor = tensor.clone()  # safetensors stores no shared or partial storage (tied weights, views)
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
        return {_TENSOR: name}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not _MARKERS & set(value):
            return {k: _encode(v, f"{where}/{k}", tensors, seen) for k, v in value.items()}
        return {_ITEMS: [[_encode(k, f"{where}/{k}", tensors, seen), _encode(v, f"{where}/{k}", tensors, seen)]
                         for k, v in value.items()]}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, f"{where}/{i}", tensors, seen) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{where}/{i}", tensors, seen) for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a checkpoint cannot store {type(value).__name__} (at {where or 'the top'})")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and _TENSOR in value:
        name = value[_TENSOR]
        if not isinstance(name, str) or name not in tensors:
            raise ValueError(f"names a tensor {name!r:.60} the file does not hold")
        return tensors[name]
    if len(value) == 1 and _TUPLE in value and isinstance(value[_TUPLE], list):
        return tuple(_decode(v, tensors) for v in value[_TUPLE])
    if len(value) == 1 and _ITEMS in value and isinstance(value[_ITEMS], list):
        items = value[_ITEMS]
        if not all(isinstance(p, list) and len(p) == 2 for p in items):
            raise ValueError("holds a tagged mapping that is not a list of pairs")
        return {_decode(k, tensors): _decode(v, tensors) for k, v in items}
    return {k: _decode(v, tensors) for k, v in value.items()}


def write_payload(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write a checkpoint payload (nested dicts, lists, tuples, scalars and tensors) atomically as
    safetensors: the weights of ``payload["model"]`` under their own names, other tensors under
    their path in the payload, and the rest as JSON metadata."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    doc = {}
    tags = {"format": FORMAT, "version": str(VERSION)}  # a payload's own (read back, or mutated in a test) win
    for key, value in payload.items():
        if key in tags:
            tags[key] = value if isinstance(value, str) else json.dumps(value)
        elif key == "model" and isinstance(value, dict):  # weights under their state-dict names
            doc[key] = {name: _encode(t, name, tensors, seen) for name, t in value.items()}
        else:
            doc[key] = _encode(value, f"#{key}", tensors, seen)
    text = json.dumps(doc, allow_nan=True, separators=(",", ":"))
    write_bytes(path, save(tensors, metadata={**tags, _METADATA_KEY: text}))


def read_payload(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded payload of the checkpoint at `path` (safetensors, or an older nestnas's
    `torch.save` file read with ``weights_only=True``), checked for format and version only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc.strerror or exc}") from None
    # safetensors: an 8-byte header length, then the JSON header; torch.save: a zip (or a bare pickle)
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[8:9] != b"{"):
        return _read_legacy(path)
    if len(head) < 9 or head[8:9] != b"{":
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or _METADATA_KEY not in meta:
                raise CheckpointError(f"{path} is not a nestnas supernet checkpoint")
            if meta.get("version") != str(VERSION):
                raise CheckpointError(f"checkpoint {path} has version {meta.get('version')!r}; this nestnas reads "
                                      f"version {VERSION}")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 -- safetensors raises its own error type for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file ({type(exc).__name__}: "
                              f"{(str(exc).splitlines() or [''])[0][:80]})") from None
    try:
        document = parse_json(meta[_METADATA_KEY])
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: its metadata is not JSON "
                              f"({str(exc).splitlines()[0][:80]})") from None
    try:
        payload = _decode(document, tensors)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: its metadata {str(exc).splitlines()[0][:80]}") from None
    except RecursionError:
        raise CheckpointError(f"checkpoint {path} is corrupt: its metadata is nested too deeply to read") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} is corrupt: its metadata is not a JSON object")
    return {**payload, "format": FORMAT, "version": VERSION}


def _read_legacy(path: Path) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- torch raises many types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a nestnas supernet checkpoint")
    if payload.get("version") != _LEGACY_VERSION:
        raise CheckpointError(f"checkpoint {path} has version {payload.get('version')!r}; this nestnas reads "
                              f"version {VERSION} (and {_LEGACY_VERSION}, written with torch.save)")
    return payload


# --- the public functions ---------------------------------------------------------------------
def save_checkpoint(net: Supernet, path: str | os.PathLike, train_state: dict[str, Any] | None = None,
                    data: Any = None) -> None:
    """Write `net` (its space, constructor spec and weights), optional training state and the
    record of the data it was trained on (a `nestnas.data.Data` or its `record()`) atomically."""
    try:  # the spec as the file gives it back (tuples become lists): what a resumed profile compares
        spec = json.loads(json.dumps(net.spec()))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"supernet spec of family {net.family!r} is not JSON: {exc}") from None
    payload = {"space": net.space.to_dict(), "spec": spec, "model": net.state_dict(), "train": train_state}
    if data is not None:
        payload["data"] = data if isinstance(data, dict) else data.record()
    write_payload(path, payload)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint payload, checked for format, version and schema."""
    payload = read_payload(path)
    validate(payload, CheckpointSchema, path, "checkpoint", CheckpointError)
    family = _family_of(payload["space"])
    problem = family and spec_problem(family, payload["spec"], unknown=False)
    if problem:
        name, reason = problem
        raise CheckpointError(f"checkpoint {path}: field spec.{name}: {reason} (got {payload['spec'][name]!r:.60})")
    return payload


def checkpoint_data(path: str | os.PathLike) -> dict[str, Any] | None:
    """The record of the data the checkpoint's supernet was trained on (None if not recorded)."""
    return read_checkpoint(path).get("data")


def load_supernet(path: str | os.PathLike) -> Supernet:
    """Rebuild the supernet saved at `path` (eval mode)."""
    payload = read_checkpoint(path)
    try:
        space = SearchSpace.from_dict(payload["space"])
        net = build_supernet(space, **payload["spec"])
        net.load_state_dict(payload["model"])
    except (ConfigError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} does not describe a valid supernet: "
                              f"{str(exc).splitlines()[0]}") from None
    return net.eval()
