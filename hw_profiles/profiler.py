"""`profile_device`: measure subnets (and their parts) of a space on this device's runtime.

Every measurement is appended to the profile and saved atomically, so a killed run resumes
where it stopped: the sample list is a pure function of (space, n_samples, seed), and subnets
or parts already in the profile are skipped, never measured twice.

With a time budget (`max_minutes`) a run stops after the measurement during which the budget ran
out and saves what it has with ``meta["complete"] = False``; rerunning with the same `out`
continues it. An incomplete profile is still a profile: its subnets fit predictors (the table
ones once every block is measured), and ``meta["last_run"]`` says how far it got (see
`nestnas.hw_profiles.budget`). A profile without ``complete`` predates budgets and is complete.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from nestnas.compile import get_backend, get_runner
from nestnas.compile.feeds import as_specs, is_classic
from nestnas.errors import ConfigError, ProfileError
from nestnas.hw_profiles.blocks import all_parts, build_part
from nestnas.hw_profiles.budget import ProfilingTimeLimit, check_minutes
from nestnas.hw_profiles.profile import DeviceProfile, ProfileRecord, host_fingerprint
from nestnas.hw_profiles.sampling import check_sample_count, space_filling_sample
from nestnas.supernet.base import Supernet, build_supernet
from nestnas.supernet.config import SubnetConfig
from nestnas.supernet.inputs import InputSpec, example_inputs
from nestnas.supernet.space import SearchSpace

MIN_SMALLEST_MS = 0.5  # the smallest subnet must take this long for a trustworthy measurement
MAX_BATCH = 256
MAX_PASSES = 10  # beyond a few passes the median of medians no longer moves
MAX_USER_BATCH = 1024  # a given --batch-size; larger inputs of the largest subnets exhaust memory
MAX_THREADS = 256

Progress = Callable[[str, int, int], None]


def measure_module(backend, runner, module: torch.nn.Module, shape: tuple[int, ...] | tuple[InputSpec, ...],
                   seed: int, max_attempts: int | None = None) -> dict[str, Any]:
    """Build `module` for `backend` at input `shape` (one float32 input) or at typed inputs (a
    tuple of `InputSpec`, e.g. `net.input_specs(config, batch)`) and time it with `runner` on
    random inputs drawn from `seed`; `max_attempts` lowers the runner's retry cap."""
    specs = as_specs(shape)
    compiled = backend.build(module, specs, seed=seed)
    return time_compiled(runner, compiled, specs, seed, max_attempts)


def time_compiled(runner, compiled, specs: tuple[InputSpec, ...], seed: int,
                  max_attempts: int | None = None) -> dict[str, Any]:
    """Time a built model with `runner` on the random inputs `seed` draws for `specs` (what
    `Backend.build` drew too); a `Measurement.to_dict()`."""
    examples = {k: v.numpy() for k, v in example_inputs(specs, seed).items()}
    x = examples[specs[0].name] if is_classic(specs) else examples
    return runner.measure(compiled, x, max_attempts=max_attempts).to_dict()


class LocalMeasurer:
    """The measurement step of `profile_device` on this machine: build with `backend`, time with
    its runner. Another measurer with the same four members (e.g. `nestnas.hw_profiles.farm.
    RemoteMeasurer`, which times on a device agent) reuses the profiler's sweeps, resume and saves."""

    def __init__(self, backend: str, threads: int | None = None, exporter: str = "torchscript",
                 runner_options: dict[str, Any] | None = None):
        self.backend = get_backend(backend, threads=threads, exporter=exporter)
        # e.g. a looser CI target for a quick profile; the profile's runner fingerprint records them
        self.runner = get_runner(backend, **(runner_options or {}))
        self.max_attempts = self.runner.max_attempts

    def fingerprint(self) -> dict[str, Any]:
        """The profile's fingerprint: the host's and the backend's."""
        return {**host_fingerprint(), **self.backend.fingerprint()}

    def runner_fingerprint(self) -> dict[str, Any]:
        return self.runner.fingerprint()

    def measure(self, module: torch.nn.Module, inputs: Any, seed: int, max_attempts: int | None = None,
                quick: bool = False) -> dict[str, Any]:
        """`measure_module`; `quick`: a rough median (one attempt of at most 0.3 s), to pick a batch."""
        runner = get_runner(self.backend.name, max_seconds=0.3, max_attempts=1) if quick else self.runner
        return measure_module(self.backend, runner, module, inputs, seed, max_attempts)


def check_options(space: SearchSpace, n_samples: int, passes: int, batch_size: int | None, threads: int | None,
                  max_minutes: float | None) -> None:
    """Every numeric option within what the space and a sane maximum allow (one line naming the
    allowed range), before anything is measured or written."""
    check_sample_count(space, n_samples)
    for option, value, hi in (("passes", passes, MAX_PASSES), ("batch_size", batch_size, MAX_USER_BATCH),
                              ("threads", threads, MAX_THREADS)):
        if value is not None and not 1 <= value <= hi:
            bound = "at least 1" if value < 1 else f"at most {hi}"
            raise ConfigError(f"{option} must be {bound}, got {value}; allowed: 1 to {hi}")
    check_minutes(max_minutes)


def choose_batch_size(net: Supernet, backend, runner, seed: int = 0, measure: Callable | None = None) -> int:
    """Smallest batch (a power of two up to 8, then a multiple of 8) at which the smallest
    subnet takes MIN_SMALLEST_MS, with a 20% margin so that a later, slightly faster
    measurement still clears it. Not a power of two beyond 8: doubling overshoots and every
    larger subnet then costs up to twice the profiling time. `measure(module, inputs, seed)`
    replaces `measure_module` with `backend` and `runner` (e.g. a remote measurer's)."""
    measure = measure or (lambda module, inputs, seed: measure_module(backend, runner, module, inputs, seed))
    config = net.space.smallest()
    module = net.extract(config)
    target = 1.2 * MIN_SMALLEST_MS
    batch = 1
    while batch < MAX_BATCH:
        ms = measure(module, net.input_specs(config, batch), seed)["median_ms"]
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
    blocks: bool | None = None,
    remeasure_unstable: bool = True,
    passes: int | None = None,
    exporter: str = "torchscript",
    progress: Progress | None = None,
    max_minutes: float | None = None,
    transfer: bool | Sequence[str | Path | DeviceProfile] | None = None,
    measurer: Any = None,
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
    profile meant to predict shipped artifacts should use ``exporter="dynamo"``.

    `max_minutes` bounds the run's wall time: it stops after the measurement during which the
    budget ran out, accepts first attempts (flagged if unstable) once half of it is gone, and
    saves an incomplete profile (``meta["complete"] = False``) that a rerun continues. Unstable
    records to heal are measured again only after everything missing, so a run short of time
    adds coverage first and never leaves the profile with fewer measurements than before.
    ``meta["last_run"]`` reports the run (`ProfilingTimeLimit.report`). `progress(text, done, total)` is
    called after every measurement, `text` naming the kind, the pace with retries, the estimated
    finish and the budget's end.

    `transfer` makes a transfer profile (`nestnas.hw_profiles.transfer`): True takes as priors every
    profile of `space` among the shipped and user ones (`out` excluded), a list takes those paths
    or DeviceProfiles. The `n_samples` subnets are then chosen to be informative in the priors'
    latency, ``meta["transfer"]`` records the priors, and `blocks` defaults to False (the table
    costs hundreds of measurements, the point of a transfer profile is a few). A transfer profile
    is resumed with the priors it records.

    `measurer` (default: `LocalMeasurer(backend, threads, exporter)`) does each measurement and
    gives the profile's fingerprint; `nestnas.hw_profiles.farm.RemoteMeasurer` runs them on a
    device agent while this process keeps the sweeps and the saves."""
    passes = default_passes(backend) if passes is None else passes
    check_options(space, n_samples, passes, batch_size, threads, max_minutes)
    blocks = not transfer if blocks is None else blocks
    measurer = measurer or LocalMeasurer(backend, threads, exporter)
    budget = ProfilingTimeLimit(max_minutes, measurer.max_attempts)
    # Before anything is written: the sample (a pure function of the inputs, priors included).
    transfer_meta, configs = _choose_configs(space, n_samples, seed, out, transfer)
    torch.manual_seed(seed)
    net = build_supernet(space, **(spec or {})).eval()
    fingerprint = measurer.fingerprint()
    profile = _resume(out, space, net, fingerprint, batch_size) if out is not None else None
    if profile is None:
        # Short of time, a rough median (one attempt of at most 0.3 s) is enough to pick the batch.
        batch = batch_size or choose_batch_size(net, None, None, seed, measure=lambda m, i, s: measurer.measure(
            m, i, s, quick=max_minutes is not None))
        profile = DeviceProfile(name=name, fingerprint=fingerprint, space=space.to_dict(), spec=net.spec(),
                                batch_size=batch, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                meta={"seed": seed, "sampling": "space-filling (Latin hypercube over size level)",
                                      "runner": measurer.runner_fingerprint()})
        if transfer_meta is not None:
            profile.meta["sampling"] = "informative (farthest-point in the priors' predicted log latency)"
    if transfer_meta is not None:
        profile.meta["transfer"] = transfer_meta
    profile.meta["passes"] = max(passes, profile.meta.get("passes", 1))
    profile.meta["complete"] = False  # until this run ends (a killed run leaves it so)
    batch = profile.batch_size
    save = (lambda: profile.save(out)) if out is not None else (lambda: None)
    save()

    subnet_items = [(space.config_hash(c), c) for c in configs]
    part_items = list(all_parts(net).items()) if blocks else []
    tables = {"subnets": (profile.measurements, subnet_items), "blocks": (profile.blocks, part_items)}
    # Unstable records are measured again from their first pass, after everything missing.
    heal = {kind: {k for k, _ in items if k in table and not table[k].stable} if remeasure_unstable else set()
            for kind, (table, items) in tables.items()}
    skip = heal  # the first sweeps leave records to heal alone
    restart: dict[str, set[str]] = {kind: set() for kind in tables}  # kept on disk until measured anew
    total, done = 0, 0
    for kind, (table, items) in tables.items():
        have = sum(passes if k in heal[kind] else min(_passes_done(table.get(k)), passes) for k, _ in items)
        total, done = total + passes * (len(items) + len(heal[kind])), done + have
        budget.add_work(kind, passes * (len(items) + len(heal[kind])) - have)

    def sweep(kind, build, meta_key, save_every, offset, step) -> bool:
        """One pass over `kind`'s items that lack it; False when the budget stopped it."""
        nonlocal done
        table, items = tables[kind]
        prior = lambda k: [] if k in restart[kind] else _pass_records(table.get(k))  # noqa: E731
        order = items if step % 2 == 0 else items[::-1]
        todo = [(i, k, item) for i, (k, item) in enumerate(order) if k not in skip[kind] and len(prior(k)) == step]
        for n, (i, key, item) in enumerate(todo):
            if budget.spent():
                return False
            t0, cap = time.perf_counter(), budget.attempts_cap()
            module, inputs = build(item)  # inputs: a shape or a tuple of InputSpec (build_part may give either)
            stats = measurer.measure(module, inputs, seed + offset + i + 7919 * step, cap)
            record = merge_passes([*prior(key), stats])
            restart[kind].discard(key)
            if kind == "subnets":
                profile.add(item, record)
            else:
                table[key] = ProfileRecord.from_dict(record)
            seconds = time.perf_counter() - t0
            profile.meta[meta_key] = profile.meta.get(meta_key, 0.0) + seconds
            budget.record(kind, stats, seconds, cap)
            if n % save_every == save_every - 1 or n == len(todo) - 1:
                save()
            done += 1
            if progress:
                progress(budget.describe(kind), done, total)
        return True

    def sweeps() -> bool:
        for step in range(passes):
            if not (sweep("subnets", lambda c: (net.extract(c), net.input_specs(c, batch)), "subnet_seconds", 1, 0,
                          step)
                    and sweep("blocks", lambda recipe: build_part(net, recipe, batch), "block_seconds", 10, 100_000,
                              step)):
                return False
        return True

    finished = sweeps()
    if finished and any(heal.values()):
        skip, restart = {kind: set() for kind in tables}, {kind: set(keys) for kind, keys in heal.items()}
        finished = sweeps()
    profile.meta["complete"] = finished
    profile.meta["last_run"] = budget.report(done, total, len(profile.measurements), finished)
    save()
    return profile


def _choose_configs(space: SearchSpace, n_samples: int, seed: int, out, transfer
                    ) -> tuple[dict[str, Any] | None, list[SubnetConfig]]:
    """(``meta["transfer"]`` or None, the configs to measure). A transfer run resumed from `out`
    keeps the priors recorded there; a full profile at `out` is not continued as a transfer one,
    nor a transfer profile as a full one."""
    from nestnas.hw_profiles import transfer as tr

    existing = tr.existing_profile(out)
    if existing is not None and tr.is_transfer(existing) != bool(transfer):
        fix = "save the transfer run to another path" if transfer else "rerun with --transfer to continue it"
        raise ProfileError(f"existing profile {out} is {'a transfer' if not transfer else 'a full'} profile; {fix}")
    if not transfer:
        return None, space_filling_sample(space, n_samples, seed)
    if existing is not None:
        existing.check_space(space, where=f"existing profile {out}")
        priors = tr.load_priors(existing, where=f"existing profile {out}")
    else:
        priors = tr.resolve_priors(space, transfer, exclude=out)
    # The priors' predictions come from the predictors package (a deliberate upward import: the
    # profiler only asks it for numbers, lazily).
    from nestnas.predictors.transfer import DEFAULT_METHOD, prior_log_latency, prior_predictors

    recorded = existing.meta["transfer"] if existing is not None else {}
    if recorded.get("seed") == seed and len(recorded.get("sample", [])) == n_samples:
        # The sample this run chose (kept so that a resumed run measures exactly those, whatever
        # the priors' refitted predictors would say on another machine).
        try:
            configs = [space.validate(SubnetConfig.from_dict(c)) for c in recorded["sample"]]
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise ProfileError(f"existing profile {out}: field meta.transfer.sample: {str(exc).splitlines()[0]}; "
                               "save this run to another path") from None
    else:
        predictors = prior_predictors([(ref.sha256, prior) for ref, prior in priors], seed=seed)
        configs = tr.informative_sample(space, n_samples, seed, lambda X: prior_log_latency(predictors, X))
    meta = {"method": DEFAULT_METHOD, "pool": tr.POOL_SIZE, "seed": seed,
            "priors": [ref.to_dict() for ref, _ in priors], "sample": [space.canonical(c).to_dict() for c in configs]}
    return meta, configs


def _resume(out, space, net, fingerprint, batch_size) -> DeviceProfile | None:
    path = Path(out)
    if not path.exists():
        return None
    profile = DeviceProfile.load(path)
    profile.check_space(space, where=f"existing profile {path}")
    for key in ("backend", "version", "threads", "target", "exporter"):
        if profile.fingerprint.get(key) != fingerprint.get(key):
            raise ProfileError(f"existing profile {path} was measured with {key}={profile.fingerprint.get(key)!r}, "
                               f"this run uses {fingerprint.get(key)!r}; save this run to another path")
    if profile.spec != net.spec() or (batch_size and batch_size != profile.batch_size):
        raise ProfileError(f"existing profile {path} was measured with another model spec or batch size; "
                           "save this run to another path")
    return profile


def block_table(profile: DeviceProfile) -> dict[str, float]:
    """Part key -> median ms, for `LatencyPredictor(kind="lut" | "hybrid")`."""
    return {k: float(v.median_ms) for k, v in profile.blocks.items() if np.isfinite(v.median_ms)}
