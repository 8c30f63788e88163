"""Transfer profiles: a new device from a few measured subnets, with other devices' profiles as priors."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from nestnas.errors import ArtifactError, ConfigError, ProfileError
from nestnas.fileio import sha256_file
from nestnas.hw_profiles import DeviceProfile, profile_device
from nestnas.hw_profiles.transfer import informative_sample, load_priors
from nestnas.predictors import LatencyPredictor, load_predictor
from nestnas.predictors.fitting import fit_and_select
from nestnas.predictors.metrics import prediction_metrics
from nestnas.predictors.store import fit_latency, save_predictor
from nestnas.predictors.transfer import prior_log_latency, prior_predictors
from nestnas.supernet import SearchSpace, StageSpec
from nestnas.supernet.config import SubnetConfig

SPACE = SearchSpace.mobilenet(stages=(StageSpec(8, 2, (1, 2)), StageSpec(16, 2, (1, 2))), kernel_choices=(3, 5),
                              expand_choices=(2, 4), width_choices=(0.5, 1.0), resolution_choices=(16, 24),
                              stem_channels=8, head_channels=32)
N_PRIOR, N_FULL, N_TRANSFER = 30, 30, 8
FAST = {"threads": 1, "passes": 1, "blocks": False}


def run_cli(*args, home):
    return subprocess.run([sys.executable, "-m", "nestnas", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "NESTNAS_HOME": str(home), "COLUMNS": "400"}, timeout=600)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A prior device (batch 8), the new device's full profile (batch 32, other seed: held-out
    subnets) and its transfer profile of N_TRANSFER subnets from that prior."""
    root = tmp_path_factory.mktemp("fleet")
    prior = root / "prior.json"
    profile_device(SPACE, "onnxruntime", N_PRIOR, seed=0, out=prior, name="dev-b8", batch_size=8, **FAST)
    full = profile_device(SPACE, "onnxruntime", N_FULL, seed=1, out=root / "full.json", name="dev-b32",
                          batch_size=32, **FAST)
    transfer = root / "transfer.json"
    profile_device(SPACE, "onnxruntime", N_TRANSFER, seed=0, out=transfer, name="dev-b32", batch_size=32,
                   transfer=[prior], **FAST)
    return root, prior, full, transfer


def test_informative_sample_is_deterministic_covers_the_ends_and_spreads(fleet):
    _, prior, _, _ = fleet
    predictors = prior_predictors([(sha256_file(prior), DeviceProfile.load(prior))])
    predict = lambda X: prior_log_latency(predictors, X)  # noqa: E731
    chosen = informative_sample(SPACE, 8, 0, predict, pool=300)
    assert chosen == informative_sample(SPACE, 8, 0, predict, pool=300)  # a pure function of its inputs
    keys = {SPACE.config_hash(c) for c in chosen}
    assert SPACE.config_hash(SPACE.smallest()) in keys and SPACE.config_hash(SPACE.largest()) in keys
    from nestnas.hw_profiles.sampling import space_filling_sample

    pool = space_filling_sample(SPACE, 300, 0)
    z = predict(np.array([SPACE.encode(c) for c in pool]))[:, 0]

    def radius(configs):  # how far the pool's farthest config is from the nearest one chosen
        zc = predict(np.array([SPACE.encode(c) for c in configs]))[:, 0]
        return np.max(np.min(np.abs(z[:, None] - zc[None, :]), axis=1))

    rng = np.random.default_rng(0)
    randoms = [radius([pool[i] for i in rng.choice(len(pool), 8, replace=False)]) for _ in range(10)]
    assert radius(chosen) < np.median(randoms)  # k-center spreads over the priors' latency


def test_transfer_profile_beats_the_same_points_without_transfer(fleet):
    _, prior, full, transfer = fleet
    t = DeviceProfile.load(transfer)
    assert len(t.measurements) == N_TRANSFER and not t.blocks and t.batch_size == 32
    chosen = fit_and_select(t, "auto", holdout=None)
    assert chosen.kind == "transfer" and chosen.kinds == ["ensemble", "transfer"]
    held = [k for k in full.measurements if k not in t.measurements]
    X, y = full.to_xy(held)
    with_priors = prediction_metrics(y, chosen.predictor.predict(X))
    without = prediction_metrics(y, fit_latency(t, "ensemble", sorted(t.measurements)).predict(X))
    # measured here: MAPE 8% against 26%, tau 0.85 against 0.64
    assert with_priors["mape"] < without["mape"], (with_priors, without)
    # one subnet of slack: on a loaded host both miss most +-10% bands and one subnet flips the share
    assert with_priors["within_10pct"] >= without["within_10pct"] - 1.0 / len(held), (with_priors, without)
    assert with_priors["kendall_tau"] >= without["kendall_tau"] - 0.05, (with_priors, without)


def test_transfer_predictor_follows_the_estimator_contract_and_serves_a_search(fleet):
    _, prior, full, transfer = fleet
    t = DeviceProfile.load(transfer)
    X, y = t.to_xy()
    priors = prior_predictors([(sha256_file(prior), DeviceProfile.load(prior))])
    predictor = LatencyPredictor(SPACE, kind="transfer", spec=t.spec, priors=priors)
    assert predictor.get_params()["priors"] is priors and not hasattr(predictor, "n_features_in_")
    with pytest.raises(Exception, match="not fitted"):
        predictor.predict(X)
    assert predictor.fit(X, y) is predictor
    Xf, _ = full.to_xy()
    mean, std = predictor.predict(Xf, return_std=True)
    assert mean.shape == std.shape == (len(Xf),) and np.all(mean > 0) and np.all(std >= 0)
    from sklearn.base import clone

    np.testing.assert_array_equal(clone(predictor).fit(X, y).predict(Xf), mean)  # the priors stay fitted
    with pytest.raises(ConfigError, match="needs the priors"):
        LatencyPredictor(SPACE, kind="transfer", spec=t.spec).fit(X, y)
    with pytest.raises(ConfigError, match="needs a transfer profile"):
        fit_and_select(DeviceProfile.load(prior), "transfer", holdout=None)
    from nestnas.search.presets import profile_latency

    objective = profile_latency(transfer, space=SPACE)  # what a search does with --profile TRANSFER.json
    assert objective.predictor.kind == "transfer"
    np.testing.assert_array_equal(objective.fn(full.configs()), fit_and_select(t, holdout=None).predictor.predict(Xf))


def test_provenance_is_recorded_and_verified(fleet, tmp_path, monkeypatch):
    _, prior, _, transfer = fleet
    data = json.loads(transfer.read_text())
    record = data["meta"]["transfer"]
    ref = record["priors"][0]
    assert len(record["priors"]) == 1 and record["pool"] >= N_TRANSFER and record["method"]
    assert ref == {"name": "dev-b8", "path": str(prior.resolve()), "sha256": sha256_file(prior),
                   "backend": "onnxruntime", "threads": 1, "batch_size": 8}
    monkeypatch.setenv("NESTNAS_HOME", str(tmp_path / "home"))
    # a prior moved elsewhere is found among the user's profiles by checksum
    (tmp_path / "home" / "profiles").mkdir(parents=True)
    moved = tmp_path / "home" / "profiles" / "renamed.json"
    shutil.copy(prior, moved)
    data["meta"]["transfer"]["priors"][0]["path"] = str(tmp_path / "gone.json")
    relocated = tmp_path / "relocated.json"
    relocated.write_text(json.dumps(data))
    assert [p.name for _, p in load_priors(DeviceProfile.load(relocated))] == ["dev-b8"]
    X, _ = DeviceProfile.load(transfer).to_xy()
    keys = sorted(DeviceProfile.load(transfer).measurements)
    np.testing.assert_array_equal(fit_latency(DeviceProfile.load(relocated), "transfer", keys).predict(X),
                                  fit_latency(DeviceProfile.load(transfer), "transfer", keys).predict(X))
    # changed, or missing everywhere: one line naming the prior
    moved.unlink()
    changed = tmp_path / "changed.json"
    text = prior.read_text()
    changed.write_text(text.replace('"dev-b8"', '"dev-b8x"'))
    data["meta"]["transfer"]["priors"][0]["path"] = str(changed)
    relocated.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=r"prior 'dev-b8' at .*changed\.json is changed") as info:
        fit_latency(DeviceProfile.load(relocated), "transfer", keys)
    assert "\n" not in str(info.value)
    data["meta"]["transfer"]["priors"][0]["path"] = str(tmp_path / "gone.json")
    relocated.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=r"prior 'dev-b8' at .*gone\.json is missing"):
        fit_and_select(DeviceProfile.load(relocated), "auto", holdout=None)
    data["meta"]["transfer"]["priors"][0]["path"] = 7  # a malformed record: one line naming the field
    relocated.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=r"meta.transfer: field priors.0.path: Input should be a valid string"):
        fit_and_select(DeviceProfile.load(relocated), "auto", holdout=None)


def test_saved_transfer_predictor_names_its_priors_and_reloads_exactly(fleet, tmp_path):
    root, prior, full, transfer = fleet
    t = DeviceProfile.load(transfer)
    chosen = fit_and_select(t, "auto", holdout=None)
    out = tmp_path / "pred.json"
    save_predictor(out, "latency", transfer, chosen.kind, 0, chosen.train)
    assert json.loads(out.read_text())["priors"] == [{"name": "dev-b8", "sha256": sha256_file(prior)}]
    loaded, record = load_predictor(out)
    X, _ = full.to_xy()
    np.testing.assert_array_equal(loaded.predict(X), chosen.predictor.predict(X))
    # a prior changed since: the predictor file is refused in one line
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(prior, copy / "prior.json")
    data = json.loads(transfer.read_text())
    data["meta"]["transfer"]["priors"][0]["path"] = str(copy / "prior.json")
    (copy / "transfer.json").write_text(json.dumps(data))
    save_predictor(copy / "pred.json", "latency", copy / "transfer.json", "transfer", 0, chosen.train)
    (copy / "prior.json").write_text((copy / "prior.json").read_text().replace('"dev-b8"', '"other"'))
    with pytest.raises(ArtifactError, match="prior 'dev-b8'") as info:
        load_predictor(copy / "pred.json")
    assert "\n" not in str(info.value)


def test_a_transfer_profile_with_its_own_blocks_uses_its_table_as_one_more_prior(fleet, tmp_path):
    _, prior, full, transfer = fleet
    out = tmp_path / "with-blocks.json"
    shutil.copy(transfer, out)  # the same few subnets; the resumed run adds this device's block table
    t = profile_device(SPACE, "onnxruntime", N_TRANSFER, seed=0, out=out, name="dev-b32", batch_size=32,
                       transfer=[prior], **{**FAST, "blocks": True})
    assert t.blocks and t.measurements.keys() == DeviceProfile.load(transfer).measurements.keys()
    chosen = fit_and_select(t, "auto", holdout=None)
    assert chosen.kind == "transfer" and chosen.predictor.block_table and "lut" in chosen.kinds
    plain = fit_and_select(DeviceProfile.load(transfer), "auto", holdout=None).predictor
    X, y = full.to_xy()
    assert not np.allclose(chosen.predictor.predict(X), plain.predict(X))  # the table is a feature
    save_predictor(tmp_path / "pred.json", "latency", out, chosen.kind, 0, chosen.train)
    loaded, _ = load_predictor(tmp_path / "pred.json")
    np.testing.assert_array_equal(loaded.predict(X), chosen.predictor.predict(X))


def test_resume_of_a_killed_transfer_run_measures_nothing_twice(fleet, tmp_path):
    _, prior, _, transfer = fleet
    out = tmp_path / "t.json"

    class Killed(Exception):
        pass

    calls = []

    def kill_after_three(text, done, total):
        calls.append(done)
        if len(calls) == 3:
            raise Killed

    with pytest.raises(Killed):
        profile_device(SPACE, "onnxruntime", N_TRANSFER, seed=0, out=out, name="dev-b32", batch_size=32,
                       transfer=[prior], progress=kill_after_three, **FAST)
    first = DeviceProfile.load(out)
    assert len(first.measurements) == 3 and not first.complete
    again = []
    resumed = profile_device(SPACE, "onnxruntime", N_TRANSFER, seed=0, out=out, name="dev-b32", batch_size=32,
                             transfer=True, progress=lambda *a: again.append(a), **FAST)  # priors from its record
    assert len(again) == N_TRANSFER - 3 and resumed.complete
    assert set(resumed.measurements) == set(DeviceProfile.load(transfer).measurements)
    for key, record in first.measurements.items():
        assert resumed.measurements[key].timestamp == record.timestamp  # kept, not measured again
    assert resumed.meta["transfer"] == first.meta["transfer"]
    sample = {SPACE.config_hash(SPACE.validate(SubnetConfig.from_dict(c))) for c in first.meta["transfer"]["sample"]}
    assert sample == set(resumed.measurements)  # the chosen sample is recorded from the start


def test_cli_profile_transfer_end_to_end_and_bad_input(tmp_path):
    home = tmp_path / "home"
    proc = run_cli("profile", "--family", "transformer", "--samples", N_TRANSFER, "--transfer", "--threads", 1,
                   "--passes", 1, "--name", "new", "--json", home=home)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    out = home / "profiles" / "new-onnxruntime-transformer.json"
    assert summary["profile"] == str(out) and summary["subnets"] == N_TRANSFER and summary["blocks"] == 0
    assert {p["name"] for p in summary["transfer"]["priors"]} >= {"xeon-2c-ort", "xeon-2c-tvm"}  # the shipped ones
    human = run_cli("profile", "--family", "transformer", "--samples", N_TRANSFER, "--transfer", "--threads", 1,
                    "--passes", 1, "--name", "new", home=home)  # resumed: nothing left to measure
    assert human.returncode == 0, human.stderr
    line = human.stdout.splitlines()[0]
    assert "(transfer profile; priors: " in line and "xeon-2c-ort" in line and "xeon-2c-tvm" in line
    fitted = run_cli("fit", "--profile", out, "--out", tmp_path / "p.json", "--json", home=home)
    assert fitted.returncode == 0, fitted.stderr
    assert json.loads(fitted.stdout)["saved_kind"] == "transfer"
    assert set(json.loads(fitted.stdout)["heldout"]) == {"ensemble", "transfer"}
    rows = json.loads(run_cli("devices", "--json", home=home).stdout)
    assert [r["transfer"] for r in rows if r["path"] == str(out)] == [True]
    # no prior of this space (a CNN space at another resolution): one line, exit 1, nothing written
    bad = tmp_path / "bad.json"
    assert_user_error(run_cli("profile", "--family", "cnn", "--resolution", "16", "--samples", 5, "--transfer",
                              "--out", bad, home=tmp_path / "empty"),
                      "--transfer: no profile of this search space (fingerprint", "shipped and user profiles",
                      "--prior FILE")
    assert_user_error(run_cli("profile", "--family", "transformer", "--samples", 5, "--transfer", "--prior",
                              home / "profiles" / "nope.json", "--out", bad, home=home),
                      "nope.json does not exist")
    assert_user_error(run_cli("profile", "--samples", 5, "--prior", out, "--out", bad, home=home),
                      "--prior applies to a transfer profile")
    assert not bad.exists()
