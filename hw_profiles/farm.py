"""A device farm on Ray: agents on target machines measure, the driver profiles.

`run_agent` (``nestnas agent``) joins a Ray cluster as a node that advertises the custom resource
``device:NAME`` and hosts a named actor ``agent:NAME:ID`` on that node, which reports the device's
fingerprint (its host's and its backend's) and the nestnas version, and performs measurements.

`profile_devices` (``nestnas profile --ray ADDRESS --device NAME``) runs `profile_device` on the
driver with a `RemoteMeasurer`: the driver builds each subnet or part and exports it to ONNX
(torch and the supernet stay on the driver); the agent checks the bytes' sha256 on arrival, then
builds the ONNX Runtime session or compiles the TVM module there (TVM compiles for the host it
runs on, so the build must happen on the device) and times it. Each result comes back as soon as
it is measured and the driver saves the profile after every measurement, so a killed agent or
driver loses nothing and a rerun resumes without duplicates. Several devices run in parallel, one
driver thread and one profile file each.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import torch

from nestnas.errors import ArtifactError, ClusterError, ConfigError, NestnasError
from nestnas.raycluster import connect, parse_address, require_ray

AGENT_PREFIX = "agent:"
DEVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# How long a run waits for an agent of a lost device to come back ($NESTNAS_AGENT_WAIT_S).
LOST_WAIT_S = float(os.environ.get("NESTNAS_AGENT_WAIT_S", "60"))
DESCRIBE_TIMEOUT_S = 10.0
NODE_UP_TIMEOUT_S = 90.0
_EXPORT_LOCK = threading.Lock()  # torch's ONNX exporters are not meant to run in two threads at once


def check_device_name(name: str, where: str = "--device") -> str:
    if not isinstance(name, str) or not DEVICE_NAME.fullmatch(name):
        raise ConfigError(f"{where} {name!r}: a device name is 1 to 64 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")
    return name


def resource_name(device: str) -> str:
    return f"device:{device}"


class AgentLost(ClusterError):
    """Every agent of a device went away mid-run and none came back in time."""


# --- the agent (runs on the device) ------------------------------------------------------------

class DeviceAgent:
    """The measuring actor of one device agent (a Ray actor pinned to the agent's node)."""

    def __init__(self, device: str, backend: str, threads: int | None, version: str):
        from nestnas.compile import get_backend

        self.device, self.backend_name, self.version = device, backend, version
        self.threads = get_backend(backend, threads=threads).threads  # checks backend and threads here

    def describe(self, exporter: str = "torchscript") -> dict[str, Any]:
        """Device, version, backend and the fingerprint a profile measured here records."""
        from nestnas.compile import get_backend, get_runner
        from nestnas.hw_profiles.profile import host_fingerprint

        be = get_backend(self.backend_name, threads=self.threads, exporter=exporter)
        affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        fingerprint = {**host_fingerprint(), **be.fingerprint(), "device": self.device, "cpu_affinity": affinity}
        import ray

        return {"device": self.device, "version": self.version, "backend": self.backend_name,
                "threads": self.threads, "fingerprint": fingerprint, "runner": get_runner(self.backend_name)
                .fingerprint(), "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "host": os.uname().nodename}

    def measure(self, onnx_bytes: bytes, sha256: str, specs: tuple, seed: int, max_attempts: int | None,
                exporter: str, quick: bool = False) -> dict[str, Any]:
        """Check `onnx_bytes` against `sha256`, build them here and time them on inputs drawn from `seed`."""
        from nestnas.compile import get_backend, get_runner
        from nestnas.compile.feeds import declared_bounds
        from nestnas.hw_profiles.profiler import time_compiled

        got = hashlib.sha256(onnx_bytes).hexdigest()
        if got != sha256:
            raise ArtifactError(f"agent {self.device}: the model arrived with sha256 {got[:16]}..., the driver sent "
                                f"{sha256[:16]}...; refused (corrupted in transit)")
        be = get_backend(self.backend_name, threads=self.threads, exporter=exporter)
        runner = get_runner(self.backend_name, **({"max_seconds": 0.3, "max_attempts": 1} if quick else {}))
        with tempfile.TemporaryDirectory(prefix="nestnas-agent-") as tmp:
            path = Path(tmp) / "model.onnx"
            path.write_bytes(onnx_bytes)
            compiled = be._build(path, specs)
            compiled.bounds = declared_bounds(specs)
            return time_compiled(runner, compiled, specs, seed, max_attempts)


def _node_command(target: str, device: str, token: str, num_cpus: int) -> list[str]:
    # No --temp-dir: a node that joins takes the head's session folder (one of its own times out here).
    # Free ports for the agents Ray gives fixed defaults (52365...): a second node on one machine
    # (two agents, or an agent next to the head) otherwise never registers.
    ray_bin = str(Path(sys.executable).with_name("ray"))
    ports = [f"--{flag}={_free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                      "metrics-export-port", "runtime-env-agent-port")]
    return [ray_bin if os.path.exists(ray_bin) else "ray", "start", "--address", target, "--num-cpus", str(num_cpus),
            "--resources", json.dumps({resource_name(device): 1, token: 1}), "--block", "--disable-usage-stats", *ports]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the `ray start` child: SIGKILL when the agent dies, however it dies; its reaper then
    stops the node's processes (Linux; elsewhere a hard-killed agent leaves its node to `ray stop`)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_agent(address: str, device: str, backend: str = "onnxruntime", threads: int | None = None,
              ready: Callable[[dict], None] | None = None) -> None:
    """Join the cluster at `address` as device `device` until SIGINT/SIGTERM, then leave it."""
    import nestnas
    from nestnas.compile import get_backend
    from nestnas.raycluster import _auto_address, _reachable  # the same checks `connect` makes

    check_device_name(device)
    addr = parse_address(address, "--address")
    if addr.kind == "local":
        raise ConfigError(f"--address {address!r}: an agent joins an existing cluster; give HOST:PORT or auto")
    require_ray("nestnas agent")
    threads = get_backend(backend, threads=threads).threads  # a bad backend or thread count fails before joining
    target = f"{addr.host}:{addr.port}" if addr.kind == "remote" else _auto_address()
    host, _, port = (target or "").rpartition(":")
    if not target or not port.isdigit() or not _reachable(host.strip("[]"), int(port)):
        raise ClusterError(f"--address {address}: no Ray cluster answers at {target or 'this machine'}; start one "
                           "with `ray start --head` there")
    token = f"nestnas-agent-{uuid.uuid4().hex[:12]}"  # pins the actor to this agent's own node
    env = {**os.environ}
    if os.path.exists(os.path.expanduser("~/.ray/auth_token")) or "RAY_AUTH_TOKEN" in env:
        env.setdefault("RAY_AUTH_MODE", "token")  # `ray start --address` sends the token only when told to
    # Its own process group, so that stopping it stops all its processes and nothing else.
    node = subprocess.Popen(_node_command(target, device, token, threads), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=_die_with_parent)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with connect(target, what="nestnas agent") as ray:
            _wait_for_node(ray, node, token)
            actor = ray.remote(DeviceAgent).options(
                name=f"{AGENT_PREFIX}{device}:{token[-12:]}", lifetime="detached", num_cpus=0,
                resources={token: 0.001}, max_concurrency=1).remote(device, backend, threads, nestnas.__version__)
            info = ray.get(actor.describe.remote())
            if ready:
                ready(info)
            while not stop.is_set() and node.poll() is None:
                stop.wait(0.5)
            with contextlib.suppress(Exception):
                ray.kill(actor)
        if node.poll() is not None and not stop.is_set():
            raise ClusterError(f"agent {device}: its Ray node stopped (exit code {node.returncode})")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _stop_node(node)


def _wait_for_node(ray: Any, node: subprocess.Popen, token: str) -> None:
    deadline = time.monotonic() + NODE_UP_TIMEOUT_S
    while time.monotonic() < deadline:
        if node.poll() is not None:
            last = (node.stderr.read() if node.stderr else "").strip().splitlines()
            raise ClusterError(f"agent: `ray start` failed (exit code {node.returncode}): "
                               f"{last[-1] if last else 'no message'}")
        if any(n["Alive"] and token in n.get("Resources", {}) for n in ray.nodes()):
            return
        time.sleep(0.5)
    raise ClusterError(f"agent: its Ray node did not join within {NODE_UP_TIMEOUT_S:.0f} s")


def _stop_node(node: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop the node's process group: SIGTERM (the raylet leaves the cluster), then SIGKILL for
    what is left (`ray start --block` itself does not exit on SIGTERM in Ray 2.60)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.wait(wait)


# --- the driver --------------------------------------------------------------------------------

def list_agents(ray: Any, exporter: str = "torchscript") -> list[dict[str, Any]]:
    """Every agent that answers, with its `DeviceAgent.describe` and actor ``name``, sorted by device."""
    names = [n for n in ray.util.list_named_actors() if isinstance(n, str) and n.startswith(AGENT_PREFIX)]
    found = []
    for name in names:
        try:
            handle = ray.get_actor(name)
            found.append((name, handle, handle.describe.remote(exporter)))
        except ValueError:  # gone since it was listed
            continue
    agents = []
    for name, handle, ref in found:
        try:
            info = ray.get(ref, timeout=DESCRIBE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a dead or unreachable agent is not up
            continue
        agents.append({**info, "name": name, "handle": handle})
    return sorted(agents, key=lambda a: (a["device"], a["name"]))


def agent_rows(agents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What `nestnas devices --ray` shows of each agent (JSON-safe)."""
    rows = []
    for a in agents:
        fp = a["fingerprint"]
        rows.append({"device": a["device"], "agent": a["name"], "host": a["host"], "cpu": fp.get("cpu"),
                     "cores": fp.get("cores"), "cpu_affinity": fp.get("cpu_affinity"), "os": fp.get("os"),
                     "backend": a["backend"], "backend_version": fp.get("version"), "threads": a["threads"],
                     "nestnas": a["version"]})
    return rows


def _agents_of(ray: Any, device: str, exporter: str, version: str) -> tuple[list[dict], list[dict]]:
    """(agents of `device` with this nestnas version, all agents that answer)."""
    agents = list_agents(ray, exporter)
    return [a for a in agents if a["device"] == device and a["version"] == version], agents


def check_devices(ray: Any, devices: list[str], backend: str, exporter: str = "torchscript"
                  ) -> dict[str, list[dict]]:
    """device -> its usable agents, or a one-line ClusterError naming the devices that are up."""
    import nestnas

    agents = list_agents(ray, exporter)
    up = sorted({a["device"] for a in agents})
    out = {}
    for device in devices:
        mine = [a for a in agents if a["device"] == device]
        if not mine:
            raise ClusterError(f"--device {device}: no agent advertises it; devices up: {', '.join(up) or 'none'} "
                               f"(start one with `nestnas agent --address ADDRESS --device {device}`)")
        same = [a for a in mine if a["version"] == nestnas.__version__]
        if not same:
            raise ClusterError(f"--device {device}: its agent runs nestnas {mine[0]['version']}, this driver "
                               f"nestnas {nestnas.__version__}; refused (run the same version on both)")
        fit = [a for a in same if a["backend"] == backend]
        if not fit:
            raise ClusterError(f"--device {device}: its agent measures on {same[0]['backend']}, this run asks "
                               f"{backend}; use --backend {same[0]['backend']} or start an agent with --backend "
                               f"{backend}")
        out[device] = fit
    return out


_SAME_DEVICE = ("backend", "version", "threads", "target", "cpu", "exporter")


class RemoteMeasurer:
    """`profile_device`'s measurement step on a device's agents (see `LocalMeasurer`): exports on
    the driver, times on the agent; a lost agent is replaced by another of the same device (same
    backend fingerprint), waiting up to `wait_s` for one to come up, else `AgentLost`."""

    def __init__(self, ray: Any, device: str, agents: list[dict], exporter: str = "torchscript",
                 wait_s: float = LOST_WAIT_S):
        self.ray, self.device, self.exporter, self.wait_s = ray, device, exporter, wait_s
        self.agent = agents[0]
        self._fingerprint = dict(self.agent["fingerprint"])
        self.max_attempts = int(self.agent["runner"]["max_attempts"])
        self.measured = 0

    def fingerprint(self) -> dict[str, Any]:
        return dict(self._fingerprint)

    def runner_fingerprint(self) -> dict[str, Any]:
        return dict(self.agent["runner"])

    def measure(self, module: torch.nn.Module, inputs: Any, seed: int, max_attempts: int | None = None,
                quick: bool = False) -> dict[str, Any]:
        from nestnas.compile.backends import example_of
        from nestnas.compile.feeds import as_specs
        from nestnas.compile.onnx_export import export_onnx

        specs = as_specs(inputs)
        with _EXPORT_LOCK, tempfile.TemporaryDirectory(prefix="nestnas-farm-") as tmp:
            _, examples, _ = example_of(specs, seed)
            path = export_onnx(module, examples, Path(tmp) / "model.onnx", exporter=self.exporter,
                               input_names=[s.name for s in specs])
            data = Path(path).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        ref = self.ray.put(data)  # once in the object store: a retry elsewhere does not send it again
        while True:
            try:
                result = self.ray.get(self.agent["handle"].measure.remote(ref, digest, specs, seed, max_attempts,
                                                                          self.exporter, quick))
                self.measured += 1
                return result
            except self.ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, NestnasError):
                    raise type(cause)(str(cause)) from None
                raise
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.ActorUnavailableError):
                self.agent = self._replacement()

    def _replacement(self) -> dict[str, Any]:
        import nestnas

        lost = self.agent["name"]
        deadline = time.monotonic() + self.wait_s
        while True:
            same, _ = _agents_of(self.ray, self.device, self.exporter, nestnas.__version__)
            for a in same:
                if a["name"] != lost and all(a["fingerprint"].get(k) == self._fingerprint.get(k)
                                             for k in _SAME_DEVICE):
                    return a
            if time.monotonic() >= deadline:
                raise AgentLost(f"device {self.device}: its agent was lost mid-run and no agent of it came back "
                                f"within {self.wait_s:.0f} s")
            time.sleep(1.0)


def profile_path(out: Path | None, device: str, backend: str, family: str, several: bool) -> Path:
    """One device: `out` itself (default: the user profile folder's DEVICE-BACKEND-FAMILY.json);
    several: `out` is a folder holding DEVICE-BACKEND-FAMILY.json for each."""
    from nestnas.hw_profiles.devices import default_profile_path

    if not several:
        return out or default_profile_path(device, backend, family)
    name = default_profile_path(device, backend, family).name
    return (out / name) if out is not None else default_profile_path(device, backend, family)


def profile_devices(address: str, devices: list[str], outs: dict[str, Path], *, backend: str = "onnxruntime",
                    exporter: str = "torchscript", threads: int | None = None, wait_s: float = LOST_WAIT_S,
                    progress: Callable[[str, str, int, int], None] | None = None, **options: Any) -> dict[str, Any]:
    """Profile each of `devices` on its agents at `address`, in parallel (one driver thread per
    device), into `outs[device]`; `options` go to `profile_device` (space, n_samples, seed, ...).
    Device -> `DeviceProfile`; the first failure as one line once every thread has stopped, naming
    what each failed device has saved."""
    from nestnas.hw_profiles.profile import DeviceProfile
    from nestnas.hw_profiles.profiler import profile_device

    for d in devices:
        check_device_name(d)
    if len(set(devices)) != len(devices):
        raise ConfigError(f"--device: each device once, got {devices}")
    with connect(address, what="--ray") as ray:
        chosen = check_devices(ray, devices, backend, exporter)
        for device, agents in chosen.items():
            if threads is not None and agents[0]["threads"] != threads:
                raise ConfigError(f"--threads {threads}: the agent of {device} measures with {agents[0]['threads']} "
                                  "threads (set by `nestnas agent --threads`); drop --threads")
        results: dict[str, Any] = {}
        errors: dict[str, BaseException] = {}

        def work(device: str) -> None:
            measurer = RemoteMeasurer(ray, device, chosen[device], exporter, wait_s)
            report = (lambda text, done, total: progress(device, text, done, total)) if progress else None
            try:
                results[device] = profile_device(backend=backend, exporter=exporter, out=outs[device], name=device,
                                                 measurer=measurer, progress=report, **options)
            except BaseException as exc:  # noqa: BLE001 - reported once every device has stopped
                errors[device] = exc

        workers = [threading.Thread(target=work, args=(d,), name=f"profile-{d}", daemon=True) for d in devices]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    for device, exc in errors.items():
        if isinstance(exc, AgentLost):
            out = outs[device]
            saved = 0
            with contextlib.suppress(NestnasError, OSError):
                p = DeviceProfile.load(out)
                saved = len(p.measurements) + len(p.blocks)
            raise ClusterError(f"{exc}; {saved} measurements are saved in {out}; rerunning the same command "
                               "resumes") from None
        raise exc
    return results
