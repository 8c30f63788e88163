"""A supernet family is a plugin: a third family defined only here (an elastic MLP over the wine
table, samples shaped (F,)) goes through train, profile, fit, search and export with no change
to any other file, reached by generic code through the registry alone."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_wine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import nestnas
from nestnas.compile.bundle import read_manifest, tolerance
from nestnas.errors import ConfigError, DataError
from nestnas.hw_profiles import block_table, profile_device
from nestnas.hw_profiles.blocks import all_parts, build_part, config_part_keys, parts
from nestnas.predictors import AccuracyPredictor, LatencyPredictor
from nestnas.predictors.features import config_features
from nestnas.predictors.macs import count_macs, count_macs_encoded, count_module, onnx_macs
from nestnas.search import latency_objective, macs_objective, predicted_accuracy_objective
from nestnas.supernet import SearchSpace, SubnetConfig, Supernet, Variable, build_supernet, part_key
from nestnas.supernet.config import as_int, ints
from nestnas.supernet.elastic import ElasticLinear
from nestnas.supernet.evaluate import subnet_accuracy
from nestnas.supernet.families import family_names, register_supernet, unregister_supernet
from nestnas.supernet.train import DEFAULT_EPOCHS, train_supernet

FAMILY = "test-mlp"
REPO = Path(__file__).resolve().parents[1]
GENERIC = ("hw_profiles", "predictors", "search", "compile", "exporting.py", "cli.py", "quickstart.py")


@dataclass(frozen=True)
class MLPConfig(SubnetConfig):
    family: ClassVar[str] = FAMILY
    depth: int
    widths: tuple[int, ...]

    _types: ClassVar[dict[str, Callable[..., Any]]] = {"depth": as_int, "widths": ints}


@dataclass(frozen=True)
class MLPSpace(SearchSpace):
    """Elastic depth, and a hidden width per layer slot."""

    family: ClassVar[str] = FAMILY
    config_type: ClassVar[type[SubnetConfig]] = MLPConfig
    depth_choices: tuple[int, ...] = (1, 2, 3)
    width_choices: tuple[int, ...] = (8, 16, 32)

    @property
    def max_depth(self) -> int:
        return self.depth_choices[-1]

    def variables(self):
        return (Variable("depth", self.depth_choices, stage=0, depth=True),
                *(Variable(f"widths[{i}]", self.width_choices, stage=0, slot=i) for i in range(self.max_depth)))

    def _check_shape(self, config):
        if len(config.widths) != self.max_depth:
            raise ConfigError(f"config field 'widths': expected {self.max_depth} layer slots, got {len(config.widths)}")

    def _flatten(self, config):
        return [config.depth, *config.widths]

    def _build(self, values):
        return MLPConfig(values[0], tuple(values[1:]))

    def canonical(self, config):
        self.validate(config)
        return dataclasses.replace(config, widths=tuple(w if i < config.depth else self.width_choices[0]
                                                        for i, w in enumerate(config.widths)))

    def size(self):
        return sum(len(self.width_choices) ** d for d in self.depth_choices)


class ElasticMLP(Supernet):
    space_type = MLPSpace
    default_epochs = 2

    def __init__(self, space: MLPSpace | None = None, num_classes: int = 3, num_features: int = 13):
        super().__init__()
        self.space = space if space is not None else MLPSpace()
        self.num_classes, self.num_features = num_classes, num_features
        w = self.space.width_choices[-1]
        depth = self.space.max_depth
        self.layers = nn.ModuleList(ElasticLinear(num_features if i == 0 else w, w) for i in range(depth))
        self.head = ElasticLinear(w, num_classes)

    def spec(self):
        return {"num_classes": self.num_classes, "num_features": self.num_features}

    @classmethod
    def spec_for_data(cls, space, sample_shape, num_classes):
        if len(sample_shape) != 1:
            raise DataError(f"the {FAMILY} family takes table rows shaped (features,), got {tuple(sample_shape)}")
        return {"num_classes": num_classes, "num_features": sample_shape[0]}

    def sample_shape(self):
        return (self.num_features,)

    def input_shape(self, config=None, batch=1):
        return (batch, self.num_features)

    def forward(self, x, config=None):
        config = self.resolve(config)
        self._check_input(x, config)
        for i in range(config.depth):
            x = F.relu(self.layers[i](x, config.widths[i]))
        return self.head(x, self.num_classes)

    def _widths(self, config):
        return [self.num_features, *config.widths[: config.depth]]

    def extract(self, config=None):
        config = self.space.canonical(self.resolve(config))
        w = self._widths(config)
        layers = [m for i in range(config.depth) for m in (self.layers[i].to_static(w[i], w[i + 1]), nn.ReLU())]
        return nn.Sequential(*layers, self.head.to_static(w[-1], self.num_classes)).eval()

    def sort_channels(self):
        return self

    @classmethod
    def count_macs(cls, space, config, spec):
        w = [spec["num_features"], *config.widths[: config.depth], spec["num_classes"]]
        return sum(a * b for a, b in zip(w, w[1:])), sum(a * b + b for a, b in zip(w, w[1:]))

    @classmethod
    def parts(cls, space, config, spec):
        config = space.canonical(config)
        w = [spec["num_features"], *config.widths[: config.depth]]
        out = [(part_key("dense", w[i], w[i + 1]), ("dense", i, w[i], w[i + 1])) for i in range(config.depth)]
        return out + [(part_key("head", w[-1], spec["num_classes"]), ("head", w[-1]))]

    def all_parts(self):
        found, widths = {}, self.space.width_choices
        for i in range(self.space.max_depth):
            for a in [self.num_features] if i == 0 else widths:
                for b in widths:
                    found.setdefault(part_key("dense", a, b), ("dense", i, a, b))
        for a in widths:
            found[part_key("head", a, self.num_classes)] = ("head", a)
        return found

    def build_part(self, recipe, batch):
        if recipe[0] == "dense":
            _, i, a, b = recipe
            return nn.Sequential(self.layers[i].to_static(a, b), nn.ReLU()).eval(), (batch, a)
        a = recipe[1]
        return self.head.to_static(a, self.num_classes).eval(), (batch, a)


@pytest.fixture(scope="module", autouse=True)
def family():
    register_supernet(FAMILY)(ElasticMLP)
    yield
    unregister_supernet(FAMILY)  # other tests see the built-in families only


@pytest.fixture(scope="module")
def wine():
    x, y = load_wine(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = torch.tensor(x[order], dtype=torch.float32), torch.tensor(y[order])
    train, val = TensorDataset(x[:130], y[:130]), TensorDataset(x[130:], y[130:])
    return (DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)),
            DataLoader(val, batch_size=64))


@pytest.fixture(scope="module")
def trained(wine):
    train_loader, _ = wine
    space = SearchSpace.for_family(FAMILY)
    net = build_supernet(space, **ElasticMLP.spec_for_data(space, (13,), 3))
    result = train_supernet(net, train_loader, DEFAULT_EPOCHS[FAMILY], seed=0, progress=False)
    assert len(result.history) == 2
    return net.eval()


def test_the_family_is_reached_through_the_registry(trained):
    assert FAMILY in family_names() and isinstance(trained, ElasticMLP)
    space = trained.space
    assert SearchSpace.from_dict(space.to_dict()) == space
    config = space.sample(3)
    assert SubnetConfig.from_json(config.to_json()) == config
    with pytest.raises(DataError, match=r"shaped \(features,\)"):
        ElasticMLP.spec_for_data(space, (1, 8, 8), 10)


def test_extracted_subnets_match_the_supernet_and_the_analytic_count(trained):
    space, spec = trained.space, trained.spec()
    x = torch.randn(5, 13, generator=torch.Generator().manual_seed(0))
    X = np.stack([space.encode(space.sample(s)) for s in range(12)])
    macs, params = count_macs_encoded(space, X, **spec)  # the family's default row-by-row counter
    for row, m, p in zip(X, macs, params):
        config = space.decode(row)
        sub = trained.extract(config)
        with torch.no_grad():
            torch.testing.assert_close(sub(x), trained(x, config), rtol=0, atol=1e-6)
        assert count_module(sub, x) == count_macs(space, config, **spec) == (m, p)
        y = x
        for key, recipe in parts(trained, config):  # the parts compose to the subnet
            module, shape = build_part(trained, recipe, 5)
            assert key in all_parts(trained) and tuple(y.shape) == shape
            y = module(y)
        torch.testing.assert_close(y, sub(x), rtol=0, atol=1e-6)
    # features come from the variables' structure: removed slots are zero, blocks are counted
    feats = config_features(space, space.encode(MLPConfig(1, (32, 16, 8)))[None], spec)[0]
    np.testing.assert_array_equal(feats[:4], [1, 32, 0, 0])
    assert feats[-1] == 1


def test_train_profile_fit_search_export(trained, wine, tmp_path):
    space, spec = trained.space, trained.spec()
    train_loader, val_loader = wine
    profile = profile_device(space, "onnxruntime", 10, seed=0, out=tmp_path / "p.json", spec=spec, batch_size=8,
                             threads=1, passes=1)
    assert len(profile.measurements) == 10 and set(profile.blocks) == set(all_parts(trained))
    X, y = profile.to_xy()
    table = block_table(profile)
    keys = config_part_keys(space, X, spec)
    lut = LatencyPredictor(space, kind="lut", spec=spec, block_table=table).fit(X, y)
    # the table's terms are the measured parts of each subnet, summed per kind of part
    np.testing.assert_allclose(lut.lut_terms(X)[:, :2].sum(1), [sum(table[k] for k in row) for row in keys])
    hybrid = LatencyPredictor(space, kind="hybrid", spec=spec, block_table=table).fit(X, y)
    for predictor in (lut, hybrid):
        pred = predictor.predict(X)
        assert pred.shape == y.shape and np.all(np.isfinite(pred)) and np.all(pred > 0)

    configs = [space.decode(r) for r in X]
    acc = np.array([subnet_accuracy(trained, c, val_loader, train_loader) for c in configs])
    assert acc.max() > 0.5  # two epochs learn the wine classes well above chance (1/3)
    acc_pred = AccuracyPredictor(space, spec=spec, members=("ridge", "gbt")).fit(X, acc)
    assert np.abs(acc_pred.predict(X) - acc).mean() < 0.15

    objectives = [predicted_accuracy_objective(acc_pred), latency_objective(hybrid, batch_size=profile.batch_size),
                  macs_objective(space, **spec)]
    front = nestnas.search(space, objectives, evals=24, pop_size=8, seed=0)
    assert len(front) >= 1
    for cand in front:
        assert cand.metrics["macs"] == count_macs(space, space.validate(cand.config), **spec)[0]

    best = front.best(by="accuracy")
    out = tmp_path / "bundle"
    nestnas.export(best, out, net=trained, front=front, formats=("onnx",), measure=False)
    manifest = read_manifest(out)
    batch = manifest["input"]["shape"][0]
    assert batch == profile.batch_size and manifest["family"] == FAMILY
    assert onnx_macs(out / "model.onnx") == batch * manifest["macs"]  # the graph does what the family counts
    x = torch.randn(manifest["input"]["shape"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = trained.extract(best.config)(x).numpy()
    got = nestnas.load(out)(x.numpy())
    assert np.abs(got - want).max() <= tolerance(want)


def test_generic_code_names_no_family():
    """Stages reach families through the registry only: no built-in family's classes or names."""
    named = re.compile(r"ElasticCNN|ElasticTransformer|CNNSpace|TransformerSpace|CNNConfig|TransformerConfig"
                       r"|[\"'](cnn|transformer)[\"']")
    files = [f for g in GENERIC for f in ([REPO / g] if g.endswith(".py") else sorted((REPO / g).rglob("*.py")))]
    assert len(files) > 20
    hits = [f"{f.relative_to(REPO)}:{n}" for f in files for n, line in enumerate(f.read_text().splitlines(), 1)
            if named.search(line)]
    assert not hits, hits


def test_the_command_line_loads_a_users_family_module(tmp_path):
    """A module named by NESTNAS_FAMILIES registers its family before the CLI looks it up:
    train and eval then run on it; a module that does not import costs one warning line."""
    import json
    import subprocess
    import sys

    (tmp_path / "wine_family.py").write_text(
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('_wine_family_impl', {str(Path(__file__))!r})\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)\n"
        "from nestnas.supernet.families import register_supernet\n"
        "register_supernet(mod.FAMILY)(mod.ElasticMLP)\n")
    x, y = load_wine(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    np.savez(tmp_path / "wine.npz", x=x, y=y.astype(np.int64))
    env = {**__import__("os").environ, "NESTNAS_FAMILIES": "wine_family", "PYTHONPATH": str(tmp_path)}
    cli = [sys.executable, "-m", "nestnas"]
    ckpt = tmp_path / "mlp.ckpt"
    train = subprocess.run([*cli, "train", "--family", FAMILY, "--data", str(tmp_path / "wine.npz"),
                            "--epochs", "1", "--out", str(ckpt)], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert train.returncode == 0, train.stderr
    evaluated = subprocess.run([*cli, "eval", "--checkpoint", str(ckpt), "--json"], env=env, cwd=tmp_path,
                               capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stderr
    rows = json.loads(evaluated.stdout)
    space = SearchSpace.for_family(FAMILY)
    assert set(rows) == {"largest", "smallest"}
    for name, config in (("largest", space.largest()), ("smallest", space.smallest())):
        assert rows[name]["config"] == config.to_dict() and rows[name]["summary"] == config.summary()
        assert (rows[name]["macs"], rows[name]["params"]) == count_macs(space, config, num_classes=3, num_features=13)
        assert rows[name]["accuracy"] * 36 == pytest.approx(round(rows[name]["accuracy"] * 36))  # of 36 val rows

    env["NESTNAS_FAMILIES"] = "no_such_family_module"
    broken = subprocess.run([*cli, "train", "--family", FAMILY, "--out", str(tmp_path / "x.ckpt")], env=env,
                            cwd=tmp_path, capture_output=True, text=True)
    assert broken.returncode == 1 and not (tmp_path / "x.ckpt").exists()
    lines = [ln for ln in broken.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in broken.stderr and len(lines) == 2, broken.stderr
    assert "no_such_family_module" in lines[0] and "does not import" in lines[0]
    assert "unknown supernet family" in lines[1] and FAMILY in lines[1]
