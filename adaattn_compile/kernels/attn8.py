"""8-bit attention forward (sm89+): INT8 Q·Kᵀ and INT8 P·V, fp32 softmax and accumulation.

On sm90 without a mask and with D = Dv in {64, 128}, :func:`forward` runs the Gluon kernel of
:mod:`.attn8_hopper` on this module's pre-pass in its ``sm90`` form (one scale per block of K
and of V·R, P on 128 levels: see there); everything else runs the Triton-language kernel
below. Two launches a call, from :func:`forward`:

* ``_quant_kernel``, the pre-pass: one launch quantises Q, K and V (its programs take row
  blocks of Q, then of K / V). Q and K are rotated by ``R = diag(signs)·H`` (H a Sylvester
  Hadamard matrix over the padded head dim, fixed random signs): ``(QR)(KR)ᵀ = n·QKᵀ``, and the
  rotation spreads a few outlier channels over all of them (the "incoherent processing" of
  FlashAttention-3's fp8 path), so that one scale per row no longer has to cover a ×20
  channel. fp16 / bf16 inputs are rotated by one tensor-core product in their own dtype, which
  is exact (R's entries are +-1, the accumulator fp32); fp32 inputs in fp16 parts. K is
  smoothed: the mean of its first ``BLOCK_N`` keys is subtracted from every key (softmax
  ignores any vector subtracted from all keys, so the choice of vector is free; this one every
  program reads from L2, with no grid-wide reduction; ``q·mean`` is kept per query row so that
  the lse is that of the unsmoothed scores). Then INT8 with one scale per row (token) for Q
  and K. V is quantised per key block and channel (a scale per
  (``BLOCK_N`` keys, channel), finer than the per-channel scale SageAttention uses and as
  cheap: the attention kernel converts every block's INT32 product anyway) and stored
  transposed, (Dv, Lk), since an 8-bit tensor-core operand must be K-major.
* ``_attn8_fwd``: FlashAttention-2's loop on the 8-bit tensors. Scores are
  ``INT32 · q_scale · k_scale`` (the scales carry ``sm_scale · log2 e / n``); the softmax runs in fp32 with
  ``exp2``. P is taken relative to each tile row's own max (its largest entry is 1; one factor
  per row, ``exp2(tile max - running max)``, scales the tile's product and row sum back), rounded
  to 255 levels and stored as INT8 ``p̂ = round(254 p) - 127`` (P is in [0, 1]: the offset buys
  the eighth bit): ``P·V = (p̂·V̂ + 127·ΣV̂) / 254 · v_scale``, the ``127·ΣV̂`` term a
  per-block constant of the pre-pass. Row sums are taken of the rounded P, so the rows' weights
  sum to one exactly as the products see them.

Why INT8 for both products (the issue proposed FP8 e4m3 for P·V): float64 emulation,
``scripts/attn8_numerics.py`` (L = 4096, D = 128, q, k, v ~ N(0, 1); relative L2 of the
output). P·V with e4m3 P and V costs 3.7e-2 on its own (each operand's 3-bit mantissa rounds
with ~2.6 % relative error, and a diffuse head's output is as small as its error's sum), above
the 3e-2 the issue sets; offset INT8 P and per-block INT8 V cost 1.6e-2 with P relative to the
running max, 0.95e-2 relative to each tile row's max. For Q·Kᵀ, INT8 per token costs 0.92e-2
against e4m3's 3.9e-2. With four key channels ×20 (random signs, so smoothing cannot remove
them) the rotation brings INT8 Q·Kᵀ from 8.2e-2 to 2.3e-2; the attention is then peaked, and
P·V relative to the running max cost 3.7e-2 (a tile below the running max kept a few of its
255 levels: 4.3e-2 in all on the H100 in the seventeenth session), relative to the tile row's
max 0.86e-2. The same change took all-MiniLM-L6-v2's captured layers 3 and 4 from 3.5e-2 and
5.6e-2 to 0.8e-2 (CPU interpreter, 32-key tiles). INT8 and FP8 tensor-core products run at
the same rate on sm89 / sm90.

Scope: CUDA (or the interpreter), fp16 / bf16 / fp32 inputs, head dims <= 256, GQA, top-left
causal, bool / additive masks broadcastable to (B, H, Lq, Lk), no dropout. Inference only
(the planner keeps sites whose gradients are taken off it). Through the op, a site's first
call on this path and every 32nd after are checked on sampled rows (``precision``).
"""
from __future__ import annotations

import functools
import math
import os
import warnings

import torch
import triton
import triton.language as tl

from . import launch
from .flash import _capability, _fwd_epilogue, _load_mask_tile, _prep_mask
from .flash import supports as _flash_supports

__all__ = ["supports", "forward", "quantise", "attend"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256


@triton.jit
def _round_i8(x):
    """Round half away from zero to int8 (a float-to-int cast truncates); |x| <= 127.5."""
    return (x + tl.where(x >= 0, 0.5, -0.5)).to(tl.int8)


@triton.jit
def _rotate(x, rot, NATIVE: tl.constexpr, SPLIT: tl.constexpr):
    """-> (x·rot / f, f), f a factor per row. NATIVE (x and rot fp16 or bf16, as loaded): one
    tensor-core product in the inputs' own dtype, exact (rot's entries are +-1, so the fp32
    accumulator holds sums of the inputs' own values), f = 1. Else (fp32 inputs) x is scaled
    by its row's max into [-1, 1] (f) and taken in fp16, with SPLIT in two terms, high and low
    parts (22 bits of mantissa together), where one tf32 operand pair would cost twice the
    registers; without, fp16's rounding (2^-11 of the row's max) is a twentieth of int8's."""
    # (one return at the end: the compiler would also build what follows a return under a
    # constexpr branch)
    if NATIVE:
        xr = tl.dot(x, rot)
        f = tl.full([x.shape[0]], 1.0, tl.float32)
    else:
        x = x.to(tl.float32)
        f = tl.maximum(tl.max(tl.abs(x), 1), 1e-30)
        xn = x / f[:, None]
        hi = xn.to(tl.float16)
        xr = tl.dot(hi, rot)
        if SPLIT:
            lo = (xn - hi.to(tl.float32)).to(tl.float16)
            xr += tl.dot(lo, rot)
    return xr, f


@triton.jit
def _quantise(xr, f, PER_BLOCK: tl.constexpr = False):
    """Rows ``xr`` (in units of their factors ``f``) -> (int8 with one scale per row, that
    scale). Zero rows get scale 0. PER_BLOCK: one scale for all rows (repeated per row)."""
    amax = tl.max(tl.abs(xr), 1)
    if PER_BLOCK:   # the block's largest entry
        top = tl.max(amax * f, 0)
        inv = 127.0 * f / tl.maximum(top, 1e-30)
        return _round_i8(xr * inv[:, None]), tl.zeros_like(amax) + top / 127.0
    inv = 127.0 / tl.maximum(amax, 1e-30)   # a zero row stays zero
    return _round_i8(xr * inv[:, None]), amax * f / 127.0


@triton.jit
def _first_keys_mean(k_base, stride_kn, stride_kd, offs_r, offs_d, Lk, rot, D: tl.constexpr,
                     ROWS: tl.constexpr, NATIVE: tl.constexpr):
    """K's smoothing vector: the mean of the first ROWS keys (see the module docstring); with
    NATIVE rotated (its keys through the same exact product as every key's, so that K R less
    it is K's smoothed rotation), else as it is."""
    first = tl.load(k_base + offs_r[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=(offs_r[:, None] < Lk) & (offs_d[None, :] < D), other=0.0)
    if NATIVE:
        first = tl.dot(first, rot)
    return tl.sum(first.to(tl.float32), 0) / tl.minimum(Lk, ROWS).to(tl.float32)


@triton.jit(do_not_specialize=["Lq", "Lk"])
def _quant_kernel(Q, K, V, Rot, Q8, QS, QM, K8, KS, V8T, VS, VC,
                  stride_qb, stride_qh, stride_qm, stride_qd,
                  stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd,
                  Hq, Hk, Lq, Lk, Lq_p, Lk_p, n_q_blocks, qk_scale, qk_log2,
                  D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                  ROWS: tl.constexpr, SM90: tl.constexpr, NATIVE: tl.constexpr):
    """Programs (pid, b * max(Hq, Hk) + h): Q's row blocks, then K's (and V's: in the same
    program, or with SM90 in programs of their own after K's). NATIVE: fp16 / bf16 inputs,
    rotated in their own dtype (see _rotate), K's smoothing vector subtracted after the
    rotation; else fp32 inputs, smoothed, then rotated in fp16 parts.

    SM90 (the form :mod:`.attn8_hopper` reads): K with one scale per block of ROWS keys; V·R
    with one scale per block (rotated, no channel stands out, and a block's scale is then a
    factor per row of the P·V product, not per column), its keys in the order the kernel's P
    operand takes them; fp32 inputs in one fp16 product per rotation (SPLIT off); K smoothed by
    the mean of its first 16 keys (every Q and K program reads them; 128 cost each program
    32 KB more)."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    offs_d = tl.arange(0, BD)
    offs_r = tl.arange(0, ROWS)
    MEAN_ROWS: tl.constexpr = 16 if SM90 else ROWS
    offs_mean = tl.arange(0, MEAN_ROWS)
    n_k_blocks = Lk_p // ROWS
    rot = tl.load(Rot + offs_d[:, None] * BD + offs_d[None, :])
    d_ok = offs_d[None, :] < D
    if pid < n_q_blocks:
        rows = pid * ROWS + offs_r
        x = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                    + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=(rows[:, None] < Lq) & d_ok, other=0.0)
        xr, f = _rotate(x, rot, NATIVE, not SM90)
        q8, scale = _quantise(xr, f)
        bh = (b * Hq + h).to(tl.int64)
        tl.store(Q8 + bh * Lq_p * BD + rows[:, None] * BD + offs_d[None, :], q8)
        tl.store(QS + bh * Lq_p + rows, scale * qk_scale)
        # what smoothing K took out of each row's scores (q . mean), for the lse
        mean = _first_keys_mean(K + b.to(tl.int64) * stride_kb
                                + (h // (Hq // Hk)).to(tl.int64) * stride_kh,
                                stride_kn, stride_kd, offs_mean, offs_d, Lk, rot, D, MEAN_ROWS,
                                NATIVE)
        if NATIVE:   # both rotated: (q R)·(mean R) = BD q·mean
            q_mean = tl.sum(xr * mean[None, :], 1) / BD
        else:
            q_mean = tl.sum(x.to(tl.float32) * mean[None, :], 1)
        tl.store(QM + bh * Lq_p + rows, q_mean * qk_log2)
    elif h < Hk:
        blk = pid - n_q_blocks
        bh = (b * Hk + h).to(tl.int64)
        if (not SM90) or blk < n_k_blocks:
            k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
            mean = _first_keys_mean(k_base, stride_kn, stride_kd, offs_mean, offs_d, Lk, rot, D,
                                    MEAN_ROWS, NATIVE)
            rows = blk * ROWS + offs_r
            r_ok = rows[:, None] < Lk
            x = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                        mask=r_ok & d_ok, other=0.0)
            if NATIVE:
                xr, f = _rotate(x, rot, True, False)
                xr = tl.where(r_ok, xr - mean[None, :], 0.0)
            else:
                x = tl.where(r_ok & d_ok, x.to(tl.float32) - mean[None, :], 0.0)
                xr, f = _rotate(x, rot, False, not SM90)
            k8, scale = _quantise(xr, f, SM90)
            tl.store(K8 + bh * Lk_p * BD + rows[:, None] * BD + offs_d[None, :], k8)
            tl.store(KS + bh * Lk_p + rows, scale)
        offs_c = tl.arange(0, BDV)
        if SM90:
            if blk >= n_k_blocks:
                blk = blk - n_k_blocks
                place = blk * ROWS + offs_r
                # the key at each place: 16h + 4t + 2e + i holds key 16h + 8e + 2t + i (the
                # kernel's P operand; loaded in that order, V is stored in place, coalesced)
                rows = ((place & ~15) | (((place >> 1) & 1) << 3) | (((place >> 2) & 3) << 1)
                        | (place & 1))
                v = tl.load(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
                            + rows[:, None] * stride_vn + offs_c[None, :] * stride_vd,
                            mask=(rows[:, None] < Lk) & (offs_c[None, :] < DV), other=0.0)
                vr, f = _rotate(v, rot, NATIVE, False)
                v8, vrow = _quantise(vr, f, True)
                tl.store(V8T + bh * BDV * Lk_p + offs_c[:, None] * Lk_p + place[None, :],
                         tl.trans(v8))
                tl.store(VS + (bh * n_k_blocks + blk) * BDV + offs_c,
                         tl.zeros([BDV], tl.float32) + tl.max(vrow, 0))
        else:
            v = tl.load(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
                        + rows[:, None] * stride_vn + offs_c[None, :] * stride_vd,
                        mask=r_ok & (offs_c[None, :] < DV), other=0.0).to(tl.float32)
            cmax = tl.max(tl.abs(v), 0)
            inv = 127.0 / tl.maximum(cmax, 1e-30)
            v8 = _round_i8(v * inv[None, :])
            tl.store(V8T + bh * BDV * Lk_p + offs_c[:, None] * Lk_p + rows[None, :],
                     tl.trans(v8))
            vscale = cmax / (127.0 * 254.0)
            vsum = tl.sum(v8.to(tl.float32), 0)
            tl.store(VS + (bh * n_k_blocks + blk) * BDV + offs_c, vscale)
            tl.store(VC + (bh * n_k_blocks + blk) * BDV + offs_c, 127.0 * vsum * vscale)


@triton.jit
def _attn8_step(acc, l_i, m_i, q, qs, k_base, ks_base, vt_base, vs_base, vc_base, mask_base,
                stride_mm, stride_mn, offs_m, offs_dv, start_n, Lq, Lk, Lk_p,
                BD: tl.constexpr, BDV: tl.constexpr, BLOCK_N: tl.constexpr,
                BOUNDARY: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                MASK_BOOL: tl.constexpr, MASK_RB: tl.constexpr, MASK_CB: tl.constexpr,
                POS_SCALE: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BD)
    k = tl.load(k_base + offs_n[:, None] * BD + offs_d[None, :])
    ks = tl.load(ks_base + offs_n)
    if HAS_MASK:
        am = _load_mask_tile(mask_base, offs_m, offs_n, stride_mm, stride_mn, Lq, Lk,
                             MASK_RB, MASK_CB, MASK_BOOL)
    t = tl.dot(q, tl.trans(k)).to(tl.float32) * ks[None, :]
    if BOUNDARY:
        ok = offs_n[None, :] < Lk
        if CAUSAL:
            ok = ok & (offs_m[:, None] >= offs_n[None, :])
    if HAS_MASK or not POS_SCALE:
        t = t * qs[:, None]
        if HAS_MASK:
            if MASK_BOOL:
                t = tl.where(am, t, float("-inf"))
            else:
                t = t + am
        if BOUNDARY:
            t = tl.where(ok, t, float("-inf"))
        m_tile = tl.max(t, 1)
        # rows with no unmasked key in the tile: keep exp2 arguments finite (-inf - -inf)
        m_tile_use = tl.where(m_tile == float("-inf"), 0.0, m_tile)
        p = tl.math.exp2(t - m_tile_use[:, None])
    else:
        # the row scale is > 0: max of the unscaled scores, then one FMA per element
        if BOUNDARY:
            t = tl.where(ok, t, float("-inf"))
        m_tile = tl.max(t, 1) * qs
        m_tile_use = tl.where(m_tile == float("-inf"), 0.0, m_tile)
        p = tl.math.exp2(t * qs[:, None] - m_tile_use[:, None])
    m_ij = tl.maximum(m_i, m_tile)
    m_use = tl.where(m_ij == float("-inf"), 0.0, m_ij)
    alpha = tl.math.exp2(m_i - m_use)
    # P relative to its own tile row's max (each row's largest entry is 1): all 255 levels
    # cover the tile's range, where relative to the running max a tile below it had only a
    # few (keys x20, float64 emulation: 3.1e-2 -> 1.0e-2 for P·V, scripts/attn8_numerics.py);
    # the tile's product is brought to the running max by one factor per row
    beta = tl.where(m_tile == float("-inf"), 0.0, tl.math.exp2(m_tile_use - m_use))
    # P on 255 levels: p = (p_hat + 127) / 254 with p_hat in [-127, 127]
    p_int = (p * 254.0 + 0.5).to(tl.int32)
    l_i = l_i * alpha + tl.sum(p_int, 1).to(tl.float32) * (beta * (1.0 / 254.0))
    vt = tl.load(vt_base + offs_dv[:, None] * Lk_p + offs_n[None, :])
    pv = tl.dot((p_int - 127).to(tl.int8), tl.trans(vt))
    blk = start_n // BLOCK_N
    vs = tl.load(vs_base + blk * BDV + offs_dv)
    vc = tl.load(vc_base + blk * BDV + offs_dv)
    acc = acc * alpha[:, None] + (pv.to(tl.float32) * vs[None, :] + vc[None, :]) * beta[:, None]
    return acc, l_i, m_ij


@triton.jit
def _attn8_inner(acc, l_i, m_i, q, qs, k_base, ks_base, vt_base, vs_base, vc_base, mask_base,
                 stride_mm, stride_mn, offs_m, offs_dv, lo, hi, Lq, Lk, Lk_p,
                 BD: tl.constexpr, BDV: tl.constexpr, BLOCK_N: tl.constexpr,
                 BOUNDARY: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                 MASK_BOOL: tl.constexpr, MASK_RB: tl.constexpr, MASK_CB: tl.constexpr,
                 POS_SCALE: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc, l_i, m_i = _attn8_step(
            acc, l_i, m_i, q, qs, k_base, ks_base, vt_base, vs_base, vc_base, mask_base,
            stride_mm, stride_mn, offs_m, offs_dv, start_n, Lq, Lk, Lk_p, BD, BDV, BLOCK_N,
            BOUNDARY, CAUSAL, HAS_MASK, MASK_BOOL, MASK_RB, MASK_CB, POS_SCALE)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["Lq", "Lk", "Lq_p", "Lk_p"])
def _attn8_fwd(Q8, QS, QM, K8, KS, V8T, VS, VC, Mask, Out, LSE,
               stride_mb, stride_mh, stride_mm, stride_mn,
               stride_ob, stride_oh, stride_om, stride_od, stride_lb, stride_lh, stride_lm,
               Hq, GROUP, Lq, Lk, Lq_p, Lk_p,
               DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
               MASK_RB: tl.constexpr, MASK_CB: tl.constexpr, POS_SCALE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:  # heaviest query blocks first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    off_b = pid_bh // Hq
    off_h = pid_bh % Hq
    Hk = Hq // GROUP
    bh = pid_bh.to(tl.int64)
    bhk = (off_b * Hk + off_h // GROUP).to(tl.int64)
    n_blocks = Lk_p // BLOCK_N

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    q = tl.load(Q8 + bh * Lq_p * BD + offs_m[:, None] * BD + offs_d[None, :])
    # an all-zero query row has scale 0; a tiny one keeps -inf * scale from becoming nan
    qs = tl.maximum(tl.load(QS + bh * Lq_p + offs_m), 1e-30)
    k_base = K8 + bhk * Lk_p * BD
    ks_base = KS + bhk * Lk_p
    vt_base = V8T + bhk * BDV * Lk_p
    vs_base = VS + bhk * n_blocks * BDV
    vc_base = VC + bhk * n_blocks * BDV
    mask_base = Mask + off_b.to(tl.int64) * stride_mb + off_h.to(tl.int64) * stride_mh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BDV], dtype=tl.float32)
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, Lk)
        full_hi = (tl.minimum(start_m, Lk) // BLOCK_N) * BLOCK_N
    else:
        hi = Lk
        full_hi = (Lk // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attn8_inner(acc, l_i, m_i, q, qs, k_base, ks_base, vt_base, vs_base,
                                 vc_base, mask_base, stride_mm, stride_mn, offs_m, offs_dv,
                                 0, full_hi, Lq, Lk, Lk_p, BD, BDV, BLOCK_N, False, CAUSAL,
                                 HAS_MASK, MASK_BOOL, MASK_RB, MASK_CB, POS_SCALE)
    acc, l_i, m_i = _attn8_inner(acc, l_i, m_i, q, qs, k_base, ks_base, vt_base, vs_base,
                                 vc_base, mask_base, stride_mm, stride_mn, offs_m, offs_dv,
                                 full_hi, hi, Lq, Lk, Lk_p, BD, BDV, BLOCK_N, True, CAUSAL,
                                 HAS_MASK, MASK_BOOL, MASK_RB, MASK_CB, POS_SCALE)
    m_ok = offs_m < Lq
    # the lse of the unsmoothed scores: add back q . mean (log2 units)
    m_i = m_i + tl.load(QM + bh * Lq_p + offs_m)
    _fwd_epilogue(acc, l_i, m_i, Out, LSE, off_b.to(tl.int64), off_h, offs_m, offs_dv, m_ok,
                  stride_ob, stride_oh, stride_om, stride_od, stride_lb, stride_lh, stride_lm,
                  DV, HAS_MASK)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def _pow2(n: int) -> int:
    # (32 at least: an 8-bit tensor-core product reduces over 32 elements at a time; a 16-wide
    # Q·Kᵀ compiled, and computed wrongly, on the H100)
    return max(32, triton.next_power_of_2(n))


@functools.lru_cache(maxsize=None)
def _rotation_cpu(n: int) -> torch.Tensor:
    """diag(signs) · H_n: +-1 entries (exact in any dtype), R Rᵀ = n I. Fixed signs (a seeded
    generator): the same rotation in every process, so results repeat."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    gen = torch.Generator().manual_seed(0x8B17)
    signs = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    return (signs[:, None] * h).contiguous()


_ROTATIONS: dict = {}


def _rotation(n: int, device, dtype=torch.float16) -> torch.Tensor:
    key = (n, device, dtype)
    rot = _ROTATIONS.get(key)
    if rot is None:
        rot = _ROTATIONS[key] = _rotation_cpu(n).to(device, dtype)
    return rot


def _blocks(bd: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_N is also the pre-pass's row block (V's
    scales are per BLOCK_N keys)."""
    if _INTERPRET:
        return 32, 32, 4, 1
    override = os.environ.get("ADAATTN_ATTN8_CONFIG")
    if override:
        bm, bn, w, s = (int(x) for x in override.split(","))
        return bm, bn, w, s
    if bd <= 64:
        return 128, 128, 8, 3
    if bd <= 128:
        return 128, 128, 8, 2
    return 64, 64, 4, 2


def clear_compiled() -> None:
    """Forget the compiled pre-pass and 8-bit forwards (see kernels.clear_compiled)."""
    from . import attn8_hopper
    _SM90_FAILED.clear()
    for jit_fn in (_quant_kernel, _attn8_fwd):
        launch.drop_compiled(jit_fn)
    if attn8_hopper.AVAILABLE:
        launch.drop_compiled(attn8_hopper._attn8_fwd_sm90)


def _prepass_warps(bd: int, sm90: bool) -> int:
    """The pre-pass's warps a program (``ADAATTN_ATTN8_PREPASS_WARPS`` replaces it: tuning).
    The sm90 form on 4 (H100, bf16, 16k tokens x 2048, rotated in bf16: D = 128 0.205 ms
    against 0.275 on 8; D = 64 0.147-0.154 against 0.155-0.165; twenty-eighth session).
    Blocks taken in 64-row tiles, twice each (the block's max, then the quantisation),
    measured no faster with the earlier fp16 rotation (0.29 ms), so they were not kept."""
    override = os.environ.get("ADAATTN_ATTN8_PREPASS_WARPS")
    if override:
        return int(override)
    return 4 if sm90 or bd < 128 else 8


def supports(q, k, v, attn_mask=None, dropout_p=0.0):
    """None if :func:`forward` can run these inputs, else a short reason."""
    reason = _flash_supports(q, k, v, attn_mask, dropout_p)
    if reason is not None:
        return reason
    if max(q.shape[-1], v.shape[-1]) > _MAX_HEAD_DIM:
        return f"head dim > {_MAX_HEAD_DIM}"
    return None


def quantise(q, k, v, scale=None, sm90=False):
    """The pre-pass alone: the 8-bit tensors and scales :func:`forward` feeds its kernel, as a
    dict (for tests and benchmarks). Q is padded to whole query blocks and K / V to whole key
    blocks (zeros, scale 0), so that the attention kernel loads without bounds checks.
    ``sm90``: the form :mod:`.attn8_hopper` reads (see _quant_kernel; needs D == Dv): ``ks``
    one scale per block of ``rows`` keys and ``vs`` one per block (both repeated), ``v8t``
    holding V·R with its keys in the kernel's P-operand order, ``vc`` not written."""
    if sm90 and q.shape[-1] != v.shape[-1]:
        raise ValueError("attn8.quantise: the sm90 form needs D == Dv")
    B, Hq, Lq, D = q.shape
    Hk, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    BD, BDV = _pow2(D), _pow2(Dv)
    bm, rows, _, _ = _blocks(BD)
    Lq_p = triton.cdiv(Lq, max(bm, rows)) * max(bm, rows)
    Lk_p = triton.cdiv(Lk, rows) * rows
    sm_scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dev = q.device
    t = dict(
        q8=torch.empty((B, Hq, Lq_p, BD), device=dev, dtype=torch.int8),
        qs=torch.empty((B, Hq, Lq_p), device=dev, dtype=torch.float32),
        qm=torch.empty((B, Hq, Lq_p), device=dev, dtype=torch.float32),
        k8=torch.empty((B, Hk, Lk_p, BD), device=dev, dtype=torch.int8),
        ks=torch.empty((B, Hk, Lk_p), device=dev, dtype=torch.float32),
        v8t=torch.empty((B, Hk, BDV, Lk_p), device=dev, dtype=torch.int8),
        vs=torch.empty((B, Hk, Lk_p // rows, BDV), device=dev, dtype=torch.float32),
        vc=torch.empty((B, Hk, Lk_p // rows, BDV), device=dev, dtype=torch.float32))
    n_q = Lq_p // rows
    grid = (n_q + Lk_p // rows * (2 if sm90 else 1), B * max(Hq, Hk))
    # fp16 / bf16 inputs rotate in their own dtype, exactly; fp32 ones in fp16 parts
    native = q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
    rot = _rotation(BD, dev, q.dtype if native else torch.float16)
    launch.launch(_quant_kernel, lambda meta: grid,
                  (q, k, v, rot, t["q8"], t["qs"], t["qm"], t["k8"], t["ks"],
                   t["v8t"], t["vs"], t["vc"], *q.stride(), *k.stride(), *v.stride(),
                   Hq, Hk, Lq, Lk, Lq_p, Lk_p, n_q, sm_scale * _LOG2E / BD, sm_scale * _LOG2E),
                  dict(D=D, DV=Dv, BD=BD, BDV=BDV, ROWS=rows, SM90=bool(sm90), NATIVE=native,
                       num_warps=_prepass_warps(BD, sm90)),
                  dev)
    t.update(Lq_p=Lq_p, Lk_p=Lk_p, rows=rows, BD=BD, BDV=BDV, sm_scale=sm_scale,
             sm90=bool(sm90))
    return t


# Devices where the Gluon kernel failed to build or launch: the Triton kernel runs there from
# then on (as a new process would try it again, clear_compiled forgets them).
_SM90_FAILED: set = set()


def sm90_unsupported(q, k, v, attn_mask=None):
    """None if :func:`forward` runs these inputs on the Gluon sm90 kernel
    (:mod:`.attn8_hopper`), else why not."""
    from . import attn8_hopper
    if q.device in _SM90_FAILED:
        return "the Gluon 8-bit kernel failed on this device"
    cap = _capability(q.device) if q.device.type == "cuda" else (0, 0)
    return attn8_hopper.unsupported(q, k, v, attn_mask, cap)


def forward(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """8-bit attention forward. Same contract as :func:`.flash.flash_forward`: q (B, Hq, Lq,
    D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv); -> (out in q.dtype, lse float32 natural log).
    On sm90 without a mask, D = Dv in {64, 128}: the Gluon kernel (its own quantisation of K
    and V, see :mod:`.attn8_hopper`); else the Triton-language one here."""
    reason = supports(q, k, v, attn_mask, 0.0)
    if reason is not None:
        raise ValueError(f"attn8.forward: {reason}")
    if sm90_unsupported(q, k, v, attn_mask) is None:
        from . import attn8_hopper
        try:
            t = quantise(q, k, v, scale, sm90=True)
            B, Hq, Lq, _ = q.shape
            out = torch.empty((B, Hq, Lq, v.shape[3]), device=q.device, dtype=q.dtype)
            lse = torch.empty((B, Hq, Lq), device=q.device, dtype=torch.float32)
            return attn8_hopper.attend(t, q, is_causal, k.shape[2], out, lse)
        except Exception as exc:   # (another triton's Gluon, a build error): the Triton kernel
            _SM90_FAILED.add(q.device)
            warnings.warn(f"attn8: the sm90 Gluon kernel failed ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); the Triton 8-bit kernel runs on {q.device} "
                          "from now on")
    return attend(quantise(q, k, v, scale), q, k, v, attn_mask, is_causal)


def attend(t, q, k, v, attn_mask=None, is_causal=False):
    """The attention kernel on :func:`quantise`'s tensors ``t`` (q, k, v give the shapes and
    the output dtype)."""
    B, Hq, Lq, D = q.shape
    Hk, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    bm, bn, warps, stages = _blocks(t["BD"])
    out = torch.empty((B, Hq, Lq, Dv), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Hq, Lq), device=q.device, dtype=torch.float32)
    mask, ms, has_mask, is_bool, rb, cb = _prep_mask(attn_mask, (B, Hq, Lq, Lk), q.device)
    grid = (triton.cdiv(Lq, bm), B * Hq)
    launch.launch(_attn8_fwd, lambda meta: grid,
                  (t["q8"], t["qs"], t["qm"], t["k8"], t["ks"], t["v8t"], t["vs"], t["vc"], mask,
                   out,
                   lse, *ms, *out.stride(), *lse.stride(), Hq, Hq // Hk, Lq, Lk, t["Lq_p"],
                   t["Lk_p"]),
                  dict(DV=Dv, BD=t["BD"], BDV=t["BDV"], CAUSAL=bool(is_causal),
                       HAS_MASK=has_mask, MASK_BOOL=is_bool, MASK_RB=rb, MASK_CB=cb,
                       POS_SCALE=t["sm_scale"] > 0, BLOCK_M=bm, BLOCK_N=bn,
                       num_warps=warps, num_stages=stages),
                  q.device)
    return out, lse
