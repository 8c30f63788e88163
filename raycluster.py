"""Connecting to Ray, the optional distributed engine (`pip install -e ".[ray]"`).

Every stage that can run on Ray (training, a search's evaluations, device agents) asks this module
for a cluster, so that the address forms, the missing-extra message and the "no cluster there"
message are the same everywhere. Ray is imported only here and only when asked.

Address forms (`--ray`, `ray_address=`):
- ``local:N``: start a private single-machine cluster with N CPUs for this run, stopped at its end;
- ``auto``: the cluster this machine already belongs to (`ray start`);
- ``HOST:PORT``: that cluster's head (its GCS port, 6379 by default).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from nestnas.errors import ClusterError, ConfigError

RAY_EXTRA = 'pip install -e ".[ray]"'
NAMESPACE = "nestnas"
CONNECT_TIMEOUT_S = 3.0  # Ray itself waits two minutes for a head that is not there
MAX_LOCAL_CPUS = 1024
_HOST_PORT = re.compile(r"(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:]+\]):(?P<port>[0-9]{1,5})")
ADDRESS_HELP = "auto, HOST:PORT or local:N"


@dataclass(frozen=True)
class RayAddress:
    """A parsed `--ray` value: `kind` is "local", "auto" or "remote"."""

    kind: str
    host: str = ""
    port: int = 0
    cpus: int = 0

    @property
    def text(self) -> str:
        return {"local": f"local:{self.cpus}", "auto": "auto"}.get(self.kind, f"{self.host}:{self.port}")


def parse_address(text: str, where: str = "--ray") -> RayAddress:
    """`text` as a `RayAddress`; one-line ConfigError naming the allowed forms otherwise."""
    value = str(text).strip()
    if value == "auto":
        return RayAddress("auto")
    if value.startswith("local:"):
        n = value[len("local:"):]
        if not n.isdigit() or not 1 <= int(n) <= MAX_LOCAL_CPUS:
            raise ConfigError(f"{where} {text!r}: local:N needs N from 1 to {MAX_LOCAL_CPUS} (CPUs of the private "
                              "cluster)")
        return RayAddress("local", cpus=int(n))
    if value.startswith("ray://"):
        value = value[len("ray://"):]
    m = _HOST_PORT.fullmatch(value)
    if not m or not 1 <= int(m["port"]) <= 65535:
        raise ConfigError(f"{where} {text!r} is not a Ray address; allowed: {ADDRESS_HELP}")
    return RayAddress("remote", m["host"].strip("[]"), int(m["port"]))


def require_ray(what: str = "--ray") -> Any:
    """The `ray` module, or a one-line ClusterError naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise ClusterError(f"{what} needs Ray, which is not installed; install the extra: {RAY_EXTRA}") from None
    return ray


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def _auto_address() -> str | None:
    """The head this machine's `ray start` recorded (what `ray.init("auto")` reads), if any."""
    env = os.environ.get("RAY_ADDRESS")
    if env and env != "auto":
        return env
    try:
        from ray._private.services import get_ray_address_from_environment  # noqa: PLC0415

        return get_ray_address_from_environment("auto", None)
    except (ConnectionError, ImportError, AttributeError):  # none recorded, or a Ray without the helper
        return None


@contextlib.contextmanager
def connect(address: str | RayAddress, *, what: str = "--ray", runtime_env: dict | None = None) -> Iterator[Any]:
    """Yield the `ray` module connected to `address` (see the module docstring). A cluster this
    call started (``local:N``) or joined is left again at the end; one the caller had already
    joined (``ray.is_initialized()``) is used as it is and left alone. No cluster at the address:
    one-line ClusterError within a few seconds (Ray's own client would wait two minutes)."""
    addr = parse_address(address, what) if isinstance(address, str) else address
    ray = require_ray(what)
    if ray.is_initialized():
        yield ray
        return
    options: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": False, "configure_logging": False}
    if runtime_env:
        options["runtime_env"] = runtime_env
    if addr.kind == "local":
        options.update(address="local", num_cpus=addr.cpus, include_dashboard=False)
    else:
        target = f"{addr.host}:{addr.port}" if addr.kind == "remote" else _auto_address()
        if target is None:
            raise ClusterError(f"{what} auto: no Ray cluster is running on this machine; start one with "
                               "`ray start --head`, or give HOST:PORT or local:N")
        host, _, port = target.rpartition(":")
        if not port.isdigit() or not _reachable(host.strip("[]"), int(port)):
            raise ClusterError(f"{what} {addr.text}: no Ray cluster answers at {target}; start one with "
                               "`ray start --head` there, or use local:N for a private one on this machine")
        options["address"] = target
    with _token_auth(addr.kind != "local"), _ray_stdout_to_log():
        try:
            ray.init(**options)
        except (ConnectionError, RuntimeError) as exc:
            raise ClusterError(f"{what} {addr.text}: cannot join the Ray cluster: {str(exc).splitlines()[0]}; "
                               "is this machine's Ray token (~/.ray/auth_token or RAY_AUTH_TOKEN) the "
                               "cluster's?") from None
        try:
            yield ray
        finally:
            ray.shutdown()


RAY_LOG = "ray-driver.log"  # under $NESTNAS_HOME: what Ray prints to this process's stdout


@contextlib.contextmanager
def _ray_stdout_to_log() -> Iterator[None]:
    """While connected, file descriptor 1 goes to `$NESTNAS_HOME/ray-driver.log` (stderr where
    that cannot be written): Ray prints cluster events there from its own threads (a lost node's
    raylet log, say), and a command's stdout carries its results (`--json`, printed after leaving)
    while stderr carries its progress and its one-line error."""
    import sys

    from nestnas.fileio import nestnas_home

    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no file descriptors to move (an embedding host)
        yield
        return
    try:
        path = nestnas_home() / RAY_LOG
        path.parent.mkdir(parents=True, exist_ok=True)
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        target = os.dup(2)
    os.dup2(target, 1)
    os.close(target)
    try:
        yield
    finally:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def _token_auth(joining: bool) -> Iterator[None]:
    """Ray 2.60 sends this machine's cluster token (~/.ray/auth_token, RAY_AUTH_TOKEN) when it joins
    through "auto" but never through an explicit address; a cluster started by `ray start` here
    wants it, so joining by address takes the token the same way "auto" does (process-wide, as
    Ray's own switch is; RAY_AUTH_MODE set by the user wins)."""
    if joining and "RAY_AUTH_MODE" not in os.environ:
        try:
            from ray._private.authentication.authentication_token_setup import (  # noqa: PLC0415
                maybe_enable_token_auth_if_token_available,
            )

            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        except ImportError:  # a Ray without token authentication
            pass
    yield


def cluster_cpus(ray: Any) -> int:
    """CPUs the connected cluster has in all."""
    return int(ray.cluster_resources().get("CPU", 0))
