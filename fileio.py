"""Atomic file writes: a crash never leaves a half-written profile, front, checkpoint or bundle."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder; rename it over `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_document(path: str | os.PathLike, what: str, fmt: str, version: int, error: type[Exception],
                  version_key: str = "schema_version") -> dict[str, Any]:
    """Read a nestnas JSON document, raising `error` with one line naming the file when it is
    missing, not JSON, of another format, or of another version."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{what} {path} is corrupt: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise error(f"{path} is not a nestnas {what}")
    if data.get(version_key) != version:
        raise error(f"{what} {path} has {version_key} {data.get(version_key)!r}; "
                    f"this nestnas reads {version_key} {version}")
    return data


def validate(data: Any, model: Any, path: str | os.PathLike, what: str, error: type[Exception]) -> Any:
    """Check a parsed document against its declared pydantic schema `model`; raise `error` with
    one line naming the file and the first bad field. Returns the validated model instance."""
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(document)"
        got = first.get("input")
        shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
        if len(shown) > 60:
            shown = shown[:57] + "..."
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise error(f"{what} {path}: field {where}: {first['msg']} (got {shown}){more}") from None


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
