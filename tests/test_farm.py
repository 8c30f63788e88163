"""The device farm: `nestnas agent`, `nestnas profile --ray --device`, `nestnas devices --ray`.

The cluster test starts a real Ray head (`ray start --head --block`, its own --temp-dir) and two
agents as separate processes pinned to one core each, and stops exactly those process groups
(never `ray stop`: other Ray clusters may share this machine)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from nestnas.cli import main

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    # Ray may log a warning of its own (token authentication) before nestnas's one line.
    lines = [line for line in err.splitlines() if line.strip() and "Token authentication" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# --- bad input without a cluster (default suite) -----------------------------------------------

@pytest.mark.parametrize("args, expected", [
    (["profile", "--device", "d0"], "--device needs --ray"),
    (["profile", "--ray", "head", "--device", "d0"], "is not a Ray address"),
    (["profile", "--ray", "127.0.0.1:6379"], "--ray needs --device"),
    (["profile", "--ray", "127.0.0.1:6379", "--device", "bad name"], "a device name is"),
    (["agent", "--address", "local:2", "--device", "d0"], "joins an existing cluster"),
    (["agent", "--address", "nowhere", "--device", "d0"], "is not a Ray address"),
])
def test_bad_farm_options_are_one_line(capsys, args, expected):
    code, _, err = _cli(capsys, *args)
    assert code == 1 and expected in _one_error_line(err)


def test_no_cluster_at_address_is_one_line(capsys, tmp_path):
    pytest.importorskip("ray")
    port = _free_port()
    for args in (["profile", "--ray", f"127.0.0.1:{port}", "--device", "d0", "--out", str(tmp_path / "p.json")],
                 ["devices", "--ray", f"127.0.0.1:{port}"],
                 ["agent", "--address", f"127.0.0.1:{port}", "--device", "d0"]):
        code, _, err = _cli(capsys, *args)
        assert code == 1 and f"no Ray cluster answers at 127.0.0.1:{port}" in _one_error_line(err), args
    assert not (tmp_path / "p.json").exists()


def test_unknown_device_lists_the_devices_up(capsys, tmp_path):
    pytest.importorskip("ray")
    code, _, err = _cli(capsys, "profile", "--ray", "local:1", "--device", "nobody", "--samples", "2",
                        "--out", str(tmp_path / "p.json"))
    assert code == 1 and "--device nobody: no agent advertises it; devices up: none" in _one_error_line(err)
    assert not (tmp_path / "p.json").exists()


def test_ray_missing_names_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    code, _, err = _cli(capsys, "profile", "--ray", "127.0.0.1:6379", "--device", "d0")
    assert code == 1 and 'pip install -e ".[ray]"' in _one_error_line(err)


# --- a real cluster: head + two pinned agents (slow) ---------------------------------------------

AGENT_OTHER_VERSION = ("import sys, nestnas; nestnas.__version__ = '0.0.0-other'; from nestnas.cli import main; "
                       "sys.exit(main(sys.argv[1:]))")


class Cluster:
    def __init__(self):
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dir = f"/tmp/nf{uuid.uuid4().hex[:6]}"  # short: Ray's socket paths must fit 107 bytes
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = Path(self.temp_dir + "-logs")
        self.logs.mkdir()

    def _spawn(self, key: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{key}.log", "w")  # noqa: SIM115 - the process keeps it
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "RAY_AUTH_MODE": "token"})
        self.procs[key] = proc
        return proc

    def start_head(self) -> None:
        self._spawn("head", [str(Path(sys.executable).with_name("ray")), "start", "--head", "--port", str(self.port),
                             "--num-cpus", "0", "--block", "--include-dashboard", "false", "--disable-usage-stats",
                             "--temp-dir", self.temp_dir])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.5)
        raise RuntimeError("the Ray head did not start")

    def start_agent(self, device: str, core: int, other_version: bool = False) -> subprocess.Popen:
        entry = ["-c", AGENT_OTHER_VERSION] if other_version else ["-m", "nestnas"]
        return self._spawn(f"agent-{device}", ["taskset", "-c", str(core), sys.executable, *entry, "agent",
                                               "--address", self.address, "--device", device])

    def wait_for(self, devices: set[str], timeout: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.devices()
            if devices <= {r["device"] for r in rows}:
                return rows
            time.sleep(2)
        raise RuntimeError(f"agents {devices} did not come up; logs in {self.logs}")

    def devices(self) -> list[dict]:
        run = subprocess.run([sys.executable, "-m", "nestnas", "devices", "--ray", self.address, "--json"],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)  # Ray's own lines (e.g. after an agent was lost) go to its log

    def stop(self, key: str, grace: float = 30) -> None:
        proc = self.procs.pop(key)
        with _suppress_lookup():
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        with _suppress_lookup():
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its group is left
        proc.wait()

    def kill(self, key: str) -> None:
        proc = self.procs.pop(key)
        with _suppress_lookup():
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def leftovers(self) -> list[str]:
        ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
        return [line for line in ps.splitlines()
                if (self.temp_dir in line or self.address in line) and "ps -eo" not in line]


class _suppress_lookup:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        return exc_type is ProcessLookupError


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray")
    if not Path("/usr/bin/taskset").exists() and not Path("/bin/taskset").exists():
        pytest.skip("needs taskset to pin the agents")
    c = Cluster()
    try:
        c.start_head()
        # One after the other: two nodes starting at the same instant on one machine race for the
        # same socket names in the head's session folder.
        c.start_agent("d0", 0)
        c.wait_for({"d0"})
        c.start_agent("d1", 1 % os.cpu_count())
        c.wait_for({"d0", "d1"})
        yield c
    finally:
        for key in [k for k in c.procs if k != "head"]:
            c.stop(key)
        if "head" in c.procs:
            c.stop("head")
        left = c.leftovers()
        for line in left:  # kill stragglers by id, then fail
            with _suppress_lookup():
                os.kill(int(line.split()[0]), signal.SIGKILL)
        assert not left, left


def _profile(cluster, *args, env=None, timeout=400):
    cmd = [sys.executable, "-m", "nestnas", "profile", "--ray", cluster.address, "--samples", "4", "--no-blocks",
           "--passes", "1", "--batch-size", "4", "--resolution", "32", "--json", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_farm_profiles_two_devices_in_parallel(cluster, tmp_path):
    from nestnas.hw_profiles.profile import DeviceProfile

    rows = {r["device"]: r for r in cluster.devices()}
    assert rows["d0"]["cpu_affinity"] == [0] and rows["d1"]["cpu_affinity"] == [1 % os.cpu_count()]
    assert rows["d0"]["threads"] == 1 and rows["d0"]["backend"] == "onnxruntime"
    import nestnas
    assert rows["d0"]["nestnas"] == nestnas.__version__

    run = _profile(cluster, "--device", "d0", "--device", "d1", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    summaries = {s["device"]: s for s in json.loads(run.stdout)}
    for device, core in (("d0", 0), ("d1", 1 % os.cpu_count())):
        path = tmp_path / f"{device}-onnxruntime-cnn.json"
        assert summaries[device]["profile"] == str(path)
        prof = DeviceProfile.load(path)
        assert prof.name == device and prof.complete and len(prof.measurements) == 4
        # The agent's fingerprint, not the driver's: its device, its one core, its thread count.
        assert prof.fingerprint["device"] == device and prof.fingerprint["cpu_affinity"] == [core]
        assert prof.fingerprint["threads"] == 1
        assert all(0 < m.median_ms < 1000 for m in prof.measurements.values())

    # Plausible against this process measuring the same subnet with one thread.
    from nestnas.hw_profiles.profiler import LocalMeasurer
    from nestnas.supernet.base import build_supernet
    from nestnas.supernet.config import SubnetConfig

    prof = DeviceProfile.load(tmp_path / "d0-onnxruntime-cnn.json")
    net = build_supernet(prof.search_space(), **prof.spec).eval()
    record = next(iter(prof.measurements.values()))
    config = SubnetConfig.from_dict(record.config)
    local = LocalMeasurer("onnxruntime", threads=1).measure(net.extract(config), net.input_specs(config, 4), 0)
    assert 0.25 < record.median_ms / local["median_ms"] < 4, (record.median_ms, local["median_ms"])


@pytest.mark.slow
def test_farm_refuses_other_version_and_bad_checksum(cluster, tmp_path):
    cluster.start_agent("old", 0, other_version=True)
    cluster.wait_for({"old"})
    run = _profile(cluster, "--device", "old", "--out", str(tmp_path / "old.json"))
    import nestnas
    assert run.returncode == 1
    line = _one_error_line(run.stderr)
    assert "0.0.0-other" in line and nestnas.__version__ in line, line
    assert not (tmp_path / "old.json").exists()
    run = _profile(cluster, "--device", "nobody", "--out", str(tmp_path / "x.json"))
    line = _one_error_line(run.stderr)
    assert "no agent advertises it; devices up: d0, d1, old" in line, line
    cluster.stop("agent-old")

    # The agent checks the model's checksum before building it.
    from nestnas.errors import ArtifactError
    from nestnas.hw_profiles.farm import list_agents
    from nestnas.raycluster import connect

    with connect(cluster.address) as ray:
        agent = next(a for a in list_agents(ray) if a["device"] == "d0")
        with pytest.raises(ArtifactError, match="refused"):
            try:
                ray.get(agent["handle"].measure.remote(b"not onnx", "0" * 64, (), 0, None, "torchscript"))
            except ray.exceptions.RayTaskError as exc:
                raise exc.cause from None


@pytest.mark.slow
def test_farm_agent_lost_mid_run_then_resumed(cluster, tmp_path):
    from nestnas.hw_profiles.profile import DeviceProfile

    out = tmp_path / "d1.json"
    cmd = [sys.executable, "-m", "nestnas", "profile", "--ray", cluster.address, "--device", "d1", "--samples", "12",
           "--no-blocks", "--passes", "1", "--batch-size", "4", "--resolution", "32", "--out", str(out), "--json"]
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "NESTNAS_AGENT_WAIT_S": "5"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if out.exists() and len(DeviceProfile.load(out).measurements) >= 2:
            break
        time.sleep(0.2)
    cluster.kill("agent-d1")  # SIGKILL: its node dies with it
    _, err = driver.communicate(timeout=300)
    assert driver.returncode == 1, err
    saved = DeviceProfile.load(out)
    line = _one_error_line(err)
    assert "lost mid-run" in line and "rerunning the same command resumes" in line, line
    n = len(saved.measurements)
    assert 2 <= n < 12 and f"{n} measurements are saved in {out}" in line, line

    cluster.start_agent("d1", 1 % os.cpu_count())
    cluster.wait_for({"d1"})
    # Records flagged unstable (a busy host) would be measured again on resume, by design; here
    # every saved record must stay as it was.
    run = subprocess.run([*cmd, "--no-remeasure-unstable"], capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr
    resumed = DeviceProfile.load(out)
    assert len(resumed.measurements) == 12  # keyed by config hash: no duplicates
    for key, record in saved.measurements.items():  # what was saved is kept, not measured again
        assert resumed.measurements[key].timestamp == record.timestamp
        assert resumed.measurements[key].median_ms == record.median_ms
