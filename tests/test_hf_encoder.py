"""The hf-encoder family: a pretrained `transformers` encoder made a supernet. Tiny random models
of every supported architecture, built here (nothing downloaded): the largest subnet computes what
the original model does after importance ranking, extracted subnets match the supernet, export to
ONNX Runtime, count their MACs exactly and reload as plain `transformers` models where they fit."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import hf_models  # noqa: E402  (tests/ helper, on sys.path through conftest)

from nestnas.errors import ConfigError, DataError  # noqa: E402
from nestnas.supernet import SearchSpace, SubnetConfig, build_supernet  # noqa: E402
from nestnas.supernet.families import family_names  # noqa: E402
from nestnas.supernet.hf_encoder import (  # noqa: E402
    SUPPORTED_ARCHITECTURES,
    ElasticHFEncoder,
    HFEncoderConfig,
    HFEncoderSpace,
    elasticize,
    importance,
    kept_layers,
    load_pretrained,
)

LABELED = ("BertForSequenceClassification", "RobertaForSequenceClassification",
           "DistilBertForSequenceClassification", "ViTForImageClassification")


def _labels(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 3, (batch,), generator=torch.Generator().manual_seed(seed))


def _data(model, n: int = 2):
    """A few (inputs, labels) batches in the model's own keywords, with padding."""
    return [(hf_models.inputs_for(model, batch=4, length=24, seed=s), _labels(4, s)) for s in range(n)]


def _args(net, inputs, config):
    """The positional inputs of `net.extract(config)` (the order of `input_specs`)."""
    if net.dims.kind == "image":
        return (inputs["pixel_values"],)
    packed = net.prepare_input(inputs, config)
    return tuple(packed[:, i] for i in range(len(net.input_specs(config))))


class _Models(dict):
    """Each architecture's tiny model, built on first use (seeded by its place in the list)."""

    def __missing__(self, arch):
        self[arch] = hf_models.build(arch, seed=SUPPORTED_ARCHITECTURES.index(arch))
        return self[arch]


@pytest.fixture(scope="module")
def models():
    return _Models()


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_the_largest_subnet_computes_the_original_model(models, arch):
    """After ranking on real batches (padded ids and masks), the permuted full model gives the
    original's logits, or for a bare encoder its pooled output and every unpadded hidden state."""
    model = models[arch]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = elasticize(model, _data(model)).eval()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is not modified
    x = hf_models.inputs_for(model, batch=4, length=24, seed=7)  # shorter than the largest seq_len: padded
    with torch.no_grad():
        want = model(**x)
        if arch in LABELED:
            torch.testing.assert_close(net(x), want.logits, rtol=0, atol=1e-4)
            return
        pooled = want.pooler_output if want.get("pooler_output") is not None else want.last_hidden_state[:, 0]
        torch.testing.assert_close(net.pooled_output(x), pooled, rtol=0, atol=1e-4)
        seq = net.sequence_output(x)[:, : want.last_hidden_state.shape[1]]
        mask = x.get("attention_mask", torch.ones(seq.shape[:2], dtype=torch.long))[..., None]
        assert ((seq - want.last_hidden_state).abs() * mask).max() <= 1e-4
        assert net(x).shape == (4, net.num_labels)  # a fresh classifier on the pooled output


def test_ranking_puts_the_most_important_heads_and_neurons_first(models):
    model = models["BertForSequenceClassification"]
    data = _data(model)
    plain = elasticize(model, rank=False)
    scores = importance(plain, data)
    ranked = elasticize(model, data)
    heads, neurons = importance(ranked, data)  # the same gradients, now in ranked order
    for before, after in ((scores[0], heads), (scores[1], neurons)):
        assert torch.all(after[:, 1:] <= after[:, :-1] * (1 + 1e-4) + 1e-9)  # non-increasing in every layer
        torch.testing.assert_close(after, before.sort(dim=1, descending=True).values, rtol=1e-4, atol=1e-9)
    assert any(row.argsort(descending=True).tolist() != list(range(row.numel())) for row in scores[0])
    # a smaller subnet keeps what ranking found most important, so it changes what it computes
    x = data[0][0]
    small = dataclasses.replace(ranked.space.largest(), num_heads=(1,) * 4, ffn=(16,) * 4)
    with torch.no_grad():
        assert (ranked(x, small) - plain(x, small)).abs().max() > 1e-4
    # without data heads are ranked by weight magnitude: the full model is unchanged too
    magnitude = elasticize(model).eval().sort_channels()  # sort_channels ranks by magnitude again
    with torch.no_grad():
        torch.testing.assert_close(magnitude(x), model(**x).logits, rtol=0, atol=1e-4)
    with pytest.raises(DataError, match="labels must lie in 0..2"):
        importance(plain, [(x, torch.tensor([0, 1, 2, 5]))])


@pytest.mark.parametrize("arch", ["BertForSequenceClassification", "RobertaModel",
                                  "DistilBertForSequenceClassification", "ViTModel"])
def test_extracted_subnets_match_the_supernet_part_by_part_and_count(models, arch):
    model = models[arch]
    net = elasticize(model, _data(model, 1)).eval()
    space, spec = net.space, net.spec()
    x = hf_models.inputs_for(model, batch=3, length=40, seed=3)  # longer than some seq_lens: truncated
    configs = [space.sample(s) for s in range(2)] + [space.smallest(), space.largest()]
    table = net.all_parts()
    for config in configs:
        sub = net.extract(config)
        args = _args(net, x, config)
        assert tuple(a.shape for a in args) == tuple(s.shape for s in net.input_specs(config, 3))
        with torch.no_grad():
            want = net(x, config)
            torch.testing.assert_close(sub(*args), want, rtol=0, atol=1e-5)
            y = None  # the measurable parts compose to the subnet
            for key, (kind, *rest) in ElasticHFEncoder.parts(space, config, spec):
                module, inputs = net.build_part((kind, *rest), 3)
                assert key in table
                if kind == "embed":
                    y = module(*(args[:1] + args[2:]))
                    assert inputs == args[0].shape if net.dims.kind == "image" else len(inputs) == len(args) - 1
                elif kind == "layer" and net.dims.kind == "text":
                    y = module(y, args[1])
                    assert [s.name for s in inputs] == ["hidden_states", "attention_mask"]
                else:
                    assert inputs == tuple(y.shape)
                    y = module(y)
            torch.testing.assert_close(y, want, rtol=0, atol=1e-5)
        macs, params = ElasticHFEncoder.count_macs(space, space.canonical(config), spec)
        assert params == sum(p.numel() for p in sub.parameters())
    X = np.stack([space.encode(c) for c in configs])
    macs, params = ElasticHFEncoder.count_macs_encoded(space, X, spec)
    assert [(int(m), int(p)) for m, p in zip(macs, params)] == [
        ElasticHFEncoder.count_macs(space, space.canonical(c), spec) for c in configs]


def test_count_macs_by_hand():
    """BERT layer at T tokens: q, k, v, o projections, QK^T and AV, the FFN; the head on one token."""
    space = HFEncoderSpace()
    config = HFEncoderConfig(depth=2, seq_len=16, num_heads=(2, 4, 1, 1), ffn=(32, 64, 16, 16))
    spec = ElasticHFEncoder(space).spec()
    t, h, hd = 16, 32, 8

    def layer(heads, ffn):
        inner = heads * hd
        return t * h * 3 * inner + 2 * heads * t * t * hd + t * inner * h + 2 * t * h * ffn

    head = h * h + h * 2  # pooler, classifier of 2 labels
    assert ElasticHFEncoder.count_macs(space, config, spec)[0] == layer(2, 32) + layer(4, 64) + head


def test_an_extracted_text_subnet_runs_on_onnx_runtime(models, tmp_path):
    """Three int64 inputs (ids, a padded mask, token types 0/1): ONNX Runtime matches torch and the
    graph does the MACs the family counts."""
    import onnxruntime as ort

    from nestnas.compile.onnx_export import export_onnx
    from nestnas.predictors.macs import onnx_macs

    model = models["BertForSequenceClassification"]
    net = elasticize(model, _data(model, 1)).eval()
    config = HFEncoderConfig(depth=3, seq_len=32, num_heads=(4, 2, 3, 1), ffn=(64, 16, 48, 16))
    sub = net.extract(config)
    x = hf_models.inputs_for(model, batch=4, length=32, seed=5)
    args = _args(net, x, config)
    specs = net.input_specs(config, 4)
    assert [(s.name, s.dtype) for s in specs] == [("input_ids", "int64"), ("attention_mask", "int64"),
                                                  ("token_type_ids", "int64")]
    # the tracing exporter (the profiler's; 0.1 s): the dynamo one gives the same graph in 5-20 s
    path = export_onnx(sub, args, tmp_path / "sub.onnx", "torchscript", input_names=[s.name for s in specs])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [(s.name, "tensor(int64)") for s in specs]
    got = session.run(None, {s.name: a.numpy() for s, a in zip(specs, args)})[0]
    with torch.no_grad():
        want = sub(*args).numpy()
    assert np.abs(got - want).max() <= 1e-4
    assert onnx_macs(path) == 4 * ElasticHFEncoder.count_macs(net.space, config, net.spec())[0]


def test_subnets_that_fit_the_model_class_reload_with_plain_transformers(models, tmp_path):
    import transformers

    for arch in ("BertForSequenceClassification", "DistilBertModel"):
        model = models[arch]
        net = elasticize(model, _data(model, 1)).eval()
        config = dataclasses.replace(net.space.largest(), depth=2, seq_len=32, ffn=(32,) * 4)
        folder = tmp_path / arch
        net.to_transformers(config).save_pretrained(folder)
        reloaded = getattr(transformers, arch).from_pretrained(folder, local_files_only=True).eval()
        assert reloaded.config.to_dict()[("n_layers" if arch.startswith("Distil") else "num_hidden_layers")] == 2
        x = hf_models.inputs_for(model, batch=4, length=32, seed=2)
        with torch.no_grad():
            out = reloaded(**x)
            if arch in LABELED:
                torch.testing.assert_close(out.logits, net(x, config), rtol=0, atol=1e-5)
            else:
                mask = x["attention_mask"][..., None]
                assert ((out.last_hidden_state - net.sequence_output(x, config)).abs() * mask).max() <= 1e-5
    fewer_heads = dataclasses.replace(config, num_heads=(4, 2, 4, 4))
    with pytest.raises(ConfigError, match="pruned_heads"):
        net.to_transformers(fewer_heads)
    with pytest.raises(ConfigError, match="one intermediate size"):
        net.to_transformers(dataclasses.replace(config, ffn=(32, 64, 16, 16)))


def test_spec_is_plain_json_and_rebuilds_the_supernet(models):
    model = models["RobertaForSequenceClassification"]
    net = elasticize(model, source="models/tiny-roberta").eval()
    assert "hf-encoder" in family_names()
    spec = json.loads(json.dumps(net.spec()))
    assert spec == net.spec() and spec["architecture"] == "RobertaForSequenceClassification"
    space = SearchSpace.from_dict(json.loads(json.dumps(net.space.to_dict())))
    assert space == net.space
    again = build_supernet(space, **spec)
    again.load_state_dict(net.state_dict())
    config = space.sample(5)
    assert SubnetConfig.from_json(config.to_json()) == config
    x = hf_models.inputs_for(model, batch=2, length=20)
    packed = torch.stack([x["input_ids"], x["attention_mask"], x["token_type_ids"]], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(packed, config), net(x, config), rtol=0, atol=0)
    assert net.prepare_input(packed, config).shape == net.input_shape(config, 2) == (2, 3, config.seq_len)
    assert net.sample_shape() == (3, max(space.seq_len_choices))
    assert kept_layers(12, 3) == [3, 7, 11] and space.kept_layers(1) == [3]


def test_configs_and_lengths_outside_the_space_are_refused(models):
    model = models["BertModel"]
    net = elasticize(model)
    x = hf_models.inputs_for(model, batch=2, length=16)
    bad = dataclasses.replace(net.space.largest(), seq_len=48)
    with pytest.raises(ConfigError, match=r"'seq_len': value 48 not allowed; allowed: \[16, 32, 64\]"):
        net(x, bad)
    with pytest.raises(ConfigError, match=r"'ffn\[1\]'"):
        net.extract(dataclasses.replace(net.space.largest(), ffn=(64, 50, 64, 64)))
    with pytest.raises(ConfigError, match="beyond the model's position embeddings"):
        elasticize(model, seq_len_choices=(32, 128))
    with pytest.raises(ConfigError, match="beyond the model's position embeddings"):
        HFEncoderSpace(seq_len_choices=(16, 128))
    with pytest.raises(ConfigError, match="does not match the model"):
        ElasticHFEncoder(dataclasses.replace(net.space, max_ffn=128, ffn_choices=(128,)), net.hf_config, "BertModel")
    with pytest.raises(ConfigError, match="packed"):
        net(torch.zeros(2, 5, 16, dtype=torch.long))
    with pytest.raises(ConfigError, match="is not supported; supported: .*'BertModel'"):
        elasticize(torch.nn.Linear(2, 2))


def test_load_pretrained_reads_a_local_folder_and_says_what_is_wrong(tmp_path, monkeypatch):
    folder = hf_models.write_bert_folder(tmp_path / "tiny-bert")
    model = load_pretrained(folder)
    assert type(model).__name__ == "BertForSequenceClassification" and not model.training
    reference = hf_models.build("BertForSequenceClassification", num_labels=2)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())

    with pytest.raises(ConfigError, match="does not exist"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        load_pretrained(tmp_path / "empty")
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                              "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match=r"'GPT2LMHeadModel' is not supported; supported: \['BertModel'"):
        load_pretrained(tmp_path / "gpt")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="cannot load the BertForSequenceClassification weights"):
        load_pretrained(folder)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[hf\]'"):
        load_pretrained(folder)
