"""Batch size, unit and predictor identity travel as typed fields from profile to objective to
front to bundle manifest; nothing parses them back out of a display string."""
import json

import numpy as np
import pytest

from nestnas.compile.runners import Measurement
from nestnas.errors import ArtifactError, ConfigError
from nestnas.exporting import export
from nestnas.hw_profiles.profile import DeviceProfile
from nestnas.search import search
from nestnas.search.front import ParetoFront
from nestnas.search.objectives import MetricInfo, Objective, PredictorId, macs_objective
from nestnas.search.presets import profile_latency
from nestnas.supernet.base import build_supernet
from nestnas.supernet.space import SearchSpace

TINY_TR = SearchSpace.transformer(depth_choices=(1, 2), embed_choices=(16, 32), head_choices=(1, 2),
                                  mlp_ratio_choices=(2.0, 4.0), head_dim=8)  # 40 distinct subnets
SPEC = {"num_classes": 10}
IDENTITY = PredictorId("hybrid", "/profiles/p.json", "ab" * 32, "edge-box", "onnxruntime", 4)


def fake_latency(batch_size, unit="ms", identity=IDENTITY):
    """A latency objective (parameter count in millions, standing in for a predictor)."""
    params = macs_objective(TINY_TR, **SPEC)
    return Objective("latency", lambda cs: params.evaluate(cs) / 1e4, "min", unit, "predicted", "ctx",
                     batch_size=batch_size, predictor=identity)


@pytest.fixture(scope="module")
def front():
    return search(TINY_TR, [fake_latency(8), macs_objective(TINY_TR, **SPEC)], evals=8, pop_size=4, seed=0,
                  algorithm="random")


def test_the_display_is_derived_and_a_unit_with_a_batch_inside_is_refused():
    assert MetricInfo("ms", 8).display == "ms @ batch 8" and MetricInfo("ms").display == "ms"
    assert MetricInfo("MACs").display == "MACs"
    with pytest.raises(ConfigError, match="give the bare unit"):
        Objective("latency", len, unit="ms @ batch 8")
    with pytest.raises(ConfigError, match="batch_size 0"):
        Objective("latency", len, unit="ms", batch_size=0)


def test_a_front_written_and_read_back_keeps_the_typed_fields_exactly(front, tmp_path):
    want = MetricInfo("ms", 8, IDENTITY)
    assert front.info("latency") == want and front.info("macs") == MetricInfo("MACs")
    front.save(tmp_path / "f.json")
    back = ParetoFront.load(tmp_path / "f.json")
    assert back.info("latency") == want and back.objectives == front.objectives
    assert back.budgets == front.budgets
    stored = json.loads((tmp_path / "f.json").read_text())["objectives"][0]
    assert stored["unit"] == "ms" and stored["batch_size"] == 8 and stored["predictor"] == IDENTITY.to_dict()


def test_a_front_written_before_typed_fields_still_loads_with_its_batch(front, tmp_path):
    data = front.to_dict()
    for o in data["objectives"]:
        o.pop("batch_size"), o.pop("predictor")
    data["objectives"][0]["unit"] = "ms @ batch 16"
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = ParetoFront.load(tmp_path / "old.json")
    assert old.info("latency") == MetricInfo("ms", 16) and old.info("macs") == MetricInfo("MACs")
    data["objectives"][0]["unit"] = "ms @ 16"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="give the bare unit"):
        ParetoFront.load(tmp_path / "bad.json")


@pytest.mark.parametrize("batch", [8, 3])
def test_exporting_a_front_writes_bundles_at_its_latency_batch(front, tmp_path, batch):
    """unit="ms" with batch_size B: the bundle is built at batch B (it once fell back to 1)."""
    net = build_supernet(TINY_TR, **SPEC).eval()
    f = ParetoFront.from_archive(TINY_TR, [fake_latency(batch).describe(), front.objectives[1]], [],
                                 front.reference, front.evaluated, {})
    result = export(f.candidates[:1], tmp_path / "b", net=net, front=f, formats=("onnx",), measure=False)
    manifest = result["manifests"][0]
    assert manifest["input"]["shape"][0] == batch
    assert np.load(tmp_path / "b" / "check_input.npy").shape[0] == batch
    pred = manifest["predicted_latency"]
    assert pred["batch"] == batch and pred["unit"] == "ms" and pred["predictor"] == IDENTITY.to_dict()
    on_disk = json.loads((tmp_path / "b" / "manifest.json").read_text())["predicted_latency"]
    assert on_disk["batch"] == batch and on_disk["predictor"]["device"] == "edge-box"


def test_a_profile_gives_its_batch_and_identity_to_the_latency_objective(tmp_path):
    profile = DeviceProfile("edge-box", {"backend": "onnxruntime", "threads": 2}, TINY_TR.to_dict(), SPEC, 8)
    rng = np.random.default_rng(0)
    for i in range(1, 13):
        config = TINY_TR.canonical(TINY_TR.decode(rng.integers(0, np.asarray(TINY_TR.upper_bounds()) + 1)))
        stats = Measurement(0.1 * i, 0.09 * i, 0.11 * i, 0.02, 20, 0.01, True, 1).to_dict()
        profile.add(config, {**stats, "passes": [stats]})
    path = tmp_path / "p.json"
    profile.save(path)
    objective = profile_latency(path)
    from nestnas.fileio import sha256_file

    assert objective.info == MetricInfo("ms", 8, PredictorId("ensemble", str(path), sha256_file(path), "edge-box",
                                                             "onnxruntime", 2))
    assert objective.describe()["batch_size"] == 8


def test_profile_records_are_typed_measurements_and_shipped_files_round_trip_exactly():
    from pathlib import Path

    from nestnas.hw_profiles.profile import ProfileRecord

    shipped = sorted((Path(__file__).parents[1] / "hw_profiles" / "data").glob("*.json"))
    assert shipped
    for path in shipped:
        raw = json.loads(path.read_text())
        profile = DeviceProfile.load(path)
        record = next(iter(profile.measurements.values()))
        assert isinstance(record, ProfileRecord) and isinstance(record.measurement, Measurement)
        assert all(isinstance(p, Measurement) for p in record.passes or ())
        assert all(isinstance(b.measurement, Measurement) for b in profile.blocks.values())
        assert profile.to_dict()["measurements"] == raw["measurements"]
        assert profile.to_dict()["blocks"] == raw["blocks"]
    # A pass measured too briefly for a CI keeps None on disk, inf in the typed record.
    brief = {**Measurement(1.0, 0.9, 1.1, 0.1, 3, float("inf"), False, 2).to_dict(), "future_field": 7}
    rec = ProfileRecord.from_dict({**brief, "passes": [brief]})
    assert rec.measurement.rel_ci == float("inf") and rec.to_dict()["rel_ci"] is None
    assert rec.to_dict() == {**brief, "passes": [{k: v for k, v in brief.items() if k != "future_field"}]}
