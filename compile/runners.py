"""Latency measurement: warm up, then time repeats until the median is pinned down.

`Runner.measure` does the plumbing (warm-up, batching of very short calls, stopping rule, one
re-measurement, flagging) and subclasses fill `_call(compiled, x)`: one inference, with the input
already in the runtime's own form (`_prepare` converts it once, outside the timed region).

Stopping rule: after at least `min_repeats` samples, stop as soon as the relative half-width of
the distribution-free 95% confidence interval of the median (order statistics, exact binomial;
see `nestnas.compile.stats`) is at most `target_rel_ci`, or when `max_seconds` have passed. An
unstable attempt is re-measured once (`max_attempts=2`); if that is unstable too, the tighter of
the two comes back with ``stable=False``, never passed off as stable. An attempt that ran out of
time before `min_repeats` samples (a model slower than `max_seconds / min_repeats`) is not
repeated, and the warm-up stops after two calls once it has taken a quarter of `max_seconds`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import numpy as np
import torch

from nestnas.compile.backends import OrtModel, TvmModel
from nestnas.compile.stats import rel_median_ci, summarize
from nestnas.errors import ConfigError, ProfileError

RUNNERS: dict[str, type[Runner]] = {}


def register_runner(name: str) -> Callable[[type[Runner]], type[Runner]]:
    """Class decorator: make a runner available by backend name (`get_runner`)."""

    def wrap(cls: type[Runner]) -> type[Runner]:
        cls.name = name
        RUNNERS[name] = cls
        return cls

    return wrap


def get_runner(name: str, **options: Any) -> Runner:
    """The runner for backend `name` (``onnxruntime``, ``tvm``, ``torch`` or ``callable``)."""
    if name not in RUNNERS:
        raise ConfigError(f"unknown runner {name!r}; allowed: {sorted(RUNNERS)}")
    return RUNNERS[name](**options)


@dataclass(frozen=True)
class Measurement:
    """Per-call latency statistics of one measurement (milliseconds)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    cv: float
    repeats: int
    rel_ci: float
    stable: bool
    attempts: int
    calls_per_sample: int = 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: infinite values (too few samples) become None."""
        return {k: (None if isinstance(v, float) and math.isinf(v) else v)
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in data]
        if missing:
            raise ProfileError(f"measurement record lacks field(s) {missing}; expected: {required}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (math.inf if v is None else v) for k, v in data.items() if k in known})


class Runner:
    """Times a compiled model. Subclasses fill `_call` and may override `_prepare`."""

    name: ClassVar[str] = ""
    model_type: ClassVar[type | tuple[type, ...] | None] = None  # what `measure` accepts; None: any

    def __init__(self, warmup: int = 5, min_repeats: int = 20, target_rel_ci: float = 0.02,
                 max_seconds: float = 2.0, max_attempts: int = 2, min_sample_ms: float = 0.2,
                 confidence: float = 0.95):
        _check_options({"warmup": warmup, "min_repeats": min_repeats, "target_rel_ci": target_rel_ci,
                        "max_seconds": max_seconds, "max_attempts": max_attempts, "min_sample_ms": min_sample_ms,
                        "confidence": confidence})
        self.warmup, self.min_repeats, self.target_rel_ci = warmup, min_repeats, target_rel_ci
        self.max_seconds, self.max_attempts, self.min_sample_ms = max_seconds, max_attempts, min_sample_ms
        self.confidence = confidence

    def measure(self, compiled: Any, x: Any, *, max_attempts: int | None = None) -> Measurement:
        """Latency of one call of `compiled` on input `x`. `max_attempts` lowers the retry cap
        for this call (a profiler short of time accepts the first attempt, flagged if unstable)."""
        cap = self.max_attempts if max_attempts is None else max_attempts
        _check_options({"max_attempts": cap})
        self._check_model(compiled)
        prepared = self._prepare(compiled, x)

        def call() -> None:
            self._call(compiled, prepared)

        with _gc_paused():
            per_sample = self._warm_up(call)
            best = None
            for attempt in range(1, cap + 1):
                result = self._attempt(call, per_sample, attempt)
                if result.stable:
                    return result
                best = result if best is None or result.rel_ci < best.rel_ci else best
                if result.repeats < self.min_repeats:
                    break  # too slow for min_repeats in max_seconds: a retry cannot do better
        return dataclasses.replace(best, attempts=attempt)

    def fingerprint(self) -> dict[str, Any]:
        """The runner's settings, recorded next to its measurements."""
        return {"runner": self.name, "warmup": self.warmup, "min_repeats": self.min_repeats,
                "target_rel_ci": self.target_rel_ci, "max_seconds": self.max_seconds,
                "max_attempts": self.max_attempts, "min_sample_ms": self.min_sample_ms,
                "confidence": self.confidence}

    def _prepare(self, compiled: Any, x: Any) -> Any:
        """Convert `x` once into what `_call` takes (runs before timing)."""
        return x

    def _call(self, compiled: Any, x: Any) -> Any:
        raise NotImplementedError

    def _check_model(self, compiled: Any) -> None:
        if self.model_type is not None and not isinstance(compiled, self.model_type):
            expected = getattr(self.model_type, "__name__", str(self.model_type))
            raise ConfigError(f"runner {self.name!r} cannot time a {type(compiled).__name__}; it takes a {expected}")

    def _warm_up(self, call: Callable[[], None]) -> int:
        """Run the warm-up calls and return how many calls each timed sample batches: enough
        that one sample lasts at least `min_sample_ms`, so timer overhead stays negligible."""
        times: list[int] = []
        # A slow model (0.5 s a call, untuned TVM) is warm after two calls; a quarter of the
        # time budget bounds the rest of the warm-up.
        budget_ns = self.max_seconds * 1e9 / 4
        for _ in range(max(self.warmup, 1)):
            start = time.perf_counter_ns()
            call()
            times.append(time.perf_counter_ns() - start)
            if len(times) >= 2 and sum(times) >= budget_ns:
                break
        one_ms = max(float(np.median(times)), 1.0) / 1e6
        return 1 if one_ms >= self.min_sample_ms else min(math.ceil(self.min_sample_ms / one_ms), 100_000)

    def _attempt(self, call: Callable[[], None], per_sample: int, attempt: int) -> Measurement:
        samples = self._sample(call, per_sample)
        stats = summarize(samples, self.confidence)
        stable = len(samples) >= self.min_repeats and stats["rel_ci"] <= self.target_rel_ci
        return Measurement(stats["median"], stats["p10"], stats["p90"], stats["cv"], len(samples),
                           stats["rel_ci"], stable, attempt, per_sample)

    def _sample(self, call: Callable[[], None], per_sample: int) -> list[float]:
        """Per-call milliseconds of successive samples, until the CI is tight or time is up.
        The CI is re-checked every ~10% more samples, keeping the stopping rule O(n log n)."""
        samples: list[float] = []
        deadline = time.perf_counter() + self.max_seconds
        next_check = self.min_repeats
        while True:
            start = time.perf_counter_ns()
            for _ in range(per_sample):
                call()
            samples.append((time.perf_counter_ns() - start) / per_sample / 1e6)
            if len(samples) >= next_check:
                if rel_median_ci(samples, self.confidence) <= self.target_rel_ci:
                    return samples
                next_check = max(len(samples) + 1, int(len(samples) * 1.1))
            if time.perf_counter() >= deadline:
                return samples


_OPTION_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "warmup": (lambda v: v >= 0, ">= 0"),
    "min_repeats": (lambda v: v >= 6, ">= 6 (fewer samples have no 95% median CI)"),
    "target_rel_ci": (lambda v: v > 0, "> 0"),
    "max_seconds": (lambda v: v > 0, "> 0"),
    "max_attempts": (lambda v: v >= 1, ">= 1"),
    "min_sample_ms": (lambda v: v >= 0, ">= 0"),
    "confidence": (lambda v: 0 < v < 1, "in (0, 1)"),
}


def _check_options(values: dict[str, float]) -> None:
    for name, value in values.items():
        ok, allowed = _OPTION_RULES[name]
        if not ok(value):
            raise ConfigError(f"runner option {name}={value!r} is not allowed; must be {allowed}")


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Keep Python's garbage collector from pausing inside timed samples (as `timeit` does);
    restores the previous state."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@register_runner("callable")
class CallableRunner(Runner):
    """Times any Python callable `f(x)`, e.g. a `CompiledModel` through its checked `__call__`."""

    def _call(self, compiled: Callable[[Any], Any], x: Any) -> Any:
        return compiled(x)


@register_runner("program")
class ProgramRunner(Runner):
    """Times a dynamic program loaded by `load_dynamic` on one call: `x` is ``(args, kwargs)``."""

    def _call(self, compiled: Callable[..., Any], call: tuple[tuple, dict]) -> Any:
        return compiled(*call[0], **call[1])


@register_runner("onnxruntime")
class OrtRunner(Runner):
    """Calls the session directly with a prepared feed: no input checks inside the timing. `x` is
    an array, or a dict of arrays by input name for a model of typed inputs."""

    model_type = OrtModel

    def _prepare(self, compiled: OrtModel, x: Any) -> dict[str, np.ndarray]:
        return compiled.session_feed(compiled.feed(x))

    def _call(self, compiled: OrtModel, feed: dict[str, np.ndarray]) -> Any:
        return compiled.session.run(None, feed)


@register_runner("tvm")
class TvmRunner(Runner):
    """Inputs copied to TVM tensors and the thread pool sized once, before timing."""

    model_type = TvmModel

    def _prepare(self, compiled: TvmModel, x: Any) -> Any:
        return compiled.to_device(compiled.feed(x))

    def _call(self, compiled: TvmModel, x: Any) -> Any:
        return compiled.run_device(x)


@register_runner("torch")
class TorchRunner(Runner):
    """Eager PyTorch under `inference_mode`, with torch's current thread settings. `x` is an
    array (one float input) or a dict of arrays, `forward`'s positional arguments in order."""

    model_type = torch.nn.Module

    def _prepare(self, compiled: torch.nn.Module, x: Any) -> tuple[torch.Tensor, ...]:
        if isinstance(x, dict):
            return tuple(torch.as_tensor(np.ascontiguousarray(v)) for v in x.values())
        return (torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32)),)

    def _call(self, compiled: torch.nn.Module, x: tuple[torch.Tensor, ...]) -> Any:
        with torch.inference_mode():
            return compiled(*x)


# --- dynamic and switchable bundles (`nestnas bench`) ------------------------------------------

PER_INPUT_SECONDS = 0.2  # each input of a dynamic bundle is timed for at most this long
Call = tuple[tuple, dict]  # one call of a dynamic program: positional and keyword arguments


def bundle_kind(folder: str | os.PathLike) -> str:
    """``"switchable"``, ``"dynamic"`` or ``"static"``, as the folder's manifest says. A folder
    that is no readable bundle counts as static: the static loader refuses it in one line."""
    from nestnas.compile.dynamic_host import FORMAT, MANIFEST
    from nestnas.fileio import parse_json

    try:
        data = parse_json((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return "static"
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return "static"
    return "switchable" if "switch" in data else "dynamic"


def read_inputs(path: str | os.PathLike) -> list[Call]:
    """The calls of a dynamic program that an input file holds. ``FILE.npy``: one array, the
    first positional argument. ``FILE.npz``: arrays ``arr_0``, ``arr_1``, ... (what
    ``np.savez(f, a, b)`` writes) are the positional arguments in order, arrays of other names
    keyword arguments (``np.savez(f, x=a)``). The first axis of every array enumerates the inputs;
    an entry without axes (from a 1-d array) is passed as a Python number, as host arguments are."""
    import re
    import zipfile

    path = Path(path)
    where = f"inputs {path}"
    if path.suffix not in (".npy", ".npz"):
        raise ConfigError(f"{where}: give a .npy or .npz file")
    if not path.is_file():
        raise ConfigError(f"{where}: no such file")
    try:
        with open(path, "rb") as f:  # numpy takes any other file for a pickle, which says nothing useful
            magic = f.read(6)
        if not magic.startswith(b"\x93NUMPY" if path.suffix == ".npy" else b"PK\x03\x04"):
            raise ValueError(f"as np.{'save' if path.suffix == '.npy' else 'savez'} writes it; it starts with "
                             f"{magic!r}")
        if path.suffix == ".npy":
            arrays = {"arr_0": np.load(path, allow_pickle=False)}
        else:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {k: archive[k] for k in archive.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{where}: not a numpy {path.suffix} file ({_first_line(exc)})") from None
    if not arrays:
        raise ConfigError(f"{where}: holds no arrays")
    positional = sorted((int(k[4:]) for k in arrays if re.fullmatch(r"arr_[0-9]+", k)))
    if positional != list(range(len(positional))):
        gap = next(i for i in range(len(positional) + 1) if i not in positional)
        raise ConfigError(f"{where}: has {', '.join(f'arr_{i}' for i in positional)} but no arr_{gap} "
                          "(positional arguments are arr_0, arr_1, ... in order)")
    for name, a in arrays.items():
        if a.ndim == 0:
            raise ConfigError(f"{where}: array {name} has no first axis (it enumerates the inputs: give "
                              f"shape (N, ...))")
        if a.dtype.kind not in "biuf":
            raise ConfigError(f"{where}: array {name} holds {a.dtype} values; give numbers (bool, int, float)")
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"{where}: the arrays hold different numbers of inputs along their first axis ("
                          + ", ".join(f"{k} {v}" for k, v in lengths.items()) + ")")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ConfigError(f"{where}: holds no inputs (the first axis has length 0)")

    def entry(a: np.ndarray) -> Any:
        return a.item() if a.ndim == 0 else np.ascontiguousarray(a)

    names = [k for k in arrays if k not in {f"arr_{i}" for i in positional}]
    return [(tuple(entry(arrays[f"arr_{j}"][i]) for j in positional), {k: entry(arrays[k][i]) for k in names})
            for i in range(n)]


def describe_call(call: Call) -> str:
    """The arguments of a call in a few words (shapes and dtypes of arrays, values of numbers)."""
    def one(v: Any) -> str:
        return f"{tuple(v.shape)} {v.dtype}" if isinstance(v, np.ndarray) else repr(v)

    args, kwargs = call
    return ", ".join([f"arr_{i} {one(v)}" for i, v in enumerate(args)] + [f"{k} {one(v)}" for k, v in kwargs.items()])


@dataclass
class LoadedProgram:
    """A dynamic bundle verified and loaded on each backend asked for, with what `nestnas bench`
    reports besides time: the forward's parameters and where each branch is decided."""

    folder: Path
    manifest: dict[str, Any]
    signature: str
    source: str
    models: dict[str, Any]
    parameters: list[str]
    branches: dict[int, tuple[int, str]]  # id -> (line of program.py, condition)

    def trace(self, backend: str, calls: Sequence[Call], where: str) -> list[tuple[tuple[str, ...], tuple]]:
        """Per call, the subgraphs it ran (keys, in order) and the branch decisions (id, taken)
        on `backend`; a call the bundle cannot run is one line naming it."""
        from nestnas.compile import dynamic_host

        model, keys, decisions = self.models[backend], [], []

        def hook(bid: int, taken: Any) -> bool:
            decisions.append((bid, bool(taken)))
            return bool(taken)

        def run(segment: str, inputs: tuple, params: dict) -> tuple:
            keys.append(dynamic_host.key(segment, inputs, params))
            return model.run(segment, inputs, params)

        forward = dynamic_host.program_forward(self.source, self.folder / dynamic_host.PROGRAM_FILE, hook)
        out = []
        for i, (args, kwargs) in enumerate(calls):
            keys.clear()
            decisions.clear()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # a switch's "no subnet meets the budget"
                    forward(run, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - the host code and the runtimes raise their own types
                why = exc.args[0] if isinstance(exc, KeyError) and exc.args else _first_line(exc)
                if isinstance(exc, KeyError) and keys:
                    why += self._compiled_for(keys[-1].split("|", 1)[0])
                raise ConfigError(f"{where}: input {i} ({describe_call((args, kwargs))}) does not fit bundle "
                                  f"{self.folder} on {backend}: {why} (the first axis of each array enumerates "
                                  "the inputs)") from None
            out.append((tuple(keys), tuple(decisions)))
        return out

    def _compiled_for(self, segment: str) -> str:
        entries = [e for e in self.manifest["subgraphs"].values() if e.get("segment") == segment]
        shapes = sorted({" ".join(str(tuple(v)) for v in e.get("shapes", [])) for e in entries})
        return f"; segment {segment} was compiled for inputs of shape {' or '.join(shapes)}" if shapes else ""

    def check_arguments(self, call: Call, where: str) -> None:
        """Refuse arguments the forward does not take, naming the ones it does."""
        import inspect

        from nestnas.compile import dynamic_host

        forward = dynamic_host.program_forward(self.source, self.folder / dynamic_host.PROGRAM_FILE)
        try:
            inspect.signature(forward).bind(None, *call[0], **call[1])
        except TypeError as exc:
            raise ConfigError(f"{where} gives {describe_call(call) or 'no arguments'}, which the bundle's forward "
                              f"({', '.join(self.parameters)}) does not take: {exc}") from None

    def path_name(self, keys: Sequence[str]) -> str:
        """The subgraphs of one run by their file stems, e.g. ``g000+g002``."""
        return "+".join(self.manifest["subgraphs"][k]["onnx"].rsplit(".", 1)[0] for k in keys)


def open_program(folder: str | os.PathLike, backends: Sequence[str] | None = None, threads: int | None = None,
                 trust: bool = False) -> LoadedProgram:
    """A dynamic bundle loaded by `load_dynamic` on `backends` (default: all it holds), manifest,
    signature and checksums verified as loading does (`trust`: accept an unsigned bundle where a
    bundle key is configured)."""
    import ast
    import inspect

    from nestnas.compile import dynamic_host
    from nestnas.compile.dynamic_program import DynamicManifest, load_dynamic
    from nestnas.compile.signing import check_signature, read_verified
    from nestnas.errors import ArtifactError
    from nestnas.fileio import read_document, validate

    folder = Path(folder)
    what = f"dynamic bundle {folder}"
    path = folder / dynamic_host.MANIFEST
    manifest = read_document(path, "dynamic bundle manifest", dynamic_host.FORMAT, dynamic_host.VERSION,
                             ArtifactError, version_key="version")
    validate(manifest, DynamicManifest, path, "dynamic bundle manifest", ArtifactError)
    signature = check_signature(manifest, what, trust)
    for b in backends or ():
        if b not in dynamic_host.BACKENDS:
            raise ConfigError(f"backend {b!r}: unknown; allowed: {list(dynamic_host.BACKENDS)}")
    models = {b: load_dynamic(folder, b, threads, trust) for b in (backends or manifest["backends"])}
    source = read_verified(folder, dynamic_host.PROGRAM_FILE, manifest["artifacts"], what).decode()
    forward = dynamic_host.program_forward(source, folder / dynamic_host.PROGRAM_FILE)
    parameters = list(inspect.signature(forward).parameters)[1:]  # the first is the subgraph runner
    branches = {}
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "__branch"
                and len(node.args) == 2 and isinstance(node.args[0], ast.Constant)):
            branches[node.args[0].value] = (node.lineno, ast.unparse(node.args[1]))
    return LoadedProgram(folder, manifest, signature, source, models, parameters, dict(sorted(branches.items())))


def bench_dynamic(folder: str | os.PathLike, calls: Sequence[Call], backends: Sequence[str] | None = None,
                  threads: int | None = None, trust: bool = False, where: str = "inputs",
                  progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Latency of a dynamic bundle per input on this device, on each backend: every call is
    timed on its own (at most `PER_INPUT_SECONDS`), and the medians are summarised over the
    inputs, overall and per path (the subgraphs an input ran); with how often each branch went
    which way, how many of the compiled subgraphs the inputs used, and on each backend after the
    first how many inputs ran other subgraphs than on the first (``path_mismatches``)."""
    if not calls:
        raise ConfigError(f"{where}: give at least one input")
    program = open_program(folder, backends, threads, trust)
    program.check_arguments(calls[0], where)
    traces = {b: program.trace(b, calls, where) for b in program.models}
    first = next(iter(traces))
    runner = get_runner("program", max_seconds=PER_INPUT_SECONDS, max_attempts=1)
    per_input: dict[str, list[Measurement]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a switch's "no subnet meets the budget", once per call
        for backend, model in program.models.items():
            per_input[backend] = []
            for i, call in enumerate(calls):
                per_input[backend].append(runner.measure(model, call))
                if progress:
                    progress(backend, i + 1, len(calls))
    rows = []
    for backend, ms in per_input.items():
        medians = np.array([m.median_ms for m in ms])
        p10, median, p90 = (float(v) for v in np.percentile(medians, [10, 50, 90]))
        rows.append({"backend": backend, "inputs": len(calls), "median_ms": median, "p10_ms": p10, "p90_ms": p90,
                     "min_ms": float(medians.min()), "max_ms": float(medians.max()),
                     "unstable_inputs": sum(not m.stable for m in ms),
                     "path_mismatches": (None if backend == first else
                                           sum(a[0] != b[0] for a, b in zip(traces[backend], traces[first])))})
    paths: dict[tuple[str, ...], list[int]] = {}
    for i, (keys, _) in enumerate(traces[first]):
        paths.setdefault(keys, []).append(i)
    path_rows = [{"subgraphs": program.path_name(keys), "inputs": len(idx), "share": len(idx) / len(calls),
                  "median_ms": {b: float(np.median([per_input[b][i].median_ms for i in idx])) for b in per_input}}
                 for keys, idx in sorted(paths.items(), key=lambda kv: -len(kv[1]))]
    counts = {bid: [0, 0] for bid in program.branches}
    for _, decisions in traces[first]:
        for bid, taken in decisions:
            counts.setdefault(bid, [0, 0])[0 if taken else 1] += 1
    branches = [{"id": bid, "line": program.branches.get(bid, (None, ""))[0],
                 "condition": program.branches.get(bid, (None, ""))[1], "taken": t, "skipped": s}
                for bid, (t, s) in sorted(counts.items())]
    sides = sum((t > 0) + (s > 0) for t, s in counts.values())
    used = {k for keys, _ in traces[first] for k in keys}
    return {"bundle": str(program.folder), "kind": "dynamic", "model": program.manifest.get("model"),
            "signature": program.signature, "forward": program.parameters, "inputs": len(calls),
            "per_input_seconds": PER_INPUT_SECONDS, "rows": rows, "paths": path_rows, "branches": branches,
            "branch_coverage": sides / (2 * len(counts)) if counts else 1.0,
            "branch_coverage_at_save": program.manifest.get("branch_coverage"),
            "subgraphs_used": len(used), "subgraphs": len(program.manifest["subgraphs"]),
            "per_input_ms": {b: [m.median_ms for m in ms] for b, ms in per_input.items()}}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
