"""Errors raised by nestnas. User errors are NestnasError subclasses; the CLI turns them into one line."""


class NestnasError(Exception):
    """Base class of every error nestnas raises on bad input."""


class ConfigError(NestnasError, ValueError):
    """A subnet config, search space or option is outside what is allowed."""


class CheckpointError(NestnasError):
    """A checkpoint is missing, corrupt, or belongs to another space."""


class DataError(NestnasError, ValueError):
    """A data spec cannot be read, or its data does not fit the supernet (shape, classes)."""


class ProfileError(NestnasError):
    """A device profile is missing, corrupt, or measured on another space."""


class ArtifactError(NestnasError):
    """An exported artifact or its manifest is missing, tampered with or inconsistent."""


class BackendUnavailable(NestnasError):
    """A compiler backend's optional dependency (e.g. the `tvm` extra) is not installed."""


class ClusterError(NestnasError):
    """A Ray cluster is unreachable or not installed, or a device agent is missing, of another
    version, or lost mid-run."""


class OutputError(NestnasError, OSError):
    """An output path cannot be written (under a file, read-only, disk full). Also an OSError, so
    code that catches OSError around a write keeps working; `filename` is the path meant."""

    def __init__(self, message: str, path: object = None, errno: int | None = None):
        super().__init__(message)
        self.filename, self.errno = None if path is None else str(path), errno

    def __str__(self) -> str:
        return str(self.args[0])
