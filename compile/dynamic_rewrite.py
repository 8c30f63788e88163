"""Rewriting a dynamic model's `forward`: every maximal run of tensor statements becomes a static
segment (a branch-free function of the tensors it reads, specialised on the host values it
uses), and the rest becomes the host function that calls them (see `nestnas.compile.dynamic`)."""

from __future__ import annotations

import ast
import builtins
import copy
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from nestnas.compile.dynamic_analysis import (
    HOST,
    LIST_UPDATES,
    MODULE,
    NO_VALUE,
    TENSOR,
    TLIST,
    Kinds,
    RewriteError,
    Source,
    is_call,
    is_self,
    literal,
    module_like,
    names_read,
    root,
    static_value,
    stored_names,
    structure,
)

STRIP_CALLS = {"float", "bool"}
# What the host code may use beside builtins: the runtime's helpers (dynamic_host.program_forward).
HOST_NAMES = {"__run", "__bool", "__int", "__branch", "np", "math", "warnings"}


@dataclass
class Segment:
    id: str
    stmts: list[ast.stmt]
    inputs: list[str] = field(default_factory=list)    # tensors read
    lists: list[str] = field(default_factory=list)     # lists of tensors read (each item an input)
    params: list[str] = field(default_factory=list)    # host values the subgraph is specialised on
    outputs: list[str] = field(default_factory=list)   # tensors written and used later
    int_params: set[str] = field(default_factory=set)  # tensors used as a ModuleList index (host int)
    source: str = ""
    lineno: int = 0


class _StripScalars(ast.NodeTransformer):
    """`t.item()`, `float(t)` and `bool(t)` keep tensors inside a subgraph (the host converts)."""

    def __init__(self, kinds: Kinds):
        self.kinds = kinds

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.func, ast.Attribute) and node.func.attr == "item" and not node.args:
            return node.func.value
        if isinstance(node.func, ast.Name) and node.func.id in STRIP_CALLS | {"int"} and len(node.args) == 1 \
                and self.kinds.expr(node.args[0]) == TENSOR:
            return node.args[0]
        return node

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        self.generic_visit(node)
        if node.attr == "data" and self.kinds.expr(node.value) == TENSOR:
            return node.value  # `t.data` would be traced as a constant (BlockDrop's `action.data.sum()`)
        return node


class _InPlace(ast.NodeTransformer):
    """Every in-place tensor method call statement, rewritten as an assignment."""

    def __init__(self, rewriter: "Rewriter"):
        self.rewriter = rewriter

    def visit_Expr(self, node: ast.Expr) -> ast.AST:
        return self.rewriter.out_of_place(node)

    def visit_With(self, node: ast.With) -> Any:
        self.generic_visit(node)
        if all(_grad_mode(item.context_expr) for item in node.items) and not any(i.optional_vars for i in node.items):
            return node.body  # `with torch.no_grad():` changes nothing in an inference graph
        return node

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        # `t += u` on a tensor would write into the caller's tensor (a subgraph's input)
        if isinstance(node.target, ast.Name) and self.rewriter.kinds.expr(node.target) == TENSOR:
            load = ast.Name(node.target.id, ast.Load())
            return ast.copy_location(ast.Assign([node.target], ast.BinOp(load, node.op, node.value)), node)
        return node


class _SplitGuards(ast.NodeTransformer):
    """`if r is not None and t.sum() > 0:` must not compute the tensor side when the host side
    decides (PABEE): the test becomes nested ifs setting a host flag, and the flag is tested."""

    def __init__(self, rewriter: "Rewriter"):
        self.rw = rewriter

    def visit_If(self, node: ast.If) -> Any:
        self.generic_visit(node)
        test, kinds = node.test, self.rw.kinds
        if not (isinstance(test, ast.BoolOp) and kinds.expr(test) == TENSOR and kinds.expr(test.values[0]) == HOST):
            return node
        flag = self.rw.fresh("g")
        kinds.kind[flag] = HOST
        rest = test.values[1] if len(test.values) == 2 else ast.BoolOp(test.op, test.values[1:])

        def set_flag(value: bool) -> ast.stmt:
            return ast.copy_location(ast.Assign([ast.Name(flag, ast.Store())], ast.Constant(value)), node)

        inner = self.visit(ast.copy_location(ast.If(rest, [set_flag(True)], []), node))
        inner = inner if isinstance(inner, list) else [inner]
        if isinstance(test.op, ast.And):
            guard = ast.If(test.values[0], inner, [])
        else:
            guard = ast.If(test.values[0], [set_flag(True)], inner)
        test_flag = ast.copy_location(ast.If(ast.Name(flag, ast.Load()), node.body, node.orelse), node)
        return [set_flag(False), ast.copy_location(guard, node), test_flag]


class _HoistListItems(ast.NodeTransformer):
    """`outs.append(self.f(x))` becomes `__a = self.f(x)` (tensor code) and `outs.append(__a)` (the
    host keeps the list); likewise the tensor items of a list literal."""

    def __init__(self, rewriter: "Rewriter"):
        self.rw = rewriter

    def hoist(self, items: list[ast.expr], stmt: ast.stmt) -> list[ast.stmt]:
        pre = []
        for i, item in enumerate(items):
            if not isinstance(item, ast.Name) and self.rw.kinds.expr(item) == TENSOR:
                tmp = self.rw.fresh("a")
                self.rw.kinds.kind[tmp] = TENSOR
                pre.append(ast.copy_location(ast.Assign([ast.Name(tmp, ast.Store())], item), stmt))
                items[i] = ast.Name(tmp, ast.Load())
        return pre

    def visit_Expr(self, node: ast.Expr) -> Any:
        call = node.value
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr in LIST_UPDATES \
                and self.rw.kinds.expr(call.func.value) == TLIST:
            return [*self.hoist(call.args, node), node]
        return node

    def visit_Assign(self, node: ast.Assign) -> Any:
        if isinstance(node.value, ast.List) and self.rw.kinds.expr(node.value) == TLIST:
            return [*self.hoist(node.value.elts, node), node]
        return node


class _Substitute(ast.NodeTransformer):
    def __init__(self, names: dict[str, ast.expr]):
        self.names = names

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return copy.deepcopy(self.names[node.id]) if node.id in self.names else node


class _TensorLogic(ast.NodeTransformer):
    """`a and b`, `not a` and `0 < t < 1` on tensors would call `bool()` on a tensor, which a trace
    freezes into a constant: inside a subgraph they become elementwise logic (both sides run)."""

    def __init__(self, kinds: Kinds):
        self.kinds = kinds

    @staticmethod
    def call(name: str, args: list[ast.expr]) -> ast.Call:
        return ast.Call(ast.Name(name, ast.Load()), args, [])

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        tensor = self.kinds.expr(node) == TENSOR
        self.generic_visit(node)
        if not tensor:
            return node
        return self.call("_logical_and" if isinstance(node.op, ast.And) else "_logical_or", node.values)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        tensor = isinstance(node.op, ast.Not) and self.kinds.expr(node.operand) == TENSOR
        self.generic_visit(node)
        return self.call("_logical_not", [node.operand]) if tensor else node

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        tensor = len(node.ops) > 1 and self.kinds.expr(node) == TENSOR
        self.generic_visit(node)
        if not tensor:
            return node
        operands = [node.left, *node.comparators]
        pairs = [ast.Compare(operands[i], [op], [operands[i + 1]]) for i, op in enumerate(node.ops)]
        return self.call("_logical_and", pairs)


class _InlineAliases(ast.NodeTransformer):
    def __init__(self, aliases: dict[str, ast.expr]):
        self.aliases = aliases

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if isinstance(node.ctx, ast.Load) and node.id in self.aliases:
            return copy.deepcopy(self.aliases[node.id])
        return node


class _HostExpr(ast.NodeTransformer):
    """Host expressions run on numpy: `t.size(d)` -> `t.shape[d]`, `t.dim()` -> `t.ndim`; facts of
    the model (flags set in `__init__`, ``len(self.layers)``, ``hasattr(self, "fc")``, the keys of a
    dict of modules) are written in as literals."""

    def __init__(self, model: nn.Module, src: Source, globals_: dict[str, Any]):
        self.model, self.src, self.globals = model, src, globals_

    def visit(self, node: ast.AST) -> Any:
        if isinstance(node, ast.expr) and any(is_self(n) for n in ast.walk(node)):
            value = static_value(node, self.model, self.globals)
            if value is not NO_VALUE and literal(value):
                return ast.copy_location(_as_literal(value), node)
        return super().visit(node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.func, ast.Attribute) and node.func.attr == "size":
            shape = ast.Attribute(node.func.value, "shape", ast.Load())
            return ast.Subscript(shape, node.args[0], ast.Load()) if node.args else shape
        if isinstance(node.func, ast.Attribute) and node.func.attr == "dim" and not node.args:
            return ast.Attribute(node.func.value, "ndim", ast.Load())
        return node

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        if any(is_self(n) for n in ast.walk(node.value)) or is_self(node.value):
            value = static_value(node, self.model, self.globals)
            if value is not NO_VALUE and module_like(value):
                return ast.copy_location(_as_literal(structure(value)), node)
            what = "a tensor, or not set in __init__" if value is NO_VALUE else type(value).__name__
            raise RewriteError(f"{self.src.where(node)}: the host code needs {ast.unparse(node)} ({what}), which "
                               "cannot be written into a module without torch; compute with it in tensor code "
                               "(a condition on it becomes part of a subgraph) or make it a Python constant")
        self.generic_visit(node)
        return node


def _as_literal(value: Any) -> ast.expr:
    if isinstance(value, (tuple, list)):
        return ast.Tuple([_as_literal(v) for v in value], ast.Load())
    if isinstance(value, dict):
        return ast.Dict([_as_literal(k) for k in value], [_as_literal(v) for v in value.values()])
    return ast.Constant(value)


class Rewriter:
    def __init__(self, model: nn.Module, src: Source, fn: ast.FunctionDef, kinds: Kinds):
        self.model, self.src, self.fn, self.kinds = model, src, fn, kinds
        self.segments: dict[str, Segment] = {}
        self.branches: dict[int, str] = {}   # branch id -> where
        self.counter = 0
        _InPlace(self).visit(fn)
        _HoistListItems(self).visit(fn)
        _SplitGuards(self).visit(fn)
        self.drop_dead(fn)
        self.read_anywhere: dict[str, int] = {}
        for n in ast.walk(fn):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
                self.read_anywhere[n.id] = self.read_anywhere.get(n.id, 0) + 1

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"__{prefix}{self.counter}"

    def is_tensor_stmt(self, stmt: ast.stmt) -> bool:
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant) and stmt.value.value is None:
            return False  # `result = None` before a tensor is kept by the host (PABEE)
        if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            names = [n for t in targets for n in stored_names(t)]
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
        delayed: list[ast.stmt] = []  # host statements the pending segment does not depend on

        def flush() -> None:
            if pending:
                out.extend(self.segment(list(pending)))
                pending.clear()
            out.extend(delayed)
            delayed.clear()

        def push(new: list[ast.stmt]) -> None:
            for st in new:
                if self.indexes_with(st, pending) or _conflicts(st, delayed):
                    flush()  # an index must reach the host as an int before the module is chosen
                pending.append(st)

        for stmt in stmts:
            if self.is_tensor_stmt(stmt):
                push([stmt])
                continue
            if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and all(
                    self.kinds.kind.get(n) == MODULE for t in (stmt.targets if isinstance(stmt, ast.Assign)
                                                              else [stmt.target]) for n in stored_names(t)):
                continue  # module alias: inlined where used
            if isinstance(stmt, ast.If):
                test, pre = self.condition(stmt.test, stmt)
                push(pre)
                flush()
                if not stmt.orelse and all(isinstance(b, ast.Raise) for b in stmt.body):
                    out.append(ast.copy_location(ast.If(test=test, body=self.block(stmt.body), orelse=[]), stmt))
                    continue  # an input check: the side that raises needs no subgraph, so no coverage
                bid = self.branch(stmt)
                new = ast.If(test=self.host_call("__branch", [ast.Constant(bid), test]),
                             body=self.block(stmt.body) or [ast.Pass()], orelse=self.block(stmt.orelse))
                out.append(ast.copy_location(new, stmt))
                continue
            if isinstance(stmt, ast.While):
                out.append(self.while_stmt(stmt, push, flush))
                continue
            if isinstance(stmt, ast.For):
                flush()
                out.append(self.loop(stmt))
                continue
            if isinstance(stmt, ast.Return):
                if _conflicts(stmt, delayed):
                    flush()
                new = self.return_stmt(stmt, pending)
                flush()
                out.append(new)
                continue
            if isinstance(stmt, (ast.Break, ast.Continue, ast.Pass)):
                flush()
                out.append(stmt)
                continue
            if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Expr)) and pending:
                delayed.append(self.host_stmt(stmt))  # runs after the segment: fewer, larger subgraphs
                continue
            if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Expr, ast.Raise)):
                flush()
                out.append(self.host_stmt(stmt))
                continue
            if isinstance(stmt, ast.Assert):
                flush()
                continue  # checks of the eager model; shapes are fixed per subgraph
            raise RewriteError(f"{self.src.where(stmt)}: {type(stmt).__name__} statements are not supported "
                               "in a forward to be split into static subgraphs; move this code into a submodule "
                               "called from forward (its tensor code is then traced whole)")
        flush()
        return out

    def while_stmt(self, stmt: ast.While, push: Callable, flush: Callable) -> ast.stmt:
        """A while loop on a tensor condition re-evaluates the condition at the end of its body."""
        if stmt.orelse:
            raise RewriteError(f"{self.src.where(stmt)}: while ... else is not supported; "
                               "set a flag before `break` and test it after the loop")
        test, pre = self.condition(stmt.test, stmt)
        push(pre)
        flush()
        body = list(stmt.body)
        if pre:
            if any(isinstance(n, ast.Continue) for n in ast.walk(ast.Module(body, []))):
                raise RewriteError(f"{self.src.where(stmt)}: `continue` in a while loop on a tensor "
                                   "condition is not supported; use an if around the rest of the body")
            body = body + copy.deepcopy(pre)
        bid = self.branch(stmt)
        new = ast.While(test=self.host_call("__branch", [ast.Constant(bid), test]),
                        body=self.block(body), orelse=[])
        return ast.copy_location(new, stmt)

    def return_stmt(self, stmt: ast.Return, pending: list[ast.stmt]) -> ast.stmt:
        """The host's return; tensor expressions it returns are computed by the pending segment."""
        if stmt.value is None or self.kinds.expr(stmt.value) != TENSOR:
            return ast.copy_location(ast.Return(self.host_expr(stmt.value) if stmt.value else None), stmt)
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
        value = ast.Tuple(names, ast.Load()) if isinstance(stmt.value, ast.Tuple) else names[0]
        return ast.copy_location(ast.Return(self.host_expr(value)), stmt)

    def drop_dead(self, fn: ast.FunctionDef) -> None:
        """Remove tensor statements whose results nothing reads (DyCL removes dead variables too),
        until none is left: a later subgraph must not need a tensor an earlier one never returned."""
        while True:
            loads: dict[str, int] = {}
            for n in ast.walk(fn):
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
                    loads[n.id] = loads.get(n.id, 0) + 1
            dropped = False
            for parent in ast.walk(fn):
                for attr in ("body", "orelse"):
                    stmts = getattr(parent, attr, None)
                    if not isinstance(stmts, list) or not stmts or not isinstance(stmts[0], ast.stmt):
                        continue
                    keep = [st for st in stmts if not self.is_dead(st, loads)]
                    if len(keep) != len(stmts):
                        dropped = True
                        stmts[:] = keep or [ast.copy_location(ast.Pass(), stmts[0])]
            if not dropped:
                return

    def is_dead(self, stmt: ast.stmt, loads: dict[str, int]) -> bool:
        if not isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign)) or not self.is_tensor_stmt(stmt):
            return False
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        names = []
        for t in targets:
            if isinstance(t, ast.Subscript):  # a partial update of a tensor: dead when the tensor is
                base = root(t)
                if not isinstance(base, ast.Name):
                    return False
                names.append(base.id)
                continue
            if not isinstance(t, (ast.Name, ast.Tuple, ast.List)):
                return False
            names += stored_names(t)
        own: dict[str, int] = {}
        for n in ast.walk(stmt):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
                own[n.id] = own.get(n.id, 0) + 1
        return bool(names) and all(loads.get(n, 0) == own.get(n, 0) for n in names)

    def out_of_place(self, stmt: ast.stmt) -> ast.stmt:
        """``t.add_(u)`` on a tensor becomes ``t = t.add(u)``, so that the update is an output of its
        subgraph like any assignment (``t += u`` already is)."""
        if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
                and isinstance(stmt.value.func, ast.Attribute)):
            return stmt
        call, func = stmt.value, stmt.value.func
        method, target = func.attr, func.value
        if not (method.endswith("_") and not method.startswith("_") and self.kinds.expr(target) == TENSOR
                and isinstance(root(target), ast.Name) and isinstance(target, (ast.Name, ast.Subscript))):
            return stmt
        base = method[:-1]
        if base == "zero" and not call.args:
            value = ast.parse("torch.zeros_like(__t)", mode="eval").body
        elif base == "fill" and len(call.args) == 1:
            value = ast.parse("torch.full_like(__t, __v)", mode="eval").body
            value.args[1] = call.args[0]
        elif base == "copy" and len(call.args) == 1:
            value = ast.parse("__v.to(__t.dtype).expand_as(__t).clone()", mode="eval").body
            value.func.value.func.value.func.value = call.args[0]
        elif hasattr(torch.Tensor, base):
            value = ast.Call(ast.Attribute(copy.deepcopy(target), base, ast.Load()), call.args, call.keywords)
        else:
            return stmt
        value = _Substitute({"__t": target}).visit(value)
        store = copy.deepcopy(target)
        store.ctx = ast.Store()
        return ast.copy_location(ast.Assign([store], value), stmt)

    def indexes_with(self, stmt: ast.stmt, pending: list[ast.stmt]) -> bool:
        """Whether `stmt` indexes a ModuleList with a tensor that `pending` computes."""
        written = {n for p in pending for t in ast.walk(p) if isinstance(t, ast.Name) and isinstance(t.ctx, ast.Store)
                   for n in [t.id]}
        inlined = _InlineAliases(self.kinds.aliases).visit(copy.deepcopy(stmt))
        for n in ast.walk(inlined):
            if isinstance(n, ast.Subscript) and self.kinds.expr(n.value) == MODULE:
                if set(names_read(n.slice)) & written:
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
            raise RewriteError(f"{self.src.where(stmt)}: for ... else is not supported; "
                               "set a flag before `break` and test it after the loop")
        seq, index_name, item = None, None, None
        if isinstance(it, ast.Call) and isinstance(it.func, ast.Attribute) and it.func.attr in ("keys", "items",
                                                                                               "values") \
                and not it.args and self.kinds.expr(it.func.value) == MODULE:
            return self.dict_loop(stmt, it.func.value, it.func.attr)
        if self.kinds.expr(it) == MODULE:
            if isinstance(self.resolve_module(it, stmt), (dict, nn.ModuleDict)):
                return self.dict_loop(stmt, it, "keys")
            seq, item = it, target
        elif is_call(it, "enumerate") and it.args and self.kinds.expr(it.args[0]) == MODULE:
            seq = it.args[0]
            if not (isinstance(target, ast.Tuple) and len(target.elts) == 2):
                raise RewriteError(f"{self.src.where(stmt)}: unpack enumerate(...) into two names, "
                                   "`for i, module in enumerate(...):`")
            index_name, item = target.elts[0], target.elts[1]
        if seq is None:  # a host loop (range, a host sequence): kept as it is
            new = ast.For(target=target, iter=self.host_expr(it), body=self.block(body), orelse=[])
            return ast.copy_location(new, stmt)
        if not isinstance(item, ast.Name):
            raise RewriteError(f"{self.src.where(stmt)}: loop over modules into a single name, "
                               "`for module in ...:`")
        idx = index_name.id if isinstance(index_name, ast.Name) else self.fresh("i")
        self.kinds.kind[idx] = HOST
        self.kinds.aliases[item.id] = ast.Subscript(copy.deepcopy(seq), ast.Name(idx, ast.Load()), ast.Load())
        self.kinds.kind[item.id] = MODULE
        length = len(self.resolve_module(seq, stmt))
        new = ast.For(target=ast.Name(idx, ast.Store()),
                      iter=ast.Call(ast.Name("range", ast.Load()), [ast.Constant(length)], []),
                      body=self.block(body), orelse=[])
        return ast.copy_location(new, stmt)

    def dict_loop(self, stmt: ast.For, container: ast.expr, how: str) -> ast.stmt:
        """A loop over a dict of modules (or its keys, values, items): a host loop over its keys."""
        keys = list(self.resolve_module(container, stmt).keys())
        target = stmt.target
        if how == "keys":
            key = target
        elif how == "items":
            if not (isinstance(target, ast.Tuple) and len(target.elts) == 2 and isinstance(target.elts[1], ast.Name)):
                raise RewriteError(f"{self.src.where(stmt)}: unpack .items() of modules into two names, "
                                   "`for name, module in ...:`")
            key, item = target.elts
        else:
            key, item = ast.Name(self.fresh("k"), ast.Store()), target
        if how != "keys":
            if not isinstance(item, ast.Name):
                raise RewriteError(f"{self.src.where(stmt)}: loop over modules into a single name, "
                               "`for module in ...:`")
            self.kinds.aliases[item.id] = ast.Subscript(copy.deepcopy(container), ast.Name(key.id, ast.Load()),
                                                         ast.Load())
            self.kinds.kind[item.id] = MODULE
        for n in stored_names(key):
            self.kinds.kind[n] = HOST
        new = ast.For(target=key, iter=_as_literal(tuple(keys)), body=self.block(list(stmt.body)), orelse=[])
        return ast.copy_location(new, stmt)

    def resolve_module(self, node: ast.expr, stmt: ast.stmt) -> Any:
        if isinstance(node, ast.Name) and node.id in self.kinds.aliases:
            return self.resolve_module(self.kinds.aliases[node.id], stmt)
        value = static_value(node, self.model, self.kinds.globals)
        if value is NO_VALUE or not module_like(value):
            raise RewriteError(f"{self.src.where(stmt)}: cannot tell which modules this loop runs over; loop over "
                               "an attribute set in __init__ (self.layers), or over range(len(self.layers))")
        return value

    def host_expr(self, node: ast.expr) -> ast.expr:
        return _HostExpr(self.model, self.src, self.kinds.globals).visit(copy.deepcopy(node))

    def host_stmt(self, stmt: ast.stmt) -> ast.stmt:
        for n in ast.walk(stmt):
            if isinstance(n, ast.Name) and self.kinds.kind.get(n.id) == MODULE:
                raise RewriteError(f"{self.src.where(stmt)}: the host code cannot use the module {n.id}; call "
                                   "it on tensors (that becomes a subgraph), or test facts of it in __init__")
        return _HostExpr(self.model, self.src, self.kinds.globals).visit(copy.deepcopy(stmt))

    def segment(self, stmts: list[ast.stmt]) -> list[ast.stmt]:
        sid = f"s{len(self.segments)}"
        seg = Segment(sid, stmts, lineno=getattr(stmts[0], "lineno", 0))
        body = [_TensorLogic(self.kinds).visit(_StripScalars(self.kinds).visit(
            _InlineAliases(self.kinds.aliases).visit(copy.deepcopy(s)))) for s in stmts]
        module = ast.Module(body, [])
        free, assigned = _free_and_assigned(body)
        index_vars = set()
        for n in ast.walk(module):
            if isinstance(n, ast.Subscript) and self.kinds.expr(n.value) == MODULE:
                index_vars |= set(names_read(n.slice))
        for name in free:
            if name == "self" or name not in self.kinds.kind:
                continue  # globals (torch, F, ...) resolve in the model's module
            if self.kinds.kind[name] == MODULE:
                raise RewriteError(f"{self.src.where(stmts[0])}: module {name} could not be resolved; "
                               "use an attribute set in __init__ (self.x), or a loop over one")
            if name in index_vars:
                seg.params.append(name)
                if self.kinds.kind[name] == TENSOR:
                    seg.int_params.add(name)
            elif self.kinds.kind[name] == TENSOR:
                seg.inputs.append(name)
            elif self.kinds.kind[name] == TLIST:
                seg.lists.append(name)
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
            return []  # dead code: nothing these statements compute is read later (DyCL drops it too)
        # A partial update (`t[:, 0] = ...`) of an input works on a copy: the caller's tensor stays.
        updated = [i for i in seg.inputs if any(isinstance(t, ast.Subscript) and isinstance(root(t), ast.Name)
                                                and root(t).id == i for st in body for t in _targets(st))]
        module.body[:0] = [ast.parse(f"{i} = {i}.clone()").body[0] for i in updated]
        # A list's items follow the tensor inputs; the subgraph is specialised on each list's length.
        counts = [f"__n_{name}" for name in seg.lists]
        start = "0"
        for name, count in zip(seg.lists, counts):
            module.body.insert(0, ast.parse(f"{name} = list(__items[{start}:{start} + {count}])").body[0])
            start = f"{start} + {count}"
        params = [*seg.params, *counts]
        args = ", ".join(["self", *seg.inputs] + (["*__items"] if seg.lists else ["*"] if params else [])
                         + params)
        ret = "return (" + "".join(f"_as_tensor({o}), " for o in seg.outputs) + ")"
        seg.source = f"def _seg_{sid}({args}):\n" + textwrap.indent(ast.unparse(module) + "\n" + ret, "    ") + "\n"
        self.segments[sid] = seg
        feeds = "".join(i + ", " for i in seg.inputs) + "".join(f"*{name}, " for name in seg.lists)
        call = ast.parse(
            f"({', '.join(seg.outputs)},) = __run({sid!r}, ({feeds}), "
            "{" + ", ".join([f"{p!r}: " + (f"__int({p})" if p in seg.int_params else p) for p in seg.params]
                            + [f"{c!r}: len({name})" for c, name in zip(counts, seg.lists)]) + "})"
        ).body[0]
        return [ast.copy_location(call, stmts[0])]



def _reads_writes(stmt: ast.stmt) -> tuple[set[str], set[str]]:
    """The names a statement reads and the names it writes (a list it appends to, a tensor it
    updates in part, included)."""
    reads = set(names_read(stmt))
    writes = set(stored_names(stmt))
    for t in _targets(stmt):
        if isinstance(t, ast.Subscript) and isinstance(root(t), ast.Name):
            writes.add(root(t).id)
    if isinstance(stmt, ast.AugAssign):
        reads |= set(stored_names(stmt.target))
    for n in ast.walk(stmt):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name) \
                and (n.func.attr in LIST_UPDATES | {"pop", "update", "setdefault", "add"} or n.func.attr.endswith("_")):
            writes.add(n.func.value.id)  # the method changes its owner (`outs.append(t)`)
    return reads, writes


def _conflicts(stmt: ast.stmt, delayed: list[ast.stmt]) -> bool:
    """Whether `stmt` may not move before the delayed host statements."""
    if not delayed:
        return False
    reads, writes = _reads_writes(stmt)
    for d in delayed:
        d_reads, d_writes = _reads_writes(d)
        if d_writes & (reads | writes) or writes & d_reads:
            return True
    return False


def _grad_mode(expr: ast.expr) -> bool:
    """`torch.no_grad()`, `torch.inference_mode()` and the like, however torch was imported."""
    return isinstance(expr, ast.Call) and isinstance(expr.func, (ast.Attribute, ast.Name)) and (
        expr.func.attr if isinstance(expr.func, ast.Attribute) else expr.func.id) in (
        "no_grad", "inference_mode", "enable_grad", "set_grad_enabled")


def _targets(stmt: ast.stmt) -> list[ast.expr]:
    if isinstance(stmt, ast.Assign):
        return list(stmt.targets)
    return [stmt.target] if isinstance(stmt, (ast.AugAssign, ast.AnnAssign)) else []


def _free_and_assigned(body: list[ast.stmt]) -> tuple[list[str], list[str]]:
    """The names `body` reads before writing them (its inputs), and the names it writes, in order."""
    assigned: list[str] = []
    free: list[str] = []
    for s in body:
        reads = names_read(s.value) if isinstance(s, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr)) \
            and s.value is not None else names_read(s)
        if isinstance(s, ast.AugAssign):  # `y += 1` reads y first
            reads += names_read(s.target) + stored_names(s.target)
        for name in reads:
            if name not in assigned and name not in free:
                free.append(name)
        for t in (s.targets if isinstance(s, ast.Assign) else [getattr(s, "target", None)]):
            if isinstance(t, (ast.Subscript, ast.Attribute)):  # `seq[:, t] = w` reads t (and seq)
                for name in names_read(t):
                    if name not in assigned and name not in free:
                        free.append(name)
            if t is None:
                continue
            names = stored_names(t)
            if isinstance(t, ast.Subscript) and isinstance(root(t), ast.Name):
                base = root(t).id  # a partial update reads and writes the whole tensor
                names.append(base)
                if base not in assigned and base not in free:
                    free.append(base)
            assigned += [n for n in names if n not in assigned]
    return free, assigned


def host_source(fn: ast.FunctionDef, body: list[ast.stmt], model: nn.Module, src: Source) -> str:
    args = copy.deepcopy(fn.args)
    args.args = [ast.arg("__run")] + args.args[1:]
    for d in args.defaults + [d for d in args.kw_defaults if d is not None]:
        try:
            ast.literal_eval(d)
        except ValueError:
            raise RewriteError(f"{src.where(fn)}: default values of forward's arguments must be literals "
                               "to be written into the host module; use None and set the value inside") from None
    new = ast.FunctionDef(name="forward", args=args, body=body or [ast.Pass()], decorator_list=[], returns=None)
    ast.fix_missing_locations(new)
    local = {a.arg for a in args.args + args.kwonlyargs} | {n for s in body for n in stored_names(s)}
    for n in ast.walk(new):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id not in local | HOST_NAMES \
                and not hasattr(builtins, n.id):
            raise RewriteError(f"{src.where(n)}: the host code uses {n.id!r}, which the host module does not "
                               f"have (it has only {sorted(HOST_NAMES)} and builtins); compute it in tensor "
                               "code, or pass the value as an argument of forward")
    return ast.unparse(new) + "\n"

