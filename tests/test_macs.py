"""Analytic, vectorised and ONNX-graph MAC / parameter counts agree with the hook counts of the
extracted modules (convention: see `nestnas.predictors.macs`)."""

import dataclasses

import numpy as np
import pytest
import torch

from nestnas.errors import ArtifactError, ConfigError
from nestnas.predictors.macs import count_macs, count_macs_encoded, count_module, onnx_macs
from nestnas.supernet import ElasticCNN, ElasticTransformer, SearchSpace, StageSpec

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning",
                                        "ignore::FutureWarning",
                                        "ignore::torch.jit.TracerWarning")


def _small_cnn():
    space = SearchSpace.mobilenet(
        stages=(StageSpec(8, 2, (1, 2)), StageSpec(16, 1, (1, 3)), StageSpec(12, 2, (1,))),
        kernel_choices=(3, 5), expand_choices=(1, 2), width_choices=(0.25, 1.0), resolution_choices=(4, 8),
        stem_channels=8, stem_stride=1, head_channels=20, channel_divisor=4,
    )
    return ElasticCNN(space, num_classes=5, in_channels=3)


def _small_transformer():
    space = SearchSpace.transformer(depth_choices=(1, 2), embed_choices=(8, 24), head_choices=(1, 3),
                                    mlp_ratio_choices=(1.5, 2.5), head_dim=4)
    return ElasticTransformer(space, num_classes=2, num_tokens=5, token_dim=3)


NETS = {
    "cnn": lambda: ElasticCNN(SearchSpace.mobilenet()),
    "transformer": lambda: ElasticTransformer(SearchSpace.transformer()),
    "small_cnn": _small_cnn,
    "small_transformer": _small_transformer,
}


@pytest.fixture(scope="module", params=sorted(NETS))
def net(request):
    torch.manual_seed(0)  # weights are irrelevant to the counts; seeded anyway
    return NETS[request.param]().eval()


def _configs(space, n, seed):
    rng = np.random.default_rng(seed)
    return [space.smallest(), space.largest()] + [space.sample(rng) for _ in range(n)]


def _hooks(net, config):
    sub = net.extract(config)
    macs, params = count_module(sub, torch.zeros(net.input_shape(config)))
    assert params == sum(p.numel() for p in sub.parameters())
    return macs, params


def test_analytic_counts_equal_hook_counts(net):
    """(a) and (d): 100 random configs (plus smallest and largest) of the default spaces, and
    of small non-default spaces with non-default specs."""
    for config in _configs(net.space, 100, seed=1):
        assert count_macs(net.space, config, **net.spec()) == _hooks(net, config), config


def test_encoded_counts_equal_scalar_counts(net):
    """(b): 500 random encoded rows plus the smallest and largest, in one vectorised call."""
    space = net.space
    rng = np.random.default_rng(2)
    upper = space.upper_bounds()
    X = np.vstack([np.zeros_like(upper), upper, rng.integers(0, upper + 1, size=(500, space.n_var))])
    macs, params = count_macs_encoded(space, X, **net.spec())
    assert macs.dtype == np.int64 and params.dtype == np.int64 and macs.shape == params.shape == (len(X),)
    want = np.array([count_macs(space, space.decode(row), **net.spec()) for row in X])
    np.testing.assert_array_equal(macs, want[:, 0])
    np.testing.assert_array_equal(params, want[:, 1])
    assert macs[0] == macs.min() and macs[1] == macs.max()


def test_encoded_accepts_lists_and_empty_input():
    space = SearchSpace.transformer()
    macs, params = count_macs_encoded(space, np.zeros((0, space.n_var), dtype=np.int64))
    assert macs.shape == params.shape == (0,)
    rows = [space.encode(space.largest()).tolist()]
    assert tuple(int(v[0]) for v in count_macs_encoded(space, rows)) == count_macs(space, space.largest())


def test_defaults_are_the_supernet_defaults():
    for space, net in ((SearchSpace.mobilenet(), ElasticCNN()), (SearchSpace.transformer(), ElasticTransformer())):
        c = space.sample(3)
        assert count_macs(space, c) == count_macs(space, c, **net.spec())


def test_counts_ignore_removed_blocks_and_unreachable_kernel_taps():
    space = SearchSpace.mobilenet()
    small = space.smallest()
    # Slots beyond each stage's depth are removed: their choices change nothing.
    k_max, e_max = space.kernel_choices[-1], space.expand_choices[-1]
    other = dataclasses.replace(
        small,
        kernel_sizes=tuple(ks[:d] + (k_max,) * (len(ks) - d) for ks, d in zip(small.kernel_sizes, small.depths)),
        expand_ratios=tuple(es[:d] + (e_max,) * (len(es) - d) for es, d in zip(small.expand_ratios, small.depths)),
    )
    assert other != small and space.canonical(other) == small
    assert count_macs(space, other) == count_macs(space, small) == count_macs(space, space.canonical(other))
    # At resolution 16 the last stage sees 2x2 maps: a 7x7 kernel acts as a 3x3 one.
    big = space.largest()
    lo = space.decode(np.r_[0, space.encode(big)[1:]])
    assert count_macs(space, lo) == count_macs(space, space.canonical(lo))
    assert space.canonical(lo).kernel_sizes[-1] == (3, 3, 3)


def _export(module, x, path, dynamo):
    with torch.no_grad():
        torch.onnx.export(module, (x,), str(path), dynamo=dynamo)
    return path


@pytest.mark.parametrize("family", ["cnn", "transformer", "small_cnn", "small_transformer"])
def test_onnx_graph_macs_equal_analytic(family, tmp_path):
    """(c): MACs read from the exported graph (Conv, Gemm, MatMul incl. the attention matmuls,
    batch 1) equal the analytic count, legacy TorchScript exporter."""
    torch.manual_seed(0)
    net = NETS[family]().eval()
    for i, config in enumerate(_configs(net.space, 2, seed=4)):
        path = _export(net.extract(config), torch.zeros(net.input_shape(config)), tmp_path / f"{i}.onnx", False)
        assert onnx_macs(path) == count_macs(net.space, config, **net.spec())[0], config


@pytest.mark.parametrize("family", ["cnn", "transformer"])
def test_onnx_graph_macs_equal_analytic_dynamo(family, tmp_path):
    """(c), dynamo exporter (slower, two configs per family). Checked with torch 2.13: the
    dynamo graph keeps the same Conv / Gemm / MatMul nodes and its count agrees exactly with
    the legacy exporter's and the analytic one."""
    import onnx

    torch.manual_seed(0)
    net = NETS[family]().eval()
    for i, config in enumerate([net.space.smallest(), net.space.sample(5)]):
        path = _export(net.extract(config), torch.zeros(net.input_shape(config)), tmp_path / f"{i}.onnx", True)
        assert onnx_macs(onnx.load(str(path))) == count_macs(net.space, config, **net.spec())[0], config


def test_onnx_macs_rejects_non_models(tmp_path):
    with pytest.raises(ArtifactError):
        onnx_macs(42)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ArtifactError):
        onnx_macs(bad)


def test_bad_input_raises_config_error():
    """(e): configs of the wrong family, bad specs and bad encoded matrices."""
    cnn, tf = SearchSpace.mobilenet(), SearchSpace.transformer()
    with pytest.raises(ConfigError, match="does not belong"):
        count_macs(cnn, tf.largest())
    with pytest.raises(ConfigError, match="does not belong"):
        count_macs(tf, cnn.largest())
    with pytest.raises(ConfigError, match="not allowed"):
        count_macs(cnn, dataclasses.replace(cnn.largest(), resolution=17))
    with pytest.raises(ConfigError, match="num_tokens"):
        count_macs(cnn, cnn.largest(), num_tokens=8)
    with pytest.raises(ConfigError, match="positive integer"):
        count_macs(tf, tf.largest(), num_tokens=0)
    with pytest.raises(ConfigError, match="SearchSpace"):
        count_macs("cnn", cnn.largest())
    with pytest.raises(ConfigError, match="shape"):
        count_macs_encoded(cnn, np.zeros((3, tf.n_var), dtype=np.int64))
    with pytest.raises(ConfigError, match="shape"):
        count_macs_encoded(cnn, cnn.encode(cnn.largest()))
    X = np.zeros((4, tf.n_var), dtype=np.int64)
    X[2, 1] = len(tf.embed_choices)
    with pytest.raises(ConfigError, match="embed_dim"):
        count_macs_encoded(tf, X)
    with pytest.raises(ConfigError, match="integer"):
        count_macs_encoded(tf, np.full((2, tf.n_var), 0.5))
