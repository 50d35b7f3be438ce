"""A position bias that depends only on the key-query offset, given to the op as a table.

T5's attention bias is ``embedding(bucket(j - i))`` permuted to (1, H, Lq, Lk): a function of
the offset j - i alone. Stock torch.compile fuses that gather into its softmax kernel and never
stores the bias; we had to realise it (8 x 4096 x 4096 in bf16 is 256 MiB for t5-small at
L = 4096), kept alive across the six layers that read it, and every layer's kernel read it from
memory. Such a bias is constant along diagonals (a Toeplitz matrix), which no non-negative
strides describe; reversing the keys makes it constant along anti-diagonals instead (a Hankel
matrix, ``bias'[i, j'] = t[i + j']``), and that *is* a strided view of the (.., Lq + Lk - 1)
table ``t``: strides (1, 1) over the last two dims. Attention does not depend on the order of
its keys as long as K, V and the bias are permuted alike, so a non-causal site without dropout
becomes ``attention(q, flip(k), flip(v), t.as_strided(...))``: the table is Lq + Lk - 1 values
a head, the two flips copy K and V (a few MiB), and the kernels read the bias through its
strides as any other mask (a tile spans Lq_tile + Lk_tile - 1 addresses: it stays in cache).

Proof, in the Dynamo graph, before anything is changed: the mask an op call reads is computed
from one offset grid ``R = A - B`` (A and B unit-step ``arange`` progressions laid along two
different dims, so ``R[x, y] = c + a x + b y`` with ``a = -b``) through element-wise calls (with
Python scalars, 0-dim tensors or other values computed from R), embedding lookups whose index
is computed from R (the table is an outside tensor), permutes / unsqueezes / casts, and
``torch.where(keep, bias, fill)`` with a constant ``keep`` that is all True; the
mask's last two dims are R's query and key dims (followed through those calls), every other dim
comes from elsewhere (the heads, size-1 dims). The table is then that same computation run on
``R'`` -- R with the query dim shrunk to 1 and the key dim stretched to the Lq + Lk - 1 values
``R`` takes on the anti-diagonals. Anything else (a padding mask added, a cache position, a
causal site, dropout, gradients to take, symbolic lengths) is left as it was.
"""
from __future__ import annotations

import logging
import operator
import os
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph_utils import _mutates, meta
from .match import _all_true
from .rewrite import erase_dead, insert_node
from .share_masks import cone

log = logging.getLogger("adaattn")

_MASK_ARG, _DROPOUT_ARG, _CAUSAL_ARG, _SITE_ARG = 3, 4, 5, 8

NOTE = ("position bias of the key-query offset alone: passed as a per-offset table (a strided "
        "view over reversed keys), not realised")

# Element-wise calls a bias computation uses (no reductions: torch.min / max count only with
# two tensor operands, see _elementwise).
_EW_FUNCTIONS = {torch.abs, torch.neg, torch.log, torch.log2, torch.exp, torch.sqrt,
                 torch.sign, torch.floor, torch.ceil, torch.round, torch.clamp, torch.clip,
                 torch.minimum, torch.maximum, torch.where, torch.lt, torch.le, torch.gt,
                 torch.ge, torch.eq, torch.ne, torch.logical_not, torch.logical_and,
                 torch.logical_or, torch.add, torch.sub, torch.mul, torch.div,
                 torch.true_divide, torch.floor_divide, torch.remainder, torch.full_like,
                 torch.zeros_like, torch.ones_like, torch.min, torch.max,
                 operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
                 operator.mod, operator.neg, operator.lt, operator.le, operator.gt, operator.ge,
                 operator.eq, operator.ne, operator.and_, operator.or_, operator.invert,
                 operator.iadd, operator.isub, operator.imul, operator.itruediv, abs}
_EW_METHODS = {"abs", "neg", "log", "log2", "exp", "sqrt", "sign", "floor", "ceil", "round",
               "clamp", "clip", "clamp_min", "clamp_max", "minimum", "maximum", "where", "lt",
               "le", "gt", "ge", "eq", "ne", "logical_not", "add", "sub", "mul", "div",
               "floor_divide", "remainder", "to", "float", "double", "half", "bfloat16", "long",
               "int", "bool", "type_as", "contiguous", "clone", "__add__", "__radd__",
               "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__floordiv__",
               "__neg__", "__abs__", "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__",
               "__and__", "__or__", "__invert__"}
_INT_DTYPES = (torch.int64, torch.int32)   # (the table's offsets reach 2 L: no narrower ones)


def _node_args(node: fx.Node) -> list:
    return list(node.args) + list(node.kwargs.values())


# ---------------------------------------------------------------------------------------------
# The offset grid: R = A - B of two unit-step progressions.

def _progression(node, depth=0) -> Optional[Tuple[int, int, int, int]]:
    """(start, length, axis, ndim) when ``node`` is ``start + arange(length)`` laid along
    ``axis`` of an ``ndim``-dim integer tensor whose other dims have size 1; else None."""
    if not isinstance(node, fx.Node) or depth > 16 or node.op not in ("call_function",
                                                                      "call_method"):
        return None
    target, args = node.target, node.args
    if node.op == "call_function" and target is torch.arange:
        values = list(args) + [node.kwargs[k] for k in ("start", "end", "step")
                               if k in node.kwargs]
        if not all(type(a) is int for a in values):
            return None
        if node.kwargs.get("dtype") not in (None,) + _INT_DTYPES:
            return None
        start, end, step = ((0, values[0], 1) if len(values) == 1 else
                            (values[0], values[1], 1) if len(values) == 2 else tuple(values[:3]))
        if step != 1 or end <= start:
            return None
        return start, end - start, 0, 1
    first = args[0] if args else None
    inner = _progression(first, depth + 1) if isinstance(first, fx.Node) else None
    is_add = target in (operator.add, torch.add) or target in ("add", "__add__", "__radd__")
    is_sub = target in (operator.sub, torch.sub) or target in ("sub", "__sub__")
    if (is_add or is_sub) and len(args) == 2 and not node.kwargs:
        a, b = args
        if inner is not None and type(b) is int:
            return (inner[0] + b if is_add else inner[0] - b,) + inner[1:]
        other = _progression(b, depth + 1) if isinstance(b, fx.Node) else None
        if is_add and type(a) is int and other is not None:
            return (other[0] + a,) + other[1:]
        return None
    if inner is None:
        return None
    start, length, axis, ndim = inner
    if target is operator.getitem and isinstance(args[1], tuple):
        out_axis, used = 0, 0
        for item in args[1]:
            if item is None:
                out_axis += 1
            elif item == slice(None, None, None):
                if used == axis:
                    axis_out = out_axis
                used += 1
                out_axis += 1
            else:
                return None
        if used != ndim:
            return None
        return start, length, axis_out, out_axis
    if target in (torch.unsqueeze, "unsqueeze") and len(args) == 2 and type(args[1]) is int:
        d = args[1] if args[1] >= 0 else args[1] + ndim + 1
        if not 0 <= d <= ndim:
            return None
        return start, length, axis + (d <= axis), ndim + 1
    if target in ("to", "long", "int", "contiguous", "clone"):
        value = meta(node)
        if value is None or value.dtype not in _INT_DTYPES:
            return None
        return inner
    return None


def _offset_grid(node: fx.Node):
    """(c, coefficients by dim, lengths by dim) for ``R = A - B``: R[x] = c + sum(coef x)."""
    is_sub = (node.op == "call_function" and node.target in (operator.sub, torch.sub)
              or node.op == "call_method" and node.target in ("sub", "__sub__"))
    if not is_sub or len(node.args) != 2 or node.kwargs:
        return None
    a, b = (_progression(x) for x in node.args)
    if a is None or b is None or a[3] != b[3] or a[2] == b[2]:
        return None
    ndim = a[3]
    coef, lengths = [0] * ndim, [1] * ndim
    coef[a[2]], lengths[a[2]] = 1, a[1]
    coef[b[2]], lengths[b[2]] = -1, b[1]
    value = meta(node)
    if value is None or value.dtype not in _INT_DTYPES or tuple(value.shape) != tuple(lengths):
        return None
    return a[0] - b[0], coef, lengths


# ---------------------------------------------------------------------------------------------
# Following R's dims to the mask.

def _elementwise(node: fx.Node) -> bool:
    if node.op == "call_function":
        if node.target in (torch.min, torch.max):   # (one tensor: a reduction)
            return len(node.args) == 2 and isinstance(node.args[1], fx.Node) and not node.kwargs
        return node.target in _EW_FUNCTIONS
    return node.op == "call_method" and node.target in _EW_METHODS


def _dims_of(node, derived: Dict[fx.Node, tuple]) -> Optional[tuple]:
    """The dims of ``node``'s result, each the grid dim it runs along (None: not along one);
    None when a call is not one this proof knows."""
    target, args = node.target, node.args
    if node.op == "call_function" and target is F.embedding:
        index, weight = args[0], (args[1] if len(args) > 1 else node.kwargs.get("weight"))
        max_norm = args[3] if len(args) > 3 else node.kwargs.get("max_norm")
        if index not in derived or weight in derived or max_norm is not None:
            return None   # (max_norm renormalises the table in place)
        return derived[index] + (None,)
    source = args[0] if args else None
    if target in (torch.permute, "permute") and source in derived:
        order = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        dims = derived[source]
        if sorted(d % len(dims) for d in order) != list(range(len(dims))):
            return None
        return tuple(dims[d % len(dims)] for d in order)
    if target in (torch.transpose, "transpose") and source in derived and len(args) == 3:
        dims = list(derived[source])
        a, b = args[1] % len(dims), args[2] % len(dims)
        dims[a], dims[b] = dims[b], dims[a]
        return tuple(dims)
    if target in (torch.unsqueeze, "unsqueeze") and source in derived and len(args) == 2:
        dims = list(derived[source])
        d = args[1] if args[1] >= 0 else args[1] + len(dims) + 1
        dims.insert(d, None)
        return tuple(dims)
    if not _elementwise(node):
        return None
    result = meta(node)
    if result is None:
        return None
    out: List[Optional[int]] = [None] * result.dim()
    for value in _node_args(node):
        if isinstance(value, fx.Node) and value in derived:
            dims = derived[value]
            if len(dims) > len(out):
                return None
            for pos, d in enumerate(dims, start=len(out) - len(dims)):
                if d is not None:
                    if out[pos] not in (None, d):
                        return None
                    out[pos] = d
        elif isinstance(value, fx.Node):
            other = meta(value)
            if other is None or other.dim() != 0:
                return None   # (a tensor from elsewhere: a padding mask, a cache position)
        elif isinstance(value, (list, tuple, dict)):
            return None
    return tuple(out)


def _kept_operand(node: fx.Node, derived, gm) -> Optional[fx.Node]:
    """For ``torch.where(keep, x, fill)`` with ``x`` computed from the grid and ``keep`` a
    constant that is all True (HF's sdpa path combines a position bias with its mask this
    way, and builds an encoder's mask without padding as one): ``x``, which the call returns
    unchanged (same shape, same dtype); else None."""
    if not (node.op == "call_function" and node.target is torch.where
            and len(node.args) == 3 and not node.kwargs):
        return None
    keep, kept = node.args[0], node.args[1]
    if keep in derived or kept not in derived:
        return None
    result, value = meta(node), meta(kept)
    if (result is None or value is None or result.dtype != value.dtype
            or tuple(result.shape) != tuple(value.shape) or not _all_true(keep, gm)):
        return None
    return kept


def _prove(mask: fx.Node, gm: fx.GraphModule):
    """(root, grid, dims of every derived node in graph order, the calls that return one of
    their operands) when ``mask`` is a function of one offset grid alone (see the module's
    docstring); else None."""
    ancestors = cone({mask})
    grids = {n: g for n in ancestors if (g := _offset_grid(n)) is not None}
    if len(grids) != 1:
        return None
    (root, grid), = grids.items()
    derived: Dict[fx.Node, tuple] = {root: tuple(d if grid[1][d] else None
                                                 for d in range(len(grid[1])))}
    passed: Dict[fx.Node, fx.Node] = {}
    for node in mask.graph.nodes:   # (graph order: inputs before users)
        if node not in ancestors or node is root:
            continue
        if not any(i in derived for i in node.all_input_nodes):
            continue   # outside the bias's own computation (checked when read)
        if node.op not in ("call_function", "call_method"):
            return None
        kept = _kept_operand(node, derived, gm)
        if kept is not None:
            derived[node], passed[node] = derived[kept], kept
            continue
        dims = _dims_of(node, derived)
        if dims is None:
            return None
        derived[node] = dims
    if mask not in derived:
        return None
    # every value the computation reads from outside is a constant, 0-dim, or an embedding's
    # table; none of them, nor anything of the computation, is written by a call outside it
    for node in derived:
        for value in (node.all_input_nodes if node not in passed and node is not root else ()):
            if value in derived:
                continue
            if not (node.op == "call_function" and node.target is F.embedding
                    and value is not node.args[0]):
                other = meta(value)
                if other is None or other.dim() != 0:
                    return None
            if any(_mutates(u, value) for u in value.users):
                return None
        if any(_mutates(u, node) for u in node.users if u not in derived):
            return None
    return root, grid, derived, passed


# ---------------------------------------------------------------------------------------------
# The rewrite.

def _table(graph: fx.Graph, root, grid, derived, passed, mask: fx.Node, q_dim: int,
           k_dim: int, lq: int, lk: int, mode) -> fx.Node:
    """The bias computation again on R' (see the module's docstring): -> the contiguous table,
    the mask's shape with its query dim 1 and its key dim Lq + Lk - 1."""
    c, coef, _ = grid
    a = coef[q_dim]   # R = c + a i + b j, b = -a; with j = lk - 1 - j': c + b (lk - 1) + a s
    start = c + coef[k_dim] * (lk - 1)
    n = lq + lk - 1
    dtype = meta(root).dtype
    device = meta(root).device
    steps = insert_node(graph, "call_function", torch.arange, (n,),
                        {"dtype": dtype, "device": device}, fake_mode=mode)
    values = insert_node(graph, "call_function", operator.add if a > 0 else operator.sub,
                         (start, steps) if a < 0 else (steps, start), fake_mode=mode)
    shape = [1] * len(coef)
    shape[k_dim] = n
    copies: Dict[fx.Node, fx.Node] = {root: insert_node(graph, "call_method", "view",
                                                        (values, tuple(shape)), fake_mode=mode)}
    for node in derived:
        if node is root:
            continue
        if node in passed:   # (an all-True where: its kept operand, see _kept_operand)
            copies[node] = copies[passed[node]]
            continue
        args = fx.node.map_arg(node.args, lambda x: copies.get(x, x))
        kwargs = fx.node.map_arg(node.kwargs, lambda x: copies.get(x, x))
        copies[node] = insert_node(graph, node.op, node.target, args, kwargs, fake_mode=mode)
        # every value of the copy has the original's shape with the query dim 1 and the key
        # dim n, as the proof's dims say: anything else (a broadcast the dims did not foresee)
        # would compute another table
        value, copy = meta(node), meta(copies[node])
        want = None if value is None else tuple(
            1 if d == q_dim else n if d == k_dim else size
            for d, size in zip(derived[node], value.shape))
        if copy is None or want is None or tuple(copy.shape) != want:
            raise RuntimeError(f"relative bias: {node.format_node()} gave "
                               f"{None if copy is None else tuple(copy.shape)} on the table, "
                               f"not {want} ({copies[node].meta.get('adaattn_fake_error')})")
    return insert_node(graph, "call_method", "contiguous", (copies[mask],), fake_mode=mode)


def relative_bias_tables(gm: fx.GraphModule, training: bool = False) -> List[str]:
    """Give each eligible op call its bias as a per-offset table (module docstring); -> the
    sites changed. Inference only, for now: through the view, the table's gradient is the
    op's dense mask gradient summed along anti-diagonals by as_strided's backward (the CPU run
    of a training step matched float64, 1e-6), but that backward's speed and memory on the GPU
    have not been measured."""
    if training or os.environ.get("ADAATTN_RELATIVE_BIAS", "1") == "0":   # (0: for A/B runs)
        return []
    attention = torch.ops.adaattn.attention.default
    graph = gm.graph
    proofs: Dict[fx.Node, object] = {}
    views: Dict[fx.Node, fx.Node] = {}
    changed: List[str] = []
    dead: List[fx.Node] = []
    for call in list(graph.nodes):
        if call.op != "call_function" or call.target is not attention:
            continue
        mask = call.args[_MASK_ARG]
        if (not isinstance(mask, fx.Node) or call.args[_CAUSAL_ARG]
                or call.args[_DROPOUT_ARG] != 0):
            continue
        q, k, v = (meta(a) for a in call.args[:3])
        bias = meta(mask)
        if (q is None or k is None or v is None or bias is None or bias.dim() < 2
                or not bias.is_floating_point()):   # (a bool keep mask is no bias)
            continue
        lq, lk = q.shape[-2], k.shape[-2]
        if not all(type(s) is int for s in (lq, lk, *bias.shape)) \
                or tuple(bias.shape[-2:]) != (lq, lk):
            continue   # (symbolic lengths: the table's length would be one too)
        if mask not in proofs:
            proofs[mask] = _prove(mask, gm)
        proof = proofs[mask]
        if proof is None:
            continue
        root, grid, derived, passed = proof
        dims = derived[mask]
        q_dim, k_dim = dims[-2], dims[-1]
        if (q_dim is None or k_dim is None or q_dim == k_dim
                or any(d is not None for d in dims[:-2])
                or grid[2][q_dim] != lq or grid[2][k_dim] != lk):
            continue
        mode = getattr(bias, "fake_mode", None)
        before = set(graph.nodes)
        try:
            with graph.inserting_before(call):
                view = views.get(mask)
                if view is None:
                    table = _table(graph, root, grid, derived, passed, mask, q_dim, k_dim, lq,
                                   lk, mode)
                    strides = list(meta(table).stride())
                    strides[-2] = 1   # (the table's query dim has size 1: its stride is free)
                    shape = tuple(bias.shape)
                    strides = tuple(0 if size == 1 else s for size, s in zip(shape, strides))
                    view = insert_node(graph, "call_method", "as_strided",
                                       (table, shape, strides), fake_mode=mode)
                    if meta(view) is None:
                        raise RuntimeError(view.meta.get("adaattn_fake_error"))
                flipped = [insert_node(graph, "call_function", torch.flip, (x, (-2,)),
                                       fake_mode=mode) for x in call.args[1:3]]
        except Exception as exc:   # (the site keeps its mask as it was: undo what was added)
            for node in reversed([n for n in graph.nodes if n not in before]):
                graph.erase_node(node)
            log.debug("adaattn: relative bias of %s not tabled: %s", mask.name, exc)
            proofs[mask] = None
            continue
        views[mask] = view
        call.args = (call.args[0], *flipped, view) + call.args[_MASK_ARG + 1:]
        changed.append(call.args[_SITE_ARG])
        dead.append(mask)
    if changed:
        erase_dead(gm, dead)
    return changed
