"""Objectives built from files: a supernet checkpoint (accuracy on the validation split of its
data, `nestnas.data`) and a device profile or saved predictor (latency). Shared by the CLI,
quickstart and benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from nestnas.errors import ConfigError
from nestnas.search.objectives import (
    Objective,
    PredictorId,
    accuracy_objective,
    latency_objective,
    macs_objective,
    params_objective,
)

METRICS = ("accuracy", "latency", "macs", "params")


def profile_latency(profile_path: str | Path, seed: int = 0, space=None) -> Objective:
    """Latency predicted by the default predictor of a profile (kind chosen by cross-validation,
    fitted on the measurements `predictors.fitting.fitting_hashes` picks)."""
    import warnings

    from nestnas.hw_profiles.profile import DeviceProfile
    from nestnas.predictors.fitting import fit_and_select
    from nestnas.predictors.store import sha256_file

    profile = DeviceProfile.load(profile_path)
    if space is not None:
        profile.check_space(space, where=f"profile {profile_path}")
    chosen = fit_and_select(profile, "auto", holdout=None, seed=seed)
    if chosen.warning:
        warnings.warn(chosen.warning, stacklevel=2)
    digest = sha256_file(profile_path)
    context = f"profile={digest[:16]}|kind={chosen.kind}|seed={seed}"
    return latency_objective(chosen.predictor, unit="ms", batch_size=profile.batch_size, context=context,
                             identity=profile_identity(profile, chosen.kind, profile_path, digest))


def profile_identity(profile, kind: str, path: str | Path, sha256: str) -> PredictorId:
    """The typed identity of latencies predicted from `profile` (saved at `path`)."""
    threads = profile.fingerprint.get("threads")
    return PredictorId(kind, str(path), sha256, profile.name, profile.backend,
                       threads if isinstance(threads, int) else None)


def predictor_latency(predictor_path: str | Path, space=None) -> Objective:
    from nestnas.predictors.latency import LatencyPredictor
    from nestnas.predictors.store import load_predictor, sha256_file

    predictor, record = load_predictor(predictor_path)
    if not isinstance(predictor, LatencyPredictor):
        raise ConfigError(f"predictor {predictor_path} is an accuracy predictor; give a latency predictor")
    if space is not None and predictor.space.fingerprint() != space.fingerprint():
        raise ConfigError(f"predictor {predictor_path} was fitted on another search space than the checkpoint's")
    from nestnas.hw_profiles.profile import DeviceProfile

    data = (Path(predictor_path).parent / record["data"]["path"]).resolve()
    profile = DeviceProfile.load(data)
    digest = sha256_file(predictor_path)
    return latency_objective(predictor, unit="ms", batch_size=profile.batch_size, context=f"predictor={digest[:16]}",
                             identity=profile_identity(profile, record["kind"], predictor_path, digest))


def objectives_from_files(names: Sequence[str], checkpoint: str | Path, *, profile: str | Path | None = None,
                          predictor: str | Path | None = None, budget_metrics: Sequence[str] = (), seed: int = 0,
                          data=None):
    """(supernet, objectives, extra metrics) for metric `names` (and budget metrics not among them).
    Accuracy is measured on `data` (a spec or datasets), by default the checkpoint's own data."""
    from nestnas.predictors.store import sha256_file
    from nestnas.supernet.checkpoint import load_supernet
    from nestnas.supernet.data import data_for_checkpoint

    names = list(names)
    unknown = [n for n in [*names, *budget_metrics] if n not in METRICS]
    if unknown:
        raise ConfigError(f"objectives: unknown objective {unknown[0]!r}; allowed: {list(METRICS)}")
    if len(set(names)) != len(names) or len(names) < 2:
        raise ConfigError(f"objectives: give two or more distinct objectives, got {names}")
    net = load_supernet(checkpoint)
    space = net.space
    wanted = list(dict.fromkeys([*names, *budget_metrics]))
    # checked before any other work, accuracy asked or not
    loaded = data_for_checkpoint(net, checkpoint, data, seed=seed) if "accuracy" in wanted or data is not None \
        else None
    built: dict[str, Objective] = {}
    for name in wanted:
        if name == "accuracy":
            train_loader, val_loader = loaded.loaders(batch_size=64)
            context = sha256_file(checkpoint)[:16] + (f"|data={loaded.fingerprint[:16]}" if data is not None else "")
            built[name] = accuracy_objective(net, val_loader, train_loader, seed=seed, context=context)
        elif name == "latency":
            if (profile is None) == (predictor is None):
                raise ConfigError("the latency objective needs exactly one of profile or predictor")
            built[name] = (profile_latency(profile, seed, space) if profile is not None
                           else predictor_latency(predictor, space))
        elif name == "macs":
            built[name] = macs_objective(space, **net.spec())
        else:
            built[name] = params_objective(space, **net.spec())
    return net, [built[n] for n in names], [built[n] for n in wanted if n not in names]
