import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from nestnas.errors import ConfigError
from nestnas.predictors.macs import count_module
from nestnas.supernet import ElasticCNN, ElasticTransformer, SearchSpace
from nestnas.supernet.attention import Attention
from nestnas.supernet.evaluate import recalibrate_bn
from nestnas.supernet.static import EncoderBlock, InvertedResidual, StaticCNN, StaticEncoder


def _warm(net, batches=3):
    """Give batch norm non-trivial running statistics, as after training."""
    gen = torch.Generator().manual_seed(1)
    net.train()
    with torch.no_grad():
        for _ in range(batches):
            for config in (None, net.space.smallest()):
                x = torch.randn(net.input_shape(config, batch=8), generator=gen) * 2 + 0.5
                net(x, config)
    return net.eval()


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return _warm(ElasticCNN(SearchSpace.mobilenet(), num_classes=10, in_channels=1))


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return ElasticTransformer(SearchSpace.transformer(), num_classes=10).eval()


def vectors(space):
    return st.tuples(*[st.integers(0, len(v.options) - 1) for v in space.variables()])


def _check_parity(net, config):
    x = torch.randn(net.input_shape(config, batch=3), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = net(x, config)
        got = net.extract(config)(x)
    assert got.shape == (3, 10)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(vec=vectors(SearchSpace.mobilenet()))
def test_extracted_cnn_matches_supernet(cnn, vec):
    _check_parity(cnn, cnn.space.decode(vec))


@settings(max_examples=50, deadline=None, derandomize=True)
@given(vec=vectors(SearchSpace.transformer()))
def test_extracted_transformer_matches_supernet(transformer, vec):
    _check_parity(transformer, transformer.space.decode(vec))


@settings(max_examples=20, deadline=None, derandomize=True)
@given(vec=vectors(SearchSpace.mobilenet()))
def test_configs_with_equal_hash_compute_the_same_function(cnn, vec):
    config = cnn.space.decode(vec)
    canonical = cnn.space.canonical(config)
    x = torch.randn(cnn.input_shape(config, batch=2), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(cnn(x, canonical), cnn(x, config), rtol=0, atol=1e-5)


STATIC_TYPES = (StaticCNN, StaticEncoder, InvertedResidual, EncoderBlock, Attention, nn.Sequential, nn.Conv2d,
                nn.BatchNorm2d, nn.Hardswish, nn.Linear, nn.LayerNorm, nn.GELU)


@pytest.mark.parametrize("which", ["cnn", "transformer"])
def test_extracted_module_is_plain_torch(which, request):
    net = request.getfixturevalue(which)
    sub = net.extract(net.space.sample(5))
    assert not sub.training
    for m in sub.modules():
        assert type(m) in STATIC_TYPES, type(m)
    keys = list(sub.state_dict())
    assert not any(".bn.bn." in k or "elastic" in k.lower() for k in keys)
    # extracted weights are copies: changing them leaves the supernet alone
    before = net(torch.zeros(net.input_shape(batch=1)))
    with torch.no_grad():
        for p in sub.parameters():
            p.add_(1.0)
    torch.testing.assert_close(net(torch.zeros(net.input_shape(batch=1))), before)


def test_extraction_drops_kernel_taps_that_only_see_padding(cnn):
    config = cnn.space.largest()
    small = type(config)(16, config.width_mult, config.depths, config.kernel_sizes, config.expand_ratios)
    sub = cnn.extract(small)
    kernels = [blk.depthwise[0].kernel_size[0] for blk in sub.blocks]
    # resolution 16: the depthwise convs see maps of 8, 8, 8 | 8, 4, 4 | 4, 2, 2 | 2, 2, 2 pixels;
    # on a 2x2 map a 7x7 kernel only ever touches its inner 3x3 taps
    assert kernels == [7] * 7 + [3] * 5


@pytest.mark.parametrize("which", ["cnn", "transformer"])
def test_sort_channels_keeps_the_largest_function(which):
    torch.manual_seed(4)
    net = ElasticCNN() if which == "cnn" else ElasticTransformer()
    _warm(net)
    x = torch.randn(net.input_shape(batch=4), generator=torch.Generator().manual_seed(5))
    small = net.space.smallest()
    xs = torch.randn(net.input_shape(small, batch=4), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want, small_before = net(x), net(xs, small)
        net.sort_channels()
        torch.testing.assert_close(net(x), want, rtol=0, atol=1e-5)
        assert not torch.allclose(net(xs, small), small_before, atol=1e-4)  # the slices did change
    # importance is now non-increasing along the sorted dimensions
    if which == "cnn":
        scores = [b.project_conv.weight.abs().sum(dim=(0, 2, 3)) for stage in net.stages for b in stage]
        scores.append(net.classifier.weight.abs().sum(dim=0))  # head channels
    else:
        scores = [b.fc2.weight.abs().sum(dim=0) for b in net.blocks]
        scores += [b.attn.proj.weight.abs().sum(dim=0).reshape(-1, net.space.head_dim).sum(dim=1) for b in net.blocks]
    for score in scores:
        assert torch.all(score[:-1] >= score[1:] - 1e-4)  # sums in another order differ by rounding


def test_sort_channels_keeps_the_residual_stream_consistent():
    # stem (16) and stage 0 (16, stride 1) share the residual stream: sorting must not break it
    torch.manual_seed(7)
    net = _warm(ElasticCNN())
    assert net.stages[0][0].stride == 1
    x = torch.randn(net.input_shape(batch=2))
    with torch.no_grad():
        want = net(x)
        net.sort_channels()
        torch.testing.assert_close(net(x), want, rtol=0, atol=1e-5)


def test_recalibrate_bn_gives_exact_average_statistics():
    torch.manual_seed(8)
    net = ElasticCNN()
    config = net.space.smallest()
    sub = net.extract(config)
    batches = [torch.randn(net.input_shape(config, batch=5)) * 3 + 1 for _ in range(3)]
    recalibrate_bn(sub, iter(batches))
    assert not sub.training
    stem_bn = sub.stem[1]
    with torch.no_grad():
        pre = torch.cat([sub.stem[0](b) for b in batches])
    torch.testing.assert_close(stem_bn.running_mean, pre.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    assert stem_bn.momentum == 0.1  # restored
    with pytest.raises(ValueError):
        recalibrate_bn(sub, iter([]))


def test_forward_refuses_input_of_the_wrong_shape(cnn, transformer):
    with pytest.raises(ConfigError, match="prepare_input"):
        cnn(torch.zeros(1, 1, 8, 8), cnn.space.smallest())
    x = cnn.prepare_input(torch.zeros(1, 1, 8, 8), cnn.space.smallest())
    assert x.shape == (1, 1, 16, 16)
    with pytest.raises(ConfigError):
        transformer(torch.zeros(1, 7, 8))
    with pytest.raises(ConfigError, match="does not belong"):
        cnn(x, transformer.space.smallest())


def test_no_hidden_active_subnet_state(cnn):
    """Running one subnet leaves nothing behind that changes another's output."""
    a, b = cnn.space.sample(11), cnn.space.sample(12)
    xa = torch.randn(cnn.input_shape(a, batch=2))
    xb = torch.randn(cnn.input_shape(b, batch=2))
    with torch.no_grad():
        first = cnn(xa, a)
        cnn(xb, b)
        torch.testing.assert_close(cnn(xa, a), first, rtol=0, atol=0)


@pytest.mark.parametrize("which", ["cnn", "transformer"])
def test_counts_grow_along_the_ladder(which, request):
    net = request.getfixturevalue(which)
    counts = [count_module(net.extract(c), torch.zeros(net.input_shape(c))) for c in net.space.ladder(4)]
    macs, params = np.array(counts).T
    assert np.all(np.diff(macs) > 0) and np.all(np.diff(params) >= 0)
