"""Atomic file writes: a crash never leaves a half-written profile, front, checkpoint or bundle."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from nestnas.errors import NestnasError, OutputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder; rename it over `path` only on success.
    An OSError while creating, writing or renaming becomes an OutputError naming `path` (the
    temporary file is removed)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from None
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        # Python's write errors carry no file name; one naming another file is not this write's.
        if isinstance(exc, OSError) and not isinstance(exc, NestnasError) and exc.filename in (None, tmp):
            raise write_error(path, exc) from None
        raise


def write_error(path: str | os.PathLike, exc: OSError) -> OutputError:
    """One line for a failed write: `cannot write PATH: REASON`, the reason being the file that
    stands where a folder is needed, or the system's message (No space left on device...)."""
    path = Path(path)
    blocker = _file_ancestor(path)
    reason = f"{blocker} is a file, not a folder" if blocker else exc.strerror or str(exc)
    return OutputError(f"cannot write {path}: {reason}", path, exc.errno)


def _file_ancestor(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` when it is not a folder (`--out somefile/x.json`)."""
    for parent in path.absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else _shown(parent, path)
    return None


def _shown(absolute: Path, given: Path) -> Path:
    """`absolute` as the user wrote it: relative when `given` was."""
    if given.is_absolute():
        return absolute
    with contextlib.suppress(ValueError):
        return absolute.relative_to(Path.cwd())
    return absolute


def check_output(path: str | os.PathLike, option: str, kind: str = "file") -> Path:
    """Fail fast, before long work, when `path` cannot be written: the nearest existing ancestor
    must be a folder where a file can be created (tried), and `path` must not be a folder where a
    file is wanted (`kind` "file") or a file where a folder is (`kind` "dir"). Creates nothing;
    raises OutputError naming the option, the path and why."""
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', not {kind!r}")
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise OutputError(f"{option} {path} is a folder; give a file name", path)
    if kind == "dir" and path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path} is a file; give a folder", path)
    blocker = _file_ancestor(path)
    if blocker is not None:
        raise OutputError(f"{option} {path}: {blocker} is a file, not a folder", path)
    parent = next(p for p in path.absolute().parents if p.exists())
    # A file is staged beside its final name; a folder of bundles also gets files inside.
    for folder in [parent] + ([path] if kind == "dir" and path.is_dir() else []):
        try:
            fd, probe = tempfile.mkstemp(prefix=".nestnas-probe-", dir=folder)
        except OSError as exc:
            raise OutputError(f"{option} {path}: cannot create files in {_shown(folder, path)} "
                              f"({exc.strerror})", path, exc.errno) from None
        try:
            os.write(fd, b"\0")  # a full disk still lets an empty file be made
        except OSError as exc:
            raise OutputError(f"{option} {path}: cannot write in {_shown(folder, path)} ({exc.strerror})",
                              path, exc.errno) from None
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(probe)
    return path


def check_outputs(paths: Mapping[str, str | os.PathLike | None], kind: str = "file") -> None:
    """`check_output` for each option given (None: not given)."""
    for option, path in paths.items():
        if path is not None:
            check_output(path, option, kind)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_standard_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` atomically as standard JSON: NaN and infinities (undefined statistics such as
    a Kendall tau of constant values) become null, which every JSON parser reads."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(finite(data), indent=2, sort_keys=True, allow_nan=False) + "\n")


def nestnas_home() -> Path:
    """`$NESTNAS_HOME`, by default `~/.nestnas`: the user's profiles, caches, tuning and bundle key."""
    return Path(os.environ.get("NESTNAS_HOME", Path.home() / ".nestnas"))


def write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write `data` atomically (serialise to memory first where a library's own writer hides
    the OSError of a full disk, as torch.save does)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def parse_json(text: str) -> Any:
    """`json.loads`, where every way `text` can fail to parse is a ValueError with a one-line
    message: beside malformed JSON, nesting deeper than Python recurses (RecursionError) and an
    integer of more digits than Python converts."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise ValueError("nested too deeply to read") from None
    except ValueError as exc:  # "Exceeds the limit (4300 digits) for integer string conversion: ...; use ..."
        raise ValueError(str(exc).split(";")[0]) from None


def read_document(path: str | os.PathLike, what: str, fmt: str, version: int, error: type[Exception],
                  version_key: str = "schema_version") -> dict[str, Any]:
    """Read a nestnas JSON document, raising `error` with one line naming the file when it is
    missing, not JSON, of another format, or of another version."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        data = parse_json(path.read_text())
    except ValueError as exc:  # not JSON, not UTF-8, nested too deeply, a number too long
        raise error(f"{what} {path} is corrupt: {exc}") from None
    except OSError as exc:  # Python's read errors name no file (EIO, EISDIR on some file systems)
        raise error(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
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
