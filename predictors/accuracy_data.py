"""`AccuracyTable`: shared-weight validation accuracy of sampled subnets of one checkpoint,
the training data of `AccuracyPredictor` (JSON, keyed by canonical config hash)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, JsonValue

from nestnas.errors import ConfigError, ProfileError
from nestnas.fileio import read_document, validate, write_json
from nestnas.supernet.base import Supernet
from nestnas.supernet.checkpoint import spec_problem
from nestnas.supernet.config import SubnetConfig
from nestnas.supernet.evaluate import subnet_accuracy
from nestnas.supernet.families import supernet_class
from nestnas.supernet.space import SearchSpace

FORMAT = "nestnas.accuracy_table"


class _EntrySchema(BaseModel):
    model_config = ConfigDict(strict=True)
    config: dict[str, Any]  # checked against the space on load
    accuracy: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class _TableSchema(BaseModel):
    model_config = ConfigDict(strict=True)
    space: dict[str, Any]
    spec: dict[str, JsonValue]  # integers where the family's default is one: checked on load
    checkpoint_sha256: str
    entries: dict[str, _EntrySchema]


@dataclass
class AccuracyTable:
    space: dict[str, Any]
    spec: dict[str, Any]
    checkpoint_sha256: str
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    def search_space(self) -> SearchSpace:
        return SearchSpace.from_dict(self.space)

    def to_xy(self, hashes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        space = self.search_space()
        keys = list(self.entries) if hashes is None else hashes
        X = np.array([space.encode(SubnetConfig.from_dict(self.entries[k]["config"])) for k in keys], dtype=np.int64)
        y = np.array([self.entries[k]["accuracy"] for k in keys], dtype=np.float64)
        return X.reshape(len(keys), space.n_var), y

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, {"format": FORMAT, "schema_version": 1, "space": self.space, "spec": self.spec,
                          "checkpoint_sha256": self.checkpoint_sha256, "entries": self.entries})

    @classmethod
    def load(cls, path: str | os.PathLike) -> AccuracyTable:
        data = read_document(path, "accuracy table", FORMAT, 1, ProfileError)
        validate(data, _TableSchema, path, "accuracy table", ProfileError)
        try:
            table = cls(data["space"], data["spec"], data["checkpoint_sha256"], data["entries"])
            space = table.search_space()
            problem = spec_problem(supernet_class(space.family), table.spec, unknown=False)
            if problem:
                name, reason = problem
                raise ProfileError(f"accuracy table {path}: field spec.{name}: {reason} "
                                   f"(got {table.spec[name]!r:.60})")
            for key, e in table.entries.items():
                if space.config_hash(SubnetConfig.from_dict(e["config"])) != key:
                    raise ProfileError(f"accuracy table {path}: entry {key} does not match its config")
        except (KeyError, TypeError, AttributeError, ConfigError) as exc:
            raise ProfileError(f"accuracy table {path} is malformed: {str(exc).splitlines()[0]}") from None
        return table


def measure_accuracies(net: Supernet, configs: list[SubnetConfig], val_loader, calib_loader, checkpoint_sha256: str,
                       table: AccuracyTable | None = None, seed: int = 0,
                       progress: Callable[[int, int], None] | None = None,
                       out: str | os.PathLike | None = None) -> AccuracyTable:
    """Shared-weight accuracy (batch norm recalibrated) of each config not yet in `table`; with
    `out`, the table is saved atomically after every new entry, so a killed run resumes."""
    space = net.space
    table = table or AccuracyTable(space.to_dict(), net.spec(), checkpoint_sha256)
    for i, config in enumerate(configs):
        key = space.config_hash(config)
        if key not in table.entries:
            acc = subnet_accuracy(net, config, val_loader, calib_loader, seed=seed)
            table.entries[key] = {"config": space.canonical(config).to_dict(), "accuracy": acc}
            if out is not None:
                table.save(out)
        if progress:
            progress(i + 1, len(configs))
    return table
