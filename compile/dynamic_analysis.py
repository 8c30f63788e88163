"""Reading a dynamic model's `forward`: its source, its syntax tree, and the kind of every local
name (a tensor, a host value or a module), which decides what becomes a static subgraph and what
stays in the host code (see `nestnas.compile.dynamic`)."""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from nestnas.errors import ConfigError

TENSOR, HOST, MODULE = "tensor", "host", "module"
SHAPE_ATTRS = {"shape", "ndim", "dtype", "device"}
SHAPE_METHODS = {"size", "dim", "numel"}


class RewriteError(ConfigError):
    """The model's control flow cannot be split into static subgraphs (the message names the line)."""


class Source:
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


def names_read(node: ast.AST) -> list[str]:
    return [n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]


def stored_names(node: ast.AST) -> list[str]:
    out = []
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            out.append(n.id)
    return out


class Kinds:
    """Flow-insensitive kind (tensor, host value or module) of every local name of `forward`."""

    def __init__(self, model: nn.Module, fn: ast.FunctionDef, arg_kinds: dict[str, str], src: Source,
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
                if isinstance(target, ast.Attribute) and is_self(target.value):
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
        if is_call(it, "enumerate") and it.args:
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
            if is_self(node.value):
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
            if base == TENSOR or self.expr(node.slice) == TENSOR and not index_of_module(node, self):
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
                if rooted_in_global(func, self.globals):
                    return TENSOR if TENSOR in args or is_torch(func, self.globals) else HOST
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


def is_self(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


def is_call(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name


def root(node: ast.AST) -> ast.AST:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.value if not isinstance(node, ast.Call) else node.func
    return node


def rooted_in_global(func: ast.Attribute, globals_: dict[str, Any]) -> bool:
    base = root(func)
    return isinstance(base, ast.Name) and base.id in globals_


def is_torch(func: ast.Attribute, globals_: dict[str, Any]) -> bool:
    base = root(func)
    value = globals_.get(base.id) if isinstance(base, ast.Name) else None
    name = getattr(value, "__name__", "")
    return name == "torch" or name.startswith("torch.")


def index_of_module(node: ast.Subscript, kinds: Kinds) -> bool:
    return kinds.expr(node.value) == MODULE



@dataclass
class Forward:
    """A model's forward as read: its source, its def, the kinds of its names and the globals its
    segments resolve names in (torch, F, ...)."""

    src: Source
    fn: ast.FunctionDef
    kinds: Kinds
    namespace: dict[str, Any]


def read_forward(model: nn.Module, examples: Sequence[tuple], method: str = "forward") -> Forward:
    """Parse `type(model).<method>`; an argument is a tensor when any example passes one there."""
    fn_obj = getattr(type(model), method)
    try:
        src = Source(fn_obj)
    except (OSError, TypeError) as exc:
        raise RewriteError(f"the source of {type(model).__name__}.{method} is not available ({exc})") from None
    fn = ast.parse(src.text).body[0]
    if not isinstance(fn, ast.FunctionDef):
        raise RewriteError(f"{src.where(fn)}: expected a def")
    if fn.args.vararg or fn.args.kwarg:
        raise RewriteError(f"{src.where(fn)}: *args and **kwargs in forward are not supported")
    if fn_obj.__code__.co_freevars:
        raise RewriteError(f"{src.where(fn)}: forward closes over local variables {fn_obj.__code__.co_freevars}")
    params = [a.arg for a in fn.args.args[1:]] + [a.arg for a in fn.args.kwonlyargs]
    arg_kinds = {}
    for i, name in enumerate(params):
        values = [e[i] for e in examples if i < len(e)]
        arg_kinds[name] = TENSOR if any(isinstance(v, torch.Tensor) for v in values) else HOST
    namespace: dict[str, Any] = dict(fn_obj.__globals__)
    return Forward(src, fn, Kinds(model, fn, arg_kinds, src, namespace), namespace)
