"""The torch reference path of ``adaattn::attention``.

It runs on every device and dtype and is the fallback whenever a faster kernel can't be used.
It computes in float32 (float64 stays float64) in query chunks, so its memory is bounded by
``_CHUNK_BYTES`` rather than growing as B·H·Lq·Lk, and it returns the row log-sum-exp that the
flash backward needs. Without dropout, ATen's fused kernels run it where they take the
inputs (CPU: the flash kernel; CUDA: the memory-efficient one, both returning the lse), with
fully masked rows set to the contract below. Semantics follow
``F.scaled_dot_product_attention``:

- ``is_causal`` is top-left aligned (query i sees keys j <= i);
- a bool mask marks the keys to *keep*; a float mask is added to the scaled scores;
- a fully masked row gives output 0 and lse -inf (the math backend's ``_safe_softmax``);
- dropout draws its keep-mask from a generator seeded by ``seed``, so the backward, which
  recomputes the forward, reproduces the very same mask.
"""
from __future__ import annotations

import math

import torch

_CHUNK_BYTES = 256 * 2**20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def _expand_kv(q, k, v, enable_gqa: bool):
    """Repeat K/V heads for GQA (dim -3) and broadcast leading dims to q's."""
    if enable_gqa and k.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        groups = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(groups, dim=-3)
        v = v.repeat_interleave(groups, dim=-3)
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    q = q.expand(*batch, *q.shape[-2:])
    k = k.expand(*batch, *k.shape[-2:])
    v = v.expand(*batch, *v.shape[-2:])
    return q, k, v


def _dropout_keep(shape, dropout_p: float, seed: int, device, row_start: int) -> torch.Tensor:
    # One generator per call, seeded per chunk, so forward and backward draw the same mask
    # whatever the chunking (the chunk's first row is folded into the seed).
    gen = torch.Generator(device=device)
    gen.manual_seed((seed + 1_000_003 * row_start) % (2**63 - 1))
    return torch.rand(shape, generator=gen, device=device) >= dropout_p


def _prepare(q, k, v, attn_mask, scale, enable_gqa):
    ctype = compute_dtype(q.dtype)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    q, k, v = _expand_kv(q.to(ctype), k.to(ctype), v.to(ctype), enable_gqa)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(ctype)
    batch_numel = max(1, math.prod(q.shape[:-2]))
    rows = max(1, _CHUNK_BYTES // max(1, batch_numel * k.shape[-2] * 4))
    return q, k, v, attn_mask, scale, rows


def _chunk_probs(q, kt, attn_mask, is_causal, scale, start, stop):
    """Softmax probabilities and lse of query rows [start, stop)."""
    scores = torch.matmul(q[..., start:stop, :], kt) * scale
    if attn_mask is not None:
        mask = attn_mask
        if mask.dim() >= 2 and mask.shape[-2] != 1:
            mask = mask[..., start:stop, :]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    if is_causal:
        keep = torch.ones(stop - start, kt.shape[-1], dtype=torch.bool, device=q.device).tril(start)
        scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    # Fully masked rows have lse = -inf: exp(-inf - -inf) would be NaN, SDPA returns 0.
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse) & (lse < 0), 0.0))
    return probs, lse.squeeze(-1)


def _cpu_flash(q, k, v, attn_mask, is_causal, scale, enable_gqa):
    """ATen's fused CPU attention, which also returns the lse: 3x faster than the math below
    on small problems and O(L) memory. 4-D, same-batch inputs only."""
    if q.dim() != 4 or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if enable_gqa and k.shape[1] != q.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2] or k.dtype != q.dtype or v.dtype != q.dtype:
        return None
    # The raw ATen op (unlike the public SDPA wrapper) assumes unit stride in the head dim.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if attn_mask is not None:
        if attn_mask.dim() > 4:
            return None
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype).masked_fill(~attn_mask, float("-inf"))
        attn_mask = attn_mask.to(q.dtype)
        while attn_mask.dim() < 4:
            attn_mask = attn_mask.unsqueeze(0)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, bool(is_causal), attn_mask=attn_mask, scale=scale)
    lse = lse.float()
    if attn_mask is not None:
        # ATen leaves a fully masked row's lse at 0; the op's contract (and the rewrite's
        # eager-value fix for such rows) needs -inf there, as the other paths give.
        masked = torch.isneginf(attn_mask)
        if is_causal:
            future = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).triu(1)
            masked = masked | future
        dead = masked.all(-1).expand(lse.shape)
        lse = lse.masked_fill(dead, float("-inf"))
    return out, lse


def _cuda_efficient(q, k, v, attn_mask, is_causal, scale, enable_gqa):
    """torch's memory-efficient CUDA kernel, which returns the lse as well: exact fp32 on CUDA
    runs here (the chunked math below took 32.7 ms at B = 4, H = 16, L = 4096, D = 128 on the
    H100, against 11.7 for SDPA). 4-D, same-batch inputs; None where it does not apply (the
    caller takes the math path, also when the kernel refuses the inputs)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or not (q.dtype == k.dtype == v.dtype):
        return None
    if enable_gqa and k.shape[1] != q.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        return None
    bias = dead = None
    if attn_mask is not None:
        if attn_mask.dim() > 4:
            return None
        bias = attn_mask
        while bias.dim() < 4:
            bias = bias.unsqueeze(0)
        if bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~bias, float("-inf"))
        bias = bias.to(q.dtype)
        # rows with every key masked: 0 and lse = -inf (the op's contract, as _cpu_flash);
        # found on the mask's own (broadcast) shape, not the expanded one
        dead = torch.isneginf(bias)
        if is_causal:
            dead = dead | torch.ones(q.shape[2], k.shape[2], dtype=torch.bool,
                                     device=q.device).triu(1)
        dead = dead.all(-1)
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, bias, True, 0.0, bool(is_causal), scale=scale)[:2]
    lse = lse[..., :q.shape[2]].float()
    if dead is not None and bool(dead.any()):
        out = out.masked_fill(dead[..., None], 0.0)
        lse = lse.masked_fill(dead.expand(lse.shape), float("-inf"))
    return out, lse


def reference_forward(q, k, v, attn_mask, is_causal, scale, dropout_p, enable_gqa, seed):
    """Returns (out in q.dtype, lse in float32)."""
    # (ATen's fused CPU kernel returns 0 for a query row holding a NaN, where SDPA's math path,
    # the CUDA kernels and hand-written attention give NaN: non-finite q / k take the math)
    if (q.device.type == "cpu" and dropout_p == 0.0 and q.numel() and k.numel()
            and bool(torch.isfinite(q).all()) and bool(torch.isfinite(k).all())):
        try:
            fused = _cpu_flash(q, k, v, attn_mask, is_causal, scale, enable_gqa)
        except (RuntimeError, AttributeError):
            fused = None   # shapes or versions the fused kernel refuses: the math path below
        if fused is not None:
            return fused
    if q.is_cuda and dropout_p == 0.0 and q.numel() and k.numel() and q.dtype in (
            torch.float32, torch.float16, torch.bfloat16):
        try:
            fused = _cuda_efficient(q, k, v, attn_mask, is_causal, scale, enable_gqa)
        except (RuntimeError, AttributeError):
            fused = None   # inputs (alignment, sizes) the kernel refuses: the math path below
        if fused is not None:
            return fused
    out_dtype = q.dtype
    q, k, v, attn_mask, scale, rows = _prepare(q, k, v, attn_mask, scale, enable_gqa)
    kt = k.transpose(-1, -2)
    outs, lses = [], []
    for start in range(0, q.shape[-2], rows):
        stop = min(q.shape[-2], start + rows)
        probs, lse = _chunk_probs(q, kt, attn_mask, is_causal, scale, start, stop)
        if dropout_p > 0.0:
            probs = probs * _dropout_keep(probs.shape, dropout_p, seed, q.device, start) / (1.0 - dropout_p)
        outs.append(torch.matmul(probs, v))
        lses.append(lse)
    if not outs:  # zero query rows
        return q.new_empty((*q.shape[:-1], v.shape[-1])).to(out_dtype), q.new_empty(q.shape[:-1]).float()
    return torch.cat(outs, dim=-2).to(out_dtype), torch.cat(lses, dim=-1).to(torch.float32)


def reference_backward(grad_out, q, k, v, attn_mask, is_causal, scale, dropout_p, enable_gqa,
                       seed, mask_needs_grad):
    """Analytic gradients (the op runs below autograd, so no autograd here), chunked over
    query rows like the forward, redrawing the forward's dropout mask from ``seed``."""
    q_in, k_in, v_in, mask_in = q, k, v, attn_mask
    q, k, v, attn_mask, scale, rows = _prepare(q, k, v, attn_mask, scale, enable_gqa)
    grad_out = grad_out.to(q.dtype).expand(*q.shape[:-1], v.shape[-1])
    kt = k.transpose(-1, -2)
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    dmask_rows = []
    for start in range(0, q.shape[-2], rows):
        stop = min(q.shape[-2], start + rows)
        probs, _ = _chunk_probs(q, kt, attn_mask, is_causal, scale, start, stop)
        d_out = grad_out[..., start:stop, :]
        d_probs = torch.matmul(d_out, v.transpose(-1, -2))
        dropped = probs
        if dropout_p > 0.0:
            keep = _dropout_keep(probs.shape, dropout_p, seed, q.device, start) / (1.0 - dropout_p)
            dropped = probs * keep
            d_probs = d_probs * keep
        dv += torch.matmul(dropped.transpose(-1, -2), d_out)
        d_scores = probs * (d_probs - (probs * d_probs).sum(dim=-1, keepdim=True))
        dq[..., start:stop, :] = torch.matmul(d_scores, k) * scale
        dk += torch.matmul(d_scores.transpose(-1, -2), q[..., start:stop, :]) * scale
        if mask_needs_grad:
            dmask_rows.append(d_scores)
    if enable_gqa and k_in.dim() >= 3 and k_in.shape[-3] != q_in.shape[-3]:
        groups = q_in.shape[-3] // k_in.shape[-3]
        dk = dk.unflatten(-3, (-1, groups)).sum(-3)
        dv = dv.unflatten(-3, (-1, groups)).sum(-3)
    dmask = None
    if mask_needs_grad:
        full = torch.cat(dmask_rows, dim=-2)
        dmask = _reduce_to(full, mask_in)
    return _reduce_to(dq, q_in), _reduce_to(dk, k_in), _reduce_to(dv, v_in), dmask


def _reduce_to(grad, like):
    """Sum a gradient over the dims ``like`` was broadcast along, and cast to its dtype."""
    while grad.dim() > like.dim():
        grad = grad.sum(0)
    if grad.shape != like.shape:
        grad = grad.sum_to_size(like.shape)
    return grad.to(like.dtype)
