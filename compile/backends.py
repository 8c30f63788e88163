"""Compiler backends by name: a static module goes in, a `CompiledModel` (numpy in, numpy out)
comes out.

`Backend.build` does the plumbing shared by every backend (check options, export to ONNX in a
work folder, time the steps) and subclasses fill `_build(onnx_path, inputs)`. Adding a backend
is one decorated class. A model has typed inputs (`nestnas.supernet.inputs.InputSpec`, see
`feeds`): one float32 ``input`` as before, or several of any dtype, fed as a dict by name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from nestnas.compile.feeds import as_specs, check_feed, declared_bounds, is_classic
from nestnas.compile.onnx_export import EXPORTERS, export_onnx
from nestnas.compile.tvm_util import host_target, native_warnings_dropped, require_tvm, use_threads
from nestnas.errors import ConfigError
from nestnas.supernet.inputs import InputSpec, specs_of

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
    """A built model: call it on a numpy array of `input_shape` (one float32 input), or on a dict
    of arrays by input name (typed inputs, `inputs`), get the logits as numpy.

    `inputs` is a shape (one float32 input named ``input``) or a tuple of `InputSpec`;
    `input_shape` is the shape of a model's only input, None for several. `bounds` (name ->
    ``(low, high)``) are the ranges integer inputs are checked against before running.
    `build_seconds` holds the time of each build step (``export``, ``compile``); `onnx_path` is
    the exported file when the build was given a `workdir` to keep it in, else None.
    """

    def __init__(self, backend: str, inputs: Sequence[int] | Sequence[InputSpec],
                 bounds: dict[str, tuple[int, int]] | None = None):
        self.backend, self.inputs, self.bounds = backend, as_specs(inputs), dict(bounds or {})
        self.input_shape = self.inputs[0].shape if len(self.inputs) == 1 else None
        self.onnx_path: Path | None = None
        self.build_seconds: dict[str, float] = {}

    def __call__(self, x: Any) -> np.ndarray:
        return self._run(self.feed(x))

    def _run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def feed(self, x: Any) -> dict[str, np.ndarray]:
        """`x` (an array, or a dict by input name) as checked contiguous arrays by input name, or a
        one-line `ConfigError` naming the input that does not fit (see `feeds.check_feed`)."""
        return check_feed(self.inputs, x, self.backend, self.bounds)

    def check_input(self, x: Any) -> np.ndarray:
        """The one input of `x` as a contiguous array of its dtype, or a `ConfigError` if it does not fit."""
        if len(self.inputs) != 1:
            raise ConfigError(f"this {self.backend} model takes {len(self.inputs)} inputs; use feed()")
        return next(iter(self.feed(x).values()))

    def __repr__(self) -> str:
        if is_classic(self.inputs):
            return f"{type(self).__name__}(backend={self.backend!r}, input_shape={self.input_shape})"
        return f"{type(self).__name__}(backend={self.backend!r}, inputs={[s.name for s in self.inputs]})"


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

    def build(self, module: nn.Module, example: Any, workdir: str | os.PathLike | None = None,
              seed: int = 0) -> CompiledModel:
        """Export `module` at `example`'s shape to ONNX (kept in `workdir` if given, else in a
        temporary folder) and compile it for this backend. `example` is a tensor (one float32
        input), a dict name -> tensor (typed inputs: `forward`'s positional arguments in the dict's
        order), a shape, or a tuple of `InputSpec` (random examples drawn from `seed`; the built
        model then checks integer inputs against the specs' ranges)."""
        specs, examples, bounded = example_of(example, seed)
        with _folder(workdir) as folder:
            start = time.perf_counter()
            onnx_path = export_onnx(module, examples, folder / "model.onnx", exporter=self.options["exporter"],
                                    input_names=[s.name for s in specs])
            exported = time.perf_counter()
            compiled = self._build(onnx_path, specs)
            compiled.bounds = declared_bounds(specs) if bounded else {}
            compiled.build_seconds = {"export": exported - start, "compile": time.perf_counter() - exported}
            compiled.onnx_path = onnx_path if workdir is not None else None
        return compiled

    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes the built code or its speed: the key of measurement caches."""
        return {"backend": self.name, "threads": self.threads, **self.options,
                "torch": torch.__version__, "onnx": onnx.__version__}

    def _build(self, onnx_path: Path, inputs: tuple[InputSpec, ...]) -> CompiledModel:
        """Compile the exported file, whose graph inputs are `inputs` (in order)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(threads={self.threads}, options={self.options})"


def example_of(example: Any, seed: int = 0) -> tuple[tuple[InputSpec, ...], tuple[torch.Tensor, ...], bool]:
    """(specs, example tensors in order, whether the specs' integer ranges are declared) of what
    `Backend.build` takes: a tensor, a dict name -> tensor or array, a shape, or a tuple of `InputSpec`."""
    from nestnas.supernet.inputs import example_inputs

    if isinstance(example, torch.Tensor):
        return as_specs(tuple(example.shape)), (example,), False
    if isinstance(example, dict):
        if not example:
            raise ConfigError("example inputs: give at least one input")
        tensors = tuple(v.detach().cpu() if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))
                        for v in example.values())
        return specs_of(dict(zip(example, tensors))), tensors, False
    specs = as_specs(example)
    return specs, tuple(example_inputs(specs, seed).values()), True


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

    def __init__(self, session: Any, inputs: Sequence[int] | Sequence[InputSpec],
                 bounds: dict[str, tuple[int, int]] | None = None):
        super().__init__("onnxruntime", inputs, bounds)
        self.session = session
        # An input the graph does not use may be absent from it (the exporters drop it): fed, not passed.
        self.graph_inputs = [i.name for i in session.get_inputs()]

    def session_feed(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {n: feed[n] for n in self.graph_inputs}

    def _run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, self.session_feed(feed))[0]


@register_backend("onnxruntime")
class OrtBackend(Backend):
    """CPU execution provider, all graph optimisations, and a fixed thread count: `threads`
    intra-op threads and one inter-op thread (sequential execution), so that latencies measured
    on one device are comparable across subnets."""

    def _build(self, onnx_path: Path, inputs: tuple[InputSpec, ...]) -> OrtModel:
        import onnxruntime as ort

        session = ort.InferenceSession(os.fspath(onnx_path), self._session_options(ort),
                                       providers=["CPUExecutionProvider"])
        return OrtModel(session, inputs)

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

    def __init__(self, executable: Any, inputs: Sequence[int] | Sequence[InputSpec], threads: int,
                 bounds: dict[str, tuple[int, int]] | None = None, graph_inputs: Sequence[str] | None = None):
        super().__init__("tvm", inputs, bounds)
        tvm = require_tvm()
        self.executable, self.threads = executable, threads
        self.vm = tvm.relax.VirtualMachine(executable, tvm.cpu())
        self.main = self.vm["main"]
        # `main`'s parameters: the ONNX graph's inputs in order (an unused input may be absent).
        self.graph_inputs = list(graph_inputs) if graph_inputs is not None else [s.name for s in self.inputs]

    def to_device(self, x: Any) -> tuple[Any, ...]:
        """Copy the inputs (an array or a checked feed) into TVM tensors, in `main`'s order, and
        size the runtime pool (outside any timing)."""
        use_threads(self.threads)
        feed = x if isinstance(x, dict) else self.feed(x)
        tensor = require_tvm().runtime.tensor
        return tuple(tensor(feed[n]) for n in self.graph_inputs)

    def run_device(self, args: Any) -> Any:
        out = self.main(*args) if isinstance(args, tuple) else self.main(args)
        return out if hasattr(out, "numpy") else out[0]

    def _run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.run_device(self.to_device(feed)).numpy()


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

    def _build(self, onnx_path: Path, inputs: tuple[InputSpec, ...]) -> TvmModel:
        tvm = require_tvm()
        from tvm.relax.frontend.onnx import from_onnx

        model = onnx.load(os.fspath(onnx_path))
        graph_inputs = graph_input_names(model)
        by_name = {s.name: s for s in inputs}
        with native_warnings_dropped():
            mod = from_onnx(model, shape_dict={n: list(by_name[n].shape) for n in graph_inputs},
                            dtype_dict={n: by_name[n].dtype for n in graph_inputs}, keep_params_in_input=False)
            executable = tvm.compile(mod, target=host_target(self.threads))
        return TvmModel(executable, inputs, self.threads, graph_inputs=graph_inputs)

    def fingerprint(self) -> dict[str, Any]:
        tvm = require_tvm()
        return {**super().fingerprint(), "version": tvm.__version__, "target": str(host_target(self.threads))}


def graph_input_names(model: onnx.ModelProto) -> list[str]:
    """The graph's runtime inputs in order (initializers listed as inputs by old exporters excluded)."""
    weights = {init.name for init in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in weights]
