import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from nestnas.errors import ArtifactError, ConfigError, ProfileError
from nestnas.hw_profiles import DeviceProfile, block_table, profile_device, space_filling_sample, speed_factor
from nestnas.hw_profiles.blocks import all_parts, build_part, config_part_keys, parts
from nestnas.hw_profiles.profiler import merge_passes
from nestnas.predictors import AccuracyPredictor, LatencyPredictor, count_macs_encoded, load_predictor
from nestnas.predictors.fitting import split_hashes
from nestnas.predictors.metrics import prediction_metrics
from nestnas.predictors.store import save_predictor
from nestnas.supernet import ElasticCNN, ElasticTransformer, SearchSpace, StageSpec

TINY_CNN = SearchSpace.mobilenet(stages=(StageSpec(8, 2, (1, 2)), StageSpec(16, 2, (1, 2))), kernel_choices=(3, 5),
                                 expand_choices=(2, 4), width_choices=(0.5, 1.0), resolution_choices=(16, 24),
                                 stem_channels=8, head_channels=32)
N_TINY = 40  # subnets in the tiny profile: 10 held out, enough for a stable Kendall tau
TINY_TR = SearchSpace.transformer(depth_choices=(1, 2), embed_choices=(16, 32), head_choices=(1, 2),
                                  mlp_ratio_choices=(2.0, 4.0), head_dim=8)


@pytest.mark.parametrize("make", [lambda: ElasticCNN(), lambda: ElasticTransformer()])
def test_parts_compose_to_the_extracted_subnet(make):
    torch.manual_seed(0)
    net = make().eval()
    table = all_parts(net)
    for seed in range(15):
        config = net.space.sample(seed)
        x = torch.randn(net.input_shape(config, batch=2))
        y = x
        for key, recipe in parts(net, config):
            assert key in table  # the enumeration covers every subnet's parts
            module, shape = build_part(net, recipe, 2)
            assert tuple(y.shape) == shape
            y = module(y)
        torch.testing.assert_close(y, net.extract(config)(x), rtol=0, atol=1e-5)
        X = net.space.encode(config)[None]
        assert config_part_keys(net.space, X, net.spec())[0] == [k for k, _ in parts(net, config)]


def test_space_filling_sample_covers_both_ends():
    space = SearchSpace.mobilenet()
    n = 200
    X = np.array([space.encode(c) for c in space_filling_sample(space, n, seed=0)])
    uniform = np.array([space.encode(space.sample(s)) for s in range(n)])
    spec = {"num_classes": 10, "in_channels": 1}
    macs, _ = count_macs_encoded(space, X, **spec)
    umacs, _ = count_macs_encoded(space, uniform, **spec)
    ends = np.stack([space.encode(space.smallest()), space.encode(space.largest())])
    lo, hi = count_macs_encoded(space, ends, **spec)[0]
    span = lambda m: (np.log(m) - np.log(lo)) / (np.log(hi) - np.log(lo))  # noqa: E731
    # a fifth of the samples in each of the bottom and top fifths of log-MACs; uniform sampling has far fewer
    assert np.mean(span(macs) < 0.2) >= 0.08 and np.mean(span(macs) > 0.8) >= 0.08
    assert np.mean(span(macs) < 0.2) > 2 * np.mean(span(umacs) < 0.2)
    assert len({space.config_hash(space.decode(r)) for r in X}) == n
    assert space_filling_sample(space, 20, seed=3) == space_filling_sample(space, 20, seed=3)


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("prof") / "tiny.json"
    profile = profile_device(TINY_CNN, "onnxruntime", N_TINY, seed=0, out=path, name="test", threads=1)
    return path, profile


def test_profile_holds_what_it_measured(tiny_profile):
    path, profile = tiny_profile
    assert len(profile.measurements) == N_TINY and len(profile.blocks) == len(all_parts(ElasticCNN(TINY_CNN)))
    back = DeviceProfile.load(path)
    assert back.to_dict() == json.loads(json.dumps(profile.to_dict()))
    fp = back.fingerprint
    assert fp["backend"] == "onnxruntime" and fp["threads"] == 1 and fp["version"]
    assert fp["cpu"] and fp["cores"] >= 1 and fp["os"] and back.meta["runner"]["target_rel_ci"] == 0.02
    assert back.meta["passes"] == 2  # the default on ONNX Runtime
    for key, m in back.measurements.items():
        assert m["p10_ms"] <= m["median_ms"] <= m["p90_ms"] and m["repeats"] >= 5 and "timestamp" in m
        assert len(m["passes"]) == 2 and m["median_ms"] == pytest.approx(np.mean([r["median_ms"] for r in m["passes"]]))
        assert m["stable"] == all(r["stable"] for r in m["passes"])
        assert TINY_CNN.config_hash(TINY_CNN.parse(m["config"])) == key
    smallest = back.measurements[TINY_CNN.config_hash(TINY_CNN.smallest())]["median_ms"]
    assert smallest >= 0.5 * 0.8 or back.batch_size == 256  # batch chosen to make it measurable
    X, y = back.to_xy()
    assert X.shape == (N_TINY, TINY_CNN.n_var) and np.all(y > 0)


def test_profile_resumes_without_measuring_twice(tiny_profile, tmp_path):
    src, profile = tiny_profile
    data = json.loads(src.read_text())
    keys = sorted(data["measurements"])[:10]
    data["measurements"] = {k: data["measurements"][k] for k in keys}  # as if killed after 10
    path = tmp_path / "resume.json"
    path.write_text(json.dumps(data))
    done = profile_device(TINY_CNN, "onnxruntime", N_TINY, seed=0, out=path, threads=1, remeasure_unstable=False)
    assert set(done.measurements) == set(profile.measurements)
    for k in keys:  # the first ten were kept, not re-measured
        assert done.measurements[k] == data["measurements"][k]

    # a measurement flagged as too noisy is measured again on the next run
    data = json.loads(path.read_text())
    data["measurements"][keys[0]].update(stable=False, timestamp="flagged")
    for k in keys[1:]:  # on a busy host the fixture's own records may be flagged too; only keys[0] is
        data["measurements"][k]["stable"] = True
    path.write_text(json.dumps(data))
    healed = profile_device(TINY_CNN, "onnxruntime", N_TINY, seed=0, out=path, threads=1)
    assert healed.measurements[keys[0]]["timestamp"] != "flagged"
    assert all(healed.measurements[k] == data["measurements"][k] for k in keys[1:])


@pytest.mark.slow  # a killed profiling process (~45 s); resuming without measuring twice stays in the default run
def test_killed_profile_run_resumes(tmp_path):
    path = tmp_path / "killed.json"
    code = ("import sys; from nestnas.hw_profiles import profile_device; "
            "from nestnas.supernet import SearchSpace;"
            "profile_device(SearchSpace.transformer(depth_choices=(1, 2), embed_choices=(16, 32), head_choices=(1, 2),"
            "mlp_ratio_choices=(2.0, 4.0), head_dim=8), 'onnxruntime', 40, 0, out=sys.argv[1], threads=1, "
            "blocks=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)])
    deadline = time.time() + 120
    while time.time() < deadline:
        if path.exists() and len(json.loads(path.read_text() or "{}").get("measurements", {})) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = DeviceProfile.load(path)  # every save was atomic: the file always parses
    assert 5 <= len(partial.measurements) < 40
    done = profile_device(TINY_TR, "onnxruntime", 40, 0, out=path, threads=1, blocks=False)
    expected = {TINY_TR.config_hash(c) for c in space_filling_sample(TINY_TR, 40, 0)}
    assert set(done.measurements) == expected
    assert [p.name for p in tmp_path.iterdir()] == ["killed.json"]


def test_more_passes_extend_a_profile(tmp_path):
    path = tmp_path / "passes.json"
    one = profile_device(TINY_TR, "onnxruntime", 8, 0, out=path, threads=1, blocks=False, passes=1)
    first = {k: m["passes"][0] for k, m in one.measurements.items()}
    # a record written before passes were kept counts as the first pass
    data = json.loads(path.read_text())
    legacy = sorted(data["measurements"])[0]
    data["measurements"][legacy].pop("passes")
    path.write_text(json.dumps(data))
    # Not healing: on a busy host the first pass is often unstable, and healing would measure it anew.
    three = profile_device(TINY_TR, "onnxruntime", 8, 0, out=path, threads=1, blocks=False, passes=3,
                           remeasure_unstable=False)
    assert three.meta["passes"] == 3 and set(three.measurements) == set(first)
    for key, m in three.measurements.items():
        assert len(m["passes"]) == 3 and m["passes"][0]["median_ms"] == first[key]["median_ms"]
        assert m["median_ms"] == np.median([r["median_ms"] for r in m["passes"]])
        assert m["repeats"] == sum(r["repeats"] for r in m["passes"])
    with pytest.raises(ConfigError, match="passes must be at least 1, got 0"):
        profile_device(TINY_TR, "onnxruntime", 8, 0, passes=0)


def test_profile_can_measure_the_graph_bundles_ship(tmp_path):
    path = tmp_path / "dynamo.json"
    profile = profile_device(TINY_TR, "onnxruntime", 3, 0, out=path, threads=1, blocks=False, passes=1,
                             exporter="dynamo")
    assert profile.fingerprint["exporter"] == "dynamo" and len(profile.measurements) == 3
    with pytest.raises(ProfileError, match="exporter='dynamo'"):  # resuming with another graph is refused
        profile_device(TINY_TR, "onnxruntime", 3, 0, out=path, threads=1, blocks=False, passes=1)
    with pytest.raises(ConfigError, match="unknown ONNX exporter 'jit'"):
        profile_device(TINY_TR, "onnxruntime", 3, 0, exporter="jit")


def test_speed_factor_sees_a_device_that_became_slower(tiny_profile):
    _, profile = tiny_profile
    same = speed_factor(profile, n_anchors=4)
    # the shared host drifts between the profile and now (0.61 was seen), so only a loose sanity range
    assert len({a["hash"] for a in same.anchors}) == 4 and 1 / 3 < same.factor < 3
    medians = sorted(a["profile_ms"] for a in same.anchors)
    all_ms = sorted(m["median_ms"] for m in profile.measurements.values())
    assert medians[0] < np.median(all_ms) < medians[-1]  # anchors spread over the latency range
    # as if the profile had been measured on a device twice as fast as this one is now
    faster = DeviceProfile(**{**profile.__dict__, "measurements": {
        k: {**m, "median_ms": m.measurement.median_ms / 2} for k, m in profile.measurements.items()}})
    slower = speed_factor(faster, n_anchors=4)
    # same anchors, their profile latencies halved exactly, and a factor that follows from them; the
    # two measuring rounds differ by the host's drift (1.9x was seen), which the ratio of `now_ms` removes
    assert [a["hash"] for a in slower.anchors] == [a["hash"] for a in same.anchors]
    for a, b in zip(slower.anchors, same.anchors, strict=True):
        assert a["profile_ms"] == b["profile_ms"] / 2 and a["ratio"] == a["now_ms"] / a["profile_ms"]
    drift = np.exp(np.median(np.log([a["now_ms"] / b["now_ms"] for a, b in zip(slower.anchors, same.anchors)])))
    assert slower.factor == pytest.approx(2 * same.factor * drift, rel=0.25)
    assert slower.factor > same.factor
    with pytest.raises(ConfigError, match="fewer than 999 anchors"):
        speed_factor(profile, n_anchors=999)


def test_merged_passes_keep_the_worst_spread():
    runs = [{"median_ms": 1.0, "p10_ms": 0.9, "p90_ms": 1.2, "cv": 0.05, "rel_ci": 0.01, "repeats": 20, "stable": True,
             "attempts": 1, "calls_per_sample": 2},
            {"median_ms": 1.2, "p10_ms": 1.1, "p90_ms": 1.4, "cv": 0.02, "rel_ci": None, "repeats": 5, "stable": False,
             "attempts": 2, "calls_per_sample": 2}]
    m = merge_passes(runs)
    assert m["median_ms"] == pytest.approx(1.1)
    assert m["p10_ms"] == pytest.approx(1.0) and m["p90_ms"] == pytest.approx(1.3)
    assert m["cv"] == 0.05 and m["rel_ci"] is None and m["repeats"] == 25 and not m["stable"] and m["attempts"] == 2
    assert m["passes"] == runs and merge_passes(runs[:1])["median_ms"] == 1.0


def test_bad_profiles_are_refused(tiny_profile, tmp_path):
    src, _ = tiny_profile
    with pytest.raises(ProfileError, match="not found"):
        DeviceProfile.load(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text(src.read_text()[:-200])
    with pytest.raises(ProfileError, match="corrupt"):
        DeviceProfile.load(bad)
    data = json.loads(src.read_text())
    data["schema_version"] = 99
    bad.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="schema_version 99"):
        DeviceProfile.load(bad)
    with pytest.raises(ProfileError, match="another search space"):
        DeviceProfile.load(src).check_space(SearchSpace.mobilenet())
    with pytest.raises(ProfileError, match="another search space"):
        profile_device(SearchSpace.mobilenet(), "onnxruntime", 4, out=src, threads=1)
    with pytest.raises(ConfigError, match="unknown backend"):
        profile_device(TINY_CNN, "tensorrt", 4)


@pytest.mark.parametrize("kind", ["lut", "ensemble", "hybrid"])
def test_latency_predictors_follow_the_estimator_contract(tiny_profile, kind):
    _, profile = tiny_profile
    train, held = split_hashes(profile.measurements, 0.25, seed=0)
    X, y = profile.to_xy(train)
    table = block_table(profile)
    predictor = LatencyPredictor(TINY_CNN, kind=kind, spec=profile.spec, block_table=table)
    assert predictor.get_params()["kind"] == kind and not hasattr(predictor, "n_features_in_")
    with pytest.raises(Exception, match="not fitted"):
        predictor.predict(X)
    assert predictor.fit(X, y) is predictor
    Xh, yh = profile.to_xy(held)
    mean, std = predictor.predict(Xh, return_std=True)
    assert mean.shape == std.shape == (len(held),) and np.all(mean > 0) and np.all(std >= 0)
    # Measured medians on a shared host carry noise of the order of the tiny space's spread, so
    # on them only a positive rank correlation is asked; ranking skill is asked on noise-free
    # targets built from the measured block table (a known, non-additive cost).
    assert prediction_metrics(yh, mean)["kendall_tau"] > 0.0
    def clean(rows):
        return np.array([sum(table[k] for k in keys) * (1 + 0.05 * len(keys))
                         for keys in config_part_keys(TINY_CNN, rows, profile.spec)])
    fitted = LatencyPredictor(TINY_CNN, kind=kind, spec=profile.spec, block_table=table).fit(X, clean(X))
    assert prediction_metrics(clean(Xh), fitted.predict(Xh))["kendall_tau"] > 0.7
    again = LatencyPredictor(TINY_CNN, kind=kind, spec=profile.spec, block_table=table).fit(X, y)
    np.testing.assert_array_equal(again.predict(Xh), mean)  # seeded: bit-identical refit


def test_predictor_inputs_are_checked(tiny_profile):
    _, profile = tiny_profile
    X, y = profile.to_xy()
    with pytest.raises(ConfigError, match="unknown latency predictor kind"):
        LatencyPredictor(TINY_CNN, kind="magic").fit(X, y)
    with pytest.raises(ConfigError, match="needs a block table"):
        LatencyPredictor(TINY_CNN, kind="lut").fit(X, y)
    with pytest.raises(ConfigError, match="shape"):
        LatencyPredictor(TINY_CNN, kind="ensemble").fit(X[:, :3], y)
    with pytest.raises(ConfigError, match="rows"):
        LatencyPredictor(TINY_CNN, kind="ensemble").fit(X, y[:-1])
    with pytest.raises(ConfigError, match="positive"):
        LatencyPredictor(TINY_CNN, kind="ensemble").fit(X, -y)


def test_saved_predictor_refits_identically_and_checks_its_profile(tiny_profile, tmp_path):
    src, profile = tiny_profile
    local = tmp_path / "p.json"
    local.write_text(src.read_text())
    train, held = split_hashes(profile.measurements, 0.25, seed=0)
    Xh, _ = profile.to_xy(held)
    X, y = profile.to_xy(train)
    want = LatencyPredictor(TINY_CNN, "hybrid", profile.spec, block_table(profile)).fit(X, y).predict(Xh)
    save_predictor(tmp_path / "pred.json", "latency", local, "hybrid", 0, train)
    predictor, record = load_predictor(tmp_path / "pred.json")
    np.testing.assert_array_equal(predictor.predict(Xh), want)
    assert record["kind"] == "hybrid"
    local.write_text(local.read_text().replace('"name": "test"', '"name": "edited"'))
    with pytest.raises(ArtifactError, match="does not match"):
        load_predictor(tmp_path / "pred.json")
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ArtifactError, match="not a nestnas predictor"):
        load_predictor(tmp_path / "junk.json")


def test_accuracy_predictor_learns_a_known_function():
    space = TINY_TR
    rng = np.random.default_rng(0)
    X = np.array([space.encode(space.sample(rng)) for _ in range(150)])
    spec = {"num_classes": 10, "num_tokens": 8, "token_dim": 8}
    macs, _ = count_macs_encoded(space, X, **spec)
    y = 0.5 + 0.05 * np.log(macs)  # accuracy rising with capacity
    predictor = AccuracyPredictor(space, spec=spec).fit(X[:100], y[:100])
    metrics = prediction_metrics(y[100:], predictor.predict(X[100:]))
    assert metrics["kendall_tau"] > 0.8 and metrics["within_10pct"] > 0.9


def test_table_predictors_need_every_block(tiny_profile):
    from nestnas.predictors.fitting import available_kinds

    _, profile = tiny_profile
    assert available_kinds(profile) == ["lut", "ensemble", "hybrid"]
    partial = DeviceProfile(**{**profile.__dict__, "blocks": dict(list(profile.blocks.items())[:-1])})
    assert available_kinds(partial) == ["ensemble"]  # a profile stopped while measuring blocks


def test_default_kind_is_chosen_without_the_held_out_subnets(tiny_profile):
    from nestnas.predictors.fitting import available_kinds, choose_kind

    _, profile = tiny_profile
    train, held = split_hashes(profile.measurements, 0.25, seed=0)
    kind, cv = choose_kind(profile, available_kinds(profile), train, seed=0)
    assert set(cv) == {"lut", "ensemble", "hybrid"} and kind in cv
    assert all(cv[kind]["within_10pct"] >= m["within_10pct"] - 5e-4 for m in cv.values())
    # Corrupting the held-out latencies must not change the choice: they are never read.
    broken = DeviceProfile(**{**profile.__dict__, "measurements": {
        k: ({**m, "median_ms": m["median_ms"] * 7.0} if k in held else m) for k, m in profile.measurements.items()}})
    assert choose_kind(broken, available_kinds(broken), train, seed=0) == (kind, cv)
    assert choose_kind(profile, ["ensemble"], train) == ("ensemble", {})
