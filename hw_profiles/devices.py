"""Where device profiles live: the ones shipped in this package and the user's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nestnas.errors import ProfileError
from nestnas.fileio import nestnas_home
from nestnas.hw_profiles.profile import DeviceProfile

SHIPPED = Path(__file__).resolve().parent / "data"


def user_dir() -> Path:
    """`$NESTNAS_HOME/profiles`, by default `~/.nestnas/profiles`."""
    return nestnas_home() / "profiles"


def default_profile_path(name: str, backend: str, family: str) -> Path:
    return user_dir() / f"{name}-{backend}-{family}.json"


def list_profiles() -> list[dict[str, Any]]:
    """One row per readable profile, shipped first; unreadable files are listed with their error."""
    rows = []
    for origin, folder in (("shipped", SHIPPED), ("user", user_dir())):
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                p = DeviceProfile.load(path)
            except (ProfileError, OSError) as exc:  # one bad file must not hide the others
                rows.append({"origin": origin, "path": str(path), "error": " ".join(str(exc).split())})
                continue
            rows.append({"origin": origin, "path": str(path), "name": p.name, "backend": p.backend,
                         "family": p.family, "subnets": len(p.measurements), "blocks": len(p.blocks),
                         "batch_size": p.batch_size, "cpu": p.fingerprint.get("cpu"),
                         "threads": p.fingerprint.get("threads"), "created": p.created,
                         "transfer": isinstance(p.meta.get("transfer"), dict)})
    return rows
