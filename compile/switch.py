"""A supernet switched at run time among K nested subnets by a latency budget (SortedNet-style
switching: the subnets share the supernet's weights and nothing is searched at run time).

Plain PyTorch with ordinary Python control flow in `forward`: `nestnas.rewrite` turns it into
one static subgraph per subnet and a host module that picks among them.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import time
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, Sequence

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from nestnas.compile.signing import Strict
from nestnas.errors import ArtifactError, ConfigError


class BudgetSwitch(nn.Module):
    """Run the most accurate subnet whose latency (ms, on the target device) fits `budget_ms`,
    else the fastest (with a warning); `configs` are ordered from least to most accurate."""

    def __init__(self, net: nn.Module, configs: Sequence, latencies_ms: Sequence[float]):
        super().__init__()
        if not configs or len(configs) != len(latencies_ms):
            raise ConfigError(f"give one latency per subnet: {len(configs)} subnets, {len(latencies_ms)} latencies")
        self.net = net
        self.configs = [net.space.canonical(c) for c in configs]
        specs = net.input_specs(self.configs[-1], 1) if hasattr(net, "input_specs") else ()
        if len(specs) > 1 or any(s.dtype != "float32" for s in specs):
            # The host module and the manifest pass one float tensor (resized per subnet).
            shown = ", ".join(f"{s.name} ({s.dtype})" for s in specs)
            raise ConfigError(f"a switchable bundle takes one float32 input; family {net.space.family!r} takes "
                              f"{shown}: export its subnets as static bundles instead")
        self.latencies = tuple(float(v) for v in latencies_ms)

    @property
    def fastest(self) -> int:
        return min(range(len(self.latencies)), key=self.latencies.__getitem__)

    def input_shape(self, batch: int = 1) -> tuple[int, ...]:
        """The input every subnet takes (the largest resolution; smaller subnets resize it)."""
        return max((self.net.input_shape(c, batch) for c in self.configs), key=lambda s: s[-1])

    def pick(self, budget_ms: float) -> int:
        """The subnet `forward` runs for `budget_ms` (the last that fits, else the fastest)."""
        fits = [k for k, v in enumerate(self.latencies) if v <= budget_ms]
        return fits[-1] if fits else self.fastest

    def forward(self, x, budget_ms):
        pick = -1
        for k, latency in enumerate(self.latencies):
            if latency <= budget_ms:
                pick = k
        if pick < 0:
            pick = self.fastest
            warnings.warn(f"no subnet meets the budget of {budget_ms} ms; running the fastest "
                          f"({self.latencies[pick]} ms)", stacklevel=2)
        x = self.net.prepare_input(x, self.configs[pick])
        return self.net(x, self.configs[pick])


def _median_ms(fn: Callable[[], Any], min_seconds: float = 0.3, max_runs: int = 300) -> float:
    for _ in range(5):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (time.perf_counter() - start < min_seconds or len(times) < 20):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def check_subnets(model: Callable[..., np.ndarray], switch: BudgetSwitch, x: np.ndarray,
                  want: Sequence[np.ndarray], folder: str | os.PathLike) -> None:
    """Every subnet that a budget reaches, run through the saved host module, equals torch's
    output within the bundles' tolerance (relative beyond outputs of magnitude 1)."""
    from nestnas.compile.bundle import tolerance

    for i, v in enumerate(switch.latencies):
        if switch.pick(v) != i:
            continue  # a faster, more accurate subnet shadows it: no budget runs it
        got = np.asarray(model(x, v), np.float64)
        diff = float(np.abs(got - want[i]).max()) if got.shape == want[i].shape else math.inf
        if not diff <= tolerance(want[i]):
            raise ArtifactError(f"switchable bundle {folder}: subnet {i} differs from torch (max |diff| {diff:.1e}, "
                                f"tolerance {tolerance(want[i]):.1e})")


def export_switchable(net: nn.Module, configs: Sequence, out_dir: str | os.PathLike,
                      backends: Sequence[str] = ("onnxruntime", "tvm"), threads: int | None = None,
                      accuracies: Sequence[float] | None = None, seed: int = 0,
                      progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """One bundle holding `configs` (ordered from least to most accurate) as static subgraphs and a
    host module that runs the most accurate one meeting a latency budget given at run time.

    The subgraphs are compiled first; each subnet is then measured through the host module on this
    device (median ms at batch 1) and those latencies are written into the host module (from the
    first backend; all are in the manifest)."""
    from nestnas.compile.dynamic import load_dynamic, rewrite

    if not configs:
        raise ConfigError("give at least one subnet for a switchable bundle")
    threads = threads or os.cpu_count() or 1
    k = len(configs)
    switch = BudgetSwitch(net, configs, [float(i + 1) for i in range(k)])
    x = torch.randn(switch.input_shape(1), generator=torch.Generator().manual_seed(seed))
    reach_all = [(x, float(i + 1)) for i in range(k)] + [(x, 0.0)]  # every subnet, and the fallback
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "no subnet meets the budget")
        program = rewrite(switch, reach_all)
    backends = [b for b in ("onnxruntime", "tvm") if b in backends]
    folder = program.save(out_dir, backends, threads, progress)
    try:
        measured: dict[str, list[float]] = {}
        for backend in backends:
            model = load_dynamic(folder, backend, threads)
            xs = x.numpy()
            measured[backend] = [_median_ms(lambda i=i, model=model, xs=xs: model(xs, float(i + 1))) for i in range(k)]
        primary = next(iter(measured))
        switch.latencies = tuple(measured[primary])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "no subnet meets the budget")
            final = rewrite(switch, [(x, v) for v in switch.latencies] + [(x, min(switch.latencies) / 2)])
        with torch.no_grad():
            want = [switch.net(switch.net.prepare_input(x, c), c).numpy() for c in switch.configs]
        extra = {"switch": {"configs": [c.to_dict() for c in switch.configs],
                            "hashes": [net.space.config_hash(c) for c in switch.configs],
                            "accuracy": list(accuracies) if accuracies is not None else None,
                            "latencies_ms": measured, "host_uses": primary, "batch": 1,
                            "input_shape": list(x.shape)}}
        final.replace_host(folder, extra)
        size = sum(p.stat().st_size for p in Path(folder).iterdir())
        check_subnets(load_dynamic(folder, primary, threads), switch, x.numpy(), want, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return {"folder": str(folder), "subnets": k, "bytes": size, "latencies_ms": measured, "host_uses": primary,
            "subgraphs": len(program.records)}



class _SwitchInfo(Strict):
    """What `bench_switchable` reads from a switchable bundle's manifest (``switch``)."""

    latencies_ms: dict[str, list[float]] = Field(min_length=1)
    host_uses: str
    input_shape: list[Annotated[int, Field(gt=0)]] = Field(min_length=1)
    hashes: Optional[list[str]] = None
    accuracy: Optional[list[Optional[float]]] = None

    @model_validator(mode="after")
    def _one_latency_per_subnet(self) -> "_SwitchInfo":
        if self.host_uses not in self.latencies_ms:
            raise ValueError(f"host_uses is {self.host_uses!r}, which latencies_ms does not list")
        k = len(self.latencies_ms[self.host_uses])
        if k == 0 or any(len(v) != k for v in self.latencies_ms.values()):
            raise ValueError("latencies_ms must list one latency per subnet for every backend")
        return self


def bench_switchable(folder: str | os.PathLike, backends: Sequence[str] | None = None, threads: int | None = None,
                     trust: bool = False, seed: int = 0,
                     progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Latency of every subnet of a switchable bundle on this device, through its host module:
    subnet i is run with its own latency from the manifest as the budget, on a random input of
    the bundle's shape, and timed as `measure_bundle` times a static bundle. Each row says which
    subnet the budget ran (a subnet shadowed by a faster, more accurate one is never run)."""
    from nestnas.compile.dynamic_host import MANIFEST
    from nestnas.compile.runners import get_runner, open_program
    from nestnas.fileio import validate

    program = open_program(folder, backends, threads, trust)
    info = validate(program.manifest.get("switch"), _SwitchInfo, Path(folder) / MANIFEST,
                    "switchable bundle manifest (switch)", ArtifactError)
    budgets = info.latencies_ms[info.host_uses]
    x = np.random.default_rng(seed).standard_normal(info.input_shape).astype(np.float32)
    calls = [((x, b), {}) for b in budgets]
    runs = {}
    for backend in program.models:
        for keys, _ in program.trace(backend, calls, f"switchable bundle {folder}"):
            runs.setdefault(backend, []).append(
                next((program.manifest["subgraphs"][k]["params"].get("pick") for k in keys
                      if "pick" in program.manifest["subgraphs"][k]["params"]), None))
    runner = get_runner("program")
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for backend, model in program.models.items():
            for i, call in enumerate(calls):
                m = runner.measure(model, call)
                before = info.latencies_ms.get(backend)
                rows.append({"subnet": i, "hash": info.hashes[i] if info.hashes and i < len(info.hashes) else None,
                             "accuracy": info.accuracy[i] if info.accuracy and i < len(info.accuracy) else None,
                             "budget_ms": budgets[i], "runs": runs[backend][i], "backend": backend,
                             "median_ms": m.median_ms, "p10_ms": m.p10_ms, "p90_ms": m.p90_ms, "stable": m.stable,
                             "manifest_ms": before[i] if before else None})
                if progress:
                    progress(backend, i + 1, len(calls))
    return {"bundle": str(program.folder), "kind": "switchable", "model": program.manifest.get("model"),
            "signature": program.signature, "subnets": len(budgets), "host_uses": info.host_uses,
            "input_shape": info.input_shape, "rows": rows}
