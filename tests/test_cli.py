import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer

from nestnas import __version__
from nestnas.cli import app
from nestnas.supernet import SearchSpace

REPO = Path(__file__).resolve().parents[1]
VAL_DIGITS = 360  # the digits validation split


def nestnas(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "nestnas", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_version_from_both_entry_points():
    assert nestnas("--version").stdout.strip() == f"nestnas {__version__}"
    script = shutil.which("nestnas")
    assert script is not None, "the console script is installed with the package"
    out = subprocess.run([script, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"nestnas {__version__}"


def test_every_command_has_help():
    for command in ("train", "eval", "quickstart", "profile", "fit", "devices", "search", "show", "export", "bench"):
        proc = nestnas(command, "--help")
        assert proc.returncode == 0 and "--json" in proc.stdout, command
        # every random job is seeded; listing and timing commands draw nothing at random
        assert ("--seed" in proc.stdout) == (command not in ("devices", "show", "bench")), command


def test_help_shows_every_bracketed_default():
    # Typer renders help as Rich markup, which silently drops an unescaped "[default: ...]".
    env = {**os.environ, "COLUMNS": "400"}
    for name, cmd in typer.main.get_command(app).commands.items():
        shown = " ".join(subprocess.run([sys.executable, "-m", "nestnas", name, "--help"], capture_output=True,
                                        text=True, env=env, check=True).stdout.split())
        for param in cmd.params:
            for tag in re.findall(r"\\?\[[^\]]*\]", getattr(param, "help", None) or ""):
                assert " ".join(tag.lstrip("\\").split()) in shown, (name, param.name, tag)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tr.ckpt"
    proc = nestnas("train", "--family", "transformer", "--epochs", "2", "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["checkpoint"] == str(out) and summary["epochs"] == 2 and out.is_file()
    for key in ("val_acc_largest", "val_acc_smallest"):  # a share of the 360 validation digits
        assert summary[key] * VAL_DIGITS == pytest.approx(round(summary[key] * VAL_DIGITS), abs=1e-6), key
    return out


def test_eval_reports_a_given_config(checkpoint, tmp_path):
    from nestnas.predictors.macs import count_module
    from nestnas.supernet.checkpoint import load_supernet

    space = SearchSpace.transformer()
    config = space.sample(4)
    net = load_supernet(checkpoint)
    macs, params = count_module(net.extract(config), torch.zeros(net.input_shape(config)))
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    for given in (path, config.to_json()):
        proc = nestnas("eval", "--checkpoint", checkpoint, "--config", given, "--json")
        assert proc.returncode == 0, proc.stderr
        row = json.loads(proc.stdout)["config"]
        assert row["hash"] == space.config_hash(config) and (row["macs"], row["params"]) == (macs, params)


def test_bad_configs_give_one_line(checkpoint, tmp_path):
    assert_user_error(nestnas("eval", "--checkpoint", checkpoint, "--config", "{oops"), "malformed config JSON")
    data = SearchSpace.transformer().largest().to_dict()
    data["embed_dim"] = 40
    assert_user_error(nestnas("eval", "--checkpoint", checkpoint, "--config", json.dumps(data)),
                      "'embed_dim'", "40", "[32, 48, 64]")
    cnn = SearchSpace.mobilenet().largest().to_json()
    assert_user_error(nestnas("eval", "--checkpoint", checkpoint, "--config", cnn), "does not belong")
    assert_user_error(nestnas("eval", "--checkpoint", checkpoint, "--config", tmp_path / "nope.json"),
                      "neither inline JSON nor an existing file")


def test_bad_checkpoints_give_one_line(checkpoint, tmp_path):
    assert_user_error(nestnas("eval", "--checkpoint", tmp_path / "missing.ckpt"), "checkpoint not found")
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(checkpoint.read_bytes()[:500])
    assert_user_error(nestnas("eval", "--checkpoint", corrupt), "corrupt")


def test_unknown_family_writes_nothing(tmp_path):
    out = tmp_path / "x.ckpt"
    assert_user_error(nestnas("train", "--family", "rnn", "--out", out), "unknown supernet family 'rnn'",
                      "['cnn', 'hf-encoder', 'transformer']")
    assert list(tmp_path.iterdir()) == []


def test_bad_option_values_give_one_line(tmp_path):
    assert_user_error(nestnas("train", "--epochs", "abc", "--out", tmp_path / "x.ckpt"), "--epochs")
    assert_user_error(nestnas("train", "--epochs", "0", "--out", tmp_path / "x.ckpt"), "--epochs")
    assert_user_error(nestnas("frobnicate"), "frobnicate")


@pytest.mark.slow  # the whole quickstart: minutes; `.ci/run` runs the slow checks
def test_quickstart_runs_every_stage(tmp_path, monkeypatch, has_tvm):
    monkeypatch.setenv("NESTNAS_HOME", str(tmp_path / "home"))  # the tuning database goes there
    proc = nestnas("quickstart", "--epochs", "1", "--profile-samples", "15", "--search-evals", "32",
                   "--tune-trials", "2", "--tune-seconds", "5", "--out", tmp_path / "qs", "--json",
                   timeout=1500)  # its stages, not its speed, are under test here (a busy host took 458 s)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert Path(summary["checkpoint"]).is_file()
    subnets = summary["subnets"]
    assert list(subnets) == ["largest", "smallest", "random 1", "random 2", "random 3"]
    assert subnets["largest"]["macs"] > subnets["smallest"]["macs"] > 0
    assert subnets["largest"]["params"] > subnets["smallest"]["params"] > 0
    for name, s in subnets.items():  # a share of the 360 validation digits
        assert s["accuracy"] * VAL_DIGITS == pytest.approx(round(s["accuracy"] * VAL_DIGITS), abs=1e-6), name
    assert subnets["largest"]["accuracy"] > 0.5  # one epoch already learns digits
    assert summary["profile_subnets"] == 15 and summary["profile_blocks"] > 100
    assert set(summary["latency_heldout"]) == {"lut", "ensemble", "hybrid"}
    from nestnas.predictors import load_predictor

    predictor, record = load_predictor(summary["predictor"])
    kind = record["kind"]
    assert kind in {"lut", "ensemble", "hybrid"} and record["heldout_metrics"] == summary["latency_heldout"][kind]
    assert summary["second_subnets"] == 20 and summary["second_kind"] == "transfer"
    from nestnas.hw_profiles import DeviceProfile

    second = DeviceProfile.load(summary["second_profile"])
    assert second.fingerprint["threads"] == 1 and not second.blocks
    assert [p["path"] for p in second.meta["transfer"]["priors"]] == [str(Path(summary["profile"]).resolve())]
    assert summary["devices"] == ["local", "local-1t"]
    assert summary["searched"] >= 32 and Path(summary["plot"]).is_file()
    assert all(summary["front_size"][d] >= 1 for d in summary["devices"])
    assert summary["second_knee"]["measured_ms"] > 0 and summary["second_knee"]["predicted_ms"] > 0
    assert (Path(summary["bundle"]) / "manifest.json").is_file()
    for backend, row in summary["bundle_measured"].items():
        assert row["max_abs_diff"] <= 1e-4 and row["median_ms"] > 0, backend
    tuning = summary["tuning"]
    if not has_tvm:  # the bundle is ONNX alone then
        assert set(summary["bundle_measured"]) == {"onnxruntime"} and tuning is None
        return
    assert set(summary["bundle_measured"]) == {"onnxruntime", "tvm"}
    assert tuning["trials_per_task"] == 2 and tuning["tuned"] >= 1
    assert tuning["tuned"] + tuning["skipped_for_time"] + tuning["reused_from_database"] == tuning["unique_tasks"]
    assert Path(tuning["database"]).is_relative_to(tmp_path / "home")


def test_ci_runs_the_readme_test_line():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    lines = [line.strip().strip("`") for line in readme.splitlines() if "pytest" in line and "pip install" in line]
    assert lines, "README has a one-line test command"
    for line in lines:
        assert line in ci


def test_public_api_names_resolve():
    import nestnas

    for name in nestnas.__all__:
        obj = getattr(nestnas, name)
        if name == "__version__":
            assert obj == __version__ and re.fullmatch(r"\d+\.\d+\.\d+", obj)
            continue
        # the object itself, not a stand-in: a class, function or the callable search package of that name
        assert callable(obj) and obj.__name__.rsplit(".", 1)[-1] == name, name
    with pytest.raises(AttributeError):
        nestnas.no_such_name  # noqa: B018


@pytest.fixture(scope="module")
def profile_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("prof") / "p.json"
    proc = nestnas("profile", "--backend", "onnxruntime", "--family", "transformer", "--samples", "21",
                   "--threads", "1", "--name", "ci", "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    from nestnas.hw_profiles import DeviceProfile

    saved = DeviceProfile.load(out)  # the summary describes the file written
    medians = sorted(m["median_ms"] for m in saved.measurements.values())
    assert summary["subnets"] == len(saved.measurements) == 21 and summary["blocks"] == len(saved.blocks) > 0
    assert (summary["min_ms"], summary["max_ms"]) == (medians[0], medians[-1]) and medians[0] > 0
    return out


def test_fit_prints_heldout_figures_and_saves_a_loadable_predictor(profile_file, tmp_path):
    out = tmp_path / "lat.json"
    proc = nestnas("fit", "--profile", profile_file, "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert set(summary["heldout"]) == {"lut", "ensemble", "hybrid"} and summary["saved_kind"] in summary["heldout"]
    from nestnas.hw_profiles import DeviceProfile
    from nestnas.predictors.fitting import fitting_hashes

    usable, _ = fitting_hashes(DeviceProfile.load(profile_file))  # the stable ones (all 21 on a quiet host)
    for m in summary["heldout"].values():
        assert m["n"] == round(len(usable) / 3) and {"rmse", "mape", "kendall_tau", "within_10pct"} <= set(m)
    from nestnas.predictors import load_predictor

    predictor, record = load_predictor(out)
    assert record["kind"] == summary["saved_kind"]
    assert record["heldout_metrics"] == summary["heldout"][summary["saved_kind"]]
    table = nestnas("fit", "--profile", profile_file, "--out", tmp_path / "b.json", "--kind", "ensemble")
    assert table.returncode == 0 and "Kendall tau" in table.stdout and "ensemble (saved)" in table.stdout


def test_devices_lists_shipped_and_user_profiles(profile_file, tmp_path):
    home = tmp_path / "home"
    (home / "profiles").mkdir(parents=True)
    (home / "profiles" / "mine.json").write_text(profile_file.read_text())
    (home / "profiles" / "broken.json").write_text("{")
    proc = subprocess.run([sys.executable, "-m", "nestnas", "devices", "--json"], capture_output=True, text=True,
                          env={**__import__("os").environ, "NESTNAS_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    shipped = [r for r in rows if r["origin"] == "shipped"]
    assert {r["backend"] for r in shipped} >= {"onnxruntime", "tvm"}
    mine = [r for r in rows if r["origin"] == "user"]
    assert any(r.get("name") == "ci" for r in mine) and any("error" in r for r in mine)


def test_profile_and_fit_bad_input(profile_file, tmp_path):
    assert_user_error(nestnas("profile", "--backend", "tensorrt", "--out", tmp_path / "x.json"),
                      "unknown backend 'tensorrt'", "onnxruntime")
    assert_user_error(nestnas("profile", "--family", "transformer", "--resolution", "64", "--out", tmp_path / "x.json"),
                      "--resolution applies to the cnn family")
    assert_user_error(nestnas("profile", "--family", "cnn", "--samples", "4", "--out", profile_file),
                      "another search space")
    assert not (tmp_path / "x.json").exists()
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(profile_file.read_text()[:100])
    assert_user_error(nestnas("fit", "--profile", corrupt, "--out", tmp_path / "p.json"), "corrupt", str(corrupt))
    assert_user_error(nestnas("fit", "--profile", profile_file, "--out", tmp_path / "p.json", "--kind", "magic"),
                      "--kind", "hybrid")
    assert_user_error(nestnas("fit", "--out", tmp_path / "p.json"), "exactly one of --profile")
    assert not (tmp_path / "p.json").exists()
    pred = tmp_path / "pred.json"
    assert nestnas("fit", "--profile", profile_file, "--out", pred).returncode == 0
    data = json.loads(pred.read_text())
    data["data"]["sha256"] = "0" * 64
    pred.write_text(json.dumps(data))
    from nestnas.errors import ArtifactError
    from nestnas.predictors import load_predictor

    with pytest.raises(ArtifactError, match="does not match"):
        load_predictor(pred)


def test_fit_accuracy_predictor_on_a_checkpoint(checkpoint, tmp_path):
    out = tmp_path / "acc.json"
    proc = nestnas("fit", "--checkpoint", checkpoint, "--samples", "15", "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)["heldout"]["accuracy"]
    assert m["n"] == 5 and m["within_10pct"] * 5 == pytest.approx(round(m["within_10pct"] * 5))  # share of 5
    table = json.loads(out.with_suffix(".accuracy.json").read_text())
    assert len(table["entries"]) == 15
    for key, e in table["entries"].items():  # a share of the 360 validation digits
        assert e["accuracy"] * VAL_DIGITS == pytest.approx(round(e["accuracy"] * VAL_DIGITS), abs=1e-6), key
    from nestnas.predictors import AccuracyPredictor, load_predictor

    predictor, record = load_predictor(out)
    assert isinstance(predictor, AccuracyPredictor) and record["target"] == "accuracy"
