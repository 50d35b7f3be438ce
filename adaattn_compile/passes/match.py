"""Find attention sites in a Dynamo FX graph by dataflow.

Every softmax is a candidate. From it we walk *back* through score transforms (scale by
mul/div, additive biases, masked_fill/where with a very negative fill, dtype casts) to a Q·Kᵀ
product (matmul/@/bmm/einsum/baddbmm), and *forward* through casts and dropout to a P·V
product. The fake tensors Dynamo recorded prove the rest: the softmax runs over the key axis,
einsum subscripts resolve to (batch…, q, d)·(batch…, k, d), K/V repeats are GQA. Calls of
``F.scaled_dot_product_attention`` are sites as they stand. Anything we cannot prove is left
alone and reported as skipped, with the reason.

Matching never mutates the graph; ``rewrite.py`` turns each ``AttentionMatch`` into one call of
``torch.ops.adaattn.attention``.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, List, Optional, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph_utils import (BINARY, _mutates, arg, constant_value, describe, is_call, location, meta,
                          same, same_shape, source_name)

Scalar = Union[float, fx.Node]

SOFTMAX_FUNCTIONS = (F.softmax, torch.softmax, torch.special.softmax)
SDPA_FUNCTIONS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
MATMUL_FUNCTIONS = (operator.matmul, torch.matmul, torch.bmm)
MATMUL_METHODS = ("matmul", "bmm", "__matmul__")
CAST_METHODS = ("to", "float", "half", "bfloat16", "double", "type_as", "type", "contiguous", "clone")
DROPOUT_FUNCTIONS = (F.dropout, torch.dropout, torch.nn.functional.dropout)
TRANSPOSE_METHODS = ("transpose", "permute", "t", "transpose_")
# A fill this negative removes a key from a softmax (exp underflows to 0 in every float dtype).
VERY_NEGATIVE = -1e4


class NoMatch(Exception):
    """Raised inside the walkers: the reason this softmax is not (provably) attention."""


@dataclasses.dataclass
class Factor:
    op: str          # "mul" | "div"
    value: Scalar    # a Python number or a graph node holding a scalar


@dataclasses.dataclass
class Bias:
    node: fx.Node
    factors: List[Factor]    # scales applied after the bias was added: the bias takes them too
    folded: bool = True      # met where the scores are (B·H, Lq, Lk) (see AttentionMatch.fold)


@dataclasses.dataclass
class Keep:
    node: fx.Node
    invert: bool             # True: the node marks *masked* positions (masked_fill semantics)
    fill: float = float("-inf")   # what the masked scores were set to
    folded: bool = True      # met where the scores are (B·H, Lq, Lk) (see AttentionMatch.fold)


@dataclasses.dataclass
class AttentionMatch:
    kind: str                            # "sdpa" | "handwritten"
    pattern: str                         # human-readable chain of what was matched
    anchor: fx.Node                      # softmax (or SDPA) node: the site's location
    out_node: fx.Node                    # node whose value the op's output replaces
    q: fx.Node
    k: fx.Node
    v: fx.Node
    k_is_transposed: bool = False        # k holds Kᵀ (..., D, Lk): transpose it back
    q_perm: Optional[Tuple[int, ...]] = None   # einsum: permute to (batch…, L, D)
    k_perm: Optional[Tuple[int, ...]] = None
    v_perm: Optional[Tuple[int, ...]] = None
    out_perm: Optional[Tuple[int, ...]] = None  # canonical output -> the product's layout
    factors: List[Factor] = dataclasses.field(default_factory=list)
    biases: List[Bias] = dataclasses.field(default_factory=list)
    keeps: List[Keep] = dataclasses.field(default_factory=list)
    sdpa_mask: Optional[fx.Node] = None
    causal: bool = False
    dropout_p: float = 0.0
    scale: Optional[float] = None        # None: 1/sqrt(D) (SDPA's default)
    enable_gqa: bool = False
    gqa_groups: int = 1
    # What eager gives a row whose every key is masked, where the op's 0 differs (see
    # _masked_rows): "nan", "mean_v" (a uniform softmax: the mean of v) or None.
    masked_rows: Optional[str] = None
    # Scores viewed (B·H, Lq, Lk) -> (B, H, Lq, Lk) for a mask and back (BART / OPT eager):
    # q, k, v go to the op as (B, H, L, D), unflattened by these sizes (one of them -1).
    fold: Optional[Tuple[Any, Any]] = None
    compute_dtype: Optional[torch.dtype] = None
    chain: List[fx.Node] = dataclasses.field(default_factory=list)
    notes: List[str] = dataclasses.field(default_factory=list)
    # While matching: what was recognised, in source order, and the scales met so far on the
    # way back from the softmax (a bias added before them must be scaled by them too).
    pattern_parts: List[str] = dataclasses.field(default_factory=list, repr=False)
    _scale_after: List[Factor] = dataclasses.field(default_factory=list, repr=False)
    _unfolded: bool = dataclasses.field(default=False, repr=False)   # walking the 4-D stretch

    @property
    def location(self) -> str:
        return location(self.anchor)


@dataclasses.dataclass
class Skipped:
    node: fx.Node
    what: str
    reason: str

    @property
    def location(self) -> str:
        return location(self.node)


# ---------------------------------------------------------------------------------------------
# Recognisers.

def softmax_call(node: fx.Node):
    """(input, dim, dtype) if ``node`` is a softmax, else None."""
    if is_call(node, SOFTMAX_FUNCTIONS):
        return arg(node, 0, "input"), arg(node, 1, "dim"), node.kwargs.get("dtype")
    if is_call(node, methods=("softmax",)):
        return node.args[0], arg(node, 1, "dim"), node.kwargs.get("dtype")
    return None


def _is_cast(node) -> bool:
    if is_call(node, methods=CAST_METHODS):
        return True
    return is_call(node, (torch.Tensor.to, torch.Tensor.float, torch.Tensor.contiguous))


def _binary(node, kind):
    functions, methods = BINARY[kind]
    if is_call(node, functions, methods) and len(node.args) >= 2 and not node.kwargs.get("alpha") \
            and node.kwargs.get("rounding_mode") is None:
        return node.args[0], node.args[1]
    return None


def _scalar(x) -> bool:
    """A number, or a node holding one element (a 0-d tensor or a SymFloat)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return True
    if isinstance(x, fx.Node):
        val = x.meta.get("example_value")
        if isinstance(val, (torch.SymInt, torch.SymFloat)):
            return True
        t = meta(x)
        return t is not None and t.dim() == 0 and t.is_floating_point()
    return False


def _fill_value(x, gm) -> Optional[float]:
    value = constant_value(x, gm)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _is_matmul(node) -> bool:
    return is_call(node, MATMUL_FUNCTIONS, MATMUL_METHODS)


def _is_einsum(node) -> bool:
    return is_call(node, (torch.einsum, torch.functional.einsum))


def _einsum_operands(node) -> Tuple[str, list]:
    equation = node.args[0]
    operands = list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    return equation, operands


def _parse_einsum(equation: str, ndims: List[int]) -> Tuple[List[str], str]:
    """Subscripts with '...' expanded into fresh capital letters (the same ones for every
    operand, right-aligned as einsum broadcasts them)."""
    equation = equation.replace(" ", "")
    if "->" not in equation:
        raise NoMatch("einsum without an explicit output")
    lhs, out = equation.split("->")
    inputs = lhs.split(",")
    if len(inputs) != len(ndims):
        raise NoMatch("einsum operand count")
    fresh = "ZYXWVUTSRQPONM"
    ell = max([nd - (len(sub) - 3) for sub, nd in zip(inputs, ndims) if "..." in sub] + [0])
    expanded = []
    for sub, nd in zip(inputs, ndims):
        if "..." in sub:
            n = nd - (len(sub) - 3)
            sub = sub.replace("...", fresh[ell - n:ell] if n else "")
        expanded.append(sub)
    if "..." in out:
        out = out.replace("...", fresh[:ell])
    for sub, nd in zip(expanded, ndims):
        if len(sub) != nd or len(set(sub)) != len(sub):
            raise NoMatch(f"einsum subscripts {equation!r} (repeated or mismatched letters)")
    return expanded, out


# ---------------------------------------------------------------------------------------------
# The Q·Kᵀ product.

def _strip_transpose(node) -> Optional[fx.Node]:
    """If ``node`` is X with its last two dims swapped, return X."""
    t = meta(node)
    if t is None or t.dim() < 2:
        return None
    nd = t.dim()
    if is_call(node, (torch.transpose,), ("transpose",)):
        dims = {d % nd for d in node.args[1:3]} if len(node.args) >= 3 else set()
        return node.args[0] if dims == {nd - 1, nd - 2} else None
    if is_call(node, (torch.permute,), ("permute",)):
        perm = node.args[1:] if not isinstance(node.args[1], (list, tuple)) else node.args[1]
        perm = [p % nd for p in perm]
        return node.args[0] if perm == list(range(nd - 2)) + [nd - 1, nd - 2] else None
    if is_call(node, (getattr,)) and len(node.args) == 2 and node.args[1] == "mT":
        return node.args[0]
    if is_call(node, (torch.t,), ("t",)) and nd == 2:
        return node.args[0]
    return None


def _match_qk(node, m: AttentionMatch, scores_meta):
    """Fill q/k (and baddbmm's bias and alpha) from the product node; raise if it isn't one."""
    if _is_matmul(node):
        a, b = node.args[0], node.args[1]
        ta, tb = meta(a), meta(b)
        if ta is None or tb is None or ta.dim() < 2 or tb.dim() < 2:
            raise NoMatch("Q·Kᵀ operands are not matrices")
        if _is_weight(b):
            raise NoMatch("softmax of a linear layer (second operand is a weight, not keys)")
        m.q = a
        stripped = _strip_transpose(b)
        if stripped is not None:
            m.k = stripped
        else:
            m.k, m.k_is_transposed = b, True
        m.pattern_parts.append(describe(node))
        return
    if is_call(node, (torch.baddbmm,), ("baddbmm",)):
        bias, a, b = node.args[0], arg(node, 1, "batch1"), arg(node, 2, "batch2")
        beta = node.kwargs.get("beta", 1)
        alpha = node.kwargs.get("alpha", 1)
        if not (_scalar(alpha) and _scalar(beta)) or isinstance(beta, fx.Node):
            raise NoMatch("baddbmm with non-constant beta")
        m.q = a
        stripped = _strip_transpose(b)
        if stripped is not None:
            m.k = stripped
        else:
            m.k, m.k_is_transposed = b, True
        if alpha != 1:
            m.factors.append(Factor("mul", alpha))
        if beta != 0 and isinstance(bias, fx.Node):
            factors = [] if beta == 1 else [Factor("mul", float(beta))]
            m.biases.append(Bias(bias, factors + list(m._scale_after), not m._unfolded))
        m.pattern_parts.append("baddbmm")
        return
    if _is_einsum(node):
        equation, ops = _einsum_operands(node)
        if len(ops) != 2 or not all(isinstance(o, fx.Node) and meta(o) is not None for o in ops):
            raise NoMatch("einsum with other than two tensor operands")
        (x, y), z = _parse_einsum(equation, [meta(o).dim() for o in ops])
        contracted = (set(x) & set(y)) - set(z)
        batch = [c for c in z if c in x and c in y]
        i = [c for c in z if c in x and c not in y]
        j = [c for c in z if c in y and c not in x]
        if len(contracted) != 1 or len(i) != 1 or len(j) != 1 or \
                set(x) != set(batch) | set(i) | contracted or set(y) != set(batch) | set(j) | contracted:
            raise NoMatch(f"einsum {equation!r} is not a Q·Kᵀ product")
        if z != "".join(batch) + i[0] + j[0]:
            raise NoMatch(f"einsum {equation!r}: scores not laid out (…, query, key)")
        d = contracted.pop()
        m.q, m.k = ops
        m.q_perm = _perm(x, "".join(batch) + i[0] + d)
        m.k_perm = _perm(y, "".join(batch) + j[0] + d)
        m.pattern_parts.append(f"einsum({equation})")
        return
    raise NoMatch(f"softmax input is not a Q·Kᵀ product (reached {describe(node)})")


def _perm(src: str, dst: str) -> Optional[Tuple[int, ...]]:
    perm = tuple(src.index(c) for c in dst)
    return None if perm == tuple(range(len(perm))) else perm


def _is_weight(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "get_attr":
        return True
    if node.op == "placeholder":
        return "_parameters" in source_name(node)
    stripped = _strip_transpose(node)
    return stripped is not None and _is_weight(stripped)


# ---------------------------------------------------------------------------------------------
# Walking back from the softmax input to the product.

def _walk_scores(node, m: AttentionMatch, gm, scores_meta):
    x = node
    for _ in range(64):
        if not isinstance(x, fx.Node):
            raise NoMatch("softmax input is not a tensor computed in the graph")
        if _is_matmul(x) or _is_einsum(x) or is_call(x, (torch.baddbmm,), ("baddbmm",)):
            if m._unfolded:
                raise NoMatch("scores merged from (B, H, ..) that were never split")
            _match_qk(x, m, scores_meta)
            m.chain.append(x)
            t = meta(x)
            if t is None or not same_shape(t.shape, scores_meta.shape):
                raise NoMatch("a bias broadcasts the scores to a larger shape")
            m.factors.extend(m._scale_after)
            return
        # Scores used elsewhere too (e.g. as type_as's dtype) stay computed for those users;
        # the rewrite is still exact.
        m.chain.append(x)
        if _is_cast(x):
            x = x.args[0]
            continue
        mul = _binary(x, "mul")
        if mul is not None:
            a, b = mul
            if _scalar(b) and isinstance(a, fx.Node):
                m._scale_after.insert(0, Factor("mul", b)); x = a
            elif _scalar(a) and isinstance(b, fx.Node):
                m._scale_after.insert(0, Factor("mul", a)); x = b
            else:
                raise NoMatch("scores multiplied by a non-scalar tensor")
            m.pattern_parts.append("mul-scale")
            continue
        div = _binary(x, "div")
        if div is not None:
            a, b = div
            if not _scalar(b):
                raise NoMatch("scores divided by a non-scalar tensor")
            m._scale_after.insert(0, Factor("div", b)); x = a
            m.pattern_parts.append("div-scale")
            continue
        add = _binary(x, "add")
        if add is not None:
            x = _split_add(x, add, m, gm, scores_meta)
            continue
        if is_call(x, (torch.masked_fill,), ("masked_fill", "masked_fill_")):
            scores, mask, fill = x.args[0], arg(x, 1, "mask"), arg(x, 2, "value")
            m.keeps.append(Keep(mask, True, _check_fill(fill, gm, m), not m._unfolded))
            m.pattern_parts.append("masked_fill")
            x = scores
            continue
        if is_call(x, (torch.where,)) and len(x.args) == 3:
            cond, a, b = x.args
            fill_b = _fill_value(b, gm) if not _on_path(b) else None
            fill_a = _fill_value(a, gm) if not _on_path(a) else None
            if fill_b is not None:
                m.keeps.append(Keep(cond, False, _check_fill(b, gm, m), not m._unfolded))
                x = a
            elif fill_a is not None:
                m.keeps.append(Keep(cond, True, _check_fill(a, gm, m), not m._unfolded))
                x = b
            else:
                raise NoMatch("torch.where without a constant fill value")
            m.pattern_parts.append("where")
            continue
        if is_call(x, (torch.reshape,), ("view", "reshape")):
            x = _batch_fold(x, m)
            continue
        raise NoMatch(f"softmax input is not a Q·Kᵀ product (reached {describe(x)})")
    raise NoMatch("score chain too long")


def _batch_fold(x, m: AttentionMatch):
    """A view / reshape of the scores that only merges (B, H) into B·H or splits it back. Walking
    back from the softmax the merge comes first: the scores are 4-D from there to the split,
    which gives the sizes q, k and v are unflattened by."""
    src = x.args[0]
    t_out, t_in = meta(x), meta(src)
    if t_out is None or t_in is None or not same_shape(t_out.shape[-2:], t_in.shape[-2:]):
        raise NoMatch("scores reshaped across the query / key dims")
    if t_out.dim() == 3 and t_in.dim() == 4 and m.fold is None and not m._unfolded:
        m._unfolded = True
    elif t_out.dim() == 4 and t_in.dim() == 3 and m._unfolded:
        sizes = x.args[1] if len(x.args) == 2 and isinstance(x.args[1], (tuple, list)) \
            else x.args[1:]
        if len(sizes) != 4:
            raise NoMatch("scores split by a shape not given as four sizes")
        b, h = sizes[0], sizes[1]
        m.fold = (-1, h) if isinstance(b, int) and b == -1 else (b, -1)
        m._unfolded = False
    else:
        raise NoMatch("scores reshaped other than by splitting B·H into (B, H) and back")
    m.pattern_parts.append("view")
    return src


def _on_path(x) -> bool:
    t = meta(x)
    return t is not None and t.dim() >= 2


def _check_fill(fill, gm, m):
    value = _fill_value(fill, gm)
    if value is None or not value <= VERY_NEGATIVE:
        raise NoMatch(f"mask fill value {value if value is not None else describe(fill)} "
                      "is not very negative (not a mask)")
    for factor in m._scale_after:
        if isinstance(factor.value, fx.Node) or factor.value <= 0:
            raise NoMatch("mask applied before a scale of unknown sign")
    return value


def _split_add(x, operands, m, gm, scores_meta):
    """scores + bias: decide which operand carries the scores (the one that reaches a product)."""
    a, b = operands
    for path, bias in ((a, b), (b, a)):
        if not isinstance(path, fx.Node):
            continue
        if isinstance(bias, (int, float)) and not isinstance(bias, bool):
            if not math.isfinite(bias):
                raise NoMatch("non-finite constant added to scores")
            m.pattern_parts.append("add-const")   # softmax is shift invariant: drop it
            return path
        if isinstance(bias, fx.Node) and _reaches_product(path):
            tb = meta(bias)
            if tb is None:
                raise NoMatch("bias is not a tensor")
            m.biases.append(Bias(bias, list(m._scale_after), not m._unfolded))
            m.pattern_parts.append("add-bias")
            return path
    raise NoMatch("neither operand of an add reaches a Q·Kᵀ product")


def _reaches_product(x, depth=0) -> bool:
    if not isinstance(x, fx.Node) or depth > 32:
        return False
    if _is_matmul(x) or _is_einsum(x) or is_call(x, (torch.baddbmm,), ("baddbmm",)):
        return True
    if _is_cast(x) or _binary(x, "mul") or _binary(x, "div") or \
            is_call(x, (torch.masked_fill, torch.where), ("masked_fill", "masked_fill_")):
        return any(_reaches_product(a, depth + 1) for a in x.args if isinstance(a, fx.Node))
    if _binary(x, "add"):
        return any(_reaches_product(a, depth + 1) for a in x.args[:2])
    if is_call(x, (torch.reshape,), ("view", "reshape")):
        return _reaches_product(x.args[0], depth + 1)
    return False


# ---------------------------------------------------------------------------------------------
# Walking forward from the softmax output to the P·V product.

def _walk_probs(softmax: fx.Node, m: AttentionMatch):
    x = softmax
    for _ in range(16):
        users = list(x.users)
        if len(users) != 1:
            others = ", ".join(describe(u) for u in users) or "nothing"
            raise NoMatch(f"attention probabilities escape (used by {others}); "
                          "they would no longer be produced")
        u = users[0]
        if _is_cast(u) and u.args[0] is x:
            m.chain.append(u); x = u
            continue
        if is_call(u, DROPOUT_FUNCTIONS):
            p = arg(u, 1, "p", 0.5)
            training = arg(u, 2, "training" if u.target is not torch.dropout else "train", True)
            if isinstance(training, fx.Node) or (training and isinstance(p, fx.Node)):
                raise NoMatch("dropout with a non-constant probability")
            if not training:
                p = 0.0
            if training and p > 0:
                if m.dropout_p:
                    raise NoMatch("two dropouts on the probabilities")
                m.dropout_p = float(p)
            m.pattern_parts.append("dropout" if training and p > 0 else "dropout(eval)")
            m.chain.append(u); x = u
            continue
        if _is_matmul(u) and u.args[0] is x and len(u.args) >= 2:
            v = u.args[1]
            tv = meta(v)
            if tv is None or tv.dim() < 2:
                raise NoMatch("P·V operand is not a matrix")
            m.v, m.out_node = v, u
            m.pattern_parts.append(describe(u))
            return
        if _is_einsum(u):
            _match_pv_einsum(u, x, m)
            return
        raise NoMatch(f"unsupported op between softmax and P·V ({describe(u)})")
    raise NoMatch("probability chain too long")


def _match_pv_einsum(node, probs, m: AttentionMatch):
    equation, ops = _einsum_operands(node)
    if len(ops) != 2 or probs not in ops or ops[0] is ops[1]:
        raise NoMatch("einsum P·V with other than two operands")
    pi = ops.index(probs)
    v = ops[1 - pi]
    subs, out = _parse_einsum(equation, [meta(o).dim() for o in ops])
    p_sub, v_sub = subs[pi], subs[1 - pi]
    batch, qi, kj = p_sub[:-2], p_sub[-2], p_sub[-1]
    extra = [c for c in v_sub if c not in p_sub]
    if len(extra) != 1 or set(v_sub) != set(batch) | {kj} | set(extra) or kj in out or \
            set(out) != set(batch) | {qi} | set(extra) or len(out) != len(batch) + 2:
        raise NoMatch(f"einsum {equation!r} is not a P·V product")
    e = extra[0]
    m.v, m.out_node = v, node
    m.v_perm = _perm(v_sub, batch + kj + e)
    m.out_perm = _perm(batch + qi + e, out)
    m.pattern_parts.append(f"einsum({equation})")


# ---------------------------------------------------------------------------------------------
# GQA: K/V repeated per query-head group.

def _strip_repeat(node) -> Optional[Tuple[fx.Node, int]]:
    """(kv, n_rep) if ``node`` is a (B, Hkv·n, L, D) repeat of a (B, Hkv, L, D) tensor."""
    t = meta(node)
    if t is None or t.dim() != 4:
        return None
    if is_call(node, (torch.repeat_interleave,), ("repeat_interleave",)):
        reps, dim = arg(node, 1, "repeats"), arg(node, 2, "dim")
        if isinstance(reps, int) and dim is not None and dim % 4 == 1:
            return node.args[0], reps
        return None
    if is_call(node, (torch.reshape,), ("reshape", "view")):
        expand = node.args[0]
        te = meta(expand)
        if not is_call(expand, methods=("expand",)) or te is None or te.dim() != 5:
            return None
        src = expand.args[0]
        if is_call(src, (operator.getitem,)):
            idx = src.args[1]
            ok = isinstance(idx, tuple) and len(idx) >= 3 and idx[2] is None and all(
                isinstance(s, slice) and s == slice(None) for s in idx[:2])
        elif is_call(src, (torch.unsqueeze,), ("unsqueeze",)):
            ok = src.args[1] == 2
        else:
            ok = False
        if not ok:
            return None
        base = src.args[0]
        tb = meta(base)
        if tb is None or tb.dim() != 4 or not same(te.shape[1], tb.shape[1]):
            return None
        n_rep = te.shape[2]
        if not isinstance(n_rep, int) or not same(t.shape[1], tb.shape[1] * n_rep):
            return None
        return base, n_rep
    return None


def _detect_gqa(m: AttentionMatch):
    if m.k_is_transposed or m.k_perm or m.v_perm:
        return
    rk, rv = _strip_repeat(m.k), _strip_repeat(m.v)
    if rk and rv and rk[1] == rv[1] and rk[1] > 1:
        m.k, m.v = rk[0], rv[0]
        m.enable_gqa, m.gqa_groups = True, rk[1]
        m.pattern_parts.append(f"repeat_kv×{rk[1]}")


# ---------------------------------------------------------------------------------------------
# Masks: prove constant causal masks causal.

def causal_kind(mask: torch.Tensor, lq: int, lk: int, keep_semantics: Optional[bool]):
    """'causal' if a constant mask is exactly SDPA's top-left causal mask, 'none' if it masks
    nothing, else None. keep_semantics: True for bool keep-masks, False for bool masked-masks,
    None for additive masks."""
    if mask.dim() < 2 or mask.shape[-1] != lk or mask.shape[-2] not in (lq,):
        if not (mask.dim() >= 1 and mask.numel() > 0):
            return None
    try:
        full = mask.expand(*mask.shape[:-2], lq, lk) if mask.dim() >= 2 else None
    except RuntimeError:
        return None
    if full is None:
        return None
    tril = torch.ones(lq, lk, dtype=torch.bool, device=mask.device).tril()
    if keep_semantics is None:
        if full.dtype == torch.bool or not full.is_floating_point():
            return None
        kept = full == 0
        dropped = full <= VERY_NEGATIVE
        if not bool((kept | dropped).all()):
            return None
        keep = kept
    else:
        keep = full.bool() if keep_semantics else ~full.bool()
    keep = keep.reshape(-1, lq, lk)
    if bool((keep == tril).all()):
        return "causal"
    if bool(keep.all()):
        return "none"
    return None


_AND_FUNCTIONS = (operator.and_, torch.logical_and, torch.bitwise_and)
_AND_METHODS = ("__and__", "logical_and", "bitwise_and")
_BROADCAST_FUNCTIONS = (torch.broadcast_to,)
_BROADCAST_METHODS = ("expand", "expand_as", "broadcast_to")


def _all_true(node, gm) -> bool:
    value = constant_value(node, gm)
    if value is True:
        return True
    return (isinstance(value, torch.Tensor) and value.dtype == torch.bool
            and bool(value.all()))


def narrow_mask(node, gm, keep_semantics: bool):
    """The smallest ancestor of a mask that, broadcast to the mask's shape, equals it, so that
    the kernel reads it through stride-0 dims instead of a materialised (B, H, Lq, Lk) tensor
    (Inductor writes the expanded mask out in full before an extern call). Walks back through
    ``expand`` / ``broadcast_to`` (the input broadcasts to the output by definition) and, for
    bool keep-masks, through ``a & b`` where one side is a constant that is all True (then
    ``a & b`` is ``b`` broadcast). HF's ``sdpa_mask`` for a padding mask is
    ``(q_idx >= 0) & padding[b, kv_idx]`` expanded to (B, 1, Lq, Lk): this leaves the
    (B, 1, 1, Lk) padding. Returns ``node`` itself where nothing narrows."""
    def usable(candidate):
        t = meta(candidate)
        return (isinstance(candidate, fx.Node) and t is not None
                and not any(_mutates(user, candidate) for user in candidate.users))

    while isinstance(node, fx.Node):
        if (is_call(node, _BROADCAST_FUNCTIONS, _BROADCAST_METHODS) and node.args
                and usable(node.args[0])):
            node = node.args[0]
            continue
        if (keep_semantics and is_call(node, _AND_FUNCTIONS, _AND_METHODS)
                and len(node.args) == 2 and not node.kwargs):
            a, b = node.args
            for const, other in ((a, b), (b, a)):
                if (usable(other) and meta(other).dtype == torch.bool
                        and _all_true(const, gm)):
                    node = other
                    break
            else:
                return node
            continue
        return node
    return node


def _narrowed(node, gm, keep_semantics, m: AttentionMatch):
    narrowed = narrow_mask(node, gm, keep_semantics)
    if narrowed is not node:
        m.notes.append(f"mask read as its broadcast {tuple(meta(narrowed).shape)} input "
                       f"(was {tuple(meta(node).shape)})")
    return narrowed


def _masked_rows(m: AttentionMatch, fills):
    """A row whose every key is masked: the op gives 0 (SDPA's convention), eager softmax NaN
    where every masked score is -inf (-inf fills), and a uniform softmax, the mean of v, where
    every masked score holds one finite fill (``masked_fill(mask, finfo.min)``: equal scores).
    The rewrite gives eager's answer for sites masked by fills alone. With an additive mask the
    op's 0 stays (README: the kernels take entries below about -2.3e38, HF's finfo.min, as
    -inf, so a dead row's lse cannot tell eager's NaN from its mean of v); with finite fills
    as well the report says so. ``fills``: every fill value, those of masks since proven causal
    included (a causal additive mask: its masked value)."""
    if m.biases:
        if any(math.isfinite(f) for f in fills):
            m.notes.append("a fully masked row gives 0 (finite mask fills mixed with an "
                           "additive mask: eager's value there is not known)")
        return
    if fills <= {float("-inf")}:
        m.masked_rows = "nan"
    elif len(fills) == 1:
        m.masked_rows = "mean_v"
    else:
        m.notes.append("a fully masked row gives 0 (masks filled with different values: "
                       "eager's value there is not known)")


def _simplify_masks(m: AttentionMatch, gm, lq: int, lk: int, fills: set):
    """Drop constant masks that are causal (-> is_causal) or mask nothing; read the others
    through their broadcast inputs (:func:`narrow_mask`)."""
    if not (isinstance(lq, int) and isinstance(lk, int)):
        return
    kept_keeps = []
    for keep in m.keeps:
        value = constant_value(keep.node, gm)
        kind = causal_kind(value, lq, lk, not keep.invert) if isinstance(value, torch.Tensor) else None
        if kind == "causal" and not m.causal:
            m.causal = True
            m.notes.append("constant mask proven causal")
        elif kind == "none":
            m.notes.append("constant mask masks nothing: dropped")
        else:
            keep.node = _narrowed(keep.node, gm, not keep.invert, m)
            kept_keeps.append(keep)
    m.keeps = kept_keeps
    kept_biases = []
    for bias in m.biases:
        value = constant_value(bias.node, gm)
        kind = causal_kind(value, lq, lk, None) if isinstance(value, torch.Tensor) else None
        if kind == "causal" and not m.causal:
            m.causal = True
            m.notes.append("constant additive mask proven causal")
            future = torch.ones(lq, lk, dtype=torch.bool).triu(1)
            masked = value.expand(*value.shape[:-2], lq, lk)[..., future]
            if masked.numel():   # (its masked value; 1 x 1 and the like mask nothing)
                fills.add(float(masked.min()))
        elif kind == "none":
            m.notes.append("constant zero bias dropped")
        else:
            if not bias.factors:   # (a scaled bias: the factor applies to the whole)
                bias.node = _narrowed(bias.node, gm, False, m)
            kept_biases.append(bias)
    m.biases = kept_biases


# ---------------------------------------------------------------------------------------------
# Entry points.

def _new_match(kind, anchor) -> AttentionMatch:
    return AttentionMatch(kind=kind, pattern="", anchor=anchor, out_node=anchor, q=None, k=None,
                          v=None)


def match_softmax(node: fx.Node, gm: fx.GraphModule) -> AttentionMatch:
    inp, dim, _dtype = softmax_call(node)
    t_in = meta(inp)
    if t_in is None or dim is None or not isinstance(dim, int):
        raise NoMatch("softmax without a constant dim")
    if t_in.dim() < 2:
        raise NoMatch("softmax over a vector")
    if dim % t_in.dim() != t_in.dim() - 1:
        raise NoMatch(f"softmax over a non-key axis (dim {dim} of a {t_in.dim()}-D score tensor)")
    m = _new_match("handwritten", node)
    _walk_scores(inp, m, gm, t_in)
    m.pattern_parts.reverse()
    m.pattern_parts.append("softmax" + ("(fp32)" if _dtype is not None or
                                         (_is_cast(inp)) else ""))
    _walk_probs(node, m)
    m.chain.append(node)
    _finish(m, gm)
    return m


def _finish(m: AttentionMatch, gm):
    tq, tk, tv, tout = meta(m.q), meta(m.k), meta(m.v), meta(m.out_node)
    if any(t is None for t in (tq, tk, tv, tout)):
        raise NoMatch("missing shape metadata")
    _detect_gqa(m)
    for factor in m.factors:
        if isinstance(factor.value, fx.Node):
            m.notes.append("tensor-valued scale folded into q")
    numbers = [f for f in m.factors if not isinstance(f.value, fx.Node)]
    scale = 1.0
    for f in numbers:
        scale = scale * f.value if f.op == "mul" else scale / f.value
    m.scale = scale if m.kind == "handwritten" else m.scale
    m.compute_dtype = tout.dtype
    if not tout.is_floating_point():
        raise NoMatch(f"attention in {tout.dtype}")
    lq, lk = (_len(m.q, m.q_perm), _len(m.k, m.k_perm if not m.k_is_transposed else None,
                                        transposed=m.k_is_transposed))
    fills = {keep.fill for keep in m.keeps}   # (masks proven causal below count too)
    _simplify_masks(m, gm, lq, lk, fills)
    if m.kind == "handwritten" and (m.keeps or m.biases):   # (causal alone: every row has a key)
        _masked_rows(m, fills)
    m.pattern = " → ".join(m.pattern_parts)


def _len(node, perm, transposed=False):
    shape = list(meta(node).shape)
    if perm:
        shape = [shape[p] for p in perm]
    return shape[-1] if transposed else shape[-2]


def match_sdpa(node: fx.Node, gm: fx.GraphModule) -> AttentionMatch:
    q, k, v = arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")
    mask = arg(node, 3, "attn_mask")
    dropout_p = arg(node, 4, "dropout_p", 0.0)
    is_causal = arg(node, 5, "is_causal", False)
    scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
    enable_gqa = node.kwargs.get("enable_gqa", node.args[7] if len(node.args) > 7 else False)
    for name, value in (("dropout_p", dropout_p), ("is_causal", is_causal), ("scale", scale),
                        ("enable_gqa", enable_gqa)):
        if isinstance(value, fx.Node):
            raise NoMatch(f"SDPA argument {name} is not a constant")
    m = _new_match("sdpa", node)
    m.q, m.k, m.v, m.out_node = q, k, v, node
    m.sdpa_mask = mask
    m.dropout_p, m.causal, m.scale = float(dropout_p), bool(is_causal), scale
    m.enable_gqa = bool(enable_gqa)
    tq, tk = meta(q), meta(k)
    if tq is None or tk is None or meta(v) is None:
        raise NoMatch("missing shape metadata")
    if m.enable_gqa:
        m.gqa_groups = tq.shape[-3] // tk.shape[-3] if isinstance(tq.shape[-3], int) else 1
    m.pattern_parts.append("F.scaled_dot_product_attention")
    m.chain.append(node)
    tout = meta(node)
    if not m.enable_gqa:
        _detect_gqa(m)
    m.compute_dtype = tout.dtype if tout is not None else tq.dtype
    if mask is not None and not m.causal and isinstance(tq.shape[-2], int) and isinstance(tk.shape[-2], int):
        value = constant_value(mask, gm)
        if isinstance(value, torch.Tensor):
            kind = causal_kind(value, tq.shape[-2], tk.shape[-2],
                                True if value.dtype == torch.bool else None)
            if kind in ("causal", "none"):
                m.sdpa_mask = None
                m.causal = kind == "causal"
                m.notes.append("constant mask proven causal" if m.causal else "constant mask masks nothing: dropped")
    if m.sdpa_mask is not None and meta(m.sdpa_mask) is not None:
        m.sdpa_mask = _narrowed(m.sdpa_mask, gm, meta(m.sdpa_mask).dtype == torch.bool, m)
    m.pattern = " → ".join(m.pattern_parts)
    return m


def find_attention(gm: fx.GraphModule) -> Tuple[List[AttentionMatch], List[Skipped]]:
    matches: List[AttentionMatch] = []
    skipped: List[Skipped] = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        try:
            if is_call(node, SDPA_FUNCTIONS):
                matches.append(match_sdpa(node, gm))
            elif softmax_call(node) is not None:
                matches.append(match_softmax(node, gm))
        except NoMatch as why:
            what = "F.scaled_dot_product_attention" if is_call(node, SDPA_FUNCTIONS) else "softmax"
            skipped.append(Skipped(node, what, str(why)))
    return matches, skipped
