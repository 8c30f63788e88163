"""Dynamic networks rewritten into static subgraphs and a host module: six networks compiled on
ONNX Runtime and TVM equal eager PyTorch on 100 inputs each with every branch taken; the host
module runs without torch; bad models and inputs are refused or reported."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from nestnas.compile.dynamic import CoverageWarning, RewriteError, load_dynamic, rewrite
from nestnas.errors import ArtifactError, ConfigError

import dynamic_nets as dn

NETS = dn.suite()


def as_numpy(args):
    return tuple(a.numpy() if isinstance(a, torch.Tensor) else a for a in args)


BACKENDS = ["onnxruntime", pytest.param("tvm", marks=pytest.mark.tvm)]
# TVM builds every subgraph of the six networks (~1 min): the default run builds one network's,
# the slow set all (tests/test_dynamic_literature.py builds more on TVM).
SWEEP = ["onnxruntime", pytest.param("tvm", marks=[pytest.mark.tvm, pytest.mark.slow])]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each suite network rewritten on its 100 inputs and saved for ONNX Runtime; `on_tvm` saves
    a network's TVM subgraphs when a test first needs them."""
    out = {}
    for name, model in NETS.items():
        inputs = dn.inputs_for(name, model)
        if hasattr(model, "calibrate"):
            model.calibrate([a[0] for a in inputs])
        with warnings.catch_warnings():
            warnings.simplefilter("error", CoverageWarning)
            warnings.filterwarnings("ignore", "no subnet meets the budget")
            program = rewrite(model, inputs)
        folder = program.save(tmp_path_factory.mktemp(name) / "bundle", backends=("onnxruntime",))
        out[name] = (model, inputs, program, folder)
    return out


@pytest.fixture(scope="module")
def on_tvm(saved, tmp_path_factory):
    folders = {}

    def folder(name):
        if name not in folders:
            folders[name] = saved[name][2].save(tmp_path_factory.mktemp(name + "-tvm") / "bundle", backends=("tvm",))
        return folders[name]
    return folder


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("backend", SWEEP)
def test_suite_network_equals_eager_on_every_branch(saved, on_tvm, name, backend):
    model, inputs, program, folder = saved[name]
    folder = on_tvm(name) if backend == "tvm" else folder
    assert len(inputs) >= 100
    assert program.coverage() == 1.0 and not program.untaken()  # both sides of every branch were taken
    compiled = load_dynamic(folder, backend)
    worst = 0.0
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", "no subnet meets the budget")
        for args in inputs:
            want = model(*args).numpy()
            got = compiled(*as_numpy(args))
            assert got.shape == want.shape
            worst = max(worst, float(np.abs(got - want).max()))
    assert worst <= 1e-4, f"{name} on {backend}: {worst:.2e}"


def test_branch_structure_is_what_the_model_says(saved):
    _, _, early, _ = saved["early_exit"]
    assert len(early.segments) == 2 and len(early.branches) == 1  # one decision, two static pieces
    _, _, moe, _ = saved["moe_top1"]
    assert sorted(r.params["expert"] for r in moe.records.values() if r.segment == "s1") == [0, 1, 2, 3]
    _, _, switch, _ = saved["budget_switch"]
    assert len([r for r in switch.records.values()]) == 3  # one static subgraph per subnet


@pytest.mark.parametrize("backend", BACKENDS)
def test_host_module_runs_without_torch(saved, on_tvm, backend):
    model, inputs, _, folder = saved["early_exit"]
    folder = on_tvm("early_exit") if backend == "tvm" else folder
    x = inputs[0][0]
    np.save(folder.parent / "x.npy", x.numpy())
    with torch.no_grad():
        want = model(x).numpy()
    code = ("import sys, numpy as np; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1]); "
            "import host; y = host.load(sys.argv[4])(np.load(sys.argv[2])); np.save(sys.argv[3], y); "
            "assert 'nestnas' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code, str(folder), str(folder.parent / "x.npy"),
                           str(folder.parent / "y.npy"), backend], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert np.abs(np.load(folder.parent / "y.npy") - want).max() <= 1e-4


def test_tampered_subgraph_is_refused(saved, tmp_path):
    import shutil

    _, _, _, folder = saved["skipnet"]
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    graph = copy / next(iter(manifest["subgraphs"].values()))["onnx"]
    graph.write_bytes(graph.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="does not match its checksum"):
        load_dynamic(copy, "onnxruntime")
    (copy / "host.py").write_text((copy / "host.py").read_text() + "\n# edited\n")
    with pytest.raises(ArtifactError, match="host.py does not match its checksum"):
        load_dynamic(copy, "onnxruntime")


def test_unseen_branch_is_reported_and_its_subgraph_missing_at_run_time(tmp_path):
    model = NETS["early_exit"]
    inputs = dn.inputs_for("early_exit", model)
    model.calibrate([a[0] for a in inputs])
    with torch.no_grad():
        scores = [float(torch.softmax(model.exit1(model.stage1(model.stem(a[0]))), -1).max()) for a in inputs]
    exits = [a for a, s in zip(inputs, scores) if s > model.threshold]
    stays = [a for a, s in zip(inputs, scores) if s <= model.threshold]
    with pytest.warns(CoverageWarning, match=r"dynamic_nets.py:\d+: `if confidence > self.threshold:` never skipped"):
        program = rewrite(model, exits[:5])
    compiled = load_dynamic(program.save(tmp_path / "b", backends=("onnxruntime",)), "onnxruntime")
    with pytest.raises(KeyError, match="never compiled"):
        compiled(stays[0][0].numpy())


class ItemList(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        outs = []
        for row in x:
            outs.append(self.a(row))
        return outs


class Ternary(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        y = self.a(x)
        return y if y.sum() > 0 else -y


class UsesGlobalInHost(nn.Module):
    def forward(self, x, n):
        k = json.dumps(n)
        return x * len(k)


def test_unsplittable_models_are_refused_with_their_line(tmp_path):
    x = torch.randn(2, 4)
    with pytest.raises(RewriteError, match=r"test_dynamic.py:\d+: `for row in x:`: iterating over a tensor"):
        rewrite(ItemList(), [x])
    with pytest.raises(RewriteError, match=r"`return y if y.sum\(\) > 0 else -y`: a conditional expression"):
        rewrite(Ternary(), [x])
    with pytest.raises(RewriteError, match="the host code uses 'json'"):
        rewrite(UsesGlobalInHost(), [(x, 3)])
    with pytest.raises(ConfigError, match="needs a torch.nn.Module"):
        rewrite(lambda t: t, [x])
    with pytest.raises(ConfigError, match="at least one example"):
        rewrite(Ternary(), [])
    program = rewrite(NETS["resolution_branch"], dn.inputs_for("resolution_branch", NETS["resolution_branch"], 4))
    with pytest.raises(ConfigError, match="unknown backend 'tflite'"):
        program.save(tmp_path / "b", backends=("onnxruntime", "tflite"))
    assert not (tmp_path / "b").exists()


def test_budget_switch_picks_the_fastest_when_nothing_fits_and_says_so(saved):
    model, inputs, _, folder = saved["budget_switch"]
    compiled = load_dynamic(folder, "onnxruntime")
    x = inputs[0][0]
    with pytest.warns(UserWarning, match=r"no subnet meets the budget of 0.1 ms; running the fastest \(1.0 ms\)"):
        got = compiled(x.numpy(), 0.1)
    with torch.no_grad():
        want = model.net(model.net.prepare_input(x, model.configs[0]), model.configs[0]).numpy()
    assert np.abs(got - want).max() <= 1e-4
    assert model.pick(2.5) == 1 and model.pick(100) == 2 and model.pick(0.0) == 0
