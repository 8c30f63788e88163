"""Generic code takes a family whose spec holds any JSON (a model configuration as a dict, a
string) and whose subnets take several integer inputs: a toy token classifier defined only here
(ids and an attention mask, an elastic sequence length) goes through checkpoints (safetensors,
exact resume), the analytic counts, profile and accuracy-table documents, `describe_subnet` and
the measured-latency objective on ONNX Runtime."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nestnas.errors import CheckpointError, ConfigError, ProfileError
from nestnas.hw_profiles.profile import DeviceProfile
from nestnas.predictors.accuracy_data import AccuracyTable
from nestnas.predictors.macs import count_macs, count_macs_encoded, count_module
from nestnas.supernet import SearchSpace, SubnetConfig, Supernet, Variable, build_supernet
from nestnas.supernet.checkpoint import load_supernet, read_payload, save_checkpoint, write_payload
from nestnas.supernet.config import as_int, ints
from nestnas.supernet.elastic import ElasticLinear
from nestnas.supernet.families import register_supernet, unregister_supernet
from nestnas.supernet.inputs import InputSpec, example_inputs
from nestnas.supernet.train import train_supernet

FAMILY = "test-tokens"
MODEL_CONFIG = {"vocab_size": 20, "hidden_size": 12, "activation": "relu", "dropout": 0.0,
                "label2id": {"neg": 0, "pos": 1, "mixed": 2}, "layers": [1, 2]}


@dataclass(frozen=True)
class TokensConfig(SubnetConfig):
    family: ClassVar[str] = FAMILY
    depth: int
    widths: tuple[int, ...]
    seq_len: int

    _types: ClassVar[dict[str, Callable[..., Any]]] = {"depth": as_int, "widths": ints, "seq_len": as_int}


@dataclass(frozen=True)
class TokensSpace(SearchSpace):
    family: ClassVar[str] = FAMILY
    config_type: ClassVar[type[SubnetConfig]] = TokensConfig
    depth_choices: tuple[int, ...] = (1, 2)
    width_choices: tuple[int, ...] = (8, 16)
    seq_len_choices: tuple[int, ...] = (4, 8)

    @property
    def max_depth(self) -> int:
        return self.depth_choices[-1]

    def variables(self):
        return (Variable("depth", self.depth_choices, stage=0, depth=True),
                *(Variable(f"widths[{i}]", self.width_choices, stage=0, slot=i) for i in range(self.max_depth)),
                Variable("seq_len", self.seq_len_choices))

    def _check_shape(self, config):
        if len(config.widths) != self.max_depth:
            raise ConfigError(f"config field 'widths': expected {self.max_depth} slots, got {len(config.widths)}")

    def _flatten(self, config):
        return [config.depth, *config.widths, config.seq_len]

    def _build(self, values):
        return TokensConfig(values[0], tuple(values[1:-1]), values[-1])

    def canonical(self, config):
        self.validate(config)
        return dataclasses.replace(config, widths=tuple(w if i < config.depth else self.width_choices[0]
                                                        for i, w in enumerate(config.widths)))

    def size(self):
        return sum(len(self.width_choices) ** d for d in self.depth_choices) * len(self.seq_len_choices)


class StaticTokens(nn.Module):
    """The extracted subnet: the model's own keyword inputs, in `input_specs` order."""

    def __init__(self, embed: nn.Embedding, layers: list[nn.Module], head: nn.Linear):
        super().__init__()
        self.embed, self.layers, self.head = embed, nn.Sequential(*layers), head

    def forward(self, input_ids, attention_mask):
        return self.head(self.layers(_pool(self.embed(input_ids), attention_mask)))


def _pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


class ElasticTokens(Supernet):
    """Embeddings, mean over the unmasked tokens, elastic MLP. Samples are packed (3, L) int64 as
    text data is (ids, mask, token types; the types unused). Its spec holds a dict (the model
    configuration) and a string."""

    space_type = TokensSpace
    default_epochs = 1

    def __init__(self, space: TokensSpace | None = None, num_classes: int = 3, model_config: dict | None = None,
                 name: str = "toy"):
        super().__init__()
        self.space = space if space is not None else TokensSpace()
        self.num_classes, self.model_config, self.name = num_classes, dict(model_config or MODEL_CONFIG), name
        hidden, w = self.model_config["hidden_size"], self.space.width_choices[-1]
        self.embed = nn.Embedding(self.model_config["vocab_size"], hidden)
        self.layers = nn.ModuleList(ElasticLinear(hidden if i == 0 else w, w) for i in range(self.space.max_depth))
        self.head = ElasticLinear(w, num_classes)

    def spec(self):
        return {"num_classes": self.num_classes, "model_config": self.model_config, "name": self.name}

    @classmethod
    def spec_for_data(cls, space, sample_shape, num_classes):
        return {"num_classes": num_classes}

    def sample_shape(self):
        return (3, self.space.seq_len_choices[-1])

    def input_shape(self, config=None, batch=1):
        return (batch, 3, self.resolve(config).seq_len)

    def input_specs(self, config=None, batch=1):
        length = self.resolve(config).seq_len
        return (InputSpec("input_ids", (batch, length), "int64", 0, self.model_config["vocab_size"]),
                InputSpec("attention_mask", (batch, length), "int64", 0, 2))

    def prepare_input(self, x, config=None):
        return x[..., : self.resolve(config).seq_len]

    def forward(self, x, config=None):
        config = self.resolve(config)
        self._check_input(x, config)
        h = _pool(self.embed(x[:, 0]), x[:, 1])
        for i in range(config.depth):
            h = F.relu(self.layers[i](h, config.widths[i]))
        return self.head(h, self.num_classes)

    def _widths(self, config):
        return [self.model_config["hidden_size"], *config.widths[: config.depth]]

    def extract(self, config=None):
        config = self.space.canonical(self.resolve(config))
        w = self._widths(config)
        layers = [m for i in range(config.depth) for m in (self.layers[i].to_static(w[i], w[i + 1]), nn.ReLU())]
        embed = nn.Embedding.from_pretrained(self.embed.weight.detach().clone(), freeze=False)
        return StaticTokens(embed, layers, self.head.to_static(w[-1], self.num_classes)).eval()

    def sort_channels(self):
        return self

    @classmethod
    def count_macs(cls, space, config, spec):
        cfg = spec["model_config"] or MODEL_CONFIG
        w = [cfg["hidden_size"], *config.widths[: config.depth], spec["num_classes"]]
        linear = sum(a * b + b for a, b in zip(w, w[1:]))
        return sum(a * b for a, b in zip(w, w[1:])), cfg["vocab_size"] * cfg["hidden_size"] + linear


@pytest.fixture(scope="module", autouse=True)
def family():
    register_supernet(FAMILY)(ElasticTokens)
    yield
    unregister_supernet(FAMILY)


def make_net(seed: int = 0) -> ElasticTokens:
    torch.manual_seed(seed)
    return build_supernet(TokensSpace(), num_classes=3, model_config=MODEL_CONFIG, name="tiny toy")


def token_loader(n: int = 48, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MODEL_CONFIG["vocab_size"], (n, 8), generator=g)
    mask = (torch.rand(n, 8, generator=g) < 0.8).long()
    y = (ids[:, 0] % 3).long()
    # shuffled by the global generator, which training reseeds every epoch (a resume replays it)
    return DataLoader(TensorDataset(torch.stack([ids, mask, torch.zeros_like(ids)], 1), y), batch_size=16, shuffle=True)


def test_checkpoint_round_trip_keeps_tensors_and_json_spec(tmp_path):
    net = make_net()
    path = tmp_path / "tokens.ckpt"
    save_checkpoint(net, path)
    assert path.read_bytes()[8:9] == b"{"  # a safetensors file
    back = load_supernet(path)
    assert type(back) is ElasticTokens and back.space == net.space
    assert back.spec() == net.spec() and back.spec()["model_config"] == MODEL_CONFIG
    for (k, a), (k2, b) in zip(net.state_dict().items(), back.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b)
    from safetensors.torch import load_file

    assert set(load_file(path)) == set(net.state_dict())  # plain safetensors readers see the weights by name
    config = net.space.sample(1)
    x = next(iter(token_loader()))[0]
    torch.testing.assert_close(back(back.prepare_input(x, config), config),
                               net.eval()(net.prepare_input(x, config), config), rtol=0, atol=0)


def test_resumed_training_is_bit_identical(tmp_path):
    loader = token_loader()
    straight = make_net()
    train_supernet(straight, loader, epochs=2, seed=3, progress=False, lr=1e-2)
    ckpt = tmp_path / "run.ckpt"

    def kill(epoch, metrics):  # a run killed after epoch 1 of 2 (the checkpoint is written before callbacks)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_supernet(make_net(), loader, epochs=2, seed=3, progress=False, lr=1e-2, checkpoint=ckpt,
                       callbacks=[kill])
    state = read_payload(ckpt)["train"]
    # the optimiser's parameter ids stay ints, its betas a tuple, its moments tensors
    assert all(isinstance(k, int) for k in state["optimizer"]["state"])
    assert isinstance(state["optimizer"]["param_groups"][0]["betas"], tuple)
    resumed = make_net(seed=99)  # everything must come from the checkpoint
    result = train_supernet(resumed, loader, epochs=2, seed=3, progress=False, lr=1e-2, checkpoint=ckpt)
    assert result.resumed_from_epoch == 1 and len(result.history) == 2
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_checkpoint_written_by_torch_save_is_still_read(tmp_path):
    net = make_net()
    old = tmp_path / "old.ckpt"  # as nestnas wrote checkpoints before safetensors (format version 1)
    torch.save({"format": "nestnas.supernet", "version": 1, "space": net.space.to_dict(), "spec": net.spec(),
                "model": net.state_dict(), "train": None}, old)
    back = load_supernet(old)
    assert back.spec() == net.spec() and all(torch.equal(a, b) for a, b in
                                             zip(net.state_dict().values(), back.state_dict().values()))
    torch.save({"format": "nestnas.supernet", "version": 2, "model": {}}, old)
    with pytest.raises(CheckpointError, match="has version 2"):
        load_supernet(old)


def test_corrupt_and_foreign_checkpoints_are_one_line(tmp_path):
    good = tmp_path / "good.ckpt"
    save_checkpoint(make_net(), good)
    raw = good.read_bytes()
    cases = {"truncated": raw[: len(raw) // 2], "header cut": raw[:40], "empty": b"",
             "garbage": b"\x01" * 64, "flipped header length": b"\xff" * 8 + raw[8:]}
    for name, data in cases.items():
        bad = tmp_path / f"{name}.ckpt"
        bad.write_bytes(data)
        with pytest.raises(CheckpointError, match="corrupt") as info:
            load_supernet(bad)
        assert "\n" not in str(info.value) and str(bad) in str(info.value), name
    from safetensors.torch import save_file

    foreign = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a nestnas supernet checkpoint"):
        load_supernet(foreign)
    payload = read_payload(good)
    payload["spec"]["num_classes"] = "3"  # an integer field: its default is an integer
    write_payload(tmp_path / "spec.ckpt", payload)
    with pytest.raises(CheckpointError, match="field spec.num_classes: expected an integer"):
        load_supernet(tmp_path / "spec.ckpt")
    payload["spec"]["num_classes"] = 3
    payload["model"]["embed.weight"] = torch.zeros(2, 2)  # a weight of another shape
    write_payload(tmp_path / "shape.ckpt", payload)
    with pytest.raises(CheckpointError, match="does not describe a valid supernet"):
        load_supernet(tmp_path / "shape.ckpt")
    payload = read_payload(good)
    payload["model"]["embed.weight"] = {"__tensor__": "embed.weight"}  # a user's dict that looks like a tag
    write_payload(tmp_path / "tag.ckpt", payload)
    assert read_payload(tmp_path / "tag.ckpt")["model"]["embed.weight"] == {"__tensor__": "embed.weight"}
    from safetensors import safe_open

    with safe_open(str(good), "pt") as f:  # a metadata document naming a tensor the file lacks
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta["nestnas"] = meta["nestnas"].replace('{"__tensor__":"embed.weight"}', '{"__tensor__":"nowhere"}')
    save_file(tensors, tmp_path / "dangling.ckpt", metadata=meta)
    with pytest.raises(CheckpointError, match="corrupt: its metadata names a tensor 'nowhere' the file does not"):
        load_supernet(tmp_path / "dangling.ckpt")
    meta["nestnas"] = meta["nestnas"][:-1]  # the JSON cut short
    save_file(tensors, tmp_path / "cut.ckpt", metadata=meta)
    with pytest.raises(CheckpointError, match="corrupt: its metadata is not JSON"):
        load_supernet(tmp_path / "cut.ckpt")


def test_counts_take_a_json_spec():
    net = make_net()
    space = net.space
    for config in (space.largest(), space.smallest(), space.sample(5)):
        want = count_module(net.extract(config), example_inputs(net.input_specs(config, 2)))
        assert count_macs(space, config, **net.spec()) == want
    X = [space.encode(space.sample(s)) for s in range(4)]
    macs, _ = count_macs_encoded(space, np.array(X), **net.spec())
    assert macs.tolist() == [count_macs(space, space.decode(r), **net.spec())[0] for r in X]
    with pytest.raises(ConfigError, match="spec field 'num_classes': expected a positive integer"):
        count_macs(space, space.largest(), **{**net.spec(), "num_classes": 0})
    with pytest.raises(ConfigError, match="unknown spec field"):
        count_macs(space, space.largest(), vocab=3)


def test_profile_and_accuracy_table_documents_keep_a_json_spec(tmp_path):
    net = make_net()
    space = net.space
    config = space.largest()
    record = {"median_ms": 0.5, "p10_ms": 0.4, "p90_ms": 0.6, "cv": 0.01, "repeats": 20, "stable": True}
    profile = DeviceProfile(name="here", fingerprint={"backend": "onnxruntime"}, space=space.to_dict(),
                            spec=net.spec(), batch_size=1)
    profile.add(config, record)
    profile.save(tmp_path / "p.json")
    back = DeviceProfile.load(tmp_path / "p.json")
    assert back.spec == net.spec() and back.to_xy()[1].tolist() == [0.5]
    doc = json.loads((tmp_path / "p.json").read_text())
    doc["spec"]["num_classes"] = 1 << 20  # beyond MAX_SPEC
    (tmp_path / "big.json").write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match="field spec.num_classes: expected at most"):
        DeviceProfile.load(tmp_path / "big.json")

    table = AccuracyTable(space.to_dict(), net.spec(), "0" * 64)
    table.entries[space.config_hash(config)] = {"config": space.canonical(config).to_dict(), "accuracy": 0.5}
    table.save(tmp_path / "a.json")
    assert AccuracyTable.load(tmp_path / "a.json").spec == net.spec()
    doc = json.loads((tmp_path / "a.json").read_text())
    doc["spec"]["num_classes"] = True
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(ProfileError, match="field spec.num_classes"):
        AccuracyTable.load(tmp_path / "bad.json")


def test_describe_subnet_and_measured_latency_on_onnxruntime():
    from nestnas.report import describe_subnet
    from nestnas.search.objectives import measured_latency_objective

    net = make_net().eval()
    loader = token_loader(32)
    config = net.space.smallest()
    row = describe_subnet(net, config, loader, loader)
    assert 0 <= row["accuracy"] <= 1 and (row["macs"], row["params"]) == count_macs(net.space, config, **net.spec())
    objective = measured_latency_objective(net, "onnxruntime", batch_size=2, threads=1)
    values = objective.fn([config, net.space.largest()])
    assert len(values) == 2 and all(v > 0 for v in values)


def test_profile_a_checkpoint_from_the_cli(tmp_path, capsys):
    from nestnas.cli import main

    net = make_net()
    ckpt = tmp_path / "tokens.ckpt"
    save_checkpoint(net, ckpt)
    out = tmp_path / "p.json"
    assert main(["profile", "--checkpoint", str(ckpt), "--samples", "3", "--batch-size", "2", "--passes", "1",
                 "--no-blocks", "--threads", "1", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == FAMILY
    profile = DeviceProfile.load(out)
    assert profile.spec == net.spec() and profile.space == net.space.to_dict() and len(profile.measurements) == 3
    assert main(["profile", "--checkpoint", str(ckpt), "--family", "cnn", "--out", str(tmp_path / "x.json")]) == 1
    assert "is a 'test-tokens' supernet" in capsys.readouterr().err


def test_a_switchable_bundle_refuses_typed_inputs(tmp_path):
    from nestnas.compile.switch import export_switchable

    net = make_net()
    with pytest.raises(ConfigError, match="one float32 input.*input_ids \\(int64\\)"):
        export_switchable(net, [net.space.smallest(), net.space.largest()], tmp_path / "sw")
    assert not (tmp_path / "sw").exists()


# --- the hf-encoder family from a model folder ------------------------------------------------

@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    pytest.importorskip("transformers")
    from hf_models import write_bert_folder

    return write_bert_folder(tmp_path_factory.mktemp("bert") / "tiny-bert", num_labels=2)


def test_profile_a_model_folder_from_the_cli(bert_folder, tmp_path, capsys):
    from nestnas.cli import main
    from nestnas.supernet.hf_encoder import elasticize, load_pretrained

    out = tmp_path / "bert.json"
    argv = ["profile", "--model", str(bert_folder), "--samples", "3", "--batch-size", "1", "--passes", "1",
            "--no-blocks", "--out", str(out), "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["family"] == "hf-encoder" and summary["subnets"] == 3
    profile = DeviceProfile.load(out)
    net = elasticize(load_pretrained(bert_folder), rank=False)
    assert profile.space == net.space.to_dict() and profile.spec == net.spec()
    assert profile.spec["hf_config"]["hidden_size"] == 32
    seq_lens = {m.config["seq_len"] for m in profile.measurements.values()}
    assert seq_lens <= set(net.space.seq_len_choices)
    assert main(argv) == 0  # resumed: nothing new to measure, the same spec after the JSON round trip
    assert json.loads(capsys.readouterr().out)["measured"] == 0

    for bad, words in ((["--model", str(tmp_path / "missing")], "does not exist"),
                       (["--model", str(bert_folder), "--family", "cnn"], "makes a 'hf-encoder' supernet"),
                       (["--checkpoint", str(tmp_path / "none.ckpt")], "checkpoint not found"),
                       (["--model", str(bert_folder), "--resolution", "32"], "--resolution"),
                       (["--model", str(bert_folder), "--checkpoint", str(out)], "not both")):
        assert main(["profile", *bad, "--samples", "3", "--out", str(tmp_path / "x.json")]) == 1
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, err
        assert not (tmp_path / "x.json").exists()


@pytest.fixture(scope="module")
def hf_checkpoint(bert_folder, tmp_path_factory):
    """A checkpoint of a tiny BERT made elastic (ranked on its data), with the record of that data."""
    from nestnas.supernet.data import load_data
    from nestnas.supernet.hf_encoder import elasticize, load_pretrained

    tmp_path = tmp_path_factory.mktemp("hf-ckpt")
    words = ["good film", "bad movie", "great acting", "awful plot", "i liked it", "i hated it", "very fun",
             "very boring"]
    csv = tmp_path / "reviews.csv"
    csv.write_text("text,label\n" + "".join(f"{w},{'pos' if i % 2 == 0 else 'neg'}\n"
                                            for i, w in enumerate(words * 3)))
    data = load_data(f"{csv}:text=text,label=label", None, seed=0, model=bert_folder, max_length=16)
    net = elasticize(load_pretrained(bert_folder), data.loaders(4)[0], num_labels=data.num_classes,
                     seq_len_choices=(8, 16))
    ckpt = tmp_path / "bert.ckpt"
    save_checkpoint(net, ckpt, data=data)
    return net, ckpt, data


def test_an_hf_checkpoint_round_trips_exactly(hf_checkpoint):
    net, ckpt, data = hf_checkpoint
    back = load_supernet(ckpt)
    assert back.spec() == net.spec() and back.space == net.space
    for (k, a), b in zip(net.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    config = net.space.sample(2)
    x = next(iter(data.loaders(4)[1]))[0]
    torch.testing.assert_close(back(back.prepare_input(x, config), config),
                               net.eval()(net.prepare_input(x, config), config), rtol=0, atol=0)


def test_eval_of_an_hf_checkpoint(hf_checkpoint, capsys):
    from nestnas.cli import main

    net, ckpt, _ = hf_checkpoint
    assert main(["eval", "--checkpoint", str(ckpt), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert set(rows) == {"largest", "smallest"}
    for name, row in rows.items():
        config = getattr(net.space, name)()
        assert 0 <= row["accuracy"] <= 1
        assert (row["macs"], row["params"]) == count_macs(net.space, config, **net.spec())
