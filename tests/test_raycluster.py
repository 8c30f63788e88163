"""Connecting to Ray: address forms, a missing extra, and no cluster at an address (fast, one line)."""

import os
import socket
import sys
import time

import pytest

from nestnas.errors import ClusterError, ConfigError
from nestnas.raycluster import RAY_LOG, RayAddress, connect, parse_address, require_ray


@pytest.mark.parametrize("text, expected", [
    ("local:2", RayAddress("local", cpus=2)),
    ("auto", RayAddress("auto")),
    ("10.0.0.5:6379", RayAddress("remote", "10.0.0.5", 6379)),
    ("ray://head.lab:10001", RayAddress("remote", "head.lab", 10001)),
    ("[::1]:6379", RayAddress("remote", "::1", 6379)),
])
def test_address_forms(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["local:0", "local:x", "local:", "head", "head:", "head:99999", "a b:1", ""])
def test_bad_address_is_one_line(text):
    with pytest.raises(ConfigError) as err:
        parse_address(text)
    assert "\n" not in str(err.value) and "--ray" in str(err.value)


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an import of an uninstalled package does
    with pytest.raises(ClusterError, match=r'pip install -e "\.\[ray\]"'):
        require_ray()
    with pytest.raises(ClusterError, match="not installed"), connect("local:1"):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_cluster_at_address_fails_fast():
    pytest.importorskip("ray")
    port = _free_port()
    t0 = time.perf_counter()
    with pytest.raises(ClusterError, match=f"no Ray cluster answers at 127.0.0.1:{port}"), \
            connect(f"127.0.0.1:{port}"):
        pass
    assert time.perf_counter() - t0 < 10  # Ray's own client waits two minutes


def test_local_cluster_starts_and_stops_and_keeps_stdout_for_results(tmp_path, monkeypatch, capfd):
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("NESTNAS_HOME", str(tmp_path))
    with connect("local:1") as joined:
        assert joined.is_initialized()
        assert joined.get(joined.remote(lambda: 41 + 1).remote()) == 42
        assert int(joined.cluster_resources()["CPU"]) == 1
        os.write(1, b"(raylet) a cluster event\n")  # as Ray's own threads print them
    assert not ray.is_initialized()
    print('{"result": 1}')
    out, err = capfd.readouterr()
    assert out == '{"result": 1}\n' and "cluster event" not in err
    assert "(raylet) a cluster event" in (tmp_path / RAY_LOG).read_text()
