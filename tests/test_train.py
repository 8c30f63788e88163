import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook
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
    assert tr.tensors[0].shape[1:] == (8, 8) and (tr.tensors[0].min(), tr.tensors[0].max()) == (-1, 1)  # 0..16
    assert torch.equal(tr.tensors[0].reshape(train.tensors[0].shape), train.tensors[0])  # same split, other shape
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


class _StepRecorder:
    """Observes a training run without changing it: the (config, input) of every forward of the
    supernet with gradients on, and the weights and gradients at every optimiser step."""

    def __init__(self, net):
        self.net, self.forwards, self.steps = net, [], []
        self._handles = [net.register_forward_pre_hook(self._forward, with_kwargs=True),
                         register_optimizer_step_pre_hook(self._step)]

    def _forward(self, module, args, kwargs):
        if torch.is_grad_enabled():
            config = args[1] if len(args) > 1 else kwargs["config"]
            self.forwards.append((config, args[0].detach().clone()))

    def _step(self, optimizer, args, kwargs):
        params = dict(self.net.named_parameters())
        self.steps.append(({n: p.detach().clone() for n, p in params.items()},
                           {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in params.items()},
                           len(self.forwards)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()


def _grads(net, weights, groups, distill, scale):
    """Gradient of the sandwich loss, written out here: each group is the (config, input) list of
    one micro-batch with its labels; the first subnet learns the labels, the rest its soft
    predictions (or the labels without distillation)."""
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(weights[n])
    net.train()
    net.zero_grad(set_to_none=True)
    for forwards, y in groups:
        (c0, x0), rest = forwards[0], forwards[1:]
        teacher = net(x0, c0)
        loss = F.cross_entropy(teacher, y)
        for c, x in rest:
            out = net(x, c)
            loss = loss + (F.kl_div(F.log_softmax(out, 1), F.softmax(teacher.detach(), 1), reduction="batchmean")
                           if distill else F.cross_entropy(out, y))
        (loss * scale).backward()
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("options", [dict(), dict(sandwich=0), dict(sorted_ladder=True, sandwich=2),
                                     dict(grad_accum=2, distill=False)])
def test_training_variants_step_as_configured(options):
    """Each step trains exactly the subnets the options name, on the loss they name: the
    gradient the optimiser steps with equals the sandwich loss's gradient recomputed here over
    the subnets the step ran, and those subnets are largest, smallest and `sandwich` more
    (random, or interior rungs of the sorted ladder)."""
    sandwich, accum = options.get("sandwich", 2), options.get("grad_accum", 1)
    train, _ = digits_datasets("cnn")
    data = Subset(train, range(32))
    loader = DataLoader(data, batch_size=8)  # 4 batches, in order: the labels of batch i are known
    labels = [train.tensors[1][i * 8:(i + 1) * 8] for i in range(4)]
    net, twin = make_cnn(), make_cnn()
    space = net.space
    with _StepRecorder(net) as rec:
        result = train_supernet(net, loader, epochs=1, seed=0, progress=False,
                                val_loader=tiny_loader(n=32) if not options else None, **options)

    per_batch = 2 + sandwich
    assert len(rec.forwards) == 4 * per_batch and len(rec.steps) == 4 // accum
    groups = [rec.forwards[i:i + per_batch] for i in range(0, len(rec.forwards), per_batch)]
    ladder = space.ladder(8)
    for group in groups:
        configs = [c for c, _ in group]
        assert configs[:2] == [space.largest(), space.smallest()]
        extra = configs[2:]
        if options.get("sorted_ladder"):
            at = [ladder.index(c) for c in extra]
            assert sorted(set(at)) == at and all(0 < i < len(ladder) - 1 for i in at), at
        else:
            assert all(space.validate(c) == c for c in extra)
    if not options.get("sorted_ladder") and sandwich:
        assert len({str(c) for g in groups for c, _ in g[2:]}) > 2  # random subnets, redrawn per batch

    distill = options.get("distill", True)
    start = 0
    for weights, grads, n_forwards in rec.steps:
        window = [(g, labels[i]) for i, g in enumerate(groups) if start <= i * per_batch < n_forwards]
        assert len(window) == accum
        start = n_forwards
        expected = _grads(twin, weights, window, distill, 1.0 / accum)
        for name in grads:
            torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
        if sandwich == 0 and n_forwards == rec.steps[0][2]:
            # weights the smallest subnet does not use are trained by the largest alone
            teacher = _grads(twin, weights, [(g[:1], y) for g, y in window], distill, 1.0 / accum)
            student = _grads(twin, weights, [(g[1:], y) for g, y in window], False, 1.0 / accum)
            only_largest = {n: student[n] == 0 for n in grads}
            assert sum(int((teacher[n][m] != 0).sum()) for n, m in only_largest.items()) > 200
            for n, m in only_largest.items():
                torch.testing.assert_close(grads[n][m], teacher[n][m], rtol=1e-4, atol=1e-6, msg=n)

    assert [m["epoch"] for m in result.history] == [1]
    if options:
        return
    # the epoch's validation figures are those of the trained weights
    calib = DataLoader(data, batch_size=8)
    assert result.history[0]["val_acc_largest"] == subnet_accuracy(net, space.largest(), tiny_loader(n=32), calib)
    assert result.history[0]["val_acc_smallest"] == subnet_accuracy(net, space.smallest(), tiny_loader(n=32), calib)


def test_grad_accum_equals_one_step_on_the_joined_batch():
    """grad_accum=2 over two batches of 16 is one step on their batch of 32 (layer norm only,
    so the batch split changes nothing else); two plain steps of 16 are not."""
    space = SearchSpace.transformer(depth_choices=(1, 2))
    train, _ = digits_datasets("transformer")
    data = Subset(train, range(32))

    def trained(batch_size, grad_accum):
        torch.manual_seed(0)
        net = ElasticTransformer(space)
        with _StepRecorder(net) as rec:
            train_supernet(net, DataLoader(data, batch_size=batch_size), epochs=1, sandwich=0, grad_accum=grad_accum,
                           seed=0, progress=False)
        return net.state_dict(), rec.steps

    joined, joined_steps = trained(32, 1)
    accumulated, accumulated_steps = trained(16, 2)
    plain, plain_steps = trained(16, 1)
    assert len(joined_steps) == len(accumulated_steps) == 1 and len(plain_steps) == 2
    for name, g in joined_steps[0][1].items():
        torch.testing.assert_close(accumulated_steps[0][1][name], g, rtol=1e-4, atol=1e-6, msg=name)
    for name, w in joined.items():
        torch.testing.assert_close(accumulated[name], w, rtol=0, atol=1e-5, msg=name)
    assert max((plain[n] - w).abs().max().item() for n, w in joined.items()) > 1e-3


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


def test_channels_last_training_layout_is_exact_in_value_and_restored():
    """Training runs in channels-last layout (faster depthwise backward on CPU): the same
    outputs and gradients as the default layout, and the module is back to it afterwards."""
    from nestnas.supernet.train import channels_last

    net = make_cnn().train()
    x, y = next(iter(tiny_loader()))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    grads = []
    for layout in ("default", "channels_last"):
        net.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with channels_last(net) if layout == "channels_last" else torch.enable_grad():
            if layout == "channels_last":
                assert all(p.is_contiguous(memory_format=torch.channels_last) for p in net.parameters() if p.dim() == 4)
                xi = x.contiguous(memory_format=torch.channels_last)
            else:
                xi = x
            config = net.space.largest()
            out = net(net.prepare_input(xi, config), config)
            F.cross_entropy(out, y).backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}))
        net.load_state_dict(before)  # batch norm's running statistics moved
    (out_a, g_a), (out_b, g_b) = grads
    assert torch.allclose(out_a, out_b, atol=1e-5)
    assert g_a.keys() == g_b.keys() and len(g_a) > 10
    for name in g_a:
        assert torch.allclose(g_a[name], g_b[name], atol=1e-5, rtol=1e-4), name
    for p in net.parameters():
        assert p.is_contiguous(), "the module must leave training in the default layout"
    train_supernet(net, tiny_loader(), epochs=1, seed=0, progress=False)
    assert all(p.is_contiguous() for p in net.parameters()) and all(b.is_contiguous() for b in net.buffers())
