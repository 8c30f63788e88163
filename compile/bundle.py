"""Deployable bundles: one folder per subnet with `model.onnx`, the TVM library, a check input
and its torch output, and `manifest.json` (config, hash, shapes, MACs, params, accuracy, predicted
and measured latency, versions, and the sha256 of every artifact).

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

from nestnas.compile.backends import OrtModel, TvmModel, get_backend
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


@dataclass
class Subnet:
    """What to bundle: a static module, its input shape, and what is known about it."""

    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    info: dict[str, Any] = field(default_factory=dict)  # config, hash, macs, params, accuracy, predicted...


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
        x = torch.randn(sub.input_shape, generator=torch.Generator().manual_seed(seed + i))
        module = sub.module.eval()
        want = _forward_or_explain(module, x, sub.name)
        onnx_path = export_onnx(module, x, folder / FILES["onnx"], exporter="dynamo")
        np.save(folder / CHECK_INPUT, x.numpy(), allow_pickle=False)
        np.save(folder / CHECK_OUTPUT, want, allow_pickle=False)
        ort = get_backend("onnxruntime", threads=threads)._build(onnx_path, x)
        diff = float(np.abs(ort(x.numpy()) - want).max())
        if not diff <= tolerance(want):
            raise ArtifactError(f"{sub.name}: ONNX Runtime differs from torch by {diff:.2e} "
                                f"(> {tolerance(want):.1e})")
        staged.append({"folder": folder, "x": x, "onnx_diff": diff, "ort": ort})
        if progress:
            progress("onnx", i + 1, len(subnets))
    report: dict[str, Any] = {"tuning": None}
    if "tvm" in formats:
        target = host_target(threads)
        prepared = []
        for s, sub in zip(staged, subnets):
            prepared.append(prepare(relax_module(s["folder"] / FILES["onnx"], sub.input_shape, INPUT_NAME), target))
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
                                                            sub.input_shape, threads, s["x"].numpy())
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
        manifest["artifacts"] = _checksums(s["folder"], formats)
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


def _forward_or_explain(module: nn.Module, x: torch.Tensor, name: str) -> np.ndarray:
    """The module's output on `x`, or a ConfigError saying what input its first layer takes."""
    try:
        with torch.no_grad():
            return module(x).numpy()
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
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


def _faster_of(tuned: Any, default: Any, shape: tuple[int, ...], threads: int, x: np.ndarray) -> tuple[Any, dict]:
    """The tuned library, unless TVM's default schedules run the whole model faster: MetaSchedule
    parallelises even the tiniest kernels, and for a small subnet at batch 1 the thread pool's
    fork-join can cost more than it saves (measured 0.068 ms tuned against 0.043 ms untuned).
    Measured alternately, FASTER_OF_SWEEPS times each, medians compared."""
    models = {"tuned": TvmModel(tuned, shape, threads), "default": TvmModel(default, shape, threads)}
    runner = get_runner("tvm")
    runs = interleaved_sweeps(list(models), lambda _, k: runner.measure(models[k], x).median_ms, FASTER_OF_SWEEPS)
    ms = {k: float(np.median(v)) for k, v in runs.items()}
    used = "tuned" if ms["tuned"] <= ms["default"] else "default"
    return (tuned if used == "tuned" else default), {"used": used, "tuned_ms": ms["tuned"],
                                                     "default_ms": ms["default"]}


def _checksums(folder: Path, formats: Sequence[str]) -> dict[str, str]:
    names = [FILES[f] for f in formats] + [CHECK_INPUT, CHECK_OUTPUT]
    return {n: sha256_file(folder / n) for n in names}


def _manifest(sub: Subnet, staged: dict, formats, tune: TuneOptions, tuning: dict | None, threads: int) -> dict:
    info = dict(sub.info)
    manifest = {
        "format": FORMAT, "version": VERSION, "name": sub.name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                       time.gmtime()),
        "formats": list(formats), "files": {f: FILES[f] for f in formats},
        "input": {"name": INPUT_NAME, "shape": list(sub.input_shape), "dtype": "float32"},
        "output": {"name": OUTPUT_NAME},
        **{k: info.pop(k) for k in ("config", "hash", "family", "macs", "params", "accuracy", "predicted_latency")
           if k in info},
        "extra": info, "threads": threads, "versions": versions(),
        "verified": {"tolerance": tolerance(np.load(staged["folder"] / CHECK_OUTPUT, allow_pickle=False)),
                     "onnxruntime_max_abs_diff": staged["onnx_diff"]},
        "tuning": ({"trials_per_task": tune.trials, "strategy": tune.strategy, **(tuning or {}),
                    **({"schedules": staged["schedules"]} if "schedules" in staged else {})}
                   if "tvm" in formats else None),
        "artifacts": _checksums(staged["folder"], formats),
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
        for fmt in self.formats:
            name = self.files.get(fmt)
            if name is None:
                raise ValueError(f"files has no {fmt} entry, but formats lists {fmt}")
            if not name.endswith(SUFFIXES[fmt]):
                raise ValueError(f"files.{fmt} is {name!r}; a {fmt} artifact ends in {SUFFIXES[fmt]}")
            if name not in self.artifacts:
                raise ValueError(f"files.{fmt} is {name!r}, which is not a listed artifact")
        return self


def read_manifest(bundle: str | os.PathLike) -> dict[str, Any]:
    """The manifest, checked against its schema (not yet its signature or checksums)."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise ArtifactError(f"bundle folder not found: {bundle}")
    path = bundle / MANIFEST
    data = read_document(path, "bundle manifest", FORMAT, VERSION, ArtifactError, version_key="version")
    validate(data, BundleManifest, path, "bundle manifest", ArtifactError)
    return data


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
    accept an unsigned bundle where a bundle key is configured). What is loaded are the checked bytes."""
    fmt = {"onnxruntime": "onnx", "tvm": "tvm"}.get(backend)
    if fmt is None:
        raise ConfigError(f"backend {backend!r}; allowed: ['onnxruntime', 'tvm']")
    bundle = Path(bundle)
    manifest = verify_checksums(bundle, trust)
    if fmt not in manifest["formats"]:
        raise ArtifactError(f"bundle {bundle} has no {fmt} artifact (it holds {manifest['formats']})")
    shape = tuple(manifest["input"]["shape"])
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
        names = [i.name for i in session.get_inputs()]
        if names != [manifest["input"]["name"]]:
            raise ArtifactError(f"bundle {bundle}: {name} takes inputs {names}, the manifest says "
                                f"[{manifest['input']['name']!r}]")
        return OrtModel(session, shape)
    tvm = require_tvm()
    try:
        module = _load_library_copy(tvm, data)
        return TvmModel(module, shape, threads or os.cpu_count() or 1)
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
    x = read_array(bundle, manifest, CHECK_INPUT)
    for fmt in formats or manifest["formats"]:
        backend = "onnxruntime" if fmt == "onnx" else "tvm"
        model = load_bundle(bundle, backend, threads, trust)
        try:
            m = get_runner(backend).measure(model, x).to_dict()
        except Exception as exc:  # noqa: BLE001 - a verified but wrong check input fails in the runtime
            raise ArtifactError(f"bundle {bundle}: {backend} cannot run {CHECK_INPUT} "
                                f"({_first_line(exc)})") from None
        out[backend] = {k: m[k] for k in ("median_ms", "p10_ms", "p90_ms", "cv", "repeats", "stable")}
    return out


__all__ = ["FORMATS", "BundleManifest", "OrtModel", "Subnet", "TuneOptions", "export_bundles", "installed_formats",
           "load_bundle", "measure_bundle", "read_array", "read_manifest", "verify_checksums"]
