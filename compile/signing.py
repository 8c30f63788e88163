"""Signed bundles: an HMAC-SHA256 over a bundle's manifest with the user's secret key; and the
integrity checks every bundle kind shares (the folder holds exactly its listed artifacts, and
what is loaded are the bytes whose checksum was checked).

A checksum detects corruption, but whoever can rewrite a bundle's files can rewrite its manifest
too, and a bundle carries code (a TVM library, a dynamic bundle's host module). The signature
binds the manifest, and through its checksums every artifact, to a key only the user holds.

The key is 32 random bytes written as 64 hex digits (at least 32 digits are required). It is
looked up in this order: `NESTNAS_BUNDLE_KEY` (the hex digits themselves), `NESTNAS_BUNDLE_KEY_FILE`
(a file holding them), `$NESTNAS_HOME/bundle.key` if that file exists (`nestnas keygen` writes it).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from nestnas.errors import ArtifactError, ConfigError
from nestnas.fileio import nestnas_home

KEY_ENV, KEY_FILE_ENV = "NESTNAS_BUNDLE_KEY", "NESTNAS_BUNDLE_KEY_FILE"
ALGORITHM = "hmac-sha256"
KEY_BYTES, MIN_KEY_BYTES = 32, 16


def _plain_name(name: str) -> str:
    if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError("an artifact is a file name inside the bundle folder (no path, no '..')")
    return name


ArtifactName = Annotated[str, AfterValidator(_plain_name)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class Strict(BaseModel):
    """Base of the manifest schemas: strict types ("3" is no int), unknown fields kept."""

    model_config = ConfigDict(strict=True, extra="allow")


class Signature(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    algorithm: Literal["hmac-sha256"]
    key_id: str
    value: Sha256


@dataclass(frozen=True)
class BundleKey:
    secret: bytes = field(repr=False)
    source: str  # where it came from, for messages

    @property
    def key_id(self) -> str:
        """A public name of the key (a hash of it), so that a message can say "another key"."""
        return hashlib.sha256(b"nestnas-bundle-key-id\0" + self.secret).hexdigest()[:16]


def default_key_path() -> Path:
    return nestnas_home() / "bundle.key"


def _parse(text: str, source: str) -> bytes:
    digits = text.strip()
    try:
        secret = bytes.fromhex(digits)
    except ValueError:
        secret = b""
    if len(secret) < MIN_KEY_BYTES:
        raise ConfigError(f"bundle key {source}: expected at least {2 * MIN_KEY_BYTES} hex digits "
                          f"(`nestnas keygen` writes a key file of {2 * KEY_BYTES})")
    return secret


def configured_key() -> BundleKey | None:
    """The user's bundle key, or None where none is configured."""
    text = os.environ.get(KEY_ENV, "")
    if text.strip():
        return BundleKey(_parse(text, f"in ${KEY_ENV}"), f"${KEY_ENV}")
    named = os.environ.get(KEY_FILE_ENV, "")
    path = Path(named) if named else default_key_path()
    if not named and not path.exists():
        return None
    try:
        if path.exists() and not path.is_file():  # a folder, a pipe, /dev/zero: never read one whole
            raise OSError(0, "not a regular file")
        with open(path, "rb") as f:
            text = f.read(1 << 12).decode("utf-8")  # a key file holds 64 hex digits
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not a text file"
        raise ConfigError(f"bundle key file {path}" + (f" (from ${KEY_FILE_ENV})" if named else "")
                          + f": cannot read it ({why})") from None
    return BundleKey(_parse(text, f"file {path}"), str(path))


def canonical_bytes(manifest: dict[str, Any]) -> bytes:
    """What is signed: the manifest without its signature, as compact JSON with sorted keys."""
    rest = {k: v for k, v in manifest.items() if k != "signature"}
    return json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _mac(key: BundleKey, manifest: dict[str, Any]) -> str:
    return hmac.new(key.secret, canonical_bytes(manifest), hashlib.sha256).hexdigest()


def signed(manifest: dict[str, Any], key: BundleKey | None = None) -> dict[str, Any]:
    """The manifest with a fresh signature by `key` (default: the configured key); without a key,
    the manifest without any (stale) signature."""
    key = key or configured_key()
    # Sign what a reader will see: JSON turns tuples into lists and int keys into strings.
    out = json.loads(json.dumps({k: v for k, v in manifest.items() if k != "signature"}))
    if key is not None:
        out["signature"] = {"algorithm": ALGORITHM, "key_id": key.key_id, "value": _mac(key, out)}
    return out


def check_signature(manifest: dict[str, Any], what: str, trust: bool = False) -> str:
    """Verify `manifest`'s signature against the configured key. Returns "verified", "unsigned"
    (no signature, accepted because no key is configured or `trust` is set) or "unchecked" (signed,
    but no key is configured to check it). A bad signature is refused, `trust` or not."""
    key = configured_key()
    sig = manifest.get("signature")
    if key is None:
        return "unsigned" if sig is None else "unchecked"
    if sig is None:
        if trust:
            return "unsigned"
        raise ArtifactError(f"{what} is not signed and a bundle key is configured ({key.source}); refusing to "
                            "load it (pass --trust, or trust=True, to load an unsigned bundle you trust)")
    if not isinstance(sig, dict) or sig.get("algorithm") != ALGORITHM or not isinstance(sig.get("value"), str):
        raise ArtifactError(f"{what}: signature is not an {ALGORITHM} signature; refusing to load it")
    if not hmac.compare_digest(_mac(key, manifest).encode(), sig["value"].encode("utf-8", "replace")):
        if sig.get("key_id") != key.key_id:
            raise ArtifactError(f"{what} is signed with another key (key id {str(sig.get('key_id'))[:16]!r}; "
                                f"{key.source} has key id {key.key_id!r}); refusing to load it")
        raise ArtifactError(f"{what}: the signature does not match manifest.json (edited after signing); "
                            "refusing to load it")
    return "verified"


def check_folder(folder: Path, artifacts: dict[str, str], what: str, allowed: Iterable[str] = ()) -> None:
    """Refuse a folder that lacks a listed artifact or holds anything else than the artifacts and
    `allowed` (the manifest itself)."""
    present = {p.name for p in folder.iterdir()}
    missing = sorted(set(artifacts) - present)
    if missing:
        raise ArtifactError(f"{what}: {missing[0]} is listed in manifest.json but missing; refusing to load it")
    unlisted = sorted(present - set(artifacts) - set(allowed))
    if unlisted:
        raise ArtifactError(f"{what}: {unlisted[0]} is in the folder but not a listed artifact of manifest.json; "
                            "refusing to load the bundle (remove it, or re-export)")
    for name in artifacts:
        if not (folder / name).is_file():
            raise ArtifactError(f"{what}: {name} is not a file; refusing to load it")


def read_verified(folder: Path, name: str, artifacts: dict[str, str], what: str) -> bytes:
    """The bytes of artifact `name`, checked against its listed sha256 (the caller loads these
    bytes, not the file again, so nothing changes between the check and the load)."""
    if name not in artifacts:
        raise ArtifactError(f"{what}: {name} is not a listed artifact of manifest.json; refusing to load it")
    try:
        data = (folder / name).read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{what}: cannot read {name} ({exc.strerror})") from None
    if hashlib.sha256(data).hexdigest() != artifacts[name]:
        raise ArtifactError(f"{what}: {name} does not match its checksum in manifest.json "
                            "(tampered or truncated); refusing to load it")
    return data


def keygen(path: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Write a new random key file (mode 0600) at `path` (default `$NESTNAS_HOME/bundle.key`);
    an existing file is replaced only with `force`."""
    path = Path(path) if path is not None else default_key_path()
    if path.is_dir():
        raise ConfigError(f"path {path} is a folder; give the key file's path")
    if path.exists() and not force:
        raise ConfigError(f"path {path} exists; pass force=True to replace it (bundles signed with the old key "
                          "will no longer verify)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    except OSError as exc:
        raise ConfigError(f"path {path}: cannot write there ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(KEY_BYTES).hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails, rather than overwrites, if the file appeared meanwhile
    except FileExistsError:
        raise ConfigError(f"path {path} exists; pass force=True to replace it") from None
    except OSError as exc:
        raise ConfigError(f"path {path}: cannot write there ({exc.strerror})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


__all__ = ["ArtifactName", "BundleKey", "KEY_ENV", "KEY_FILE_ENV", "Sha256", "Signature", "Strict",
           "check_folder", "check_signature", "configured_key", "keygen", "read_verified", "signed"]
