"""One mask for the attention sites that each build the same one.

HF's T5 computes its (1, H, L, L) position bias once, but every layer then builds its own mask
from it: ``torch.where(mask, position_bias, finfo.min).contiguous()`` (or ``position_bias +
mask``, or just ``position_bias.contiguous()``). Eager drops each copy after its layer. In the
rewritten graph Inductor computed the six per-layer copies in one fused kernel (they read the
same inputs), so four of them were alive at once: for t5-small at L = 4096, four 256 MiB
buffers, 1189 MiB at peak against 714 for stock torch.compile (H100). After AOT autograd the
copies cannot be merged any more: each ``where`` got a scalar ``full`` node of its own.

So before that, in the Dynamo graph: a node in the backward cone of an attention mask that
repeats an earlier node's computation (same pure operation, same inputs after this pass's
replacements, same constants) is replaced by the earlier node, unless something between the
two may write in place (a write through any view could change the first result) or either
result is written in place later (through a view too).
"""
from __future__ import annotations

import operator
from typing import Any, Dict, Optional, Set

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph_utils import _mutates

_MASK_ARG = 3   # adaattn::attention(q, k, v, attn_mask, ...)

# Functions and tensor methods without side effects or randomness that mask code uses.
_PURE_FUNCTIONS = {torch.where, torch.add, torch.sub, torch.mul, torch.div, torch.neg,
                   torch.full, torch.zeros, torch.ones, torch.arange, torch.minimum,
                   torch.maximum, torch.abs, torch.log, torch.logical_not, torch.logical_and,
                   torch.logical_or, torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge,
                   torch.permute, torch.transpose, torch.unsqueeze, torch.squeeze,
                   torch.reshape, torch.masked_fill, torch.full_like, torch.zeros_like,
                   torch.ones_like, operator.add, operator.sub, operator.mul, operator.truediv,
                   operator.neg, operator.getitem, operator.eq, operator.ne, operator.lt,
                   operator.le, operator.gt, operator.ge, operator.and_, operator.or_,
                   operator.invert}
_PURE_METHODS = {"contiguous", "clone", "to", "float", "half", "bfloat16", "bool", "type_as",
                 "expand", "expand_as", "view", "reshape", "permute", "transpose", "unsqueeze",
                 "squeeze", "masked_fill", "where", "add", "sub", "mul", "div", "neg",
                 "logical_not", "eq", "ne", "lt", "le", "gt", "ge", "__getitem__", "__add__",
                 "__sub__", "__mul__", "__eq__", "__ne__", "__and__", "__or__", "__invert__"}


def _mask_inputs(gm: fx.GraphModule) -> Set[fx.Node]:
    """The masks given to attention sites: our op's, and torch SDPA's (small sites)."""
    attention = torch.ops.adaattn.attention.default
    masks = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is attention and len(node.args) > _MASK_ARG:
            mask = node.args[_MASK_ARG]
        elif node.target is F.scaled_dot_product_attention:
            mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        else:
            continue
        if isinstance(mask, fx.Node):
            masks.add(mask)
    return masks


def cone(masks: Set[fx.Node]) -> Set[fx.Node]:
    """The nodes ``masks`` are computed from, themselves included."""
    seen: Set[fx.Node] = set()
    stack = list(masks)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return seen


def _pure(node: fx.Node) -> bool:
    if "out" in node.kwargs:
        return False
    if node.op == "call_function":
        return node.target in _PURE_FUNCTIONS
    return node.op == "call_method" and node.target in _PURE_METHODS


def _key(value: Any) -> Any:
    """A hashable stand-in for an argument (None where there is none). A merged node's users
    already point at the node kept, so nodes stand for themselves."""
    if isinstance(value, fx.Node):
        return ("node", value)
    if isinstance(value, (tuple, list, torch.Size)):
        parts = tuple(_key(v) for v in value)
        return None if None in parts else (type(value).__name__, parts)
    if isinstance(value, dict):
        parts = tuple((k, _key(v)) for k, v in sorted(value.items()))
        return None if any(p[1] is None for p in parts) else ("dict", parts)
    if isinstance(value, float) and value != value:
        return ("nan",)
    if value is None or isinstance(value, (bool, int, float, str, slice, torch.dtype,
                                           torch.device, torch.memory_format, torch.layout)):
        return (type(value).__name__, repr(value) if isinstance(value, slice) else value)
    return None


def _writes_between(first: fx.Node, later: fx.Node) -> bool:
    node = first.next
    while node is not later:
        if node.op in ("call_function", "call_method", "call_module") and any(
                isinstance(a, fx.Node) and _mutates(node, a) for a in node.args[:1]):
            return True
        if node.op == "call_module":   # a module may write anything
            return True
        node = node.next
    return False


# Calls whose result may alias their first argument: a write through it writes the argument.
_ALIASING_METHODS = {"contiguous", "to", "float", "half", "bfloat16", "bool", "type_as",
                     "expand", "expand_as", "view", "reshape", "permute", "transpose",
                     "unsqueeze", "squeeze", "__getitem__", "view_as", "flatten", "unflatten",
                     "narrow", "select", "as_strided", "detach", "t", "T", "mT", "real"}
_ALIASING_FUNCTIONS = {torch.permute, torch.transpose, torch.unsqueeze, torch.squeeze,
                       torch.reshape, operator.getitem, torch.flatten, torch.narrow,
                       torch.select, torch.detach, torch.as_strided}


def _never_written(node: fx.Node) -> bool:
    """Whether no later call writes into ``node``'s result, also through a view of it."""
    stack, seen = [node], set()
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        for user in value.users:
            if _mutates(user, value) or user.op == "call_module":
                return False
            if (user.op == "call_method" and user.target in _ALIASING_METHODS
                    or user.op == "call_function" and user.target in _ALIASING_FUNCTIONS) \
                    and user.args and user.args[0] is value:
                stack.append(user)
    return True


def _key_strided(node: fx.Node) -> bool:
    """Whether the tensor ``node`` makes is known not to have unit key (last) stride."""
    example = node.meta.get("example_value")
    if not isinstance(example, torch.Tensor) or example.dim() < 2:
        return False
    try:
        return example.size(-1) > 1 and int(example.stride(-1)) != 1
    except Exception:   # (a symbolic stride: leave it)
        return False


def copy_shared_strided_masks(gm: fx.GraphModule) -> int:
    """One ``.contiguous()`` copy for a mask that several of our sites read and whose keys are
    not adjacent in memory (T5's eager attention hands every layer its position bias as a
    permuted view of an (L, L, H) gather): every site then reads its mask tiles with unit key
    stride, and the copy is the only mask-sized buffer (the op's flexible layout lets Inductor
    realise it once for all its readers; computed inline, the gather itself is never stored).
    Without the copy the kernels would read keys H elements apart at every site. -> copies
    made."""
    attention = torch.ops.adaattn.attention.default
    made = 0
    for mask in list(_mask_inputs(gm)):
        sites = [u for u in mask.users if u.op == "call_function" and u.target is attention
                 and len(u.args) > _MASK_ARG and u.args[_MASK_ARG] is mask]
        if len(sites) < 2 or not _key_strided(mask):
            continue
        with gm.graph.inserting_after(mask):
            copy = gm.graph.call_method("contiguous", (mask,))
        try:
            copy.meta["example_value"] = mask.meta["example_value"].contiguous()
        except Exception:
            pass
        for site in sites:
            site.args = site.args[:_MASK_ARG] + (copy,) + site.args[_MASK_ARG + 1:]
        made += 1
    return made


def share_mask_computations(gm: fx.GraphModule) -> int:
    """Merge repeated pure computations in the cones of attention masks; -> nodes merged."""
    in_cone = cone(_mask_inputs(gm))
    first: Dict[Any, fx.Node] = {}
    merged = 0
    for node in list(gm.graph.nodes):
        if node not in in_cone or not _pure(node):
            continue
        key: Optional[Any] = (node.op, node.target, _key(node.args), _key(dict(node.kwargs)))
        if key[2] is None or key[3] is None:
            continue
        if not _never_written(node):
            continue
        kept = first.get(key)
        if kept is None or _writes_between(kept, node):
            first[key] = node
            continue
        node.replace_all_uses_with(kept)
        gm.graph.erase_node(node)
        merged += 1
    return merged
