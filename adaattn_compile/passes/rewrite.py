"""Rewrite each matched attention site into one ``torch.ops.adaattn.attention`` call.

The new nodes are inserted just before the P·V product (every input of the site is defined by
then), the product's users are pointed at the op's output, and the matched chain, now dead, is
erased. Fake-tensor metadata is computed for each new node so later passes see a complete graph.
"""
from __future__ import annotations

import itertools
import operator
from typing import List, Optional

import torch
import torch.fx as fx
import torch.utils._pytree

from .graph_utils import meta
from .match import AttentionMatch

_site_ids = itertools.count()


def new_site_id() -> str:
    return f"s{next(_site_ids)}"


def _fake_mode(values):
    # The mode the inputs' fake tensors belong to (an enclosing tracing context may hold
    # another one, and modes must not be mixed).
    for value in values:
        mode = getattr(value, "fake_mode", None)
        if mode is not None:
            return mode
    return None


def insert_node(graph: fx.Graph, kind: str, target, args, kwargs=None,
                stack_trace=None, fake_mode=None) -> fx.Node:
    """A new call node with Dynamo's ``example_value`` metadata (``fake_mode``: the mode to
    compute it in where no tensor argument carries one, e.g. a factory call)."""
    node = graph.create_node(kind, target, tuple(args), kwargs or {})
    if stack_trace:
        node.meta["stack_trace"] = stack_trace
    # Fake-run the new node so it carries example_value like Dynamo's own nodes.
    fake_args = fx.node.map_arg(node.args, lambda n: n.meta.get("example_value"))
    fake_kwargs = fx.node.map_arg(node.kwargs, lambda n: n.meta.get("example_value"))
    flat = [a for a in torch.utils._pytree.tree_leaves((fake_args, fake_kwargs))
            if isinstance(a, torch.Tensor)]
    mode = _fake_mode(flat) or fake_mode
    try:
        if mode is not None:
            with mode:
                value = (target(*fake_args, **fake_kwargs) if kind == "call_function"
                         else getattr(fake_args[0], target)(*fake_args[1:], **fake_kwargs))
            node.meta["example_value"] = value
    except Exception as exc:
        node.meta["adaattn_fake_error"] = repr(exc)
    return node


def _apply_factor(graph, node, factor, trace):
    target = operator.mul if factor.op == "mul" else operator.truediv
    return insert_node(graph, "call_function", target, (node, factor.value), stack_trace=trace)


def _cast(graph, node, dtype, trace):
    t = meta(node)
    if t is None or t.dtype == dtype:
        return node
    return insert_node(graph, "call_method", "to", (node, dtype), stack_trace=trace)


def remap_inputs(m: AttentionMatch, replaced: dict) -> None:
    """Point a match at the new nodes of sites rewritten before it (one attention's output can
    be another's input: its old P·V node is gone)."""
    def fix(node):
        while node in replaced:
            node = replaced[node]
        return node
    m.q, m.k, m.v, m.sdpa_mask = fix(m.q), fix(m.k), fix(m.v), fix(m.sdpa_mask)
    for item in (*m.keeps, *m.biases):
        item.node = fix(item.node)
    for factor in [*m.factors, *(f for b in m.biases for f in b.factors)]:
        factor.value = fix(factor.value)


def rewrite_site(gm: fx.GraphModule, m: AttentionMatch, site_id: str, policy: str,
                 kernel: str, replaced: dict) -> fx.Node:
    """Insert the op call for ``m``; records m.out_node -> its replacement in ``replaced``."""
    remap_inputs(m, replaced)
    graph = gm.graph
    trace = m.anchor.meta.get("stack_trace")
    with graph.inserting_before(m.out_node):
        q, k, v = m.q, m.k, m.v
        if m.q_perm:
            q = insert_node(graph, "call_method", "permute", (q, *m.q_perm), stack_trace=trace)
        for factor in m.factors:
            if isinstance(factor.value, fx.Node):   # tensor/symbolic scales: fold into q
                q = _apply_factor(graph, q, factor, trace)
        if m.k_is_transposed:
            k = insert_node(graph, "call_method", "transpose", (k, -2, -1), stack_trace=trace)
        if m.k_perm:
            k = insert_node(graph, "call_method", "permute", (k, *m.k_perm), stack_trace=trace)
        if m.v_perm:
            v = insert_node(graph, "call_method", "permute", (v, *m.v_perm), stack_trace=trace)
        if m.fold is not None:   # (B·H, L, D) -> (B, H, L, D), as the mask's scores were
            q, k, v = (insert_node(graph, "call_method", "unflatten", (t, 0, m.fold),
                                   stack_trace=trace) for t in (q, k, v))
        q, k, v = (_cast(graph, t, m.compute_dtype, trace) for t in (q, k, v))
        mask = _build_mask(graph, m, trace)
        # out in (B, L, H, D) memory where the heads go back next to each other next: that
        # transpose is then a view, not a copy kernel with a buffer of its own
        blhd = {"out_blhd": True} if heads_transposed_next(m, q) else None
        call = insert_node(graph, "call_function", torch.ops.adaattn.attention.default,
                           (q, k, v, mask, float(m.dropout_p), bool(m.causal), m.scale,
                            bool(m.enable_gqa), site_id, policy, kernel), blhd,
                           stack_trace=trace)
        out = insert_node(graph, "call_function", operator.getitem, (call, 0), stack_trace=trace)
        if m.masked_rows is not None:
            out = _eager_masked_rows(graph, m, call, out, v, trace)
        if m.fold is not None:
            out = insert_node(graph, "call_method", "flatten", (out, 0, 1), stack_trace=trace)
        if m.out_perm:
            out = insert_node(graph, "call_method", "permute", (out, *m.out_perm),
                              stack_trace=trace)
    m.out_node.replace_all_uses_with(out)
    replaced[m.out_node] = out
    return call


_HEADS_SWAPS = ({1, 2}, {-3, -2}, {1, -2}, {-3, 2})


def _swaps_heads(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` is ``node.transpose(1, 2)`` or ``node.permute(0, 2, 1, 3)`` (method or
    function form) of a 4-D ``node``."""
    if user.op not in ("call_method", "call_function") or user.kwargs:
        return False
    name = user.target if user.op == "call_method" else getattr(user.target, "__name__", "")
    args = user.args
    if not args or args[0] is not node:
        return False
    if name == "transpose" and len(args) == 3:
        return {args[1], args[2]} in _HEADS_SWAPS
    if name == "permute":
        dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
        return tuple(d % 4 if isinstance(d, int) else d for d in dims) == (0, 2, 1, 3)
    return False


def _same_shape_view(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` is a ``reshape`` / ``view`` of ``node`` to its own shape (a view of any
    strides: HF's ``sdpa_attention_forward`` reshapes SDPA's output to (B, -1, Lq, D), undoing
    a GQA packing that is not there, before it transposes)."""
    if (user.op != "call_method" or user.target not in ("reshape", "view") or user.kwargs
            or not user.args or user.args[0] is not node):
        return False
    before, after = meta(node), meta(user)
    return before is not None and after is not None and tuple(before.shape) == tuple(after.shape)


def _all_swap_heads(node: fx.Node, depth: int = 0) -> bool:
    users = list(node.users)
    return bool(users) and depth < 4 and all(
        _swaps_heads(u, node) or (_same_shape_view(u, node) and _all_swap_heads(u, depth + 1))
        for u in users)


def heads_transposed_next(m: AttentionMatch, q: fx.Node) -> bool:
    """Whether the site's (B, H, Lq, D) output has the heads swapped with the sequence next:
    its permute back to the product's layout does it (an einsum into ``bqhd``), or every user
    of the product transposes dims 1 and 2 (through reshapes to the same shape). No torch side
    effects."""
    tq = meta(q)
    if tq is None or tq.dim() != 4 or m.fold is not None or m.masked_rows is not None:
        return False
    if m.out_perm is not None:
        return tuple(m.out_perm) == (0, 2, 1, 3)
    return _all_swap_heads(m.out_node)


def _eager_masked_rows(graph, m: AttentionMatch, call, out, v, trace) -> fx.Node:
    """Rows with every key masked (lse = -inf) take eager's value (see match._masked_rows)
    instead of the op's 0: NaN, or the mean of v over the keys."""
    lse = insert_node(graph, "call_function", operator.getitem, (call, 1), stack_trace=trace)
    dead = insert_node(graph, "call_function", torch.isneginf, (lse,), stack_trace=trace)
    dead = insert_node(graph, "call_method", "unsqueeze", (dead, -1), stack_trace=trace)
    if m.masked_rows == "nan":
        value = float("nan")
    else:
        value = insert_node(graph, "call_method", "mean", (v, -2), {"keepdim": True},
                            stack_trace=trace)
        if m.enable_gqa and m.gqa_groups > 1:
            value = insert_node(graph, "call_method", "repeat_interleave",
                                (value, m.gqa_groups), {"dim": -3}, stack_trace=trace)
    return insert_node(graph, "call_function", torch.where, (dead, value, out), stack_trace=trace)


def _unfold_mask(graph, m: AttentionMatch, item, trace) -> fx.Node:
    """A mask met where the scores were (B·H, Lq, Lk), in the op's (B, H, Lq, Lk) terms: one
    with a B·H leading dim is unflattened (others broadcast as they are)."""
    t = meta(item.node)
    if m.fold is None or not item.folded or t is None or t.dim() != 3 or t.shape[0] == 1:
        return item.node
    return insert_node(graph, "call_method", "unflatten", (item.node, 0, m.fold),
                       stack_trace=trace)


def _build_mask(graph, m: AttentionMatch, trace) -> Optional[fx.Node]:
    if m.kind == "sdpa":
        return m.sdpa_mask
    keep = None
    for item in m.keeps:
        node = _unfold_mask(graph, m, item, trace)
        t = meta(node)
        if t is not None and t.dtype != torch.bool:
            node = insert_node(graph, "call_method", "bool", (node,), stack_trace=trace)
        if item.invert:
            node = insert_node(graph, "call_function", torch.logical_not, (node,),
                               stack_trace=trace)
        keep = node if keep is None else insert_node(graph, "call_function", torch.logical_and,
                                                     (keep, node), stack_trace=trace)
    bias = None
    for item in m.biases:
        node = _unfold_mask(graph, m, item, trace)
        for factor in item.factors:
            node = _apply_factor(graph, node, factor, trace)
        bias = node if bias is None else insert_node(graph, "call_function", operator.add,
                                                     (bias, node), stack_trace=trace)
    if keep is not None and bias is not None:
        return insert_node(graph, "call_function", torch.where, (keep, bias, float("-inf")),
                           stack_trace=trace)
    return keep if keep is not None else bias


def erase_dead(gm: fx.GraphModule, candidates: List[fx.Node]) -> None:
    """Erase nodes of the replaced chains (and their now-unused producers) that nothing uses.
    Only pure calls go: in-place methods and side-effecting calls stay."""
    pending = set(candidates)
    for node in reversed(list(gm.graph.nodes)):
        if node not in pending:
            continue
        if node.users or node.op not in ("call_function", "call_method") or node.is_impure():
            continue
        if node.op == "call_method" and node.target.endswith("_"):
            continue
        pending.update(n for n in node.all_input_nodes)
        gm.graph.erase_node(node)
