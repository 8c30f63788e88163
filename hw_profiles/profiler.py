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
    progress: Progress | None = None,
) -> DeviceProfile:
    """Profile `n_samples` space-filling subnets of `space` (plus, with `blocks`, every distinct
    part of the space for a lookup table) on `backend`. With `out`, the profile is saved after
    every measurement and an existing profile there is resumed; with `remeasure_unstable`,
    measurements flagged as too noisy are measured again (they stay flagged if still noisy)."""
    if n_samples < 2:
        raise ConfigError(f"--samples must be at least 2, got {n_samples}")
    # TorchScript export is ~15x faster than dynamo here and yields the same graph for these
    # plain-layer modules (MACs and outputs equal, tested); profiling builds hundreds of models.
    be = get_backend(backend, threads=threads, exporter="torchscript")
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
    batch = profile.batch_size
    save = (lambda: profile.save(out)) if out is not None else (lambda: None)
    save()

    configs = space_filling_sample(space, n_samples, seed)
    def needed(table: dict, key: str) -> bool:
        return key not in table or (remeasure_unstable and not table[key]["stable"])

    todo = [c for c in configs if needed(profile.measurements, space.config_hash(c))]
    parts = [(k, r) for k, r in all_parts(net).items() if needed(profile.blocks, k)] if blocks else []
    total, done = len(configs) + (len(all_parts(net)) if blocks else 0), len(configs) - len(todo)
    done += (len(all_parts(net)) - len(parts)) if blocks else 0
    t0 = time.perf_counter()
    for i, config in enumerate(todo):
        stats = measure_module(be, runner, net.extract(config), net.input_shape(config, batch), seed + i)
        profile.add(config, stats)
        profile.meta["subnet_seconds"] = profile.meta.get("subnet_seconds", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        save()
        done += 1
        if progress:
            progress("subnets", done, total)
    for j, (key, recipe) in enumerate(parts):
        module, shape = build_part(net, recipe, batch)
        profile.blocks[key] = measure_module(be, runner, module, shape, seed + j)
        profile.meta["block_seconds"] = profile.meta.get("block_seconds", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        if j % 10 == 9 or j == len(parts) - 1:
            save()
        done += 1
        if progress:
            progress("blocks", done, total)
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
