"""Text data (CSV / JSON lines tokenised with the model folder's own tokenizer), the fine-tuning
recipe (linear warm-up and decay, clipping, accumulation) and `nestnas train --model`."""

import copy
import csv
import json
import math

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import DataLoader, Subset

from nestnas.errors import ConfigError, DataError
from nestnas.supernet import ElasticTransformer, SearchSpace
from nestnas.supernet.data import DEFAULT_MAX_LENGTH, PACKED_TEXT, digits_datasets, load_data, parse_spec
from nestnas.supernet.train import FINE_TUNING, SCRATCH, lr_factor, recipe_for, train_supernet

pytest.importorskip("transformers")
import hf_models  # noqa: E402  (tests/ is on sys.path, see conftest.py)

REVIEWS = [("the movie was good", "pos"), ("the film was bad", "neg"), ("i liked the plot , very fun", "pos"),
           ("awful acting . boring", "neg"), ("great film !", "pos"), ("not good , not fun", "neg"),
           ("i hated it", "neg"), ("the acting was great", "pos")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A BERT model folder without a classification head (any number of classes fits)."""
    return hf_models.write_bert_folder(tmp_path_factory.mktemp("bert"), architecture="BertModel")


def reviews(n=64):
    """n distinct labelled reviews (a review and its number)."""
    return [(f"{text} {'very ' * (i // len(REVIEWS))}".strip() + f" {i}", label)
            for i, (text, label) in ((i, REVIEWS[i % len(REVIEWS)]) for i in range(n))]


def write_csv(path, rows, header=("review", "sentiment")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def packed(folder, texts, pairs=None, length=DEFAULT_MAX_LENGTH):
    """What the tokenizer itself makes of `texts`, packed (N, 3, L) as the data does."""
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(folder, local_files_only=True)(
        texts, pairs, padding="max_length", truncation=True, max_length=length)
    return np.stack([np.asarray(enc[k]) for k in PACKED_TEXT], axis=1)


def samples(data):
    """Every (packed sample as bytes) -> class name of train and validation."""
    out = {}
    for part in (data.train, data.val):
        x, y = part.tensors
        assert x.dtype == torch.int64 and y.dtype == torch.int64
        for xi, yi in zip(x.numpy(), y.tolist()):
            out[xi.tobytes()] = data.classes[yi]
    return out


# --- data -----------------------------------------------------------------------------------------------

def test_text_csv_is_tokenised_by_the_models_own_tokenizer(tmp_path, folder):
    rows = reviews(40) + [('a "quoted", multi-line\nreview 40', "pos")]  # CSV quoting survives
    path = write_csv(tmp_path / "r.csv", rows)
    data = load_data(f"{path}:text=review,label=sentiment,max_length=16", model=folder)
    assert data.sample_shape == (3, 16) and data.num_classes == 2 and data.classes == ("neg", "pos")
    assert (len(data.train), len(data.val)) == (32, 9)  # stratified 0.2 split
    want = packed(folder, [t for t, _ in rows], length=16)
    assert samples(data) == {x.astype(np.int64).tobytes(): label for x, (_, label) in zip(want, rows)}
    assert (want[:, 2] == 0).all() and (want[:, 1] == 0).any()  # one text: types 0; padding masked
    # the recorded spec names the tokenizer, so it alone reads the same data again
    spec = parse_spec(data.spec)
    assert spec.kind == "text" and spec.options["tokenizer"] == str(folder.resolve())
    again = load_data(data.spec)
    assert again.fingerprint == data.fingerprint and again.classes == data.classes
    # the default length is min(128, the model's 64 positions); truncation is the tokenizer's
    assert load_data(f"{path}:text=review,label=sentiment", model=folder).sample_shape == (3, hf_models.POSITIONS)
    assert load_data(path.as_posix() + ":text=review,label=sentiment", model=folder,
                     max_length=8).sample_shape == (3, 8)


def test_jsonl_sentence_pairs_and_numeric_labels(tmp_path, folder):
    rows = [{"premise": t, "hypothesis": t.split()[-1], "label": [2, 10, 1][i % 3]} for i, (t, _) in
            enumerate(reviews(30))]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    data = load_data(f"{path}:text=premise,text2=hypothesis,max_length=24", model=folder, seed=1)
    assert data.classes == ("1", "2", "10") and data.num_classes == 3  # integers sorted as numbers
    want = packed(folder, [r["premise"] for r in rows], [r["hypothesis"] for r in rows], length=24)
    assert samples(data) == {x.astype(np.int64).tobytes(): str(r["label"]) for x, r in zip(want, rows)}
    assert (want[:, 2] == 1).any()  # the second text's token types


def test_a_models_own_label_order_is_kept(tmp_path):
    folder = hf_models.write_bert_folder(tmp_path / "clf", num_labels=2)
    config = json.loads((folder / "config.json").read_text())
    config.update(id2label={"0": "pos", "1": "neg"}, label2id={"pos": 0, "neg": 1})
    (folder / "config.json").write_text(json.dumps(config))
    path = write_csv(tmp_path / "r.csv", reviews(20))
    data = load_data(f"{path}:text=review,label=sentiment,max_length=8", model=folder)
    assert data.classes == ("pos", "neg")


def test_bad_text_data_is_one_line(tmp_path, folder):
    path = write_csv(tmp_path / "r.csv", reviews(20))
    three = write_csv(tmp_path / "three.csv", [(t, ["a", "b", "c"][i % 3]) for i, (t, _) in enumerate(reviews(30))])
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("review,sentiment\n")
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "latin.csv").write_bytes("review,sentiment\nvery good,pos\ncaf\xe9,neg\ngood,pos\nbad,neg\n"
                                         .encode("latin-1"))
    (tmp_path / "no_tokenizer").mkdir()
    (tmp_path / "no_tokenizer" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    clf = hf_models.write_bert_folder(tmp_path / "clf", num_labels=2)
    spec = f"{path}:text=review,label=sentiment"
    cases = [
        (f"{path}:text=body,label=sentiment", folder, "no column 'body' (text=body); the columns are ['review', "
                                                      "'sentiment']"),
        (f"{path}:text=review,text2=other", folder, "no column 'other' (text2=other), 'label' (label=label)"),
        (f"{three}:text=review,label=sentiment", clf, "3 classes [a, b, c] in column 'sentiment', but the model's "
                                                      "classification head has 2 labels"),
        (spec, tmp_path / "no_tokenizer", "no usable tokenizer in"),
        (spec, tmp_path / "nowhere", "tokenizer folder"),
        (spec, None, "give the model folder (--model DIR"),
        (f"{spec},max_length=65", folder, "max_length=65 is beyond the model's 64 position embeddings"),
        (f"{spec},max_length=x", folder, "max_length='x'; expected a whole number"),
        (f"{tmp_path / 'empty.csv'}:text=review", folder, "the file is empty"),
        (f"{tmp_path / 'empty.jsonl'}", folder, "the file is empty"),
        (f"{tmp_path / 'header.csv'}:text=review,label=sentiment", folder, "no data rows"),
        (f"{tmp_path / 'latin.csv'}:text=review,label=sentiment", folder, "line 3 is not utf-8 (byte 0xe9); give "
                                                                          "the file's encoding, e.g. encoding=latin-1"),
        (f"{tmp_path / 'latin.csv'}:text=review,label=sentiment,encoding=klingon", folder, "unknown encoding"),
        (f"{spec},shape=3x3", folder, "unknown option 'shape' for text data"),
        (f"{path}:label=sentiment,max_length=8", folder, "option 'max_length' is for text data; name the text "
                                                         "column with text=COLUMN"),
    ]
    for text, model, message in cases:
        with pytest.raises(DataError) as info:
            load_data(text, model=model)
        assert message in str(info.value) and "\n" not in str(info.value), (text, str(info.value))
    latin = load_data(f"{tmp_path / 'latin.csv'}:text=review,label=sentiment,encoding=latin-1,val=0.5",
                      model=folder)
    assert latin.num_classes == 2
    with pytest.raises(DataError, match="give one of them"):
        load_data(f"{spec},max_length=8", model=folder, max_length=16)


# --- the recipe ----------------------------------------------------------------------------------------

class _LrRecorder:
    def __init__(self, net=None):
        self.lrs, self.grad_norms, self.net = [], [], net
        self._handle = register_optimizer_step_pre_hook(self._step)

    def _step(self, optimizer, args, kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])
        if self.net is not None:
            grads = [p.grad for p in self.net.parameters() if p.grad is not None]
            self.grad_norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def tiny_transformer():
    torch.manual_seed(0)
    return ElasticTransformer(SearchSpace.transformer(depth_choices=(1,), embed_choices=(16,), head_choices=(1, 2),
                                                      mlp_ratio_choices=(1.0,), head_dim=8))


def test_linear_schedule_with_warmup_steps_as_expected():
    train, _ = digits_datasets("transformer")
    loader = DataLoader(Subset(train, range(32)), batch_size=4)  # 8 batches
    with _LrRecorder() as rec:
        train_supernet(tiny_transformer(), DataLoader(Subset(train, range(32)), batch_size=8), epochs=2, sandwich=0,
                       lr=1e-3, schedule="linear", warmup=0.25, progress=False)
    # 8 steps, 2 of warm-up: (s + 1) / 2, then (8 - s) / 6 down to 1/6 at the last step
    expected = [0.5, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]
    assert rec.lrs == pytest.approx([1e-3 * f for f in expected], rel=1e-12)
    with _LrRecorder() as rec:  # the built-in families' default is unchanged: 5% warm-up (1 step), cosine
        train_supernet(tiny_transformer(), loader, epochs=1, sandwich=0, lr=1e-3, progress=False)
    assert rec.lrs == [1e-3 * 0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(8)]
    assert [lr_factor("constant", s, 8, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    with pytest.raises(ConfigError, match="schedule"):
        train_supernet(tiny_transformer(), loader, epochs=1, schedule="step", progress=False)
    with pytest.raises(ConfigError, match="warmup"):
        train_supernet(tiny_transformer(), loader, epochs=1, warmup=1.0, progress=False)


def test_gradients_are_clipped_before_the_step():
    train, _ = digits_datasets("transformer")
    loader = DataLoader(Subset(train, range(16)), batch_size=8)
    net = tiny_transformer()
    with _LrRecorder(net) as rec:
        train_supernet(net, loader, epochs=1, sandwich=0, clip_grad=1e-3, progress=False)
    assert len(rec.grad_norms) == 2 and max(rec.grad_norms) <= 1e-3 * (1 + 1e-5)
    net = tiny_transformer()
    with _LrRecorder(net) as rec:
        train_supernet(net, loader, epochs=1, sandwich=0, progress=False)
    assert min(rec.grad_norms) > 1e-2  # the built-in recipe does not clip


def test_recipes():
    assert recipe_for(ElasticTransformer) == SCRATCH.__class__(**{**SCRATCH.__dict__,
                                                                  "epochs": ElasticTransformer.default_epochs})
    assert (FINE_TUNING.lr, FINE_TUNING.weight_decay, FINE_TUNING.schedule, FINE_TUNING.warmup,
            FINE_TUNING.clip_grad, FINE_TUNING.epochs) == (1e-4, 0.01, "linear", 0.1, 1.0, 3)


# --- fine-tuning a pretrained encoder as a supernet ----------------------------------------------------------

@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A BERT classifier folder with 2 labels and 64 labelled reviews for it."""
    root = tmp_path_factory.mktemp("task")
    folder = hf_models.write_bert_folder(root / "bert", num_labels=2)
    return folder, write_csv(root / "reviews.csv", reviews(64))


def text_supernet(folder, seed=0):
    """The folder's supernet in its pretrained order (ranking is `nestnas train --model`'s test)."""
    from nestnas.supernet.hf_encoder import elasticize, load_pretrained

    model = load_pretrained(folder)
    if seed:  # other weights: whatever a run ends with must come from its checkpoint
        model = hf_models.build("BertForSequenceClassification", seed=seed, num_labels=2)
    return elasticize(model, rank=False, seq_len_choices=(8, 16))


def test_accumulating_two_batches_equals_one_batch_of_both(task):
    """grad_accum=2 over two batches of 8 is one step on their batch of 16 (no dropout; the
    smallest subnet's distillation loss averages over the batch like the labels' loss)."""
    folder, path = task
    data = load_data(f"{path}:text=review,label=sentiment,max_length=16", model=folder)
    rows = Subset(data.train, range(16))

    start = text_supernet(folder)

    def step(batch_size, grad_accum):
        net = copy.deepcopy(start)
        grads = []

        def hook(optimizer, args, kwargs):
            grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})

        handle = register_optimizer_step_pre_hook(hook)
        try:
            train_supernet(net, DataLoader(rows, batch_size=batch_size), epochs=1, sandwich=0, grad_accum=grad_accum,
                           progress=False)
        finally:
            handle.remove()
        return grads

    (joined,), (accumulated,) = step(16, 1), step(8, 2)
    assert set(joined) == set(accumulated) and len(joined) > 20
    for name, g in joined.items():
        torch.testing.assert_close(accumulated[name], g, rtol=1e-5, atol=1e-6, msg=name)
    plain = step(8, 1)
    assert len(plain) == 2 and max((plain[0][n] - g).abs().max().item() for n, g in joined.items()) > 1e-4


def test_fine_tuning_resumes_bit_identically(task, tmp_path):
    folder, path = task
    data = load_data(f"{path}:text=review,label=sentiment,max_length=16", model=folder)
    loader = DataLoader(Subset(data.train, range(16)), batch_size=8, shuffle=True)
    straight = text_supernet(folder)
    assert recipe_for(straight) == FINE_TUNING
    train_supernet(straight, loader, epochs=2, sandwich=1, seed=3, progress=False)

    ckpt = tmp_path / "run.ckpt"
    first = text_supernet(folder)

    def stop(epoch, metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # killed after its first epoch's checkpoint
        train_supernet(first, loader, epochs=2, sandwich=1, seed=3, progress=False, checkpoint=ckpt, data=data,
                       callbacks=[stop])
    resumed = text_supernet(folder, seed=99)
    result = train_supernet(resumed, loader, epochs=2, sandwich=1, seed=3, progress=False, checkpoint=ckpt, data=data)
    assert result.resumed_from_epoch == 1
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def run_cli(capsys, *args):
    from nestnas.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_model_fine_tunes_a_checkpoint_that_loads_and_evaluates(task, tmp_path, capsys):
    from nestnas.supernet.checkpoint import load_supernet
    from nestnas.supernet.data import data_for_checkpoint
    from nestnas.supernet.evaluate import subnet_accuracy

    folder, path = task
    ckpt = tmp_path / "ft.ckpt"
    code, out, err = run_cli(capsys, "train", "--model", folder, "--data", f"{path}:text=review,label=sentiment",
                             "--max-length", "16", "--epochs", "1", "--batch-size", "16", "--out", ckpt, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["family"], summary["classes"], summary["sample_shape"]) == ("hf-encoder", ["neg", "pos"], [3, 16])
    net = load_supernet(ckpt)
    assert net.family == "hf-encoder" and net.space.seq_len_choices == (4, 8, 16)
    data = data_for_checkpoint(net, ckpt)  # the recorded spec alone: the same tokenizer, split and classes
    assert data.classes == ("neg", "pos") and len(data.val) == 13
    train, val = data.loaders(16)
    for name in ("largest", "smallest"):
        config = getattr(net.space, name)()
        assert subnet_accuracy(net, config, val, train) == pytest.approx(summary[f"val_acc_{name}"], abs=1e-12)
    x = next(iter(val))[0]
    sub = net.extract(net.space.smallest())  # packed batches feed the static subnet's typed inputs
    from nestnas.supernet.evaluate import module_inputs

    config = net.space.smallest()
    torch.testing.assert_close(sub(*module_inputs(net, config, net.prepare_input(x, config))), net(x, config),
                               rtol=1e-5, atol=1e-5)


def test_train_model_bad_input_is_one_line_and_writes_nothing(task, tmp_path, capsys):
    folder, path = task
    three = write_csv(tmp_path / "three.csv", [(t, "abc"[i % 3]) for i, (t, _) in enumerate(reviews(30))])
    out = tmp_path / "x.ckpt"
    spec = f"{path}:text=review,label=sentiment"
    cases = [
        (("--model", folder), "--model needs --data"),
        (("--model", folder, "--data", f"{three}:text=review,label=sentiment"), "the model's classification head "
                                                                                "has 2 labels"),
        (("--model", folder, "--data", spec, "--max-length", "65"), "beyond the model's 64 position embeddings"),
        (("--model", folder, "--data", spec, "--family", "cnn"), "--family cnn cannot be fine-tuned from --model"),
        (("--model", tmp_path / "nowhere", "--data", spec), "does not exist"),
        (("--data", spec), "give the model folder (--model DIR"),
        (("--max-length", "16"), "--max-length applies to text data"),
        (("--model", folder, "--data", "digits"), "the hf-encoder family takes text samples packed as (3, length)"),
        (("--model", folder, "--data", spec, "--schedule", "step"), "schedule"),
    ]
    for args, message in cases:
        code, _, err = run_cli(capsys, "train", *args, "--epochs", "1", "--out", out)
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not out.exists()
