import pytest
import torch
from torch.utils.data import DataLoader, Subset

from nestnas.errors import CheckpointError, ConfigError
from nestnas.supernet import ElasticCNN, ElasticTransformer, SearchSpace, StageSpec
from nestnas.supernet.checkpoint import load_supernet, save_checkpoint
from nestnas.supernet.data import digits_datasets, digits_loaders
from nestnas.supernet.evaluate import subnet_accuracy
from nestnas.supernet.train import train_supernet

TINY_CNN = SearchSpace.mobilenet(stages=(StageSpec(8, 2, (1, 2)), StageSpec(16, 2, (1, 2))), kernel_choices=(3, 5),
                                 expand_choices=(2, 3), width_choices=(0.5, 1.0), resolution_choices=(8, 12),
                                 stem_channels=8, head_channels=32)


def tiny_loader(family="cnn", n=128, batch_size=32):
    train, _ = digits_datasets(family)
    return DataLoader(Subset(train, range(n)), batch_size=batch_size, shuffle=True)


def make_cnn(seed=0):
    torch.manual_seed(seed)
    return ElasticCNN(TINY_CNN, num_classes=10, in_channels=1)


def test_digits_split_is_stratified_and_fixed():
    train, val = digits_datasets("cnn", seed=0)
    assert len(train) + len(val) == 1797 and len(val) == 360
    assert train.tensors[0].shape[1:] == (1, 8, 8)
    counts = torch.bincount(val.tensors[1], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    again, _ = digits_datasets("cnn", seed=0)
    assert torch.equal(again.tensors[0], train.tensors[0])
    tr, _ = digits_datasets("transformer")
    assert tr.tensors[0].shape[1:] == (8, 8) and tr.tensors[0].min() >= -1 and tr.tensors[0].max() <= 1
    with pytest.raises(ConfigError, match="unknown supernet family"):
        digits_datasets("rnn")


def test_resumed_training_is_bit_identical(tmp_path):
    loader = tiny_loader()
    straight = make_cnn()
    train_supernet(straight, loader, epochs=2, seed=3, progress=False)

    ckpt = tmp_path / "run.ckpt"
    first = make_cnn()
    # a run killed after epoch 1 of its 2-epoch schedule (the checkpoint is written before callbacks)
    with pytest.raises(_Killed):
        train_supernet(first, loader, epochs=2, seed=3, progress=False, checkpoint=ckpt,
                       callbacks=[lambda epoch, m: _stop_after(epoch, 1)])
    resumed = make_cnn(seed=99)  # different init: everything must come from the checkpoint
    result = train_supernet(resumed, loader, epochs=2, seed=3, progress=False, checkpoint=ckpt)
    assert result.resumed_from_epoch == 1 and len(result.history) == 2
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


class _Killed(Exception):
    pass


def _stop_after(epoch, last):
    if epoch >= last:
        raise _Killed


def test_resume_with_other_options_is_refused(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    loader = tiny_loader()
    train_supernet(make_cnn(), loader, epochs=1, seed=0, progress=False, checkpoint=ckpt)
    with pytest.raises(CheckpointError, match="other options"):
        train_supernet(make_cnn(), loader, epochs=1, seed=0, sandwich=1, progress=False, checkpoint=ckpt)


def test_sandwich_training_improves_both_ends_of_the_space():
    train, val = digits_loaders("cnn", batch_size=32)
    net = make_cnn()
    space = net.space
    before = [subnet_accuracy(net, c, val, train) for c in (space.largest(), space.smallest())]
    train_supernet(net, tiny_loader(n=512), epochs=8, seed=0, progress=False)
    after = [subnet_accuracy(net, c, val, train) for c in (space.largest(), space.smallest())]
    # the tiny space's smallest subnet sees 1x1 maps with 8 channels: it learns, but slowly
    assert after[0] > max(0.75, before[0] + 0.5) and after[1] > max(0.3, before[1] + 0.2)


@pytest.mark.parametrize("options", [dict(sorted_ladder=True, sandwich=2), dict(grad_accum=2, distill=False),
                                     dict(sandwich=0)])
def test_training_variants_step_as_configured(options):
    net = make_cnn()
    loader = tiny_loader(n=96)  # 3 batches
    seen = []
    result = train_supernet(net, loader, epochs=1, seed=0, progress=False, val_loader=tiny_loader(n=32),
                            callbacks=[lambda e, m: seen.append(m)], **options)
    assert len(seen) == 1 and {"loss", "val_acc_largest", "val_acc_smallest"} <= set(seen[0])
    assert result.history == seen


def test_training_options_are_checked():
    with pytest.raises(ConfigError, match="grad_accum"):
        train_supernet(make_cnn(), tiny_loader(), epochs=1, grad_accum=0, progress=False)
    with pytest.raises(ConfigError, match="epochs"):
        train_supernet(make_cnn(), tiny_loader(), epochs=0, progress=False)


@pytest.mark.parametrize("family", ["cnn", "transformer"])
def test_checkpoint_round_trip_is_exact(tmp_path, family):
    torch.manual_seed(0)
    net = make_cnn() if family == "cnn" else ElasticTransformer(SearchSpace.transformer(depth_choices=(1, 2)))
    net.sort_channels()
    path = tmp_path / "net.ckpt"
    save_checkpoint(net, path)
    back = load_supernet(path)
    assert type(back) is type(net) and back.space == net.space and back.spec() == net.spec()
    config = net.space.sample(1)
    x = torch.randn(net.input_shape(config, batch=2))
    torch.testing.assert_close(back(x, config), net.eval()(x, config), rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["net.ckpt"]  # no temporary file left behind


def test_bad_checkpoints_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_supernet(tmp_path / "missing.ckpt")
    good = tmp_path / "good.ckpt"
    save_checkpoint(make_cnn(), good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_supernet(truncated)
    other = tmp_path / "other.ckpt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a nestnas supernet checkpoint"):
        load_supernet(other)


class Payload:
    """A pickled object: loading it must never run its code."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_checkpoints_are_never_unpickled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.ckpt"
    torch.save({"format": "nestnas.supernet", "version": 1, "payload": Payload()}, evil)
    with pytest.raises(CheckpointError):
        load_supernet(evil)
    assert not (tmp_path / "PWNED").exists()
