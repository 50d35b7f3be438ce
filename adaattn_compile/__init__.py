"""adaattn: a torch.compile backend that finds every attention in a model and rewrites it into
one adaptive operator, ``torch.ops.adaattn.attention``.

    model = torch.compile(model, backend="adaattn", options={"policy": "balanced"})
    report = adaattn_compile.explain(model, *example_args)
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from . import op as _op  # noqa: F401  (registers torch.ops.adaattn.*)
from .compiler import AdaAttnBackend, adaattn_backend, record_graphs  # noqa: F401
from .options import AttentionInputError, OptionError, Options, canonical_policy
from .report import Report
from .stats import reset_stats, stats

__all__ = ["backend", "attention", "explain", "stats", "reset_stats", "Report", "OptionError",
           "AttentionInputError", "Options"]


def backend(**options: Any) -> AdaAttnBackend:
    """The adaattn backend as a callable, for ``torch.compile(model, backend=backend(...))``."""
    return AdaAttnBackend(Options.parse(options))


def attention(q, k, v, attn_mask=None, is_causal=False, scale=None, dropout_p=0.0,
              enable_gqa=False, *, policy="balanced", kernel=None):
    """``torch.ops.adaattn.attention`` as a function, with SDPA's arguments.

    kernel: None lets the planner choose, "triton" forces the dense Triton kernel (under
    TRITON_INTERPRET=1 on CPU), "reference" the torch path.
    """
    policy = canonical_policy(policy)
    if kernel not in (None, "triton", "reference"):
        raise OptionError(f"adaattn.attention: bad value {kernel!r} for argument 'kernel'; "
                          "allowed: None, 'triton', 'reference'")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"adaattn.attention: argument '{name}' must be a Tensor, got "
                            f"{type(t).__name__}")
        if t.dim() < 2:
            raise AttentionInputError(f"adaattn.attention: argument '{name}' must have at least "
                                      f"2 dims (…, L, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise AttentionInputError(f"adaattn.attention: argument '{name}' must be a floating "
                                      f"point tensor, got {t.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise AttentionInputError(f"adaattn.attention: q, k and v must have one dtype, got "
                                  f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise AttentionInputError(f"adaattn.attention: q, k and v must be on one device, got "
                                  f"{q.device}, {k.device}, {v.device}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError("adaattn.attention: argument 'attn_mask' must be a Tensor or None")
        if not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
            raise AttentionInputError(f"adaattn.attention: argument 'attn_mask' must be bool or "
                                      f"floating point, got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise AttentionInputError(f"adaattn.attention: argument 'attn_mask' is on "
                                      f"{attn_mask.device}, q on {q.device}")
    if is_causal and attn_mask is not None:
        raise AttentionInputError("adaattn.attention: pass either 'attn_mask' or 'is_causal', "
                                  "not both (as F.scaled_dot_product_attention)")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"adaattn.attention: argument 'dropout_p' must be in [0, 1), got {dropout_p}")
    if q.shape[-1] != k.shape[-1]:
        raise AttentionInputError(f"adaattn.attention: q and k head dims differ ({q.shape[-1]} "
                                  f"vs {k.shape[-1]})")
    if k.shape[-2] != v.shape[-2]:
        raise AttentionInputError(f"adaattn.attention: k and v lengths differ ({k.shape[-2]} vs "
                                  f"{v.shape[-2]})")
    if enable_gqa and (q.dim() < 3 or q.shape[-3] % k.shape[-3] or k.shape[-3] != v.shape[-3]):
        raise AttentionInputError("adaattn.attention: enable_gqa needs q heads divisible by k/v "
                                  "heads")
    out, _lse, _seed = torch.ops.adaattn.attention(
        q, k, v, attn_mask, float(dropout_p), bool(is_causal),
        None if scale is None else float(scale), bool(enable_gqa), "direct", policy, kernel or "auto")
    return out


def explain(model, *args, options: Optional[dict] = None, **kwargs) -> Report:
    """Compile ``model`` with adaattn, run it once on the given inputs, and report every
    attention site found, every look-alike skipped, and each graph before and after.

    The rest of the graph is not compiled by Inductor here unless ``options['inner']`` asks
    for it: the report only needs the rewrite."""
    opts = Options.parse({"inner": "eager", **(options or {})})
    records = []
    compiled = torch.compile(model, backend=AdaAttnBackend(opts, records))
    compiled(*args, **kwargs)
    return Report(records, opts)
