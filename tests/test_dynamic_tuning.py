"""Saving dynamic programs with TVM tuning, and runtime failures during a save.

A tuned save tunes the workloads of every specialisation once (siblings share them) through a
MetaSchedule database that a later save reuses; the manifest records how its subgraphs were
tuned. A subgraph that ONNX Runtime or TVM refuses is one line naming the subgraph and its lines
in forward, and nothing is written."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nestnas.compile.bundle import tolerance
from nestnas.compile.dynamic import CoverageWarning, load_dynamic, rewrite
from nestnas.compile.tuning import TuneOptions
from nestnas.errors import ArtifactError

import dynamic_nets as dn


class Int16Relu(nn.Module):
    """Exports to ONNX, but ONNX Runtime's CPU provider has no int16 Relu."""

    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x, scale: float):
        y = self.f(x) * scale
        return torch.relu(y.to(torch.int16)).float()


class Determinant(nn.Module):
    """Runs on ONNX Runtime, but TVM's ONNX frontend has no Det."""

    def __init__(self):
        super().__init__()
        self.f = nn.Linear(3, 3)

    def forward(self, x):
        h = self.f(x)
        if h.sum() > 0:
            h = -h
        d = torch.det(h).reshape(1, 1)
        return d


def _line_of(text: str) -> int:
    return next(i for i, line in enumerate(Path(__file__).read_text().splitlines(), 1) if text in line)


def test_a_subgraph_onnx_runtime_refuses_is_one_line_naming_it_and_its_lines(tmp_path):
    torch.manual_seed(0)
    program = rewrite(Int16Relu().eval(), [(torch.randn(1, 4), 10.0)])
    line = _line_of("y = self.f(x) * scale")
    with pytest.raises(ArtifactError) as info:
        program.save(tmp_path / "b", backends=("onnxruntime",))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("subgraph s0|scale=10.0|1x4 (")
    assert f"test_dynamic_tuning.py:{line}-{line + 1}: `y = self.f(x) * scale` ...): ONNX Runtime cannot " \
           "load it (" in message
    assert "NOT_IMPLEMENTED : Could not find an implementation for" in message  # the runtime's reason
    assert not (tmp_path / "b").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.tvm
def test_a_subgraph_tvm_cannot_import_is_one_line_naming_it_and_its_lines(tmp_path):
    torch.manual_seed(0)
    xs = [torch.randn(1, 3, 3) for _ in range(8)]
    program = rewrite(Determinant().eval(), xs)
    line = _line_of("d = torch.det(h).reshape(1, 1)")
    folder = program.save(tmp_path / "ort", backends=("onnxruntime",))  # ONNX Runtime has Det
    assert load_dynamic(folder, "onnxruntime")(xs[0].numpy()).shape == (1, 1)
    with pytest.raises(ArtifactError) as info:
        program.save(tmp_path / "b", backends=("onnxruntime", "tvm"))
    message = str(info.value)
    assert "\n" not in message
    assert f"test_dynamic_tuning.py:{line}: `d = torch.det(h).reshape(1, 1)`): TVM cannot import its ONNX " \
           "graph (" in message and "Det" in message
    assert message.startswith("subgraph s2||1x3x3 (")
    assert not (tmp_path / "b").exists()


def _records(database: Path) -> int:
    path = database / "database_tuning_record.json"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0


@pytest.mark.tvm
@pytest.mark.slow  # two MetaSchedule runs (their measuring process imports TVM): ~1 min on two busy cores
def test_a_tuned_save_tunes_shared_workloads_once_and_a_sibling_reuses_the_database(tmp_path):
    torch.manual_seed(0)
    net, x = dn.Gate().eval(), torch.randn(1, 4)
    database = tmp_path / "tuning"
    tune = TuneOptions(trials=2, database=database, strategy="replay-trace")
    program = rewrite(net, [(x, 1.0), (x, 0.0)])
    folder = program.save(tmp_path / "b", backends=("tvm",), tune=tune)
    report = json.loads((folder / "manifest.json").read_text())["tuning"]
    assert report["trials_per_task"] == 2 and report["strategy"] == "replay-trace"
    assert report["database"] == str(database)
    # both specialisations run self.a's matmul: its workload is tuned once for the two
    assert report["unique_tasks"] < report["total_tasks"]
    assert report["reused_from_database"] == 0 and report["tuned"] == report["unique_tasks"]
    assert report["trials"] > 0
    recorded = _records(database)
    entries = json.loads((folder / "manifest.json").read_text())["subgraphs"].values()
    assert all(e["schedules"]["used"] in ("tuned", "default") for e in entries)  # the faster on its example
    assert recorded >= report["unique_tasks"]

    compiled = load_dynamic(folder, "tvm")
    with torch.no_grad():
        for fast in (1.0, 0.0):
            want = net(x, fast).numpy()
            assert np.abs(compiled(x.numpy(), fast) - want).max() <= tolerance(want)

    # A sibling (one specialisation of the same network) finds all its workloads tuned.
    with pytest.warns(CoverageWarning, match="never taken"):
        sibling = rewrite(net, [(x, 0.0)])
    again = sibling.save(tmp_path / "sibling", backends=("tvm",), tune=tune)
    second = json.loads((again / "manifest.json").read_text())["tuning"]
    assert second["reused_from_database"] == second["unique_tasks"] > 0
    assert second["tuned"] == 0 and second["trials"] == 0
    assert _records(database) == recorded
    with torch.no_grad():
        want = net(x, 0.0).numpy()
        assert np.abs(load_dynamic(again, "tvm")(x.numpy(), 0.0) - want).max() <= tolerance(want)


@pytest.mark.tvm
def test_an_untuned_save_says_so_in_its_manifest(tmp_path):
    torch.manual_seed(0)
    net, x = dn.Gate().eval(), torch.randn(1, 4)
    program = rewrite(net, [(x, 1.0), (x, 0.0)])
    folder = program.save(tmp_path / "b", backends=("tvm",), tune=TuneOptions(trials=0))
    assert json.loads((folder / "manifest.json").read_text())["tuning"] is None
    with torch.no_grad():
        want = net(x, 0.0).numpy()
    assert np.abs(load_dynamic(folder, "tvm")(x.numpy(), 0.0) - want).max() <= tolerance(want)


class EmptyCaption(nn.Module):
    """A caption grown from an empty tensor made from the input's shape alone (a zero-byte constant
    TVM cannot load), whose zero-extent workloads MetaSchedule cannot search."""

    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x):
        seq = torch.zeros(x.size(0), 0)
        for _ in range(2):
            x = self.f(x)
            seq = torch.cat([seq, x.argmax(1, keepdim=True).float()], 1)
            if x.sum() > 0:
                break
        return seq


def _empty_caption_program():
    torch.manual_seed(0)
    model = EmptyCaption().eval()
    inputs = [torch.randn(1, 4, generator=torch.Generator().manual_seed(i)) for i in range(16)]
    return model, inputs, rewrite(model, inputs)


def _same_on_tvm(folder, model, inputs):
    compiled = load_dynamic(folder, "tvm")
    with torch.no_grad():
        for x in inputs:
            assert np.array_equal(compiled(x.numpy()), model(x).numpy())


@pytest.mark.tvm
def test_an_empty_tensor_made_from_an_input_shape_builds_on_tvm(tmp_path):
    model, inputs, program = _empty_caption_program()
    _same_on_tvm(program.save(tmp_path / "b", backends=("tvm",)), model, inputs)


@pytest.mark.tvm
@pytest.mark.slow  # MetaSchedule's measuring process: ~40 s on two busy cores
def test_subgraphs_metaschedule_cannot_tune_keep_default_schedules_and_the_save_completes(tmp_path):
    model, inputs, program = _empty_caption_program()
    from nestnas.compile.tuning import TuningDatabase

    tune = TuneOptions(trials=2, strategy="replay-trace", database=str(tmp_path / "db"))
    folder = program.save(tmp_path / "b", backends=("tvm",), tune=tune)
    TuningDatabase(tmp_path / "db")  # what the failed searches committed did not make it unreadable
    manifest = json.loads((folder / "manifest.json").read_text())
    failed = [e["schedules"] for e in manifest["subgraphs"].values() if e["schedules"]["used"] == "default"
              and ("tuning_failed" in e["schedules"] or "tuned_failed" in e["schedules"])]
    assert failed and manifest["tuning"]["untuned_subgraphs"]
    _same_on_tvm(folder, model, inputs)


@pytest.mark.tvm
def test_a_tuning_database_tvm_cannot_read_is_one_line(tmp_path):
    from nestnas.compile.tuning import TuningDatabase
    from nestnas.errors import ConfigError

    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "database_workload.json").write_text("not json\n")
    with pytest.raises(ConfigError, match=r"tuning database .*db cannot be read \(.*\); move it aside"):
        TuningDatabase(tmp_path / "db")
