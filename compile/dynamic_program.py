"""A rewritten dynamic model as a program: run eagerly on examples (which records every subgraph
to compile and every branch taken), saved as static subgraphs plus the host runtime and the host
function, and loaded back (see `nestnas.compile.dynamic`).

A saved program is a folder: one ONNX file (and TVM library) per recorded subgraph, ``host.py``
(a byte-for-byte copy of `nestnas.compile.dynamic_host`), ``program.py`` (the host function) and
a checksummed, optionally signed ``manifest.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Literal, Optional, Sequence

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from nestnas.compile import dynamic_host
from nestnas.compile.dynamic_analysis import RewriteError, Source
from nestnas.compile.dynamic_host import BACKENDS, FORMAT, HOST_FILE, MANIFEST, PROGRAM_FILE, VERSION
from nestnas.compile.dynamic_rewrite import Segment
from nestnas.compile.signing import ArtifactName, Sha256, Signature, Strict
from nestnas.compile.tuning import TuneOptions
from nestnas.errors import ArtifactError, ConfigError, NestnasError
from nestnas.fileio import check_output, write_bytes, write_error

RUNTIME_SOURCE = Path(dynamic_host.__file__)


class CoverageWarning(UserWarning):
    """Some branches were never taken by the example inputs, so their subgraphs are missing."""


class NotATensor(TypeError):
    """A value passed between subgraphs that is no tensor or number (a tuple, None)."""


def as_tensor(v: Any) -> Any:
    """A value a subgraph takes or gives: a tensor, or a tuple or list of them, or None (an LSTM's
    state); host numbers become tensors."""
    if isinstance(v, torch.Tensor) or v is None:
        return v
    if isinstance(v, (tuple, list)):
        return type(v)(as_tensor(x) for x in v)
    if isinstance(v, dict):
        raise NotATensor(type(v).__name__)
    return torch.as_tensor(v)



@dataclass
class _Record:
    key: str
    segment: str
    params: dict[str, Any]
    example: tuple[torch.Tensor, ...]   # the arrays of the inputs (see dynamic_host.flatten)
    in_tree: Optional[list[Any]] = None
    out_tree: Optional[list[Any]] = None


class _SegmentModule(nn.Module):
    """A segment as a module of arrays: its structured inputs (tuples, None) rebuilt from them,
    its outputs taken apart into them. `dummy`: the exporter needs an input the segment lacks."""

    def __init__(self, model: nn.Module, fn: Callable, params: dict[str, Any], in_tree: list[Any] | None = None,
                 dummy: bool = False):
        super().__init__()
        self.model, self.fn, self.params, self.in_tree, self.dummy = model, fn, params, in_tree, dummy

    def forward(self, *leaves):
        inputs = () if self.dummy else dynamic_host.unflatten(leaves, self.in_tree) if self.in_tree else leaves
        outs = dynamic_host.flatten(self.fn(self.model, *inputs, **self.params))[0]
        # An empty output made from an input's shape alone (`torch.zeros(x.size(0), 0)`) would be a
        # zero-byte constant, which TVM cannot load: tie it to an input's values.
        anchor = next((t for t in leaves if not self.dummy and t.numel() and not t.dtype == torch.bool), None)
        if anchor is not None:
            zero = anchor.reshape(-1)[:1].sum() * 0
            outs = [o + zero.to(o.dtype) if o.numel() == 0 and o.dtype != torch.bool else o for o in outs]
        return tuple(outs)


class DynamicProgram:
    """A dynamic model split into static subgraphs and a host function (see `rewrite`).

    `namespace` holds the compiled segment functions (``_seg_<id>``, run by torch while recording);
    the host function runs through the same runtime helpers as a saved program; `src` (the
    forward's source) lets errors name a segment's lines."""

    def __init__(self, model: nn.Module, segments: dict[str, Segment], host: str, branches: dict[int, str],
                 namespace: dict[str, Any], src: Source | None = None):
        self.model, self.segments, self.host_source, self.branches = model, segments, host, branches
        self.namespace, self.src = namespace, src
        self.records: dict[str, _Record] = {}
        self.taken: dict[int, set[bool]] = {b: set() for b in branches}
        self.forward = dynamic_host.program_forward(host, "<nestnas host>", branch_hook=self._branch)

    # eager execution through the host function: records subgraphs and branch coverage
    def _eager_run(self, segment: str, inputs: tuple, params: dict[str, Any]) -> tuple:
        seg = self.segments[segment]
        try:
            inputs = tuple(as_tensor(v) for v in inputs)
        except NotATensor as exc:
            names = [n for n, v in zip(seg.inputs, inputs) if v is None or isinstance(v, (tuple, list, dict))]
            raise RewriteError(f"{self.where(segment)}: {', '.join(names) or 'an input'} is a {exc} here, not a "
                               "tensor; subgraphs pass tensors only: keep a tuple's tensors in separate variables "
                               "(`h, c = state`) and give them tensor values before the first use") from None
        leaves, in_tree = dynamic_host.flatten(inputs)
        key = dynamic_host.key_of(segment, leaves, in_tree, params)
        if key not in self.records:
            self.records[key] = _Record(key, segment, dict(params), tuple(v.detach().clone() for v in leaves), in_tree)
        try:
            with torch.no_grad():
                out = self.namespace[f"_seg_{segment}"](self.model, *inputs, **params)
            self.records[key].out_tree = dynamic_host.flatten(out)[1]
            return out
        except NotATensor as exc:
            raise RewriteError(f"{self.where(segment)}: one of {', '.join(seg.outputs)} is a {exc}, not a tensor; "
                               "subgraphs pass tensors only: unpack it into separate variables "
                               "(`out, (h, c) = self.lstm(x, (h, c))`)") from None

    def _branch(self, bid: int, taken: Any) -> bool:
        taken = bool(taken)
        self.taken[bid].add(taken)
        return taken

    def eager(self, *args, **kwargs):
        """Run the rewritten program with torch (recording what must be compiled)."""
        with torch.no_grad():
            return self.forward(self._eager_run, *args, **kwargs)

    def untaken(self) -> list[str]:
        out = []
        for bid, seen in self.taken.items():
            for side in (True, False):
                if side not in seen:
                    out.append(f"{self.branches[bid]} never {'taken' if side else 'skipped'}")
        return out

    def coverage(self) -> float:
        sides = sum(len(s) for s in self.taken.values())
        return sides / (2 * len(self.taken)) if self.taken else 1.0

    def where(self, segment: str) -> str:
        """A segment's lines in the model's source, for messages: `file:first-last: `code``."""
        seg = self.segments[segment]
        lines = [n.lineno for n in seg.stmts if hasattr(n, "lineno")] or [seg.lineno]
        last = max([getattr(n, "end_lineno", None) or n.lineno for n in seg.stmts if hasattr(n, "lineno")] or lines)
        if self.src is None:
            return f"lines {min(lines)}-{last} of forward"
        first = min(lines)
        code = self.src.lines[first - 1].strip() if 0 < first <= len(self.src.lines) else ""
        span = f"{self.src.start + first - 1}" + (f"-{self.src.start + last - 1}" if last > first else "")
        return f"{self.src.file}:{span}: `{code}`{' ...' if last > first else ''}"

    def save(self, out_dir: str | os.PathLike, backends: Sequence[str] = BACKENDS, threads: int = 1,
             progress: Callable[[str, int, int], None] | None = None, tune: TuneOptions | None = None) -> Path:
        """Export every recorded subgraph (ONNX; TVM library), write the host runtime, the host
        function and a checksummed manifest, and check every subgraph on every backend against
        torch, through the runtime; the folder appears only when complete.

        `tune` (as for `export_bundles`; default: untuned) tunes the TVM subgraphs with one
        MetaSchedule database: the workloads of every specialisation are deduplicated (siblings
        share most of them) and those the database already holds, from an earlier save or export
        given the same `tune.database`, are not tuned again. Without `tune.database` the
        database is temporary. A runtime failing on a subgraph (ONNX Runtime refusing it, TVM
        failing to import or build it) is an ArtifactError naming the subgraph and its lines."""
        from nestnas.compile.bundle import staged_folder

        tune = tune or TuneOptions(trials=0)
        for b in backends:
            if b not in BACKENDS:
                raise ConfigError(f"unknown backend {b!r}; allowed: {list(BACKENDS)}")
        if not self.records:
            raise ConfigError("nothing recorded: run the program on example inputs first (rewrite does)")
        final = Path(out_dir)
        try:
            check_output(final, "out_dir", kind="dir")
            if final.is_dir() and any(final.iterdir()):
                raise ConfigError(f"out_dir {final}: exists and is not empty")
            with staged_folder(final) as tmp:
                table, wants = {}, {}
                for i, rec in enumerate(sorted(self.records.values(), key=lambda r: r.key)):
                    table[rec.key], want = self._export(rec, tmp, f"g{i:03d}", backends, threads)
                    wants[rec.key] = (tuple(t.numpy() for t in rec.example), want)
                    if progress:
                        progress("subgraphs", i + 1, len(self.records))
                tuning = None
                if "tvm" in backends:
                    tuning = _build_tvm(tmp, table, threads, tune, self._where_key, progress,
                                        {k: w[0] for k, w in wants.items()})
                shutil.copyfile(RUNTIME_SOURCE, tmp / HOST_FILE)
                write_bytes(tmp / PROGRAM_FILE, self.host_source.encode())
                manifest = {"format": FORMAT, "version": VERSION, "model": type(self.model).__name__,
                            "backends": list(backends), "threads": threads, "subgraphs": table,
                            "segments": {s.id: s.source for s in self.segments.values()},
                            "branch_coverage": self.coverage(), "tuning": tuning, "artifacts": _checksums(tmp)}
                _write_manifest(tmp / MANIFEST, manifest)
                for backend in backends:
                    _check(tmp, backend, threads, wants, self._where_key)
        except OSError as exc:  # a write in the staged folder, or a name the system refuses
            if isinstance(exc, NestnasError):
                raise
            raise write_error(final, exc) from None
        return final

    def _where_key(self, key: str) -> str:
        return self.where(self.records[key].segment)

    def replace_host(self, folder: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        """Write this program's host function over a saved one whose subgraphs it reuses (the same
        model with other host constants, e.g. measured latencies)."""
        folder = Path(folder)
        manifest = _read_manifest(folder)
        missing = sorted(set(self.records) - set(manifest["subgraphs"]))
        if missing:
            raise ConfigError(f"{folder} lacks subgraphs this program needs: {missing}")
        from nestnas.compile.signing import signed

        data = self.host_source.encode()
        manifest["artifacts"][PROGRAM_FILE] = dynamic_host.sha256(data)
        manifest.update(extra or {})
        # The manifest last: a crash between the two leaves a checksum mismatch, never a silent mix.
        write_bytes(folder / PROGRAM_FILE, data)
        write_bytes(folder / MANIFEST, json.dumps(signed(manifest), indent=1).encode())

    def _export(self, rec: _Record, folder: Path, stem: str, backends: Sequence[str], threads: int
                ) -> tuple[dict[str, Any], tuple[np.ndarray, ...]]:
        """One subgraph's files and manifest entry, and torch's outputs on its example."""
        import onnx

        from nestnas.compile.dynamic_export import exportable, no_empty_tensors
        from nestnas.compile.onnx_export import check_onnx, export_onnx

        seg = self.segments[rec.segment]
        fn = self.namespace[f"_seg_{rec.segment}"]
        example = rec.example
        structured = any(t != "t" for t in (rec.in_tree or []) + (rec.out_tree or []))
        # constants only (`seq = torch.zeros(1, 0)`): the exporter needs an input, then drops it
        module = _SegmentModule(self.model, fn, rec.params, rec.in_tree if structured else None,
                                dummy=not example).eval()
        example = example or (torch.zeros(1),)
        names = [f"in{j}" for j in range(len(example))]
        # Copies: a segment may update an input in place (nn.SiLU(inplace=True)), and the recorded
        # example is what the check feeds the exported graph.
        with torch.no_grad():
            want = tuple(t.numpy() for t in module(*[t.clone() for t in example]))
        onnx_path = folder / f"{stem}.onnx"
        try:
            with exportable(self.model):
                export_onnx(module, tuple(t.clone() for t in example), onnx_path, exporter="torchscript",
                            input_names=names, output_names=[f"out{j}" for j in range(len(want))])
            if no_empty_tensors(onnx_path):
                check_onnx(onnx_path)
        except ArtifactError as exc:
            raise RewriteError(f"segment {rec.segment} (line {seg.lineno} of forward) failed to export to "
                               f"ONNX: {exc}") from None
        # The exporter drops an input the graph does not compute with (one read only for .device).
        graph = onnx.load(os.fspath(onnx_path), load_external_data=False).graph
        weights = {t.name for t in graph.initializer}
        kept = [v.name for v in graph.input if v.name not in weights]
        feeds = [names.index(n) for n in kept]
        outputs = seg.outputs if not structured else [f"{name}.{j}" for name, t in zip(seg.outputs, rec.out_tree)
                                                      for j in range(_leaf_count(t))]
        entry = {"segment": rec.segment, "params": dict(rec.params), "onnx": onnx_path.name, "inputs": kept,
                 "feeds": feeds, "outputs": outputs, "dtypes": [str(rec.example[i].numpy().dtype) for i in feeds],
                 "shapes": [list(rec.example[i].shape) for i in feeds]}
        if structured:
            entry["out_tree"] = rec.out_tree
        if "tvm" in backends:
            entry["tvm"] = f"{stem}.so"  # built by `_build_tvm` once every subgraph is exported
        return entry, want


def _leaf_count(spec: Any) -> int:
    """How many arrays a value of this structure holds (see dynamic_host.flatten)."""
    if spec is None:
        return 0
    return 1 if spec == "t" else sum(_leaf_count(s) for s in spec[1])


@contextmanager
def _runtime_failure(key: str, where: Callable[[str], str], what: str) -> Iterator[None]:
    """A runtime's own exception (ONNX Runtime and TVM raise their own types) as one line naming
    the subgraph and its source lines."""
    try:
        yield
    except NestnasError:
        raise
    except Exception as exc:  # noqa: BLE001 - the runtimes' exception types are their own
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ArtifactError(f"subgraph {key} ({where(key)}): {what} ({why})") from None


def _build_tvm(folder: Path, table: dict[str, dict[str, Any]], threads: int, tune: TuneOptions,
               where: Callable[[str], str], progress: Callable[[str, int, int], None] | None = None,
               examples: dict[str, tuple] | None = None) -> dict[str, Any] | None:
    """Build every subgraph's TVM library, as bundles are built (see `tuning`): with `tune`, the
    tasks of all subgraphs are tuned together first, each unique workload once, and each library
    applies the database to its own tasks, unless TVM's default schedules run that subgraph
    faster on its example (or the tuned library fails on it), as `export_bundles` chooses per
    subnet; `schedules` in its manifest entry says which. Returns the tuning report (None when
    untuned)."""
    from nestnas.compile.tuning import TuningDatabase, extract_tasks, prepare, relax_module
    from nestnas.compile.tvm_util import host_target, native_warnings_dropped, require_tvm

    tvm = require_tvm()
    target = host_target(threads)
    prepared = {}
    for key, entry in table.items():
        inputs = {n: (tuple(s), d) for n, s, d in zip(entry["inputs"], entry["shapes"], entry["dtypes"])}
        with _runtime_failure(key, where, "TVM cannot import its ONNX graph"):
            prepared[key] = prepare(relax_module(folder / entry["onnx"], (), "", inputs=inputs), target)
    work = Path(tempfile.mkdtemp(prefix="nestnas-tuning-")) if tune.enabled and tune.database is None else None
    try:
        database, report, untunable = None, None, {}
        if tune.enabled:
            path = Path(tune.database or work)
            TuningDatabase(path)  # created, and refused in one line if TVM cannot read it
            tasks = {key: extract_tasks(p, target) for key, p in prepared.items()}
            tuned, failure = _tune_in_copy(path, list(tasks.values()), tune, progress)
            if failure is not None:
                # One workload MetaSchedule cannot search (a zero-extent loop made parallel divides
                # by zero) must not cost the others: each subgraph alone, the failing ones default.
                tuned = {}
                for key, own in tasks.items():
                    one, failure = _tune_in_copy(path, [own], tune, None)
                    if failure is not None:
                        untunable[key] = failure
                        continue
                    for k, v in one.items():
                        tuned[k] = tuned.get(k, 0) + v if isinstance(v, (int, float)) else v
                tuned["untuned_subgraphs"] = sorted(untunable)
            database = TuningDatabase(path)
            report = {"trials_per_task": tune.trials, "strategy": tune.strategy, **tuned}
            if tune.database is None:
                report["database"] = None  # temporary, gone after the save
        for i, (key, mod) in enumerate(prepared.items()):
            with _runtime_failure(key, where, "TVM cannot build it"), native_warnings_dropped():
                executable = tvm.compile(mod, target=target)
                if key in untunable:
                    table[key]["schedules"] = {"used": "default", "tuning_failed": untunable[key]}
                elif database:
                    entry = table[key]
                    feeds = [dynamic_host.aligned((examples or {})[key][j], np.dtype(d))
                             for j, d in zip(entry["feeds"], entry["dtypes"])]
                    try:
                        tuned_lib = database.compile(mod, target)
                    except Exception as exc:  # noqa: BLE001 - a tuned schedule that does not apply to this graph
                        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                        entry["schedules"] = {"used": "default", "tuned_failed": why[:200]}
                    else:
                        executable, entry["schedules"] = _faster_of(tuned_lib, executable, feeds, threads)
                executable.export_library(os.fspath(folder / table[key]["tvm"]))
            if progress:
                progress("tvm build", i + 1, len(prepared))
        return report
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def _tune_in_copy(path: Path, task_lists: list[list[Any]], tune: TuneOptions,
                  progress: Callable[[str, int, int], None] | None) -> tuple[dict[str, Any] | None, str | None]:
    """Tune in a scratch copy of the database at `path`, which replaces it only when the tuning
    succeeded and TVM can read the copy again: records of a workload MetaSchedule failed on can
    leave a database no later open can parse. Returns the tuning report, or why it failed."""
    from nestnas.compile.tuning import TuningDatabase

    scratch = Path(tempfile.mkdtemp(prefix="nestnas-tuning-copy-")) / "db"
    try:
        shutil.copytree(path, scratch)
        try:
            report = TuningDatabase(scratch).tune(task_lists, tune, progress)
        except NestnasError:
            raise
        except Exception as exc:  # noqa: BLE001 - MetaSchedule raises TVM's own types
            return None, (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        try:
            TuningDatabase(scratch)
        except ConfigError as exc:
            return None, str(exc)[:200]
        shutil.copytree(scratch, path, dirs_exist_ok=True)
        if "database" in report:
            report["database"] = os.fspath(path)
        return report, None
    finally:
        shutil.rmtree(scratch.parent, ignore_errors=True)


def _faster_of(tuned: Any, default: Any, feeds: list[np.ndarray], threads: int, rounds: int = 3, runs: int = 5
               ) -> tuple[Any, dict[str, Any]]:
    """The tuned library, unless TVM's default schedules run the subgraph faster on its example
    (DeeBERT ran 0.99 ms tuned at 16 trials against 0.54 ms untuned, tools/bench_dynamic.py:
    MetaSchedule tiles and parallelises even tiny matmuls) or the tuned one fails there (a zero-extent loop
    made parallel divides by zero). Alternating rounds, the best run of each."""
    import tvm
    from tvm import relax

    from nestnas.compile.tvm_util import use_threads

    use_threads(threads)
    mains = {k: relax.VirtualMachine(e, tvm.cpu())["main"] for k, e in (("tuned", tuned), ("default", default))}
    args = [tvm.runtime.from_dlpack(a) for a in feeds]
    best = {k: float("inf") for k in mains}
    try:
        mains["tuned"](*args)
    except Exception as exc:  # noqa: BLE001 - TVM's own error types
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return default, {"used": "default", "tuned_failed": why[:200]}
    for _ in range(rounds):
        for k, main in mains.items():
            main(*args)
            for _ in range(runs):
                t0 = time.perf_counter()
                main(*args)
                best[k] = min(best[k], (time.perf_counter() - t0) * 1e3)
    used = "tuned" if best["tuned"] <= best["default"] else "default"
    return (tuned if used == "tuned" else default), {"used": used, "tuned_ms": best["tuned"],
                                                     "default_ms": best["default"]}


def _checksums(folder: Path) -> dict[str, str]:
    from nestnas.fileio import sha256_file

    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


def _check(folder: Path, backend: str, threads: int, wants: dict[str, tuple[tuple, tuple[np.ndarray, ...]]],
           where: Callable[[str], str] = lambda key: "forward") -> None:
    """Every subgraph of a staged program, run through the host runtime on its recorded example,
    equals torch within the bundles' tolerance (relative beyond outputs of magnitude 1)."""
    from nestnas.compile.bundle import tolerance

    name = {"onnxruntime": "ONNX Runtime", "tvm": "TVM"}[backend]
    import contextlib

    quiet = contextlib.nullcontext()
    if backend == "tvm":
        from nestnas.compile.tvm_util import native_warnings_dropped

        quiet = native_warnings_dropped()  # "Scope Loaded" per repacked constant of a tuned library
    try:
        with quiet:
            model = dynamic_host.Model(backend, threads, folder, session_options=_session_options(backend, threads))
    except dynamic_host.LoadError as exc:
        raise ArtifactError(f"subgraph {exc.key} ({where(exc.key)}): {name} cannot load it ({exc.why})") from None
    for key, (inputs, want) in wants.items():
        with _runtime_failure(key, where, f"{name} fails to run it on its example"):
            got = model.run.calls[key](inputs)
        for w, g in zip(want, got):
            diff = float(np.abs(w.astype(np.float64) - np.asarray(g, np.float64)).max()) if w.size else 0.0
            if np.shape(g) != w.shape or not diff <= tolerance(w):
                raise ArtifactError(f"subgraph {key} ({where(key)}): {name} differs from torch (max |diff| "
                                    f"{diff:.1e}, tolerance {tolerance(w):.1e}; shape {np.shape(g)}, torch {w.shape})")


def _session_options(backend: str, threads: int | None) -> Any:
    """The ONNX Runtime options every nestnas session uses (see `OrtBackend`); None for TVM."""
    if backend != "onnxruntime":
        return None
    import onnxruntime as ort

    from nestnas.compile.backends import get_backend

    return get_backend("onnxruntime", threads=threads)._session_options(ort)


class _Subgraph(Strict):
    onnx: ArtifactName
    tvm: Optional[ArtifactName] = None
    inputs: list[str]
    feeds: list[Annotated[int, Field(ge=0)]]
    outputs: list[str]
    dtypes: list[str]
    out_tree: Optional[list[Any]] = None  # outputs that are tuples or None (see dynamic_host.flatten)

    @model_validator(mode="after")
    def _one_dtype_per_input(self) -> "_Subgraph":
        if not len(self.inputs) == len(self.feeds) == len(self.dtypes):
            raise ValueError("inputs, feeds and dtypes must have one entry per graph input")
        return self


class DynamicManifest(Strict):
    """What `load_dynamic` and the host runtime read from a dynamic bundle's manifest."""

    format: Literal["nestnas-dynamic"]
    version: Literal[2]
    backends: list[Literal["onnxruntime", "tvm"]] = Field(min_length=1)
    threads: Optional[Annotated[int, Field(gt=0)]] = None
    subgraphs: dict[str, _Subgraph]
    artifacts: dict[ArtifactName, Sha256]
    signature: Optional[Signature] = None

    @model_validator(mode="after")
    def _loaded_files_are_artifacts(self) -> "DynamicManifest":
        for name in (HOST_FILE, PROGRAM_FILE):
            if name not in self.artifacts:
                raise ValueError(f"artifacts does not list {name}")
        for key, entry in self.subgraphs.items():
            for backend, name, suffix in (("onnxruntime", entry.onnx, ".onnx"), ("tvm", entry.tvm, ".so")):
                if backend not in self.backends:
                    continue
                if name is None or not name.endswith(suffix) or name not in self.artifacts:
                    raise ValueError(f"subgraph {key}: its {backend} file {name!r} is not a listed {suffix} artifact")
        return self


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write a dynamic bundle's manifest, signed when a bundle key is configured."""
    from nestnas.compile.signing import signed

    write_bytes(path, json.dumps(signed(manifest), indent=1).encode())


def _read_manifest(folder: Path) -> dict[str, Any]:
    from nestnas.fileio import read_document, validate

    path = folder / MANIFEST
    if not folder.is_dir() or not path.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST}; not a dynamic bundle")
    data = read_document(path, "dynamic bundle manifest", FORMAT, VERSION, ArtifactError, version_key="version")
    validate(data, DynamicManifest, path, "dynamic bundle manifest", ArtifactError)
    return data


def load_dynamic(folder: str | os.PathLike, backend: str = "onnxruntime", threads: int | None = None,
                 trust: bool = False):
    """The host runtime of a saved program, loaded on `backend`: the manifest's shape and signature
    (`trust`: accept an unsigned bundle where a bundle key is configured) are checked, the folder
    must hold exactly the listed artifacts, and the runtime, the host function and the subgraphs
    are loaded from a private copy of the bytes whose checksums were checked."""
    from nestnas.compile.signing import check_folder, check_signature, read_verified

    folder = Path(folder)
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r}; allowed: {list(BACKENDS)}")
    manifest = _read_manifest(folder)
    what = f"dynamic bundle {folder}"
    check_signature(manifest, what, trust)
    artifacts = manifest["artifacts"]
    # Importing host.py as its docstring shows leaves Python's bytecode cache; nothing loads it here.
    check_folder(folder, artifacts, what, allowed=(MANIFEST, "__pycache__"))
    if backend not in manifest["backends"]:
        raise ArtifactError(f"{folder} holds no {backend} subgraphs (it holds {manifest['backends']})")
    private = Path(tempfile.mkdtemp(prefix="nestnas-dynamic-"))
    try:
        # Every file is checked, the code first; the runtime reads only this private copy.
        for name in sorted(artifacts, key=lambda n: n not in (HOST_FILE, PROGRAM_FILE)):
            (private / name).write_bytes(read_verified(folder, name, artifacts, what))
        (private / MANIFEST).write_text(json.dumps(manifest))
        module = types.ModuleType(f"nestnas_host_{abs(hash(str(folder)))}")
        module.__file__ = str(folder / HOST_FILE)
        try:
            exec(compile((private / HOST_FILE).read_bytes(), str(folder / HOST_FILE), "exec"),  # noqa: S102
                 module.__dict__)  # verified above
            threads = threads or manifest.get("threads") or 1
            return module.Model(backend, threads, private, session_options=_session_options(backend, threads))
        except Exception as exc:  # noqa: BLE001 - the runtimes raise their own types for a bad subgraph
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ArtifactError(f"{what}: cannot load it on {backend} ({why})") from None
    finally:
        shutil.rmtree(private, ignore_errors=True)  # the sessions and libraries hold their own copies


__all__ = ["CoverageWarning", "DynamicManifest", "DynamicProgram", "load_dynamic"]
