"""Supernet checkpoints: one `torch.save` file of tensors and plain data, always loaded with
`weights_only=True` (nothing in a user's file is unpickled as code)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, InstanceOf

from nestnas.errors import CheckpointError, ConfigError
from nestnas.fileio import validate, write_bytes
from nestnas.supernet.base import Supernet, build_supernet
from nestnas.supernet.space import SearchSpace

FORMAT = "nestnas.supernet"
VERSION = 1


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
    """What `save_checkpoint` writes; the training state's own schema is `train.TrainStateSchema`."""

    model_config = ConfigDict(strict=True)
    space: dict[str, Any]
    spec: dict[str, Annotated[int, Field(ge=1)]]  # the supernet's constructor arguments
    model: dict[str, InstanceOf[torch.Tensor]]
    train: Optional[dict[str, Any]] = None
    data: Optional[DataRecordSchema] = None  # absent in checkpoints written before data specs


def save_checkpoint(net: Supernet, path: str | os.PathLike, train_state: dict[str, Any] | None = None,
                    data: Any = None) -> None:
    """Write `net` (its space, constructor spec and weights), optional training state and the
    record of the data it was trained on (a `nestnas.data.Data` or its `record()`) atomically."""
    payload = {
        "format": FORMAT, "version": VERSION, "space": net.space.to_dict(), "spec": net.spec(),
        "model": net.state_dict(), "train": train_state,
    }
    if data is not None:
        payload["data"] = data if isinstance(data, dict) else data.record()
    buffer = io.BytesIO()  # torch.save's own writer turns a full disk into an opaque RuntimeError
    torch.save(payload, buffer)
    write_bytes(path, buffer.getbuffer())


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The raw checkpoint payload, checked for format and version."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- torch raises many types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a nestnas supernet checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has version {payload.get('version')!r}; this nestnas reads "
                              f"version {VERSION}")
    validate(payload, CheckpointSchema, path, "checkpoint", CheckpointError)
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
    except (ConfigError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} does not describe a valid supernet: "
                              f"{str(exc).splitlines()[0]}") from None
    return net.eval()
