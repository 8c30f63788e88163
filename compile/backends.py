"""Compiler backends by name: a static module goes in, a `CompiledModel` (numpy in, numpy out)
comes out.

`Backend.build` does the plumbing shared by every backend (check options, export to ONNX in a
work folder, time the steps) and subclasses fill `_build(onnx_path, example)`. Adding a backend
is one decorated class.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import onnx
import torch
from torch import nn

from nestnas.compile.onnx_export import EXPORTERS, INPUT_NAME, export_onnx
from nestnas.compile.tvm_util import host_target, native_warnings_dropped, require_tvm, use_threads
from nestnas.errors import ConfigError

BACKENDS: dict[str, type[Backend]] = {}


def register_backend(name: str) -> Callable[[type[Backend]], type[Backend]]:
    """Class decorator: make a backend buildable by name (`get_backend`)."""

    def wrap(cls: type[Backend]) -> type[Backend]:
        cls.name = name
        BACKENDS[name] = cls
        return cls

    return wrap


def get_backend(name: str, threads: int | None = None, **options: Any) -> Backend:
    """The backend `name` with `threads` CPU threads (default: all cores) and its options."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; allowed: {sorted(BACKENDS)}")
    return BACKENDS[name](threads=threads, **options)


class CompiledModel:
    """A built model: call it on a numpy array of `input_shape`, get the logits as numpy.

    `build_seconds` holds the time of each build step (``export``, ``compile``); `onnx_path` is
    the exported file when the build was given a `workdir` to keep it in, else None.
    """

    def __init__(self, backend: str, input_shape: tuple[int, ...]):
        self.backend, self.input_shape = backend, tuple(input_shape)
        self.onnx_path: Path | None = None
        self.build_seconds: dict[str, float] = {}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._run(self.check_input(x))

    def _run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def check_input(self, x: np.ndarray) -> np.ndarray:
        """`x` as a contiguous float32 array, or a `ConfigError` if its shape does not fit."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape != self.input_shape:
            raise ConfigError(f"input of shape {x.shape} does not fit this {self.backend} model "
                              f"(expected {self.input_shape})")
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backend={self.backend!r}, input_shape={self.input_shape})"


class Backend:
    """Builds static modules for one runtime. Subclasses fill `_build` and may extend
    `fingerprint`; `defaults` lists the keyword options a backend accepts, with their defaults."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {"exporter": "dynamo"}

    def __init__(self, threads: int | None = None, **options: Any):
        self.threads = _check_threads(threads)
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} for backend {self.name!r}; "
                              f"allowed: {sorted(self.defaults)}")
        self.options = {**self.defaults, **options}
        if self.options["exporter"] not in EXPORTERS:
            raise ConfigError(f"unknown ONNX exporter {self.options['exporter']!r}; allowed: {sorted(EXPORTERS)}")

    def build(self, module: nn.Module, example: torch.Tensor, workdir: str | os.PathLike | None = None
              ) -> CompiledModel:
        """Export `module` at `example`'s shape to ONNX (kept in `workdir` if given, else in a
        temporary folder) and compile it for this backend."""
        with _folder(workdir) as folder:
            start = time.perf_counter()
            onnx_path = export_onnx(module, example, folder / "model.onnx", exporter=self.options["exporter"])
            exported = time.perf_counter()
            compiled = self._build(onnx_path, example)
            compiled.build_seconds = {"export": exported - start, "compile": time.perf_counter() - exported}
            compiled.onnx_path = onnx_path if workdir is not None else None
        return compiled

    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes the built code or its speed: the key of measurement caches."""
        return {"backend": self.name, "threads": self.threads, **self.options,
                "torch": torch.__version__, "onnx": onnx.__version__}

    def _build(self, onnx_path: Path, example: torch.Tensor) -> CompiledModel:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(threads={self.threads}, options={self.options})"


def _check_threads(threads: int | None) -> int:
    if threads is None:
        return os.cpu_count() or 1
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    return threads


@contextlib.contextmanager
def _folder(workdir: str | os.PathLike | None) -> Iterator[Path]:
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        yield Path(workdir)
        return
    with tempfile.TemporaryDirectory(prefix="nestnas-build-") as tmp:
        yield Path(tmp)


# --- ONNX Runtime -------------------------------------------------------------------------------

class OrtModel(CompiledModel):
    """An ONNX Runtime inference session over the exported file."""

    def __init__(self, session: Any, input_shape: tuple[int, ...]):
        super().__init__("onnxruntime", input_shape)
        self.session = session

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {INPUT_NAME: x})[0]


@register_backend("onnxruntime")
class OrtBackend(Backend):
    """CPU execution provider, all graph optimisations, and a fixed thread count: `threads`
    intra-op threads and one inter-op thread (sequential execution), so that latencies measured
    on one device are comparable across subnets."""

    def _build(self, onnx_path: Path, example: torch.Tensor) -> OrtModel:
        import onnxruntime as ort

        session = ort.InferenceSession(os.fspath(onnx_path), self._session_options(ort),
                                       providers=["CPUExecutionProvider"])
        return OrtModel(session, tuple(example.shape))

    def _session_options(self, ort: Any) -> Any:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # errors only: no per-session optimiser chatter
        return opts

    def fingerprint(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {**super().fingerprint(), "version": ort.__version__, "provider": "CPUExecutionProvider",
                "graph_optimization": "ORT_ENABLE_ALL", "intra_op_threads": self.threads, "inter_op_threads": 1}


# --- TVM ----------------------------------------------------------------------------------------

class TvmModel(CompiledModel):
    """A Relax VM executable; `executable` can be saved with `export_library` for bundles."""

    def __init__(self, executable: Any, input_shape: tuple[int, ...], threads: int):
        super().__init__("tvm", input_shape)
        tvm = require_tvm()
        self.executable, self.threads = executable, threads
        self.vm = tvm.relax.VirtualMachine(executable, tvm.cpu())
        self.main = self.vm["main"]

    def to_device(self, x: np.ndarray) -> Any:
        """Copy the input into a TVM tensor and size the runtime pool (outside any timing)."""
        use_threads(self.threads)
        return require_tvm().runtime.tensor(x)

    def run_device(self, x: Any) -> Any:
        out = self.main(x)
        return out if hasattr(out, "numpy") else out[0]

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.run_device(self.to_device(x)).numpy()


@register_backend("tvm")
class TvmBackend(Backend):
    """Untuned TVM: the exported ONNX file goes through the Relax ONNX frontend and `tvm.compile`
    for the host CPU (llvm, `mcpu` of this machine, `num-cores` = threads).

    The ONNX frontend was chosen over `relax.frontend.torch.from_exported_program` because it
    compiles the very file that ONNX Runtime runs and bundles ship (one graph, one source of
    truth), and it was measured ~2-3x faster to import+compile here (e.g. largest CNN 1.2 s vs
    3.7 s) with the same outputs. Both paths agreed with torch to 3e-7 on both families.
    """

    def __init__(self, threads: int | None = None, **options: Any):
        require_tvm()  # fail at construction, with the install hint, not at the first build
        super().__init__(threads, **options)

    def _build(self, onnx_path: Path, example: torch.Tensor) -> TvmModel:
        tvm = require_tvm()
        from tvm.relax.frontend.onnx import from_onnx

        shape = tuple(example.shape)
        with native_warnings_dropped():
            mod = from_onnx(onnx.load(os.fspath(onnx_path)), shape_dict={INPUT_NAME: list(shape)},
                            dtype_dict={INPUT_NAME: "float32"}, keep_params_in_input=False)
            executable = tvm.compile(mod, target=host_target(self.threads))
        return TvmModel(executable, shape, self.threads)

    def fingerprint(self) -> dict[str, Any]:
        tvm = require_tvm()
        return {**super().fingerprint(), "version": tvm.__version__, "target": str(host_target(self.threads))}
