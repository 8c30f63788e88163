import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nestnas.compile import (
    DEFAULT_OPSET,
    Measurement,
    get_backend,
    get_runner,
    median_ci_ranks,
    onnx_input_shape,
    onnx_opset,
)
from nestnas.compile.onnx_export import export_onnx
from nestnas.errors import ArtifactError, ConfigError, ProfileError
from nestnas.supernet import ElasticCNN, ElasticTransformer
from nestnas.supernet.evaluate import recalibrate_bn

ATOL = 1e-4


def _inputs(shape, gen, batch=1):
    """Images are smooth (upsampled 4x4 noise): the pooled features of white noise barely vary
    between samples, and a parity check on near-constant outputs would prove little."""
    shape = (batch, *shape[1:])
    if len(shape) == 4:
        return F.interpolate(torch.randn(*shape[:2], 4, 4, generator=gen), size=shape[2:], mode="bilinear")
    return torch.randn(shape, generator=gen)


@pytest.fixture(scope="module", params=["cnn", "transformer"])
def family(request):
    """Three subnets (largest, smallest, random) of a family, each with an input and torch's output."""
    torch.manual_seed(0)
    net = ElasticCNN() if request.param == "cnn" else ElasticTransformer()
    space, gen = net.space, torch.Generator().manual_seed(2)
    cases = {}
    for name, config in {"largest": space.largest(), "smallest": space.smallest(), "random": space.sample(3)}.items():
        shape = net.input_shape(config)
        with torch.no_grad():
            module = recalibrate_bn(net.extract(config), [_inputs(shape, gen, batch=16) for _ in range(2)])
            x = _inputs(shape, gen)
            ref, other = module(x).numpy(), module(_inputs(shape, gen)).numpy()
        assert np.abs(ref - other).max() > 100 * ATOL, "outputs must depend on the input"
        cases[name] = (module, x, ref)
    return cases


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_onnxruntime_matches_torch(family, exporter):
    backend = get_backend("onnxruntime", threads=1, exporter=exporter)
    for name, (module, x, ref) in family.items():
        compiled = backend.build(module, x)
        assert compiled.backend == "onnxruntime" and compiled.input_shape == tuple(x.shape)
        np.testing.assert_allclose(compiled(x.numpy()), ref, rtol=0, atol=ATOL, err_msg=name)


@pytest.mark.tvm
def test_tvm_matches_torch(family):
    backend = get_backend("tvm", threads=1, exporter="torchscript")
    for name in ("smallest", "random"):
        module, x, ref = family[name]
        compiled = backend.build(module, x)
        assert compiled.backend == "tvm" and compiled.input_shape == tuple(x.shape)
        np.testing.assert_allclose(compiled(x.numpy()), ref, rtol=0, atol=ATOL, err_msg=name)


@pytest.mark.tvm
def test_tvm_fingerprint_names_target():
    fp = get_backend("tvm", threads=1).fingerprint()
    assert fp["backend"] == "tvm" and fp["threads"] == 1 and '"num-cores":1' in fp["target"]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_passes_full_checker(family, exporter, tmp_path):
    module, x, _ = family["random"]
    path = export_onnx(module, x, tmp_path / "model.onnx", exporter=exporter)
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["logits"]
    assert onnx_input_shape(path) == tuple(x.shape) and onnx_opset(path) == DEFAULT_OPSET
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary left behind


def test_dynamo_gelu_is_fused_by_onnxruntime(tmp_path):
    import collections

    import onnxruntime as ort

    def ops(path):
        return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)

    torch.manual_seed(0)
    net = ElasticTransformer().eval()
    config = net.space.sample(3)
    module, x = net.extract(config), torch.randn(net.input_shape(config, 2))
    path = export_onnx(module, x, tmp_path / "model.onnx", exporter="dynamo")
    assert ops(path)["Erf"] == config.depth  # the file keeps standard ops (TVM reads it)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = ops(tmp_path / "optimized.onnx")
    assert optimized["Gelu"] == config.depth and "Erf" not in optimized
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], module(x).detach().numpy(), rtol=0,
                               atol=ATOL)


class _Broken(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom\nsecond line")


def test_failed_export_is_one_line_and_leaves_no_file(tmp_path):
    with pytest.raises(ArtifactError, match=r"^ONNX export \(torchscript\) of _Broken failed: boom$"):
        export_onnx(_Broken().eval(), torch.zeros(1, 4), tmp_path / "m.onnx", exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_training_mode_and_unknown_exporter(tmp_path):
    with pytest.raises(ConfigError, match="training mode"):
        export_onnx(nn.Linear(4, 2), torch.zeros(1, 4), tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match=r"unknown ONNX exporter 'jit'; allowed: \['dynamo', 'torchscript'\]"):
        export_onnx(nn.Linear(4, 2).eval(), torch.zeros(1, 4), tmp_path / "m.onnx", exporter="jit")


def test_unknown_backend_lists_allowed():
    with pytest.raises(ConfigError, match=r"^unknown backend 'nope'; allowed: \['onnxruntime', 'tvm'\]$"):
        get_backend("nope")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['fast'\] for backend 'onnxruntime'"):
        get_backend("onnxruntime", fast=True)
    with pytest.raises(ConfigError, match="threads must be a positive integer"):
        get_backend("onnxruntime", threads=0)
    with pytest.raises(ConfigError, match=r"unknown runner 'nope'; allowed: \["):
        get_runner("nope")


def test_compiled_model_keeps_onnx_in_workdir_and_checks_shape(tmp_path):
    backend = get_backend("onnxruntime", threads=1, exporter="torchscript")
    compiled = backend.build(nn.Linear(4, 2).eval(), torch.zeros(1, 4), workdir=tmp_path)
    assert compiled.onnx_path == tmp_path / "model.onnx" and compiled.onnx_path.exists()
    assert set(compiled.build_seconds) == {"export", "compile"}
    assert backend.fingerprint()["intra_op_threads"] == 1
    with pytest.raises(ConfigError, match=r"input of shape \(2, 4\) does not fit"):
        compiled(np.zeros((2, 4), np.float32))
    with pytest.raises(ConfigError, match="runner 'tvm' cannot time a OrtModel"):
        get_runner("tvm").measure(compiled, np.zeros((1, 4), np.float32))
    m = get_runner("onnxruntime", max_seconds=0.5).measure(compiled, np.zeros((1, 4), np.float32))
    assert m.median_ms > 0 and m.repeats >= 20


# --- measurement statistics -----------------------------------------------------------------


def _busy(ms):
    """A deterministic workload: spin for exactly `ms` of wall time."""

    def run(_x):
        end = time.perf_counter() + ms / 1e3
        while time.perf_counter() < end:
            pass

    return run


@pytest.mark.parametrize("ms", [2.0, 0.05])
def test_runner_is_stable_on_a_fixed_workload(ms):
    m = get_runner("callable", max_seconds=2.0).measure(_busy(ms), None)
    assert m.stable and m.attempts == 1 and m.repeats >= 20
    assert abs(m.median_ms - ms) <= 0.1 * ms
    assert m.p10_ms <= m.median_ms <= m.p90_ms and m.rel_ci <= 0.02
    assert (m.calls_per_sample > 1) == (ms < 0.2)  # short calls are batched per timed sample


def test_runner_flags_a_noisy_workload_after_two_attempts():
    rng = np.random.default_rng(0)

    def noisy(_x):
        time.sleep(rng.exponential(1e-3))  # std = mean: the median's CI cannot reach 2% in 0.1 s

    m = get_runner("callable", max_seconds=0.1).measure(noisy, None)
    assert not m.stable and m.attempts == 2 and m.rel_ci > 0.02


def test_median_ci_ranks_match_exact_binomial():
    assert median_ci_ranks(5) is None and median_ci_ranks(6) == (0, 5)
    assert median_ci_ranks(10) == (1, 8) and median_ci_ranks(100) == (39, 60)
    for n in range(6, 80):
        lo, hi = median_ci_ranks(n)

        def cdf(k, n=n):  # P(B <= k), B ~ Binomial(n, 1/2)
            return sum(math.comb(n, i) for i in range(k + 1)) / 2**n

        assert hi == n - 1 - lo
        assert 1 - 2 * cdf(lo) >= 0.95 and cdf(lo + 1) > 0.025  # covers 95%, and is the tightest that does


def test_measurement_round_trips_through_json():
    m = Measurement(1.0, 0.9, 1.2, 0.1, 5, math.inf, False, 2, 3)
    data = json.loads(json.dumps(m.to_dict(), allow_nan=False))
    assert data["rel_ci"] is None and Measurement.from_dict(data) == m
    with pytest.raises(ProfileError, match=r"lacks field\(s\) \['stable'\]"):
        Measurement.from_dict({k: v for k, v in data.items() if k != "stable"})


def test_runner_options_are_checked():
    with pytest.raises(ConfigError, match=r"runner option min_repeats=3 is not allowed; must be >= 6"):
        get_runner("callable", min_repeats=3)


# --- TVM missing ----------------------------------------------------------------------------


def test_tvm_missing_gives_install_hint(tmp_path):
    fake = tmp_path / "fake" / "tvm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('simulated: tvm is not installed')\n")
    script = textwrap.dedent("""
        import numpy as np, torch
        from nestnas.compile import get_backend
        from nestnas.errors import BackendUnavailable
        try:
            get_backend("tvm")
        except BackendUnavailable as exc:
            print("MESSAGE:", exc)
        model = get_backend("onnxruntime", threads=1, exporter="torchscript").build(
            torch.nn.Linear(4, 2).eval(), torch.zeros(1, 4))
        print("ORT:", model(np.zeros((1, 4), np.float32)).shape)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "MESSAGE: backend 'tvm' needs the tvm extra: pip install 'nestnas[tvm]'\n" in out.stdout
    assert "ORT: (1, 2)" in out.stdout


def test_interleaved_sweeps_alternate_the_order_and_keep_each_keys_index():
    from nestnas.compile.stats import interleaved_sweeps

    calls = []
    runs = interleaved_sweeps(["a", "b", "c"], lambda i, k: calls.append((i, k)) or float(len(calls)), 3)
    assert calls == [(0, "a"), (1, "b"), (2, "c"), (2, "c"), (1, "b"), (0, "a"), (0, "a"), (1, "b"), (2, "c")]
    assert runs == {"a": [1.0, 6.0, 7.0], "b": [2.0, 5.0, 8.0], "c": [3.0, 4.0, 9.0]}


def test_runner_does_not_retry_or_overwarm_a_model_too_slow_for_its_budget():
    calls = []

    def slow(_x):
        calls.append(1)
        time.sleep(0.05)

    # 0.05 s a call, 0.2 s budget: 20 repeats cannot fit; the warm-up stops at two calls (0.1 s >= 0.05 s)
    m = get_runner("callable", max_seconds=0.2, warmup=5).measure(slow, None)
    assert not m.stable and m.attempts == 1 and m.repeats < 20
    assert len(calls) == 2 + m.repeats
