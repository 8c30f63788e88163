"""The user's own data (`nestnas.data`): every spec kind trained for an epoch and searched on a
tiny space, the checkpoint's record of the data reused by later stages, and every bad input
refused with one line naming the spec, through the API and the CLI, with nothing written."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from nestnas.cli import main
from nestnas.data import Data, load_data, parse_spec
from nestnas.errors import CheckpointError, DataError
from nestnas.search import accuracy_objective, macs_objective, search
from nestnas.search.presets import objectives_from_files
from nestnas.supernet import SearchSpace, StageSpec, build_supernet
from nestnas.supernet.checkpoint import checkpoint_data, load_supernet, save_checkpoint
from nestnas.supernet.data import digits_datasets
from nestnas.supernet.train import train_supernet

TINY = SearchSpace.mobilenet(stages=(StageSpec(8, 2, (1, 2)),), kernel_choices=(3, 5), expand_choices=(2, 3),
                             width_choices=(0.5, 1.0), resolution_choices=(8,), stem_channels=8, head_channels=16)
N = 150  # digits used by the file-based kinds (15 per class)


def digits_subset(n=N):
    from sklearn.datasets import load_digits

    d = load_digits()
    picks = np.stack([np.flatnonzero(d.target == k)[: n // 10] for k in range(10)]).T.ravel()
    return d.images[picks], d.target[picks]  # (n, 8, 8) in 0..16, labels 0..9 in turn


def scaled(images):
    return ((images.astype(np.float32) / 16.0 - 0.5) / 0.5)[:, None]


def write_folder(root, images, labels, mode="L"):
    for i, (img, k) in enumerate(zip(images, labels)):
        (root / f"class{k}").mkdir(parents=True, exist_ok=True)
        pixels = np.clip(img * 16, 0, 255).astype(np.uint8)
        picture = Image.fromarray(pixels, "L")
        (picture.convert(mode) if mode != "L" else picture).save(root / f"class{k}" / f"{i:04d}.png")
    return root


def write_csv(path, images, labels, label="target"):
    flat = scaled(images).reshape(len(images), -1)
    lines = [",".join([*(f"p{i}" for i in range(flat.shape[1])), label])]
    lines += [",".join([*(f"{v:.6g}" for v in row), str(int(k))]) for row, k in zip(flat, labels)]
    path.write_text("\n".join(lines) + "\n")
    return path


def train_and_search(data: Data, tmp_path):
    """One epoch on TINY, a checkpoint with the data's record, then a 2-generation search whose
    accuracy comes from the checkpoint's data (no data given)."""
    net = build_supernet(TINY, **data.spec_for(TINY))
    train_loader, _ = data.loaders(batch_size=32)
    ckpt = tmp_path / "net.ckpt"
    train_supernet(net, train_loader, 1, sandwich=0, seed=0, progress=False, checkpoint=ckpt, data=data)
    record = checkpoint_data(ckpt)
    assert record["spec"] == data.spec and record["fingerprint"] == data.fingerprint
    assert tuple(record["sample_shape"]) == data.sample_shape and record["num_classes"] == data.num_classes
    net, objectives, _ = objectives_from_files(["accuracy", "macs"], ckpt)
    front = search(net.space, objectives, evals=16, pop_size=8, seed=0)
    n_val = len(data.val)
    for c in front.evaluated:  # a share of this data's validation split, not of digits' 360
        assert c.metrics["accuracy"] * n_val == pytest.approx(round(c.metrics["accuracy"] * n_val), abs=1e-6)
    return front


def test_digits_spec_is_the_embedded_split_bit_for_bit():
    data = load_data("digits", TINY, seed=0)
    train, val = digits_datasets("cnn", seed=0)
    for ours, theirs in zip((data.train, data.val), (train, val)):
        assert all(torch.equal(a, b) for a, b in zip(ours.tensors, theirs.tensors))
    assert data.sample_shape == (1, 8, 8) and data.num_classes == 10 and data.spec == "digits"
    loader, val_loader = data.loaders()
    assert loader.batch_size == 64 and loader.drop_last and val_loader.batch_size == 256
    assert load_data("digits", seed=1).fingerprint != data.fingerprint  # the split is part of the data


def test_image_folder_trains_and_searches(tmp_path):
    images, labels = digits_subset()
    root = write_folder(tmp_path / "imgs", images, labels)
    data = load_data(root, TINY, seed=0)
    assert data.sample_shape == (1, 8, 8) and data.num_classes == 10
    assert data.classes == tuple(f"class{k}" for k in range(10))
    assert float(data.train.tensors[0].min()) >= -1 and float(data.train.tensors[0].max()) <= 1
    train_and_search(data, tmp_path)


def test_image_folder_is_resized_and_colour_detected(tmp_path):
    images, labels = digits_subset(100)
    grey = write_folder(tmp_path / "grey", images, labels)
    assert load_data(grey, dataclasses.replace(TINY, resolution_choices=(6, 12))).sample_shape == (1, 12, 12)
    assert load_data(write_folder(tmp_path / "rgb", images, labels, mode="RGB"), TINY).sample_shape == (3, 8, 8)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(grey / "class0" / "red.png")  # one colour image among grey ones
    colour = load_data(grey, TINY)
    assert colour.sample_shape == (3, 8, 8) and colour.fingerprint != load_data(tmp_path / "rgb", TINY).fingerprint


def test_npz_trains_and_searches(tmp_path):
    images, labels = digits_subset()
    x = scaled(images)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x[:113], y_train=labels[:113], x_val=x[113:], y_val=labels[113:])
    data = load_data(path)
    assert len(data.val) == 37 and data.sample_shape == (1, 8, 8)
    train_and_search(data, tmp_path)
    np.savez(tmp_path / "xy.npz", x=x, y=labels)  # one set, split stratified
    split = load_data(str(tmp_path / "xy.npz") + ":val=0.4")
    assert len(split.val) == 60 and np.bincount(split.val.tensors[1].numpy()).tolist() == [6] * 10


def test_csv_trains_and_searches(tmp_path):
    images, labels = digits_subset()
    path = write_csv(tmp_path / "table.csv", images, labels)
    data = load_data(f"{path}:label=target,shape=1x8x8")
    assert data.sample_shape == (1, 8, 8) and data.num_classes == 10 and len(data.val) == 30
    assert load_data(f"{path}:label=target").sample_shape == (64,)  # a table, as it is
    train_and_search(data, tmp_path)


def test_entry_point_trains_and_searches(tmp_path, monkeypatch):
    images, labels = digits_subset()
    np.save(tmp_path / "x.npy", scaled(images))
    np.save(tmp_path / "y.npy", labels)
    (tmp_path / "my_digits_data.py").write_text(
        "import numpy as np, torch\nfrom pathlib import Path\nfrom torch.utils.data import TensorDataset\n"
        "HERE = Path(__file__).parent\n"
        "def load():\n"
        "    x = torch.from_numpy(np.load(HERE / 'x.npy')); y = torch.from_numpy(np.load(HERE / 'y.npy'))\n"
        "    return TensorDataset(x[:75], y[:75]), TensorDataset(x[75:], y[75:])\n"
        "def one():\n"
        "    return load()[0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = load_data("my_digits_data:load")
    assert data.spec == "my_digits_data:load" and len(data.train) == N // 2
    train_and_search(data, tmp_path)


def test_python_datasets_and_loaders_are_taken_as_they_are():
    images, labels = digits_subset(100)
    x, y = torch.from_numpy(scaled(images)), torch.from_numpy(labels)
    train, val = TensorDataset(x[:50], y[:50]), TensorDataset(x[50:], y[50:])
    pair = load_data((train, val))
    assert pair.spec is None and pair.sample_shape == (1, 8, 8) and pair.num_classes == 10
    loaders = (DataLoader(train, batch_size=16), DataLoader(val, batch_size=16))
    assert load_data(loaders).loaders() == loaders
    one = load_data(TensorDataset(x, y), seed=0)  # one dataset: split stratified
    assert len(one.val) == 20 and torch.bincount(one.val.tensors[1]).tolist() == [2] * 10
    net = build_supernet(TINY, **pair.spec_for(TINY))
    train_loader, val_loader = pair.loaders()
    objective = accuracy_objective(net, val_loader, train_loader, seed=0)
    front = search(TINY, [objective, macs_objective(TINY, **net.spec())], evals=16, pop_size=8, seed=0)
    assert len(front.evaluated) >= 16
    for c in front.evaluated:  # shares of the 50 validation samples given
        assert c.metrics["accuracy"] * 50 == pytest.approx(round(c.metrics["accuracy"] * 50), abs=1e-6)


def test_checkpoint_without_a_data_record_still_loads_and_uses_digits(tmp_path):
    net = build_supernet(TINY, **load_data("digits").spec_for(TINY))
    ckpt = tmp_path / "old.ckpt"
    save_checkpoint(net, ckpt)  # as written before data records
    assert checkpoint_data(ckpt) is None and load_supernet(ckpt).spec() == net.spec()
    from nestnas.data import data_for_checkpoint

    assert data_for_checkpoint(load_supernet(ckpt), ckpt).spec == "digits"


# --- bad input ------------------------------------------------------------------------------------

@pytest.fixture
def bad_specs(tmp_path):
    """(spec, fragment the one line must hold) for every kind of bad data."""
    images, labels = digits_subset(100)
    x = scaled(images)
    (tmp_path / "empty").mkdir()
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    broken = write_folder(tmp_path / "broken", images, labels)
    (broken / "class3" / "zz.png").write_bytes(b"not a png at all")
    np.savez(tmp_path / "half.npz", x_train=x, y_train=labels)
    np.savez(tmp_path / "shifted.npz", x=x, y=labels + 1)
    np.savez(tmp_path / "floaty.npz", x=x, y=labels.astype(np.float32))
    np.savez(tmp_path / "one_class.npz", x=x, y=np.zeros_like(labels))  # e.g. a file sorted by label, cut short
    write_csv(tmp_path / "t.csv", images, labels, label="target")
    (tmp_path / "wrong_data_mod.py").write_text("from torch.utils.data import TensorDataset\nimport torch\n"
                                                "def one():\n    return TensorDataset(torch.zeros(4, 2))\n")
    return [
        ("no/such/place", "not a known kind of data"),
        (str(tmp_path / "empty"), "one sub-folder per class"),
        (str(tmp_path / "flat"), "one sub-folder per class"),
        (str(broken), "class3/zz.png is not a readable image"),
        (str(tmp_path / "half.npz"), "expected arrays x_train, y_train, x_val, y_val (or x, y)"),
        (str(tmp_path / "shifted.npz"), "labels must be the integers 0..K-1"),
        (str(tmp_path / "floaty.npz"), "labels must be integers 0..K-1"),
        (str(tmp_path / "one_class.npz"), "every training sample has label [0]: a classifier needs at least two"),
        (str(tmp_path / "t.csv"), "no label column 'label'"),
        (f"{tmp_path / 't.csv'}:label=nope", "no label column 'nope'"),
        (f"{tmp_path / 't.csv'}:label=target,shape=3x3", "shape=3x3 holds 9 values"),
        ("no_such_module_xyz:load", "cannot import no_such_module_xyz"),
        ("wrong_data_mod:one", "must return (train_dataset, val_dataset)"),
        ("wrong_data_mod:missing", "has no function missing"),
        ("digits:val=2", "val='2'"),
        ("digits:colour=1", "unknown option 'colour'"),
    ]


def test_bad_data_is_one_line_naming_the_spec(bad_specs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the entry-point module is found beside the user's files
    for spec, fragment in bad_specs:
        with pytest.raises(DataError) as info:
            load_data(spec, TINY)
        message = str(info.value)
        assert "\n" not in message and fragment in message and spec.split(":")[0] in message, (spec, message)


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bad_data_from_the_cli_writes_nothing(bad_specs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # importing the user's module writes no cache here
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for spec, fragment in bad_specs:
        code, out, err = run_cli(capsys, "train", "--data", spec, "--out", tmp_path / "out.ckpt", "--epochs", "1")
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], (spec, err)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no checkpoint, nothing else


def test_data_that_does_not_fit_the_checkpoint_is_refused(tmp_path, capsys):
    net = build_supernet(TINY, **load_data("digits").spec_for(TINY))
    ckpt = tmp_path / "net.ckpt"
    save_checkpoint(net, ckpt, data=load_data("digits"))
    images, labels = digits_subset(60)
    x = scaled(images)
    np.savez(tmp_path / "rgb.npz", x=np.repeat(x, 3, axis=1), y=labels)  # 3 channels
    keep = labels < 5
    np.savez(tmp_path / "five.npz", x=x[keep], y=labels[keep])  # 5 classes
    np.savez(tmp_path / "flat.npz", x=x.reshape(len(x), -1), y=labels)  # a table
    for name, fragment in (("rgb", "shape (3, 8, 8)"), ("five", "and 5 classes"), ("flat", "shape (64,)")):
        spec = str(tmp_path / f"{name}.npz")
        with pytest.raises(DataError, match=r"takes samples of shape \(1, 8, 8\) and 10 classes"):
            load_data_for(net, ckpt, spec)
        for command in (["eval", "--checkpoint", ckpt], ["search", "--checkpoint", ckpt, "--out", tmp_path / "f.json",
                                                          "--objectives", "accuracy,macs", "--cache",
                                                          tmp_path / "c.sqlite"],
                        ["fit", "--checkpoint", ckpt, "--out", tmp_path / "p.json"]):
            code, out, err = run_cli(capsys, *command, "--data", spec)
            lines = err.strip().splitlines()
            assert code == 1 and len(lines) == 1 and fragment in lines[0] and spec in lines[0], (command, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["five.npz", "flat.npz", "net.ckpt", "rgb.npz"]


@pytest.mark.parametrize("key, value", [("fingerprint", "abc"), ("sample_shape", [0, 8, 8]), ("num_classes", 1),
                                        ("spec", 3), ("seed", -1), ("colour", True)])
def test_a_data_record_of_the_wrong_shape_is_one_line(key, value, tmp_path, capsys):
    net = build_supernet(TINY, **load_data("digits").spec_for(TINY))
    ckpt = tmp_path / "net.ckpt"
    save_checkpoint(net, ckpt, data={**load_data("digits").record(), key: value})
    code, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and f"field data.{key}" in lines[0] and str(ckpt) in lines[0], err


def load_data_for(net, ckpt, spec):
    from nestnas.data import data_for_checkpoint

    return data_for_checkpoint(net, ckpt, spec)


def test_changed_data_and_resumes_on_other_data_are_refused(tmp_path):
    images, labels = digits_subset(100)
    path = tmp_path / "d.npz"
    np.savez(path, x=scaled(images), y=labels)
    data = load_data(path)
    net = build_supernet(TINY, **data.spec_for(TINY))
    ckpt = tmp_path / "net.ckpt"
    loader, _ = data.loaders(32)
    train_supernet(net, loader, 1, sandwich=0, seed=0, progress=False, checkpoint=ckpt, data=data)
    np.savez(path, x=scaled(images)[::-1].copy(), y=labels[::-1].copy())  # same shape, other data
    with pytest.raises(DataError, match="has changed since checkpoint"):
        load_data_for(load_supernet(ckpt), ckpt, None)
    other = load_data(path)
    with pytest.raises(CheckpointError, match="was trained on other data"):
        train_supernet(net, other.loaders(32)[0], 2, sandwich=0, seed=0, progress=False, checkpoint=ckpt, data=other)


def test_spec_grammar():
    assert parse_spec("digits").kind == "digits"
    spec = parse_spec("a/table.csv:label=target,shape=1x8x8")
    assert (spec.kind, spec.options) == ("csv", {"label": "target", "shape": "1x8x8"})
    assert parse_spec("pkg.mod:fn").kind == "entry" and parse_spec("x.NPZ").kind == "npz"
    assert str(parse_spec("t.csv:label=y")).endswith("/t.csv:label=y")  # paths recorded absolute


# --- the command line, end to end (one kind) -----------------------------------------------------------

def nestnas(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nestnas", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_cli_trains_on_npz_and_later_stages_reuse_the_checkpoints_data(tmp_path, capsys):
    images, labels = digits_subset()
    x = scaled(images)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x[:113], y_train=labels[:113], x_val=x[113:], y_val=labels[113:])
    ckpt = tmp_path / "tr.ckpt"
    proc = nestnas("train", "--family", "transformer", "--epochs", "1", "--data", path, "--out", ckpt, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["data"] == str(path) and summary["sample_shape"] == [1, 8, 8] and summary["num_classes"] == 10
    record = checkpoint_data(ckpt)
    assert record["spec"] == str(path) and record["fingerprint"] == load_data(path).fingerprint
    front = tmp_path / "front.json"
    code, out, err = run_cli(capsys, "search", "--checkpoint", ckpt, "--objectives", "accuracy,macs", "--evals", "8",
                             "--pop-size", "4", "--out", front, "--cache", tmp_path / "c.sqlite", "--json")
    assert code == 0, err  # no --data: the checkpoint's
    for c in json.loads(front.read_text())["evaluated"]:  # shares of the 37 validation samples
        acc = c["metrics"]["accuracy"]
        assert acc * 37 == pytest.approx(round(acc * 37), abs=1e-6), acc
    code, out, err = run_cli(capsys, "eval", "--checkpoint", ckpt, "--json")
    assert code == 0, err
    for r in json.loads(out).values():
        assert r["accuracy"] * 37 == pytest.approx(round(r["accuracy"] * 37), abs=1e-6), r

    bundle = tmp_path / "bundle"
    keep = labels < 5
    np.savez(tmp_path / "five.npz", x=x[keep], y=labels[keep])
    code, out, err = run_cli(capsys, "export", "--front", front, "--data", tmp_path / "five.npz", "--formats", "onnx",
                             "--out", bundle)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "and 5 classes" in lines[0] and not bundle.exists(), err
    other = tmp_path / "other.npz"  # the same shape and classes, 41 other validation samples
    np.savez(other, x_train=x[:109], y_train=labels[:109], x_val=x[109:], y_val=labels[109:])
    code, out, err = run_cli(capsys, "export", "--front", front, "--data", other, "--formats", "onnx", "--batch-size",
                             "1", "--threads", "1", "--out", bundle, "--json")
    assert code == 0, err
    acc = json.loads(out)["manifests"][0]["accuracy"]["value"]
    assert acc * 41 == pytest.approx(round(acc * 41), abs=1e-6), acc
