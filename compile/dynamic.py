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

The model is run eagerly on the example inputs through the same host function (its subgraph
calls executed by torch), which records every specialisation that must be compiled and which
side of every branch was taken. Branches never taken are reported, since their subgraphs cannot
be compiled; a specialisation met later that was never compiled is a clear error, not a guess.

Supported: ``if``/``elif``/``else`` and ``while`` on tensor or host conditions, ``for`` over
``range``, host sequences, ``nn.ModuleList`` (also with ``enumerate``), ``break``/``continue``,
early ``return``, indexing a ``ModuleList`` with a tensor (``self.experts[e]`` after an argmax),
``.item()``/``float()``/``bool()`` on tensors. Refused with the source line: iterating over a
tensor, conditional expressions (``a if t else b``) and comprehensions on tensors, tensors kept
in Python lists, and closures over local functions.
"""

from __future__ import annotations

import ast
import builtins
import copy
import hashlib
import inspect
import io
import json
import os
import textwrap
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, Sequence

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from nestnas.compile.signing import ArtifactName, Sha256, Signature, Strict
from nestnas.errors import ArtifactError, ConfigError

TENSOR, HOST, MODULE = "tensor", "host", "module"
BACKENDS = ("onnxruntime", "tvm")
TOLERANCE = 1e-4
SHAPE_ATTRS = {"shape", "ndim", "dtype", "device"}
SHAPE_METHODS = {"size", "dim", "numel"}
STRIP_CALLS = {"float", "bool"}
HOST_FILE, MANIFEST = "host.py", "manifest.json"
HOST_NAMES = {"__run", "__bool", "__int", "__branch", "np", "math", "warnings"}
FORMAT = "nestnas-dynamic"


class RewriteError(ConfigError):
    """The model's control flow cannot be split into static subgraphs (the message names the line)."""


class CoverageWarning(UserWarning):
    """Some branches were never taken by the example inputs, so their subgraphs are missing."""


# --- analysis ------------------------------------------------------------------------------------

@dataclass
class Segment:
    id: str
    stmts: list[ast.stmt]
    inputs: list[str] = field(default_factory=list)    # tensors read
    params: list[str] = field(default_factory=list)    # host values the subgraph is specialised on
    outputs: list[str] = field(default_factory=list)   # tensors written and used later
    int_params: set[str] = field(default_factory=set)  # tensors used as a ModuleList index (host int)
    source: str = ""
    lineno: int = 0


class _Source:
    """Where the model's forward came from, for error messages."""

    def __init__(self, fn: Callable):
        lines, start = inspect.getsourcelines(fn)
        self.file = inspect.getsourcefile(fn) or "<unknown>"
        self.start = start
        self.lines = lines
        self.text = textwrap.dedent("".join(lines))

    def where(self, node: ast.AST) -> str:
        lineno = getattr(node, "lineno", 1)
        code = self.lines[lineno - 1].strip() if 0 < lineno <= len(self.lines) else ""
        return f"{self.file}:{self.start + lineno - 1}: `{code}`"


def _names_read(node: ast.AST) -> list[str]:
    return [n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]


def _targets(node: ast.AST) -> list[str]:
    out = []
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            out.append(n.id)
    return out


class _Kinds:
    """Flow-insensitive kind (tensor, host value or module) of every local name of `forward`."""

    def __init__(self, model: nn.Module, fn: ast.FunctionDef, arg_kinds: dict[str, str], src: _Source,
                 globals_: dict[str, Any]):
        self.model, self.src, self.globals = model, src, globals_
        self.kind: dict[str, str] = dict(arg_kinds)
        self.aliases: dict[str, ast.expr] = {}   # module-valued locals, inlined into segments
        for _ in range(20):
            before = dict(self.kind)
            for node in ast.walk(fn):
                if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and node.value is not None:
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    kind = self.expr(node.value)
                    if isinstance(node, ast.AugAssign):
                        kind = self.join(kind, self.expr(node.target), node)
                    for t in targets:
                        self.bind(t, kind, node)
                elif isinstance(node, ast.For):
                    self.bind_loop(node)
            if self.kind == before:
                break

    def join(self, a: str, b: str, node: ast.AST) -> str:
        if a == b:
            return a
        if MODULE in (a, b):
            raise RewriteError(f"{self.src.where(node)}: a name holds a module in one place and a value in another")
        return TENSOR

    def bind(self, target: ast.expr, kind: str, node: ast.AST) -> None:
        if isinstance(target, ast.Name):
            self.kind[target.id] = self.join(self.kind.get(target.id, kind), kind, node)
            if kind == MODULE:
                value = node.value if isinstance(node, ast.Assign) else None
                if value is not None:
                    self.aliases[target.id] = value
        elif isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                self.bind(elt, kind, node)
        elif isinstance(target, (ast.Subscript, ast.Attribute)):
            if self.expr(target.value) == TENSOR or kind == TENSOR:
                if isinstance(target, ast.Attribute) and _is_self(target.value):
                    raise RewriteError(f"{self.src.where(node)}: assigning to self.{target.attr} inside forward "
                                       "is state the compiled subgraphs cannot keep")
            if isinstance(target.value, ast.Name) and self.kind.get(target.value.id) == HOST and kind == TENSOR:
                raise RewriteError(f"{self.src.where(node)}: tensors kept in a Python container cannot be "
                                   "passed between static subgraphs; keep them in separate variables")

    def bind_loop(self, node: ast.For) -> None:
        it = node.iter
        kind = self.expr(it)
        if kind == TENSOR:
            raise RewriteError(f"{self.src.where(node)}: iterating over a tensor has no static form; "
                               "loop over range(...) or a ModuleList instead")
        if _is_call(it, "enumerate") and it.args:
            inner = self.expr(it.args[0])
            if isinstance(node.target, ast.Tuple) and len(node.target.elts) == 2:
                self.bind(node.target.elts[0], HOST, node)
                self.bind(node.target.elts[1], MODULE if inner == MODULE else inner, node)
                return
        self.bind(node.target, MODULE if kind == MODULE else HOST, node)

    def attr_value(self, node: ast.Attribute) -> Any:
        return getattr(self.model, node.attr)

    def expr(self, node: ast.expr) -> str:  # noqa: C901 - one case per expression form
        if isinstance(node, ast.Constant):
            return HOST
        if isinstance(node, ast.Name):
            if node.id in self.kind:
                return self.kind[node.id]
            return HOST
        if isinstance(node, ast.Attribute):
            if _is_self(node.value):
                if not hasattr(self.model, node.attr):
                    return HOST
                value = self.attr_value(node)
                if isinstance(value, nn.Module):
                    return MODULE
                if isinstance(value, torch.Tensor):
                    return TENSOR
                return HOST
            base = self.expr(node.value)
            if base == TENSOR:
                return HOST if node.attr in SHAPE_ATTRS else TENSOR
            return base if base == MODULE else HOST
        if isinstance(node, ast.Subscript):
            base = self.expr(node.value)
            if base == MODULE:
                return MODULE
            if base == TENSOR or self.expr(node.slice) == TENSOR and not _index_of_module(node, self):
                return TENSOR
            return HOST
        if isinstance(node, ast.Call):
            func = node.func
            args = [self.expr(a) for a in node.args] + [self.expr(k.value) for k in node.keywords]
            if isinstance(func, ast.Attribute):
                owner = self.expr(func.value)
                if owner == TENSOR:
                    return HOST if func.attr in SHAPE_METHODS else TENSOR
                if owner == MODULE:
                    return TENSOR
                if _rooted_in_global(func, self.globals):
                    return TENSOR if TENSOR in args or _is_torch(func, self.globals) else HOST
                return TENSOR if TENSOR in args else HOST
            fkind = self.expr(func)
            if fkind == MODULE:
                return TENSOR
            if isinstance(func, ast.Name) and func.id == "len":
                return HOST
            return TENSOR if TENSOR in args else HOST
        if isinstance(node, (ast.BinOp, ast.BoolOp, ast.Compare, ast.UnaryOp)):
            parts = [node.left, node.right] if isinstance(node, ast.BinOp) else \
                node.values if isinstance(node, ast.BoolOp) else \
                [node.left, *node.comparators] if isinstance(node, ast.Compare) else [node.operand]
            kinds = [self.expr(p) for p in parts]
            return TENSOR if TENSOR in kinds else HOST
        if isinstance(node, ast.IfExp):
            if self.expr(node.test) == TENSOR:
                raise RewriteError(f"{self.src.where(node)}: a conditional expression on a tensor "
                                   "(`a if t else b`) cannot be split; write it as an if statement")
            kinds = {self.expr(node.body), self.expr(node.orelse)}
            return TENSOR if TENSOR in kinds else kinds.pop()
        if isinstance(node, (ast.Tuple, ast.List)):
            kinds = [self.expr(e) for e in node.elts]
            return TENSOR if TENSOR in kinds else HOST
        if isinstance(node, (ast.ListComp, ast.GeneratorExp, ast.DictComp, ast.SetComp, ast.Lambda)):
            if any(isinstance(n, ast.Name) and self.kind.get(n.id) == TENSOR for n in ast.walk(node)):
                raise RewriteError(f"{self.src.where(node)}: comprehensions and lambdas over tensors cannot be "
                                   "split into static subgraphs; write the loop out")
            return HOST
        if isinstance(node, ast.Slice):
            kinds = [self.expr(p) for p in (node.lower, node.upper, node.step) if p is not None]
            return TENSOR if TENSOR in kinds else HOST
        if isinstance(node, (ast.JoinedStr, ast.FormattedValue, ast.Dict, ast.Set)):
            return HOST
        raise RewriteError(f"{self.src.where(node)}: unsupported expression {type(node).__name__}")


def _is_self(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


def _is_call(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name


def _root(node: ast.AST) -> ast.AST:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.value if not isinstance(node, ast.Call) else node.func
    return node


def _rooted_in_global(func: ast.Attribute, globals_: dict[str, Any]) -> bool:
    root = _root(func)
    return isinstance(root, ast.Name) and root.id in globals_


def _is_torch(func: ast.Attribute, globals_: dict[str, Any]) -> bool:
    root = _root(func)
    value = globals_.get(root.id) if isinstance(root, ast.Name) else None
    name = getattr(value, "__name__", "")
    return name == "torch" or name.startswith("torch.")


def _index_of_module(node: ast.Subscript, kinds: _Kinds) -> bool:
    return kinds.expr(node.value) == MODULE


# --- rewriting -----------------------------------------------------------------------------------

class _StripScalars(ast.NodeTransformer):
    """`t.item()`, `float(t)` and `bool(t)` keep tensors inside a subgraph (the host converts)."""

    def __init__(self, kinds: _Kinds):
        self.kinds = kinds

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.func, ast.Attribute) and node.func.attr == "item" and not node.args:
            return node.func.value
        if isinstance(node.func, ast.Name) and node.func.id in STRIP_CALLS | {"int"} and len(node.args) == 1 \
                and self.kinds.expr(node.args[0]) == TENSOR:
            return node.args[0]
        return node


class _InlineAliases(ast.NodeTransformer):
    def __init__(self, aliases: dict[str, ast.expr]):
        self.aliases = aliases

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if isinstance(node.ctx, ast.Load) and node.id in self.aliases:
            return copy.deepcopy(self.aliases[node.id])
        return node


class _HostExpr(ast.NodeTransformer):
    """Host expressions run on numpy: `t.size(d)` -> `t.shape[d]`, `t.dim()` -> `t.ndim`, and
    constant attributes of the model are written in as literals."""

    def __init__(self, model: nn.Module, src: _Source):
        self.model, self.src = model, src

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.func, ast.Attribute) and node.func.attr == "size":
            shape = ast.Attribute(node.func.value, "shape", ast.Load())
            return ast.Subscript(shape, node.args[0], ast.Load()) if node.args else shape
        if isinstance(node.func, ast.Attribute) and node.func.attr == "dim" and not node.args:
            return ast.Attribute(node.func.value, "ndim", ast.Load())
        return node

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        if _is_self(node.value):
            value = getattr(self.model, node.attr)
            if not _literal(value):
                raise RewriteError(f"{self.src.where(node)}: the host code needs self.{node.attr} "
                                   f"({type(value).__name__}), which cannot be written into a module without torch")
            return ast.parse(repr(value), mode="eval").body
        self.generic_visit(node)
        return node


def _literal(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_literal(v) for v in value)
    if isinstance(value, dict):
        return all(_literal(k) and _literal(v) for k, v in value.items())
    return False


class _Rewriter:
    def __init__(self, model: nn.Module, src: _Source, fn: ast.FunctionDef, kinds: _Kinds):
        self.model, self.src, self.fn, self.kinds = model, src, fn, kinds
        self.segments: dict[str, Segment] = {}
        self.branches: dict[int, str] = {}   # branch id -> where
        self.counter = 0
        self.read_anywhere: dict[str, int] = {}
        for n in ast.walk(fn):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
                self.read_anywhere[n.id] = self.read_anywhere.get(n.id, 0) + 1

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"__{prefix}{self.counter}"

    def is_tensor_stmt(self, stmt: ast.stmt) -> bool:
        if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            names = [n for t in targets for n in _targets(t)]
            if names and all(self.kinds.kind.get(n) == MODULE for n in names):
                return False
            if any(self.kinds.kind.get(n) == TENSOR for n in names):
                return True
            if any(not isinstance(t, ast.Name) and self.kinds.expr(t) == TENSOR for t in targets):
                return True
            return stmt.value is not None and self.kinds.expr(stmt.value) == TENSOR
        if isinstance(stmt, ast.Expr):
            return self.kinds.expr(stmt.value) == TENSOR
        return False

    def block(self, stmts: list[ast.stmt]) -> list[ast.stmt]:
        out: list[ast.stmt] = []
        pending: list[ast.stmt] = []

        def flush() -> None:
            if pending:
                out.extend(self.segment(list(pending)))
                pending.clear()

        for stmt in stmts:
            if self.is_tensor_stmt(stmt):
                if self.indexes_with(stmt, pending):
                    flush()  # the index must reach the host as an int before the module is chosen
                pending.append(stmt)
                continue
            if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and all(
                    self.kinds.kind.get(n) == MODULE for t in (stmt.targets if isinstance(stmt, ast.Assign)
                                                              else [stmt.target]) for n in _targets(t)):
                continue  # module alias: inlined where used
            if isinstance(stmt, ast.If):
                test, pre = self.condition(stmt.test, stmt)
                pending.extend(pre)
                flush()
                bid = self.branch(stmt)
                new = ast.If(test=self.host_call("__branch", [ast.Constant(bid), test]),
                             body=self.block(stmt.body) or [ast.Pass()], orelse=self.block(stmt.orelse))
                out.append(ast.copy_location(new, stmt))
                continue
            if isinstance(stmt, ast.While):
                if stmt.orelse:
                    raise RewriteError(f"{self.src.where(stmt)}: while ... else is not supported")
                test, pre = self.condition(stmt.test, stmt)
                pending.extend(pre)
                flush()
                body = list(stmt.body)
                if pre:
                    if any(isinstance(n, ast.Continue) for n in ast.walk(ast.Module(body, []))):
                        raise RewriteError(f"{self.src.where(stmt)}: `continue` in a while loop on a tensor "
                                           "condition is not supported")
                    body = body + copy.deepcopy(pre)
                bid = self.branch(stmt)
                new = ast.While(test=self.host_call("__branch", [ast.Constant(bid), test]),
                                body=self.block(body), orelse=[])
                out.append(ast.copy_location(new, stmt))
                continue
            if isinstance(stmt, ast.For):
                flush()
                out.append(self.loop(stmt))
                continue
            if isinstance(stmt, ast.Return):
                if stmt.value is not None and self.kinds.expr(stmt.value) == TENSOR:
                    values = stmt.value.elts if isinstance(stmt.value, ast.Tuple) else [stmt.value]
                    names = []
                    for v in values:
                        if isinstance(v, ast.Name) or self.kinds.expr(v) != TENSOR:
                            names.append(v)
                            continue
                        tmp = self.fresh("r")
                        self.kinds.kind[tmp] = TENSOR
                        pending.append(ast.copy_location(ast.Assign([ast.Name(tmp, ast.Store())], v), stmt))
                        names.append(ast.Name(tmp, ast.Load()))
                    flush()
                    value = ast.Tuple(names, ast.Load()) if isinstance(stmt.value, ast.Tuple) else names[0]
                    out.append(ast.copy_location(ast.Return(self.host_expr(value)), stmt))
                    continue
                flush()
                out.append(ast.copy_location(ast.Return(self.host_expr(stmt.value) if stmt.value else None), stmt))
                continue
            if isinstance(stmt, (ast.Break, ast.Continue, ast.Pass)):
                flush()
                out.append(stmt)
                continue
            if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Expr)):
                flush()
                out.append(self.host_stmt(stmt))
                continue
            if isinstance(stmt, ast.Assert):
                flush()
                continue  # checks of the eager model; shapes are fixed per subgraph
            raise RewriteError(f"{self.src.where(stmt)}: {type(stmt).__name__} statements are not supported "
                               "in a forward to be split into static subgraphs")
        flush()
        return out

    def indexes_with(self, stmt: ast.stmt, pending: list[ast.stmt]) -> bool:
        """Whether `stmt` indexes a ModuleList with a tensor that `pending` computes."""
        written = {n for p in pending for t in ast.walk(p) if isinstance(t, ast.Name) and isinstance(t.ctx, ast.Store)
                   for n in [t.id]}
        inlined = _InlineAliases(self.kinds.aliases).visit(copy.deepcopy(stmt))
        for n in ast.walk(inlined):
            if isinstance(n, ast.Subscript) and self.kinds.expr(n.value) == MODULE:
                if set(_names_read(n.slice)) & written:
                    return True
        return False

    def branch(self, stmt: ast.stmt) -> int:
        bid = len(self.branches)
        self.branches[bid] = self.src.where(stmt)
        return bid

    def host_call(self, name: str, args: list[ast.expr]) -> ast.Call:
        return ast.Call(ast.Name(name, ast.Load()), args, [])

    def condition(self, test: ast.expr, stmt: ast.stmt) -> tuple[ast.expr, list[ast.stmt]]:
        """The host test, and the tensor statement computing it when it depends on tensors."""
        if self.kinds.expr(test) != TENSOR:
            return self.host_expr(test), []
        name = self.fresh("c")
        self.kinds.kind[name] = TENSOR
        assign = ast.copy_location(ast.Assign([ast.Name(name, ast.Store())], test), stmt)
        return self.host_call("__bool", [ast.Name(name, ast.Load())]), [assign]

    def loop(self, stmt: ast.For) -> ast.stmt:
        it, target = stmt.iter, stmt.target
        body = list(stmt.body)
        if stmt.orelse:
            raise RewriteError(f"{self.src.where(stmt)}: for ... else is not supported")
        seq, index_name, item = None, None, None
        if self.kinds.expr(it) == MODULE:
            seq, item = it, target
        elif _is_call(it, "enumerate") and it.args and self.kinds.expr(it.args[0]) == MODULE:
            seq = it.args[0]
            if not (isinstance(target, ast.Tuple) and len(target.elts) == 2):
                raise RewriteError(f"{self.src.where(stmt)}: unpack enumerate(...) into two names")
            index_name, item = target.elts[0], target.elts[1]
        if seq is None:  # a host loop (range, a host sequence): kept as it is
            new = ast.For(target=target, iter=self.host_expr(it), body=self.block(body), orelse=[])
            return ast.copy_location(new, stmt)
        if not isinstance(item, ast.Name):
            raise RewriteError(f"{self.src.where(stmt)}: loop over modules into a single name")
        idx = index_name.id if isinstance(index_name, ast.Name) else self.fresh("i")
        self.kinds.kind[idx] = HOST
        self.kinds.aliases[item.id] = ast.Subscript(copy.deepcopy(seq), ast.Name(idx, ast.Load()), ast.Load())
        self.kinds.kind[item.id] = MODULE
        length = len(self.resolve_module(seq, stmt))
        new = ast.For(target=ast.Name(idx, ast.Store()),
                      iter=ast.Call(ast.Name("range", ast.Load()), [ast.Constant(length)], []),
                      body=self.block(body), orelse=[])
        return ast.copy_location(new, stmt)

    def resolve_module(self, node: ast.expr, stmt: ast.stmt) -> nn.Module:
        if isinstance(node, ast.Attribute) and _is_self(node.value):
            return getattr(self.model, node.attr)
        if isinstance(node, ast.Name) and node.id in self.kinds.aliases:
            return self.resolve_module(self.kinds.aliases[node.id], stmt)
        raise RewriteError(f"{self.src.where(stmt)}: cannot tell which modules this loop runs over")

    def host_expr(self, node: ast.expr) -> ast.expr:
        return _HostExpr(self.model, self.src).visit(copy.deepcopy(node))

    def host_stmt(self, stmt: ast.stmt) -> ast.stmt:
        for n in ast.walk(stmt):
            if isinstance(n, ast.Name) and self.kinds.kind.get(n.id) == MODULE:
                raise RewriteError(f"{self.src.where(stmt)}: the host code cannot use the module {n.id}")
        return _HostExpr(self.model, self.src).visit(copy.deepcopy(stmt))

    def segment(self, stmts: list[ast.stmt]) -> list[ast.stmt]:
        sid = f"s{len(self.segments)}"
        seg = Segment(sid, stmts, lineno=getattr(stmts[0], "lineno", 0))
        body = [_StripScalars(self.kinds).visit(_InlineAliases(self.kinds.aliases).visit(copy.deepcopy(s)))
                for s in stmts]
        module = ast.Module(body, [])
        assigned: list[str] = []
        free: list[str] = []
        for s in body:
            reads = _names_read(s.value) if isinstance(s, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr)) \
                and s.value is not None else _names_read(s)
            if isinstance(s, ast.AugAssign):
                reads += _names_read(s.target)
            for name in reads:
                if name not in assigned and name not in free:
                    free.append(name)
            for t in (s.targets if isinstance(s, ast.Assign) else [getattr(s, "target", None)]):
                if t is None:
                    continue
                names = _targets(t)
                if isinstance(t, ast.Subscript) and isinstance(_root(t), ast.Name):
                    base = _root(t).id  # a partial update reads and writes the whole tensor
                    names.append(base)
                    if base not in assigned and base not in free:
                        free.append(base)
                assigned += [n for n in names if n not in assigned]
        index_vars = set()
        for n in ast.walk(module):
            if isinstance(n, ast.Subscript) and self.kinds.expr(n.value) == MODULE:
                index_vars |= set(_names_read(n.slice))
        for name in free:
            if name == "self" or name not in self.kinds.kind:
                continue  # globals (torch, F, ...) resolve in the model's module
            if self.kinds.kind[name] == MODULE:
                raise RewriteError(f"{self.src.where(stmts[0])}: module {name} could not be resolved")
            if name in index_vars:
                seg.params.append(name)
                if self.kinds.kind[name] == TENSOR:
                    seg.int_params.add(name)
            elif self.kinds.kind[name] == TENSOR:
                seg.inputs.append(name)
            else:
                seg.params.append(name)
        for name in assigned:
            if self.kinds.kind.get(name) != TENSOR:
                continue
            inside = sum(1 for st in stmts for n in ast.walk(st) if isinstance(n, ast.Name) and n.id == name
                         and isinstance(n.ctx, ast.Load))
            if name.startswith("__") or name in free or self.read_anywhere.get(name, 0) > inside:
                seg.outputs.append(name)
        if not seg.outputs:
            raise RewriteError(f"{self.src.where(stmts[0])}: these statements compute nothing used later "
                               "(in-place updates of tensors are not supported; assign the result)")
        args = ", ".join(["self", *seg.inputs] + (["*", *seg.params] if seg.params else []))
        ret = "return (" + "".join(f"_as_tensor({o}), " for o in seg.outputs) + ")"
        seg.source = f"def _seg_{sid}({args}):\n" + textwrap.indent(ast.unparse(module) + "\n" + ret, "    ") + "\n"
        self.segments[sid] = seg
        call = ast.parse(
            f"({', '.join(seg.outputs)},) = __run({sid!r}, ({''.join(i + ', ' for i in seg.inputs)}), "
            "{" + ", ".join(f"{p!r}: " + (f"__int({p})" if p in seg.int_params else p) for p in seg.params) + "})"
        ).body[0]
        return [ast.copy_location(call, stmts[0])]


# --- the host module -----------------------------------------------------------------------------

HOST_RUNTIME = '''"""Host module of a dynamic network, written by nestnas: the control flow of the model's
forward around calls to static subgraphs compiled for ONNX Runtime or TVM. Needs numpy and the
chosen runtime only (no torch).

    import host
    model = host.load("onnxruntime")   # or "tvm"; checksums verified before anything is loaded
    y = model(x)
"""

import hashlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def __bool(v):
    a = np.asarray(v)
    if a.size != 1:
        raise ValueError(f"a condition on a tensor of {a.size} elements is ambiguous (batch size 1 expected)")
    return bool(a.reshape(-1)[0])


def __int(v):
    a = np.asarray(v)
    if a.size != 1:
        raise ValueError(f"an index from a tensor of {a.size} elements is ambiguous (batch size 1 expected)")
    return int(a.reshape(-1)[0])


def _key(segment, inputs, params):
    shapes = ";".join("x".join(str(int(d)) for d in np.shape(v)) for v in inputs)
    return segment + "|" + ",".join(f"{k}={params[k]!r}" for k in sorted(params)) + "|" + shapes


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


class _Subgraphs:
    def __init__(self, folder, backend, threads):
        self.folder = Path(folder)
        manifest = json.loads((self.folder / "manifest.json").read_text())
        self.table = manifest["subgraphs"]
        self.sums = manifest["artifacts"]
        self.backend = backend
        self.threads = threads or manifest.get("threads") or 1
        self.calls = {}
        for key, entry in self.table.items():
            self.calls[key] = self._load(entry)

    def _read(self, name):
        data = (self.folder / name).read_bytes()
        if self.sums.get(name) != _sha256(data):
            raise RuntimeError(f"{name} does not match its checksum in manifest.json; refusing to load it")
        return data

    def _load(self, entry):
        if self.backend == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            session = ort.InferenceSession(self._read(entry["onnx"]), opts, providers=["CPUExecutionProvider"])
            names = entry["inputs"]
            dtypes = [np.dtype(d) for d in entry["dtypes"]]

            def call(inputs):
                feed = {n: np.asarray(v, dtype=d) for n, v, d in zip(names, inputs, dtypes)}
                return tuple(session.run(None, feed))
            return call
        if self.backend == "tvm":
            import tvm
            from tvm import relax

            data = self._read(entry["tvm"])
            fd, private = tempfile.mkstemp(suffix=".so")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                lib = tvm.runtime.load_module(private)
            finally:
                os.unlink(private)
            vm = relax.VirtualMachine(lib, tvm.cpu())
            main = vm["main"]
            dtypes = [np.dtype(d) for d in entry["dtypes"]]
            n_out = len(entry["outputs"])

            def call(inputs):
                out = main(*[tvm.runtime.tensor(np.ascontiguousarray(np.asarray(v, dtype=d)))
                             for v, d in zip(inputs, dtypes)])
                outs = [out] if n_out == 1 and hasattr(out, "numpy") else list(out)
                return tuple(o.numpy() for o in outs)
            return call
        raise ValueError(f"backend {self.backend!r}; allowed: ['onnxruntime', 'tvm']")

    def __call__(self, segment, inputs, params):
        key = _key(segment, inputs, params)
        call = self.calls.get(key)
        if call is None:
            raise KeyError(f"subgraph {key} was never compiled: the example inputs given to rewrite() "
                           "never reached this branch or shape")
        return call(inputs)


def __branch(_id, taken):
    return taken


class Model:
    """The dynamic network on one backend: numpy in, numpy out."""

    def __init__(self, backend="onnxruntime", threads=None, folder=HERE):
        self.run = _Subgraphs(folder, backend, threads)

    def __call__(self, *args, **kwargs):
        return forward(self.run, *args, **kwargs)


def load(backend="onnxruntime", threads=None):
    return Model(backend, threads)
'''


def _host_source(fn: ast.FunctionDef, body: list[ast.stmt], model: nn.Module, src: _Source) -> str:
    args = copy.deepcopy(fn.args)
    args.args = [ast.arg("__run")] + args.args[1:]
    for d in args.defaults + [d for d in args.kw_defaults if d is not None]:
        try:
            ast.literal_eval(d)
        except ValueError:
            raise RewriteError(f"{src.where(fn)}: default values of forward's arguments must be literals "
                               "to be written into the host module") from None
    new = ast.FunctionDef(name="forward", args=args, body=body or [ast.Pass()], decorator_list=[], returns=None)
    ast.fix_missing_locations(new)
    local = {a.arg for a in args.args + args.kwonlyargs} | {n for s in body for n in _targets(s)}
    for n in ast.walk(new):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id not in local | HOST_NAMES \
                and not hasattr(builtins, n.id):
            raise RewriteError(f"{src.where(n)}: the host code uses {n.id!r}, which the host module does not "
                               f"have (it has only {sorted(HOST_NAMES)} and builtins)")
    return ast.unparse(new) + "\n"


# --- the program ---------------------------------------------------------------------------------

def _as_tensor(v: Any) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.as_tensor(v)


def _key(segment: str, inputs: Sequence[Any], params: dict[str, Any]) -> str:
    shapes = ";".join("x".join(str(int(d)) for d in np.shape(v)) for v in inputs)
    return segment + "|" + ",".join(f"{k}={params[k]!r}" for k in sorted(params)) + "|" + shapes


@dataclass
class _Record:
    key: str
    segment: str
    params: dict[str, Any]
    example: tuple[torch.Tensor, ...]


class _SegmentModule(nn.Module):
    def __init__(self, model: nn.Module, fn: Callable, params: dict[str, Any]):
        super().__init__()
        self.model, self.fn, self.params = model, fn, params

    def forward(self, *inputs):
        return self.fn(self.model, *inputs, **self.params)


class DynamicProgram:
    """A dynamic model split into static subgraphs and a host function (see `rewrite`)."""

    def __init__(self, model: nn.Module, segments: dict[str, Segment], host: str, branches: dict[int, str],
                 namespace: dict[str, Any]):
        self.model, self.segments, self.host_source, self.branches = model, segments, host, branches
        self.namespace = namespace
        self.records: dict[str, _Record] = {}
        self.taken: dict[int, set[bool]] = {b: set() for b in branches}
        self.forward = namespace["forward"]

    # eager execution through the host function: records subgraphs and branch coverage
    def _eager_run(self, segment: str, inputs: tuple, params: dict[str, Any]) -> tuple:
        inputs = tuple(_as_tensor(v) for v in inputs)
        key = _key(segment, inputs, params)
        if key not in self.records:
            self.records[key] = _Record(key, segment, dict(params), tuple(v.detach().clone() for v in inputs))
        with torch.no_grad():
            return self.namespace[f"_seg_{segment}"](self.model, *inputs, **params)

    def _branch(self, bid: int, taken: Any) -> bool:
        taken = bool(taken)
        self.taken[bid].add(taken)
        return taken

    def eager(self, *args, **kwargs):
        """Run the rewritten program with torch (recording what must be compiled)."""
        self.namespace["__branch"] = self._branch
        with torch.no_grad():
            return self.forward(self._eager_run, *args, **kwargs)

    def untaken(self) -> list[str]:
        out = []
        for bid, seen in self.taken.items():
            for side in (True, False):
                if side not in seen:
                    out.append(f"{self.branches[bid]} never {'taken' if side else 'skipped'}")
        return out

    def coverage(self) -> float:
        sides = sum(len(s) for s in self.taken.values())
        return sides / (2 * len(self.taken)) if self.taken else 1.0

    def save(self, out_dir: str | os.PathLike, backends: Sequence[str] = BACKENDS, threads: int = 1,
             progress: Callable[[str, int, int], None] | None = None) -> Path:
        """Export every recorded subgraph (ONNX, verified on ONNX Runtime; TVM library) and write the
        host module and a checksummed manifest; the folder appears only when complete."""
        for b in backends:
            if b not in BACKENDS:
                raise ConfigError(f"unknown backend {b!r}; allowed: {list(BACKENDS)}")
        if not self.records:
            raise ConfigError("nothing recorded: run the program on example inputs first (rewrite does)")
        from nestnas.compile.bundle import staged_folder

        final = Path(out_dir)
        if final.exists() and any(final.iterdir()):
            raise ConfigError(f"--out {final}: exists and is not empty")
        with staged_folder(final) as tmp:
            table = {}
            for i, rec in enumerate(sorted(self.records.values(), key=lambda r: r.key)):
                table[rec.key] = self._export(rec, tmp, f"g{i:03d}", backends, threads)
                if progress:
                    progress("subgraphs", i + 1, len(self.records))
            (tmp / HOST_FILE).write_text(HOST_RUNTIME + "\n\n" + self.host_source)
            artifacts = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tmp.iterdir())}
            manifest = {"format": FORMAT, "version": 1, "model": type(self.model).__name__, "backends": list(backends),
                        "threads": threads, "subgraphs": table,
                        "segments": {s.id: s.source for s in self.segments.values()},
                        "branch_coverage": self.coverage(), "artifacts": artifacts}
            _write_manifest(tmp / MANIFEST, manifest)
        return final

    def replace_host(self, folder: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        """Write this program's host module over a saved one whose subgraphs it reuses (the same
        model with other host constants, e.g. measured latencies)."""
        folder = Path(folder)
        manifest = _read_manifest(folder)
        missing = sorted(set(self.records) - set(manifest["subgraphs"]))
        if missing:
            raise ConfigError(f"{folder} lacks subgraphs this program needs: {missing}")
        text = HOST_RUNTIME + "\n\n" + self.host_source
        tmp = folder / f".{HOST_FILE}.tmp"
        tmp.write_text(text)
        manifest["artifacts"][HOST_FILE] = hashlib.sha256(tmp.read_bytes()).hexdigest()
        manifest.update(extra or {})
        tmp_manifest = folder / f".{MANIFEST}.tmp"
        _write_manifest(tmp_manifest, manifest)
        os.replace(tmp, folder / HOST_FILE)
        os.replace(tmp_manifest, folder / MANIFEST)

    def _export(self, rec: _Record, folder: Path, stem: str, backends: Sequence[str], threads: int) -> dict:
        seg = self.segments[rec.segment]
        module = _SegmentModule(self.model, self.namespace[f"_seg_{rec.segment}"], rec.params).eval()
        names = [f"in{j}" for j in range(len(rec.example))]
        outs = [f"out{j}" for j in range(len(seg.outputs))]
        with torch.no_grad():
            want = module(*rec.example)
        buffer = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(module, tuple(rec.example), buffer, input_names=names, output_names=outs,
                                  dynamo=False, opset_version=17, do_constant_folding=True)
            except Exception as exc:  # noqa: BLE001 - the exporter raises many types
                raise RewriteError(f"segment {rec.segment} (line {seg.lineno} of forward) failed to export to "
                                   f"ONNX: {str(exc).splitlines()[0]}") from exc
        onnx_name = f"{stem}.onnx"
        (folder / onnx_name).write_bytes(buffer.getvalue())
        entry = {"segment": rec.segment, "params": {k: v for k, v in rec.params.items()}, "onnx": onnx_name,
                 "inputs": names, "outputs": seg.outputs, "dtypes": [str(t.numpy().dtype) for t in rec.example],
                 "shapes": [list(t.shape) for t in rec.example]}
        feed = [t.numpy() for t in rec.example]
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.log_severity_level = threads, 3
        session = ort.InferenceSession(buffer.getvalue(), opts, providers=["CPUExecutionProvider"])
        got = session.run(None, dict(zip(names, feed)))
        _check(rec, want, got, "ONNX Runtime")
        if "tvm" in backends:
            entry["tvm"] = f"{stem}.so"
            _build_tvm(folder / onnx_name, folder / entry["tvm"], names, rec.example, threads)
        return entry


def _check(rec: _Record, want: tuple, got: Sequence[np.ndarray], what: str) -> None:
    for w, g in zip(want, got):
        w = w.numpy()
        if w.shape != np.shape(g) or (w.size and np.abs(w.astype(np.float64) - np.asarray(g, np.float64)).max()
                                      > TOLERANCE):
            raise ArtifactError(f"subgraph {rec.key}: {what} differs from torch")


def _build_tvm(onnx_path: Path, lib_path: Path, names: list[str], example: tuple, threads: int) -> None:
    import onnx

    from nestnas.compile.tvm_util import host_target, native_warnings_dropped, require_tvm

    tvm = require_tvm()
    from tvm.relax.frontend.onnx import from_onnx

    with native_warnings_dropped():
        mod = from_onnx(onnx.load(os.fspath(onnx_path)),
                        shape_dict={n: list(t.shape) for n, t in zip(names, example)},
                        dtype_dict={n: str(t.numpy().dtype) for n, t in zip(names, example)},
                        keep_params_in_input=False)
        tvm.compile(mod, target=host_target(threads)).export_library(os.fspath(lib_path))


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
    fn_obj = getattr(type(model), method)
    try:
        src = _Source(fn_obj)
    except (OSError, TypeError) as exc:
        raise RewriteError(f"the source of {type(model).__name__}.{method} is not available ({exc})") from None
    tree = ast.parse(src.text)
    fn = tree.body[0]
    if not isinstance(fn, ast.FunctionDef):
        raise RewriteError(f"{src.where(fn)}: expected a def")
    if fn.args.vararg or fn.args.kwarg:
        raise RewriteError(f"{src.where(fn)}: *args and **kwargs in forward are not supported")
    if fn_obj.__code__.co_freevars:
        raise RewriteError(f"{src.where(fn)}: forward closes over local variables {fn_obj.__code__.co_freevars}")
    params = [a.arg for a in fn.args.args[1:]] + [a.arg for a in fn.args.kwonlyargs]
    arg_kinds = {}
    for name in params:
        values = [e[params.index(name)] for e in examples if params.index(name) < len(e)]
        arg_kinds[name] = TENSOR if any(isinstance(v, torch.Tensor) for v in values) else HOST
    namespace: dict[str, Any] = dict(fn_obj.__globals__)
    kinds = _Kinds(model, fn, arg_kinds, src, namespace)
    rw = _Rewriter(model, src, fn, kinds)
    body = rw.block(fn.body)
    host = _host_source(fn, body, model, src)
    namespace.update({"_as_tensor": _as_tensor, "__bool": _eager_bool, "__int": _eager_int, "__builtins__": builtins})
    for seg in rw.segments.values():
        exec(compile(seg.source, f"<nestnas segment {seg.id}>", "exec"), namespace)  # noqa: S102 - our own code
    exec(compile(host, "<nestnas host>", "exec"), namespace)  # noqa: S102
    program = DynamicProgram(model, rw.segments, host, rw.branches, namespace)
    model.eval()
    for e in examples:
        program.eager(*e)
    missing = program.untaken()
    if missing:
        warnings.warn("the example inputs did not reach every branch, so these have no compiled subgraphs: "
                      + "; ".join(missing), CoverageWarning, stacklevel=2)
    return program


def _eager_bool(v: Any) -> bool:
    if isinstance(v, torch.Tensor) and v.numel() != 1:
        raise ValueError(f"a condition on a tensor of {v.numel()} elements is ambiguous (batch size 1 expected)")
    return bool(v)


def _eager_int(v: Any) -> int:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"an index from a tensor of {v.numel()} elements is ambiguous (batch size 1 expected)")
        return int(v.reshape(-1)[0])
    return int(v)


class _Subgraph(Strict):
    onnx: ArtifactName
    tvm: Optional[ArtifactName] = None
    inputs: list[str]
    outputs: list[str]
    dtypes: list[str]


class DynamicManifest(Strict):
    """What `load_dynamic` and the host module read from a dynamic bundle's manifest."""

    format: Literal["nestnas-dynamic"]
    version: Literal[1]
    backends: list[Literal["onnxruntime", "tvm"]] = Field(min_length=1)
    threads: Optional[Annotated[int, Field(gt=0)]] = None
    subgraphs: dict[str, _Subgraph]
    artifacts: dict[ArtifactName, Sha256]
    signature: Optional[Signature] = None

    @model_validator(mode="after")
    def _loaded_files_are_artifacts(self) -> "DynamicManifest":
        if HOST_FILE not in self.artifacts:
            raise ValueError(f"artifacts does not list {HOST_FILE}")
        for key, entry in self.subgraphs.items():
            for backend, name, suffix in (("onnxruntime", entry.onnx, ".onnx"), ("tvm", entry.tvm, ".so")):
                if backend not in self.backends:
                    continue
                if name is None or not name.endswith(suffix) or name not in self.artifacts:
                    raise ValueError(f"subgraph {key}: its {backend} file {name!r} is not a listed {suffix} artifact")
        return self


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write a dynamic bundle's manifest, signed when a bundle key is configured."""
    from nestnas.compile.signing import signed

    path.write_text(json.dumps(signed(manifest), indent=1))


def _read_manifest(folder: Path) -> dict[str, Any]:
    from nestnas.fileio import read_document, validate

    path = folder / MANIFEST
    if not folder.is_dir() or not path.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST}; not a dynamic bundle")
    data = read_document(path, "dynamic bundle manifest", FORMAT, 1, ArtifactError, version_key="version")
    validate(data, DynamicManifest, path, "dynamic bundle manifest", ArtifactError)
    return data


def load_dynamic(folder: str | os.PathLike, backend: str = "onnxruntime", threads: int | None = None,
                 trust: bool = False):
    """The host module of a saved program, loaded on `backend`: the manifest's shape and signature
    (`trust`: accept an unsigned bundle where a bundle key is configured) are checked, the folder
    must hold exactly the listed artifacts, and the host module and subgraphs are loaded from a
    private copy of the bytes whose checksums were checked."""
    import shutil
    import tempfile

    from nestnas.compile.signing import check_folder, check_signature, read_verified

    folder = Path(folder)
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r}; allowed: {list(BACKENDS)}")
    manifest = _read_manifest(folder)
    what = f"dynamic bundle {folder}"
    check_signature(manifest, what, trust)
    artifacts = manifest["artifacts"]
    # Importing host.py as its docstring shows leaves Python's bytecode cache; nothing loads it here.
    check_folder(folder, artifacts, what, allowed=(MANIFEST, "__pycache__"))
    if backend not in manifest["backends"]:
        raise ArtifactError(f"{folder} holds no {backend} subgraphs (it holds {manifest['backends']})")
    private = Path(tempfile.mkdtemp(prefix="nestnas-dynamic-"))
    try:
        # Every file is checked, the code first; the host module reads only this private copy.
        for name in sorted(artifacts, key=lambda n: n != HOST_FILE):
            (private / name).write_bytes(read_verified(folder, name, artifacts, what))
        (private / MANIFEST).write_text(json.dumps(manifest))
        host = private / HOST_FILE
        module = types.ModuleType(f"nestnas_host_{abs(hash(str(folder)))}")
        module.__file__ = str(folder / HOST_FILE)
        try:
            exec(compile(host.read_bytes(), str(folder / HOST_FILE), "exec"), module.__dict__)  # noqa: S102 - verified
            return module.Model(backend, threads, private)
        except Exception as exc:  # noqa: BLE001 - the runtimes raise their own types for a bad subgraph
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ArtifactError(f"{what}: cannot load it on {backend} ({why})") from None
    finally:
        shutil.rmtree(private, ignore_errors=True)  # the sessions and libraries hold their own copies


__all__ = ["CoverageWarning", "DynamicProgram", "RewriteError", "load_dynamic", "rewrite"]
