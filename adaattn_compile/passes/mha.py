"""``F.multi_head_attention_forward``: Dynamo keeps nn.MultiheadAttention's functional core as
one opaque call, so its attention is invisible to the dataflow matcher. When it returns no
weights (``need_weights=False``, as nn.Transformer*Layer call it) its core is an SDPA call: we
swap the node's target for ``mha_forward``, torch's same steps with that call made to
``torch.ops.adaattn.attention``."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph_utils import arg, location, meta

_MHA_ARG_NAMES = ["query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight",
                  "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "dropout_p",
                  "out_proj_weight", "out_proj_bias"]


def mha_forward(query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias,
                bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias,
                training=True, key_padding_mask=None, need_weights=True, attn_mask=None,
                use_separate_proj_weight=False, q_proj_weight=None, k_proj_weight=None,
                v_proj_weight=None, static_k=None, static_v=None, average_attn_weights=True,
                is_causal=False, *, adaattn_site: str, adaattn_policy: str, adaattn_kernel: str):
    """``F.multi_head_attention_forward``'s need_weights=False path (torch's own steps, in
    torch's order) with its SDPA call replaced by ``torch.ops.adaattn.attention``. The matcher
    only routes calls without bias_k/bias_v, add_zero_attn or static_k/static_v."""
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask), other_name="attn_mask", target_type=query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the "
                           "Transformer module method `generate_square_subsequent_mask` to "
                           "create this mask.")
    if is_causal and key_padding_mask is None:
        attn_mask = None   # the hint is trusted, as torch does without need_weights
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                      other_name="", target_type=query.dtype, check_other=False)
        if key_padding_mask is not None:
            is_causal = False
    tgt_len, bsz, embed_dim = query.shape
    head_dim = embed_dim // num_heads
    if not use_separate_proj_weight:
        q, k, v = F._in_projection_packed(query, key, value, in_proj_weight, in_proj_bias)
    else:
        b_q, b_k, b_v = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
        q, k, v = F._in_projection(query, key, value, q_proj_weight, k_proj_weight,
                                   v_proj_weight, b_q, b_k, b_v)
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    src_len = k.size(1)
    if key_padding_mask is not None:
        padding = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
                   .reshape(bsz * num_heads, 1, src_len))
        attn_mask = padding if attn_mask is None else attn_mask + padding
    if not training:
        dropout_p = 0.0
    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, head_dim)
    out = torch.ops.adaattn.attention(q, k, v, attn_mask, float(dropout_p), bool(is_causal), None,
                                      False, adaattn_site, adaattn_policy, adaattn_kernel)[0]
    out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    out = F.linear(out, out_proj_weight, out_proj_bias).view(tgt_len, bsz, -1)
    return (out if batched else out.squeeze(1)), None


@dataclasses.dataclass
class MhaMatch:
    node: fx.Node
    q_shape: tuple
    k_shape: tuple
    v_shape: tuple
    mask: Optional[str]
    causal: bool
    dropout_p: float
    pattern: str = "nn.MultiheadAttention (F.multi_head_attention_forward → SDPA)"

    @property
    def location(self) -> str:
        return location(self.node)


def is_mha(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is F.multi_head_attention_forward


def match_mha(node: fx.Node) -> MhaMatch:
    """Raises ValueError with the reason if this call can't be routed."""
    need_weights = node.kwargs.get("need_weights", True)
    if need_weights is not False:
        raise ValueError("nn.MultiheadAttention returns its attention weights (need_weights=True):"
                         " the probabilities escape")
    for name, index in (("bias_k", 7), ("bias_v", 8)):
        if arg(node, index, name) is not None:
            raise ValueError(f"nn.MultiheadAttention with {name}")
    if arg(node, 9, "add_zero_attn"):
        raise ValueError("nn.MultiheadAttention with add_zero_attn")
    if node.kwargs.get("static_k") is not None or node.kwargs.get("static_v") is not None:
        raise ValueError("nn.MultiheadAttention with static_k/static_v")
    query, key, value = (meta(arg(node, i, n)) for i, n in enumerate(_MHA_ARG_NAMES[:3]))
    heads = arg(node, 4, "num_heads")
    if query is None or key is None or value is None or not isinstance(heads, int):
        raise ValueError("nn.MultiheadAttention without shape metadata")
    batched = query.dim() == 3
    tgt, src = query.shape[0], key.shape[0]
    bsz = query.shape[1] if batched else 1
    embed = query.shape[-1]
    head_dim = embed // heads
    masks = [node.kwargs.get("attn_mask"), node.kwargs.get("key_padding_mask")]
    masks = [meta(m) for m in masks if m is not None]
    mask = None
    if masks:
        mask = "bool" if all(m.dtype == torch.bool for m in masks) else "additive"
    dropout = arg(node, 10, "dropout_p", 0.0)
    training = node.kwargs.get("training", True)
    if isinstance(dropout, fx.Node) or isinstance(training, fx.Node):
        raise ValueError("nn.MultiheadAttention with a non-constant dropout")
    return MhaMatch(node, (bsz, heads, tgt, head_dim), (bsz, heads, src, head_dim),
                    (bsz, heads, src, head_dim), mask,
                    bool(node.kwargs.get("is_causal", False)) and mask is None,
                    float(dropout) if training else 0.0)


def rewrite_mha(m: MhaMatch, site_id: str, policy: str, kernel: str) -> None:
    m.node.target = mha_forward
    m.node.kwargs = {**m.node.kwargs, "adaattn_site": site_id, "adaattn_policy": policy,
                     "adaattn_kernel": kernel}
