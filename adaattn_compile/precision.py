"""Adaptive precision at run time: each call runs at its site's current rung of the plan's
precision ladder (cheapest first, the inputs' own precision last), and every rung below the
last is checked on sampled query rows against float64.

A (site, sequence bucket, dtype)'s rung is checked on the first call that runs it and every
``CHECK_EVERY`` (32) calls after; a check measuring a relative L2 error above the plan's tolerance
demotes the site to the next rung up, and the call is run again there, so that a call's output
is never one that failed its check. The check waits for the device (one small host sync per
``CHECK_EVERY`` calls); under CUDA-graph capture nothing waits: a captured call runs at the
last verified rung, or at the inputs' precision before any check has passed.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import torch

# (32: at 16 the checks cost 2.2-3.2 % of the 8-bit kernel's time at L = 4096, D = 128,
# B = 4, H = 16 over five H100 runs, against the 3 % they may take)
CHECK_EVERY = 32
SAMPLED_ROWS = 32   # per (batch, head); spread over the sequence, moving from check to check
# (batch, kv head) pairs a check reads, moving from check to check: converting every head's K
# and V to float64 made a check cost 1.7 ms at B = 4, H = 16, L = 4096, D = 128 (H100): 4 %
# of the 8-bit kernel's time over 16 calls, against the 3 % the checks may take
MAX_KV_HEADS = 8
_CHECK_BYTES = 64 * 2**20   # float64 K and V a check holds at once (long sequences: fewer heads)


@dataclasses.dataclass
class LadderState:
    level: int = 0             # index of the current rung in the plan's ladder
    calls_to_check: int = 0    # calls before the next check (0: this call checks)
    verified: bool = False     # the current rung has passed a check
    checks: int = 0


def measure_amax(q, k, v, scale: Optional[float]) -> Tuple[float, float, float]:
    """max |q * scale|, |k|, |v| (one host sync): whether fp16 holds the inputs."""
    s = abs(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return (0.0, 0.0, 0.0)
    values = torch.stack([q.detach().abs().amax().float() * s, k.detach().abs().amax().float(),
                          v.detach().abs().amax().float()])
    return tuple(float(x) for x in values.tolist())


def sample_rows(lq: int, check_index: int, device, samples: int = SAMPLED_ROWS) -> torch.Tensor:
    """``samples`` query positions spread evenly over ``lq``, shifted at every check so that
    successive checks read different rows."""
    n = min(samples, lq)
    stride = lq / n
    offset = int(check_index * 0.6180339887 * stride) % max(1, int(stride))
    return (torch.arange(n, device=device, dtype=torch.float64) * stride + offset).long() \
        .clamp_(max=lq - 1)


def sample_heads(batch: int, kv_heads: int, check_index: int, device,
                 limit: Optional[int] = None):
    """``(batch index, kv head index)`` of up to ``limit`` (default ``MAX_KV_HEADS``) of the
    call's (batch, kv head) pairs, a different run of them at every check."""
    n = batch * kv_heads
    m = min(n, limit or MAX_KV_HEADS)
    flat = (torch.arange(m, device=device) + check_index * m) % n
    return flat // kv_heads, flat % kv_heads


def sampled_error(q, k, v, out, attn_mask, is_causal: bool, scale: Optional[float],
                  rows: torch.Tensor, heads=None) -> float:
    """Relative L2 error of ``out``'s ``rows`` of the (batch, kv head) pairs ``heads`` (all of
    them by default; with GQA, every query head of each) against attention in float64. All
    tensors 4-D, (B, Hq, L, D) / (B, Hk, L, D) (GQA: Hq = G Hk) / a mask broadcastable to
    (B, Hq, Lq, Lk). Fully masked rows are 0 in both (our kernels' convention). Only the
    sampled heads' K and V are converted to float64."""
    B, Hq, _, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    groups, n_rows = Hq // Hk, rows.numel()
    if heads is None:
        flat = torch.arange(B * Hk, device=q.device)
        heads = (flat // Hk, flat % Hk)
    b_idx, h_idx = heads
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(D)
    mask = attn_mask
    if mask is not None:
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        if mask.shape[2] != 1:   # the sampled rows first, on the mask's own (broadcast) shape
            mask = mask.index_select(2, rows)
        mask = mask.expand(B, Hq, mask.shape[2], Lk).unflatten(1, (Hk, groups))
    # the sampled rows first (a small copy), then the sampled heads
    q_rows = q.index_select(2, rows).unflatten(1, (Hk, groups))
    out_rows = out.index_select(2, rows).unflatten(1, (Hk, groups))
    # a few heads at a time: their K and V in float64 stay under _CHECK_BYTES
    step = max(1, _CHECK_BYTES // (8 * Lk * (D + v.shape[-1])))
    diff_sq = ref_sq = 0.0
    for start in range(0, b_idx.numel(), step):
        b, h = b_idx[start:start + step], h_idx[start:start + step]
        n = b.numel()
        qs = q_rows[b, h].double()
        scores = (qs.reshape(n, groups * n_rows, D) @ k[b, h].double().transpose(-1, -2)
                  ).reshape(n, groups, n_rows, Lk) * sm_scale
        if mask is not None:
            m = mask[b, h]
            if m.dtype == torch.bool:
                scores = scores.masked_fill(~m, -math.inf)
            else:
                scores = scores + m.double()
        if is_causal:
            keys = torch.arange(Lk, device=q.device)
            scores = scores.masked_fill(rows[:, None] < keys[None, :], -math.inf)
        weights = torch.softmax(scores, -1).nan_to_num_(0.0)   # fully masked rows: 0
        ref = weights.reshape(n, groups * n_rows, Lk) @ v[b, h].double()
        got = out_rows[b, h].double()
        diff_sq = diff_sq + (got.reshape(ref.shape) - ref).square().sum()
        ref_sq = ref_sq + ref.square().sum()
    diff, norm = torch.sqrt(diff_sq), torch.sqrt(ref_sq)
    err = torch.where(norm > 0, diff / norm.clamp_min(1e-300), diff)
    err = float(err)   # (the sync)
    return err if math.isfinite(err) else math.inf
