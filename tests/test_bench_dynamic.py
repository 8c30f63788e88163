"""`nestnas bench` on dynamic and switchable bundles through the real CLI (in this process):
latency per input and per subnet, branches reported, bad input one line; and the switchable
export's parity check relative to the size of the outputs."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from test_bundle_trust import no_key, one_line_error, run_cli  # noqa: F401 - no_key: no user key, autouse

import nestnas
from nestnas.compile.dynamic import load_dynamic, rewrite
from nestnas.compile.signing import KEY_ENV, KEY_FILE_ENV
from nestnas.compile.switch import BudgetSwitch, check_subnets, export_switchable
from nestnas.errors import ArtifactError
from nestnas.supernet import ElasticCNN, SearchSpace

from dynamic_nets import Gate, trained_like

KEY = "33" * 32


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    """A signed Gate bundle (ONNX Runtime) and an input file of 6 calls, 4 on the fast path."""
    root = tmp_path_factory.mktemp("gate")
    torch.manual_seed(0)
    x = torch.randn(1, 4)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NESTNAS_HOME", str(root / "home"))
        mp.setenv(KEY_ENV, KEY)
        folder = rewrite(Gate().eval(), [(x, 1.0), (x, 0.0)]).save(root / "gate", backends=("onnxruntime",))
    xs = np.random.default_rng(0).standard_normal((6, 1, 4)).astype(np.float32)
    fast = np.array([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    np.savez(root / "in.npz", xs, fast)
    np.savez(root / "named.npz", x=xs, fast=fast)
    return {"folder": folder, "root": root, "xs": xs, "fast": fast}


@pytest.fixture(scope="module")
def switch(tmp_path_factory):
    """A switchable bundle of two nested CNN subnets whose logits reach 1e4 (the classifier scaled
    by 1e4): float32 rounding then exceeds an absolute 1e-4, not the relative tolerance."""
    root = tmp_path_factory.mktemp("switch")
    torch.manual_seed(0)
    net = trained_like(ElasticCNN(SearchSpace.mobilenet(), num_classes=10, in_channels=1), 0)
    with torch.no_grad():
        net.classifier.weight.mul_(1e4)
        net.classifier.bias.mul_(1e4)
    configs = net.space.ladder(4)[:2]  # the two smallest rungs: quick to export and time
    with pytest.MonkeyPatch.context() as mp:  # unsigned: no key from the user's environment
        mp.setenv("NESTNAS_HOME", str(root / "home"))
        mp.delenv(KEY_ENV, raising=False)
        mp.delenv(KEY_FILE_ENV, raising=False)
        result = export_switchable(net, configs, root / "sw", ("onnxruntime",), threads=1)
    return {"net": net, "configs": configs, "result": result, "folder": root / "sw"}


def test_bench_times_a_dynamic_bundle_per_input_and_reports_its_branches(gate, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    code, out, err = run_cli("bench", gate["folder"], "--inputs", gate["root"] / "in.npz", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["kind"] == "dynamic" and r["model"] == "Gate" and r["signature"] == "verified"
    assert r["forward"] == ["x", "fast"] and r["inputs"] == 6
    [row] = r["rows"]
    assert row["backend"] == "onnxruntime" and 0 < row["min_ms"] <= row["p10_ms"] <= row["median_ms"] \
        <= row["p90_ms"] <= row["max_ms"]
    assert len(r["per_input_ms"]["onnxruntime"]) == 6 and min(r["per_input_ms"]["onnxruntime"]) > 0
    # fast > 0.5 on 4 of the 6 inputs: one path each way, both sides of the one branch
    assert r["branches"] == [{"id": 0, "line": 2, "condition": "fast > 0.5", "taken": 4, "skipped": 2}]
    assert sorted((p["subgraphs"], p["inputs"]) for p in r["paths"]) == [("g000", 4), ("g001", 2)]
    assert all(p["median_ms"]["onnxruntime"] > 0 for p in r["paths"])
    assert r["branch_coverage"] == 1.0 == r["branch_coverage_at_save"]
    assert r["subgraphs_used"] == r["subgraphs"] == 2
    # arguments by name, and the tables
    code, out, err = run_cli("bench", gate["folder"], "--inputs", gate["root"] / "named.npz")
    assert code == 0, err
    assert "latency per input over 6 inputs" in out and "fast > 0.5): taken 4, skipped 2" in out
    assert "100% of branch sides reached" in out and "2 of 2 subgraphs used" in out


def test_bench_a_dynamic_bundle_bad_input_is_one_line(gate, tmp_path, monkeypatch):
    folder, root = gate["folder"], gate["root"]
    one_line_error(run_cli("bench", folder), "dynamic bundle", "carries no example inputs", "--inputs")
    one_line_error(run_cli("bench", folder, "--inputs", tmp_path / "none.npz"), "--inputs", "no such file")
    (tmp_path / "t.txt").write_text("1 2 3")
    one_line_error(run_cli("bench", folder, "--inputs", tmp_path / "t.txt"), "give a .npy or .npz file")
    (tmp_path / "t.npz").write_text("1 2 3")
    one_line_error(run_cli("bench", folder, "--inputs", tmp_path / "t.npz"), "not a numpy .npz file")
    np.savez(tmp_path / "short.npz", gate["xs"])
    one_line_error(run_cli("bench", folder, "--inputs", tmp_path / "short.npz"),
                   "forward (x, fast) does not take", "'fast'")
    np.savez(tmp_path / "wide.npz", np.zeros((2, 1, 5), np.float32), np.zeros(2))
    one_line_error(run_cli("bench", folder, "--inputs", tmp_path / "wide.npz"), "input 0", "(1, 5)",
                   "never compiled", "compiled for inputs of shape (1, 4)")
    np.savez(tmp_path / "ragged.npz", gate["xs"], np.zeros(3))
    one_line_error(run_cli("bench", folder, "--inputs", tmp_path / "ragged.npz"), "arr_0 6, arr_1 3")
    np.save(tmp_path / "words.npy", np.array(["a", "b"]))
    one_line_error(run_cli("bench", folder, "--inputs", tmp_path / "words.npy"), "give numbers")
    one_line_error(run_cli("bench", folder, "--inputs", root / "in.npz", "--backend", "tensorrt"),
                   "--backend 'tensorrt'", "allowed: onnxruntime, tvm")
    one_line_error(run_cli("bench", folder, "--inputs", root / "in.npz", "--backend", "tvm"),
                   "holds no tvm subgraphs")
    one_line_error(run_cli("bench", folder, "--inputs", root / "in.npz", "--calibrate", root / "in.npz"),
                   "--calibrate applies to static bundles")
    # signed with KEY: a wrong key is refused, --trust or not; an unsigned copy needs --trust
    monkeypatch.setenv(KEY_ENV, "44" * 32)
    one_line_error(run_cli("bench", folder, "--inputs", root / "in.npz", "--trust"), "signed with another key")
    monkeypatch.setenv(KEY_ENV, KEY)
    unsigned = tmp_path / "unsigned"
    shutil.copytree(folder, unsigned)
    manifest = json.loads((unsigned / "manifest.json").read_text())
    (unsigned / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "signature"}))
    one_line_error(run_cli("bench", unsigned, "--inputs", root / "in.npz"), "not signed", "--trust")
    code, out, err = run_cli("bench", unsigned, "--inputs", root / "in.npz", "--trust", "--json")
    assert code == 0 and json.loads(out)["signature"] == "unsigned", err
    # a subgraph edited after export is refused before anything runs
    (unsigned / "g001.onnx").write_bytes(b"not onnx")
    one_line_error(run_cli("bench", unsigned, "--inputs", root / "in.npz", "--trust"), "g001.onnx",
                   "does not match its checksum")


def test_bench_times_every_subnet_of_a_switchable_bundle(switch):
    code, out, err = run_cli("bench", switch["folder"], "--json")
    assert code == 0, err
    r = json.loads(out)
    manifest = json.loads((switch["folder"] / "manifest.json").read_text())
    lat = manifest["switch"]["latencies_ms"]["onnxruntime"]
    assert r["kind"] == "switchable" and r["subnets"] == 2 and r["host_uses"] == "onnxruntime"
    assert [row["subnet"] for row in r["rows"]] == [0, 1]
    for i, row in enumerate(r["rows"]):
        assert row["budget_ms"] == row["manifest_ms"] == lat[i] and row["hash"] == manifest["switch"]["hashes"][i]
        assert row["runs"] == max(k for k in range(2) if lat[k] <= lat[i])  # the host's pick for that budget
        assert 0 < row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
    code, out, err = run_cli("bench", switch["folder"])
    assert code == 0 and "each subnet run with its own latency as the budget" in out, err
    one_line_error(run_cli("bench", switch["folder"], "--backend", "onnxruntime,magic"), "--backend 'magic'")
    # with --inputs it is timed as the dynamic bundle it is: the user's inputs and budgets
    x = np.random.default_rng(1).standard_normal([3, *manifest["switch"]["input_shape"]]).astype(np.float32)
    inputs = switch["folder"].parent / "budgets.npz"
    np.savez(inputs, x, np.array([0.0, lat[0], 1e9]))
    code, out, err = run_cli("bench", switch["folder"], "--inputs", inputs, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["inputs"] == 3 and r["forward"] == ["x", "budget_ms"] and r["rows"][0]["median_ms"] > 0


def test_switchable_parity_is_relative_to_the_outputs(switch):
    """The scaled subnets export (an absolute 1e-4 refused them), a true difference is refused."""
    folder, net, configs = switch["folder"], switch["net"], switch["configs"]
    switcher = BudgetSwitch(net, configs, switch["result"]["latencies_ms"]["onnxruntime"])
    x = torch.randn(switcher.input_shape(1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = [net(net.prepare_input(x, c), c).numpy() for c in switcher.configs]
    model = load_dynamic(folder, "onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        worst = max(float(np.abs(model(x.numpy(), v) - w).max()) for v, w in zip(switcher.latencies, want))
    assert max(np.abs(w).max() for w in want) > 1e3
    assert worst > 1e-4  # what the old absolute check refused
    check_subnets(model, switcher, x.numpy(), want, folder)
    off = [w + 3e-4 * np.abs(w).max() for w in want]  # three tolerances off
    with pytest.raises(ArtifactError, match="subnet .* differs from torch"):
        check_subnets(model, switcher, x.numpy(), off, folder)


@pytest.mark.tvm
def test_bench_a_dynamic_bundle_on_both_backends(gate, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 4)
    folder = rewrite(Gate().eval(), [(x, 1.0), (x, 0.0)]).save(tmp_path / "both")
    code, out, err = run_cli("bench", folder, "--inputs", gate["root"] / "in.npz", "--json")
    assert code == 0, err
    rows = {r["backend"]: r for r in json.loads(out)["rows"]}
    assert sorted(rows) == ["onnxruntime", "tvm"] and all(r["median_ms"] > 0 for r in rows.values())
    assert rows["tvm"]["path_mismatches"] == 0  # every input took the same subgraphs on both
    code, out, err = run_cli("bench", folder, "--inputs", gate["root"] / "in.npz", "--backend", "tvm", "--json")
    assert code == 0, err
    assert [r["backend"] for r in json.loads(out)["rows"]] == ["tvm"]


def test_bench_of_a_switchable_manifest_of_another_shape_is_one_line(switch, tmp_path):
    folder = tmp_path / "sw"
    shutil.copytree(switch["folder"], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["switch"]["latencies_ms"]["onnxruntime"] = manifest["switch"]["latencies_ms"]["onnxruntime"][:1] * 3
    manifest["switch"]["latencies_ms"]["tvm"] = [1.0]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(run_cli("bench", folder), "switchable bundle manifest", "one latency per subnet")


def test_bench_backend_and_inputs_on_a_static_bundle(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "static"
    nestnas.export(torch.nn.Sequential(torch.nn.Linear(4, 4)), folder, input_shape=(1, 4), formats=("onnx",),
                   measure=False)
    code, out, err = run_cli("bench", folder, "--backend", "onnxruntime", "--json")
    assert code == 0, err
    assert [r["backend"] for r in json.loads(out)["rows"]] == ["onnxruntime"]
    one_line_error(run_cli("bench", folder, "--backend", "tvm"), "has no tvm artifact")
    one_line_error(run_cli("bench", folder, "--inputs", tmp_path / "x.npz"), "--inputs applies to dynamic")
