"""Several devices in one search: `latency@DEVICE` objectives and budgets, per-device fronts from one
run (accuracy evaluated once per subnet), `ParetoFront.for_device`, show/plot/export per device, and
the bad inputs of a fleet as one line with exit code 1."""

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from nestnas.cli import main
from nestnas.compile.bundle import read_manifest
from nestnas.errors import ConfigError, NestnasError
from nestnas.search import Budget, Objective, ParetoFront, latency_objective, parse_budget, search
from nestnas.search.front import non_dominated, normalise
from nestnas.search.presets import objectives_from_files
from nestnas.supernet import SearchSpace
from nestnas.supernet.checkpoint import save_checkpoint
from nestnas.supernet.data import digits_loaders
from nestnas.supernet.train import train_supernet
from nestnas.supernet.transformer import ElasticTransformer

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "hw_profiles" / "data"
ORT, TVM = DATA / "xeon-2c-onnxruntime-transformer.json", DATA / "xeon-2c-tvm-transformer.json"
DEVICES = ["xeon-2c-ort", "xeon-2c-tvm"]
BATCH = {"xeon-2c-ort": 48, "xeon-2c-tvm": 24}  # the shipped transformer profiles' batch sizes
EVALS, POP = 40, 20
TVM_BUDGET = 6.0  # ms: cuts the TVM device's front, not the ONNX Runtime one's


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(code, err, *fragments):
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]


def accuracy_rows(cache: Path) -> int:
    """True accuracy evaluations stored in a fresh evaluation cache."""
    with sqlite3.connect(cache) as db:
        return db.execute("SELECT COUNT(*) FROM evals WHERE context LIKE 'accuracy|%'").fetchone()[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    net = ElasticTransformer(SearchSpace.transformer(), num_classes=10, num_tokens=8, token_dim=8)
    train_loader, _ = digits_loaders("transformer", batch_size=64, seed=0)
    few = torch.utils.data.DataLoader(torch.utils.data.Subset(train_loader.dataset, range(512)), batch_size=64,
                                      shuffle=True, generator=torch.Generator().manual_seed(0))
    train_supernet(net, few, 1, seed=0, progress=False)  # a landscape to search, in seconds
    path = tmp_path_factory.mktemp("fleet") / "tr.ckpt"
    save_checkpoint(net, path)
    return path


@pytest.fixture(scope="module")
def searched(ckpt, tmp_path_factory):
    """A per-device search of two devices and a one-device search, each with a fresh cache."""
    tmp = tmp_path_factory.mktemp("searched")
    runs = {}
    for label, extra in (("fleet", ["--profile", ORT, "--profile", TVM, "--per-device",
                                    "--budget", f"latency@xeon-2c-tvm={TVM_BUDGET}", "--plot", tmp / "fleet.png"]),
                         ("single", ["--profile", ORT])):
        out, cache = tmp / f"{label}.json", tmp / f"{label}.sqlite"
        code = main([str(a) for a in ["search", "--checkpoint", ckpt, "--out", out, "--cache", cache, "--evals", EVALS,
                                      "--pop-size", POP, "--json", *extra]])
        assert code == 0
        runs[label] = (ParetoFront.load(out), out, cache)
    return tmp, runs


def test_objective_and_budget_names_carry_a_device():
    fn = lambda cs: [0.0] * len(cs)  # noqa: E731
    assert Objective("latency@pi5", fn).name == "latency@pi5"
    assert Objective("latency@xeon-2c_ort.1", fn).name == "latency@xeon-2c_ort.1"
    for bad in ("latency@", "latency@-pi", "latency@pi 5", "Latency@pi5", "latency@pi@5"):
        with pytest.raises(ConfigError, match="objective name"):
            Objective(bad, fn)
    directions = {"accuracy": "max", "latency@pi5": "min", "latency@xeon": "min", "macs": "min"}
    assert parse_budget("latency@pi5=20", directions) == Budget("latency@pi5", "<=", 20.0)
    assert parse_budget("latency@pi5<=20", directions) == Budget("latency@pi5", "<=", 20.0)
    assert parse_budget(" latency@xeon >= 1.5 ", directions) == Budget("latency@xeon", ">=", 1.5)
    with pytest.raises(ConfigError) as info:
        parse_budget("latency@pi6=20", directions)
    assert str(info.value) == "budget 'latency@pi6=20': unknown device 'pi6'; devices: ['pi5', 'xeon']"
    with pytest.raises(ConfigError, match="unknown metric 'latency'"):
        parse_budget("latency=20", directions)
    # one device: its own name is an alias of the plain metric
    assert parse_budget("latency@pi5=3", {"latency": "min"}, {"latency@pi5": "latency"}) == Budget("latency", "<=", 3.0)

    class Fixed:
        space = SearchSpace.transformer()

        def predict(self, X):
            return np.ones(len(X))

    assert latency_objective(Fixed(), name="latency@pi5").name == "latency@pi5"
    assert latency_objective(Fixed()).name == "latency"
    with pytest.raises(ConfigError, match="per_device needs latency@DEVICE objectives"):
        search(Fixed.space, [latency_objective(Fixed()), Objective("macs", fn)], per_device=True)


def test_profiles_become_one_named_objective_per_device(ckpt):
    _, one, _ = objectives_from_files(["accuracy", "latency"], ckpt, profile=ORT)
    assert [o.name for o in one] == ["accuracy", "latency"] and one[1].predictor.device == "xeon-2c-ort"
    _, two, extra = objectives_from_files(["accuracy", "latency", "macs"], ckpt, profile=[str(ORT), f"edge={TVM}"])
    assert [o.name for o in two] == ["accuracy", "latency@xeon-2c-ort", "latency@edge", "macs"] and extra == []
    ort, tvm = two[1], two[2]
    assert (ort.batch_size, tvm.batch_size) == (48, 24)
    assert (ort.predictor.device, ort.predictor.backend, ort.predictor.threads) == ("xeon-2c-ort", "onnxruntime", 2)
    assert (tvm.predictor.device, tvm.predictor.backend) == ("edge", "tvm")
    assert ort.cache_key != tvm.cache_key
    # a device's latency asked only by a budget is evaluated alongside
    _, objs, extra = objectives_from_files(["accuracy", "macs"], ckpt, profile=[ORT, TVM],
                                           budget_metrics=["latency@xeon-2c-tvm"])
    assert [o.name for o in objs] == ["accuracy", "macs"]
    assert [o.name for o in extra] == ["latency@xeon-2c-ort", "latency@xeon-2c-tvm"]
    with pytest.raises(ConfigError, match="both name device 'xeon-2c-ort'; name one with --profile NAME=FILE"):
        objectives_from_files(["accuracy", "latency"], ckpt, profile=[ORT, ORT])
    with pytest.raises(ConfigError, match="device name 'bad name'"):
        objectives_from_files(["accuracy", "latency"], ckpt, profile=[ORT, f"bad name={TVM}"])
    with pytest.raises(NestnasError, match="another search space"):
        objectives_from_files(["accuracy", "latency"], ckpt, profile=[ORT, DATA / "xeon-2c-tvm-cnn.json"])


def test_per_device_search_shares_true_evaluations_and_gives_one_front_per_device(searched):
    _, runs = searched
    fleet, _, fleet_cache = runs["fleet"]
    single, _, single_cache = runs["single"]
    assert fleet.devices == DEVICES and fleet.per_device and fleet.meta["per_device"] is True
    assert single.devices == [] and single.device == "xeon-2c-ort" and "per_device" not in single.meta
    assert single.for_device("xeon-2c-ort") is single
    with pytest.raises(ConfigError, match=r"'pi6' matches no front; devices: \['xeon-2c-ort'\]"):
        single.for_device("pi6")
    # each subnet's accuracy evaluated once for both devices: the true evaluations of one search with the same
    # budget (both stop at the generation that reaches EVALS; a generation's count differs only by duplicates)
    assert accuracy_rows(fleet_cache) == len(fleet.evaluated) and accuracy_rows(single_cache) == len(single.evaluated)
    assert EVALS <= len(fleet.evaluated) <= EVALS + 2 and EVALS <= len(single.evaluated) <= EVALS + 2
    for device in DEVICES:
        sub = fleet.for_device(device)
        assert sub.names == ["accuracy", "latency"] and sub.meta["device"] == device == sub.device
        assert sub.info("latency").batch_size == BATCH[device] and sub.info("latency").predictor.device == device
        # the non-dominated set of the shared archive in (accuracy, that device's latency) under its budgets
        budgets = [b for b in fleet.budgets if b.metric in ("accuracy", f"latency@{device}")]
        ok = [i for i, c in enumerate(fleet.evaluated) if all(
            b.violation(np.array([c.metrics[b.metric]]))[0] <= 0 for b in budgets)]
        values = np.array([[fleet.evaluated[i].metrics["accuracy"], fleet.evaluated[i].metrics[f"latency@{device}"]]
                           for i in ok])
        u = normalise(values, sub.objectives, sub.reference)
        expected = {fleet.evaluated[ok[j]].hash for j in non_dominated(u)}
        assert {c.hash for c in sub} == expected and len(sub) >= 2
        assert np.all(non_dominated(normalise(sub.values(), sub.objectives, sub.reference)) == np.arange(len(sub)))
        # the same as an ordinary single-device front built over the same archive
        rebuilt = ParetoFront.from_archive(sub.space, sub.objectives, sub.budgets, sub.reference, sub.evaluated,
                                           sub.meta)
        assert rebuilt.front == sub.front and rebuilt.hypervolume == sub.hypervolume
        assert sub.knee().hash in expected and sub.best().hash in expected
    tvm = fleet.for_device("xeon-2c-tvm")
    assert all(c.metrics["latency"] <= TVM_BUDGET for c in tvm) and [str(b) for b in tvm.budgets] == ["latency <= 6"]
    ort = fleet.for_device("xeon-2c-ort")
    assert ort.budgets == [] and max(c.metrics["accuracy"] for c in ort) >= max(c.metrics["accuracy"] for c in tvm)
    # the ONNX Runtime device's front against a dedicated search's (same evals and seed): close
    assert ort.hypervolume >= 0.8 * single.hypervolume


def test_fleet_fronts_round_trip_show_and_plot(searched, capsys):
    tmp, runs = searched
    fleet, path, _ = runs["fleet"]
    assert (tmp / "fleet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = tmp / "again.json"
    fleet.save(again, plot=tmp / "again.png")
    loaded = ParetoFront.load(again)
    assert loaded.to_dict() == fleet.to_dict() == ParetoFront.load(path).to_dict()
    for device in DEVICES:
        assert loaded.for_device(device).to_dict() == fleet.for_device(device).to_dict()
        one = tmp / f"{device}.json"
        fleet.for_device(device).save(one)
        assert ParetoFront.load(one).to_dict() == fleet.for_device(device).to_dict()
    code, out, _ = run_cli(capsys, "show", path)
    assert code == 0 and out.count("Pareto front of device") == 2 and all(d in out for d in DEVICES)
    code, out, _ = run_cli(capsys, "show", path, "--device", "xeon-2c-tvm")
    assert code == 0 and out.count("Pareto front of device xeon-2c-tvm") == 1 and "xeon-2c-ort" not in out
    code, out, _ = run_cli(capsys, "show", path, "--json")
    shown = json.loads(out)
    assert shown["per_device"] is True and list(shown["devices"]) == DEVICES
    assert [c["hash"] for c in shown["devices"]["xeon-2c-tvm"]["candidates"]] == \
        [c.hash for c in fleet.for_device("xeon-2c-tvm")]
    one_line(*run_cli(capsys, "show", path, "--device", "pi6")[::2], "'pi6' matches no front", "xeon-2c-tvm")


def test_a_joint_fleet_search_applies_every_budget(ckpt, tmp_path, capsys):
    out = tmp_path / "joint.json"
    code, _, err = run_cli(capsys, "search", "--checkpoint", ckpt, "--profile", ORT, "--profile", TVM, "--out", out,
                           "--cache", tmp_path / "c.sqlite", "--evals", 24, "--pop-size", 12,
                           "--budget", f"latency@xeon-2c-tvm<={TVM_BUDGET}", "--json")
    assert code == 0, err
    joint = ParetoFront.load(out)
    assert joint.names == ["accuracy", "latency@xeon-2c-ort", "latency@xeon-2c-tvm"] and not joint.per_device
    assert all(c.metrics["latency@xeon-2c-tvm"] <= TVM_BUDGET for c in joint)
    seen = joint.for_device("xeon-2c-ort")  # the joint front's subnets, seen on one device
    assert [c.metrics["accuracy"] for c in seen] == sorted((c.metrics["accuracy"] for c in seen), reverse=True)
    assert {c.hash for c in seen} == {c.hash for c in joint} and seen.info("latency").batch_size == 48


def test_export_device_builds_at_its_batch_and_records_it(searched, tmp_path, capsys):
    _, runs = searched
    fleet, path, _ = runs["fleet"]
    out = tmp_path / "tvm-bundle"
    code, _, err = run_cli(capsys, "export", "--front", path, "--device", "xeon-2c-tvm", "--pick", "0",
                           "--formats", "onnx", "--out", out, "--json")
    assert code == 0, err
    manifest = read_manifest(out)
    chosen = fleet.for_device("xeon-2c-tvm")[0]
    assert manifest["hash"] == chosen.hash
    device = manifest["device"]
    assert (device["name"], device["backend"], device["threads"], device["batch"]) == ("xeon-2c-tvm", "tvm", 2, 24)
    assert device["predictor"]["device"] == "xeon-2c-tvm" and device["predictor"]["file"].endswith(TVM.name)
    assert manifest["input"]["shape"][0] == 24 and manifest["predicted_latency"]["batch"] == 24
    assert manifest["predicted_latency"]["ms"] == chosen.metrics["latency"]
    for args, fragments in (([], ("holds 2 devices", "--device", "xeon-2c-ort", "xeon-2c-tvm")),
                            (["--device", "pi6"], ("'pi6' matches no front", "xeon-2c-ort"))):
        bad = tmp_path / "bad"
        one_line(*run_cli(capsys, "export", "--front", path, *args, "--formats", "onnx", "--out", bad)[::2],
                 *fragments)
        assert not bad.exists()


def test_fleet_bad_input_is_one_line_and_writes_nothing(ckpt, tmp_path, capsys):
    out = tmp_path / "x.json"
    base = ["search", "--checkpoint", ckpt, "--out", out, "--cache", tmp_path / "c.sqlite", "--evals", 8,
            "--pop-size", 4]
    cases = [
        (["--profile", ORT, "--profile", ORT], ("both name device 'xeon-2c-ort'", "--profile NAME=FILE")),
        (["--profile", ORT, "--profile", DATA / "xeon-2c-onnxruntime-cnn.json"], ("another search space",)),
        (["--profile", ORT, "--profile", TVM, "--budget", "latency@pi6=20"],
         ("budget 'latency@pi6=20': unknown device 'pi6'; devices: ['xeon-2c-ort', 'xeon-2c-tvm']",)),
        (["--profile", ORT, "--budget", "latency@pi6=20"], ("unknown device 'pi6'", "xeon-2c-ort")),
        (["--profile", ORT, "--profile", f"pi 5={TVM}"], ("device name 'pi 5'",)),
        (["--profile", ORT, "--per-device"], ("--per-device needs two or more --profile",)),
        (["--profile", ORT, "--profile", TVM, "--budget", "latency=5"], ("unknown metric 'latency'",
                                                                          "latency@xeon-2c-tvm")),
    ]
    for extra, fragments in cases:
        one_line(*run_cli(capsys, *base, *extra)[::2], *fragments)
        assert not out.exists() and not Path(str(out) + ".state.json").exists()
