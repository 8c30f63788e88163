"""Dynamic networks to static subgraphs plus a host module (DyCL's idea, rebuilt on ONNX Runtime
and TVM Relax).

A compiler traces one path through a network. `rewrite` instead reads the source of the model's
`forward` and splits it at its decision points:

* every maximal run of tensor statements becomes a *segment*: a branch-free function of the
  tensors it reads, exported to ONNX (and compiled with TVM) once per specialisation, i.e. per
  value of the host scalars it uses (a loop index, the expert an argmax chose, a picked subnet)
  and per input shape;
* everything else (``if``/``while``/``for``/``return``/``break``, scalar bookkeeping, shape
  tests) stays in a generated *host function*, Python source that needs only numpy. A condition
  on tensors (``if p.max() > t``) is computed inside the preceding segment as a boolean output and
  tested by the host.

Why source rewriting and not FX, ``torch.export`` with ``torch.cond``, or Dynamo graph breaks:
FX and ``torch.export`` refuse data-dependent Python control flow (the user would have to rewrite
it with ``torch.cond``, and loops with ``break`` have no such form); Dynamo splits at graph breaks
but the glue it produces is CPython bytecode that needs torch at run time. Rewriting the AST, as
DyCL did, keeps the user's control flow exactly, costs nothing at run time beyond a Python
``if``, and leaves a host module that can be read, shipped and run without torch.

The work is split by job: `dynamic_analysis` reads the forward and gives every name a kind,
`dynamic_rewrite` cuts it into segments and the host function, `dynamic_host` is the runtime that
a saved program ships as ``host.py`` (and that nestnas runs to check what it saves), and
`dynamic_program` records, saves and loads programs.

The model is run eagerly on the example inputs through the same host function (its subgraph
calls executed by torch), which records every specialisation that must be compiled and which
side of every branch was taken. Branches never taken are reported, since their subgraphs cannot
be compiled; a specialisation met later that was never compiled is a clear error, not a guess.

Supported: ``if``/``elif``/``else`` and ``while`` on tensor or host conditions (``and``, ``or``,
``not`` and chained comparisons on tensors included; a host guard such as ``r is not None and
t.sum() > 0`` short-circuits as in Python), ``for`` over ``range``, host sequences,
``nn.ModuleList`` (also with ``enumerate``) and dicts of modules (keys, ``.items()``,
``.values()``), ``break``/``continue``, early ``return``, ``raise`` in input checks, ``with
torch.no_grad():``, indexing a ``ModuleList`` with a tensor (``self.experts[e]`` after an argmax),
``getattr(self, name)`` with a computed name, ``.item()``/``float()``/``bool()``/``.data`` on
tensors, in-place updates (``t += u``, ``t.add_(u)``, ``seq[:, t] = w``), Python lists of tensors
(appended by the host, stacked or concatenated in a subgraph specialised on their length), and
tuples of tensors or None between subgraphs (an LSTM's state). Facts of the model's structure
(``len(self.layers)``, ``len(self.blocks[g])``, ``hasattr``, ``"b0" in self.blocks``, flags and
lists set in ``__init__``, a buffer's shape, ``self.training``) are written into the host code as
constants, and branches on them alone are decided before anything is split. Tensor statements
whose results nothing reads are removed. Refused with the source line and what to write instead:
iterating over a tensor, conditional expressions (``a if t else b``) and comprehensions on
tensors, assigning tensors into Python containers, state kept on ``self``, ``try``, loops with
``else``, and closures over local functions.
"""

from __future__ import annotations

import builtins
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from nestnas.compile.dynamic_analysis import RewriteError, read_forward
from nestnas.compile.dynamic_program import CoverageWarning, DynamicProgram, as_tensor, load_dynamic
from nestnas.compile.dynamic_rewrite import Rewriter, host_source
from nestnas.errors import ConfigError


def logical_and(*values: Any) -> torch.Tensor:
    out = as_tensor(values[0]).bool()
    for v in values[1:]:
        out = torch.logical_and(out, as_tensor(v))
    return out


def logical_or(*values: Any) -> torch.Tensor:
    out = as_tensor(values[0]).bool()
    for v in values[1:]:
        out = torch.logical_or(out, as_tensor(v))
    return out


def logical_not(value: Any) -> torch.Tensor:
    return torch.logical_not(as_tensor(value))


def rewrite(model: nn.Module, examples: Sequence[Any], *, method: str = "forward") -> DynamicProgram:
    """Split `model`'s `forward` at its decision points into static subgraphs and a host function,
    then run it eagerly on `examples` (each a tuple of positional arguments, or a single tensor)
    to record the subgraphs to compile and the branches taken. Warns (CoverageWarning) when a
    branch was never taken. Save with `DynamicProgram.save`, load with `load_dynamic`."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"rewrite needs a torch.nn.Module, got {type(model).__name__}")
    examples = [e if isinstance(e, tuple) else (e,) for e in examples]
    if not examples:
        raise ConfigError("give at least one example input")
    model.eval()  # branches on self.training are decided as the model will run
    forward = read_forward(model, examples, method)
    rw = Rewriter(model, forward.src, forward.fn, forward.kinds)
    body = rw.block(forward.fn.body)
    host = host_source(forward.fn, body, model, forward.src)
    namespace = forward.namespace  # the model's globals: segments call torch, F, ... as forward did
    namespace.update({"_as_tensor": as_tensor, "_logical_and": logical_and, "_logical_or": logical_or,
                      "_logical_not": logical_not, "__builtins__": builtins})
    for seg in rw.segments.values():
        exec(compile(seg.source, f"<nestnas segment {seg.id}>", "exec"), namespace)  # noqa: S102 - our own code
    program = DynamicProgram(model, rw.segments, host, rw.branches, namespace, forward.src)
    for e in examples:
        program.eager(*e)
    missing = program.untaken()
    if missing:
        warnings.warn("the example inputs did not reach every branch, so these have no compiled subgraphs: "
                      + "; ".join(missing), CoverageWarning, stacklevel=2)
    return program


__all__ = ["CoverageWarning", "DynamicProgram", "RewriteError", "load_dynamic", "rewrite"]
