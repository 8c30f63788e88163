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

The analytic counts are the family's own (`Supernet.count_macs`, `count_macs_encoded`) and need
the supernet's constructor spec (``net.spec()``, e.g. classes and input channels); fields left
out take the family constructor's defaults.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from nestnas.errors import ArtifactError, ConfigError
from nestnas.supernet.attention import Attention
from nestnas.supernet.config import SubnetConfig
from nestnas.supernet.families import family_names, supernet_class
from nestnas.supernet.space import SearchSpace

__all__ = ["count_macs", "count_macs_encoded", "count_module", "onnx_macs"]

# ---------------------------------------------------------------------------------------------
# Counted from a built module
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def count_module(module: nn.Module, example: torch.Tensor | Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(MACs per sample, parameters) of a static module, counted with forward hooks on one
    run of `example` (batch 1 or more; MACs are divided by the batch): one tensor, or a dict of
    the module's inputs in its `forward`'s order (`nestnas.supernet.inputs.example_inputs`).
    Hooks see modules only: attention computed by functions (not `nestnas.supernet.attention.Attention`,
    e.g. the hf-encoder's) is not counted; the family's analytic `count_macs` is."""
    inputs = tuple(example.values()) if isinstance(example, Mapping) else (example,)
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
        module(*inputs)
    finally:
        for h in hooks:
            h.remove()
        module.train(was_training)
    params = sum(p.numel() for p in module.parameters())
    return macs // inputs[0].shape[0], params


# ---------------------------------------------------------------------------------------------
# Analytic counts: each family counts its own subnets (`Supernet.count_macs`)
# ---------------------------------------------------------------------------------------------
def _family(space: Any):
    if not isinstance(space, SearchSpace):
        raise ConfigError(f"expected a SearchSpace, got {type(space).__name__}")
    try:
        return supernet_class(space.family)
    except ConfigError:
        raise ConfigError(f"no analytic MAC count for family {space.family!r}; allowed: {family_names()}") from None


def _check_spec(family, spec: dict[str, Any]) -> dict[str, Any]:
    """`spec` completed with the constructor's defaults; only fields whose default is an integer
    are typed (a family's spec may hold other JSON values, e.g. a model configuration)."""
    from nestnas.supernet.checkpoint import check_spec

    allowed = family.default_spec()
    extra = sorted(set(spec) - set(allowed))
    if extra:
        raise ConfigError(f"unknown spec field(s) {extra} for family {family.family!r}; allowed: {sorted(allowed)}")
    return check_spec(family, spec)


def count_macs(space: SearchSpace, config: SubnetConfig, **spec: int) -> tuple[int, int]:
    """Analytic (MACs per sample, parameters) of the subnet `config` of `space`, without
    building it. `spec` is the supernet's constructor spec (``net.spec()``; fields left out take
    the constructor's defaults). Equals ``count_module(net.extract(config), example)`` and the
    parameter count of the extracted module exactly. Raises `ConfigError` if `config` is not in
    `space`."""
    family = _family(space)
    spec = _check_spec(family, spec)
    macs, params = family.count_macs(space, space.canonical(config), spec)
    return int(macs), int(params)


def count_macs_encoded(space: SearchSpace, X: np.ndarray, **spec: int) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised `count_macs` over integer-encoded configs: `X` has one row per config
    (``space.encode(config)``, shape ``(n, space.n_var)``). Returns int64 arrays of MACs and
    parameters per row. Canonicalisation (removed blocks, effective kernels) happens inside
    the family's counter; the built-in families loop over variables and block slots, never over
    rows, with per-slot lookup tables cached per (space, spec)."""
    family = _family(space)
    spec = _check_spec(family, spec)
    X = _check_encoded(space, X)
    macs, params = family.count_macs_encoded(space, X, spec)
    return np.asarray(macs, dtype=np.int64), np.asarray(params, dtype=np.int64)


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
