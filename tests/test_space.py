import itertools
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nestnas.errors import ConfigError
from nestnas.supernet import CNNConfig, SearchSpace, StageSpec, SubnetConfig, TransformerConfig

CNN = SearchSpace.mobilenet()
TRANSFORMER = SearchSpace.transformer()
SPACES = {"cnn": CNN, "transformer": TRANSFORMER}


def vectors(space):
    return st.tuples(*[st.integers(0, len(v.options) - 1) for v in space.variables()]).map(np.array)


@pytest.mark.parametrize("family", SPACES)
@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.data())
def test_encode_decode_and_json_round_trip_exactly(family, data):
    space = SPACES[family]
    vec = data.draw(vectors(space))
    config = space.decode(vec)
    np.testing.assert_array_equal(space.encode(config), vec)
    assert space.decode(space.encode(config)) == config
    text = config.to_json()
    back = SubnetConfig.from_json(text)
    assert back == config and hash(back) == hash(config) and back.to_json() == text
    assert space.parse(json.loads(text)) == config


@pytest.mark.parametrize("family", SPACES)
def test_largest_smallest_and_ladder_are_nested(family):
    space = SPACES[family]
    top = space.upper_bounds()
    np.testing.assert_array_equal(space.encode(space.largest()), top)
    np.testing.assert_array_equal(space.encode(space.smallest()), np.zeros_like(top))
    ladder = [space.encode(c) for c in space.ladder(5)]
    assert space.decode(ladder[0]) == space.smallest() and space.decode(ladder[-1]) == space.largest()
    for lower, upper in zip(ladder, ladder[1:]):
        assert np.all(lower <= upper) and np.any(lower < upper)


def _brute_force_size(space):
    seen = set()
    for idx in itertools.product(*[range(len(v.options)) for v in space.variables()]):
        seen.add(space.canonical(space.decode(idx)))
    return len(seen)


def test_size_counts_distinct_canonical_configs():
    tiny_cnn = SearchSpace.mobilenet(stages=(StageSpec(8, 2, (1, 2)), StageSpec(16, 2, (1, 2))),
                                     kernel_choices=(3, 5, 7), expand_choices=(2, 4), width_choices=(1.0,),
                                     resolution_choices=(4, 16))
    assert tiny_cnn.size() == _brute_force_size(tiny_cnn)
    tiny_tr = SearchSpace.transformer(depth_choices=(1, 3), embed_choices=(16, 32), head_choices=(1, 2),
                                      mlp_ratio_choices=(1.0, 2.0))
    assert tiny_tr.size() == _brute_force_size(tiny_tr) == 2 * (4 + 4**3)


def test_removed_blocks_do_not_change_the_hash():
    base = CNN.smallest()  # depth 1 everywhere: slots 1 and 2 of each stage are removed
    kernels = [list(k) for k in base.kernel_sizes]
    kernels[0][2] = 7
    expands = [list(e) for e in base.expand_ratios]
    expands[3][1] = 6
    other = CNNConfig(base.resolution, base.width_mult, base.depths, tuple(map(tuple, kernels)),
                      tuple(map(tuple, expands)))
    assert other != base
    assert CNN.config_hash(other) == CNN.config_hash(base)

    t = TRANSFORMER.smallest()
    t2 = TransformerConfig(t.depth, t.embed_dim, t.num_heads[:-1] + (4,), t.mlp_ratios[:-1] + (4.0,))
    assert TRANSFORMER.config_hash(t2) == TRANSFORMER.config_hash(t)


@pytest.mark.parametrize("family", SPACES)
@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.data())
def test_effective_changes_change_the_hash(family, data):
    space = SPACES[family]
    config = space.decode(data.draw(vectors(space)))
    vec = space.encode(config)
    i = data.draw(st.integers(0, space.n_var - 1))
    var = space.variables()[i]
    if len(var.options) < 2:
        return
    vec2 = vec.copy()
    vec2[i] = (vec[i] + data.draw(st.integers(1, len(var.options) - 1))) % len(var.options)
    other = space.decode(vec2)
    same_canonical = space.canonical(other) == space.canonical(config)
    assert (space.config_hash(other) == space.config_hash(config)) == same_canonical
    assert same_canonical == _ineffective(space, config, var.name, var.options[vec2[i]])


def _ineffective(space, config, name, new_value):
    """Independent statement of which single changes have no effect."""
    idx = [int(t) for t in re.findall(r"\[(\d+)\]", name)]
    if name.startswith(("kernel_sizes", "expand_ratios")):
        stage, block = idx
        if block >= config.depths[stage]:
            return True
        if name.startswith("expand_ratios"):
            return False
        size = space.block_input_sizes(config.resolution)[stage][block]
        old = config.kernel_sizes[stage][block]
        return min(old, 2 * size - 1) == min(new_value, 2 * size - 1)
    if name.startswith(("num_heads", "mlp_ratios")):
        return idx[0] >= config.depth
    return False


def test_kernel_wider_than_the_feature_map_is_canonicalised():
    # resolution 16: stem stride 2 -> 8, stage strides (1, 2, 2, 1) -> stage 2 and 3 see 4x4 and 2x2 maps
    sizes = CNN.block_input_sizes(16)
    assert [s[1] for s in sizes] == [8, 4, 2, 2]
    assert CNN.effective_kernel(7, 2) == 3 and CNN.effective_kernel(5, 3) == 5 and CNN.effective_kernel(7, 3) == 5
    assert CNN.effective_kernel(7, 4) == 7


def test_hash_is_stable_across_processes():
    config = CNN.sample(3)
    code = ("from nestnas.supernet import SearchSpace, SubnetConfig; import sys;"
            "print(SearchSpace.mobilenet().config_hash(SubnetConfig.from_json(sys.argv[1])))")
    out = subprocess.run([sys.executable, "-c", code, config.to_json()], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert out.stdout.strip() == CNN.config_hash(config)


def test_hash_is_stable_across_releases():
    # A changed hash silently invalidates every cache, profile and bundle: change it on purpose only.
    assert CNN.config_hash(CNN.largest()) == "6f2c4b19b150f3d8"
    assert TRANSFORMER.config_hash(TRANSFORMER.largest()) == "4a3268dfef06ddc3"


def test_validate_names_field_value_and_allowed():
    bad = CNNConfig(20, 1.0, (1, 1, 1, 1), CNN.smallest().kernel_sizes, CNN.smallest().expand_ratios)
    with pytest.raises(ConfigError, match=r"'resolution'.*20.*\[16, 24, 32\]"):
        CNN.validate(bad)
    data = CNN.smallest().to_dict()
    data["kernel_sizes"][2][0] = 4
    with pytest.raises(ConfigError, match=r"'kernel_sizes\[2\]\[0\]'.*4.*\[3, 5, 7\]"):
        CNN.parse(data)
    data = TRANSFORMER.smallest().to_dict()
    data["num_heads"] = data["num_heads"][:2]
    with pytest.raises(ConfigError, match="num_heads.*expected 4 layer slots"):
        TRANSFORMER.parse(data)
    with pytest.raises(ConfigError, match="does not belong"):
        CNN.validate(TRANSFORMER.smallest())


@pytest.mark.parametrize("text, message", [
    ("{not json", "malformed config JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"family": "rnn"}', "'family'.*'rnn'"),
    ('{"family": "transformer", "depth": 2}', "missing field"),
    ('{"family": "transformer", "depth": true, "embed_dim": 32, "num_heads": [2], "mlp_ratios": [2]}',
     "'depth'.*integer"),
    ('{"family": "transformer", "depth": 2, "embed_dim": 32, "num_heads": [2], "mlp_ratios": [2], "x": 1}',
     "unknown field"),
])
def test_malformed_config_json_is_refused(text, message):
    with pytest.raises(ConfigError, match=message):
        SubnetConfig.from_json(text)


def test_space_round_trips_through_json():
    for space in SPACES.values():
        back = SearchSpace.from_dict(json.loads(json.dumps(space.to_dict())))
        assert back == space and back.fingerprint() == space.fingerprint()
    with pytest.raises(ConfigError, match="ascending"):
        SearchSpace.mobilenet(kernel_choices=(5, 3))
    with pytest.raises(ConfigError, match="unknown supernet family"):
        SearchSpace.for_family("rnn")


def test_decode_refuses_out_of_range_vectors():
    with pytest.raises(ConfigError, match="out of range"):
        CNN.decode(CNN.upper_bounds() + 1)
    with pytest.raises(ConfigError, match="shape"):
        CNN.decode([0, 1])
