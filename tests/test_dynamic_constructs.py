"""Constructs of published dynamic networks' code that `rewrite` must split: module-structure facts
in host code (``len(self.layers)``, ``len(self.blocks[g])``, ``hasattr``, flags set in
``__init__``), plain dicts of modules, ``getattr`` with a computed name, dead tensor code and
in-place updates. Each network is rewritten, saved, reloaded on ONNX Runtime and compared with
eager PyTorch on fresh inputs, with every branch taken."""

import random
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nestnas.compile.bundle import tolerance
from nestnas.compile.dynamic import CoverageWarning, RewriteError, load_dynamic, rewrite


class LenLoop(nn.Module):
    """Issue snippet 1: the length of a ModuleList in a loop header, exit on a tensor condition."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x):
        for i in range(len(self.layers)):
            x = self.layers[i](x)
            if x.max() > 1.0:
                return x
        return x


class Structure(nn.Module):
    """Nested groups (``len(self.blocks[g])``), ``hasattr``, ``is not None``, a flag and a training
    branch that keeps tensors in a list (dead in eval mode, so never split)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleList(nn.Linear(4, 4) for _ in range(n)) for n in (1, 3, 2)])
        self.downsample = None
        self.proj = nn.Linear(4, 4)
        self.use_proj = True
        self.exits_at = [0, 2]
        self.threshold = 0.0

    def forward(self, x):
        outs = []
        for g in range(len(self.blocks)):
            for i in range(len(self.blocks[g])):
                x = torch.tanh(self.blocks[g][i](x))
            if self.training:
                outs.append(x)
            if g in self.exits_at and x.sum() > self.threshold:
                return x * 2
        if self.downsample is not None:
            x = self.downsample(x)
        if hasattr(self, "proj") and self.use_proj:
            x = self.proj(x)
        if not hasattr(self, "missing"):
            x = x + 1
        return x


class DictMembership(nn.Module):
    """Issue snippet 2: a membership test on a plain dict of modules, and a loop over its items."""

    def __init__(self):
        super().__init__()
        self.b0, self.b1 = nn.Linear(4, 4), nn.Linear(4, 4)
        self.attr_layers = {"b0": self.b0, "b1": self.b1}

    def forward(self, x):
        for i in range(3):
            if "b{}".format(i) in self.attr_layers:
                x = self.attr_layers["b{}".format(i)](x)
        for name, layer in self.attr_layers.items():
            if x.mean() > 0 and name != "b9":
                x = layer(x)
        return x


class SkipNetGetattr(nn.Module):
    """SkipNet's code names its blocks ``group{g}_layer{i}`` and fetches them with getattr."""

    def __init__(self, groups=(2, 2)):
        super().__init__()
        self.num_layers = list(groups)
        for g, n in enumerate(groups):
            for i in range(n):
                setattr(self, "group{}_layer{}".format(g, i), nn.Linear(4, 4))
                setattr(self, "group{}_gate{}".format(g, i), nn.Linear(4, 1))

    def forward(self, x):
        for g in range(len(self.num_layers)):
            for i in range(self.num_layers[g]):
                mask = torch.sigmoid(getattr(self, "group{}_gate{}".format(g, i))(x))
                if mask.item() > 0.5:
                    x = F.relu(getattr(self, "group{}_layer{}".format(g, i))(x)) + x
        return x


class DeadAndInPlace(nn.Module):
    """Issue snippet 3: ``mask_list += ...`` never read (a segment of dead code after a branch),
    and in-place updates of tensors read later."""

    def __init__(self):
        super().__init__()
        self.f, self.g = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        mask_list = torch.zeros(4)
        y = self.f(x)
        mask = (y > 0).float()
        if y.sum() > 0:
            y = self.g(y)
        mask_list += mask.reshape([-1])
        y += 1.0
        y.add_(x)
        y.clamp_(min=-2.0)
        y[:, 0].mul_(3.0)
        return y


def _check(model, inputs, fresh, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoverageWarning)
        program = rewrite(model, inputs)
    assert program.coverage() == 1.0
    compiled = load_dynamic(program.save(tmp_path / "b", backends=("onnxruntime",)), "onnxruntime")
    with torch.no_grad():
        for x in fresh:
            want = model(x).numpy()
            got = compiled(x.numpy())
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= tolerance(want)
    return program


def _inputs(n, seed, scales=(0.1, 1.0, 4.0)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 4, generator=g) * scales[i % len(scales)] for i in range(n)]


def test_len_of_a_module_list_in_a_loop_header_is_a_constant(tmp_path):
    program = _check(LenLoop().eval(), _inputs(30, 0), _inputs(30, 1), tmp_path)
    assert "range(3)" in program.host_source and "self" not in program.host_source


def test_structure_facts_are_written_into_the_host_code(tmp_path):
    torch.manual_seed(0)
    model = Structure().train()  # rewrite decides self.training as the model runs: eval
    inputs = _inputs(40, 2)
    model.eval()
    with torch.no_grad():
        model.threshold = float(np.median([model.blocks[0][0](x).tanh().sum() for x in inputs]))
    program = _check(model, inputs, _inputs(40, 3), tmp_path)
    host = program.host_source
    assert "(1, 3, 2)" not in host and "range(3)" in host and "outs.append" not in host
    assert "hasattr" not in host and "downsample" not in host


def test_a_dict_of_modules_is_tested_and_looped_over_in_host_code(tmp_path):
    program = _check(DictMembership().eval(), _inputs(30, 4), _inputs(30, 5), tmp_path)
    assert "{'b0': '<Linear>', 'b1': '<Linear>'}" in program.host_source
    assert "for name in ('b0', 'b1')" in program.host_source


def test_getattr_with_a_computed_name_picks_a_module_per_specialisation(tmp_path):
    torch.manual_seed(1)
    model = SkipNetGetattr().eval()
    with torch.no_grad():
        for g in range(2):
            for i in range(2):
                getattr(model, f"group{g}_gate{i}").bias.zero_()
    program = _check(model, _inputs(40, 6, (1.0,)), _inputs(20, 7, (1.0,)), tmp_path)
    assert {r.params["g"] for r in program.records.values() if "g" in r.params} == {0, 1}


def test_dead_tensor_code_is_removed_and_in_place_updates_become_assignments(tmp_path):
    torch.manual_seed(2)
    model = DeadAndInPlace().eval()
    program = _check(model, _inputs(30, 8, (1.0,)), _inputs(30, 9, (1.0,)), tmp_path)
    assert all("mask_list" not in seg.outputs for seg in program.segments.values())
    assert "mask_list" not in program.host_source


class TensorLogic(nn.Module):
    """`and`, `not` and chained comparisons on tensors in conditions (DeeBERT, PABEE and SDN code
    write them): a trace would freeze `bool(tensor)` into a constant."""

    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x):
        y = self.f(x)
        if y.mean() > 0 and y.max() < 1.0:
            return y * 2
        if not (y.sum() > -0.5):
            return y - 1
        if -1.0 < y.min() < -0.2 or y.max() > 2.0:
            return y + 1
        return y


def test_logic_on_tensor_conditions_is_computed_in_the_subgraph(tmp_path):
    torch.manual_seed(3)
    model = TensorLogic().eval()
    inputs = _inputs(60, 10, (0.3, 1.0, 3.0))
    with torch.no_grad():  # the first example must take the first exit, so a frozen trace would show
        first = next(x for x in inputs if (lambda y: y.mean() > 0 and y.max() < 1.0)(model.f(x)))
    _check(model, [first, *inputs], _inputs(60, 11, (0.3, 1.0, 3.0)), tmp_path)


class ObjectInHost(nn.Module):
    """Shapes of buffers are constants the host may use; a Python object's method is not."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(3))
        self.names = {"a": 1}
        self.rng = random.Random(0)

    def forward(self, x, k: int):
        n = k * len(self.names) + int(self.scale.numel()) + self.scale.shape[0]
        if self.rng.random() > 2:
            n = 0
        return x * n


def test_an_object_in_host_code_is_refused_with_its_line_and_a_way_out():
    message = (r"test_dynamic_constructs.py:\d+: `if self.rng.random\(\) > 2:`: the host code needs self.rng.random "
               r"\(builtin_function_or_method\), which cannot be written into a module without torch; compute with "
               r"it in tensor code")
    with pytest.raises(RewriteError, match=message):
        rewrite(ObjectInHost(), [(torch.randn(1, 4), 2)])


class ShapeInHost(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(3))
        self.names = {"a": 1}

    def forward(self, x, k: int):
        n = k * len(self.names) + int(self.scale.numel()) + self.scale.shape[0]
        return x * n


def test_shapes_of_buffers_are_constants_of_the_host_code():
    x = torch.randn(1, 4)
    program = rewrite(ShapeInHost(), [(x, 2)])
    assert "self" not in program.host_source and "+ 3 + 3" in program.host_source
    assert torch.equal(program.eager(x, 2), x * 8)


class NoGradAndRaise(nn.Module):
    """A gate computed under `torch.no_grad()` and an input check that raises, as papers' code does."""

    def __init__(self):
        super().__init__()
        self.gate, self.f = nn.Linear(4, 1), nn.Linear(4, 4)

    def forward(self, x):
        if x.dim() != 2:
            raise ValueError("expected a batch of vectors, got {} dimensions".format(x.dim()))
        with torch.no_grad():
            g = torch.sigmoid(self.gate(x))
        if g.item() > 0.5:
            x = self.f(x)
        return x


def test_no_grad_blocks_are_inlined_and_host_checks_raise_in_the_host(tmp_path):
    torch.manual_seed(4)
    model = NoGradAndRaise().eval()
    with torch.no_grad():
        model.gate.bias.zero_()
    _check(model, _inputs(30, 12, (1.0,)), _inputs(30, 13, (1.0,)), tmp_path)
    compiled = load_dynamic(tmp_path / "b", "onnxruntime")
    with pytest.raises(ValueError, match="expected a batch of vectors, got 3 dimensions"):
        compiled(np.zeros((1, 1, 4), np.float32))


class KeepsState(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x):
        self.last = self.f(x)
        return self.last


class TryExcept(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x):
        try:
            y = self.f(x)
        except RuntimeError:
            y = x
        return y


class WhileElse(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x):
        for _ in range(3):
            x = self.f(x)
            if x.sum() > 0:
                break
        else:
            x = -x
        return x


@pytest.mark.parametrize("model, code, hint", [
    (KeepsState(), "self.last = self.f(x)", "keep it in a local variable"),
    (TryExcept(), "try:", "move this code into a submodule"),
    (WhileElse(), "for _ in range(3):", "set a flag before `break`"),
])
def test_constructs_that_cannot_be_split_name_file_line_code_and_what_to_write(model, code, hint):
    with pytest.raises(RewriteError) as err:
        rewrite(model, [torch.randn(1, 4)])
    message = str(err.value)
    assert re.match(r".*test_dynamic_constructs.py:\d+: `" + re.escape(code) + "`: ", message), message
    assert hint in message and "\n" not in message


class ShowAndTellSampler(nn.Module):
    """Show and Tell's greedy sampler as tutorials write it: the words are kept in a Python list,
    stacked at the end, and decoding stops at the end token."""

    def __init__(self, embed=8, hidden=12, vocab=10, max_len=5):
        super().__init__()
        self.encoder, self.embed = nn.Linear(6, embed), nn.Embedding(vocab, embed)
        self.lstm, self.linear = nn.LSTMCell(embed, hidden), nn.Linear(hidden, vocab)
        self.hidden, self.max_seg_length, self.end = hidden, max_len, 1

    def forward(self, images):
        features = self.encoder(images)
        sampled_ids = []
        inputs = features
        h = torch.zeros(images.size(0), self.hidden)
        c = torch.zeros(images.size(0), self.hidden)
        for i in range(self.max_seg_length):  # noqa: B007 - as the tutorials write it
            h, c = self.lstm(inputs, (h, c))
            outputs = self.linear(h)
            _, predicted = outputs.max(1)
            sampled_ids.append(predicted)
            if predicted.item() == self.end:
                break
            inputs = self.embed(predicted)
        sampled_ids = torch.stack(sampled_ids, 1)
        return sampled_ids


class ExitsInAList(nn.Module):
    """SDN-style: every internal classifier's output is kept in a list, which forward returns."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.exits = nn.ModuleList(nn.Linear(4, 2) for _ in range(3))

    def forward(self, x):
        outs = []
        for i in range(len(self.layers)):
            x = torch.relu(self.layers[i](x))
            outs.append(self.exits[i](x))
            if outs[-1].max() > 0.3:
                break
        return outs


def test_a_python_list_of_tensors_is_kept_by_the_host_and_stacked_in_a_subgraph(tmp_path):
    torch.manual_seed(5)
    model = ShowAndTellSampler().eval()
    inputs = [torch.randn(1, 6, generator=torch.Generator().manual_seed(i)) for i in range(40)]
    with torch.no_grad():  # the end token's bias such that about half the captions end early
        base = model.linear.bias[1].item()
        for shift in np.linspace(-2, 2, 81):
            model.linear.bias[1] = base + shift
            if np.mean([model(x).shape[1] < model.max_seg_length for x in inputs]) >= 0.5:
                break
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoverageWarning)
        program = rewrite(model, inputs)
    lengths = {r.params.get("__n_sampled_ids") for r in program.records.values()} - {None}
    assert len(lengths) > 1  # one stacking subgraph per caption length
    compiled = load_dynamic(program.save(tmp_path / "b", backends=("onnxruntime",)), "onnxruntime")
    with torch.no_grad():
        for i in range(40, 80):
            x = torch.randn(1, 6, generator=torch.Generator().manual_seed(i))
            want = model(x).numpy()
            if want.shape[1] not in lengths:
                continue  # a caption length no example reached has no compiled stacking subgraph
            assert np.array_equal(compiled(x.numpy()), want)
    assert program.host_source.count("__run(") <= 4  # host statements do not cut segments


def test_a_list_of_tensors_can_be_returned(tmp_path):
    torch.manual_seed(6)
    model = ExitsInAList().eval()
    inputs = _inputs(30, 14)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoverageWarning)
        program = rewrite(model, inputs)
    compiled = load_dynamic(program.save(tmp_path / "b", backends=("onnxruntime",)), "onnxruntime")
    with torch.no_grad():
        for x in _inputs(30, 15):
            want, got = model(x), compiled(x.numpy())
            assert isinstance(got, list) and len(got) == len(want)
            for w, g in zip(want, got):
                assert np.abs(g - w.numpy()).max() <= tolerance(w.numpy())


class TutorialSampler(nn.Module):
    """Show and Tell's `sample` exactly as the widely copied PyTorch tutorial writes it: nn.LSTM's
    state is None at first, then a tuple passed from step to step; words kept in a list."""

    def __init__(self, embed_size=8, hidden_size=12, vocab_size=10, max_seq_length=5):
        super().__init__()
        self.encoder = nn.Linear(6, embed_size)
        self.embed = nn.Embedding(vocab_size, embed_size)
        self.lstm = nn.LSTM(embed_size, hidden_size, 1, batch_first=True)
        self.linear = nn.Linear(hidden_size, vocab_size)
        self.max_seg_length = max_seq_length

    def forward(self, images, states=None):
        features = self.encoder(images)
        sampled_ids = []
        inputs = features.unsqueeze(1)
        for i in range(self.max_seg_length):  # noqa: B007 - as the tutorial writes it
            hiddens, states = self.lstm(inputs, states)
            outputs = self.linear(hiddens.squeeze(1))
            _, predicted = outputs.max(1)
            sampled_ids.append(predicted)
            inputs = self.embed(predicted)
            inputs = inputs.unsqueeze(1)
        sampled_ids = torch.stack(sampled_ids, 1)
        return sampled_ids


@pytest.mark.parametrize("backend", ["onnxruntime", pytest.param("tvm", marks=pytest.mark.tvm)])
def test_a_tuple_state_that_is_none_at_first_passes_between_subgraphs(tmp_path, backend, has_tvm):
    if backend == "tvm" and not has_tvm:
        pytest.skip("the tvm extra is not installed")
    torch.manual_seed(7)
    model = TutorialSampler().eval()
    inputs = [torch.randn(1, 6, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    program = rewrite(model, inputs)
    trees = [r.in_tree for r in program.records.values()]
    assert [None] in [t[1:] for t in trees] and ["tuple", ["t", "t"]] in [t for tree in trees for t in tree]
    compiled = load_dynamic(program.save(tmp_path / "b", backends=(backend,)), backend)
    with torch.no_grad():
        for i in range(4, 12):
            x = torch.randn(1, 6, generator=torch.Generator().manual_seed(i))
            assert np.array_equal(compiled(x.numpy()), model(x).numpy())
