"""Transfer profiles: a new device profiled from a few measured subnets, with the profiles of
other devices of the same search space as priors.

A transfer profile is an ordinary `DeviceProfile` of a few subnets whose ``meta["transfer"]``
names its priors: each prior's device name, path, sha256, backend, threads and batch size, with
the method and the size of the pool its subnets were chosen from. Fitting on it reloads every
prior and verifies its checksum (a prior moved elsewhere is found among the shipped and user
profiles by checksum); a missing or changed prior is one line naming it.

The subnets to measure are chosen to be informative (`informative_sample`): a large seeded
space-filling pool, each config placed at its log latency on every prior as predicted by that
prior's default predictor, then the smallest and largest subnets and a greedy farthest-point
(k-center) selection in those standardised coordinates. The choice is a pure function of the
space, the count, the seed and the priors' files, and is recorded (``meta["transfer"]["sample"]``),
so a killed run resumes exactly.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from nestnas.errors import ProfileError
from nestnas.fileio import sha256_file, validate
from nestnas.hw_profiles.budget import MIN_USABLE_SUBNETS
from nestnas.hw_profiles.devices import SHIPPED, user_dir
from nestnas.hw_profiles.profile import DeviceProfile
from nestnas.hw_profiles.sampling import MAX_SAMPLES, space_filling_sample
from nestnas.supernet.config import SubnetConfig
from nestnas.supernet.space import SearchSpace

POOL_SIZE = 2000  # candidates the informative sample is chosen from
MIN_PRIOR_SUBNETS = MIN_USABLE_SUBNETS  # a discovered profile with fewer subnets cannot fit a predictor


class PriorSchema(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    name: str
    path: Annotated[str, Field(min_length=1)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    backend: str
    threads: Optional[int]
    batch_size: Annotated[int, Field(ge=1)]


class TransferSchema(BaseModel):
    """``meta["transfer"]`` of a transfer profile; checked before its priors are looked for."""

    model_config = ConfigDict(strict=True, extra="allow")
    method: str
    pool: Annotated[int, Field(ge=1)]
    seed: Optional[int] = None
    priors: Annotated[list[PriorSchema], Field(min_length=1)]
    sample: list[dict[str, Any]] = []


@dataclass(frozen=True)
class PriorRef:
    """What a transfer profile records of one prior (``meta["transfer"]["priors"]``)."""

    name: str
    path: str
    sha256: str
    backend: str
    threads: int | None
    batch_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PriorRef:
        """From a record `TransferSchema` has checked."""
        return cls(**{k: data[k] for k in ("name", "path", "sha256", "backend", "threads", "batch_size")})

    @classmethod
    def of(cls, path: Path, profile: DeviceProfile, sha256: str) -> PriorRef:
        return cls(profile.name, str(path.resolve()), sha256, profile.backend, profile.fingerprint.get("threads"),
                   profile.batch_size)


def is_transfer(profile: DeviceProfile) -> bool:
    return isinstance(profile.meta.get("transfer"), dict)


def existing_profile(out: str | os.PathLike | None) -> DeviceProfile | None:
    """The profile already at `out` (a run to resume), or None."""
    return DeviceProfile.load(out) if out is not None and Path(out).exists() else None


def profile_files() -> list[Path]:
    """Every profile file shipped with nestnas and in the user's folder, shipped first."""
    return [p for folder in (SHIPPED, user_dir()) if folder.is_dir() for p in sorted(folder.glob("*.json"))]


def _load_quietly(path: Path) -> DeviceProfile | None:
    try:
        return DeviceProfile.load(path)
    except (ProfileError, OSError):  # an unreadable file is no prior (`nestnas devices` shows why)
        return None


def discover_priors(space: SearchSpace, exclude: str | os.PathLike | None = None) -> list[Path]:
    """The readable profiles of `space` among the shipped and user ones that are not transfer
    profiles themselves and have the MIN_PRIOR_SUBNETS subnets a predictor needs; `exclude` (the
    run's own output) left out, and a file whose contents repeat an earlier one's left out too."""
    skip = Path(exclude).resolve() if exclude is not None else None
    target = space.to_dict()
    found, seen = [], set()
    for path in profile_files():
        if skip is not None and path.resolve() == skip:
            continue
        p = _load_quietly(path)
        if p is None or p.space != target or is_transfer(p) or len(p.measurements) < MIN_PRIOR_SUBNETS:
            continue
        digest = sha256_file(path)
        if digest not in seen:
            seen.add(digest)
            found.append(path)
    return found


def _saved_path(profile: DeviceProfile) -> Path:
    """The file among the shipped and user profiles that holds `profile` (given as an object)."""
    want = profile.to_dict()
    for path in profile_files():
        p = _load_quietly(path)
        if p is not None and p.to_dict() == want:
            return path
    raise ProfileError(f"prior profile {profile.name!r} is not saved among the shipped and user profiles; "
                       "a prior is recorded by its file's checksum: give its path")


def resolve_priors(space: SearchSpace, transfer: Any, exclude: str | os.PathLike | None = None
                   ) -> list[tuple[PriorRef, DeviceProfile]]:
    """(reference, profile) of every prior that `transfer` names: True for every profile of
    `space` that `discover_priors` finds, or a sequence of paths and DeviceProfiles. A ProfileError
    when there is none, or when a given one is of another space, a transfer profile or unreadable."""
    if transfer is True:
        paths = discover_priors(space, exclude)
        if not paths:
            n = len(profile_files())
            raise ProfileError(f"--transfer: no profile of this search space (fingerprint {space.fingerprint()}) "
                               f"among the {n} shipped and user profiles; profile one device fully first, or give "
                               "--prior FILE")
        given: list[Any] = list(paths)
    elif isinstance(transfer, (str, os.PathLike, DeviceProfile)) or not isinstance(transfer, Sequence):
        raise ProfileError(f"transfer must be True or a list of profile paths or DeviceProfiles, got {transfer!r:.80}")
    else:
        given = list(transfer)
        if not given:
            raise ProfileError("transfer: the list of prior profiles is empty; give at least one, or True to use "
                               "every shipped and user profile of this space")
    out, seen = [], set()
    for item in given:
        if isinstance(item, DeviceProfile):
            path, profile = _saved_path(item), item
        else:
            path = Path(item)
            if not path.is_file():
                raise ProfileError(f"prior profile {path} does not exist")
            profile = DeviceProfile.load(path)
        profile.check_space(space, where=f"prior profile {path}")
        if is_transfer(profile):
            raise ProfileError(f"prior profile {path} is itself a transfer profile; priors must be full profiles")
        digest = sha256_file(path)
        if digest in seen:
            continue
        seen.add(digest)
        out.append((PriorRef.of(path, profile, digest), profile))
    return out


def load_priors(profile: DeviceProfile, where: str = "transfer profile") -> list[tuple[PriorRef, DeviceProfile]]:
    """Every prior a transfer profile names, reloaded and checked against its recorded sha256;
    one that moved is found among the shipped and user profiles by checksum. A missing or changed
    prior is a ProfileError naming it."""
    record = profile.meta.get("transfer")
    validate(record, TransferSchema, "meta.transfer", f"{where} {profile.name!r}", ProfileError)
    out = []
    for ref in map(PriorRef.from_dict, record["priors"]):
        path = Path(ref.path)
        if not (path.is_file() and sha256_file(path) == ref.sha256):
            moved = next((p for p in profile_files() if sha256_file(p) == ref.sha256), None)
            if moved is None:
                state = "changed (its checksum differs)" if path.is_file() else "missing"
                raise ProfileError(f"{where} {profile.name!r}: prior {ref.name!r} at {path} is {state}, and no "
                                   f"shipped or user profile has its sha256 {ref.sha256[:12]}...; restore it or "
                                   "profile this device again")
            path = moved
        prior = DeviceProfile.load(path)
        prior.check_space(profile.search_space(), where=f"prior profile {path}")
        out.append((ref, prior))
    return out


def farthest_points(coords: np.ndarray, n: int, first: Sequence[int] = ()) -> list[int]:
    """Greedy k-center: the rows `first`, then repeatedly the row farthest from every row chosen
    so far (ties to the lowest index), until `n` rows are chosen."""
    chosen = list(dict.fromkeys(first))[:n]
    if not chosen:
        chosen = [0]
    dist = np.min(np.linalg.norm(coords[:, None, :] - coords[chosen][None, :, :], axis=2), axis=1)
    while len(chosen) < min(n, len(coords)):
        i = int(np.argmax(dist))
        chosen.append(i)
        dist = np.minimum(dist, np.linalg.norm(coords - coords[i], axis=1))
    return chosen


def informative_indices(log_latency: np.ndarray, n: int, first: Sequence[int] | None = None) -> list[int]:
    """`n` rows of a (candidates, priors) matrix of log latencies: the rows `first` (by default
    the fastest and slowest candidates by mean over priors), then farthest-point in standardised
    coordinates."""
    z = np.asarray(log_latency, dtype=np.float64)
    z = (z - z.mean(axis=0)) / np.maximum(z.std(axis=0), 1e-12)
    if first is None:
        size = z.mean(axis=1)
        first = [int(np.argmin(size)), int(np.argmax(size))]
    return farthest_points(z, n, first)


def informative_sample(space: SearchSpace, n: int, seed: int, predict: Callable[[np.ndarray], np.ndarray],
                       pool: int = POOL_SIZE) -> list[SubnetConfig]:
    """`n` configs of `space` chosen from a seeded space-filling pool of `pool` (at least n):
    `predict(X)` gives the log latency of encoded configs on every prior, one column each. The
    space's smallest and largest subnets come first (the ends of every device's range)."""
    pool_configs = space_filling_sample(space, min(max(pool, n), MAX_SAMPLES), seed)
    if len(pool_configs) <= n:
        return pool_configs
    X = np.array([space.encode(c) for c in pool_configs], dtype=np.int64)
    keys = [space.config_hash(c) for c in pool_configs]
    ends = [keys.index(space.config_hash(c)) for c in (space.smallest(), space.largest())]
    return [pool_configs[i] for i in informative_indices(predict(X), n, ends)]
