"""ONNX export, ONNX Runtime and TVM builds, and latency measurement of static subnets.

TVM is optional: everything here imports without it, and asking for the ``tvm`` backend without
it installed raises `nestnas.errors.BackendUnavailable` with the install hint.
"""

from nestnas.compile.backends import (
    BACKENDS,
    Backend,
    CompiledModel,
    OrtBackend,
    OrtModel,
    TvmBackend,
    TvmModel,
    get_backend,
    register_backend,
)
from nestnas.compile.onnx_export import (
    DEFAULT_OPSET,
    EXPORTERS,
    INPUT_NAME,
    OUTPUT_NAME,
    check_onnx,
    export_onnx,
    onnx_input_shape,
    onnx_opset,
    register_exporter,
)
from nestnas.compile.runners import RUNNERS, Measurement, Runner, get_runner, register_runner
from nestnas.compile.stats import median_ci_ranks, rel_median_ci, summarize

__all__ = [
    "BACKENDS", "DEFAULT_OPSET", "EXPORTERS", "INPUT_NAME", "OUTPUT_NAME", "RUNNERS", "Backend", "CompiledModel",
    "Measurement", "OrtBackend", "OrtModel", "Runner", "TvmBackend", "TvmModel", "check_onnx", "export_onnx",
    "get_backend", "get_runner", "median_ci_ranks", "onnx_input_shape", "onnx_opset", "register_backend",
    "register_exporter", "register_runner", "rel_median_ci", "summarize",
]
