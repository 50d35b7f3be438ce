"""Dense flash attention in Triton: forward and backward (FlashAttention-2 algorithm).

:func:`flash_forward` first offers the call to the Gluon sm90 forward (:mod:`.flash_hopper`,
FlashAttention-3's schedule: Hopper, fp16/bf16, D = Dv in {64, 128}, where it measured faster);
everything else, and every backward, runs the kernels in this file.

Public API (used by the rest of the package):

* :func:`supports` -- ``None`` if the kernel can run the inputs, else a short human reason.
* :func:`flash_forward` -- ``(out, lse)``.
* :func:`flash_backward` -- ``(dq, dk, dv, d_mask)``.

Layout: ``q (B, Hq, Lq, D)``, ``k (B, Hkv, Lk, D)``, ``v (B, Hkv, Lk, Dv)`` with ``Hq % Hkv == 0``
(GQA / MQA: query head ``h`` reads kv head ``h // (Hq // Hkv)``; K/V are never repeated).
Inputs are read through their strides (a copy is made only when the last dim is not unit-stride).

Numerics: fp16 / bf16 / fp32 inputs, fp32 accumulation, fp32 softmax statistics computed with
``exp2`` (``log2(e)`` folded into the scale). fp32 inputs use TF32 tensor cores only when torch
allows TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32`` or
``torch.get_float32_matmul_precision() != "highest"``), else full-precision ("ieee") dots.

Masks: ``attn_mask`` is ``None``, a bool tensor (True = attend) or a float tensor added to the
scaled scores, broadcastable to ``(B, Hq, Lq, Lk)``. Broadcast dims are read with stride 0, tile
by tile; the mask is never expanded in memory. ``is_causal`` is top-left aligned like
``F.scaled_dot_product_attention(is_causal=True)``: query ``i`` attends keys ``j <= i``; blocks
above the diagonal are skipped and only diagonal / ragged-edge blocks pay for element masking.

Fully masked rows (every key masked out): the output row is 0 and ``lse`` is ``-inf``; their
gradients are 0. This matches the math path of ``F.scaled_dot_product_attention`` in
torch >= 2.5 (which uses a "safe" softmax returning zeros for fully masked rows).

Hopper (sm90) with 16-bit inputs, head dims <= 128 and 16-byte aligned strides: the forward can
read Q/K/V through 4-D tensor descriptors (bulk tensor copies; zero fill past Lq / Lk / D, so no
load masks), optionally with a warp-specialized main loop; see :func:`_use_tma` for when (it is
chosen where it measured faster) and ``ADAATTN_FLASH_TMA`` / ``ADAATTN_FLASH_WS`` to override.
A build failure there falls back to the plain-load kernel. Additive (B|1, H|1, 1, Lk) masks of
the inputs' dtype are added by a small tensor-core product (``BIAS_ROWS``; the mask row goes
through the software pipeline like K and V) instead of a register load per K tile
(``ADAATTN_FLASH_BIAS_DOT=0`` turns that off).

Block sizes are autotuned (``triton.autotune``), keyed by head dims, causal, mask kind and the
tensors' dtypes; the candidate list depends on the head-dim bucket and on the GPU's compute
capability (one autotuner per (kernel, bucket, capability)). Under ``TRITON_INTERPRET=1`` a
single small configuration is used.
"""
from __future__ import annotations

import concurrent.futures
import functools
import inspect
import math
import os
import threading
import warnings

import torch
import triton
import triton.language as tl

try:  # bulk-tensor-copy (TMA) descriptors: triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:  # pragma: no cover
    _TensorDescriptor = None

from . import flash_hopper, launch

__all__ = ["supports", "flash_forward", "flash_backward"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------------------------
# small jit helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_2d(ptrs, row_ok, col_ok, CHECK_ROW: tl.constexpr, CHECK_COL: tl.constexpr):
    """Load a 2-D tile, predicating only the dims that can run out of bounds (zero fill)."""
    if CHECK_ROW:
        if CHECK_COL:
            x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if CHECK_COL:
            x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _mask_vals(m, MASK_BOOL: tl.constexpr):
    if MASK_BOOL:
        return m != 0
    else:
        return m.to(tl.float32) * 1.4426950408889634  # additive mask in log2 units


@triton.jit
def _load_mask_raw(mask_base, offs_r, offs_c, stride_r, stride_c, n_r, n_c,
                   R_BCAST: tl.constexpr, C_BCAST: tl.constexpr):
    """Raw mask values of an (R, C) tile: a vector / scalar tile when a dim is broadcast
    (stride 0), else the full tile. Out-of-range entries read as 0 (= masked for bool)."""
    if R_BCAST:
        if C_BCAST:
            m = tl.load(mask_base + (offs_r[:, None] * 0 + offs_c[None, :] * 0))
        else:
            m = tl.load(mask_base + offs_c * stride_c, mask=offs_c < n_c, other=0)
    else:
        if C_BCAST:
            m = tl.load(mask_base + offs_r * stride_r, mask=offs_r < n_r, other=0)
        else:
            m = tl.load(mask_base + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c,
                        mask=(offs_r[:, None] < n_r) & (offs_c[None, :] < n_c), other=0)
    return m


@triton.jit
def _mask_finish(m, R: tl.constexpr, C: tl.constexpr, R_BCAST: tl.constexpr,
                 C_BCAST: tl.constexpr, MASK_BOOL: tl.constexpr):
    """Raw values -> (R, C) tile: int1 (True = attend) for a bool mask, else the additive mask
    times log2(e) in fp32. Vectors are converted before broadcasting."""
    m = _mask_vals(m, MASK_BOOL)
    if R_BCAST:
        if not C_BCAST:
            m = tl.broadcast_to(m[None, :], (R, C))
    else:
        if C_BCAST:
            m = tl.broadcast_to(m[:, None], (R, C))
    return m


@triton.jit
def _load_mask_tile(mask_base, offs_r, offs_c, stride_r, stride_c, n_r, n_c,
                    R_BCAST: tl.constexpr, C_BCAST: tl.constexpr, MASK_BOOL: tl.constexpr):
    """Load an (R, C) tile of the (broadcast) attention mask (see _mask_finish)."""
    m = _load_mask_raw(mask_base, offs_r, offs_c, stride_r, stride_c, n_r, n_c,
                       R_BCAST, C_BCAST)
    return _mask_finish(m, offs_r.shape[0], offs_c.shape[0], R_BCAST, C_BCAST, MASK_BOOL)


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_step(acc, l_i, m_i, q, k_base, v_base, mask_base, desc_k, desc_v, kv_b, kv_h, bias_a,
              stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
              offs_m, offs_d, offs_dv, start_n, Lq, Lk, D: tl.constexpr, DV: tl.constexpr,
              qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
              BOUNDARY: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
              MASK_RB: tl.constexpr, MASK_CB: tl.constexpr, PREC: tl.constexpr,
              POS_SCALE: tl.constexpr, USE_TMA: tl.constexpr, BIAS_ROWS: tl.constexpr):
    """One K/V tile of the online softmax. USE_TMA: K/V come through tensor descriptors (rows
    past Lk and columns past D are zero-filled by the copy engine). BIAS_ROWS > 0: the additive
    mask is a (.., 1, Lk) row vector that a small tensor-core product adds to the scores (see
    _bias_operand); it is loaded as a (16, BLOCK_N) tile so that the software pipeliner streams
    it into shared memory ahead of use like K and V."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Lk
    if USE_TMA:
        k = desc_k.load([kv_b, kv_h, start_n, 0]).reshape(BLOCK_N, q.shape[1])
    else:
        d_ok = offs_d < D
        k = _load_2d(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                     n_ok, d_ok, BOUNDARY, not EVEN_D)
    if BIAS_ROWS > 0:
        rows = tl.arange(0, 16)
        bt = tl.load(mask_base + rows[:, None] * 0 + offs_n[None, :] * stride_mn,
                     mask=(rows[:, None] < BIAS_ROWS) & n_ok[None, :], other=0.0)
        # scores + bias / sm_scale, exactly enough (fp32 accumulation of bf16/fp16 products)
        qk = tl.dot(q, tl.trans(k), tl.dot(bias_a, bt.to(q.dtype)), input_precision=PREC)
    elif HAS_MASK and USE_TMA:
        # issued before the QK product so that its latency overlaps the tensor-core work (the
        # descriptor path has the registers for it; the plain-load path spills at 128 x 128)
        am = _load_mask_tile(mask_base, offs_m, offs_n, stride_mm, stride_mn, Lq, Lk,
                             MASK_RB, MASK_CB, MASK_BOOL)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
    else:
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        if HAS_MASK:
            am = _load_mask_tile(mask_base, offs_m, offs_n, stride_mm, stride_mn, Lq, Lk,
                                 MASK_RB, MASK_CB, MASK_BOOL)
    if BOUNDARY:
        ok = n_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_m[:, None] >= offs_n[None, :])
    if HAS_MASK and BIAS_ROWS == 0:
        if MASK_BOOL:
            qk = tl.where(am, qk * qk_scale, float("-inf"))
        else:
            qk = qk * qk_scale + am
        if BOUNDARY:
            qk = tl.where(ok, qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        # rows with no unmasked key so far: keep exp2 arguments finite (-inf - -inf = nan)
        m_use = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = tl.math.exp2(qk - m_use[:, None])
    elif POS_SCALE:
        # max of the raw scores, then one FMA per element (needs qk_scale > 0)
        if BOUNDARY:
            qk = tl.where(ok, qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        if HAS_MASK:  # bias rows: -inf entries can mask a whole row
            m_use = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        else:
            m_use = m_ij
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    else:
        qk = qk * qk_scale
        if BOUNDARY:
            qk = tl.where(ok, qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        m_use = m_ij
        p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if USE_TMA:
        v = desc_v.load([kv_b, kv_h, start_n, 0]).reshape(BLOCK_N, acc.shape[1])
    else:
        dv_ok = offs_dv < DV
        v = _load_2d(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                     n_ok, dv_ok, BOUNDARY, not EVEN_DV)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
    return acc, l_i, m_ij


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, mask_base, desc_k, desc_v, kv_b, kv_h, bias_a,
               stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
               offs_m, offs_d, offs_dv, lo, hi, Lq, Lk, D: tl.constexpr, DV: tl.constexpr, qk_scale,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
               BOUNDARY: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
               MASK_RB: tl.constexpr, MASK_CB: tl.constexpr, PREC: tl.constexpr,
               POS_SCALE: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
               BIAS_ROWS: tl.constexpr):
    if WARP_SPEC:
        for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            acc, l_i, m_i = _fwd_step(
                acc, l_i, m_i, q, k_base, v_base, mask_base, desc_k, desc_v, kv_b, kv_h, bias_a,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                offs_m, offs_d, offs_dv, start_n, Lq, Lk, D, DV, qk_scale, BLOCK_M, BLOCK_N,
                EVEN_D, EVEN_DV, BOUNDARY, CAUSAL, HAS_MASK, MASK_BOOL, MASK_RB, MASK_CB, PREC,
                POS_SCALE, USE_TMA, BIAS_ROWS)
    else:
        for start_n in range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            acc, l_i, m_i = _fwd_step(
                acc, l_i, m_i, q, k_base, v_base, mask_base, desc_k, desc_v, kv_b, kv_h, bias_a,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                offs_m, offs_d, offs_dv, start_n, Lq, Lk, D, DV, qk_scale, BLOCK_M, BLOCK_N,
                EVEN_D, EVEN_DV, BOUNDARY, CAUSAL, HAS_MASK, MASK_BOOL, MASK_RB, MASK_CB, PREC,
                POS_SCALE, USE_TMA, BIAS_ROWS)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["Lq", "Lk"])
def _attn_fwd(Q, K, V, Mask, Out, LSE,
              stride_qb, stride_qh, stride_qm, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_mb, stride_mh, stride_mm, stride_mn,
              stride_ob, stride_oh, stride_om, stride_od,
              stride_lb, stride_lh, stride_lm,
              Hq, GROUP, Lq, Lk, D: tl.constexpr, DV: tl.constexpr, qk_scale,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
              MASK_RB: tl.constexpr, MASK_CB: tl.constexpr, PREC: tl.constexpr,
              POS_SCALE: tl.constexpr, inv_hi, inv_lo, BIAS_ROWS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    EVEN_D: tl.constexpr = BLOCK_D == D
    EVEN_DV: tl.constexpr = BLOCK_DV == DV
    pid_m = tl.program_id(0)
    if CAUSAL:  # heaviest query blocks first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    off_b = pid_bh // Hq
    off_h = pid_bh % Hq
    off_hk = off_h // GROUP
    off_b64 = off_b.to(tl.int64)

    q_base = Q + off_b64 * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b64 * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_b64 * stride_vb + off_hk.to(tl.int64) * stride_vh
    mask_base = Mask + off_b64 * stride_mb + off_h.to(tl.int64) * stride_mh

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Lq

    q = _load_2d(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                 m_ok, offs_d < D, True, not EVEN_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, Lk)
        full_hi = (tl.minimum(start_m, Lk) // BLOCK_N) * BLOCK_N
    else:
        hi = Lk
        full_hi = (Lk // BLOCK_N) * BLOCK_N
    bias_a = _bias_operand(inv_hi, inv_lo, BLOCK_M, BIAS_ROWS, Q.dtype.element_ty)
    # blocks that need no element masking
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, mask_base, 0, 0, 0, 0, bias_a,
                               stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                               offs_m, offs_d, offs_dv, 0, full_hi, Lq, Lk, D, DV, qk_scale,
                               BLOCK_M, BLOCK_N, EVEN_D, EVEN_DV, False, CAUSAL,
                               HAS_MASK, MASK_BOOL, MASK_RB, MASK_CB, PREC, POS_SCALE,
                               False, False, BIAS_ROWS)
    # diagonal (causal) and ragged-edge blocks
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, mask_base, 0, 0, 0, 0, bias_a,
                               stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                               offs_m, offs_d, offs_dv, full_hi, hi, Lq, Lk, D, DV, qk_scale,
                               BLOCK_M, BLOCK_N, EVEN_D, EVEN_DV, True, CAUSAL,
                               HAS_MASK, MASK_BOOL, MASK_RB, MASK_CB, PREC, POS_SCALE,
                               False, False, BIAS_ROWS)

    _fwd_epilogue(acc, l_i, m_i, Out, LSE, off_b64, off_h, offs_m, offs_dv, m_ok,
                  stride_ob, stride_oh, stride_om, stride_od, stride_lb, stride_lh, stride_lm,
                  DV, HAS_MASK)


@triton.jit
def _bias_operand(inv_hi, inv_lo, BLOCK_M: tl.constexpr, BIAS_ROWS: tl.constexpr,
                  dtype: tl.constexpr):
    """A (BLOCK_M, 16) operand whose product with the (16, BLOCK_N) tile [bias; bias; 0...] is
    bias * (inv_hi + inv_lo) = bias / sm_scale in every row (inv_hi, inv_lo: a two-term split of
    1 / sm_scale, both >= 0 so that -inf biases stay -inf)."""
    if BIAS_ROWS > 0:
        cols = tl.arange(0, 16)
        a_row = tl.where(cols == 0, inv_hi, tl.where(cols == 1, inv_lo, 0.0))
        a = tl.broadcast_to(a_row[None, :], (BLOCK_M, 16)).to(dtype)
    else:
        a = 0
    return a


@triton.jit
def _fwd_epilogue(acc, l_i, m_i, Out, LSE, off_b64, off_h, offs_m, offs_dv, m_ok,
                  stride_ob, stride_oh, stride_om, stride_od, stride_lb, stride_lh, stride_lm,
                  DV: tl.constexpr, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    else:
        l_safe = l_i
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    out = acc / l_safe[:, None]

    o_base = Out + off_b64 * stride_ob + off_h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=m_ok[:, None] & (offs_dv[None, :] < DV))
    l_base = LSE + off_b64 * stride_lb + off_h.to(tl.int64) * stride_lh
    tl.store(l_base + offs_m * stride_lm, lse, mask=m_ok)


@triton.jit(do_not_specialize=["Lq", "Lk"])
def _attn_fwd_tma(desc_q, desc_k, desc_v, Mask, Out, LSE,
                  stride_mb, stride_mh, stride_mm, stride_mn,
                  stride_ob, stride_oh, stride_om, stride_od,
                  stride_lb, stride_lh, stride_lm,
                  Hq, GROUP, Lq, Lk, D: tl.constexpr, DV: tl.constexpr, qk_scale,
                  BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                  MASK_RB: tl.constexpr, MASK_CB: tl.constexpr, PREC: tl.constexpr,
                  POS_SCALE: tl.constexpr, inv_hi, inv_lo, BIAS_ROWS: tl.constexpr,
                  WARP_SPEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Hopper forward: Q/K/V tiles through 4-D tensor descriptors (bulk tensor copies, zero fill
    past Lq / Lk / D), otherwise the same algorithm as _attn_fwd."""
    pid_m = tl.program_id(0)
    if CAUSAL:  # heaviest query blocks first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    off_b = pid_bh // Hq
    off_h = pid_bh % Hq
    off_hk = off_h // GROUP
    off_b64 = off_b.to(tl.int64)
    mask_base = Mask + off_b64 * stride_mb + off_h.to(tl.int64) * stride_mh

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Lq

    q = desc_q.load([off_b, off_h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, Lk)
        full_hi = (tl.minimum(start_m, Lk) // BLOCK_N) * BLOCK_N
    else:
        hi = Lk
        full_hi = (Lk // BLOCK_N) * BLOCK_N
    bias_a = _bias_operand(inv_hi, inv_lo, BLOCK_M, BIAS_ROWS, q.dtype)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, 0, 0, mask_base, desc_k, desc_v, off_b, off_hk,
                               bias_a, 0, 0, 0, 0, stride_mm, stride_mn,
                               offs_m, offs_d, offs_dv, 0, full_hi, Lq, Lk, D, DV, qk_scale,
                               BLOCK_M, BLOCK_N, True, True, False, CAUSAL,
                               HAS_MASK, MASK_BOOL, MASK_RB, MASK_CB, PREC, POS_SCALE,
                               True, WARP_SPEC, BIAS_ROWS)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, 0, 0, mask_base, desc_k, desc_v, off_b, off_hk,
                               bias_a, 0, 0, 0, 0, stride_mm, stride_mn,
                               offs_m, offs_d, offs_dv, full_hi, hi, Lq, Lk, D, DV, qk_scale,
                               BLOCK_M, BLOCK_N, True, True, True, CAUSAL,
                               HAS_MASK, MASK_BOOL, MASK_RB, MASK_CB, PREC, POS_SCALE,
                               True, False, BIAS_ROWS)
    _fwd_epilogue(acc, l_i, m_i, Out, LSE, off_b64, off_h, offs_m, offs_dv, m_ok,
                  stride_ob, stride_oh, stride_om, stride_od, stride_lb, stride_lh, stride_lm,
                  DV, HAS_MASK)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["Lq"])
def _bwd_preprocess(Out, DO, LSE, Delta, LSE2, Work,
                    stride_ob, stride_oh, stride_om, stride_od,
                    stride_gb, stride_gh, stride_gm, stride_gd,
                    stride_lb, stride_lh, stride_lm,
                    Hq, Lq, DV: tl.constexpr,
                    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O); lse2 = lse * log2(e) with -inf (fully masked rows) -> +inf;
    the dK / dV kernel's worklist emptied (Work[0] = 0: see _attn_bwd_dkdv)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if (pid_m == 0) & (pid_bh == 0):
        tl.store(Work, 0)
    off_b = (pid_bh // Hq).to(tl.int64)
    off_h = (pid_bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Lq
    msk = m_ok[:, None] & (offs_dv[None, :] < DV)
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om
                + offs_dv[None, :] * stride_od, mask=msk, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_gb + off_h * stride_gh + offs_m[:, None] * stride_gm
                 + offs_dv[None, :] * stride_gd, mask=msk, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, axis=1)
    lse = tl.load(LSE + off_b * stride_lb + off_h * stride_lh + offs_m * stride_lm,
                  mask=m_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    row = pid_bh.to(tl.int64) * Lq + offs_m
    tl.store(Delta + row, delta, mask=m_ok)
    tl.store(LSE2 + row, lse2, mask=m_ok)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, ds_base,
                    stride_qm, stride_qd, stride_gm, stride_gd, stride_mm, stride_mn,
                    offs_n, offs_d, offs_dv, lo, hi, Lq, Lk, D: tl.constexpr, DV: tl.constexpr,
                    qk_scale, BLOCK_M: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
                    BOUNDARY: tl.constexpr, CAUSAL: tl.constexpr,
                    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                    MASK_RB: tl.constexpr, MASK_CB: tl.constexpr,
                    STORE_DS: tl.constexpr, PREC: tl.constexpr):
    offs_mb = tl.arange(0, BLOCK_M)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_mb
        m_ok = offs_m < Lq
        if HAS_MASK:
            # issued first, its latency overlapping the loads and the product (after the
            # product, as in _bwd_dq_inner: the dK / dV kernel with a (B, 1, L, L) mask
            # 1.05-1.41x this one's time as tuned, D = 64 / 128, 2k, H100)
            amT = _load_mask_raw(mask_base, offs_n, offs_m, stride_mn, stride_mm, Lk, Lq,
                                 MASK_CB, MASK_RB)
        q = _load_2d(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                     m_ok, d_ok, BOUNDARY, not EVEN_D)
        if BOUNDARY:
            lse2 = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))
        else:
            lse2 = tl.load(lse_base + offs_m)
        qkT = tl.dot(k, tl.trans(q), input_precision=PREC)  # (BLOCK_N, BLOCK_M)
        if HAS_MASK:
            amT = _mask_finish(amT, offs_n.shape[0], offs_m.shape[0], MASK_CB, MASK_RB,
                               MASK_BOOL)
            if MASK_BOOL:
                pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
                pT = tl.where(amT, pT, 0.0)
            else:
                pT = tl.math.exp2(qkT * qk_scale + amT - lse2[None, :])
        else:
            pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
        if BOUNDARY:
            ok = m_ok[None, :]
            if CAUSAL:
                ok = ok & (offs_m[None, :] >= offs_n[:, None])
            pT = tl.where(ok, pT, 0.0)
        do = _load_2d(do_base + offs_m[:, None] * stride_gm + offs_dv[None, :] * stride_gd,
                      m_ok, dv_ok, BOUNDARY, not EVEN_DV)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
        if BOUNDARY:
            delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        else:
            delta = tl.load(delta_base + offs_m)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        if STORE_DS:
            tl.store(ds_base + offs_m[None, :] * Lk + offs_n[:, None], dsT,
                     mask=m_ok[None, :] & (offs_n[:, None] < Lk))
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_heads(dk, dv, k, v, Q, DO, LSE2, Delta, Mask, DS, off_b64, off_hk, offs_n, offs_d,
                    offs_dv, lo, diag_hi, full_hi, stride_qb, stride_qh, stride_qm, stride_qd,
                    stride_mb, stride_mh, stride_mm, stride_mn,
                    stride_gb, stride_gh, stride_gm, stride_gd, Hq, GROUP, Lq, Lk,
                    D: tl.constexpr, DV: tl.constexpr, qk_scale, BLOCK_M: tl.constexpr,
                    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, CAUSAL: tl.constexpr,
                    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, MASK_RB: tl.constexpr,
                    MASK_CB: tl.constexpr, STORE_DS: tl.constexpr, PREC: tl.constexpr):
    """dK / dV of one key block summed over the query heads of its kv head: per head the
    causal diagonal blocks, the full blocks and the ragged tail of the query rows."""
    for g in range(0, GROUP):
        off_h = off_hk * GROUP + g
        bh = off_b64 * Hq + off_h
        q_base = Q + off_b64 * stride_qb + off_h.to(tl.int64) * stride_qh
        do_base = DO + off_b64 * stride_gb + off_h.to(tl.int64) * stride_gh
        mask_base = Mask + off_b64 * stride_mb + off_h.to(tl.int64) * stride_mh
        lse_base = LSE2 + bh * Lq
        delta_base = Delta + bh * Lq
        ds_base = DS + bh * Lq * Lk
        # causal diagonal blocks (masked)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                 mask_base, ds_base, stride_qm, stride_qd, stride_gm, stride_gd,
                                 stride_mm, stride_mn, offs_n, offs_d, offs_dv, lo, diag_hi,
                                 Lq, Lk, D, DV, qk_scale, BLOCK_M, EVEN_D, EVEN_DV, True, CAUSAL,
                                 HAS_MASK, MASK_BOOL, MASK_RB, MASK_CB, STORE_DS, PREC)
        # full blocks
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                 mask_base, ds_base, stride_qm, stride_qd, stride_gm, stride_gd,
                                 stride_mm, stride_mn, offs_n, offs_d, offs_dv, diag_hi, full_hi,
                                 Lq, Lk, D, DV, qk_scale, BLOCK_M, EVEN_D, EVEN_DV, False, CAUSAL,
                                 HAS_MASK, MASK_BOOL, MASK_RB, MASK_CB, STORE_DS, PREC)
        # ragged tail of the query rows (masked)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                 mask_base, ds_base, stride_qm, stride_qd, stride_gm, stride_gd,
                                 stride_mm, stride_mn, offs_n, offs_d, offs_dv, full_hi, Lq,
                                 Lq, Lk, D, DV, qk_scale, BLOCK_M, EVEN_D, EVEN_DV, True, CAUSAL,
                                 HAS_MASK, MASK_BOOL, MASK_RB, MASK_CB, STORE_DS, PREC)
    return dk, dv


@triton.jit
def _key_bias_log2(Mask, off_b64, off_h, offs_n, n_ok, stride_mb, stride_mh, stride_mn,
                   VOLATILE: tl.constexpr):
    """The additive key row of (batch, head) at keys offs_n, in log2 units (fp32)."""
    ptrs = Mask + off_b64 * stride_mb + off_h.to(tl.int64) * stride_mh + offs_n * stride_mn
    return tl.load(ptrs, mask=n_ok, other=0.0, volatile=VOLATILE).to(tl.float32) \
        * 1.4426950408889634


# KEY_SCALE: how far (log2 units) a key's bias may be from 0 for its dK / dV rows to be
# scaled at the end (see _attn_bwd_dkdv): P without the bias is P * 2^-b, at most 2^64 (and
# down to 2^-64 of it), well inside fp32 / bf16 range.
_KEY_SCALE_RANGE = tl.constexpr(64.0)


@triton.jit(do_not_specialize=["Lq", "Lk"])
def _attn_bwd_dkdv(Q, K, V, Mask, DO, LSE2, Delta, DK, DV_, DS, Work,
                   stride_qb, stride_qh, stride_qm, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_mb, stride_mh, stride_mm, stride_mn,
                   stride_gb, stride_gh, stride_gm, stride_gd,
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                   stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                   Hq, Hkv, GROUP, Lq, Lk, D: tl.constexpr, DV: tl.constexpr, qk_scale, sm_scale,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                   MASK_RB: tl.constexpr, MASK_CB: tl.constexpr, STORE_DS: tl.constexpr,
                   PREC: tl.constexpr, KEY_SCALE: tl.constexpr, REST_N: tl.constexpr,
                   TUNE_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of one key block (BLOCK_N keys of one (batch, kv head)), looping over the query
    blocks of each query head that reads it.

    KEY_SCALE (an additive bias per key, broadcast over the query rows and the same for every
    query head of this kv head; set by the host): P = 2^(s - lse2) * 2^b_n, and 2^b_n is
    constant over this program's loop, so pass 1 runs the loop without the mask, as for no
    mask at all, and scales the dK / dV rows by 2^b_n once at the end (rows of -inf keys: 0),
    for the key blocks whose finite biases are all within _KEY_SCALE_RANGE of 0 (so that
    P * 2^-b stays in range). It lists the other blocks, in pieces of REST_N keys, in Work
    (Work[0]: how many, zeroed by _bwd_preprocess); pass 2 (a second launch, persistent: a
    program an SM or two) adds the bias score by score in the listed pieces only. Two passes
    rather than a branch between the two loops in one kernel: that kernel took more registers
    and other tiles than the unmasked one, and ran 19-23 % slower than it (causal D = 64,
    2k / 4k, H100). A worklist rather than a pass-2 program per key block: those programs,
    almost all leaving at once, cost 60-90 us a backward at any length (B * L = 16k tokens,
    D = 64, H100) -- 10-14 % of the whole backward at L = 512."""
    if KEY_SCALE == 2:
        tl.static_assert(BLOCK_N == REST_N)
        n_pieces = tl.cdiv(Lk, BLOCK_N)
        for i in range(tl.program_id(0), tl.load(Work), tl.num_programs(0)):
            piece = tl.load(Work + 1 + i)
            _dkdv_block(piece % n_pieces, piece // n_pieces, Q, K, V, Mask, DO, LSE2, Delta,
                        DK, DV_, DS, Work, stride_qb, stride_qh, stride_qm, stride_qd,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd,
                        stride_mb, stride_mh, stride_mm, stride_mn,
                        stride_gb, stride_gh, stride_gm, stride_gd,
                        stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                        stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                        Hq, Hkv, GROUP, Lq, Lk, D, DV, qk_scale, sm_scale, BLOCK_D, BLOCK_DV,
                        CAUSAL, HAS_MASK, MASK_BOOL, MASK_RB, MASK_CB, STORE_DS, PREC,
                        KEY_SCALE, REST_N, BLOCK_M, BLOCK_N)
    else:
        _dkdv_block(tl.program_id(0), tl.program_id(1), Q, K, V, Mask, DO, LSE2, Delta,
                    DK, DV_, DS, Work, stride_qb, stride_qh, stride_qm, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_vb, stride_vh, stride_vn, stride_vd,
                    stride_mb, stride_mh, stride_mm, stride_mn,
                    stride_gb, stride_gh, stride_gm, stride_gd,
                    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                    Hq, Hkv, GROUP, Lq, Lk, D, DV, qk_scale, sm_scale, BLOCK_D, BLOCK_DV,
                    CAUSAL, HAS_MASK, MASK_BOOL, MASK_RB, MASK_CB, STORE_DS, PREC,
                    KEY_SCALE, REST_N, BLOCK_M, BLOCK_N)


@triton.jit
def _dkdv_block(pid_n, pid_bh, Q, K, V, Mask, DO, LSE2, Delta, DK, DV_, DS, Work,
                stride_qb, stride_qh, stride_qm, stride_qd,
                stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd,
                stride_mb, stride_mh, stride_mm, stride_mn,
                stride_gb, stride_gh, stride_gm, stride_gd,
                stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                Hq, Hkv, GROUP, Lq, Lk, D: tl.constexpr, DV: tl.constexpr, qk_scale, sm_scale,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                MASK_RB: tl.constexpr, MASK_CB: tl.constexpr, STORE_DS: tl.constexpr,
                PREC: tl.constexpr, KEY_SCALE: tl.constexpr, REST_N: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of key block pid_n of (batch, kv head) pid_bh (see _attn_bwd_dkdv)."""
    EVEN_D: tl.constexpr = BLOCK_D == D
    EVEN_DV: tl.constexpr = BLOCK_DV == DV
    off_b = pid_bh // Hkv
    off_hk = pid_bh % Hkv
    off_b64 = off_b.to(tl.int64)

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < Lk
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    k = _load_2d(K + off_b64 * stride_kb + off_hk.to(tl.int64) * stride_kh
                 + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                 n_ok, d_ok, True, not EVEN_D)
    v = _load_2d(V + off_b64 * stride_vb + off_hk.to(tl.int64) * stride_vh
                 + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                 n_ok, dv_ok, True, not EVEN_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    lq_ceil = tl.cdiv(Lq, BLOCK_M) * BLOCK_M
    lq_floor = (Lq // BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = tl.minimum((start_n // BLOCK_M) * BLOCK_M, lq_ceil)
        diag_hi = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, lq_ceil)
    else:
        lo = 0
        diag_hi = 0
    full_hi = tl.maximum(diag_hi, lq_floor)

    # which key blocks pass 1 computes: those whose rows it can scale; it lists the others
    # for pass 2, in pieces of pass 2's REST_N keys (those that hold keys)
    if KEY_SCALE == 1:
        bias = _key_bias_log2(Mask, off_b64, off_hk * GROUP, offs_n, n_ok, stride_mb,
                              stride_mh, stride_mn, False)
        todo = tl.max(tl.abs(tl.where(bias == float("-inf"), 0.0, bias)), 0) \
            <= _KEY_SCALE_RANGE
        if not todo:
            tl.static_assert(BLOCK_N % REST_N == 0)
            n_pieces = tl.minimum(BLOCK_N // REST_N, tl.cdiv(Lk - start_n, REST_N))
            first = tl.atomic_add(Work, n_pieces)
            offs_piece = tl.arange(0, BLOCK_N // REST_N)
            tl.store(Work + 1 + first + offs_piece,
                     pid_bh * tl.cdiv(Lk, REST_N) + start_n // REST_N + offs_piece,
                     mask=offs_piece < n_pieces)
    else:
        todo = True
    if todo:
        # (pass 1 is launched with HAS_MASK off: the loop without the mask)
        dk, dv = _bwd_dkdv_heads(dk, dv, k, v, Q, DO, LSE2, Delta, Mask, DS, off_b64, off_hk,
                                 offs_n, offs_d, offs_dv, lo, diag_hi, full_hi,
                                 stride_qb, stride_qh, stride_qm, stride_qd,
                                 stride_mb, stride_mh, stride_mm, stride_mn,
                                 stride_gb, stride_gh, stride_gm, stride_gd, Hq, GROUP, Lq, Lk,
                                 D, DV, qk_scale, BLOCK_M, EVEN_D, EVEN_DV, CAUSAL, HAS_MASK,
                                 MASK_BOOL, MASK_RB, MASK_CB, STORE_DS, PREC)
        if KEY_SCALE == 1:
            # the key rows read again rather than kept through the loop (volatile: not merged
            # with the first read; their pointers built again too). Held, they took 172
            # registers a thread at the (32, 64) tiles against the unmasked kernel's 157, over
            # the 168 that let three programs share an SM: the whole backward with a bias ran
            # 71-77 % of the unmasked one's speed (D = 64, not causal). Read again: 166, pass
            # 1 0.97 / 1.05x the unmasked kernel's time at 2k / 16k (H100, thirteenth session)
            bias = _key_bias_log2(Mask, off_b64, off_hk * GROUP, offs_n, n_ok, stride_mb,
                                  stride_mh, stride_mn, True)
            dead = bias == float("-inf")
            # (a -inf key's rows may hold inf / nan from the unbiased P: replaced)
            row_scale = tl.math.exp2(tl.where(dead, 0.0, bias))[:, None]
            dk = tl.where(dead[:, None], 0.0, dk * row_scale)
            dv = tl.where(dead[:, None], 0.0, dv * row_scale)
        _store_dkdv(dk, dv, DK, DV_, off_b64, off_hk, offs_n, offs_d, offs_dv, n_ok, d_ok,
                    dv_ok, sm_scale, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                    stride_dvb, stride_dvh, stride_dvn, stride_dvd)


@triton.jit
def _store_dkdv(dk, dv, DK, DV_, off_b64, off_hk, offs_n, offs_d, offs_dv, n_ok, d_ok, dv_ok,
                sm_scale, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                stride_dvb, stride_dvh, stride_dvn, stride_dvd):
    dk = dk * sm_scale
    st_ok = n_ok[:, None]
    tl.store(DK + off_b64 * stride_dkb + off_hk.to(tl.int64) * stride_dkh
             + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=st_ok & d_ok[None, :])
    tl.store(DV_ + off_b64 * stride_dvb + off_hk.to(tl.int64) * stride_dvh
             + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd,
             dv.to(DV_.dtype.element_ty), mask=st_ok & dv_ok[None, :])


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, mask_base,
                  stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                  offs_m, offs_d, offs_dv, lo, hi, Lq, Lk, D: tl.constexpr, DV: tl.constexpr,
                  qk_scale, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
                  BOUNDARY: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                  MASK_RB: tl.constexpr, MASK_CB: tl.constexpr, PREC: tl.constexpr):
    offs_nb = tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_nb
        n_ok = offs_n < Lk
        k = _load_2d(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                     n_ok, d_ok, BOUNDARY, not EVEN_D)
        v = _load_2d(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                     n_ok, dv_ok, BOUNDARY, not EVEN_DV)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        if HAS_MASK:
            # (loaded here, after the product: issued before it, or as a float32 row the
            # software pipeliner streams into shared memory, this kernel ran no faster, or
            # slower, with a key row: H100, fourteenth session)
            am = _load_mask_tile(mask_base, offs_m, offs_n, stride_mm, stride_mn, Lq, Lk,
                                 MASK_RB, MASK_CB, MASK_BOOL)
            if MASK_BOOL:
                p = tl.math.exp2(qk * qk_scale - lse2[:, None])
                p = tl.where(am, p, 0.0)
            else:
                p = tl.math.exp2(qk * qk_scale + am - lse2[:, None])
        else:
            p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if BOUNDARY:
            ok = n_ok[None, :]
            if CAUSAL:
                ok = ok & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    return dq


@triton.jit(do_not_specialize=["Lq", "Lk"])
def _attn_bwd_dq(Q, K, V, Mask, DO, LSE2, Delta, DQ,
                 stride_qb, stride_qh, stride_qm, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_mb, stride_mh, stride_mm, stride_mn,
                 stride_gb, stride_gh, stride_gm, stride_gd,
                 stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                 Hq, GROUP, Lq, Lk, D: tl.constexpr, DV: tl.constexpr, qk_scale, sm_scale,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                 MASK_RB: tl.constexpr, MASK_CB: tl.constexpr, PREC: tl.constexpr,
                 TUNE_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    EVEN_D: tl.constexpr = BLOCK_D == D
    EVEN_DV: tl.constexpr = BLOCK_DV == DV
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    off_b = pid_bh // Hq
    off_h = pid_bh % Hq
    off_hk = off_h // GROUP
    off_b64 = off_b.to(tl.int64)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Lq
    d_ok = offs_d < D

    q = _load_2d(Q + off_b64 * stride_qb + off_h.to(tl.int64) * stride_qh
                 + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                 m_ok, d_ok, True, not EVEN_D)
    do = _load_2d(DO + off_b64 * stride_gb + off_h.to(tl.int64) * stride_gh
                  + offs_m[:, None] * stride_gm + offs_dv[None, :] * stride_gd,
                  m_ok, offs_dv < DV, True, not EVEN_DV)
    row = pid_bh.to(tl.int64) * Lq + offs_m
    lse2 = tl.load(LSE2 + row, mask=m_ok, other=float("inf"))
    delta = tl.load(Delta + row, mask=m_ok, other=0.0)

    k_base = K + off_b64 * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_b64 * stride_vb + off_hk.to(tl.int64) * stride_vh
    mask_base = Mask + off_b64 * stride_mb + off_h.to(tl.int64) * stride_mh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, Lk)
        full_hi = (tl.minimum(start_m, Lk) // BLOCK_N) * BLOCK_N
    else:
        hi = Lk
        full_hi = (Lk // BLOCK_N) * BLOCK_N
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, mask_base,
                       stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                       offs_m, offs_d, offs_dv, 0, full_hi, Lq, Lk, D, DV, qk_scale,
                       BLOCK_N, EVEN_D, EVEN_DV, False, CAUSAL,
                       HAS_MASK, MASK_BOOL, MASK_RB, MASK_CB, PREC)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, mask_base,
                       stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                       offs_m, offs_d, offs_dv, full_hi, hi, Lq, Lk, D, DV, qk_scale,
                       BLOCK_N, EVEN_D, EVEN_DV, True, CAUSAL,
                       HAS_MASK, MASK_BOOL, MASK_RB, MASK_CB, PREC)
    dq = dq * sm_scale
    tl.store(DQ + off_b64 * stride_dqb + off_h.to(tl.int64) * stride_dqh
             + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------
# configurations / autotuning
# ----------------------------------------------------------------------------------------------
_KEY = ["BLOCK_D", "BLOCK_DV", "CAUSAL", "HAS_MASK", "MASK_BOOL", "PREC"]


def _cfg(bm, bn, w, s):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


def _bucket(bd, dtype):
    b = 64 if bd <= 64 else (128 if bd <= 128 else 256)
    return b * 2 if dtype == torch.float32 else b  # fp32 tiles take twice the shared memory


# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates for Hopper / A100-class shared memory,
# per head-dim bucket (16-bit inputs; fp32 inputs use the next bucket up). The first entry is
# the default used when autotuning is off. Chosen so that they compile without (or with little)
# register spilling for sm_90 (checked with cuobjdump -res-usage).
_CANDIDATES = {
    "fwd": {64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3),
                 (128, 128, 8, 4)],
            128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4)],
            256: [(128, 32, 8, 2), (64, 32, 4, 2), (64, 64, 4, 2)],
            512: [(64, 32, 4, 1), (32, 32, 4, 1)]},
    # Hopper forward through tensor descriptors (same buckets; BLOCK_D <= 128 only)
    "fwd_tma": {64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3),
                     (128, 128, 8, 4)],
                128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4)]},
    # BLOCK_M = query rows per step, BLOCK_N = keys owned by one program
    "dkdv": {64: [(64, 128, 8, 3), (32, 128, 8, 3), (32, 64, 4, 3), (16, 64, 4, 3)],
             128: [(32, 128, 8, 3), (16, 128, 8, 3), (32, 128, 8, 2)],
             256: [(16, 64, 8, 2), (32, 64, 8, 2)],
             512: [(16, 32, 4, 1), (16, 64, 8, 1)]},
    "dq": {64: [(128, 64, 8, 3), (128, 32, 4, 4), (64, 32, 4, 3)],
           128: [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)],
           256: [(64, 16, 4, 2), (128, 32, 8, 2)],
           512: [(32, 16, 4, 1), (64, 16, 4, 1)]},
}


def _tma_pre_hook(nargs):
    """Tensor-descriptor block shapes follow the config being launched."""
    bm, bn = nargs["BLOCK_M"], nargs["BLOCK_N"]
    nargs["desc_q"].block_shape = [1, 1, bm, nargs["BLOCK_D"]]
    nargs["desc_k"].block_shape = [1, 1, bn, nargs["BLOCK_D"]]
    nargs["desc_v"].block_shape = [1, 1, bn, nargs["BLOCK_DV"]]


def _configs(kind, bucket, cap, override=None):
    """Autotune candidates. Causal tiling needs BLOCK_N | BLOCK_M (fwd, dq) and BLOCK_M | BLOCK_N
    (dkdv): every candidate satisfies that."""
    if kind == "dkdv_rest":   # (not tuned: it mostly has nothing to do)
        c = [_rest_config(bucket, cap)]
    elif _INTERPRET:
        c = {"fwd": [(32, 16, 4, 1)], "fwd_tma": [(32, 16, 4, 1)], "dkdv": [(16, 32, 4, 1)],
             "dq": [(32, 16, 4, 1)]}[kind]
    else:
        c = override or _CANDIDATES[kind][bucket]
    if kind == "fwd_tma":
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st,
                              pre_hook=_tma_pre_hook) for bm, bn, w, st in c]
    if _INTERPRET:
        return [_cfg(*x) for x in c]
    big_smem = cap[0] >= 9 or cap in ((8, 0), (8, 7))  # H100 / A100-class shared memory
    if not big_smem:  # ~100 KB of shared memory: smaller tiles, shallower pipelines
        small = [x for x in c if x[0] * x[1] <= 64 * 64] or [(64, 32, 4, 2)]
        c = [(bm, bn, w, min(s, 2)) for bm, bn, w, s in small]
    return [_cfg(*x) for x in c]


# the dK / dV kernel's second pass with a key bias (KEY_SCALE 2: pieces of REST_N = its BLOCK_N
# keys, which must divide every first-pass BLOCK_N), per head-dim bucket
_REST_CANDIDATE = {64: (32, 64, 4, 3), 128: (32, 64, 8, 3), 256: (16, 64, 8, 2),
                   512: (16, 32, 4, 1)}


def _rest_config(bucket, cap):
    """The second pass's config: its BLOCK_N no larger than any first-pass candidate's (all
    powers of two, so it divides them), BLOCK_M dividing BLOCK_N (causal tiling)."""
    if _INTERPRET:
        return (16, 32, 4, 1)
    first = _config_override("dkdv") or _CANDIDATES["dkdv"][bucket]
    bm, bn, w, st = _REST_CANDIDATE[bucket]
    bn = min([bn] + [c[1] for c in first])
    if not (cap[0] >= 9 or cap in ((8, 0), (8, 7))):
        st = min(st, 2)
    return (min(bm, bn), bn, w, st)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# dkdv_rest: the dK / dV kernel's second pass with a key bias (KEY_SCALE 2)
_KERNELS = {"fwd": _attn_fwd, "fwd_tma": _attn_fwd_tma, "dkdv": _attn_bwd_dkdv,
            "dkdv_rest": _attn_bwd_dkdv, "dq": _attn_bwd_dq}
_TUNED: dict = {}


def clear_compiled() -> None:
    """Forget every kernel compiled, config tuned and launch bound in this process, as a new
    process starts (``adaattn_compile.kernels.clear_compiled``)."""
    global _FAST_EPOCH
    for jit_fn in _KERNELS.values():
        launch.drop_compiled(jit_fn)
    _TUNED.clear()
    _FAST_FWD.clear()
    _FAST_EPOCH += 1
    _TMA_FAILED.clear()   # (a build that failed is tried again, as a new process would)
    _SM90_FAILED.clear()


def _capability(device):
    if device.type == "cuda":
        return _cuda_capability(device.index if device.index is not None
                                else torch.cuda.current_device())
    return (0, 0)


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int):
    # Cached: torch.cuda.get_device_capability costs ~10 us, and it was asked 4x per call.
    return torch.cuda.get_device_capability(index)


def _autotune_enabled():
    """``ADAATTN_FLASH_AUTOTUNE=0`` uses each list's first (heuristic) config without timing:
    quick start-up, e.g. for tests that compile many shape variants."""
    return os.environ.get("ADAATTN_FLASH_AUTOTUNE", "1") not in ("0", "false", "False", "")


_KEY_EXTRA = {"fwd": ["BIAS_ROWS"], "fwd_tma": ["BIAS_ROWS", "WARP_SPEC"],
              "dq": ["TUNE_L"], "dkdv": ["TUNE_L"], "dkdv_rest": ["KEY_SCALE", "TUNE_L"]}


def _tune_bucket(lq, lk):
    """TUNE_L of the backward kernels: the power-of-two bucket of the longer sequence, in their
    autotune keys (a constexpr the kernels do not read). Without it the config tuned at the
    first call's length served every length: the masked causal dK / dV kernel at D = 64 ran
    16k on the (16, 64) tiles an earlier call chose, 6.93 ms against 5.91 ms on the default
    (64, 128) ones (H100)."""
    return max(7, min(15, (max(lq, lk, 1) - 1).bit_length()))


def _config_override(kind):
    """``ADAATTN_FLASH_CONFIGS_FWD="128,128,8,3;128,64,8,3"`` (likewise ``_FWD_TMA``): replace
    the candidate list of one kernel (tuning experiments)."""
    txt = os.environ.get("ADAATTN_FLASH_CONFIGS_" + kind.upper(), "").strip()
    if not txt:
        return None
    return tuple(tuple(int(x) for x in c.split(",")) for c in txt.split(";") if c.strip())


# Forward calls below this many FLOPs are not autotuned: they take the candidate whose grid
# fills the GPU best (:func:`_grid_filling_config`). Timing the candidates means compiling all
# of them first, and that is the bulk of a model's first-call time: t5-small's two small
# sites (decoder self-attention 512 x 512, cross-attention 512 x 4096, 0.5 and 4.3 GFLOP)
# compiled 5 candidates each, 26-37 CPU-seconds on the H100 machine (scripts/compile_time.py),
# for kernels of 10-40 us a call.
_TUNE_MIN_FLOPS = 8e9


def _small_call(q, k, causal):
    """(Lq, B * Hq) of a forward call too small to autotune, else None."""
    if _fwd_flops(q, k, causal) >= _TUNE_MIN_FLOPS:
        return None
    return q.shape[2], q.shape[0] * q.shape[1]


def _grid_filling_config(cfgs, small, device) -> int:
    """Index of the first candidate (the lists are in order of preference) whose grid of
    (query blocks x rows) programs covers every SM; else of the one with the most programs."""
    lq, rows = small
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    programs = [triton.cdiv(lq, c.kwargs["BLOCK_M"]) * rows for c in cfgs]
    for i, n in enumerate(programs):
        if n >= sms:
            return i
    return max(range(len(cfgs)), key=lambda i: (programs[i], -i))


def _tuned(kind, bd, dtype, device, small=None):
    """The autotuned kernel ``kind`` for head-dim bucket ``bd``. ``small`` (from
    :func:`_small_call`): one candidate, picked without timing."""
    cap = _capability(device)
    tune = _autotune_enabled()
    override = None if _INTERPRET else _config_override(kind)
    if kind == "dkdv_rest":   # (its config follows the first pass's candidates: in the key)
        override = _rest_config(_bucket(bd, dtype), cap)
    cfgs = pick = None
    if small is not None and tune and not _INTERPRET and device.type == "cuda":
        cfgs = _configs(kind, _bucket(bd, dtype), cap, override)
        pick = _grid_filling_config(cfgs, small, device)
    key = (kind, _bucket(bd, dtype), cap, tune, override, pick)
    fn = _TUNED.get(key)
    if fn is None:
        cfgs = cfgs or _configs(kind, key[1], cap, override)
        if pick is not None:
            cfgs = [cfgs[pick]]
        elif not tune:
            cfgs = cfgs[:1]
        extra = {"cache_results": True} if _AUTOTUNE_DISK_CACHE else {}
        fn = triton.autotune(configs=cfgs, key=_KEY + _KEY_EXTRA.get(kind, []),
                             **extra)(_KERNELS[kind])
        if type(fn) is _Autotuner:
            fn.__class__ = _ParallelCompileAutotuner
        _TUNED[key] = fn
    return fn


# Autotune choices kept on disk next to the compiled kernels (triton >= 3.3), so that a new
# process reuses them instead of timing every candidate again: keyed by triton's version, the
# GPU target, the kernel's source, the tuning key and the candidate list.
_AUTOTUNE_DISK_CACHE = "cache_results" in inspect.signature(triton.autotune).parameters
_Autotuner = triton.runtime.autotuner.Autotuner


class _ParallelCompileAutotuner(_Autotuner):
    """triton's autotuner, compiling every candidate of a new tuning key at once in threads
    before timing them one by one. About 80% of a Triton compile runs without the GIL (MLIR
    passes, LLVM, ptxas: measured on triton 3.6 with a counting thread), so N candidates cost
    about the slowest one's compile instead of their sum: the first call of each kernel
    specialisation, i.e. part of ``torch.compile``'s first-call time. Nothing changes where
    the choice comes from triton's disk cache (no timing, so nothing is compiled here)."""

    def run(self, *args, **kwargs):
        # One call at a time per autotuner: a call keeps its arguments on the autotuner while
        # it tunes (``nargs``, read by the descriptor kernels' pre-hooks, and the candidates
        # to compile below), and kernel builds run on threads (prebuild.py) as user threads
        # may. (Its launches after the first go through launch.py, not through here.)
        with self.__dict__.setdefault("_run_lock", threading.Lock()):
            return super().run(*args, **kwargs)

    def prune_configs(self, kwargs):
        configs = super().prune_configs(kwargs)
        # descriptor kernels' configs set block shapes in a pre-hook: compiled the usual way
        self._compile_first = [c for c in configs if c.pre_hook is None]
        return configs

    def _bench(self, *args, config, **meta):
        pending, self._compile_first = getattr(self, "_compile_first", None), None
        if pending and len(pending) > 1:
            _compile_in_parallel(self.fn, args, meta, pending)
        return super()._bench(*args, config=config, **meta)


def _compile_in_parallel(jit, args, meta, configs):
    """Compile (``warmup``: no launch) ``jit`` under each config, in threads. Failures are
    left for the autotuner's own launch of that config to report (it skips a candidate that
    runs out of resources)."""
    def compile_one(config):
        jit.run(*args, **dict(meta, warmup=True, **config.all_kwargs()))

    workers = min(len(configs), os.cpu_count() or 1, 8)
    if workers < 2:
        return
    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for future in [pool.submit(compile_one, c) for c in configs]:
                future.exception()   # wait; an error is raised again where the config is timed
    except Exception:   # pragma: no cover - e.g. no threads: the autotuner compiles serially
        pass


def _precision(dtype):
    if dtype != torch.float32:
        return "tf32"  # ignored for 16-bit inputs
    if _INTERPRET:
        return "ieee"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        allow = bool(torch.backends.cuda.matmul.allow_tf32)
    if allow or torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dtype_name(dt):
    return str(dt).replace("torch.", "")


def supports(q, k, v, attn_mask=None, dropout_p=0.0):
    """None if :func:`flash_forward` / :func:`flash_backward` can run these inputs, else a reason."""
    if dropout_p and dropout_p > 0:
        return "dropout not supported by the Triton kernel"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return f"{name} is not a tensor"
        if t.dim() != 4:
            return f"{name} has {t.dim()} dims, expected 4 (B, H, L, D)"
        if t.dtype not in _DTYPES:
            return f"dtype {_dtype_name(t.dtype)}"
    if not (q.dtype == k.dtype == v.dtype):
        return f"mixed dtypes {_dtype_name(q.dtype)}/{_dtype_name(k.dtype)}/{_dtype_name(v.dtype)}"
    if not (q.device == k.device == v.device):
        return "q, k, v on different devices"
    if q.device.type != "cuda" and not (_INTERPRET and q.device.type == "cpu"):
        return f"device {q.device.type} (the Triton kernel needs CUDA)"
    B, Hq, Lq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        return "batch sizes of q, k, v differ"
    Hkv, Lk = k.shape[1], k.shape[2]
    if v.shape[1] != Hkv or v.shape[2] != Lk:
        return "k and v shapes disagree"
    if k.shape[3] != D:
        return "q and k head dims differ"
    Dv = v.shape[3]
    if Hkv == 0 or Hq % Hkv != 0:
        return f"query heads {Hq} not a multiple of kv heads {Hkv}"
    if D > _MAX_HEAD_DIM:
        return f"head dim {D} > {_MAX_HEAD_DIM}"
    if Dv > _MAX_HEAD_DIM:
        return f"value head dim {Dv} > {_MAX_HEAD_DIM}"
    if min(B, Hq, Lq, Lk, D, Dv) == 0:
        return "empty input"
    if q.device.type == "cuda" and q.dtype == torch.bfloat16 and _capability(q.device)[0] < 8:
        return "bfloat16 needs compute capability >= 8.0"
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            return "attn_mask is not a tensor"
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            return f"mask dtype {_dtype_name(attn_mask.dtype)}"
        if attn_mask.dim() > 4:
            return f"mask has {attn_mask.dim()} dims"
        if attn_mask.device != q.device:
            return "mask on a different device"
        # broadcastable to exactly (B, Hq, Lq, Lk); checked by hand: torch.broadcast_shapes
        # costs tens of microseconds, on every call
        target = (B, Hq, Lq, Lk)
        if any(m != 1 and m != t for m, t in zip(attn_mask.shape[::-1], target[::-1])):
            return f"mask shape {tuple(attn_mask.shape)} not broadcastable to {target}"
    return None


def _unit_last(t):
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


_DUMMY_MASK: dict = {}
_IDLE_WORK: dict = {}


def _idle_work(device):
    """The dK / dV worklist of a backward without a second pass: only its count is written (0,
    by _bwd_preprocess; never read), so one per device serves every such call."""
    work = _IDLE_WORK.get(device)
    if work is None:
        work = _IDLE_WORK[device] = torch.empty(1, device=device, dtype=torch.int32)
    return work


def _prep_mask(attn_mask, shape, device):
    """-> (tensor, strides (b, h, m, n), has_mask, is_bool, row_bcast, col_bcast)."""
    if attn_mask is None:
        dummy = _DUMMY_MASK.get(device)
        if dummy is None:  # never read (HAS_MASK is off): one per device, not one per call
            dummy = _DUMMY_MASK[device] = torch.empty(1, device=device, dtype=torch.float32)
        return dummy, (0, 0, 0, 0), False, False, False, False
    m = attn_mask
    is_bool = m.dtype == torch.bool
    if is_bool:
        m = m.view(torch.uint8)
    m = m.expand(shape)  # a view: broadcast dims get stride 0
    st = list(m.stride())
    for i in range(4):
        if shape[i] == 1:
            st[i] = 0
    return m, tuple(st), True, is_bool, st[2] == 0, st[3] == 0


def _check_lengths(Lq, Lk):
    # in-kernel row offsets are int32 (per (batch, head) base is int64)
    if max(Lq, Lk) >= 2**31 // _MAX_HEAD_DIM:
        raise ValueError("sequence too long for the flash kernel")


def _new_out(shape, like, blhd):
    """Out of (B, H, L, D) ``shape`` in ``like``'s dtype and device: contiguous, or with
    ``blhd`` a (B, H, L, D) view of (B, L, H, D) memory (the kernels write through out's
    strides)."""
    if blhd:
        b, h, n, d = shape
        return torch.empty((b, n, h, d), device=like.device, dtype=like.dtype).transpose(1, 2)
    return torch.empty(shape, device=like.device, dtype=like.dtype)


def flash_forward(q, k, v, attn_mask=None, is_causal=False, scale=None, out_blhd=False,
                  mask_group=None):
    """Flash attention forward.

    q: (B, Hq, Lq, D), k: (B, Hkv, Lk, D), v: (B, Hkv, Lk, Dv), ``Hq % Hkv == 0`` (GQA/MQA: query
    head h uses kv head ``h // (Hq // Hkv)``). attn_mask: None, bool (True = attend) or float
    (added to the scaled scores), broadcastable to (B, Hq, Lq, Lk). is_causal: top-left aligned
    (query i attends keys j <= i). scale: None -> 1/sqrt(D).

    Returns ``(out, lse)``: out (B, Hq, Lq, Dv) in q.dtype, contiguous (``out_blhd``: a view of
    (B, Lq, Hq, Dv) memory, the layout the heads' next op wants); lse (B, Hq, Lq) float32,
    the natural-log log-sum-exp of the scaled + masked scores of each row. Fully masked rows
    (every key masked) give out = 0 and lse = -inf, like the math path of
    ``F.scaled_dot_product_attention`` in torch >= 2.5.
    """
    signature = None
    if _FAST_FWD_ON:
        signature = _fwd_signature(q, k, v, attn_mask, is_causal, scale, out_blhd)
        fast = _FAST_FWD.get(signature)
        if fast is not None:
            try:
                return run_fast(fast, q, k, v, attn_mask, out_blhd, mask_group)
            except Exception as exc:  # another triton's launcher: the full path from now on
                fast_launch_failed(exc)
                signature = None
    reason = supports(q, k, v, attn_mask, 0.0)
    if reason is not None:
        raise ValueError(f"flash_forward: {reason}")
    if signature is not None and not (q.stride(-1) == k.stride(-1) == v.stride(-1) == 1):
        signature = None   # copies below: the launch sees other tensors than the caller's
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    _check_lengths(Lq, Lk)
    sm_scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = _new_out((B, Hq, Lq, Dv), q, out_blhd)
    lse = torch.empty((B, Hq, Lq), device=q.device, dtype=torch.float32)
    mask, ms, has_mask, is_bool, rb, cb = _prep_mask(attn_mask, (B, Hq, Lq, Lk), q.device)

    with _on_device(q.device):
        # the Gluon sm90 kernel first: where it runs, nothing below is needed (its host path
        # is kept short: this runs once per attention call)
        if _use_sm90(q, k, v, sm_scale, bool(is_causal)):
            try:
                flags = (has_mask, is_bool, rb, cb)
                flash_hopper.forward(q, k, v, mask, ms, flags, bool(is_causal), sm_scale, out, lse)
                if signature is not None:
                    _remember_fast(signature, flash_hopper.bind(
                        q, k, v, mask, ms, flags, bool(is_causal), sm_scale, out, lse),
                        out, lse, mask, attn_mask)
                return out, lse
            except Exception as e:  # a compiler / driver without it: the Triton kernels instead
                _SM90_FAILED[_sm90_key(q)] = f"{type(e).__name__}: {str(e)[:2000]}"
                warnings.warn(f"flash_forward: Gluon sm90 kernel failed to build or launch "
                              f"({type(e).__name__}: {str(e)[:200]}); using the Triton kernel")
        BD = max(16, triton.next_power_of_2(D))
        BDV = max(16, triton.next_power_of_2(Dv))
        prec = _precision(q.dtype)
        inv_hi, inv_lo, bias_rows = 0.0, 0.0, 0
        if (has_mask and not is_bool and rb and not cb and attn_mask.dtype == q.dtype
                and q.dtype in (torch.float16, torch.bfloat16) and sm_scale > 0
                and _env_flag("ADAATTN_FLASH_BIAS_DOT", True)):
            inv_hi, inv_lo, bias_rows = _inv_split(sm_scale, q.dtype)
        consts = dict(BLOCK_D=BD, BLOCK_DV=BDV, CAUSAL=bool(is_causal), HAS_MASK=has_mask,
                      MASK_BOOL=is_bool, MASK_RB=rb, MASK_CB=cb, PREC=prec,
                      POS_SCALE=sm_scale > 0, BIAS_ROWS=bias_rows)
        tail = (Hq, Hq // Hkv, Lq, Lk, D, Dv, sm_scale * _LOG2E)
        if _use_tma(q, k, v, BD, BDV, bool(is_causal), has_mask):
            ws = _use_ws(q, BD, BDV, bool(is_causal), has_mask)
            for ws_try in ((True, False) if ws else (False,)):
                try:
                    _launch_fwd_tma(q, k, v, mask, ms, out, lse, tail, inv_hi, inv_lo, consts,
                                    ws_try)
                    return out, lse
                except Exception as e:  # compiler / driver without it: next variant instead
                    key = (_capability(q.device), ws_try, _bucket(max(BD, BDV), q.dtype))
                    _TMA_FAILED[key] = f"{type(e).__name__}: {str(e)[:2000]}"
                    warnings.warn(f"flash_forward: tensor-descriptor kernel (warp_specialize="
                                  f"{ws_try}) failed to build or launch ({type(e).__name__}: "
                                  f"{str(e)[:200]}); falling back")
        fn = _tuned("fwd", max(BD, BDV), q.dtype, q.device, _small_call(q, k, is_causal))
        grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)  # noqa: E731
        args = (q, k, v, mask, out, lse, *q.stride(), *k.stride(), *v.stride(), *ms,
                *out.stride(), *lse.stride(), *tail)
        kwargs = dict(inv_hi=inv_hi, inv_lo=inv_lo, **consts)
        launch.launch(fn, grid, args, kwargs, q.device)
        if signature is not None:
            _remember_fast(signature, launch.bind(fn, grid, args, kwargs, q.device),
                           out, lse, mask, attn_mask)
    return out, lse


# ----------------------------------------------------------------------------------------------
# The forward's per-call fast path. A call whose signature -- shapes, strides, dtypes, devices,
# 16-byte alignment of q / k / v and the mask, the mask's layout, causal, scale, the float32
# matmul precision and the ADAATTN_* switches read above -- was launched directly before takes
# none of the decisions again: it allocates out / lse and launches the bound kernel. (The
# checks, the kernel choice and the launch key took ~35 us a call on the 2-core CPU machine,
# the Python host of the H100 machine being slower still: as much as a small attention call
# runs on the GPU. The whole op call went from 96 to 66 us there.)

class _FastForward:
    """A bound launch with what its caller prepares: the outputs' shapes, whether a bool mask
    is passed as its uint8 view (``mask_bool``: the kernel reads it; a Gluon launch with a bias
    tile reads the tile instead, and takes the mask as it is) and the stand-in for no mask."""
    __slots__ = ("launch", "out_shape", "lse_shape", "mask_bool", "no_mask", "out_layout",
                 "lse_strides")

    def __init__(self, bound, out_shape, lse_shape, mask_bool, no_mask, out_layout=None):
        self.launch, self.out_shape, self.lse_shape = bound, out_shape, lse_shape
        self.mask_bool, self.no_mask = mask_bool, no_mask
        # out as the kernel takes it (shape, strides: out_blhd's transposed view) and lse's
        # strides, for allocating them in one call each (see run_fast)
        self.out_layout = out_layout
        self.lse_strides = _contiguous_strides(lse_shape)


def _contiguous_strides(shape) -> tuple:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def fast_entry(signature):
    """The bound launch kept for a call signature (:func:`_fwd_signature`), or None."""
    return _FAST_FWD.get(signature) if _FAST_FWD_ON else None


def run_fast(fast, q, k, v, attn_mask, out_blhd=False, mask_group=None, lse=None):
    """:func:`flash_forward` through the bound launch ``fast`` (from :func:`fast_entry`; the
    caller matched the call's signature): new outputs, one launch (``lse``: a buffer of
    ``fast.lse_shape`` to write the row log-sum-exp into instead of a new one). Raises what
    the launch raises (the caller then calls :func:`fast_launch_failed`)."""
    device = q.device
    if (device.type == "cuda" and _EMPTY_STRIDED_CUDA is not None and fast.out_layout is not None
            and device.index == torch.cuda.current_device()):
        # (Inductor's own allocation call, without torch.empty's argument parsing: a third of
        # its host time for CPU tensors on the 2-core machine; no view to make. It allocates on
        # the current device, which is q's here)
        device_guard = _NULLCTX
        out = _EMPTY_STRIDED_CUDA(*fast.out_layout, q.dtype)
        if lse is None:
            lse = _EMPTY_STRIDED_CUDA(fast.lse_shape, fast.lse_strides, torch.float32)
    else:
        device_guard = _on_device(device)
        out = torch.empty(fast.out_shape, device=device, dtype=q.dtype)
        if out_blhd:
            out = out.transpose(1, 2)
        if lse is None:
            lse = torch.empty(fast.lse_shape, device=device, dtype=torch.float32)
    if attn_mask is None:
        mask = fast.no_mask
    else:
        mask = attn_mask.view(torch.uint8) if fast.mask_bool else attn_mask
    with device_guard:
        if mask_group is None or attn_mask is None:
            fast.launch(q, k, v, mask, out, lse)
        else:   # (a Gluon launch may derive a tile from the mask: shared)
            fast.launch(q, k, v, mask, out, lse, mask_group=mask_group, mask_owner=attn_mask)
    return out, lse


def fast_launch_failed(exc) -> None:
    """A bound launch raised (another triton's launcher): the full launch path from now on."""
    global _FAST_FWD_ON, _FAST_EPOCH
    _FAST_FWD_ON = False
    _FAST_FWD.clear()
    _FAST_EPOCH += 1
    warnings.warn(f"flash_forward: bound launch failed ({type(exc).__name__}: "
                  f"{str(exc)[:200]}); taking the full launch path from now on")


_FAST_FWD: dict = {}
_FAST_FWD_LIMIT = 4096   # signatures kept (a dynamic-length model makes one per length)
_FAST_FWD_ON = not _INTERPRET and launch.enabled()
# Bumped whenever bound launches are dropped: a caller that keeps an entry of fast_entry (the
# op's lanes) checks it is unchanged before launching the entry again.
_FAST_EPOCH = 0
_FWD_SWITCHES = ("ADAATTN_FLASH_SM90", "ADAATTN_FLASH_TMA", "ADAATTN_FLASH_WS",
                 "ADAATTN_FLASH_BIAS_DOT", "ADAATTN_FLASH_AUTOTUNE", "ADAATTN_FLASH_CONFIGS_FWD",
                 "ADAATTN_FLASH_CONFIGS_FWD_TMA", "ADAATTN_SM90_CAUSAL64", "ADAATTN_SM90_BIAS_TC",
                 "ADAATTN_SM90_MIN_GFLOPS", "ADAATTN_SM90_O_TMA", "ADAATTN_SM90_BALANCE",
                 *(f"ADAATTN_SM90_CONFIG_{d}{kind}" for d in flash_hopper.HEAD_DIMS
                   for kind in ("", "_none", "_row", "_tile")))
try:  # os.environ.get encodes the name on every call (~0.8 us each): look the bytes up
    _ENVIRON = os.environ._data
    _SWITCH_KEYS = tuple(os.environ.encodekey(name) for name in _FWD_SWITCHES)
except AttributeError:  # pragma: no cover - another platform's os.environ
    _ENVIRON, _SWITCH_KEYS = os.environ, _FWD_SWITCHES


try:   # (torch.empty_strided for CUDA without the argument parser: Inductor's code calls it)
    _EMPTY_STRIDED_CUDA = torch._C._dynamo.guards._empty_strided_cuda
except AttributeError:  # pragma: no cover - a torch without it
    _EMPTY_STRIDED_CUDA = None


def _fwd_signature(q, k, v, attn_mask, is_causal, scale, out_blhd=False):
    mask = None if attn_mask is None else (
        attn_mask.shape, attn_mask.stride(), attn_mask.dtype, attn_mask.device,
        attn_mask.data_ptr() % 16 == 0)
    return (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(),
            q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
            (q.data_ptr() | k.data_ptr() | v.data_ptr()) % 16 == 0, mask, bool(is_causal),
            scale, torch.get_float32_matmul_precision() if q.dtype == torch.float32 else None,
            tuple(map(_ENVIRON.get, _SWITCH_KEYS)), out_blhd)


def _remember_fast(signature, bound, out, lse, mask, attn_mask):
    """Keep the bound launch of a call that just ran (None: not launched directly)."""
    global _FAST_EPOCH
    if bound is None:
        return
    if len(_FAST_FWD) >= _FAST_FWD_LIMIT:
        _FAST_FWD.clear()
        _FAST_EPOCH += 1
    shape = tuple(out.shape)
    if signature[-1]:   # out_blhd: allocated as (B, L, H, D), then viewed (see _new_out)
        shape = (shape[0], shape[2], shape[1], shape[3])
    _FAST_FWD[signature] = _FastForward(
        bound, shape, tuple(lse.shape),
        (attn_mask is not None and attn_mask.dtype == torch.bool
         and getattr(bound, "reads_mask", True)),
        mask if attn_mask is None else None,
        (tuple(out.shape), tuple(out.stride())) if out.is_contiguous() or (
            signature[-1] and out.transpose(1, 2).is_contiguous()) else None)


def _env_flag(name, default):
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    return v not in ("0", "false", "False", "no")


def _inv_split(sm_scale, dtype):
    """1 / sm_scale as hi + lo in ``dtype`` (see :func:`.flash_hopper.inv_scale_split`)."""
    return flash_hopper.inv_scale_split(float(sm_scale), dtype)


_TMA_FAILED: dict = {}
_SM90_FAILED: dict = {}


def _sm90_key(q, capability=None):
    return (capability or _capability(q.device), q.dtype, q.shape[-1])


def _use_sm90(q, k, v, sm_scale, causal=False):
    """Whether the Gluon FlashAttention-3-style forward (:mod:`.flash_hopper`) takes the call:
    where it can (Hopper, fp16/bf16, D = Dv in {64, 128}, aligned strides) unless
    ``ADAATTN_FLASH_SM90=0`` or it failed to build before for this (capability, dtype, D), and
    where it measured faster (see ``flash_hopper.unsupported``)."""
    if q.device.type != "cuda" or not flash_hopper.AVAILABLE:
        return False
    if os.environ.get("ADAATTN_FLASH_SM90", "") in ("0", "false", "False", "no"):
        return False
    cap = _capability(q.device)
    if _sm90_key(q, cap) in _SM90_FAILED:
        return False
    if _fwd_flops(q, k, causal) < _sm90_min_flops():
        return False
    return flash_hopper.unsupported(q, k, v, sm_scale, cap, causal) is None


def _fwd_flops(q, k, causal):
    B, Hq, Lq, D = q.shape
    flops = 4 * B * Hq * Lq * k.shape[2] * D
    return flops // 2 if causal else flops


def _sm90_min_flops():
    """Calls smaller than this (forward FLOPs) take the Triton kernel. Through triton's launcher
    the Gluon kernel's launch encoded three tensor-map descriptors on the host per call, so a
    call cost more host time there, and a small call's kernel could not hide it. Through triton's own launcher that was
    ~80 us a call (bert-base, batch 1, L = 4096, 52 GFLOP a call: 0.54x stock through the Gluon
    kernel, 1.17x through the Triton one, H100, fifth session), and the bar was 100 GFLOP.
    Through the bound launch (flash_hopper.BoundForward) it is ~14 us: the op's host time 58 us
    a call against 44 on the Triton kernel (scripts/op_overhead.py, (1, 16, 512, 128) bf16,
    thirteenth session), and the bar was 32 GFLOP, a kernel of ~100 us at 300 TFLOP/s: at
    B * L = 16k tokens, L = 512 and 1k (34-69 GFLOP, D = 64 and 128, causal and not), the
    Gluon kernel was 7-122 % faster than the Triton one without a mask and 24-121 % with a key
    bias (interleaved timing, H100, thirteenth session). Through triton's C launch
    (launch.CLaunch, tensor maps kept) the two bound launches cost the same host time, and
    below the old bar the Gluon kernel measured faster too: (1, 32, 1024, 64) causal, 4.3
    GFLOP, 17.3 against 25.8 us a call; (1, 12, 2048, 64) causal, 6.4 GFLOP, 23.9 against
    44.4 (bf16, calls timed until done, H100, twenty-second session,
    scripts/launch_cost.py --until-done). The bar is now 4 GFLOP (below it, unmeasured; sites
    under 2 GFLOP stay torch's SDPA anyway, planner.small_call).
    ``ADAATTN_SM90_MIN_GFLOPS`` moves the bar."""
    text = os.environ.get("ADAATTN_SM90_MIN_GFLOPS", "")
    try:
        return float(text) * 1e9 if text else _SM90_MIN_FLOPS
    except ValueError:
        return _SM90_MIN_FLOPS


_SM90_MIN_FLOPS = 4e9


def _use_tma(q, k, v, BD, BDV, causal=False, has_mask=False):
    """Whether to take the tensor-descriptor forward: Hopper (sm90), 16-bit inputs, head dims
    <= 128, 16-byte aligned strides. ``ADAATTN_FLASH_TMA``: unset = where it measured faster on
    H100 (triton 3.6: head-dim bucket 128 with causal or a mask; the plain-load kernel is faster
    for dense non-causal and for head dims <= 64), ``1`` = wherever possible, ``0`` = never,
    ``force`` = also under the interpreter (tests)."""
    if _TensorDescriptor is None:
        return False
    flag = os.environ.get("ADAATTN_FLASH_TMA", "")
    if flag == "force" and _INTERPRET:
        pass
    elif _INTERPRET or q.device.type != "cuda" or flag in ("0", "false", "False", "no"):
        return False
    else:
        cap = _capability(q.device)
        if cap[0] != 9 or (cap, False, _bucket(max(BD, BDV), q.dtype)) in _TMA_FAILED:
            return False
        if flag == "" and not (64 < max(BD, BDV) <= 128 and (causal or has_mask)):
            return False
    if q.dtype not in (torch.float16, torch.bfloat16) or max(BD, BDV) > 128:
        return False
    return all(flash_hopper.tma_aligned(t) for t in (q, k, v))


def _use_ws(q, BD, BDV, causal, has_mask):
    """Warp specialization of the descriptor kernel's main loop (``ADAATTN_FLASH_WS`` 0/1
    overrides): measured faster on H100 for head-dim bucket 128, causal, no mask; triton 3.6
    fails to compile it for some other shapes (then the kernel is rebuilt without it)."""
    if _INTERPRET:
        return False
    key = (_capability(q.device), True, _bucket(max(BD, BDV), q.dtype))
    if key in _TMA_FAILED:
        return False
    flag = os.environ.get("ADAATTN_FLASH_WS", "")
    if flag != "":
        return flag not in ("0", "false", "False", "no")
    return 64 < max(BD, BDV) <= 128 and causal and not has_mask


def _launch_fwd_tma(q, k, v, mask, ms, out, lse, tail, inv_hi, inv_lo, consts, ws):
    B, Hq, Lq, _ = q.shape
    BD, BDV = consts["BLOCK_D"], consts["BLOCK_DV"]
    # block shapes are placeholders: the config's pre-hook sets them
    dq = _TensorDescriptor(q, list(q.shape), flash_hopper.tma_strides(q), [1, 1, 16, BD])
    dk = _TensorDescriptor(k, list(k.shape), flash_hopper.tma_strides(k), [1, 1, 16, BD])
    dv = _TensorDescriptor(v, list(v.shape), flash_hopper.tma_strides(v), [1, 1, 16, BDV])
    fn = _tuned("fwd_tma", max(BD, BDV), q.dtype, q.device,
                _small_call(q, k, consts["CAUSAL"]))
    fn[lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq)](
        dq, dk, dv, mask, out, lse, *ms, *out.stride(), *lse.stride(), *tail,
        inv_hi=inv_hi, inv_lo=inv_lo, WARP_SPEC=ws, **consts)


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


_NULLCTX = _nullctx()


def _on_device(device):
    """``torch.cuda.device(device)`` only where it is not already current (entering it costs
    a few microseconds, on every call)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return _NULLCTX
    return torch.cuda.device(device)


def _reduce_to_shape(full, shape):
    """Sum a (B, H, Lq, Lk) tensor over the dims that ``shape`` broadcasts."""
    nd = len(shape)
    shape4 = (1,) * (4 - nd) + tuple(shape)
    dims = [i for i in range(4) if shape4[i] == 1 and full.shape[i] != 1]
    if dims:
        full = full.sum(dim=dims, keepdim=True)
    return full.reshape(shape)


def _key_rows_f32(mask, ms, B, Hq, Lk):
    """A row-broadcast mask's (B|1, H|1, Lk) key rows as a compact float32 tensor, and its
    four strides in the kernels' (b, h, query, key) order (0 where broadcast)."""
    nb, nh = (B if ms[0] else 1), (Hq if ms[1] else 1)
    rows = torch.as_strided(mask, (nb, nh, Lk), (ms[0], ms[1], ms[3]), mask.storage_offset())
    if rows.dtype != torch.float32:
        rows = rows.float()
    return rows, (rows.stride(0) if nb > 1 else 0, rows.stride(1) if nh > 1 else 0, 0,
                  rows.stride(2))


def flash_backward(grad_out, q, k, v, out, lse, attn_mask=None, is_causal=False, scale=None,
                   mask_needs_grad=False):
    """Flash attention backward (FlashAttention-2: preprocess delta = rowsum(dO * O), one kernel
    over KV blocks for dK/dV looping over the query heads of each kv head, one kernel over query
    blocks for dQ; no atomics).

    Returns ``(dq, dk, dv, d_mask)``: dq/dk/dv with the shapes and dtypes of q/k/v (dk/dv summed
    over the query heads sharing a kv head). d_mask is the gradient w.r.t. a float additive mask,
    reduced to the mask's own shape (computed only when ``mask_needs_grad``; it materialises a
    (B, Hq, Lq, Lk) float32 buffer), else None.
    """
    reason = supports(q, k, v, attn_mask, 0.0)
    if reason is not None:
        raise ValueError(f"flash_backward: {reason}")
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    grad_out, out = _unit_last(grad_out), _unit_last(out)
    if grad_out.dtype != q.dtype:
        grad_out = grad_out.to(q.dtype)
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    _check_lengths(Lq, Lk)
    group = Hq // Hkv
    sm_scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dev = q.device
    lse = lse.float() if lse.dtype != torch.float32 else lse

    mask, ms, has_mask, is_bool, rb, cb = _prep_mask(attn_mask, (B, Hq, Lq, Lk), dev)
    store_ds = bool(mask_needs_grad and has_mask and not is_bool)
    BD = max(16, triton.next_power_of_2(D))
    BDV = max(16, triton.next_power_of_2(Dv))
    prec = _precision(q.dtype)

    dq = torch.empty((B, Hq, Lq, D), device=dev, dtype=q.dtype)
    dk = torch.empty((B, Hkv, Lk, D), device=dev, dtype=k.dtype)
    dv = torch.empty((B, Hkv, Lk, Dv), device=dev, dtype=v.dtype)
    delta = torch.empty((B, Hq, Lq), device=dev, dtype=torch.float32)
    lse2 = torch.empty((B, Hq, Lq), device=dev, dtype=torch.float32)
    if store_ds:
        ds = torch.zeros((B, Hq, Lq, Lk), device=dev, dtype=torch.float32)
    else:
        ds = torch.empty(1, device=dev, dtype=torch.float32)

    key_bias = has_mask and rb and not cb and not is_bool
    # dK / dV rows scaled by each key's bias at the end (see _attn_bwd_dkdv): where one
    # bias row serves every query head of a kv head, and P * 2^-b keeps to the input
    # dtype's range (not fp16's)
    key_scale = (key_bias and not store_ds and (ms[1] == 0 or group == 1)
                 and q.dtype in (torch.bfloat16, torch.float32)
                 and _env_flag("ADAATTN_FLASH_BWD_KEY_SCALE", True))
    # the dK / dV kernel's worklist (see _attn_bwd_dkdv): a count, then up to one entry per
    # piece of REST_N keys of each (batch, kv head)
    bucket = _bucket(max(BD, BDV), q.dtype)
    rest_n = _rest_config(bucket, _capability(dev))[1]
    n_pieces = B * Hkv * triton.cdiv(Lk, rest_n) if key_scale else 0
    work = (torch.empty(1 + n_pieces, device=dev, dtype=torch.int32) if key_scale
            else _idle_work(dev))

    with _on_device(dev):
        PRE_M = 16 if _INTERPRET else 64
        # direct launches after the first of each specialisation (kernels/launch.py): through
        # triton, the three launches cost ~3 x 100 us of host time per backward
        launch.launch(_bwd_preprocess, lambda meta: (triton.cdiv(Lq, PRE_M), B * Hq),
                      (out, grad_out, lse, delta, lse2, work,
                       *out.stride(), *grad_out.stride(), *lse.stride(), Hq, Lq, Dv),
                      dict(BLOCK_DV=BDV, BLOCK_M=PRE_M), dev)
        consts = dict(BLOCK_D=BD, BLOCK_DV=BDV, CAUSAL=bool(is_causal), HAS_MASK=has_mask,
                      MASK_BOOL=is_bool, MASK_RB=rb, MASK_CB=cb, PREC=prec)

        def dkdv_args(mask, ms):
            return (q, k, v, mask, grad_out, lse2, delta, dk, dv, ds, work,
                    *q.stride(), *k.stride(), *v.stride(), *ms, *grad_out.stride(),
                    *dk.stride(), *dv.stride(),
                    Hq, Hkv, group, Lq, Lk, D, Dv, sm_scale * _LOG2E, sm_scale)
        # (pass 1 runs the unmasked loop: launched as unmasked, with the key rows in float32
        # as the unmasked launch's stand-in mask is (triton's tuning key holds every tensor
        # argument's dtype), it shares the unmasked kernel's tuning and so its tiles; tuned
        # apart, the masked kernels had come out on other tiles and 13-27 % slower than the
        # unmasked one, D = 64, H100)
        passes = ((("dkdv", 1, dkdv_args(*_key_rows_f32(mask, ms, B, Hq, Lk)),
                    dict(consts, HAS_MASK=False, MASK_RB=False)),
                   ("dkdv_rest", 2, dkdv_args(mask, ms), consts)) if key_scale
                  else (("dkdv", 0, dkdv_args(mask, ms), consts),))
        # (pass 2 is persistent, two programs an SM at most: it is mostly empty)
        n_sm = 2 if _INTERPRET else _sm_count(dev.index if dev.index is not None
                                             else torch.cuda.current_device())
        grids = {"dkdv": lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]), B * Hkv),
                 "dkdv_rest": lambda meta: (max(1, min(2 * n_sm, n_pieces)), 1)}
        for kind, pass_, args, flags in passes:
            launch.launch(_tuned(kind, max(BD, BDV), q.dtype, dev), grids[kind], args,
                          dict(STORE_DS=store_ds, KEY_SCALE=pass_, REST_N=rest_n,
                               TUNE_L=_tune_bucket(Lq, Lk), **flags), dev)
        launch.launch(_tuned("dq", max(BD, BDV), q.dtype, dev),
                      lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]), B * Hq),
                      (q, k, v, mask, grad_out, lse2, delta, dq,
                       *q.stride(), *k.stride(), *v.stride(), *ms, *grad_out.stride(),
                       *dq.stride(), Hq, group, Lq, Lk, D, Dv, sm_scale * _LOG2E, sm_scale),
                      dict(TUNE_L=_tune_bucket(Lq, Lk), **consts), dev)

    d_mask = None
    if store_ds:
        d_mask = _reduce_to_shape(ds, attn_mask.shape).to(attn_mask.dtype)
    return dq, dk, dv, d_mask
