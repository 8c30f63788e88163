"""Export a static module to one checked ONNX file with fixed input/output names.

Every backend starts from this file, so ONNX Runtime and TVM run the very same graph that a
bundle ships. Two exporters are registered: ``"dynamo"`` (``torch.export`` based, the default,
~1-2 s per model) and ``"torchscript"`` (the legacy tracer, ~0.1 s, which device profiling uses
to build hundreds of subnets quickly).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator

import onnx
import torch
from torch import nn

from nestnas.errors import ArtifactError, ConfigError
from nestnas.fileio import atomic_path

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# Pinned so artifacts do not change with torch's default; 18 is the dynamo exporter's native opset
# and runs on every ONNX Runtime >= 1.14 and TVM's Relax ONNX frontend.
DEFAULT_OPSET = 18

ExportFn = Callable[[nn.Module, torch.Tensor, int], onnx.ModelProto]
EXPORTERS: dict[str, ExportFn] = {}


def register_exporter(name: str) -> Callable[[ExportFn], ExportFn]:
    """Decorator: make an exporter selectable by name in `export_onnx`."""

    def wrap(fn: ExportFn) -> ExportFn:
        EXPORTERS[name] = fn
        return fn

    return wrap


@register_exporter("dynamo")
def _export_dynamo(module: nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    program = torch.onnx.export(
        module, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        opset_version=opset, dynamo=True, external_data=False, verbose=False,
    )
    return program.model_proto


@register_exporter("torchscript")
def _export_torchscript(module: nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(
        module, (example,), buffer, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        opset_version=opset, dynamo=False, do_constant_folding=True,
    )
    return onnx.load_from_string(buffer.getvalue())


def export_onnx(module: nn.Module, example: torch.Tensor, path: str | os.PathLike, exporter: str = "dynamo",
                opset: int = DEFAULT_OPSET) -> Path:
    """Export `module` (eval mode) traced at `example`'s shape to `path`, atomically.

    The file passes ``onnx.checker.check_model(full_check=True)`` before it is renamed into
    place, so a failed export or check never leaves a file at `path`.
    """
    _check_args(module, example, exporter)
    path = Path(path)
    proto = _run_exporter(module, example, exporter, opset)
    proto.metadata_props.add(key="nestnas.exporter", value=exporter)
    with atomic_path(path) as tmp:
        onnx.save(proto, tmp)
        check_onnx(tmp, name=path.name)
    return path


def check_onnx(path: str | os.PathLike, name: str | None = None) -> None:
    """Run the full ONNX checker (with strict shape inference); raise `ArtifactError` on failure."""
    try:
        onnx.checker.check_model(os.fspath(path), full_check=True)
    except Exception as exc:  # checker raises ValidationError, InferenceError, ...
        raise ArtifactError(f"{name or Path(path).name}: ONNX checker rejected the model: {_first_line(exc)}") from exc


def onnx_input_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """Static shape of the graph input named ``"input"`` (symbolic dims raise)."""
    graph = onnx.load(os.fspath(path), load_external_data=False).graph
    for value in graph.input:
        if value.name == INPUT_NAME:
            dims = value.type.tensor_type.shape.dim
            if not all(d.HasField("dim_value") for d in dims):
                raise ArtifactError(f"{Path(path).name}: input {INPUT_NAME!r} has a symbolic shape")
            return tuple(d.dim_value for d in dims)
    raise ArtifactError(f"{Path(path).name}: no graph input named {INPUT_NAME!r}")


def onnx_opset(path: str | os.PathLike) -> int:
    """The default-domain opset the file was exported with."""
    model = onnx.load(os.fspath(path), load_external_data=False)
    return next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


def _check_args(module: nn.Module, example: torch.Tensor, exporter: str) -> None:
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown ONNX exporter {exporter!r}; allowed: {sorted(EXPORTERS)}")
    if not isinstance(example, torch.Tensor):
        raise ConfigError(f"example input must be a torch.Tensor, got {type(example).__name__}")
    if module.training:
        raise ConfigError(f"{type(module).__name__} is in training mode; call .eval() before exporting")


def _run_exporter(module: nn.Module, example: torch.Tensor, exporter: str, opset: int) -> onnx.ModelProto:
    try:
        with _quiet_exporter(), torch.no_grad():
            return EXPORTERS[exporter](module, example, opset)
    except Exception as exc:
        raise ArtifactError(
            f"ONNX export ({exporter}) of {type(module).__name__} failed: {_first_line(exc)}"
        ) from exc


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporters' warnings, progress prints and log lines (e.g. 'torchvision is not
    installed'); restores the logger level and warning filters afterwards."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
