"""What exporting a dynamic network's segment needs beyond `export_onnx`, so that the graph runs on
both ONNX Runtime and TVM and equals torch (see `DynamicProgram.save`):

* recurrent layers (`nn.LSTM`, `nn.GRU`; their cells too, for one code path) are traced as their
  gate equations with static slices, since the exporter writes them as ONNX ``LSTM``/``GRU``
  nodes, which TVM's Relax ONNX frontend does not import (a decoding step is one cell call, so
  nothing is lost by unrolling);
* the fused attention fast path of `nn.TransformerEncoderLayer`/`nn.MultiheadAttention`, taken
  under ``no_grad``, is turned off (``aten::_transformer_encoder_layer_fwd`` has no ONNX form);
* a zero-size constant (the empty caption a decoder starts from, ``torch.zeros(1, 0)``) is
  computed from an input instead: TVM writes it into its library as a zero-byte tensor that it
  then cannot load ("Invalid DLTensor file format"); a zero-size input (that caption, fed to the
  first decoding step) is computed the same way and not fed at all.
"""

from __future__ import annotations

import contextlib
import os
import types
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _split(t, n: int, size: int):
    # Slices of Python-int bounds: `chunk` traces into Shape-computed bounds, which leave TVM
    # without static shapes (its ArgMax importer then fails on a Linear's output).
    return [t[..., k * size:(k + 1) * size] for k in range(n)]


def _lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh, size: int):
    i, f, g, o = _split(F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh), 4, size)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _gru_step(x, h, w_ih, w_hh, b_ih, b_hh, size: int):
    r_i, z_i, n_i = _split(F.linear(x, w_ih, b_ih), 3, size)
    r_h, z_h, n_h = _split(F.linear(h, w_hh, b_hh), 3, size)
    r, z = torch.sigmoid(r_i + r_h), torch.sigmoid(z_i + z_h)
    n = torch.tanh(n_i + r * n_h)
    return (1 - z) * n + z * h


def _lstm_cell(self: nn.LSTMCell, x, hx=None):
    if hx is None:
        zeros = x.new_zeros(*x.shape[:-1], self.hidden_size)
        hx = (zeros, zeros)
    return _lstm_step(x, hx[0], hx[1], self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                      self.hidden_size)


def _gru_cell(self: nn.GRUCell, x, hx=None):
    if hx is None:
        hx = x.new_zeros(*x.shape[:-1], self.hidden_size)
    return _gru_step(x, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, self.hidden_size)


def _rnn(self: nn.LSTM | nn.GRU, x, hx=None):
    """A unidirectional, unprojected `nn.LSTM`/`nn.GRU` (eval mode) unrolled over its static length."""
    lstm = isinstance(self, nn.LSTM)
    unbatched = x.dim() == 2
    x = x.unsqueeze(1) if unbatched else x.transpose(0, 1) if self.batch_first else x
    if hx is None:
        zeros = x.new_zeros(self.num_layers, x.shape[1], self.hidden_size)
        hx = (zeros, zeros) if lstm else zeros
    elif unbatched:
        hx = tuple(t.unsqueeze(1) for t in hx) if lstm else hx.unsqueeze(1)
    hs, cs = [], []
    for layer in range(self.num_layers):
        weights = [getattr(self, f"{w}_l{layer}", None) for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        h = hx[0][layer] if lstm else hx[layer]
        c = hx[1][layer] if lstm else None
        steps = []
        for t in range(x.shape[0]):
            if lstm:
                h, c = _lstm_step(x[t], h, c, *weights, self.hidden_size)
            else:
                h = _gru_step(x[t], h, *weights, self.hidden_size)
            steps.append(h)
        x = torch.stack(steps)
        hs.append(h)
        cs.append(c)
    h_n = torch.stack(hs)
    state = (h_n, torch.stack(cs)) if lstm else h_n
    if unbatched:
        return x.squeeze(1), tuple(t.squeeze(1) for t in state) if lstm else state.squeeze(1)
    return (x.transpose(0, 1) if self.batch_first else x), state


def _unrollable(m: nn.Module) -> bool:
    if isinstance(m, (nn.LSTMCell, nn.GRUCell)):
        return True
    return isinstance(m, (nn.LSTM, nn.GRU)) and not m.bidirectional and not getattr(m, "proj_size", 0)


@contextlib.contextmanager
def exportable(model: nn.Module) -> Iterator[None]:
    """While exporting a segment of `model`: recurrent layers run as their gate equations (traced
    into plain MatMul/Sigmoid/Tanh nodes), and the attention fast path is off. Restored after."""
    patched = []
    for m in model.modules():
        if _unrollable(m) and "forward" not in vars(m):
            fn = _lstm_cell if isinstance(m, nn.LSTMCell) else _gru_cell if isinstance(m, nn.GRUCell) else _rnn
            m.forward = types.MethodType(fn, m)
            patched.append(m)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m in patched:
            del m.forward


def no_empty_tensors(path: str | os.PathLike) -> bool:
    """Rewrite the ONNX file at `path` so that no constant and no graph input is zero-size; whether
    anything changed. An empty input carries nothing but its (static) shape, so the runtimes are
    not fed it (TVM refuses an empty array's address as unaligned).

    Each becomes an empty slice of a non-empty graph input, cast and broadcast to its shape: a
    value computed from constants alone would be folded back into a zero-size constant by TVM."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(os.fspath(path))
    graph = proto.graph
    weights = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in weights]
    empty_inputs = [v for v in inputs if 0 in _static_shape(v)]
    source = next((v.name for v in inputs if v not in empty_inputs), None)
    empty_inits = [t for t in graph.initializer if numpy_helper.to_array(t).size == 0]
    if not empty_inits and not empty_inputs and not any(_empty_constant(n) is not None for n in graph.node):
        return False

    def const(name: str, value: np.ndarray):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value))

    def fill(name: str, shape: tuple[int, ...], dtype: int) -> list:
        shape = np.array(shape, np.int64)
        if source is None:  # nothing to compute from
            return [const(name + "__shape", shape),
                    helper.make_node("ConstantOfShape", [name + "__shape"], [name], value=numpy_helper.from_array(
                        np.zeros(1, helper.tensor_dtype_to_np_dtype(dtype))))]
        axis = int(np.flatnonzero(shape == 0)[0])
        p = name + "__empty"
        return [const(p + "_flat", np.array([-1], np.int64)), const(p + "_zero", np.array([0], np.int64)),
                const(p + "_axes", np.array([a for a in range(len(shape)) if a != axis], np.int64)),
                const(p + "_shape", shape),
                helper.make_node("Reshape", [source, p + "_flat"], [p + "_1"]),
                helper.make_node("Slice", [p + "_1", p + "_zero", p + "_zero"], [p + "_2"]),
                helper.make_node("Cast", [p + "_2"], [p + "_3"], to=dtype),
                *([helper.make_node("Unsqueeze", [p + "_3", p + "_axes"], [p + "_4"])] if len(shape) > 1 else []),
                helper.make_node("Expand", [p + "_4" if len(shape) > 1 else p + "_3", p + "_shape"], [name])]

    nodes = []
    for v in empty_inputs:
        nodes += fill(v.name, _static_shape(v), v.type.tensor_type.elem_type)
        graph.input.remove(v)
    for t in empty_inits:
        nodes += fill(t.name, tuple(t.dims), t.data_type)
        graph.initializer.remove(t)
        for v in list(graph.input):
            if v.name == t.name:
                graph.input.remove(v)
    for node in graph.node:
        array = _empty_constant(node)
        nodes += [node] if array is None else fill(node.output[0], array.shape,
                                                   helper.np_dtype_to_tensor_dtype(array.dtype))
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(proto, os.fspath(path))
    return True


def _static_shape(value) -> tuple[int, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim)


def _empty_constant(node) -> np.ndarray | None:
    from onnx import numpy_helper

    if node.op_type != "Constant":
        return None
    value = next((a.t for a in node.attribute if a.name == "value"), None)
    array = numpy_helper.to_array(value) if value is not None else None
    return array if array is not None and array.size == 0 else None
