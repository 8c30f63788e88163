"""Deployable bundles: one folder per subnet with `model.onnx`, the TVM library, a check input
and its torch output, and `manifest.json` (config, hash, shapes, MACs, params, accuracy, predicted
and measured latency, versions, and the sha256 of every artifact).

Inputs: a module of one float32 input named ``input`` has the manifest entry ``input`` and the
check input ``check_input.npy``, as bundles always had. Any other module (several inputs, integer
ids and masks) has ``inputs``: a list of ``{name, dtype, shape, check}`` in `forward`'s order,
one check file per input (``check_input.NAME.npy``), and for integer inputs of declared range
``low``/``high``, which `load_bundle`'s model checks before running (TVM does not bounds-check
gathers).

`export_bundles` builds several subnets at once so that TVM tuning is shared (see `tuning`). Each
bundle is written into a temporary folder beside its destination and renamed into place only when
complete and verified: ONNX Runtime within 1e-4 of torch in this process, and the TVM library
within 1e-4 after reloading it in a fresh process. `load_bundle` checks the manifest's shape and
signature (see `signing`) and that the folder holds exactly the listed artifacts, each matching its
checksum, before it loads anything; what it loads are the bytes it checked.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Literal, Optional, Sequence, Union

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from nestnas.compile.backends import OrtModel, TvmModel, get_backend, graph_input_names
from nestnas.compile.feeds import as_specs, declared_bounds, describe, is_classic
from nestnas.compile.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx
from nestnas.compile.runners import get_runner
from nestnas.compile.signing import (
    ArtifactName,
    Sha256,
    Signature,
    Strict,
    check_folder,
    check_signature,
    configured_key,
    read_verified,
    signed,
)
from nestnas.compile.stats import interleaved_sweeps
from nestnas.compile.tuning import TuneOptions, TuningDatabase, extract_tasks, prepare, relax_module
from nestnas.compile.tvm_util import host_target, native_warnings_dropped, require_tvm
from nestnas.errors import ArtifactError, BackendUnavailable, ConfigError
from nestnas.fileio import _umask, read_document, sha256_file, validate, write_json
from nestnas.supernet.inputs import InputSpec, example_inputs, specs_of

FORMAT, VERSION = "nestnas-bundle", 1
FORMATS = ("onnx", "tvm")
MANIFEST = "manifest.json"
TVM_EXTRA = "pip install 'nestnas[tvm]'"
FASTER_OF_SWEEPS = 2  # tuned, default, default, tuned
TOLERANCE = 1e-4  # absolute for outputs up to 1 in magnitude, relative to the largest output beyond


def tolerance(want: np.ndarray) -> float:
    """Float32 rounding grows with the size of the outputs (logits of a trained net at batch 128
    differ by 1.5e-4 between ONNX Runtime and torch at magnitudes around 20)."""
    return TOLERANCE * max(1.0, float(np.abs(want).max()) if want.size else 1.0)
FILES = {"onnx": "model.onnx", "tvm": "model_tvm.so"}
SUFFIXES = {"onnx": ".onnx", "tvm": ".so"}
CHECK_INPUT, CHECK_OUTPUT = "check_input.npy", "check_output.npy"


_ANY_INT = (-(2**63), 2**63 - 1)


def check_file(name: str) -> str:
    """The check input of the typed input `name`."""
    return f"check_input.{name}.npy"


@dataclass
class Subnet:
    """What to bundle: a static module, its inputs, and what is known about it.

    `input_shape` is a shape (one float32 input named ``input``) or a tuple of `InputSpec`
    (`forward`'s positional arguments in order, e.g. `net.input_specs(config, batch)`); after
    construction `inputs` holds the specs and `input_shape` the shape of a single float input
    (None otherwise). `examples` (name -> tensor or array, optional) are the check inputs to
    use instead of random ones drawn from the specs; integer ranges are then not recorded."""

    name: str
    module: nn.Module
    input_shape: Any
    info: dict[str, Any] = field(default_factory=dict)  # config, hash, macs, params, accuracy, predicted...
    examples: Optional[dict[str, Any]] = None
    inputs: tuple[InputSpec, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.examples is not None:
            self.examples = {k: v.detach().cpu() if isinstance(v, torch.Tensor)
                             else torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.examples.items()}
            self.inputs = specs_of(self.examples)
        else:
            self.inputs = as_specs(self.input_shape)
        self.input_shape = self.inputs[0].shape if is_classic(self.inputs) else None

    @property
    def bounded(self) -> bool:
        """Whether the integer inputs' ranges are declared (specs given, not example values)."""
        return self.examples is None

    def example(self, seed: int) -> dict[str, torch.Tensor]:
        """The check inputs by name: the given examples, or drawn from the specs with `seed`."""
        return dict(self.examples) if self.examples is not None else example_inputs(self.inputs, seed)

    def check_files(self) -> list[str]:
        return [CHECK_INPUT] if is_classic(self.inputs) else [check_file(s.name) for s in self.inputs]


def check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"formats: unknown format {bad[0]!r}; allowed: {list(FORMATS)}" if bad
                          else f"formats: give at least one of {list(FORMATS)}")
    if "tvm" in formats:
        try:
            require_tvm()
        except BackendUnavailable:
            raise BackendUnavailable(f"--formats tvm: the tvm extra is not installed ({TVM_EXTRA})") from None
    return formats


def installed_formats() -> tuple[tuple[str, ...], str | None]:
    """The formats this install can build, and a note saying which extra adds the missing one."""
    try:
        require_tvm()
    except BackendUnavailable:
        return ("onnx",), f"TVM is not installed, so bundles hold ONNX only ({TVM_EXTRA} adds TVM)"
    return FORMATS, None


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    from nestnas import __version__

    out = {"nestnas": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
           "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
    with contextlib.suppress(Exception):
        out["tvm"] = require_tvm().__version__
    return out


@contextlib.contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """A temporary folder beside `final`, renamed over it on success and removed on failure."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a bundle gets the user's usual permissions
    except OSError as exc:
        raise ConfigError(f"out_dir {final}: cannot write there ({exc.strerror})") from None
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_bundles(subnets: Sequence[Subnet], out_dirs: Sequence[str | os.PathLike], *,
                   formats: Sequence[str] = FORMATS, tune: TuneOptions | None = None, threads: int | None = None,
                   measure: bool = True, seed: int = 0,
                   progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Bundle each subnet into its folder; TVM tuning is shared by all of them. Returns the
    manifests and the tuning report."""
    formats = check_formats(formats)
    tune = tune or TuneOptions(trials=0)
    if len(subnets) != len(out_dirs):
        raise ConfigError("one output folder per subnet")
    configured_key()  # a malformed key fails before any work
    ort_backend = get_backend("onnxruntime", threads=threads)
    threads = ort_backend.threads
    work = Path(tempfile.mkdtemp(prefix="nestnas-export-"))
    try:
        return _export(subnets, [Path(d) for d in out_dirs], formats, tune, threads, measure, seed, work, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _export(subnets, out_dirs, formats, tune, threads, measure, seed, work, progress):
    staged = []
    for i, sub in enumerate(subnets):  # 1. ONNX for everyone (TVM compiles the same file)
        folder = work / f"{i}"
        folder.mkdir()
        xs = sub.example(seed + i)  # one float input: the same draw as torch.randn(shape) from the seed
        module = sub.module.eval()
        want = _forward_or_explain(module, xs, sub)
        onnx_path = export_onnx(module, tuple(xs.values()), folder / FILES["onnx"], exporter="dynamo",
                                input_names=list(xs))
        _check_graph_inputs(onnx_path, sub)
        feed = {k: v.numpy() for k, v in xs.items()}
        for name, array in zip(sub.check_files(), feed.values()):
            np.save(folder / name, array, allow_pickle=False)
        np.save(folder / CHECK_OUTPUT, want, allow_pickle=False)
        ort = get_backend("onnxruntime", threads=threads)._build(onnx_path, sub.inputs)
        diff = float(np.abs(ort(feed) - want).max())
        if not diff <= tolerance(want):
            raise ArtifactError(f"{sub.name}: ONNX Runtime differs from torch by {diff:.2e} "
                                f"(> {tolerance(want):.1e})")
        staged.append({"folder": folder, "x": feed, "onnx_diff": diff, "ort": ort})
        if progress:
            progress("onnx", i + 1, len(subnets))
    report: dict[str, Any] = {"tuning": None}
    if "tvm" in formats:
        target = host_target(threads)
        prepared = []
        for s, sub in zip(staged, subnets):
            inputs = {spec.name: (spec.shape, spec.dtype) for spec in sub.inputs}
            prepared.append(prepare(relax_module(s["folder"] / FILES["onnx"], sub.input_shape, INPUT_NAME, inputs),
                                    target))
        database = None
        if tune.enabled:
            database = TuningDatabase(tune.database or work / "tuning")
            report["tuning"] = database.tune([extract_tasks(p, target) for p in prepared], tune, progress)
        for i, (s, sub, mod) in enumerate(zip(staged, subnets, prepared)):
            tvm = require_tvm()
            with native_warnings_dropped():
                executable = tvm.compile(mod, target=target)
                if database:
                    executable, s["schedules"] = _faster_of(database.compile(mod, target), executable,
                                                            sub.inputs, threads, s["x"])
                executable.export_library(os.fspath(s["folder"] / FILES["tvm"]))
            if progress:
                progress("tvm build", i + 1, len(staged))
    manifests = []
    for i, (s, sub, final) in enumerate(zip(staged, subnets, out_dirs)):
        manifest = _manifest(sub, s, formats, tune, report["tuning"], threads)
        manifest = _write_manifest(s["folder"], manifest)
        if "tvm" in formats:
            manifest["verified"]["tvm_max_abs_diff"] = _verify_fresh_process(s["folder"])
        if measure:
            manifest["measured"] = measure_bundle(s["folder"], formats, threads)
        manifest["artifacts"] = _checksums(s["folder"], formats, sub.check_files())
        manifest = _write_manifest(s["folder"], manifest)
        with staged_folder(final) as tmp:
            for f in s["folder"].iterdir():
                shutil.move(os.fspath(f), os.fspath(tmp / f.name))
        manifests.append(manifest)
        if progress:
            progress("bundles", i + 1, len(staged))
    return {"manifests": manifests, "folders": [str(d) for d in out_dirs], **report}


def _write_manifest(folder: Path, manifest: dict) -> dict:
    """Write the manifest, signed when a bundle key is configured; returns what was written."""
    manifest = signed(manifest)
    write_json(folder / MANIFEST, manifest)
    return manifest


def _forward_or_explain(module: nn.Module, xs: dict[str, torch.Tensor], sub: Subnet) -> np.ndarray:
    """The module's output on the inputs `xs` (positional, in order), or a ConfigError saying
    what input its first layer takes."""
    name = sub.name
    try:
        with torch.no_grad():
            out = module(*xs.values())
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        if not is_classic(sub.inputs):
            raise ConfigError(f"{name}: the inputs {describe(sub.inputs)} do not fit the module's forward "
                              f"({_first_line(exc)})") from None
        x = xs[INPUT_NAME]
        first = next((m for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))),
                     None)
        if isinstance(first, nn.Linear):
            takes = f"; its first layer, Linear, takes (..., {first.in_features})"
        elif first is not None:
            dims = {1: "L", 2: "H, W", 3: "D, H, W"}[first.weight.dim() - 2]
            takes = f"; its first layer, {type(first).__name__}, takes (N, {first.in_channels}, {dims})"
        else:
            takes = ""
        raise ConfigError(f"{name}: input_shape {tuple(x.shape)} does not fit the module "
                          f"({_first_line(exc)}){takes}") from None
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"{name}: the module returns a {type(out).__name__}; a bundle holds a module that "
                          "returns one tensor")
    return out.numpy()


def _check_graph_inputs(onnx_path: Path, sub: Subnet) -> None:
    """The exported graph takes exactly the declared inputs, in order (what `load_bundle` feeds)."""
    import onnx

    names = graph_input_names(onnx.load(os.fspath(onnx_path), load_external_data=False))
    if names != [s.name for s in sub.inputs]:
        raise ArtifactError(f"{sub.name}: the exported graph takes inputs {names}, the module was given "
                            f"{[s.name for s in sub.inputs]}")


def _faster_of(tuned: Any, default: Any, inputs: Any, threads: int, x: Any) -> tuple[Any, dict]:
    """The tuned library, unless TVM's default schedules run the whole model faster: MetaSchedule
    parallelises even the tiniest kernels, and for a small subnet at batch 1 the thread pool's
    fork-join can cost more than it saves (measured 0.068 ms tuned against 0.043 ms untuned).
    Measured alternately, FASTER_OF_SWEEPS times each, medians compared."""
    models = {"tuned": TvmModel(tuned, inputs, threads), "default": TvmModel(default, inputs, threads)}
    runner = get_runner("tvm")
    runs = interleaved_sweeps(list(models), lambda _, k: runner.measure(models[k], x).median_ms, FASTER_OF_SWEEPS)
    ms = {k: float(np.median(v)) for k, v in runs.items()}
    used = "tuned" if ms["tuned"] <= ms["default"] else "default"
    return (tuned if used == "tuned" else default), {"used": used, "tuned_ms": ms["tuned"],
                                                     "default_ms": ms["default"]}


def _checksums(folder: Path, formats: Sequence[str], checks: Sequence[str]) -> dict[str, str]:
    names = [FILES[f] for f in formats] + [*checks, CHECK_OUTPUT]
    return {n: sha256_file(folder / n) for n in names}


def _input_entries(sub: Subnet) -> dict[str, Any]:
    """The manifest's ``input`` (one float input, as always) or ``inputs`` entry."""
    if is_classic(sub.inputs):
        return {"input": {"name": INPUT_NAME, "shape": list(sub.input_shape), "dtype": "float32"}}
    entries, bounds = [], declared_bounds(sub.inputs) if sub.bounded else {}
    for spec, check in zip(sub.inputs, sub.check_files()):
        entry = {"name": spec.name, "dtype": spec.dtype, "shape": list(spec.shape), "check": check}
        if spec.name in bounds:
            entry.update(low=bounds[spec.name][0], high=bounds[spec.name][1])
        entries.append(entry)
    return {"inputs": entries}


def _manifest(sub: Subnet, staged: dict, formats, tune: TuneOptions, tuning: dict | None, threads: int) -> dict:
    info = dict(sub.info)
    manifest = {
        "format": FORMAT, "version": VERSION, "name": sub.name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                       time.gmtime()),
        "formats": list(formats), "files": {f: FILES[f] for f in formats},
        **_input_entries(sub),
        "output": {"name": OUTPUT_NAME},
        **{k: info.pop(k) for k in ("config", "hash", "family", "macs", "params", "accuracy", "predicted_latency",
                                    "device") if k in info},
        "extra": info, "threads": threads, "versions": versions(),
        "verified": {"tolerance": tolerance(np.load(staged["folder"] / CHECK_OUTPUT, allow_pickle=False)),
                     "onnxruntime_max_abs_diff": staged["onnx_diff"]},
        "tuning": ({"trials_per_task": tune.trials, "strategy": tune.strategy, **(tuning or {}),
                    **({"schedules": staged["schedules"]} if "schedules" in staged else {})}
                   if "tvm" in formats else None),
        "artifacts": _checksums(staged["folder"], formats, sub.check_files()),
    }
    if "tvm" in formats:
        manifest["target"] = str(host_target(threads))
    return manifest


def _verify_fresh_process(folder: Path) -> float:
    """Reload the TVM library in a new interpreter (checksums verified first) and compare its
    output on the check input with torch's."""
    proc = subprocess.run([sys.executable, "-m", "nestnas.compile.verify", os.fspath(folder), "tvm"],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise ArtifactError(f"the TVM library of {folder.name} failed to reload in a fresh process: "
                            f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    diff = float(json.loads(proc.stdout)["max_abs_diff"])
    limit = tolerance(np.load(folder / CHECK_OUTPUT, allow_pickle=False))
    if not diff <= limit:
        raise ArtifactError(f"the reloaded TVM library differs from torch by {diff:.2e} (> {limit:.1e})")
    return diff


class _Input(Strict):
    name: str
    shape: list[Annotated[int, Field(gt=0)]] = Field(min_length=1)
    dtype: Literal["float32"]


class _TypedInput(Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
    dtype: Literal["float32", "int64", "int32", "bool"]
    shape: list[Annotated[int, Field(gt=0)]] = Field(min_length=1)
    check: ArtifactName
    low: Optional[int] = None
    high: Optional[int] = None

    @model_validator(mode="after")
    def _range(self) -> "_TypedInput":
        if (self.low is None) != (self.high is None) or self.high is not None and self.high <= self.low:
            raise ValueError(f"input {self.name!r}: give both low and high, with high > low")
        return self


class _Named(Strict):
    name: str


class _Measured(Strict):
    median_ms: float


class _Accuracy(Strict):
    value: float


class _PredictorRef(Strict):  # nestnas.search.objectives.PredictorId.to_dict()
    kind: str
    file: str = ""
    sha256: str = ""
    device: str = ""
    backend: str = ""
    threads: Optional[int] = None


class _Predicted(Strict):
    ms: float
    unit: str = "ms"
    batch: Optional[Annotated[int, Field(gt=0)]] = None  # the batch the prediction holds for
    predictor: Union[_PredictorRef, str, None] = None  # typed identity; older bundles: a context string


class BundleManifest(Strict):
    """What `load_bundle`, `measure_bundle` and `nestnas bench` read from a manifest."""

    name: str
    formats: list[Literal["onnx", "tvm"]] = Field(min_length=1)
    files: dict[Literal["onnx", "tvm"], ArtifactName]
    input: _Input
    output: _Named
    artifacts: dict[ArtifactName, Sha256] = Field(min_length=1)
    threads: Optional[Annotated[int, Field(gt=0)]] = None
    measured: Optional[dict[str, _Measured]] = None
    accuracy: Optional[_Accuracy] = None
    predicted_latency: Optional[_Predicted] = None
    macs: Optional[int] = None
    hash: Optional[str] = None
    family: Optional[str] = None
    signature: Optional[Signature] = None

    @model_validator(mode="after")
    def _files_are_artifacts(self) -> "BundleManifest":
        for entry in getattr(self, "inputs", None) or []:
            if entry.check not in self.artifacts:
                raise ValueError(f"input {entry.name!r}: check {entry.check!r} is not a listed artifact")
        for fmt in self.formats:
            name = self.files.get(fmt)
            if name is None:
                raise ValueError(f"files has no {fmt} entry, but formats lists {fmt}")
            if not name.endswith(SUFFIXES[fmt]):
                raise ValueError(f"files.{fmt} is {name!r}; a {fmt} artifact ends in {SUFFIXES[fmt]}")
            if name not in self.artifacts:
                raise ValueError(f"files.{fmt} is {name!r}, which is not a listed artifact")
        return self


class TypedBundleManifest(BundleManifest):
    """A bundle of typed inputs: ``inputs`` (one entry per input, in order) instead of ``input``."""

    input: None = None
    inputs: list[_TypedInput] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> "TypedBundleManifest":
        names = [i.name for i in self.inputs]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValueError(f"inputs: the name {dup!r} appears twice")
        return self


def read_manifest(bundle: str | os.PathLike) -> dict[str, Any]:
    """The manifest, checked against its schema (not yet its signature or checksums)."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise ArtifactError(f"bundle folder not found: {bundle}")
    path = bundle / MANIFEST
    data = read_document(path, "bundle manifest", FORMAT, VERSION, ArtifactError, version_key="version")
    schema = TypedBundleManifest if isinstance(data, dict) and "inputs" in data else BundleManifest
    validate(data, schema, path, "bundle manifest", ArtifactError)
    return data


def manifest_inputs(manifest: dict[str, Any]) -> tuple[tuple[InputSpec, ...], dict[str, tuple[int, int]]]:
    """The inputs of a (schema-checked) manifest as `InputSpec`s, in order, and the recorded
    ranges of integer inputs by name (checked before every run)."""
    if "inputs" not in manifest:
        return as_specs(tuple(manifest["input"]["shape"])), {}
    entries = manifest["inputs"]
    bounds = {e["name"]: (e["low"], e["high"]) for e in entries if e.get("high") is not None}
    # An integer input of unrecorded range gets the whole int64 range (never checked against).
    specs = tuple(InputSpec(e["name"], tuple(e["shape"]), e["dtype"],
                            *bounds.get(e["name"], _ANY_INT if e["dtype"] in ("int64", "int32") else (0, None)))
                  for e in entries)
    return specs, bounds


def bundle_batch(manifest: dict[str, Any]) -> int:
    """The batch a bundle was built at: the first axis of its (first) input."""
    return int((manifest["input"] if "inputs" not in manifest else manifest["inputs"][0])["shape"][0])


def check_inputs(bundle: str | os.PathLike, manifest: dict[str, Any]) -> Any:
    """The checked check input of a verified bundle: one array (one float input), or a dict by name."""
    if "inputs" not in manifest:
        return read_array(bundle, manifest, CHECK_INPUT)
    return {e["name"]: read_array(bundle, manifest, e["check"]) for e in manifest["inputs"]}


def verify_checksums(bundle: str | os.PathLike, trust: bool = False) -> dict[str, Any]:
    """The manifest, after checking its schema, its signature (see `signing.check_signature`),
    that the folder holds exactly the listed artifacts, and the sha256 of every one."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    check_signature(manifest, f"bundle {bundle}", trust)
    artifacts = manifest["artifacts"]
    check_folder(bundle, artifacts, f"bundle {bundle}", allowed=(MANIFEST,))
    for name in artifacts:
        if sha256_file(bundle / name) != artifacts[name]:
            raise ArtifactError(f"bundle {bundle}: {name} does not match its checksum in manifest.json "
                                "(tampered or truncated); refusing to load it")
    return manifest


def read_array(bundle: str | os.PathLike, manifest: dict[str, Any], name: str) -> np.ndarray:
    """A checked `.npy` artifact (check input or output) of a verified bundle."""
    data = read_verified(Path(bundle), name, manifest["artifacts"], f"bundle {bundle}")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ArtifactError(f"bundle {bundle}: {name} is not a numpy array file ({exc})") from None


def load_bundle(bundle: str | os.PathLike, backend: str = "onnxruntime", threads: int | None = None,
                trust: bool = False):
    """A callable model (numpy in, numpy out) from a bundle, after `verify_checksums` (`trust`:
    accept an unsigned bundle where a bundle key is configured). What is loaded are the checked bytes.
    A bundle of typed inputs takes a dict of arrays by input name (see `feeds.check_feed`), integer
    inputs checked against their recorded ranges."""
    fmt = {"onnxruntime": "onnx", "tvm": "tvm"}.get(backend)
    if fmt is None:
        raise ConfigError(f"backend {backend!r}; allowed: ['onnxruntime', 'tvm']")
    bundle = Path(bundle)
    manifest = verify_checksums(bundle, trust)
    if fmt not in manifest["formats"]:
        raise ArtifactError(f"bundle {bundle} has no {fmt} artifact (it holds {manifest['formats']})")
    specs, bounds = manifest_inputs(manifest)
    names = [s.name for s in specs] if "inputs" in manifest else [manifest["input"]["name"]]
    threads = threads or manifest.get("threads")
    name = manifest["files"][fmt]
    data = read_verified(bundle, name, manifest["artifacts"], f"bundle {bundle}")
    if fmt == "onnx":
        import onnxruntime as ort

        backend_obj = get_backend("onnxruntime", threads=threads)
        try:
            session = ort.InferenceSession(data, backend_obj._session_options(ort), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - the runtime raises its own exception types
            raise ArtifactError(f"bundle {bundle}: ONNX Runtime cannot load {name} "
                                f"({_first_line(exc)})") from None
        takes = [i.name for i in session.get_inputs()]
        if takes != names:
            raise ArtifactError(f"bundle {bundle}: {name} takes inputs {takes}, the manifest says {names}")
        return OrtModel(session, specs, bounds)
    tvm = require_tvm()
    try:
        module = _load_library_copy(tvm, data)
        return TvmModel(module, specs, threads or os.cpu_count() or 1, bounds)
    except Exception as exc:  # noqa: BLE001 - TVM raises its own exception types
        raise ArtifactError(f"bundle {bundle}: TVM cannot load {name} ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _load_library_copy(tvm, data: bytes):
    """Load a private copy of a compiled library from its checked bytes: the loaded code no
    longer maps the bundle's file, which may be rewritten while it is in use."""
    fd, private = tempfile.mkstemp(prefix="nestnas-lib-", suffix=".so")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        with native_warnings_dropped():  # "Scope Loaded" per repacked constant of a tuned library
            return tvm.runtime.load_module(private)
    finally:
        os.unlink(private)  # the loaded mapping outlives the name


def measure_bundle(bundle: str | os.PathLike, formats: Sequence[str] | None = None,
                   threads: int | None = None, trust: bool = False) -> dict[str, Any]:
    """Latency of each artifact of a bundle on this device (median, p10, p90 in ms)."""
    manifest = verify_checksums(bundle, trust)
    out = {}
    x = check_inputs(bundle, manifest)
    for fmt in formats or manifest["formats"]:
        backend = "onnxruntime" if fmt == "onnx" else "tvm"
        model = load_bundle(bundle, backend, threads, trust)
        try:
            m = get_runner(backend).measure(model, x).to_dict()
        except Exception as exc:  # noqa: BLE001 - a verified but wrong check input fails in the runtime
            what = CHECK_INPUT if "inputs" not in manifest else "its check inputs"
            raise ArtifactError(f"bundle {bundle}: {backend} cannot run {what} ({_first_line(exc)})") from None
        out[backend] = {k: m[k] for k in ("median_ms", "p10_ms", "p90_ms", "cv", "repeats", "stable")}
    return out


__all__ = ["FORMATS", "BundleManifest", "OrtModel", "Subnet", "TuneOptions", "TypedBundleManifest", "bundle_batch",
           "check_inputs", "export_bundles", "installed_formats", "load_bundle", "manifest_inputs", "measure_bundle",
           "read_array", "read_manifest", "verify_checksums"]
