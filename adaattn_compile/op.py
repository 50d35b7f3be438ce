"""``torch.ops.adaattn.attention``: the one operator every rewritten attention site calls.

A ``torch.library.custom_op`` (``triton_op`` + ``wrap_triton`` does not compile on CPU with
torch 2.13) with a fake implementation and a registered autograd formula. It returns
``(out, lse, seed)``: ``lse`` is the row log-sum-exp the flash backward needs and ``seed`` the
dropout seed the backward needs to redraw the forward's mask; rewritten graphs use ``out``.

Each call asks the planner for a plan (cached per site, device, dtype and sequence bucket),
runs the chosen kernel, and falls back to the reference path with one warning if a kernel
fails, so a kernel bug costs speed, never the model.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from . import planner, stats
from .kernels import reference
from .options import Options

log = logging.getLogger("adaattn")

_site_options: Dict[str, Options] = {}
_plan_cache: Dict[tuple, planner.Plan] = {}
_cache_lock = threading.Lock()
_warned: set = set()



def register_site(site: str, options: Options) -> None:
    """Remember the options a rewritten site was compiled with (the op reads them by id)."""
    with _cache_lock:
        _site_options[site] = options


def site_options(site: str, policy: str, kernel: str) -> Options:
    """The options of a rewritten site; for direct calls (and sites compiled in another
    process), the defaults of the policy and kernel the call names."""
    opts = _site_options.get(site)
    if opts is None:
        return _options_for(policy, kernel)
    if kernel not in ("", "auto") and kernel != opts.kernel:
        return dataclasses.replace(opts, kernel=kernel)
    return opts


@functools.lru_cache(maxsize=None)
def _options_for(policy: str, kernel: str) -> Options:
    return Options.parse(policy=policy, kernel=kernel or "auto")


def warn_once(key, message: str) -> None:
    with _cache_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def device_info(device: torch.device) -> planner.DeviceInfo:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return planner.DeviceInfo("cuda", _cuda_capability(index),
                                  torch.get_float32_matmul_precision() != "highest")
    return planner.DeviceInfo(device.type)


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int):
    # Cached: asking the driver costs ~10 us, and this runs on every call of the op.
    return torch.cuda.get_device_capability(index)


def mask_kind(attn_mask: Optional[Tensor]) -> Optional[str]:
    if attn_mask is None:
        return None
    return "bool" if attn_mask.dtype == torch.bool else "additive"


def _flash_unsupported(q, k, v, attn_mask, dropout_p, enable_gqa) -> Optional[str]:
    """Why the flash kernels can't run this call (None if they can)."""
    try:
        from .kernels import flash
    except Exception as exc:  # triton missing or broken: the reference path still works
        return f"Triton kernel unavailable ({type(exc).__name__}: {exc})"
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        return f"{q.dim()}-D inputs (the kernel takes (B, H, L, D) or (N, L, D))"
    if attn_mask is not None and attn_mask.dim() > 4:
        return f"{attn_mask.dim()}-D mask"
    try:
        qb, kb, vb = _broadcast_batch(q, k, v, enable_gqa)
    except RuntimeError as exc:
        return f"batch dims don't broadcast ({exc})"
    return flash.supports(_to4d(qb), _to4d(kb), _to4d(vb), _mask4d(attn_mask), dropout_p)


def problem_of(q, k, v, attn_mask, is_causal, dropout_p, enable_gqa, unsupported=None) -> planner.Problem:
    groups = q.shape[-3] // k.shape[-3] if enable_gqa and q.dim() >= 3 else 1
    return planner.Problem(
        dtype=str(q.dtype).replace("torch.", ""), q_len=int(q.shape[-2]), k_len=int(k.shape[-2]),
        head_dim=int(q.shape[-1]), v_head_dim=int(v.shape[-1]), mask=mask_kind(attn_mask),
        causal=bool(is_causal), dropout_p=float(dropout_p), gqa_groups=int(groups),
        kernel_unsupported=unsupported)


def plan_call(site, opts, q, k, v, attn_mask, is_causal, dropout_p, enable_gqa) -> planner.Plan:
    """The plan for this call, cached per site, options, device, dtype, head shapes and
    sequence-length bucket (so a dynamic-length model plans once per bucket, not per length)."""
    dev = device_info(q.device)
    key = (site, opts, dev, q.dtype, q.dim(), q.shape[-3] if q.dim() >= 3 else 1,
           k.shape[-3] if k.dim() >= 3 else 1, q.shape[-1], v.shape[-1],
           planner.seq_bucket(q.shape[-2]), planner.seq_bucket(k.shape[-2]),
           mask_kind(attn_mask), attn_mask.dim() if attn_mask is not None else -1,
           bool(is_causal), dropout_p > 0, enable_gqa)
    cached = _plan_cache.get(key)
    if cached is not None:
        return cached
    unsupported = None
    if opts.kernel != "reference":
        unsupported = _flash_unsupported(q, k, v, attn_mask, dropout_p, enable_gqa)
    result = planner.plan(dev, problem_of(q, k, v, attn_mask, is_causal, dropout_p, enable_gqa,
                                          unsupported), opts)
    with _cache_lock:
        _plan_cache[key] = result
    return result


# ---------------------------------------------------------------------------------------------
# Layout helpers for the flash kernels, which take (B, H, L, D) and a mask broadcastable to
# (B, H, Lq, Lk).

def _broadcast_batch(q, k, v, enable_gqa):
    """Expand (stride 0, no copy) q/k/v leading dims to a common batch; GQA heads stay apart."""
    split = -3 if enable_gqa else -2
    if q.shape[:split] == k.shape[:split] == v.shape[:split]:
        return q, k, v   # the common case; torch.broadcast_shapes costs ~50 us a call
    if enable_gqa:
        lead = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
        return (q.expand(*lead, *q.shape[-3:]), k.expand(*lead, *k.shape[-3:]),
                v.expand(*lead, *v.shape[-3:]))
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    return (q.expand(*lead, *q.shape[-2:]), k.expand(*lead, *k.shape[-2:]),
            v.expand(*lead, *v.shape[-2:]))


def _to4d(t: Tensor) -> Tensor:
    return t.unsqueeze(0) if t.dim() == 3 else t


def _mask4d(mask: Optional[Tensor]) -> Optional[Tensor]:
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


def _sum_to(grad: Tensor, like: Tensor) -> Tensor:
    if grad.shape != like.shape:
        grad = grad.sum_to_size(like.shape)
    return grad.to(like.dtype)


def _flash_forward(q, k, v, attn_mask, is_causal, scale, enable_gqa):
    from .kernels import flash
    qb, kb, vb = _broadcast_batch(q, k, v, enable_gqa)
    out_shape = qb.shape[:-1] + (v.shape[-1],)
    out, lse = flash.flash_forward(_to4d(qb), _to4d(kb), _to4d(vb), _mask4d(attn_mask),
                                   is_causal, scale)
    return out.reshape(out_shape), lse.reshape(out_shape[:-1])


def _flash_backward(grad_out, q, k, v, out, lse, attn_mask, is_causal, scale, enable_gqa,
                    mask_needs_grad):
    from .kernels import flash
    qb, kb, vb = _broadcast_batch(q, k, v, enable_gqa)
    mask4 = _mask4d(attn_mask)
    dq, dk, dv, dmask = flash.flash_backward(
        _to4d(grad_out), _to4d(qb), _to4d(kb), _to4d(vb), _to4d(out),
        lse.unsqueeze(0) if lse.dim() == 2 else lse, mask4, is_causal, scale, mask_needs_grad)
    dq, dk, dv = dq.reshape(qb.shape), dk.reshape(kb.shape), dv.reshape(vb.shape)
    if dmask is not None:
        dmask = _sum_to(dmask.reshape(mask4.shape), attn_mask)
    return _sum_to(dq, q), _sum_to(dk, k), _sum_to(dv, v), dmask


# ---------------------------------------------------------------------------------------------
# The operator.

@torch.library.custom_op("adaattn::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
                 is_causal: bool, scale: Optional[float], enable_gqa: bool, site: str,
                 policy: str, kernel: str) -> Tuple[Tensor, Tensor, Tensor]:
    opts = site_options(site, policy, kernel)
    seed_value = int(torch.randint(0, 2**62, (), device="cpu")) if dropout_p > 0.0 else 0
    seed = torch.tensor([seed_value], dtype=torch.int64)
    chosen = plan_call(site, opts, q, k, v, attn_mask, is_causal, dropout_p, enable_gqa)
    kernel_used = chosen.kernel
    result = None
    if q.numel() == 0 or k.shape[-2] == 0:   # nothing for a kernel to do (bucket 1 holds L=0)
        kernel_used = "reference"
    elif chosen.kernel == "triton":
        try:
            result = _flash_forward(q, k, v, attn_mask, is_causal, scale, enable_gqa)
        except Exception as exc:  # never lose the model to a kernel failure
            reason = f"Triton forward failed ({type(exc).__name__}: {str(exc)[:200]})"
            warn_once((site, "fwd", type(exc).__name__),
                      f"adaattn: site {site}: {reason}; using the reference path")
            stats.record_fallback(site, reason)
            kernel_used = "reference"
    if result is None:
        result = reference.reference_forward(q, k, v, attn_mask, is_causal, scale, dropout_p,
                                             enable_gqa, seed_value)
    out, lse = result
    heads = 1
    for size in q.shape[:-2]:  # (batch, head) pairs: the unit the rank choice is made for
        heads *= int(size)
    stats.record_call(site, kernel_used, chosen.precision, chosen.rank, heads)
    return out.contiguous(), lse.contiguous(), seed


@attention_op.register_fake
def _attention_fake(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, site, policy, kernel):
    lead_q = q.shape[:-3] if enable_gqa else q.shape[:-2]
    lead_k = k.shape[:-3] if enable_gqa else k.shape[:-2]
    lead_v = v.shape[:-3] if enable_gqa else v.shape[:-2]
    lead = torch.broadcast_shapes(lead_q, lead_k, lead_v)
    if enable_gqa:
        lead = (*lead, q.shape[-3])
    out = q.new_empty((*lead, q.shape[-2], v.shape[-1]))
    lse = q.new_empty((*lead, q.shape[-2]), dtype=torch.float32)
    seed = torch.empty((1,), dtype=torch.int64, device="cpu")
    return out, lse, seed


@torch.library.custom_op("adaattn::attention_backward", mutates_args=())
def attention_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                          attn_mask: Optional[Tensor], out: Tensor, lse: Tensor, seed: Tensor,
                          dropout_p: float, is_causal: bool, scale: Optional[float],
                          enable_gqa: bool, site: str, policy: str, kernel: str,
                          mask_needs_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    opts = site_options(site, policy, kernel)
    chosen = plan_call(site, opts, q, k, v, attn_mask, is_causal, dropout_p, enable_gqa)
    stats.record_backward(site)
    grads = None
    if chosen.kernel == "triton" and q.numel() and k.shape[-2]:
        try:
            grads = _flash_backward(grad_out, q, k, v, out, lse, attn_mask, is_causal, scale,
                                    enable_gqa, mask_needs_grad)
        except Exception as exc:
            reason = f"Triton backward failed ({type(exc).__name__}: {str(exc)[:200]})"
            warn_once((site, "bwd", type(exc).__name__),
                      f"adaattn: site {site}: {reason}; using the reference path")
            stats.record_fallback(site, reason)
    if grads is None:
        grads = reference.reference_backward(grad_out, q, k, v, attn_mask, is_causal, scale,
                                             dropout_p, enable_gqa, int(seed[0]), mask_needs_grad)
    dq, dk, dv, dmask = grads
    if dmask is None:
        dmask = q.new_empty((0,))
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dmask.contiguous()


@attention_backward_op.register_fake
def _attention_backward_fake(grad_out, q, k, v, attn_mask, out, lse, seed, dropout_p, is_causal,
                             scale, enable_gqa, site, policy, kernel, mask_needs_grad):
    dmask = attn_mask.new_empty(attn_mask.shape) if mask_needs_grad else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, site, policy, kernel = inputs
    out, lse, seed = output
    ctx.save_for_backward(q, k, v, attn_mask, out, lse, seed)
    ctx.args = (dropout_p, is_causal, scale, enable_gqa, site, policy, kernel)
    ctx.mask_is_float = attn_mask is not None and attn_mask.is_floating_point()


def _backward(ctx, grad_out, grad_lse, grad_seed):
    q, k, v, attn_mask, out, lse, seed = ctx.saved_tensors
    dropout_p, is_causal, scale, enable_gqa, site, policy, kernel = ctx.args
    mask_needs_grad = bool(ctx.mask_is_float and ctx.needs_input_grad[3])
    dq, dk, dv, dmask = torch.ops.adaattn.attention_backward(
        grad_out, q, k, v, attn_mask, out, lse, seed, dropout_p, is_causal, scale, enable_gqa,
        site, policy, kernel, mask_needs_grad)
    return (dq, dk, dv, dmask if mask_needs_grad else None,
            None, None, None, None, None, None, None)


attention_op.register_autograd(_backward, setup_context=_setup_context)
