"""8-bit attention forward for Hopper (sm90), written in Gluon, on :mod:`.attn8`'s pre-pass.

Why a second 8-bit kernel: the Triton-language one in :mod:`.attn8` lets the compiler schedule
its loop, and at 255 registers a thread it serialises the INT32 P·V accumulator, the
conversions and the softmax with the products: 0.31x cuDNN's bf16 forward at L = 4k, D = 128
(H100, nineteenth session). This kernel runs the schedule of :mod:`.flash_hopper` (a producer
warp streaming K / V through a shared-memory ring with bulk tensor copies, two consumer
warpgroups of 64 query rows taking turns on the tensor cores, S_{j+1} = Q·K_{j+1}ᵀ issued
before P_j·V_j so that the softmax overlaps a product) on INT8 operands, and cuts the work
an element costs outside the tensor cores, which on 8-bit products is what bounds the loop
(the tensor cores take half the time of bf16 ones; the softmax's work does not shrink):

* **Integer <-> float without conversion instructions.** Hopper converts at a quarter of its
  fp32 rate (the pipe ``exp2`` also needs). An INT32 product ``s`` with ``|s| < 2^22`` (D <= 128:
  ``|s| <= 127 * 127 * 128``) is read as a float by adding the bits of ``C = 1.5 * 2^23``:
  ``as_float(s + bits(C)) = s + C`` exactly; ``C`` cancels out of ``exp2(c (f - max f))``.
  The other way, ``as_int(p * 127 + C)`` holds ``round(127 p)`` in its low byte (and the
  row sums are the wrapping int32 sums of those words, less ``n * bits(C)``).
* **One scale a row.** K's scale is per 128-key block, so a tile's scores take one factor per
  row, ``q_scale * k_scale``: with the row max taken of the raw scores, an element costs an
  add, a max, one FMA and the ``exp2``. V is rotated like Q and K (V·R, R = diag(signs)·H:
  no channel stands out) and has one scale per block too, so that folding a tile's P·V into
  O is two FMAs an element with one factor per row; the epilogue turns O back (O Rᵀ / n,
  one bf16 tensor-core product: R's entries are +-1).
* **P on 128 levels** (``round(127 p)``, relative to each tile row's own max as in
  :mod:`.attn8`), so that P is a signed INT8 operand without the offset that the 255-level
  form needs (its correction, a per-block, per-channel constant, costs a register vector
  and an FMA an element of O).
* **P from the scores' registers as they are**: the pre-pass stores V's keys in the order in
  which the accumulator's registers hold the scores' columns (see _softmax), so that no
  layout conversion shuffles P between the products.
* The block scales of the next key tile are loaded an iteration ahead (4k non-causal, D = 128:
  621 -> 670 TFLOP/s).
* Each tile's INT32 P·V is folded into O a step late, while the next tile's Q·Kᵀ is on the
  tensor cores (see _step): the loop is latency-bound (~0.4 instructions a cycle a scheduler
  at full clock), and at the end of its own step the fold sat on its dependent chain, 22-24 %
  of the kernel's time; there, 11 %. Same output bit for bit; causal and D = 64 3-6 % faster,
  D = 128 non-causal level (twenty-eighth session, `scripts/attn8_where_time_goes.py`).

Speed (H100, bf16, D = 128, B·L = 16k tokens; twenty-first session): 666 / 737 TFLOP/s at
L = 4k / 16k against cuDNN's 605 / 634; with the pre-pass (0.205 ms since the twenty-eighth
session) the whole 8-bit forward is 0.76x-0.82x / 1.05x cuDNN, level with the dense bf16
kernel at best (`benchmarks/RESULTS.md`).

The pre-pass is :func:`.attn8.quantise` with ``sm90=True``. Numerics on the H100 (bf16 inputs,
against float64 of the same inputs, B = 2, H = 8, L = 4096, D = 128; twenty-first session):
relative L2 2.1e-2 on random inputs (cosine 0.99978), 2.75e-2 with four key channels x20
(0.99964), 2.0e-2 with q and k channels x20; all-MiniLM-L6-v2's captured layers (D zero-padded
to 64) 1.5e-2 - 2.8e-2 (cosine >= 0.99960). :mod:`.attn8`'s Triton kernel (per-key K scales,
per-block-and-channel V scales, 255 P levels) errs less (1.4e-2 / 2.4e-2) at a third of the
speed; the op's sampled-row checks measure every site that takes either.

Scope (everything else goes to :mod:`.attn8`'s Triton kernel): CUDA sm90, D = Dv in {64, 128},
no mask (top-left causal and ragged lengths masked in the kernel), GQA, inference.
"""
from __future__ import annotations

import os

import torch

from . import flash_hopper as _dense
from .flash_hopper import AVAILABLE, tma_strides

if AVAILABLE:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia import hopper as _hopper
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .flash_hopper import tma_load

__all__ = ["unsupported", "attend"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HEAD_DIMS = (64, 128)


if AVAILABLE:

    @gluon.jit
    def _tile(n_m, Hq, Lk, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
        """This program's work tile -> (batch, head, first query row, key tiles to visit, how
        many of them need no element mask): the dense sm90 kernel's tiles (a head's query
        blocks in consecutive programs; causal, the heavier blocks first), one a program."""
        return _dense._tile(gl.program_id(0), n_m, Hq, Lk, BLOCK_M, BLOCK_N, CAUSAL, False)

    @gluon.jit
    def _producer(desc_q, desc_k, desc_v, desc_r, q_smem, k_bufs, v_bufs, r_smem, q_full,
                  k_full, k_empty, v_full, v_empty, n_m, Hq, GROUP, Lk, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr,
                  CAUSAL: gl.constexpr):
        """Q and the rotation R once (a 64-row box of Q per consumer warpgroup), then K_j
        (BLOCK_N x D) and Vᵀ_j (D x BLOCK_N: an 8-bit B operand must be K-major, so the
        pre-pass stores V transposed) through the ring; waiting on parity ``phase ^ 1`` lets
        the first pass through."""
        off_b, off_h, start_m, n_blocks, n_full = _tile(n_m, Hq, Lk, BLOCK_M, BLOCK_N, CAUSAL)
        off_hk = off_h // GROUP
        mbarrier.expect(q_full.index(0), BLOCK_M * HEAD_D + HEAD_D * HEAD_D * 2)
        tma_load(desc_r, [0, 0], q_full.index(0), r_smem)
        for w in gl.static_range(BLOCK_M // 64):
            tma_load(desc_q, [off_b, off_h, start_m + w * 64, 0], q_full.index(0),
                     q_smem.index(w).reshape([1, 1, 64, HEAD_D]))
        for j in range(n_blocks):
            slot = j % STAGES
            phase = (j // STAGES) & 1
            mbarrier.wait(k_empty.index(slot), phase ^ 1)
            mbarrier.expect(k_full.index(slot), BLOCK_N * HEAD_D)
            tma_load(desc_k, [off_b, off_hk, j * BLOCK_N, 0], k_full.index(slot),
                     k_bufs.index(slot).reshape([1, 1, BLOCK_N, HEAD_D]))
            mbarrier.wait(v_empty.index(slot), phase ^ 1)
            mbarrier.expect(v_full.index(slot), BLOCK_N * HEAD_D)
            tma_load(desc_v, [off_b, off_hk, 0, j * BLOCK_N], v_full.index(slot),
                     v_bufs.index(slot).reshape([1, 1, HEAD_D, BLOCK_N]))

    @gluon.jit
    def _scores(q, k_bufs, k_full, turn, j, s_zero, WG: gl.constexpr, STAGES: gl.constexpr):
        """Once it is this warpgroup's turn and K_j has landed: issue S_j = Q K_jᵀ (INT32)."""
        slot = j % STAGES
        mbarrier.wait(turn.index(WG), j & 1)
        mbarrier.wait(k_full.index(slot), (j // STAGES) & 1)
        s_tok = _hopper.warpgroup_mma(q, k_bufs.index(slot).permute((1, 0)), s_zero,
                                      use_acc=False, is_async=True)
        return s_tok, slot

    @gluon.jit
    def _softmax(s, m_i, qs, ks, j, offs_m, Lk, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                 MASKED: gl.constexpr, s_layout: gl.constexpr, p_layout: gl.constexpr):
        """Score tile j (INT32; ``ks`` its K block's scale) -> (P_j as the INT8 operand, its row
        sums (x127), the running max, this tile's factor beta = exp2(tile row max - running
        max), alpha = exp2(old running max - new one)); maxima in log2 units."""
        # BLOCK_N x bits(C) as the int32 that BLOCK_N wrapping additions of bits(C) leave
        W_BIAS: gl.constexpr = (BLOCK_N * 0x4B400000 + 2**31) % 2**32 - 2**31
        f = (s + 0x4B400000).to(gl.float32, bitcast=True)        # s + C, exactly
        if MASKED:
            offs_n = j * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))
            if CAUSAL:
                last = gl.minimum(offs_m, Lk - 1)
                ok = gl.expand_dims(offs_n, 0) <= gl.expand_dims(last, 1)
            else:
                ok = gl.expand_dims(offs_n < Lk, 0)
            f = gl.where(ok, f, float("-inf"))
        # the row's factor, q scale x the block's k scale; kept > 0: a block of keys all equal
        # to the smoothing vector (one key, or constant keys) has k scale 0, and its masked
        # scores would be -inf x 0
        c = gl.maximum(qs * ks, 1e-30)
        f_max = gl.max(f, 1)
        if MASKED:   # a row with no visible key in this tile: keep exp2's argument finite
            # (f = s + C > 0 wherever a key is visible, so 0 marks such a row)
            f_max = gl.where(f_max == float("-inf"), 0.0, f_max)
            t_max = gl.where(f_max == 0.0, float("-inf"), (f_max - 12582912.0) * c)
        else:
            t_max = (f_max - 12582912.0) * c
        # exp2(c f - c max f), the subtrahend raised by two ulps: the FMA rounds c max f, and an
        # exponent a hair above 0 would make the row max's p > 1, where round(127 p) = 128
        # (from c >~ 0.015, scores spread over ~500 nats) wraps to -128 in the int8 operand
        m_arg = f_max * c
        m_arg = m_arg + gl.abs(m_arg) * 2.384185791015625e-07
        p = gl.exp2(f * gl.expand_dims(c, 1) - gl.expand_dims(m_arg, 1))
        # round(127 p) in the low byte (p in [0, 1]); the wrapping int32 sum of the words less
        # BLOCK_N x bits(C) is the sum of the rounded values
        w = (p * 127.0 + 12582912.0).to(gl.int32, bitcast=True)
        row_sum = (gl.sum(w, 1) - W_BIAS).to(gl.float32)
        m_new = gl.maximum(m_i, t_max)
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_use)
        beta = gl.exp2(t_max - m_use)
        # Take the scores' registers as the P operand as they are: a thread holds key columns
        # 8e + 2t + {0, 1} of each 16 (e = 0, 1; t its place in its quad) where the operand
        # wants 4t + {0..3}; relabelled so (key 8e + 2t + i -> operand column 4t + 2e + i),
        # with V's keys stored in that order by the pre-pass, the product is unchanged and a
        # layout conversion's quad shuffles are gone (the loop: 933 -> 711 instructions a warp,
        # 4k non-causal D = 128 537 -> 617 TFLOP/s, H100)
        p8 = gl.reshape(w.to(gl.int8), [64, BLOCK_N // 16, 2, 4, 2])
        p8 = gl.reshape(gl.permute(p8, (0, 1, 3, 2, 4)), [64, BLOCK_N])
        p8 = gl.convert_layout(p8, p_layout)
        return p8, row_sum, m_new, alpha, beta

    @gluon.jit
    def _fold_pv(acc, pv, w_prev, alpha, o_layout: gl.constexpr):
        """acc <- (acc + P_{j-1} V_{j-1} x w_prev) x alpha_j, w_prev = beta_{j-1} x V_{j-1}'s
        block scale: two FMAs and an integer add an element (the INT32 product read as a
        float like the scores, the factors folded into one per row)."""
        w = gl.expand_dims(gl.convert_layout(w_prev * alpha, gl.SliceLayout(1, o_layout)), 1)
        a = gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        pv_c = (pv + 0x4B400000).to(gl.float32, bitcast=True)
        return gl.fma(acc, a, gl.fma(pv_c, w, -12582912.0 * w))

    @gluon.jit
    def _block_scales(KS, VS, j, n_blocks, BLOCK_N: gl.constexpr, V_ROWS: gl.constexpr,
                      HEAD_D: gl.constexpr):
        """K's and V's scales of key tile j (clamped to the last tile): loaded an iteration
        before they are used, so that no load from memory waits on the loop's path."""
        jj = gl.minimum(j, n_blocks - 1)
        return (gl.load(KS + jj * BLOCK_N),
                gl.load(VS + ((jj * BLOCK_N) // V_ROWS) * HEAD_D))

    @gluon.jit
    def _hold(p8):
        """A use of the INT8 P operand after the wait for the product that reads it: the
        product reads its registers until it completes, so they must not be given to the next
        tile's softmax before then. (The wait's own dependency list would say so, but it
        takes no 8-bit tensors: triton 3.6 fails to lower it.) No instruction is emitted."""
        return gl.inline_asm_elementwise("// hold $1", "=r,r", [p8], dtype=gl.int8,
                                         is_pure=False, pack=4)

    @gluon.jit
    def _step(q, k_bufs, v_bufs, k_full, k_empty, v_full, v_empty, turn, s_zero, o_zero,
              acc, m_i, l_i, p_prev, w_prev, ks, vs, pv_pend, w_pend, a_pend, j, n_blocks, qs,
              KS, VS, offs_m, Lk, WG: gl.constexpr, NUM_WG: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, V_ROWS: gl.constexpr,
              HEAD_D: gl.constexpr, CAUSAL: gl.constexpr, MASKED: gl.constexpr,
              s_layout: gl.constexpr, o_layout: gl.constexpr, p_layout: gl.constexpr):
        """Key tile j (``ks`` / ``vs`` its scales): issue S_j, fold tile j-2's P·V (``pv_pend``,
        waited for in the last step) into O while S_j is on the tensor cores, issue
        P_{j-1} V_{j-1}; the softmax of S_j runs while that product is on the tensor cores.
        -> the state, with P_{j-1} V_{j-1} and its factors pending for the next step. (Folded
        at the end of its own step, the fold sat between the product's wait and the next
        tile's Q·Kᵀ, on the loop's dependent chain.)"""
        ks_next, vs_next = _block_scales(KS, VS, j + 1, n_blocks, BLOCK_N, V_ROWS, HEAD_D)
        s_tok, slot = _scores(q, k_bufs, k_full, turn, j, s_zero, WG, STAGES)
        acc = _fold_pv(acc, pv_pend, w_pend, a_pend, o_layout)
        prev = (j - 1) % STAGES
        mbarrier.wait(v_full.index(prev), ((j - 1) // STAGES) & 1)
        pv_tok = _hopper.warpgroup_mma(p_prev, v_bufs.index(prev).permute((1, 0)), o_zero,
                                       use_acc=False, is_async=True)
        mbarrier.arrive(turn.index((WG + 1) % NUM_WG))
        s, pv_tok = _hopper.warpgroup_mma_wait(1, deps=[s_tok, pv_tok])
        mbarrier.arrive(k_empty.index(slot))
        p8, row_sum, m_new, alpha, beta = _softmax(s, m_i, qs, ks, j, offs_m, Lk, BLOCK_N, CAUSAL,
                                                   MASKED, s_layout, p_layout)
        pv = _hopper.warpgroup_mma_wait(0, deps=[pv_tok])
        _hold(p_prev)
        mbarrier.arrive(v_empty.index(prev))
        l_i = l_i * alpha + row_sum * beta
        return acc, m_new, l_i, p8, beta * vs, ks_next, vs_next, pv, w_prev, alpha

    @gluon.jit
    def _consumer(Out, LSE, QS, QM, KS, VS, q_smem, k_bufs, v_bufs, r_smem, q_full, k_full,
                  k_empty, v_full, v_empty, turn, n_m, Hq, GROUP, Lq, Lk, Lq_p, Lk_p, n_vblocks,
                  stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
                  WG: gl.constexpr, NUM_WG: gl.constexpr, BLOCK_N: gl.constexpr,
                  HEAD_D: gl.constexpr, STAGES: gl.constexpr, V_ROWS: gl.constexpr,
                  CAUSAL: gl.constexpr):
        """One warpgroup: query rows WG*64 .. WG*64+63 of the program's tile."""
        BLOCK_M: gl.constexpr = 64 * NUM_WG
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 32])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_D, 32])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        off_b, off_h, start_m, n_blocks, n_full = _tile(n_m, Hq, Lk, BLOCK_M, BLOCK_N, CAUSAL)
        bh = (off_b * Hq + off_h).to(gl.int64)
        bhk = (off_b * (Hq // GROUP) + off_h // GROUP).to(gl.int64)
        KS = KS + bhk * Lk_p
        VS = VS + bhk * n_vblocks * HEAD_D
        offs_m = start_m + WG * 64 + gl.arange(0, 64, gl.SliceLayout(1, s_layout))
        # an all-zero query row has scale 0; a tiny one keeps -inf * scale from being nan
        qs = gl.maximum(gl.load(QS + bh * Lq_p + offs_m), 1e-30)
        s_zero = gl.zeros([64, BLOCK_N], gl.int32, s_layout)
        o_zero = gl.zeros([64, HEAD_D], gl.int32, o_layout)
        q = q_smem.index(WG)
        mbarrier.wait(q_full.index(0), 0)

        # key tile 0: S_0 and its softmax on their own (its P.V is issued with S_1)
        s_tok, slot = _scores(q, k_bufs, k_full, turn, 0, s_zero, WG, STAGES)
        mbarrier.arrive(turn.index((WG + 1) % NUM_WG))
        s = _hopper.warpgroup_mma_wait(0, deps=[s_tok])
        mbarrier.arrive(k_empty.index(slot))
        m_i = gl.full([64], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        ks, vs = _block_scales(KS, VS, 0, n_blocks, BLOCK_N, V_ROWS, HEAD_D)
        if n_full > 0:
            p_prev, l_i, m_i, alpha, beta = _softmax(s, m_i, qs, ks, 0, offs_m, Lk, BLOCK_N,
                                                     CAUSAL, False, s_layout, p_layout)
        else:
            p_prev, l_i, m_i, alpha, beta = _softmax(s, m_i, qs, ks, 0, offs_m, Lk, BLOCK_N,
                                                     CAUSAL, True, s_layout, p_layout)
        l_i = l_i * beta
        w = beta * vs
        ks, vs = _block_scales(KS, VS, 1, n_blocks, BLOCK_N, V_ROWS, HEAD_D)
        acc = gl.zeros([64, HEAD_D], gl.float32, o_layout)
        # the P·V pending a fold: none yet (a zero product with factor 0 folds to nothing)
        pv_pend = o_zero
        w_pend = gl.zeros([64], gl.float32, gl.SliceLayout(1, s_layout))
        a_pend = gl.full([64], 1.0, gl.float32, gl.SliceLayout(1, s_layout))
        # tiles that need no element mask, then the diagonal / ragged-edge ones
        for j in range(1, n_full):
            acc, m_i, l_i, p_prev, w, ks, vs, pv_pend, w_pend, a_pend = _step(
                q, k_bufs, v_bufs, k_full, k_empty, v_full, v_empty, turn, s_zero, o_zero, acc,
                m_i, l_i, p_prev, w, ks, vs, pv_pend, w_pend, a_pend, j, n_blocks, qs, KS, VS,
                offs_m, Lk, WG, NUM_WG, BLOCK_N, STAGES, V_ROWS, HEAD_D, CAUSAL, False,
                s_layout, o_layout, p_layout)
        for j in range(gl.maximum(n_full, 1), n_blocks):
            acc, m_i, l_i, p_prev, w, ks, vs, pv_pend, w_pend, a_pend = _step(
                q, k_bufs, v_bufs, k_full, k_empty, v_full, v_empty, turn, s_zero, o_zero, acc,
                m_i, l_i, p_prev, w, ks, vs, pv_pend, w_pend, a_pend, j, n_blocks, qs, KS, VS,
                offs_m, Lk, WG, NUM_WG, BLOCK_N, STAGES, V_ROWS, HEAD_D, CAUSAL, True,
                s_layout, o_layout, p_layout)
        acc = _fold_pv(acc, pv_pend, w_pend, a_pend, o_layout)
        last = n_blocks - 1
        prev = last % STAGES
        mbarrier.wait(v_full.index(prev), (last // STAGES) & 1)
        pv = _hopper.warpgroup_mma(p_prev, v_bufs.index(prev).permute((1, 0)), o_zero,
                                   use_acc=False, is_async=True)
        pv = _hopper.warpgroup_mma_wait(0, deps=[pv])
        _hold(p_prev)
        mbarrier.arrive(v_empty.index(prev))
        acc = _fold_pv(acc, pv, w, gl.full([64], 1.0, gl.float32, gl.SliceLayout(1, s_layout)),
                       o_layout)

        # O = acc / l rotated back (O R^T / n, on the tensor cores: R's entries are +-1, O
        # goes in as bf16); the lse of the unsmoothed scores: + q . mean (log2 units), and l
        # counts 127 per unit of P
        empty = l_i == 0.0
        l_safe = gl.where(empty, 1.0, l_i)
        m_i = m_i + gl.load(QM + bh * Lq_p + offs_m)
        lse = gl.where(empty, float("-inf"),
                       (m_i + gl.log2(l_safe) - 6.988684686772166) * 0.6931471805599453)
        inv_l = gl.convert_layout(1.0 / l_safe, gl.SliceLayout(1, o_layout))
        rot_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_D, 16])
        o_rot = gl.convert_layout((acc * gl.expand_dims(inv_l, 1)).to(gl.bfloat16),
                                  gl.DotOperandLayout(operand_index=0, parent=rot_layout,
                                                      k_width=2))
        out = _hopper.warpgroup_mma(o_rot, r_smem.permute((1, 0)),
                                    gl.zeros([64, HEAD_D], gl.float32, rot_layout),
                                    use_acc=False)
        out = out * (1.0 / HEAD_D)
        rows_o = start_m + WG * 64 + gl.arange(0, 64, gl.SliceLayout(1, rot_layout))
        cols_o = gl.arange(0, HEAD_D, gl.SliceLayout(0, rot_layout))
        o_base = Out + off_b.to(gl.int64) * stride_ob + off_h.to(gl.int64) * stride_oh
        gl.store(o_base + gl.expand_dims(rows_o, 1) * stride_om + gl.expand_dims(cols_o, 0),
                 out.to(Out.dtype.element_ty), mask=gl.expand_dims(rows_o < Lq, 1))
        l_base = LSE + off_b.to(gl.int64) * stride_lb + off_h.to(gl.int64) * stride_lh
        gl.store(l_base + offs_m, lse, mask=offs_m < Lq)

    @gluon.jit(do_not_specialize=["Lq", "Lk", "Lq_p", "Lk_p", "n_vblocks"])
    def _attn8_fwd_sm90(desc_q, desc_k, desc_v, desc_r, Out, LSE, QS, QM, KS, VS,
                        n_m, Hq, GROUP, Lq, Lk, Lq_p, Lk_p, n_vblocks,
                        stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
                        HEAD_D: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                        V_ROWS: gl.constexpr, CAUSAL: gl.constexpr,
                        PRODUCER_REGS: gl.constexpr, CONSUMER_REGS: gl.constexpr):
        NUM_WG: gl.constexpr = 2
        BLOCK_M: gl.constexpr = 64 * NUM_WG
        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, HEAD_D], gl.int8)
        k_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_D], gl.int8)
        v_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HEAD_D, BLOCK_N], gl.int8)
        q_smem = gl.allocate_shared_memory(gl.int8, [NUM_WG, 64, HEAD_D], q_layout)
        k_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, HEAD_D], k_layout)
        v_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, HEAD_D, BLOCK_N], v_layout)
        r_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HEAD_D, HEAD_D],
                                                                      gl.bfloat16)
        r_smem = gl.allocate_shared_memory(gl.bfloat16, [HEAD_D, HEAD_D], r_layout)
        bar: gl.constexpr = mbarrier.MBarrierLayout()
        q_full = gl.allocate_shared_memory(gl.int64, [1, 1], bar)
        k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar)
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar)
        v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar)
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar)
        turn = gl.allocate_shared_memory(gl.int64, [NUM_WG, 1], bar)
        mbarrier.init(q_full.index(0), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_full.index(i), count=1)
            mbarrier.init(v_full.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=NUM_WG)
            mbarrier.init(v_empty.index(i), count=NUM_WG)
        for i in gl.static_range(NUM_WG):
            mbarrier.init(turn.index(i), count=1)
        mbarrier.arrive(turn.index(0))   # warpgroup 0 issues first
        gl.warp_specialize([
            (_consumer, (Out, LSE, QS, QM, KS, VS, q_smem, k_bufs, v_bufs, r_smem, q_full,
                         k_full, k_empty, v_full, v_empty, turn, n_m, Hq, GROUP, Lq, Lk, Lq_p,
                         Lk_p, n_vblocks, stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
                         0, NUM_WG, BLOCK_N, HEAD_D, STAGES, V_ROWS, CAUSAL)),
            (_consumer, (Out, LSE, QS, QM, KS, VS, q_smem, k_bufs, v_bufs, r_smem, q_full,
                         k_full, k_empty, v_full, v_empty, turn, n_m, Hq, GROUP, Lq, Lk, Lq_p,
                         Lk_p, n_vblocks, stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
                         1, NUM_WG, BLOCK_N, HEAD_D, STAGES, V_ROWS, CAUSAL)),
            (_producer, (desc_q, desc_k, desc_v, desc_r, q_smem, k_bufs, v_bufs, r_smem, q_full,
                         k_full, k_empty, v_full, v_empty, n_m, Hq, GROUP, Lk, BLOCK_M, BLOCK_N,
                         HEAD_D, STAGES, CAUSAL)),
        ], [4, 4], [CONSUMER_REGS, PRODUCER_REGS])


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def config(head_d):
    """(BLOCK_N, STAGES, PRODUCER_REGS, CONSUMER_REGS); ``ADAATTN_ATTN8_SM90_CONFIG`` replaces
    it (tuning runs)."""
    txt = os.environ.get("ADAATTN_ATTN8_SM90_CONFIG", "").strip()
    if txt:
        return tuple(int(x) for x in txt.split(","))
    return (128, 3, 24, 240)


def unsupported(q, k, v, attn_mask, capability):
    """None if :func:`attend` takes these inputs (already accepted by ``attn8.supports``) on
    a device of ``capability``, else a short reason."""
    if not AVAILABLE:
        return "Gluon (triton >= 3.5) unavailable"
    if _INTERPRET or q.device.type != "cuda":
        return "needs a CUDA device"
    if capability[0] != 9:
        return f"sm{capability[0]}{capability[1]} (the Gluon kernel is for sm90)"
    if attn_mask is not None:
        return "a mask (the Gluon 8-bit kernel takes causal or none)"
    D, Dv = q.shape[-1], v.shape[-1]
    if D != Dv or D not in HEAD_DIMS:
        return f"head dims {D}/{Dv} (the Gluon 8-bit kernel takes D = Dv in {HEAD_DIMS})"
    if os.environ.get("ADAATTN_ATTN8_SM90", "1") in ("0", "false", "False", "no"):
        return "ADAATTN_ATTN8_SM90=0"
    return None


def _descriptor(t, block):
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.int8)
    return TensorDescriptor(t, list(t.shape), tma_strides(t), block, layout)


_ROTATIONS: dict = {}


def _rotation(n, device):
    """The pre-pass's R (``attn8._rotation``) in bf16 (+-1: exact), for the output's turn back."""
    key = (n, device)
    rot = _ROTATIONS.get(key)
    if rot is None:
        from .attn8 import _rotation_cpu
        rot = _ROTATIONS[key] = _rotation_cpu(n).to(device, torch.bfloat16).contiguous()
    return rot


def attend(t, q, is_causal, Lk, out, lse):
    """The Gluon kernel on ``attn8.quantise(..., sm90=True)``'s tensors ``t``; ``q`` gives the
    shapes, ``out`` (B, Hq, Lq, D) and ``lse`` (B, Hq, Lq) are
    written."""
    B, Hq, Lq, D = q.shape
    Hk = t["k8"].shape[1]
    block_n, stages, pregs, cregs = config(D)
    if not t["sm90"]:
        raise ValueError("attn8_hopper.attend: the pre-pass's tensors are not in the sm90 form")
    if t["rows"] % block_n:
        raise ValueError(f"attn8_hopper: key block {block_n} does not divide the pre-pass's "
                         f"{t['rows']}-row scale blocks")
    n_m = -(-Lq // 128)
    rot = _rotation(D, q.device)
    r_layout = gl.NVMMASharedLayout.get_default_for([D, D], gl.bfloat16)
    _attn8_fwd_sm90[(B * Hq * n_m,)](
        _descriptor(t["q8"], [1, 1, 64, D]), _descriptor(t["k8"], [1, 1, block_n, D]),
        _descriptor(t["v8t"], [1, 1, D, block_n]),
        TensorDescriptor(rot, [D, D], [D, 1], [D, D], r_layout), out, lse, t["qs"], t["qm"],
        t["ks"], t["vs"], n_m, Hq, Hq // Hk, Lq, Lk, t["Lq_p"], t["Lk_p"], t["vs"].shape[2],
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        HEAD_D=D, BLOCK_N=block_n, STAGES=stages, V_ROWS=t["rows"], CAUSAL=bool(is_causal),
        PRODUCER_REGS=pregs, CONSUMER_REGS=cregs, num_warps=4)
    return out, lse
