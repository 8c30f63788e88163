"""MAC and parameter counts of subnets: analytic (one config or many encoded ones), from a
built module (forward hooks), and from an exported ONNX graph.

Counting convention (the fvcore / thop one, shared by every function here):

* One MAC is one multiply-accumulate of a convolution, a linear (fully connected) layer or an
  attention matmul, counted **per sample** (batch 1).
  - Conv2d: ``output elements x (in_channels / groups) x kh x kw`` (a depthwise conv thus costs
    ``output elements x kh x kw``).
  - Linear: ``output elements x in_features`` (a linear layer over T tokens costs
    ``T x in x out``).
  - Attention: ``QK^T`` and ``softmax(.) x V`` each cost ``heads x T x T x head_dim``.
* Not counted: biases, normalisation (BatchNorm, LayerNorm), activations, softmax, the attention
  scale, pooling / token means, residual and positional-embedding additions, reshapes.
* Parameters are the trainable tensors of the extracted static module:
  ``sum(p.numel() for p in net.extract(config).parameters())`` -- conv and linear weights,
  biases, BatchNorm and LayerNorm weight and bias (BatchNorm running statistics are buffers
  and not counted), and the learned positional embedding.

Analytic counts are taken on ``space.canonical(config)``, the form `extract` builds: blocks the
depth choice removes contribute nothing, and a depthwise kernel is reduced to the smallest
kernel choice that computes the same function at that block's input resolution.

The analytic counts need the supernet's constructor spec (``net.spec()``): ``num_classes`` and
``in_channels`` for the CNN, ``num_classes``, ``num_tokens`` and ``token_dim`` for the
transformer. Left out, they take the supernet constructors' defaults.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from nestnas.errors import ArtifactError, ConfigError
from nestnas.supernet.attention import Attention
from nestnas.supernet.cnn import plan
from nestnas.supernet.config import SubnetConfig
from nestnas.supernet.space import CNNSpace, SearchSpace, TransformerSpace

__all__ = ["count_macs", "count_macs_encoded", "count_module", "onnx_macs"]

#: Stem convolution kernel of `ElasticCNN` (fixed, not a search choice).
_STEM_KERNEL = 3


# ---------------------------------------------------------------------------------------------
# Counted from a built module
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def count_module(module: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(MACs per sample, parameters) of a static module, counted with forward hooks on one
    run of `example` (batch 1 or more; MACs are divided by the batch)."""
    macs = 0

    def conv_hook(m: nn.Conv2d, inputs, out):
        nonlocal macs
        kh, kw = m.kernel_size
        macs += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, inputs, out):
        nonlocal macs
        macs += out.numel() * m.in_features

    def attention_hook(m: Attention, inputs, out):
        nonlocal macs
        b, t, _ = inputs[0].shape
        macs += 2 * b * m.num_heads * t * t * m.head_dim

    hooks = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, Attention):
            hooks.append(m.register_forward_hook(attention_hook))
    was_training = module.training
    module.eval()
    try:
        module(example)
    finally:
        for h in hooks:
            h.remove()
        module.train(was_training)
    params = sum(p.numel() for p in module.parameters())
    return macs // example.shape[0], params


# ---------------------------------------------------------------------------------------------
# Analytic counts: registry of families
# ---------------------------------------------------------------------------------------------
# family -> (scalar counter, encoded counter). A scalar counter takes (space, canonical config,
# **spec) and returns (macs, params); an encoded counter takes (space, validated index matrix,
# **spec) and returns two int64 arrays. Both declare the spec as keyword-only arguments with
# the supernet constructor's defaults.
_COUNTERS: dict[str, tuple[Callable, Callable]] = {}


def _register_counter(family: str, encoded: Callable):
    def wrap(scalar):
        _COUNTERS[family] = (scalar, encoded)
        return scalar

    return wrap


def _counters(space: Any) -> tuple[Callable, Callable]:
    if not isinstance(space, SearchSpace):
        raise ConfigError(f"expected a SearchSpace, got {type(space).__name__}")
    if space.family not in _COUNTERS:
        raise ConfigError(f"no analytic MAC count for family {space.family!r}; allowed: {sorted(_COUNTERS)}")
    return _COUNTERS[space.family]


def _check_spec(fn: Callable, family: str, spec: dict[str, Any]) -> dict[str, int]:
    allowed = {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}
    extra = sorted(set(spec) - set(allowed))
    if extra:
        raise ConfigError(f"unknown spec field(s) {extra} for family {family!r}; allowed: {sorted(allowed)}")
    out = {**allowed, **spec}
    for name, value in out.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ConfigError(f"spec field {name!r}: expected a positive integer, got {value!r}")
        out[name] = int(value)
    return out


def count_macs(space: SearchSpace, config: SubnetConfig, **spec: int) -> tuple[int, int]:
    """Analytic (MACs per sample, parameters) of the subnet `config` of `space`, without
    building it. `spec` is the supernet's constructor spec (``net.spec()``). Equals
    ``count_module(net.extract(config), example)`` and the parameter count of the extracted
    module exactly. Raises `ConfigError` if `config` is not in `space`."""
    scalar, _ = _counters(space)
    spec = _check_spec(scalar, space.family, spec)
    return scalar(space, space.canonical(config), **spec)


def count_macs_encoded(space: SearchSpace, X: np.ndarray, **spec: int) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised `count_macs` over integer-encoded configs: `X` has one row per config
    (``space.encode(config)``, shape ``(n, space.n_var)``). Returns int64 arrays of MACs and
    parameters per row. Canonicalisation (removed blocks, effective kernels) happens inside
    the vectorised code; the only Python loops run over variables and block slots, never over
    rows. Per-slot lookup tables are cached per (space, spec)."""
    _, encoded = _counters(space)
    spec = _check_spec(encoded, space.family, spec)
    X = _check_encoded(space, X)
    return encoded(space, X, **spec)



def _check_encoded(space: SearchSpace, X: Any) -> np.ndarray:
    X = np.asarray(X)
    n_var = space.n_var
    if X.ndim != 2 or X.shape[1] != n_var:
        raise ConfigError(f"encoded configs must have shape (n, {n_var}), got {X.shape}")
    if X.dtype.kind not in "iu":
        if X.dtype.kind == "f" and X.size and np.all(np.isfinite(X)) and np.all(X == np.round(X)):
            X = X.astype(np.int64)
        elif X.size:
            raise ConfigError(f"encoded configs must be integer indices, got dtype {X.dtype}")
        else:
            X = X.astype(np.int64)
    X = X.astype(np.int64, copy=False)
    if X.size:
        upper = space.upper_bounds()
        bad = (X < 0) | (X > upper)
        if bad.any():
            row, col = (int(v) for v in np.argwhere(bad)[0])
            var = space.variables()[col]
            raise ConfigError(
                f"encoded variable {var.name!r} (row {row}): index {int(X[row, col])} out of range "
                f"0..{len(var.options) - 1}"
            )
    return X


# ---------------------------------------------------------------------------------------------
# CNN family
# ---------------------------------------------------------------------------------------------
def _out_size(size: int, stride: int) -> int:
    """Spatial size after an odd-kernel conv with padding k // 2."""
    return (size - 1) // stride + 1


def _cnn_block(c_in: int, hidden: int, c_out: int, kernel: int, size_in: int, stride: int) -> tuple[int, int]:
    """(MACs, params) of one inverted residual block (1x1 expand, kxk depthwise, 1x1 project,
    each followed by a BatchNorm with weight and bias)."""
    size_out = _out_size(size_in, stride)
    macs = (size_in * size_in * hidden * c_in                # expand 1x1
            + size_out * size_out * hidden * kernel * kernel  # depthwise kxk
            + size_out * size_out * c_out * hidden)          # project 1x1
    params = hidden * c_in + 2 * hidden + hidden * kernel * kernel + 2 * hidden + c_out * hidden + 2 * c_out
    return macs, params


def _cnn_fixed(space: CNNSpace, resolution: int, width_mult: float, num_classes: int,
               in_channels: int) -> tuple[int, int]:
    """(MACs, params) of the stem, head conv and classifier (all choices but blocks)."""
    stem, stage_channels, head = space.channels(width_mult)
    size = _out_size(resolution, space.stem_stride)
    macs = size * size * stem * in_channels * _STEM_KERNEL**2
    params = stem * in_channels * _STEM_KERNEL**2 + 2 * stem
    for st in space.stages:
        size = _out_size(size, st.stride)
    c_last = stage_channels[-1]
    macs += size * size * head * c_last + head * num_classes
    params += head * c_last + 2 * head + head * num_classes + num_classes
    return macs, params


def _cnn_encoded(space: CNNSpace, X: np.ndarray, *, num_classes: int = 10,
                 in_channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    fixed, slots = _cnn_tables(space, num_classes, in_channels)
    r, w = X[:, 0], X[:, 1]
    macs = fixed[0][r, w].copy()
    params = fixed[1][r, w].copy()
    n_stages = len(space.stages)
    col = 2 + n_stages
    for i, st in enumerate(space.stages):
        depth = np.asarray(st.depth_choices, dtype=np.int64)[X[:, 2 + i]]
        for b in range(st.max_depth):
            k, e = X[:, col], X[:, col + 1]
            col += 2
            active = depth > b
            t_macs, t_params = slots[i][b]
            macs += np.where(active, t_macs[r, w, k, e], 0)
            params += np.where(active, t_params[r, w, k, e], 0)
    return macs, params


@_register_counter("cnn", _cnn_encoded)
def _cnn_scalar(space: CNNSpace, config, *, num_classes: int = 10, in_channels: int = 1) -> tuple[int, int]:
    p = plan(space, config)
    sizes = space.block_input_sizes(config.resolution)
    macs, params = _cnn_fixed(space, config.resolution, config.width_mult, num_classes, in_channels)
    for bp in p.blocks:
        stride = space.stages[bp.stage].stride if bp.index == 0 else 1
        m, q = _cnn_block(bp.in_channels, bp.hidden, bp.out_channels, bp.kernel, sizes[bp.stage][bp.index], stride)
        macs, params = macs + m, params + q
    return macs, params


@functools.lru_cache(maxsize=64)
def _cnn_tables(space: CNNSpace, num_classes: int, in_channels: int):
    """Lookup tables indexed by encoded choices: the fixed part by (resolution, width), and
    each block slot by (resolution, width, kernel, expand) with the effective (canonical)
    kernel at that slot's input size already applied. Loops run over options, not configs."""
    res, widths = space.resolution_choices, space.width_choices
    kernels, expands = space.kernel_choices, space.expand_choices
    fixed = np.zeros((2, len(res), len(widths)), dtype=np.int64)
    for a, r in enumerate(res):
        for c, wm in enumerate(widths):
            fixed[:, a, c] = _cnn_fixed(space, r, wm, num_classes, in_channels)
    sizes = [space.block_input_sizes(r) for r in res]
    channels = [space.channels(wm) for wm in widths]
    slots = []
    for i, st in enumerate(space.stages):
        per_stage = []
        for b in range(st.max_depth):
            shape = (len(res), len(widths), len(kernels), len(expands))
            t_macs, t_params = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
            stride = st.stride if b == 0 else 1
            for a in range(len(res)):
                size = sizes[a][i][b]
                for c, (stem, stage_ch, _) in enumerate(channels):
                    c_in = (stem if i == 0 else stage_ch[i - 1]) if b == 0 else stage_ch[i]
                    for f, k in enumerate(kernels):
                        k_eff = space.effective_kernel(k, size)
                        for g, e in enumerate(expands):
                            hidden = space.hidden_channels(c_in, e)
                            t_macs[a, c, f, g], t_params[a, c, f, g] = _cnn_block(
                                c_in, hidden, stage_ch[i], k_eff, size, stride)
            per_stage.append((t_macs, t_params))
        slots.append(per_stage)
    return (fixed[0], fixed[1]), slots


# ---------------------------------------------------------------------------------------------
# Transformer family
# ---------------------------------------------------------------------------------------------
def _tf_fixed(embed: int, num_classes: int, num_tokens: int, token_dim: int) -> tuple[int, int]:
    """Token embedding (Linear with bias), positional embedding, final LayerNorm, head."""
    macs = num_tokens * token_dim * embed + embed * num_classes
    params = (token_dim * embed + embed) + num_tokens * embed + 2 * embed + (embed * num_classes + num_classes)
    return macs, params


def _tf_layer(embed: int, heads: int, head_dim: int, hidden: int, num_tokens: int) -> tuple[int, int]:
    """One pre-norm encoder layer: LayerNorm, fused qkv Linear, QK^T and AV, proj Linear,
    LayerNorm, Linear-GELU-Linear MLP."""
    inner = heads * head_dim
    t = num_tokens
    macs = (t * embed * 3 * inner        # qkv
            + 2 * heads * t * t * head_dim  # QK^T and AV
            + t * inner * embed          # proj
            + t * embed * hidden         # fc1
            + t * hidden * embed)        # fc2
    params = (2 * embed + embed * 3 * inner + 3 * inner + inner * embed + embed
              + 2 * embed + embed * hidden + hidden + hidden * embed + embed)
    return macs, params


def _tf_encoded(space: TransformerSpace, X: np.ndarray, *, num_classes: int = 10, num_tokens: int = 8,
                token_dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    fixed, layer = _tf_tables(space, num_classes, num_tokens, token_dim)
    e = X[:, 1]
    macs, params = fixed[0][e].copy(), fixed[1][e].copy()
    depth = np.asarray(space.depth_choices, dtype=np.int64)[X[:, 0]]
    for i in range(space.max_depth):
        h, m = X[:, 2 + 2 * i], X[:, 3 + 2 * i]
        active = depth > i
        macs += np.where(active, layer[0][e, h, m], 0)
        params += np.where(active, layer[1][e, h, m], 0)
    return macs, params


@_register_counter("transformer", _tf_encoded)
def _tf_scalar(space: TransformerSpace, config, *, num_classes: int = 10, num_tokens: int = 8,
               token_dim: int = 8) -> tuple[int, int]:
    e = config.embed_dim
    macs, params = _tf_fixed(e, num_classes, num_tokens, token_dim)
    for i in range(config.depth):
        hidden = space.mlp_hidden(e, config.mlp_ratios[i])
        m, q = _tf_layer(e, config.num_heads[i], space.head_dim, hidden, num_tokens)
        macs, params = macs + m, params + q
    return macs, params


@functools.lru_cache(maxsize=64)
def _tf_tables(space: TransformerSpace, num_classes: int, num_tokens: int, token_dim: int):
    """Fixed part by embed index; one layer by (embed, heads, mlp ratio) index (same for every
    layer slot, gated by depth). Loops run over options, not configs."""
    embeds, heads, ratios = space.embed_choices, space.head_choices, space.mlp_ratio_choices
    fixed = np.zeros((2, len(embeds)), dtype=np.int64)
    layer = np.zeros((2, len(embeds), len(heads), len(ratios)), dtype=np.int64)
    for a, e in enumerate(embeds):
        fixed[:, a] = _tf_fixed(e, num_classes, num_tokens, token_dim)
        for b, h in enumerate(heads):
            for c, r in enumerate(ratios):
                layer[:, a, b, c] = _tf_layer(e, h, space.head_dim, space.mlp_hidden(e, r), num_tokens)
    return (fixed[0], fixed[1]), (layer[0], layer[1])


# ---------------------------------------------------------------------------------------------
# Counted from an ONNX graph
# ---------------------------------------------------------------------------------------------
def onnx_macs(model: Any) -> int:
    """MACs of an exported ONNX graph (a `onnx.ModelProto` or a path), under the convention
    above, counted from the graph alone after `onnx.shape_inference.infer_shapes`.

    The graph is assumed to be exported with batch 1, so the total is the per-sample count
    (a graph exported with batch B gives B times it). Every shape involved must be static.
    Counted node types (others, e.g. Add, Softmax, normalisations, count 0):

    * ``Conv``: ``prod(output shape) x prod(weight.shape[1:])``, i.e. output elements x
      (input channels / group) x kernel taps, the weight being ``(C_out, C_in/group, kh, kw)``.
    * ``Gemm``: ``M x N x K`` for ``Y(M, N) = A(M, K) B(K, N)`` (``transA``/``transB`` honoured);
      a linear layer on a (1, in) input exports as one.
    * ``MatMul``: ``prod(output shape) x K``, K being the contracted (last) dimension of the
      first input; leading dimensions broadcast as in numpy. This one rule covers both kinds
      of MatMul a model exports: a linear layer on a (1, T, in) input becomes
      ``MatMul(x, W^T)`` with a 2-D weight initializer (``T x out x in`` MACs, the bias being a
      separate Add that is not counted), and attention becomes ``MatMul`` of two activations
      ``(1, h, T, d) x (1, h, d, T)`` for QK^T and ``(1, h, T, T) x (1, h, T, d)`` for AV
      (``h x T x T x d`` MACs each). Whether an operand is a weight or an activation does not
      matter; only the shapes do.

    Local functions are inlined first. Nodes inside control-flow subgraphs (If, Loop) are not
    counted. Raises `ArtifactError` if a counted node's shapes cannot be inferred statically.
    """
    import onnx
    import onnx.inliner
    import onnx.shape_inference

    if isinstance(model, (str, os.PathLike)):
        try:
            model = onnx.load(os.fspath(model))
        except Exception as exc:  # noqa: BLE001 -- any load failure is a bad artifact
            raise ArtifactError(f"cannot read ONNX model {os.fspath(model)!r}: {exc}") from None
    if not isinstance(model, onnx.ModelProto):
        raise ArtifactError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    graph = model.graph

    shapes: dict[str, list[int | None]] = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                               for d in vi.type.tensor_type.shape.dim]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    shapes[node.output[0]] = list(attr.t.dims)

    def shape(node, name: str) -> list[int]:
        s = shapes.get(name)
        if s is None or any(d is None for d in s):
            raise ArtifactError(
                f"ONNX node {node.name or node.op_type!r} ({node.op_type}): shape of {name!r} is not static "
                f"after shape inference ({s}); export with fixed input shapes"
            )
        return s

    total = 0
    for node in graph.node:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            continue
        if op == "Conv":
            out, w = shape(node, node.output[0]), shape(node, node.input[1])
            total += int(np.prod(out, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
        elif op == "Gemm":
            a, out = shape(node, node.input[0]), shape(node, node.output[0])
            trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
            k = a[0] if trans_a else a[1]
            total += int(np.prod(out, dtype=np.int64)) * k
        elif op == "MatMul":
            a, out = shape(node, node.input[0]), shape(node, node.output[0])
            total += int(np.prod(out, dtype=np.int64)) * a[-1]
    return total
