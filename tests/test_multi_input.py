"""Bundles and measurements of modules with several typed inputs: token ids, masks and segment ids
(int64), or float tensors of different shapes. ONNX Runtime and TVM against torch, the manifest's
per-input records, and one-line errors for inputs that do not fit."""

import json
import shutil

import numpy as np
import pytest
import torch

import nestnas
from nestnas.compile import get_backend, get_runner
from nestnas.compile.bundle import Subnet, bundle_batch, installed_formats, measure_bundle, read_manifest
from nestnas.compile.feeds import declared_bounds
from nestnas.errors import ArtifactError, ConfigError
from nestnas.fileio import write_json
from nestnas.hw_profiles.profiler import measure_module
from nestnas.supernet.inputs import InputSpec

ATOL = 1e-4
VOCAB, SEQ, BATCH = 50, 16, 2
BACKENDS = ["onnxruntime", pytest.param("tvm", marks=pytest.mark.tvm)]


class TextClassifier(torch.nn.Module):
    """Embedding of ids and segments, mean over the unmasked positions, a linear head."""

    def __init__(self):
        super().__init__()
        self.words, self.segments = torch.nn.Embedding(VOCAB, 8), torch.nn.Embedding(2, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, input_ids, mask, token_type_ids):
        h = self.words(input_ids) + self.segments(token_type_ids)
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1.0))


class TwoFloats(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 4), torch.nn.Linear(5, 4)

    def forward(self, a, b):
        return self.a(a) * torch.tanh(self.b(b).mean(1))


class Ignores(torch.nn.Module):
    """Uses its first input only (TorchScript export drops the other from the graph)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, a, unused):
        return self.lin(a)


TEXT_SPECS = (InputSpec("input_ids", (BATCH, SEQ), "int64", 0, VOCAB), InputSpec("mask", (BATCH, SEQ), "int64", 0, 2),
              InputSpec("token_type_ids", (BATCH, SEQ), "int64", 0, 2))


def text_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(SEQ) < torch.randint(4, SEQ + 1, (BATCH, 1), generator=g)).long()  # padded sequences
    return {"input_ids": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), "mask": mask,
            "token_type_ids": torch.randint(0, 2, (BATCH, SEQ), generator=g)}


def numpy(xs):
    return {k: v.numpy() for k, v in xs.items()}


def formats():
    return installed_formats()[0]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    torch.manual_seed(0)
    module = TextClassifier().eval()
    out = tmp_path_factory.mktemp("text") / "bundle"
    result = nestnas.export(module, out, example_inputs=TEXT_SPECS, formats=formats(), tune_trials=0, threads=1,
                            measure=False)
    return {"module": module, "bundle": out, "manifest": result["manifests"][0]}


@pytest.fixture(scope="module")
def floats(tmp_path_factory):
    torch.manual_seed(1)
    module = TwoFloats().eval()
    g = torch.Generator().manual_seed(3)
    examples = {"a": torch.randn(3, 8, generator=g), "b": torch.randn(3, 6, 5, generator=g).numpy()}
    out = tmp_path_factory.mktemp("floats") / "bundle"
    result = nestnas.export(module, out, example_inputs=examples, formats=formats(), tune_trials=0, threads=1,
                            measure=False)
    return {"module": module, "bundle": out, "manifest": result["manifests"][0], "examples": examples}


def test_the_manifest_records_each_input_with_its_check_data(text):
    manifest, bundle = text["manifest"], text["bundle"]
    assert "input" not in manifest and read_manifest(bundle)["inputs"] == manifest["inputs"]
    assert [(e["name"], e["dtype"], e["shape"], e["low"], e["high"]) for e in manifest["inputs"]] == [
        ("input_ids", "int64", [BATCH, SEQ], 0, VOCAB), ("mask", "int64", [BATCH, SEQ], 0, 2),
        ("token_type_ids", "int64", [BATCH, SEQ], 0, 2)]
    checks = [e["check"] for e in manifest["inputs"]]
    assert checks == ["check_input.input_ids.npy", "check_input.mask.npy", "check_input.token_type_ids.npy"]
    assert set(manifest["artifacts"]) == {*checks, "check_output.npy", *(manifest["files"].values())}
    xs = {e["name"]: np.load(bundle / e["check"]) for e in manifest["inputs"]}
    assert all(x.dtype == np.int64 and x.shape == (BATCH, SEQ) for x in xs.values())
    with torch.no_grad():
        want = text["module"](*(torch.from_numpy(x) for x in xs.values())).numpy()
    np.testing.assert_array_equal(np.load(bundle / "check_output.npy"), want)
    assert bundle_batch(manifest) == BATCH
    assert manifest["verified"]["onnxruntime_max_abs_diff"] <= ATOL
    if "tvm" in manifest["formats"]:  # reloaded in a fresh process, check inputs fed by name
        assert manifest["verified"]["tvm_max_abs_diff"] <= ATOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_int64_inputs_match_torch(text, backend):
    model = nestnas.load(text["bundle"], backend)
    for seed in (5, 6):
        xs = text_inputs(seed)
        with torch.no_grad():
            want = text["module"](*xs.values()).numpy()
        np.testing.assert_allclose(model(numpy(xs)), want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_inputs_of_different_shapes_match_torch(floats, backend):
    manifest, bundle = floats["manifest"], floats["bundle"]
    assert [(e["name"], e["dtype"], e["shape"]) for e in manifest["inputs"]] == [("a", "float32", [3, 8]),
                                                                                 ("b", "float32", [3, 6, 5])]
    assert all("low" not in e for e in manifest["inputs"])
    np.testing.assert_array_equal(np.load(bundle / "check_input.b.npy"), floats["examples"]["b"])  # the user's own
    model = nestnas.load(bundle, backend)
    g = torch.Generator().manual_seed(8)
    xs = {"a": torch.randn(3, 8, generator=g), "b": torch.randn(3, 6, 5, generator=g)}
    with torch.no_grad():
        want = floats["module"](*xs.values()).numpy()
    np.testing.assert_allclose(model(numpy(xs)), want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edit, fragment", [
    pytest.param(lambda x: {k: v for k, v in x.items() if k != "mask"},
                 "input 'mask' is missing; this {} model takes input_ids (int64 (2, 16)), mask", id="missing"),
    pytest.param(lambda x: {**x, "labels": x["mask"]}, "unknown input 'labels'", id="unknown"),
    pytest.param(lambda x: {**x, "mask": x["mask"].astype(np.float32)},
                 "input 'mask' holds float32 values; this {} model takes int64 (integers)", id="dtype"),
    pytest.param(lambda x: {**x, "mask": x["mask"][:, :8]},
                 "input 'mask' of shape (2, 8) does not fit this {} model (expected (2, 16); shapes are static)",
                 id="shape"),
    pytest.param(lambda x: {**x, "input_ids": x["input_ids"] + VOCAB}, "input 'input_ids' holds", id="past-vocab"),
    pytest.param(lambda x: {**x, "token_type_ids": x["token_type_ids"] - 1},
                 "input 'token_type_ids' holds -1; this {} model takes values in [0, 2)", id="negative"),
    pytest.param(lambda x: x["input_ids"], "this {} model takes 3 inputs", id="bare-array"),
])
def test_inputs_that_do_not_fit_are_one_line(text, backend, edit, fragment):
    model = nestnas.load(text["bundle"], backend)
    with pytest.raises(ConfigError) as err:
        model(edit(numpy(text_inputs(1))))
    message = str(err.value)
    assert fragment.format(backend) in message and "\n" not in message


def test_measure_bundle_feeds_each_check_input(text):
    out = measure_bundle(text["bundle"], ["onnx"], threads=1)
    assert out["onnxruntime"]["median_ms"] > 0


def test_a_manifest_whose_inputs_are_of_another_shape_is_one_line(text, tmp_path):
    def edited(edit):
        b = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        shutil.copytree(text["bundle"], b)
        m = json.loads((b / "manifest.json").read_text())
        m.pop("signature", None)
        edit(m)
        write_json(b / "manifest.json", m)
        return b

    cases = [(lambda m: m["inputs"][1].update(dtype="float64"), "field inputs.1.dtype"),
             (lambda m: m["inputs"][0].update(check="other.npy"), "is not a listed artifact"),
             (lambda m: m["inputs"][2].update(name="mask"), "the name 'mask' appears twice"),
             (lambda m: m["inputs"][0].update(high=0), "give both low and high, with high > low")]
    for edit, fragment in cases:
        with pytest.raises(ArtifactError, match="bundle manifest") as err:
            nestnas.load(edited(edit))
        assert fragment in str(err.value) and "\n" not in str(err.value)


def test_one_float_input_named_input_keeps_the_classic_bundle(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()
    sub = Subnet("s", module, (InputSpec("input", (2, 4)),))
    assert sub.input_shape == (2, 4) and sub.check_files() == ["check_input.npy"]
    x = torch.randn(2, 4)
    manifest = nestnas.export(module, tmp_path / "b", example_inputs={"input": x}, formats=("onnx",),
                              measure=False)["manifests"][0]
    assert manifest["input"] == {"name": "input", "shape": [2, 4], "dtype": "float32"} and "inputs" not in manifest
    assert set(manifest["artifacts"]) == {"model.onnx", "check_input.npy", "check_output.npy"}
    model = nestnas.load(tmp_path / "b")
    np.testing.assert_allclose(model(x.numpy().astype(np.float64)), module(x).detach().numpy(), rtol=0, atol=ATOL)


def test_export_arguments_that_do_not_fit_are_one_line(tmp_path):
    module = TwoFloats().eval()
    a, b = torch.randn(3, 8), torch.randn(3, 6, 5)
    cases = [
        (dict(input_shape=(3, 8), example_inputs={"a": a, "b": b}), "give input_shape or example_inputs, not both"),
        (dict(example_inputs={"a": a, "b": b.double().numpy()}), "example input 'b': dtype float64"),
        (dict(example_inputs={"a": a, "b": [1.0]}), "example_inputs: 'b' -> list"),
        (dict(example_inputs={"a": a, "b": torch.randn(3, 6, 7)}), "do not fit the module's forward"),
        (dict(example_inputs={"a": a, "b": b, "c": b}), "do not fit the module's forward"),
        (dict(example_inputs=[(3, 8)]), "a tuple of InputSpec"),
        (dict(example_inputs=(InputSpec("a", (3, 8)), InputSpec("a", (3, 6, 5)))), "the name 'a' is given twice"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(ConfigError) as err:
            nestnas.export(module, tmp_path / "x", formats=("onnx",), measure=False, **kwargs)
        assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_measure_module_times_typed_inputs(backend):
    """As the profiler measures a family's parts: `build_part` may give a shape or InputSpecs."""
    torch.manual_seed(2)
    be, runner = get_backend(backend, threads=1, exporter="torchscript"), get_runner(backend, max_seconds=0.3)
    m = measure_module(be, runner, TextClassifier().eval(), TEXT_SPECS, seed=0)
    assert m["median_ms"] > 0 and m["repeats"] >= 6
    assert measure_module(be, runner, torch.nn.Linear(4, 2).eval(), (2, 4), seed=0)["median_ms"] > 0
    # a model built from specs checks the declared id range before running
    built = be.build(TextClassifier().eval(), TEXT_SPECS)
    with pytest.raises(ConfigError, match=r"input 'input_ids' holds 50; .* values in \[0, 50\)"):
        built({**numpy(text_inputs(0)), "input_ids": np.full((BATCH, SEQ), VOCAB)})


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_input_the_graph_drops_is_fed_but_not_passed(backend):
    module = Ignores().eval()
    a, unused = torch.randn(2, 4), torch.randn(2, 3)
    built = get_backend(backend, threads=1, exporter="torchscript").build(module, {"a": a, "unused": unused})
    assert built.graph_inputs == ["a"] and [s.name for s in built.inputs] == ["a", "unused"]
    np.testing.assert_allclose(built({"a": a.numpy(), "unused": unused.numpy()}), module(a, unused).detach().numpy(),
                               rtol=0, atol=ATOL)
    assert get_runner(backend, max_seconds=0.1).measure(built, {"a": a.numpy(), "unused": unused.numpy()}).repeats


def test_the_torch_runner_takes_a_dict_of_inputs():
    xs = numpy(text_inputs(0))
    assert get_runner("torch", max_seconds=0.1).measure(TextClassifier().eval(), xs).median_ms > 0


def test_a_constant_spec_draws_examples_but_bounds_nothing():
    """A mask drawn as all ones (low == high - 1) still takes a padded mask with zeros."""
    specs = (TEXT_SPECS[0], InputSpec("mask", (BATCH, SEQ), "int64", 1, 2), TEXT_SPECS[2])
    assert declared_bounds(specs) == {"input_ids": (0, VOCAB), "token_type_ids": (0, 2)}
    module = TextClassifier().eval()
    built = get_backend("onnxruntime", threads=1, exporter="torchscript").build(module, specs)
    xs = text_inputs(4)
    assert (xs["mask"] == 0).any()
    np.testing.assert_allclose(built(numpy(xs)), module(*xs.values()).detach().numpy(), rtol=0, atol=ATOL)
