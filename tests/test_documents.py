"""Every document nestnas reads (device profiles, saved predictors, checkpoints and their training
state) is checked against its declared schema: a valid-JSON (or valid-torch) document of the wrong
shape ends in one error naming the file and the field, through the API and the CLI (exit 1, one
line); configs built in code are type-checked and normalised as they are constructed."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from nestnas.cli import main
from nestnas.errors import ArtifactError, CheckpointError, ConfigError, ProfileError
from nestnas.hw_profiles.profile import DeviceProfile
from nestnas.predictors.store import load_predictor, save_predictor
from nestnas.supernet import CNNConfig, ElasticCNN, SearchSpace, StageSpec, TransformerConfig
from nestnas.supernet.checkpoint import load_supernet, read_payload, save_checkpoint, write_payload
from nestnas.supernet.data import digits_datasets
from nestnas.supernet.train import train_supernet

DATA = Path(__file__).resolve().parents[1] / "hw_profiles" / "data"
SHIPPED = DATA / "xeon-2c-onnxruntime-transformer.json"
TINY_CNN = SearchSpace.mobilenet(stages=(StageSpec(8, 2, (1, 2)), StageSpec(16, 2, (1, 2))), kernel_choices=(3, 5),
                                 expand_choices=(2, 3), width_choices=(0.5, 1.0), resolution_choices=(8, 12),
                                 stem_channels=8, head_channels=32)


def one_line(capsys, argv, *fragments):
    """Run the CLI in process; assert exit 1 and exactly one `error: ` line holding `fragments`."""
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert str(fragment) in lines[0], lines[0]
    return lines[0]


def raises_one_line(error, call, *fragments):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message, message
    return message


# --- device profiles ------------------------------------------------------------------------

def _first(table):
    return next(iter(table))


def _set(path, value):
    """A mutation setting `path` (keys from the document's root; "*" is the table's first key)."""
    def mutate(doc):
        node = doc
        for key in path[:-1]:
            node = node[_first(node) if key == "*" else key]
        last = _first(node) if path[-1] == "*" else path[-1]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
        return doc
    return mutate


def _resolve(path, doc):
    """`path` with "*" replaced by the key it stands for."""
    out, node = [], doc
    for key in path:
        key = _first(node) if key == "*" else key
        out.append(str(key))
        node = node[key] if isinstance(node, (dict, list)) else None
    return out


# case -> (where to change, new value (KeyError: delete), how many of the path's keys the error names)
PROFILE_CASES = {
    "block median as a string": (("blocks", "*", "median_ms"), "0.5", 3),
    "measurements as a list": (("measurements",), [], 1),
    "measurement without stable": (("measurements", "*", "stable"), KeyError, 3),
    "measurement as a list": (("measurements", "*"), [1.0], 2),
    "stable as a number": (("measurements", "*", "stable"), 1, 3),
    "median zero": (("measurements", "*", "median_ms"), 0.0, 3),
    "median negative": (("blocks", "*", "median_ms"), -1.0, 3),
    "median NaN": (("measurements", "*", "median_ms"), math.nan, 3),
    "median infinite": (("blocks", "*", "median_ms"), math.inf, 3),
    "pass median a string": (("measurements", "*", "passes", 0, "median_ms"), "fast", 5),
    "repeats negative": (("measurements", "*", "repeats"), -3, 3),
    "batch_size zero": (("batch_size",), 0, 1),
    "batch_size negative": (("batch_size",), -8, 1),
    "batch_size true": (("batch_size",), True, 1),
    "batch_size a string": (("batch_size",), "48", 1),
    "spec value a string": (("spec", "num_classes"), "10", 2),
    "meta passes a string": (("meta", "passes"), "2", 2),
    "name missing": (("name",), KeyError, 1),
    "config of another shape": (("measurements", "*", "config", "num_heads"), "2", 3),
    "space field of another type": (("space", "depth_choices"), "abc", 1),
}


@pytest.fixture
def shipped_copy(tmp_path):
    path = tmp_path / "profile.json"
    shutil.copy(SHIPPED, path)
    return path


@pytest.mark.parametrize("case", PROFILE_CASES)
def test_profile_of_the_wrong_shape_is_one_line(case, shipped_copy, tmp_path, capsys):
    path, value, named = PROFILE_CASES[case]
    doc = json.loads(SHIPPED.read_text())
    where = ".".join(_resolve(path, doc)[:named])
    shipped_copy.write_text(json.dumps(_set(path, value)(doc)))  # NaN and Infinity as Python's json writes them
    before = shipped_copy.read_bytes()
    raises_one_line(ProfileError, lambda: DeviceProfile.load(shipped_copy), shipped_copy, f"field {where}")
    out = tmp_path / "predictor.json"
    one_line(capsys, ["fit", "--profile", shipped_copy, "--out", out], shipped_copy, f"field {where}")
    assert not out.exists() and shipped_copy.read_bytes() == before


@pytest.mark.parametrize("path", sorted(DATA.glob("*.json")), ids=lambda p: p.name)
def test_shipped_profiles_match_the_schema(path):
    from nestnas.hw_profiles.profile import ProfileSchema

    profile = DeviceProfile.load(path)
    ProfileSchema.model_validate(json.loads(path.read_text()))
    assert profile.batch_size >= 1 and len(profile.measurements) == 300


def test_one_bad_profile_does_not_hide_the_others(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "home" / "profiles"
    folder.mkdir(parents=True)
    shutil.copy(SHIPPED, folder / "good.json")
    (folder / "list.json").write_text(json.dumps(_set(("measurements",), [])(json.loads(SHIPPED.read_text()))))
    (folder / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    monkeypatch.setenv("NESTNAS_HOME", str(tmp_path / "home"))

    assert main(["devices", "--json"]) == 0
    rows = {Path(r["path"]).name: r for r in json.loads(capsys.readouterr().out) if r["origin"] == "user"}
    assert set(rows) == {"good.json", "list.json", "binary.json"}
    assert rows["good.json"]["subnets"] == 300 and "error" not in rows["good.json"]
    assert "field measurements" in rows["list.json"]["error"] and "\n" not in rows["list.json"]["error"]
    assert "corrupt" in rows["binary.json"]["error"]

    from nestnas import cli

    monkeypatch.setattr(cli.console, "_width", 1000)  # one table row per file
    monkeypatch.setattr(cli.console, "_height", 100)
    assert main(["devices"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    listed = [line for line in captured.out.splitlines() if "unreadable" in line]
    assert len(listed) == 2 and any("field measurements" in line for line in listed)


# --- saved predictors -----------------------------------------------------------------------

@pytest.fixture
def predictor_file(shipped_copy):
    path = shipped_copy.parent / "latency.json"
    hashes = sorted(DeviceProfile.load(shipped_copy).measurements)[:40]
    save_predictor(path, "latency", shipped_copy, "ensemble", 0, hashes)
    return path


PREDICTOR_CASES = {
    "without data": ("data", KeyError),
    "data a string": ("data", "profile.json"),
    "data without sha256": ("data.sha256", KeyError),
    "checksum a number": ("data.sha256", 123),
    "train_hashes a string": ("train_hashes", "abc"),
    "unknown kind": ("kind", "magic"),
    "unknown target": ("target", "speed"),
    "seed a string": ("seed", "0"),
}


@pytest.mark.parametrize("case", PREDICTOR_CASES)
def test_predictor_of_the_wrong_shape_is_one_line(case, predictor_file, tmp_path, capsys):
    field, value = PREDICTOR_CASES[case]
    record = json.loads(predictor_file.read_text())
    _set(tuple(field.split(".")), value)(record)
    predictor_file.write_text(json.dumps(record))
    raises_one_line(ArtifactError, lambda: load_predictor(predictor_file), predictor_file, f"field {field}")
    checkpoint = tmp_path / "tiny.ckpt"
    save_checkpoint(ElasticCNN(TINY_CNN), checkpoint)
    out = tmp_path / "front.json"
    one_line(capsys, ["search", "--checkpoint", checkpoint, "--out", out, "--predictor", predictor_file,
                      "--objectives", "macs,latency"], predictor_file, f"field {field}")
    assert not out.exists()


def test_saved_predictor_matches_its_schema_and_loads(predictor_file):
    from nestnas.predictors.store import PredictorSchema

    PredictorSchema.model_validate(json.loads(predictor_file.read_text()))
    predictor, record = load_predictor(predictor_file)
    assert record["kind"] == "ensemble" and predictor.predict(np.zeros((1, predictor.space.n_var), int)).shape == (1,)


# --- checkpoints and their training state ---------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real checkpoint with training state: one epoch on 64 digits."""
    path = tmp_path_factory.mktemp("ckpt") / "run.ckpt"
    train, _ = digits_datasets("cnn")
    loader = DataLoader(Subset(train, range(64)), batch_size=32, shuffle=True)
    torch.manual_seed(0)
    train_supernet(ElasticCNN(TINY_CNN), loader, epochs=1, seed=0, progress=False, checkpoint=path)
    return path, loader


# case -> (where to change, new value (KeyError: delete), the field the error names)
STATE_CASES = {
    "epoch a string": (("epoch",), "1", "epoch"),
    "epoch zero": (("epoch",), 0, "epoch"),
    "options without epochs": (("options", "epochs"), KeyError, "options.epochs"),
    "an unknown option": (("options", "turbo"), True, "options.turbo"),
    "lr a string": (("options", "lr"), "0.004", "options.lr"),
    "distill a number": (("options", "distill"), 1, "options.distill"),
    "epochs out of range": (("options", "epochs"), 0, "options"),
    "history a dict": (("history",), {}, "history"),
    "optimizer without param_groups": (("optimizer", "param_groups"), KeyError, "optimizer.param_groups"),
    "optimizer state of another shape": (("optimizer", "param_groups"), [{"params": "all"}], "optimizer"),
    "scheduler a list": (("scheduler",), [], "scheduler"),
}


def _mutate_checkpoint(src, dst, mutate):
    payload = read_payload(src)
    mutate(payload)
    write_payload(dst, payload)


@pytest.mark.parametrize("case", STATE_CASES)
def test_training_state_of_the_wrong_shape_is_one_line(case, trained, tmp_path):
    src, loader = trained
    path, value, where = STATE_CASES[case]
    bad = tmp_path / "bad.ckpt"

    _mutate_checkpoint(src, bad, lambda payload: _set(path, value)(payload["train"]))
    before = bad.read_bytes()
    raises_one_line(CheckpointError, lambda: train_supernet(ElasticCNN(TINY_CNN), loader, epochs=1, seed=0,
                                                            progress=False, checkpoint=bad),
                    bad, "training state", f"field {where}")
    assert bad.read_bytes() == before  # a refused resume leaves the checkpoint as it was


def test_bad_training_state_from_the_cli(trained, tmp_path, capsys):
    src, _ = trained
    bad = tmp_path / "bad.ckpt"
    _mutate_checkpoint(src, bad, lambda p: p["train"]["options"].pop("epochs"))
    before = bad.read_bytes()
    one_line(capsys, ["train", "--out", bad, "--epochs", "1"], bad, "training state", "field options.epochs")
    assert bad.read_bytes() == before


CHECKPOINT_CASES = {
    "weights a string": ("model", "weights"),
    "a weight that is not a tensor": ("model.stem_conv.weight", [1.0, 2.0]),
    "spec value a string": ("spec.num_classes", "10"),
    "space a list": ("space", []),
    "training state a string": ("train", "epoch 1"),
    "training state a list": ("train", [1, 2]),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_checkpoint_of_the_wrong_shape_is_one_line(case, trained, tmp_path, capsys):
    src, _ = trained
    field, value = CHECKPOINT_CASES[case]
    bad = tmp_path / "bad.ckpt"
    keys = field.split(".")
    keys = (keys[0], ".".join(keys[1:])) if keys[0] == "model" and len(keys) > 1 else tuple(keys)
    _mutate_checkpoint(src, bad, _set(keys, value))
    raises_one_line(CheckpointError, lambda: load_supernet(bad), bad, f"field {field}")
    one_line(capsys, ["eval", "--checkpoint", bad], bad, f"field {field}")
    out = tmp_path / "accuracy.json"
    one_line(capsys, ["fit", "--checkpoint", bad, "--out", out], bad, f"field {field}")
    assert not out.exists()


def test_a_good_checkpoint_matches_its_schemas_and_resumes(trained, tmp_path):
    from nestnas.supernet.checkpoint import CheckpointSchema
    from nestnas.supernet.train import TrainStateSchema

    src, loader = trained
    payload = read_payload(src)
    CheckpointSchema.model_validate(payload)
    TrainStateSchema.model_validate(payload["train"])
    copy = tmp_path / "copy.ckpt"
    shutil.copy(src, copy)
    result = train_supernet(ElasticCNN(TINY_CNN), loader, epochs=1, seed=0, progress=False, checkpoint=copy)
    assert result.resumed_from_epoch == 1 and len(result.history) == 1


# --- configs built in code, and --config ----------------------------------------------------

def test_numpy_integers_are_normalised_to_equal_configs():
    space = SearchSpace.mobilenet()
    ref = space.smallest()
    built = CNNConfig(np.int64(ref.resolution), np.float32(ref.width_mult), np.array(ref.depths),
                      [list(k) for k in ref.kernel_sizes], np.array(ref.expand_ratios, dtype=np.int32))
    assert built == ref and hash(built) == hash(ref)
    assert space.config_hash(built) == space.config_hash(ref)
    assert type(built.resolution) is int and type(built.depths) is tuple and type(built.kernel_sizes[0]) is tuple
    assert type(built.depths[0]) is int and type(built.width_mult) is float
    assert CNNConfig.from_json(built.to_json()) == built and built.to_json() == ref.to_json()
    for depth in (np.int64(3), 3):
        cfg = CNNConfig(ref.resolution, ref.width_mult, (1, 1, depth, 1), ref.kernel_sizes, ref.expand_ratios)
        assert space.config_hash(cfg) == space.config_hash(
            CNNConfig(ref.resolution, ref.width_mult, (1, 1, 3, 1), ref.kernel_sizes, ref.expand_ratios))

    tspace = SearchSpace.transformer()
    t = tspace.smallest()
    tb = TransformerConfig(np.int64(t.depth), np.int16(t.embed_dim), list(np.array(t.num_heads)),
                           tuple(int(r) for r in t.mlp_ratios))  # MLP ratio 2 is 2.0
    assert tb == t and tspace.config_hash(tb) == tspace.config_hash(t) and tb.to_json() == t.to_json()


@pytest.mark.parametrize("field, value, allowed", [
    ("resolution", True, "an integer"),
    ("resolution", None, "an integer"),
    ("resolution", "16", "an integer"),
    ("resolution", 16.0, "an integer"),
    ("resolution", np.bool_(True), "an integer"),
    ("width_mult", True, "a finite number"),
    ("width_mult", None, "a finite number"),
    ("width_mult", math.nan, "a finite number"),
    ("depths", None, "a list"),
    ("depths", "1111", "a list"),
    ("depths", (1, True, 1, 1), "an integer"),
    ("kernel_sizes", (3, 3, 3, 3), "a list"),
])
def test_bad_types_in_a_cnn_config_are_refused(field, value, allowed):
    ref = SearchSpace.mobilenet().smallest()
    kwargs = {"resolution": ref.resolution, "width_mult": ref.width_mult, "depths": ref.depths,
              "kernel_sizes": ref.kernel_sizes, "expand_ratios": ref.expand_ratios, field: value}
    name = f"{field}[1]" if field == "depths" and isinstance(value, tuple) else field
    name = f"{field}[0]" if field == "kernel_sizes" else name
    got = {"depths": "True", "kernel_sizes": "3"}.get(field) if isinstance(value, tuple) else repr(value)
    raises_one_line(ConfigError, lambda: CNNConfig(**kwargs), f"config field '{name}'", f"expected {allowed}",
                    f"got {got}")


@pytest.mark.parametrize("field, value", [("depth", True), ("embed_dim", None), ("num_heads", (2, 2.5, 2, 2)),
                                          ("mlp_ratios", ("2", 2.0, 2.0, 2.0))])
def test_bad_types_in_a_transformer_config_are_refused(field, value):
    ref = SearchSpace.transformer().smallest()
    kwargs = {**{k: getattr(ref, k) for k in ("depth", "embed_dim", "num_heads", "mlp_ratios")}, field: value}
    raises_one_line(ConfigError, lambda: TransformerConfig(**kwargs), f"config field '{field}")


def test_config_family_of_another_type_is_refused():
    raises_one_line(ConfigError, lambda: CNNConfig.from_json('{"family": ["cnn"]}'), "'family'")


def test_bad_config_given_to_eval_is_one_line(trained, tmp_path, capsys):
    src, _ = trained
    one_line(capsys, ["eval", "--checkpoint", src, "--config", '{"family": ["cnn"]}'], "--config", "'family'")
    binary = tmp_path / "config.json"
    binary.write_bytes(b"\xff\xfe{}")
    one_line(capsys, ["eval", "--checkpoint", src, "--config", binary], f"--config {binary}", "JSON text")
    smallest = TINY_CNN.smallest().to_dict()
    outside = {**smallest, "resolution": 20}
    one_line(capsys, ["eval", "--checkpoint", src, "--config", json.dumps(outside)], "--config: ", "'resolution'",
             "[8, 12]")
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({**smallest, "kernel_sizes": [3, 3]}))
    one_line(capsys, ["eval", "--checkpoint", src, "--config", nested], f"--config {nested}", "'kernel_sizes[0]'")
