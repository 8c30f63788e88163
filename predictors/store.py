"""Saving and loading fitted predictors without pickle.

A saved predictor is JSON: its hyper-parameters, the file it was fitted on (a device profile or
an accuracy table) with that file's sha256, and the hashes of the subnets it was fitted on.
Loading re-reads the data file, refuses it if the checksum differs, and refits: every member is
seeded, so the refitted predictor is the one that was saved, and no user file is unpickled. A
predictor fitted on a transfer profile also names that profile's priors by name and sha256;
loading verifies them (through the profile's own record, which finds a moved prior by checksum).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from nestnas.errors import ArtifactError, ConfigError, ProfileError
from nestnas.fileio import read_document, sha256_file, validate, write_json
from nestnas.hw_profiles.profile import DeviceProfile
from nestnas.hw_profiles.profiler import block_table
from nestnas.predictors.accuracy_data import AccuracyTable
from nestnas.predictors.latency import LATENCY_KINDS, AccuracyPredictor, LatencyPredictor

FORMAT = "nestnas.predictor"
VERSION = 1


class DataRef(BaseModel):
    model_config = ConfigDict(strict=True)
    path: Annotated[str, Field(min_length=1)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class PriorSchema(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class PredictorSchema(BaseModel):
    """A saved predictor (see `save_predictor`); checked on load."""

    model_config = ConfigDict(strict=True)
    target: Literal["latency", "accuracy"]
    kind: Literal[LATENCY_KINDS]  # accuracy predictors are ensembles
    seed: int
    data: DataRef
    train_hashes: list[str]
    heldout_metrics: dict[str, Any] = {}
    priors: list[PriorSchema] = []  # a transfer profile's priors


def fit_latency(profile: DeviceProfile, kind: str, train_hashes: list[str], seed: int = 0) -> LatencyPredictor:
    space = profile.search_space()
    X, y = profile.to_xy(train_hashes)
    table = block_table(profile) if kind in ("lut", "hybrid") else None
    priors = None
    if kind == "transfer":
        from nestnas.predictors.fitting import available_kinds
        from nestnas.predictors.transfer import transfer_priors

        priors = transfer_priors(profile, seed)
        if "lut" in available_kinds(profile):  # a transfer profile with its own complete block table
            table = block_table(profile)
    return LatencyPredictor(space, kind=kind, spec=profile.spec, block_table=table, seed=seed,
                            priors=priors).fit(X, y)


def fit_accuracy(table: AccuracyTable, train_hashes: list[str], seed: int = 0) -> AccuracyPredictor:
    X, y = table.to_xy(train_hashes)
    return AccuracyPredictor(table.search_space(), spec=table.spec, seed=seed).fit(X, y)


def save_predictor(path: str | os.PathLike, target: str, data_path: str | os.PathLike, kind: str, seed: int,
                   train_hashes: list[str], metrics: dict[str, Any] | None = None) -> None:
    path, data_path = Path(path), Path(data_path)
    try:
        ref = os.path.relpath(data_path.resolve(), path.resolve().parent)
    except ValueError:  # another drive
        ref = str(data_path.resolve())
    record = {
        "format": FORMAT, "version": VERSION, "target": target, "kind": kind, "seed": seed,
        "data": {"path": ref, "sha256": sha256_file(data_path)}, "train_hashes": train_hashes,
        "heldout_metrics": metrics or {},
    }
    if target == "latency":
        priors = _prior_names(DeviceProfile.load(data_path))
        if priors:
            record["priors"] = priors
    write_json(path, record)


def _prior_names(profile: DeviceProfile) -> list[dict[str, str]]:
    transfer = profile.meta.get("transfer")
    if not isinstance(transfer, dict):
        return []
    priors = transfer.get("priors")
    return [{"name": str(p.get("name")), "sha256": str(p.get("sha256"))} for p in priors if isinstance(p, dict)] \
        if isinstance(priors, list) else []


def load_predictor(path: str | os.PathLike) -> tuple[LatencyPredictor | AccuracyPredictor, dict[str, Any]]:
    """(refitted predictor, saved record). Raises ArtifactError naming the file on any mismatch."""
    path = Path(path)
    record = read_document(path, "predictor file", FORMAT, VERSION, ArtifactError, version_key="version")
    validate(record, PredictorSchema, path, "predictor file", ArtifactError)
    data_path = (path.parent / record["data"]["path"]).resolve()
    if not data_path.is_file():
        raise ArtifactError(f"predictor file {path} was fitted on {data_path}, which is missing")
    if sha256_file(data_path) != record["data"]["sha256"]:
        raise ArtifactError(f"predictor file {path} does not match {data_path}: the data changed since fitting "
                            "(checksum differs); fit again")
    hashes = record["train_hashes"]
    try:
        if record["target"] == "latency":
            profile = DeviceProfile.load(data_path)
            if record.get("priors", []) != _prior_names(profile):
                raise ArtifactError(f"predictor file {path} names priors {[p['name'] for p in record['priors']]} "
                                    f"but {data_path} records {[p['name'] for p in _prior_names(profile)]}; "
                                    "fit again")
            predictor = fit_latency(profile, record["kind"], hashes, record["seed"])
        else:
            predictor = fit_accuracy(AccuracyTable.load(data_path), hashes, record["seed"])
    except (KeyError, ProfileError, ConfigError) as exc:  # e.g. a hash the data does not hold, too few subnets
        raise ArtifactError(f"predictor file {path} does not match {data_path}: {exc}") from None
    return predictor, record
