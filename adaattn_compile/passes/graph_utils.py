"""Small helpers over Dynamo FX graphs: reading fake-tensor metadata without adding guards,
recognising call spellings, and evaluating constant sub-graphs."""
from __future__ import annotations

import operator
import re
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true


def meta(node: Any) -> Optional[torch.Tensor]:
    """The fake tensor Dynamo recorded for a node (None for non-tensors)."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    return val if isinstance(val, torch.Tensor) else None


def same(a: Any, b: Any) -> bool:
    """a == b for ints or SymInts, provable without installing a guard (a dynamic length must
    never be specialised by our matching)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:
        return False


def same_shape(a, b) -> bool:
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def is_static(shape) -> bool:
    return all(isinstance(s, int) for s in shape)


def hint(x: Any) -> int:
    """A concrete value for a size, for display and planning (no guard)."""
    if isinstance(x, int):
        return x
    node = getattr(x, "node", None)
    value = getattr(node, "hint", None)
    if value is None and node is not None:
        try:
            value = node.shape_env.size_hint(node.expr)
        except Exception:
            value = None
    try:
        return int(value)
    except (TypeError, ValueError):
        return 1   # an unbacked size: plan as if tiny (display only)


def shape_hint(shape) -> tuple:
    return tuple(hint(s) for s in shape)


def is_call(node: Any, functions: Iterable = (), methods: Iterable[str] = ()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in tuple(functions)
    if node.op == "call_method":
        return node.target in tuple(methods)
    return False


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def location(node: fx.Node) -> str:
    """file:line of the user's source that produced ``node`` (its innermost frame)."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', trace)
    if not frames:
        return "<unknown>"
    path, line, _fn = frames[-1]
    return f"{short_path(path)}:{line}"


def short_path(path: str) -> str:
    import os
    parts = path.replace("\\", "/").split("/")
    if "site-packages" in parts:   # .../site-packages/transformers/models/... -> transformers/...
        return "/".join(parts[parts.index("site-packages") + 1:])
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def describe(node: Any) -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        mod = getattr(node.target, "__module__", "") or ""
        if mod.startswith("torch") and not mod.startswith("torch._C"):
            return f"{mod.replace('torch.nn.functional', 'F')}.{name}".replace("torch.nn.modules.", "")
        return name
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "placeholder":
        return f"input {node.target}"
    return f"{node.op} {node.target}"


_CONSTANT_FACTORIES = {torch.ones, torch.zeros, torch.full, torch.arange, torch.tensor,
                       torch.empty, torch.eye, torch.ones_like, torch.zeros_like, torch.full_like}


def source_name(node: fx.Node) -> str:
    """Dynamo's name for where a placeholder came from, e.g. "L['self']._buffers['bias']"."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", "")
    if callable(name):  # a method in older torch, a property in newer
        name = name()
    return str(name)


def _is_module_state(node: fx.Node) -> bool:
    """A lifted parameter or buffer (not a user input)."""
    grapharg = node.meta.get("grapharg")
    if grapharg is None:
        return False
    source = getattr(grapharg, "source", None)
    name = source_name(node)
    return "_buffers" in name or "_parameters" in name or type(source).__name__ in (
        "ParamBufferSource", "NNModuleSource", "UnspecializedParamBufferSource")


def _example(node: fx.Node):
    grapharg = node.meta.get("grapharg")
    if grapharg is None:
        return None
    try:
        return grapharg.example
    except Exception:
        return None


def constant_value(node: Any, gm: fx.GraphModule, max_nodes: int = 64):
    """Evaluate ``node`` if it depends only on constants (module buffers, in-graph factories
    with static sizes, literals); None otherwise. Used to prove masks causal and to read fill
    values. Only static shapes qualify: with dynamic shapes Dynamo won't re-specialise, so a
    fact proven at one length would not be proven for the others."""
    if not isinstance(node, fx.Node):
        return node if isinstance(node, (int, float, bool)) else None
    order, seen = [], set()

    def visit(n):
        if n in seen:
            return True
        seen.add(n)
        if len(seen) > max_nodes:
            return False
        val = n.meta.get("example_value", n.meta.get("val"))
        if isinstance(val, torch.Tensor) and not is_static(val.shape):
            return False
        if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return False
        if any(_mutates(user, n) for user in n.users):
            return False   # an in-place write (mask[...] = x) would not be seen by evaluation
        if n.op == "placeholder":
            if not _is_module_state(n) or _example(n) is None:
                return False
        elif n.op == "get_attr":
            pass
        elif n.op in ("call_function", "call_method"):
            if n.op == "call_function" and n.target in (torch.rand, torch.randn, torch.randint):
                return False
            for inp in n.all_input_nodes:
                if not visit(inp):
                    return False
        else:
            return False
        order.append(n)
        return True

    if not visit(node):
        return None
    env = {}
    try:
        with torch.no_grad():
            for n in order:
                if n.op == "placeholder":
                    env[n] = _example(n)
                elif n.op == "get_attr":
                    obj = gm
                    for part in n.target.split("."):
                        obj = getattr(obj, part)
                    env[n] = obj
                else:
                    args = fx.node.map_arg(n.args, lambda x: env[x])
                    kwargs = fx.node.map_arg(n.kwargs, lambda x: env[x])
                    if n.op == "call_function":
                        env[n] = n.target(*args, **kwargs)
                    else:
                        env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
    except Exception:
        return None
    value = env[node]
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.device.type == "meta" or "Fake" in type(value).__name__:
            return None
    return value


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                      operator.ior, operator.ixor, operator.ilshift, operator.irshift,
                      operator.imatmul}


_INPLACE_DUNDERS = frozenset({"__setitem__"} | {f"__{op.__name__}__" for op in _INPLACE_OPERATORS})
_OPERATOR_FUNCTIONS = frozenset(f for f in vars(operator).values() if callable(f)) - _INPLACE_OPERATORS


def _mutates(user: fx.Node, value: fx.Node) -> bool:
    """Whether ``user`` may write into ``value`` in place."""
    if user.op == "call_function":
        if user.target in (operator.setitem,) or "out" in user.kwargs:
            return True
        if user.target in _INPLACE_OPERATORS:
            return True
        if user.target in _OPERATOR_FUNCTIONS:
            return False   # operator.and_ / or_ / not_ are out of place despite the "_"
        name = getattr(user.target, "__name__", "")
        return name.endswith("_") and not name.startswith("_")
    if user.op == "call_method":
        name = user.target
        if name.startswith("__") and name.endswith("__"):
            # dunders (__eq__, __and__, ... as some torch versions trace `a == b`) are out of
            # place, except the augmented assignments and item writes
            return name in _INPLACE_DUNDERS
        return name.endswith("_") and bool(user.args) and user.args[0] is value
    return False


BINARY = {
    "mul": ({operator.mul, operator.imul, torch.mul}, {"mul", "mul_"}),
    "div": ({operator.truediv, operator.itruediv, torch.div, torch.true_divide}, {"div", "div_", "true_divide"}),
    "add": ({operator.add, operator.iadd, torch.add}, {"add", "add_"}),
}
