"""`DeviceProfile`: latency measurements of subnets (and of single blocks) on one device and
backend, stored as JSON keyed by canonical config hash.

A profile names the space it was measured on and the model spec and batch size of its inputs;
predictors and searches refuse a profile of another space.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, JsonValue

from nestnas.compile.runners import Measurement
from nestnas.errors import ConfigError, ProfileError
from nestnas.fileio import read_document, validate, write_json
from nestnas.supernet.checkpoint import spec_problem
from nestnas.supernet.config import SubnetConfig
from nestnas.supernet.families import supernet_class
from nestnas.supernet.space import SearchSpace

SCHEMA_VERSION = 1
FORMAT = "nestnas.device_profile"


# --- the document's schema (checked on load; a record may carry fields added later) ----------
Milliseconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Statistic = Optional[Annotated[float, Field(ge=0, allow_inf_nan=False)]]  # None: too few samples
Count = Annotated[int, Field(ge=0)]


class PassSchema(BaseModel):
    """One measurement's statistics (`nestnas.compile.runners.Measurement.to_dict`)."""

    model_config = ConfigDict(strict=True, extra="allow")
    median_ms: Milliseconds
    p10_ms: Statistic
    p90_ms: Statistic
    cv: Statistic
    repeats: Count
    stable: bool
    rel_ci: Statistic = None
    attempts: Count = 1
    calls_per_sample: Annotated[int, Field(ge=1)] = 1


class BlockSchema(PassSchema):
    passes: list[PassSchema] = []


class MeasurementSchema(BlockSchema):
    config: dict[str, Any]
    timestamp: str = ""


class MetaSchema(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    passes: Annotated[int, Field(ge=1)] = 1
    subnet_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    block_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0


# A supernet's constructor sizes (classes, tokens, channels): far above any real one, and low
# enough that a wrong profile cannot make fitting allocate terabytes.
MAX_SPEC = 1 << 16


class ProfileSchema(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str
    created: str = ""
    fingerprint: dict[str, Any]
    space: dict[str, Any]
    # The supernet's constructor arguments: any JSON (a family may keep e.g. a model's configuration);
    # those whose default is an integer are checked on load to be integers in [1, MAX_SPEC].
    spec: dict[str, JsonValue]
    batch_size: Annotated[int, Field(ge=1)]
    meta: MetaSchema = MetaSchema()
    measurements: dict[str, MeasurementSchema]
    blocks: dict[str, BlockSchema] = {}


_MEASUREMENT_FIELDS = tuple(f.name for f in fields(Measurement))
# Fields a record written before them lacks (see PassSchema): what Measurement.from_dict needs.
_DEFAULTS = {"rel_ci": None, "attempts": 1, "calls_per_sample": 1}


@dataclass(frozen=True, eq=False)
class ProfileRecord(Mapping):
    """One profiled subnet or block: the summary `measurement` over its passes, each pass's own
    `Measurement`, and for a subnet its canonical `config` and `timestamp`. Stored on disk as
    the flat JSON record it always was (`to_dict` / `from_dict`, unknown fields kept in `extra`);
    read-only key access (``record["median_ms"]``) reads that record."""

    measurement: Measurement
    passes: tuple[Measurement, ...] | None = None  # None: written before passes were kept
    config: dict[str, Any] | None = None           # subnets only
    timestamp: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return self.measurement.median_ms

    @property
    def stable(self) -> bool:
        return self.measurement.stable

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {} if self.config is None else {"config": self.config}
        out.update(self.measurement.to_dict())
        if self.passes is not None:
            out["passes"] = [p.to_dict() for p in self.passes]
        if self.timestamp is not None:
            out["timestamp"] = self.timestamp
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProfileRecord:
        if isinstance(data, ProfileRecord):
            return data
        def measurement(d: Mapping[str, Any]) -> Measurement:
            return Measurement.from_dict({**_DEFAULTS, **{k: d[k] for k in _MEASUREMENT_FIELDS if k in d}})
        passes = data.get("passes")
        known = {*_MEASUREMENT_FIELDS, "passes", "config", "timestamp"}
        return cls(measurement(data), None if passes is None else tuple(measurement(p) for p in passes),
                   data.get("config"), data.get("timestamp"), {k: v for k, v in data.items() if k not in known})

    # --- read-only mapping over the stored record (code and tests that read records as dicts) ---
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self):
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_fingerprint() -> dict[str, Any]:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "os": platform.platform(), "machine": platform.machine(),
            "python": platform.python_version()}


@dataclass
class DeviceProfile:
    """Measurements of one device + backend. `measurements` maps a canonical config hash to a
    `ProfileRecord` (config, summary `Measurement` over passes, each pass's own, timestamp; see
    `merge_passes`); `blocks` maps a block key (see `nestnas.hw_profiles.blocks`) to the same
    without a config. Records given as dicts (their `to_dict()` form) are converted."""

    name: str
    fingerprint: dict[str, Any]
    space: dict[str, Any]
    spec: dict[str, Any]
    batch_size: int
    measurements: dict[str, ProfileRecord] = field(default_factory=dict)
    blocks: dict[str, ProfileRecord] = field(default_factory=dict)
    created: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.measurements = {k: ProfileRecord.from_dict(r) for k, r in self.measurements.items()}
        self.blocks = {k: ProfileRecord.from_dict(r) for k, r in self.blocks.items()}

    @property
    def backend(self) -> str:
        return self.fingerprint.get("backend", "?")

    @property
    def complete(self) -> bool:
        """False while a profiling run is going, or after one stopped at its time budget (a profile
        from before budgets has no flag and is complete)."""
        return self.meta.get("complete", True) is not False

    @property
    def family(self) -> str:
        return self.space.get("family", "?")

    def search_space(self) -> SearchSpace:
        return SearchSpace.from_dict(self.space)

    def check_space(self, space: SearchSpace, where: str = "profile") -> None:
        if space.to_dict() != self.space:
            raise ProfileError(
                f"{where} {self.name!r} was measured on another search space "
                f"(fingerprint {SearchSpace.from_dict(self.space).fingerprint()}, expected {space.fingerprint()})"
            )

    def configs(self) -> list[SubnetConfig]:
        return [SubnetConfig.from_dict(m.config) for m in self.measurements.values()]

    def to_xy(self, hashes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Encoded configs and median latencies (ms), in insertion order or for `hashes`."""
        space = self.search_space()
        keys = list(self.measurements) if hashes is None else hashes
        rows = [self.measurements[k] for k in keys]
        X = np.array([space.encode(SubnetConfig.from_dict(m.config)) for m in rows], dtype=np.int64)
        y = np.array([m.median_ms for m in rows], dtype=np.float64)
        return X.reshape(len(rows), space.n_var), y

    def add(self, config: SubnetConfig, stats: Mapping[str, Any]) -> str:
        """Record `stats` (a `merge_passes` record or a `Measurement.to_dict()`) for `config`."""
        space = self.search_space()
        key = space.config_hash(config)
        self.measurements[key] = ProfileRecord.from_dict({
            **stats, "config": space.canonical(config).to_dict(),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        return key

    # --- persistence -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "name": self.name, "created": self.created,
                "fingerprint": self.fingerprint, "space": self.space, "spec": self.spec,
                "batch_size": self.batch_size, "meta": self.meta,
                "measurements": {k: r.to_dict() for k, r in self.measurements.items()},
                "blocks": {k: r.to_dict() for k, r in self.blocks.items()}}

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> DeviceProfile:
        data = read_document(path, "device profile", FORMAT, SCHEMA_VERSION, ProfileError)
        validate(data, ProfileSchema, path, "device profile", ProfileError)
        profile = cls(name=data["name"], fingerprint=data["fingerprint"], space=data["space"], spec=data["spec"],
                      batch_size=data["batch_size"], measurements=data["measurements"],
                      blocks=data.get("blocks", {}), created=data.get("created", ""), meta=data.get("meta", {}))
        try:
            space = profile.search_space()
        except (KeyError, TypeError, ValueError, ConfigError) as exc:  # the space's constructor checks it
            raise ProfileError(f"device profile {path}: field space: {str(exc).splitlines()[0]}") from None
        problem = spec_problem(supernet_class(space.family), profile.spec, max_int=MAX_SPEC, unknown=False)
        if problem:
            name, reason = problem
            raise ProfileError(f"device profile {path}: field spec.{name}: {reason} "
                               f"(got {profile.spec[name]!r:.60})")
        for key, m in profile.measurements.items():
            try:
                config = space.validate(SubnetConfig.from_dict(m.config))
            except ConfigError as exc:
                raise ProfileError(f"device profile {path}: field measurements.{key}.config: {exc}") from None
            if space.config_hash(config) != key:
                raise ProfileError(f"device profile {path}: measurement {key} does not match its config "
                                   f"(whose hash is {space.config_hash(config)})")
        return profile
