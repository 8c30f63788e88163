"""Objectives built from files: a supernet checkpoint (accuracy on the digits validation split)
and a device profile or saved predictor (latency). Shared by the CLI, quickstart and benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from nestnas.errors import ConfigError
from nestnas.search.objectives import (Objective, accuracy_objective, latency_objective, macs_objective,
                                       params_objective)

METRICS = ("accuracy", "latency", "macs", "params")


def profile_latency(profile_path: str | Path, seed: int = 0, space=None) -> Objective:
    """Latency predicted by the default predictor of a profile (kind chosen by cross-validation,
    fitted on every stable measurement)."""
    from nestnas.hw_profiles.profile import DeviceProfile
    from nestnas.predictors.fitting import available_kinds, choose_kind
    from nestnas.predictors.store import fit_latency, sha256_file

    profile = DeviceProfile.load(profile_path)
    if space is not None:
        profile.check_space(space, where=f"profile {profile_path}")
    stable = sorted(k for k, m in profile.measurements.items() if m["stable"])
    if len(stable) < 7:
        raise ConfigError(f"profile {profile_path} has {len(stable)} stable measurements; at least 7 are needed "
                          "to fit a latency predictor")
    kind, _ = choose_kind(profile, available_kinds(profile), stable, seed)
    predictor = fit_latency(profile, kind, stable, seed)
    context = f"profile={sha256_file(profile_path)[:16]}|kind={kind}|seed={seed}"
    return latency_objective(predictor, unit=f"ms @ batch {profile.batch_size}", context=context)


def predictor_latency(predictor_path: str | Path, space=None) -> Objective:
    from nestnas.predictors.latency import LatencyPredictor
    from nestnas.predictors.store import load_predictor, sha256_file

    predictor, record = load_predictor(predictor_path)
    if not isinstance(predictor, LatencyPredictor):
        raise ConfigError(f"--predictor {predictor_path} is an accuracy predictor; give a latency predictor")
    if space is not None and predictor.space.fingerprint() != space.fingerprint():
        raise ConfigError(f"--predictor {predictor_path} was fitted on another search space than the checkpoint's")
    from nestnas.hw_profiles.profile import DeviceProfile

    data = (Path(predictor_path).parent / record["data"]["path"]).resolve()
    batch = DeviceProfile.load(data).batch_size
    return latency_objective(predictor, unit=f"ms @ batch {batch}",
                             context=f"predictor={sha256_file(predictor_path)[:16]}")


def objectives_from_files(names: Sequence[str], checkpoint: str | Path, *, profile: str | Path | None = None,
                          predictor: str | Path | None = None, budget_metrics: Sequence[str] = (), seed: int = 0):
    """(supernet, objectives, extra metrics) for metric `names` (and budget metrics not among them)."""
    from nestnas.predictors.store import sha256_file
    from nestnas.supernet.checkpoint import load_supernet
    from nestnas.supernet.data import digits_loaders

    names = list(names)
    unknown = [n for n in [*names, *budget_metrics] if n not in METRICS]
    if unknown:
        raise ConfigError(f"--objectives: unknown objective {unknown[0]!r}; allowed: {list(METRICS)}")
    if len(set(names)) != len(names) or len(names) < 2:
        raise ConfigError(f"--objectives: give two or more distinct objectives, got {names}")
    net = load_supernet(checkpoint)
    space = net.space
    wanted = list(dict.fromkeys([*names, *budget_metrics]))
    built: dict[str, Objective] = {}
    for name in wanted:
        if name == "accuracy":
            train_loader, val_loader = digits_loaders(net.space.family, batch_size=64, seed=seed)
            built[name] = accuracy_objective(net, val_loader, train_loader, seed=seed,
                                             context=sha256_file(checkpoint)[:16])
        elif name == "latency":
            if (profile is None) == (predictor is None):
                raise ConfigError("the latency objective needs exactly one of --profile or --predictor")
            built[name] = (profile_latency(profile, seed, space) if profile is not None
                           else predictor_latency(predictor, space))
        elif name == "macs":
            built[name] = macs_objective(space, **net.spec())
        else:
            built[name] = params_objective(space, **net.spec())
    return net, [built[n] for n in names], [built[n] for n in wanted if n not in names]
