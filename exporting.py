"""`nestnas.export` and `nestnas.load`: Pareto subnets (or any static module) to deployable
bundles, and bundles back to callables. The bridge between search results and `compile/`, which
itself only sees static modules and their configs."""

from __future__ import annotations

import dataclasses
import numbers
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from nestnas.errors import ConfigError


def default_tuning_database() -> Path:
    """`$NESTNAS_HOME/tuning/<cpu>-<threads>`: one database per machine class, reused by every export."""
    from nestnas.compile.tvm_util import host_target
    from nestnas.hw_profiles.devices import user_dir

    target = host_target(os.cpu_count() or 1)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{target.attrs.get('mcpu', 'cpu')}-{os.cpu_count()}")
    return user_dir().parent / "tuning" / name


def candidate_subnet(net, candidate, front=None, batch_size: int | None = None, name: str | None = None,
                     device: str | None = None):
    """A `compile.bundle.Subnet` for a front candidate: the extracted module and its manifest facts
    (with `device`, or a front taken for one device, the device it was chosen for)."""
    from nestnas.compile.bundle import Subnet
    from nestnas.predictors.macs import count_macs
    from nestnas.search.objectives import MetricInfo

    config = net.space.validate(candidate.config)
    objectives = {o["name"]: o for o in (front.objectives if front is not None else [])}
    latency = MetricInfo.from_dict(objectives["latency"]) if "latency" in objectives else MetricInfo()
    # The batch the front's latencies hold for (typed, from the profile) unless asked otherwise.
    batch = batch_size or latency.batch_size or 1
    macs, params = count_macs(net.space, config, **net.spec())
    info: dict[str, Any] = {"config": config.to_dict(), "hash": net.space.config_hash(config),
                            "family": net.space.family, "macs": int(macs), "params": int(params)}
    if "accuracy" in candidate.metrics:
        info["accuracy"] = {"value": candidate.metrics["accuracy"],
                            "source": objectives.get("accuracy", {}).get("source", "measured"),
                            "what": "shared-weight validation accuracy, batch norm recalibrated"}
    if "latency" in candidate.metrics:
        info["predicted_latency"] = {"ms": candidate.metrics["latency"], "unit": latency.unit or "ms",
                                     "batch": latency.batch_size, "display": latency.display,
                                     "predictor": latency.predictor.to_dict() if latency.predictor else None,
                                     "context": objectives.get("latency", {}).get("context", ""),
                                     "source": objectives.get("latency", {}).get("source", "predicted")}
    device = device or (front.meta.get("device") if front is not None else None)
    if device:
        pred = latency.predictor
        info["device"] = {"name": device, "backend": pred.backend if pred else "",
                          "threads": pred.threads if pred else None, "batch": latency.batch_size,
                          "predictor": pred.to_dict() if pred else None}
    return Subnet(name or info["hash"], net.extract(config), tuple(net.input_specs(config, batch)), info)


def device_front(front, device: str | None, where: str = "the front"):
    """The front to pick from and build for: `front` itself for one device, else device `device`'s
    front (`ParetoFront.for_device`); a fleet front without `device` is refused, naming its devices."""
    if front is None:
        if device is not None:
            raise ConfigError(f"device {device!r}: give the front it was searched in (front=...)")
        return None
    if front.devices and device is None:
        raise ConfigError(f"{where} holds {len(front.devices)} devices; choose one with --device NAME: "
                          f"{front.devices}")
    return front if device is None else front.for_device(device)


def export(what, out_dir: str | os.PathLike, *, net=None, front=None, input_shape: Sequence[int] | None = None,
           example_inputs: dict[str, Any] | Sequence[Any] | None = None, formats: Sequence[str] | None = None,
           tune_trials: int = 32, tune_seconds: float | None = None,
           tune_strategy: str = "evolutionary", tune_transfer: bool = True,
           database: str | os.PathLike | None = None, batch_size: int | None = None, threads: int | None = None,
           measure: bool = True, seed: int = 0, progress: Callable[[str, int, int], None] | None = None,
           device: str | None = None) -> dict:
    """Export one front candidate, a list of them, or a static `nn.Module` as bundles under
    `out_dir`. A module takes `input_shape` (one float32 input) or `example_inputs`: a dict
    name -> tensor or array (`forward`'s positional arguments in the dict's order; they become the
    check inputs) or a tuple of `InputSpec` (random check inputs; integer ranges recorded and
    checked at load). Shapes are static. (A single subject: `out_dir` is the bundle; several: one folder
    each, `NN-HASH`). Candidates need the supernet `net`; passing their `front` builds them at its
    latency objective's typed batch size and records unit and predictor identity in the manifests.
    `formats` defaults to those installed (ONNX, and TVM with the tvm extra); manifests are signed
    when a bundle key is configured. TVM tuning
    (`tune_trials` per unique workload on average, 0 = off; `tune_strategy` "evolutionary" or the
    faster, weaker "replay-trace"; `tune_transfer`: a workload whose relative is tuned starts from
    its adapted schedules instead of a search round)
    shares one database, by default `$NESTNAS_HOME/tuning/...`, across this and later exports.
    A front of several devices needs `device`: candidates are taken from (and built at the batch of)
    that device's front, and the manifests record the device."""
    from nestnas.compile.bundle import check_formats, export_bundles, installed_formats
    from nestnas.compile.tuning import TuneOptions
    from nestnas.search.front import Candidate, ParetoFront

    formats = check_formats(installed_formats()[0] if formats is None else formats)
    out_dir = Path(out_dir)
    if isinstance(what, ParetoFront):
        front = device_front(what, device)
        what = list(front.candidates)
    elif front is not None or device is not None:
        front = device_front(front, device)
    if isinstance(what, nn.Module):
        subnets = [_module_subnet(what, out_dir.name or "model", input_shape, example_inputs)]
    else:
        if example_inputs is not None or input_shape is not None:
            raise ConfigError("input_shape and example_inputs are for exporting an nn.Module; candidates take "
                              "their inputs from the supernet")
        items = what if isinstance(what, (list, tuple)) else [what]
        if not items or not all(isinstance(c, Candidate) for c in items):
            raise ConfigError("export takes a Candidate, a list of Candidates, a ParetoFront or an nn.Module")
        if net is None:
            raise ConfigError("exporting candidates needs the supernet they were searched on (net=...)")
        if front is not None and front.space.fingerprint() != net.space.fingerprint():
            raise ConfigError("the front was searched on another search space than this supernet's")
        if device is not None:  # candidates of a fleet front, seen on the chosen device (metrics the caller set kept)
            by_hash = {c.hash: c for c in front.evaluated}
            items = [dataclasses.replace(c, metrics={**by_hash[c.hash].metrics, **{k: v for k, v in c.metrics.items()
                                                                                   if "@" not in k}})
                     if c.hash in by_hash else c for c in items]
        subnets = [candidate_subnet(net, c, front, batch_size, device=device) for c in items]
    if len(subnets) == 1:
        dirs = [out_dir]
    else:
        dirs = [out_dir / f"{i:02d}-{s.info.get('hash', s.name)}" for i, s in enumerate(subnets)]
    tune = TuneOptions(trials=tune_trials if "tvm" in formats else 0, max_seconds=tune_seconds, strategy=tune_strategy,
                       database=database or (default_tuning_database() if "tvm" in formats and tune_trials else None),
                       seed=seed, transfer=tune_transfer)
    with torch.no_grad():
        return export_bundles(subnets, dirs, formats=formats, tune=tune, threads=threads, measure=measure, seed=seed,
                              progress=progress)


def _module_subnet(module: nn.Module, name: str, input_shape, example_inputs):
    """The `Subnet` of a user's module from its `input_shape` or its `example_inputs`."""
    from nestnas.compile.bundle import Subnet
    from nestnas.supernet.inputs import InputSpec

    if example_inputs is None:
        return Subnet(name, module, _input_shape(input_shape), {})
    if input_shape is not None:
        raise ConfigError("give input_shape or example_inputs, not both")
    if isinstance(example_inputs, dict):
        if not example_inputs:
            raise ConfigError("example_inputs: give at least one input (a dict name -> tensor or array)")
        for key, value in example_inputs.items():
            if not isinstance(key, str) or not hasattr(value, "shape"):
                raise ConfigError(f"example_inputs: {key!r} -> {type(value).__name__}; give a dict name -> tensor "
                                  "or numpy array")
        return Subnet(name, module, None, {}, examples=example_inputs)
    specs = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else ()
    if not specs or not all(isinstance(s, InputSpec) for s in specs):
        raise ConfigError("example_inputs: give a dict name -> tensor or array, or a tuple of InputSpec")
    return Subnet(name, module, specs, {})


def _input_shape(shape: Sequence[int] | None) -> tuple[int, ...]:
    if shape is None:
        raise ConfigError("exporting a module needs its input_shape (one float input) or example_inputs "
                          "(a dict name -> tensor)")
    try:
        dims = tuple(shape)
    except TypeError:
        dims = ()
    if not dims or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in dims):
        raise ConfigError(f"input_shape {shape!r}: give positive integers, e.g. (1, 3, 224, 224)")
    return tuple(int(d) for d in dims)


def load(bundle: str | os.PathLike, backend: str = "onnxruntime", threads: int | None = None, trust: bool = False):
    """The bundle's model as a callable (numpy in, numpy out), after verifying its manifest, its
    signature where a bundle key is configured (`trust=True` accepts an unsigned bundle), and
    every checksum. A bundle of several or typed inputs takes a dict of arrays by input name."""
    from nestnas.compile.bundle import load_bundle

    return load_bundle(bundle, backend, threads, trust)
