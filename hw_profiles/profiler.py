"""`profile_device`: measure subnets (and their parts) of a space on this device's runtime.

Every measurement is appended to the profile and saved atomically, so a killed run resumes
where it stopped: the sample list is a pure function of (space, n_samples, seed), and subnets
or parts already in the profile are skipped, never measured twice.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from nestnas.compile import get_backend, get_runner
from nestnas.errors import ConfigError, ProfileError
from nestnas.hw_profiles.blocks import all_parts, build_part
from nestnas.hw_profiles.profile import DeviceProfile, host_fingerprint
from nestnas.hw_profiles.sampling import space_filling_sample
from nestnas.supernet.base import Supernet, build_supernet
from nestnas.supernet.space import SearchSpace

MIN_SMALLEST_MS = 0.5  # the smallest subnet must take this long for a trustworthy measurement
MAX_BATCH = 256

Progress = Callable[[str, int, int], None]


def measure_module(backend, runner, module: torch.nn.Module, shape: tuple[int, ...], seed: int) -> dict[str, Any]:
    """Build `module` for `backend` at input `shape` and time it with `runner` (random input)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    compiled = backend.build(module, x)
    m = runner.measure(compiled, x.numpy())
    return m.to_dict()


def choose_batch_size(net: Supernet, backend, runner, seed: int = 0) -> int:
    """Smallest batch (a power of two up to 8, then a multiple of 8) at which the smallest
    subnet takes MIN_SMALLEST_MS, with a 20% margin so that a later, slightly faster
    measurement still clears it. Not a power of two beyond 8: doubling overshoots and every
    larger subnet then costs up to twice the profiling time."""
    config = net.space.smallest()
    module = net.extract(config)
    target = 1.2 * MIN_SMALLEST_MS
    batch = 1
    while batch < MAX_BATCH:
        ms = measure_module(backend, runner, module, net.input_shape(config, batch), seed)["median_ms"]
        if ms >= target:
            break
        # Latency grows at most linearly in the batch, so the linear estimate never overshoots.
        estimate = math.ceil(batch * target / max(ms, 1e-6))
        batch = max(batch + 1, min(4 * batch, estimate if estimate <= 8 else 8 * math.ceil(estimate / 8)))
    return min(batch, MAX_BATCH)


def default_passes(backend: str) -> int:
    """Two passes where building a model is cheap (ONNX Runtime, eager torch); one on TVM,
    where each build takes seconds."""
    return 1 if backend == "tvm" else 2


def merge_passes(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One record from the measurements of several passes: the median of their medians (the
    mean for two), the medians of their p10/p90, the worst CV and CI, stable only if every
    pass was; the per-pass records are kept under ``passes``."""
    if len(runs) == 1:
        return {**runs[0], "passes": runs}
    def mid(key: str) -> float:
        return float(np.median([r[key] for r in runs]))
    def worst(key: str) -> float | None:
        values = [r[key] for r in runs]
        return None if any(v is None for v in values) else max(values)
    return {"median_ms": mid("median_ms"), "p10_ms": mid("p10_ms"), "p90_ms": mid("p90_ms"), "cv": worst("cv"),
            "rel_ci": worst("rel_ci"), "repeats": sum(r["repeats"] for r in runs),
            "stable": all(r["stable"] for r in runs), "attempts": max(r["attempts"] for r in runs),
            "calls_per_sample": runs[-1]["calls_per_sample"], "passes": runs}


def _pass_records(record: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The per-pass measurements of a record; one written before passes were kept is one pass."""
    if record is None:
        return []
    return record.get("passes") or [{k: v for k, v in record.items() if k not in ("config", "timestamp")}]


def _passes_done(record: dict[str, Any] | None) -> int:
    return len(_pass_records(record))


def profile_device(
    space: SearchSpace,
    backend: str = "onnxruntime",
    n_samples: int = 200,
    seed: int = 0,
    *,
    out: str | Path | None = None,
    name: str = "local",
    spec: dict[str, Any] | None = None,
    batch_size: int | None = None,
    threads: int | None = None,
    blocks: bool = True,
    remeasure_unstable: bool = True,
    passes: int | None = None,
    exporter: str = "torchscript",
    progress: Progress | None = None,
) -> DeviceProfile:
    """Profile `n_samples` space-filling subnets of `space` (plus, with `blocks`, every distinct
    part of the space for a lookup table) on `backend`. With `out`, the profile is saved after
    every measurement and an existing profile there is resumed; with `remeasure_unstable`,
    measurements flagged as too noisy are measured again (they stay flagged if still noisy).

    `passes` (default: `default_passes(backend)`) measures everything that many times, each
    pass a sweep over all subnets and parts (every other one in reverse order), and keeps the
    median per subnet. On a shared host the machine's speed drifts by a few percent over tens
    of seconds; one sweep records that drift as differences between neighbouring subnets,
    while passes that meet each subnet at different times average it out.

    `exporter` is TorchScript by default: ~15x faster to export than dynamo, which bundles use,
    and on ONNX Runtime the two graphs run within a few percent of each other. TVM compiles them
    differently (dynamo graphs measured 0.64-0.92x the time of TorchScript ones), so a TVM
    profile meant to predict shipped artifacts should use ``exporter="dynamo"``."""
    if n_samples < 2:
        raise ConfigError(f"--samples must be at least 2, got {n_samples}")
    passes = default_passes(backend) if passes is None else passes
    if passes < 1:
        raise ConfigError(f"--passes must be at least 1, got {passes}")
    be = get_backend(backend, threads=threads, exporter=exporter)
    runner = get_runner(backend)
    torch.manual_seed(seed)
    net = build_supernet(space, **(spec or {})).eval()
    fingerprint = {**host_fingerprint(), **be.fingerprint()}
    profile = _resume(out, space, net, fingerprint, batch_size) if out is not None else None
    if profile is None:
        batch = batch_size or choose_batch_size(net, be, runner, seed)
        profile = DeviceProfile(name=name, fingerprint=fingerprint, space=space.to_dict(), spec=net.spec(),
                                batch_size=batch, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                meta={"seed": seed, "sampling": "space-filling (Latin hypercube over size level)",
                                      "runner": runner.fingerprint()})
    profile.meta["passes"] = max(passes, profile.meta.get("passes", 1))
    batch = profile.batch_size
    save = (lambda: profile.save(out)) if out is not None else (lambda: None)
    save()

    configs = space_filling_sample(space, n_samples, seed)
    if remeasure_unstable:  # an unstable record is measured again from its first pass
        for table in (profile.measurements, profile.blocks):
            for key in [k for k, m in table.items() if not m["stable"]]:
                del table[key]
    subnet_items = [(space.config_hash(c), c) for c in configs]
    part_items = list(all_parts(net).items()) if blocks else []
    total = passes * (len(subnet_items) + len(part_items))
    done = sum(min(_passes_done(profile.measurements.get(k)), passes) for k, _ in subnet_items)
    done += sum(min(_passes_done(profile.blocks.get(k)), passes) for k, _ in part_items)

    def sweep(items, table, build, meta_key, save_every, offset, step):
        nonlocal done
        t0 = time.perf_counter()
        order = items if step % 2 == 0 else items[::-1]
        todo = [(i, k, item) for i, (k, item) in enumerate(order) if _passes_done(table.get(k)) == step]
        for n, (i, key, item) in enumerate(todo):
            module, shape = build(item)
            stats = measure_module(be, runner, module, shape, seed + offset + i + 7919 * step)
            record = merge_passes([*_pass_records(table.get(key)), stats])
            if table is profile.measurements:
                profile.add(item, record)
            else:
                table[key] = record
            profile.meta[meta_key] = profile.meta.get(meta_key, 0.0) + time.perf_counter() - t0
            t0 = time.perf_counter()
            if n % save_every == save_every - 1 or n == len(todo) - 1:
                save()
            done += 1
            if progress:
                progress("subnets" if table is profile.measurements else "blocks", done, total)

    for step in range(passes):
        sweep(subnet_items, profile.measurements, lambda c: (net.extract(c), net.input_shape(c, batch)),
              "subnet_seconds", 1, 0, step)
        sweep(part_items, profile.blocks, lambda recipe: build_part(net, recipe, batch), "block_seconds", 10,
              100_000, step)
    save()
    return profile


def _resume(out, space, net, fingerprint, batch_size) -> DeviceProfile | None:
    path = Path(out)
    if not path.exists():
        return None
    profile = DeviceProfile.load(path)
    profile.check_space(space, where=f"existing profile {path}")
    for key in ("backend", "version", "threads", "target", "exporter"):
        if profile.fingerprint.get(key) != fingerprint.get(key):
            raise ProfileError(f"existing profile {path} was measured with {key}={profile.fingerprint.get(key)!r}, "
                               f"this run uses {fingerprint.get(key)!r}; choose another --out")
    if profile.spec != net.spec() or (batch_size and batch_size != profile.batch_size):
        raise ProfileError(f"existing profile {path} was measured with another model spec or batch size; "
                           "choose another --out")
    return profile


def block_table(profile: DeviceProfile) -> dict[str, float]:
    """Part key -> median ms, for `LatencyPredictor(kind="lut" | "hybrid")`."""
    return {k: float(v["median_ms"]) for k, v in profile.blocks.items() if np.isfinite(v["median_ms"])}
