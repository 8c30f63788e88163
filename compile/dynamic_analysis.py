"""Reading a dynamic model's `forward`: its source, its syntax tree, and the kind of every local
name (a tensor, a host value or a module), which decides what becomes a static subgraph and what
stays in the host code (see `nestnas.compile.dynamic`)."""

from __future__ import annotations

import ast
import inspect
import operator
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from nestnas.errors import ConfigError

TENSOR, HOST, MODULE = "tensor", "host", "module"
TLIST = "tensor list"  # a Python list of tensors, kept by the host (`outs = []; outs.append(t)`)
LIST_UPDATES = {"append", "extend", "insert", "clear", "reverse"}
SHAPE_ATTRS = {"shape", "ndim", "dtype", "device"}
SHAPE_METHODS = {"size", "dim", "numel"}


class RewriteError(ConfigError):
    """The model's control flow cannot be split into static subgraphs (the message names the line)."""


NO_VALUE = object()  # what `static_value` gives for an expression that depends on the inputs
_STATIC_CALLS = {"len": len, "hasattr": hasattr, "getattr": getattr, "isinstance": isinstance, "str": str,
                 "int": int, "float": float, "bool": bool, "range": range, "min": min, "max": max, "abs": abs}
_STR_METHODS = {"format", "startswith", "endswith", "join", "lower", "upper", "replace"}
_CONTAINER_METHODS = {"keys", "values", "items", "get", "__contains__"}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Mod: operator.mod, ast.Div: operator.truediv, ast.Pow: operator.pow}
_CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
           ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}


class _Static:
    """Evaluates expressions on the model's structure and constants; NO_VALUE for anything else."""

    def __init__(self, model: nn.Module, globals_: dict[str, Any] | None):
        self.model, self.globals = model, globals_ or {}

    def ev(self, n: ast.AST) -> Any:
        method = getattr(self, f"ev_{type(n).__name__}", None)
        return NO_VALUE if method is None else method(n)

    def ev_Constant(self, n: ast.Constant) -> Any:
        return n.value

    def ev_Name(self, n: ast.Name) -> Any:
        if n.id == "self":
            return self.model
        g = self.globals.get(n.id, NO_VALUE)
        return g if g is nn or isinstance(g, type) and issubclass(g, nn.Module) else NO_VALUE  # isinstance(., nn.X)

    def ev_Attribute(self, n: ast.Attribute) -> Any:
        base = self.ev(n.value)
        if base is nn:
            return getattr(nn, n.attr, NO_VALUE)
        if isinstance(base, torch.Tensor):  # the shape of a buffer or parameter is a constant
            return tuple(base.shape) if n.attr == "shape" else base.ndim if n.attr == "ndim" else NO_VALUE
        if base is NO_VALUE or isinstance(base, (int, float, str, bytes, tuple, list, dict)):
            return NO_VALUE
        return getattr(base, n.attr, NO_VALUE)

    def ev_Subscript(self, n: ast.Subscript) -> Any:
        base, idx = self.ev(n.value), self.ev(n.slice)
        if base is NO_VALUE or idx is NO_VALUE or isinstance(base, torch.Tensor) or isinstance(idx, torch.Tensor):
            return NO_VALUE
        try:
            return base[idx]
        except (KeyError, IndexError, TypeError):
            return NO_VALUE

    def callee(self, func: ast.expr, args: list[Any]) -> Any:
        if isinstance(func, ast.Name):
            fn = None if func.id in self.globals else _STATIC_CALLS.get(func.id)
            if func.id == "getattr" and not isinstance(args[0] if args else None, nn.Module):
                return None
            return fn
        if isinstance(func, ast.Attribute):
            owner = self.ev(func.value)
            if isinstance(owner, torch.Tensor) and func.attr in ("size", "dim", "numel"):
                method = getattr(owner, func.attr)
                return lambda *a: tuple(method()) if func.attr == "size" and not a else method(*a)
            if isinstance(owner, str) and func.attr in _STR_METHODS \
                    or isinstance(owner, (dict, nn.ModuleDict)) and func.attr in _CONTAINER_METHODS:
                return getattr(owner, func.attr)
        return None

    def ev_Call(self, n: ast.Call) -> Any:
        args = [self.ev(a) for a in n.args]
        kwargs = {k.arg: self.ev(k.value) for k in n.keywords if k.arg}
        if any(v is NO_VALUE for v in [*args, *kwargs.values()]) or len(kwargs) != len(n.keywords):
            return NO_VALUE
        fn = self.callee(n.func, args)
        if fn is None or fn is not isinstance and any(isinstance(v, torch.Tensor) for v in [*args, *kwargs.values()]):
            return NO_VALUE
        try:
            return fn(*args, **kwargs)
        except Exception:  # noqa: BLE001 - not statically known; the eager run will tell
            return NO_VALUE

    def ev_UnaryOp(self, n: ast.UnaryOp) -> Any:
        v = self.ev(n.operand)
        if v is NO_VALUE or isinstance(v, torch.Tensor) or not isinstance(n.op, (ast.Not, ast.USub)):
            return NO_VALUE
        return not v if isinstance(n.op, ast.Not) else -v

    def ev_BoolOp(self, n: ast.BoolOp) -> Any:
        for i, part in enumerate(n.values):
            v = self.ev(part)
            if v is NO_VALUE or isinstance(v, torch.Tensor):
                return NO_VALUE
            if (not v if isinstance(n.op, ast.And) else v) or i == len(n.values) - 1:
                return v
        return NO_VALUE

    def ev_BinOp(self, n: ast.BinOp) -> Any:
        a, b = self.ev(n.left), self.ev(n.right)
        if type(n.op) not in _BINOPS or not all(isinstance(v, (int, float, str, tuple)) for v in (a, b)):
            return NO_VALUE
        try:
            return _BINOPS[type(n.op)](a, b)
        except Exception:  # noqa: BLE001
            return NO_VALUE

    def ev_Compare(self, n: ast.Compare) -> Any:
        left = self.ev(n.left)
        for op, right_node in zip(n.ops, n.comparators):
            right = self.ev(right_node)
            if type(op) not in _CMPOPS or any(v is NO_VALUE or isinstance(v, torch.Tensor) for v in (left, right)):
                return NO_VALUE
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True

    def ev_Tuple(self, n: ast.Tuple | ast.List) -> Any:
        items = [self.ev(e) for e in n.elts]
        return NO_VALUE if any(v is NO_VALUE for v in items) else tuple(items)

    ev_List = ev_Tuple


def static_value(node: ast.AST, model: nn.Module, globals_: dict[str, Any] | None = None,
                 tensors: bool = False) -> Any:
    """The value of an expression that depends only on the model's structure and constants set in
    `__init__` (``self.use_exit``, ``len(self.layers)``, ``hasattr(self, "fc")``, ``"b0" in
    self.blocks``, a buffer's shape), or NO_VALUE. Nothing is computed with tensors; a tensor
    attribute itself is NO_VALUE unless `tensors`."""
    value = _Static(model, globals_).ev(node)
    return NO_VALUE if isinstance(value, torch.Tensor) and not tensors else value


def module_like(value: Any) -> bool:
    """A module, or a plain list/tuple/dict holding only modules (``{'b0': self.b0, ...}``)."""
    if isinstance(value, nn.Module):
        return True
    if isinstance(value, (list, tuple)):
        return bool(value) and all(module_like(v) for v in value)
    if isinstance(value, dict):
        return bool(value) and all(module_like(v) for v in value.values())
    return False


def literal(value: Any) -> bool:
    """Whether `value` can be written into the host code as a Python literal."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (tuple, list)):
        return all(literal(v) for v in value)
    if isinstance(value, dict):
        return all(literal(k) and literal(v) for k, v in value.items())
    return False


def structure(value: Any) -> Any:
    """A literal with the shape of a module container, for the facts the host code reads from it
    (its length, its keys, whether an entry is None): containers become tuples and dicts, modules
    their class name in angle brackets."""
    if isinstance(value, (nn.ModuleDict, dict)):
        return {k: structure(v) for k, v in value.items()}
    if isinstance(value, (nn.ModuleList, nn.Sequential, list, tuple)):
        return tuple(structure(v) for v in value)
    if isinstance(value, nn.Module):
        return f"<{type(value).__name__}>"
    return value


class _FoldStatic(ast.NodeTransformer):
    """Branches on the model's structure (``if self.use_exit:``, ``if hasattr(self, "fc")``, ``a if
    self.flag else b``) are decided once, before anything is split: only the side taken remains."""

    def __init__(self, model: nn.Module, globals_: dict[str, Any]):
        self.model, self.globals = model, globals_

    def value(self, test: ast.expr) -> Any:
        v = static_value(test, self.model, self.globals)
        return v if v is NO_VALUE or literal(v) or module_like(v) or v is None else NO_VALUE

    def visit_If(self, node: ast.If) -> Any:
        self.generic_visit(node)
        v = self.value(node.test)
        if v is NO_VALUE:
            return node
        return (node.body if v else node.orelse) or [ast.copy_location(ast.Pass(), node)]

    def visit_IfExp(self, node: ast.IfExp) -> Any:
        self.generic_visit(node)
        v = self.value(node.test)
        return node if v is NO_VALUE else (node.body if v else node.orelse)


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
                elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                        and node.func.attr in LIST_UPDATES and isinstance(node.func.value, ast.Name) \
                        and any(self.expr(a) in (TENSOR, TLIST) for a in node.args):
                    self.bind(node.func.value, TLIST, node)
            if self.kind == before:
                break

    def join(self, a: str, b: str, node: ast.AST) -> str:
        if a == b:
            return a
        if MODULE in (a, b):
            raise RewriteError(f"{self.src.where(node)}: a name holds a module in one place and a value in another; "
                               "use two names")
        if TLIST in (a, b):
            if HOST in (a, b):
                return TLIST  # `outs = []`, then tensors appended
            raise RewriteError(f"{self.src.where(node)}: a name holds a tensor in one place and a list of tensors "
                               "in another; use two names")
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
                                       "is state the compiled subgraphs cannot keep; keep it in a local variable (and "
                                       "return it if the caller needs it)")
            if isinstance(target.value, ast.Name) and self.kind.get(target.value.id) in (HOST, TLIST) \
                    and kind == TENSOR:
                raise RewriteError(f"{self.src.where(node)}: assigning a tensor into a Python container cannot be "
                                   "split into static subgraphs; build a list with append, or keep the tensors in "
                                   "separate variables")

    def bind_loop(self, node: ast.For) -> None:
        it = node.iter
        kind = self.expr(it)
        if kind == TENSOR:
            raise RewriteError(f"{self.src.where(node)}: iterating over a tensor has no static form; "
                               "loop over range(...) or a ModuleList instead")
        if isinstance(it, ast.Call) and isinstance(it.func, ast.Attribute) and it.func.attr in ("keys", "items") \
                and self.expr(it.func.value) == MODULE:
            if it.func.attr == "items" and isinstance(node.target, ast.Tuple) and len(node.target.elts) == 2:
                self.bind(node.target.elts[0], HOST, node)
                self.bind(node.target.elts[1], MODULE, node)
            else:
                self.bind(node.target, HOST, node)
            return
        if kind == MODULE and isinstance(static_value(it, self.model, self.globals), (dict, nn.ModuleDict)):
            self.bind(node.target, HOST, node)  # iterating a dict of modules gives its keys
            return
        if kind == TLIST:
            self.bind(node.target, TENSOR, node)
            return
        if is_call(it, "enumerate") and it.args:
            inner = self.expr(it.args[0])
            if isinstance(node.target, ast.Tuple) and len(node.target.elts) == 2:
                self.bind(node.target.elts[0], HOST, node)
                self.bind(node.target.elts[1], MODULE if inner == MODULE else TENSOR if inner == TLIST else inner, node)
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
                if module_like(value):
                    return MODULE
                if isinstance(value, torch.Tensor):
                    return TENSOR
                return HOST
            value = static_value(node, self.model, self.globals, tensors=True)
            if value is not NO_VALUE:
                return MODULE if module_like(value) else TENSOR if isinstance(value, torch.Tensor) else HOST
            base = self.expr(node.value)
            if base == TENSOR:
                return HOST if node.attr in SHAPE_ATTRS else TENSOR
            return base if base == MODULE else HOST
        if isinstance(node, ast.Subscript):
            base = self.expr(node.value)
            if base == MODULE:
                return MODULE
            if base == TLIST:
                return TLIST if isinstance(node.slice, ast.Slice) else TENSOR
            if base == TENSOR or self.expr(node.slice) == TENSOR and not index_of_module(node, self):
                return TENSOR
            return HOST
        if isinstance(node, ast.Call):
            func = node.func
            args = [self.expr(a) for a in node.args] + [self.expr(k.value) for k in node.keywords]
            if isinstance(func, ast.Name) and func.id == "getattr" and node.args and is_self(node.args[0]) \
                    and func.id not in self.globals:
                value = static_value(node, self.model, self.globals)
                if value is NO_VALUE:  # a computed name: SkipNet's getattr(self, f"group{g}_layer{i}")
                    return MODULE
                return MODULE if module_like(value) else TENSOR if isinstance(value, torch.Tensor) else HOST
            if isinstance(func, ast.Attribute):
                owner = self.expr(func.value)
                if owner == MODULE and func.attr in ("keys", "items", "values") and not node.args:
                    return HOST if func.attr == "keys" else MODULE
                if owner == TLIST and func.attr in LIST_UPDATES:
                    return HOST  # the host keeps the list
                if owner == TENSOR:
                    return HOST if func.attr in SHAPE_METHODS else TENSOR
                if owner == MODULE:
                    return TENSOR
                if rooted_in_global(func, self.globals):
                    return TENSOR if TENSOR in args or TLIST in args or is_torch(func, self.globals) else HOST
                return TENSOR if TENSOR in args or TLIST in args else HOST
            fkind = self.expr(func)
            if fkind == MODULE:
                return TENSOR
            if isinstance(func, ast.Name) and func.id == "len":
                return HOST
            if isinstance(func, ast.Name) and func.id == "list" and args == [TLIST]:
                return TLIST
            return TENSOR if TENSOR in args or TLIST in args else HOST
        if isinstance(node, ast.Compare) and all(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops):
            return HOST  # `r is not None`: the host holds None or a tensor, and tests which
        if isinstance(node, (ast.BinOp, ast.BoolOp, ast.Compare, ast.UnaryOp)):
            parts = [node.left, node.right] if isinstance(node, ast.BinOp) else \
                node.values if isinstance(node, ast.BoolOp) else \
                [node.left, *node.comparators] if isinstance(node, ast.Compare) else [node.operand]
            kinds = [self.expr(p) for p in parts]
            if isinstance(node, ast.BinOp) and TLIST in kinds and TENSOR not in kinds:
                return TLIST  # outs + [t]
            return TENSOR if TENSOR in kinds or TLIST in kinds and not isinstance(node, ast.BinOp) else HOST
        if isinstance(node, ast.IfExp):
            if self.expr(node.test) == TENSOR:
                raise RewriteError(f"{self.src.where(node)}: a conditional expression on a tensor "
                                   "(`a if t else b`) cannot be split; write it as an if statement")
            kinds = {self.expr(node.body), self.expr(node.orelse)}
            return TENSOR if TENSOR in kinds else kinds.pop()
        if isinstance(node, ast.List):
            kinds = [self.expr(e) for e in node.elts]
            return TLIST if TENSOR in kinds else HOST
        if isinstance(node, ast.Tuple):
            kinds = [self.expr(e) for e in node.elts]
            return TENSOR if TENSOR in kinds or TLIST in kinds else HOST
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
        raise RewriteError(f"{self.src.where(node)}: unsupported expression {type(node).__name__}; "
                           "compute it in a separate statement")


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



def _rename_stacked_lists(fn: ast.FunctionDef) -> None:
    """`ids = []; ... ids.append(t) ...; ids = torch.stack(ids, 1)` (Show and Tell's sampler) gives
    one name a list and then a tensor: from that top-level statement on, the tensor gets its own
    name, so every name keeps one kind."""
    appended: set[str] = set()
    for k, stmt in enumerate(fn.body):
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name) \
                and stmt.targets[0].id in appended and isinstance(stmt.value, ast.Call) \
                and stmt.targets[0].id in names_read(stmt.value):
            old = stmt.targets[0].id
            new = f"{old}__stacked"
            stmt.targets[0].id = new
            for later in fn.body[k + 1:]:
                for n in ast.walk(later):
                    if isinstance(n, ast.Name) and n.id == old:
                        n.id = new
            appended.discard(old)
            continue
        for n in ast.walk(stmt):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in LIST_UPDATES \
                    and isinstance(n.func.value, ast.Name):
                appended.add(n.func.value.id)


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
        raise RewriteError(f"the source of {type(model).__name__}.{method} is not available ({exc}); "
                           "define the model in a .py file") from None
    fn = ast.parse(src.text).body[0]
    if not isinstance(fn, ast.FunctionDef):
        raise RewriteError(f"{src.where(fn)}: expected a def (a lambda or a decorated forward cannot be read)")
    fn = _FoldStatic(model, fn_obj.__globals__).visit(fn)
    _rename_stacked_lists(fn)
    if fn.args.vararg or fn.args.kwarg:
        raise RewriteError(f"{src.where(fn)}: *args and **kwargs in forward are not supported; "
                           "name every argument")
    if fn_obj.__code__.co_freevars:
        raise RewriteError(f"{src.where(fn)}: forward closes over local variables "
                           f"{fn_obj.__code__.co_freevars}; define the model class at module level")
    params = [a.arg for a in fn.args.args[1:]] + [a.arg for a in fn.args.kwonlyargs]
    arg_kinds = {}
    for i, name in enumerate(params):
        values = [e[i] for e in examples if i < len(e)]
        arg_kinds[name] = TENSOR if any(isinstance(v, torch.Tensor) for v in values) else HOST
    namespace: dict[str, Any] = dict(fn_obj.__globals__)
    return Forward(src, fn, Kinds(model, fn, arg_kinds, src, namespace), namespace)
