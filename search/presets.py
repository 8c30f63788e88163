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
    check_device_name,
    latency_objective,
    macs_objective,
    params_objective,
)

METRICS = ("accuracy", "latency", "macs", "params")


def profile_entries(profile) -> list[tuple[str | None, Path]]:
    """(device name or None, path) of each `profile` entry: a path, or `NAME=FILE` naming the
    device (a path that exists is always a path)."""
    entries = [profile] if isinstance(profile, (str, Path)) else list(profile or [])
    out = []
    for entry in entries:
        text = str(entry)
        if isinstance(entry, str) and "=" in text and not Path(text).exists():
            name, file = text.split("=", 1)
            out.append((check_device_name(name, f"--profile {text!r}: device name"), Path(file)))
        else:
            out.append((None, Path(entry)))
    return out


def fleet_devices(profile) -> list[tuple[str, Path]]:
    """(device, path) of each profile of a fleet, in the order given: the device is the name given
    as `NAME=FILE`, else the profile's own `name`. Two profiles naming one device are refused."""
    from nestnas.hw_profiles.profile import DeviceProfile

    devices: dict[str, Path] = {}
    first = None
    for name, path in profile_entries(profile):
        loaded = DeviceProfile.load(path)
        if first is None:
            first = (path, loaded.search_space())
        else:  # a fleet shares one space: say so before any name clash
            loaded.check_space(first[1], where=f"profile {path} (the fleet's space is that of {first[0]}):")
        device = name or check_device_name(loaded.name, f"profile {path}: device name")
        if device in devices:
            raise ConfigError(f"profiles {devices[device]} and {path} both name device {device!r}; name one with "
                              "--profile NAME=FILE")
        devices[device] = path
    return list(devices.items())


def profile_latency(profile_path: str | Path, seed: int = 0, space=None, *, name: str = "latency",
                    device: str | None = None) -> Objective:
    """Latency predicted by the default predictor of a profile (kind chosen by cross-validation,
    fitted on the measurements `predictors.fitting.fitting_hashes` picks). `name` is the
    objective's name (`latency@DEVICE` in a fleet search); `device` overrides the profile's name
    in the predictor identity."""
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
                             identity=profile_identity(profile, chosen.kind, profile_path, digest, device), name=name)


def profile_identity(profile, kind: str, path: str | Path, sha256: str, device: str | None = None) -> PredictorId:
    """The typed identity of latencies predicted from `profile` (saved at `path`), on `device`
    (default: the profile's name)."""
    threads = profile.fingerprint.get("threads")
    return PredictorId(kind, str(path), sha256, device or profile.name, profile.backend,
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


def objectives_from_files(names: Sequence[str], checkpoint: str | Path, *, profile=None,
                          predictor: str | Path | None = None, budget_metrics: Sequence[str] = (), seed: int = 0,
                          data=None):
    """(supernet, objectives, extra metrics) for metric `names` (and budget metrics not among them).
    Accuracy is measured on `data` (a spec or datasets), by default the checkpoint's own data.
    `profile` is one profile or a list (a fleet): entries are paths or `NAME=FILE` naming the
    device. One profile gives the objective `latency`; several give `latency@DEVICE` for each, in
    the order given (with its own batch size and predictor identity), wherever `latency` is asked."""
    from nestnas.predictors.store import sha256_file
    from nestnas.supernet.checkpoint import load_supernet
    from nestnas.supernet.data import data_for_checkpoint

    names = list(names)
    entries = profile_entries(profile) if profile is not None else []
    fleet = fleet_devices(profile) if len(entries) >= 2 else []
    if fleet and predictor is not None:
        raise ConfigError("give several profiles or one predictor, not both")
    device_metrics = [f"latency@{d}" for d, _ in fleet]
    plain = [m for m in budget_metrics if m not in device_metrics]
    if fleet and "latency" in plain:
        raise ConfigError(f"a budget on 'latency' with {len(fleet)} devices: name the device, one of {device_metrics}")
    unknown = [n for n in [*names, *plain] if n not in METRICS]
    if unknown:
        raise ConfigError(f"objectives: unknown objective {unknown[0]!r}; allowed: {list(METRICS)}")
    if len(set(names)) != len(names) or len(names) < 2:
        raise ConfigError(f"objectives: give two or more distinct objectives, got {names}")
    net = load_supernet(checkpoint)
    space = net.space
    wanted = list(dict.fromkeys([*names, *plain, *(["latency"] if len(plain) < len(budget_metrics) else [])]))
    # checked before any other work, accuracy asked or not
    loaded = data_for_checkpoint(net, checkpoint, data, seed=seed) if "accuracy" in wanted or data is not None \
        else None
    built: dict[str, Objective] = {}
    for name in wanted:
        if name == "accuracy":
            train_loader, val_loader = loaded.loaders(batch_size=64)
            context = sha256_file(checkpoint)[:16] + (f"|data={loaded.fingerprint[:16]}" if data is not None else "")
            built[name] = accuracy_objective(net, val_loader, train_loader, seed=seed, context=context)
        elif name == "latency" and fleet:
            for device, path in fleet:
                built[f"latency@{device}"] = profile_latency(path, seed, space, name=f"latency@{device}",
                                                             device=device)
        elif name == "latency":
            if (profile is None) == (predictor is None):
                raise ConfigError("the latency objective needs exactly one of profile or predictor")
            if profile is not None:
                ((device, path),) = entries
                built[name] = profile_latency(path, seed, space, device=device)
            else:
                built[name] = predictor_latency(predictor, space)
        elif name == "macs":
            built[name] = macs_objective(space, **net.spec())
        else:
            built[name] = params_objective(space, **net.spec())

    def expand(ns: list[str]) -> list[str]:
        return [m for n in ns for m in (device_metrics if n == "latency" and fleet else [n])]

    objectives = [built[n] for n in expand(names)]
    return net, objectives, [built[n] for n in expand(wanted) if n not in expand(names)]
