"""Dense flash-attention forward for Hopper (sm90), written in Gluon: FlashAttention-3's schedule.

Why a second forward: the Triton-language kernel in :mod:`.flash` lets the compiler schedule
the loop, and on an H100 that leaves the softmax (exp2, row max, row sum) serialised with the
tensor-core products: it reached 61-83 % of cuDNN at head dim 128. Gluon lets us write the
schedule FlashAttention-3 uses (Shah et al., 2024) explicitly:

* **Warp specialisation.** One producer warpgroup issues bulk tensor copies (TMA) of Q once and
  of K / V into a ``STAGES``-deep shared-memory ring, handing slots over with mbarriers; it runs
  with few registers so that the consumers get more.
* **Consumer warpgroups** (``NUM_WG`` of them, 64 query rows each, ``BLOCK_M = 64 * NUM_WG``)
  run the online softmax with the accumulator and P in registers (P is the register A operand
  of the P·V product: no shared-memory round trip).
* **Intra-warpgroup overlap.** Iteration j issues S_j = Q·K_jᵀ and then O += P_{j-1}·V_{j-1}
  asynchronously; waiting for all but one group completes S_j (groups retire in order), so the
  softmax of S_j runs while the tensor cores still work on P_{j-1}·V_{j-1}.
* **Ping-pong** (``PINGPONG``): the consumer warpgroups take turns to issue their products
  (one mbarrier per warpgroup passes the turn), so that one warpgroup's softmax overlaps the
  other's products instead of all of them contending for the tensor cores and then all idling
  in softmax.
* **Persistent programs** (``PERSISTENT``): one program per SM walks the work tiles (causal:
  pairs of query blocks of equal total work, the last rounds balanced block by block, from a
  schedule table), and the producer loads the next tile's Q / K / V while the consumers finish
  the last one.
* **Turnover** (``TURNOVER``): a tile's last P·V is issued with the next tile's S_0, so that
  tiles follow one another on the tensor cores without a gap.
* **O through a bulk copy** (``O_TMA``; D = 128, and D = 64 on two warpgroups): the epilogue
  stages O in shared memory (a slab of its own, or with a bias tile in the ring, the tile's
  finished Q slot) and leaves the store to the copy engine.

Scope (everything else stays on :mod:`.flash`): CUDA sm90, fp16 / bf16, ``D == Dv`` in
{64, 128}, q / k / v with 16-byte aligned strides and unit last stride (read in place through
4-D tensor descriptors: no copies, any (B, H, L, D) stride order), GQA / MQA by indexing the
kv head, any Lq / Lk >= 1, top-left causal, and masks: a bool or additive mask broadcastable
to (B, H, Lq, Lk), read tile by tile (a (.., 1, Lk) key-padding row rides on the tensor
cores, see _bias_operand). Numerics are those of
:mod:`.flash`: fp32 accumulation, fp32 statistics with ``exp2`` (``log2 e`` folded into the
scale), fully masked rows give 0 and ``lse = -inf``.

The module imports on any triton; :data:`AVAILABLE` says whether Gluon's Hopper API is there.
Nothing here runs under ``TRITON_INTERPRET`` (Gluon has no interpreter) but the Triton kernel
that builds a key row's bias tile: CPU tests exercise the host-side choices and that kernel,
GPU tests the forward.
"""
from __future__ import annotations

import functools
import heapq
import os
import warnings
import weakref

import torch
import triton
import triton.language as tl

from . import launch

try:  # Gluon (triton >= 3.5). Its API moves between releases: any import error = unavailable.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia import hopper as _hopper
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    AVAILABLE = hasattr(gl, "warp_specialize") and hasattr(_hopper, "warpgroup_mma_wait")
    # the bulk tensor copies' names: async_load / async_store from triton 3.7 on (the older
    # names raise there), async_copy_global_to_shared / _shared_to_global before
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
except Exception:  # pragma: no cover - depends on the installed triton
    AVAILABLE = False

__all__ = ["AVAILABLE", "unsupported", "forward"]

_LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------
if AVAILABLE:

    @gluon.jit
    def _first_tile(Sched, sched_w, PAIRED: gl.constexpr):
        """-> (this program's first work tile, the one after it, schedule position). PAIRED
        (persistent causal launches): the tiles are the program's row of the schedule table
        (see _causal_schedule), ended by -1; else program p takes tiles p, p + P, ..."""
        if PAIRED:
            row = Sched + gl.program_id(0) * sched_w
            return gl.load(row), gl.load(row + 1), gl.program_id(0) * 0
        else:
            return gl.program_id(0), gl.program_id(0), gl.program_id(0) * 0

    @gluon.jit
    def _next_tile(tile, nxt, pos, Sched, sched_w, PAIRED: gl.constexpr):
        """-> the next (tile, tile after it, position). The entry after next is read a tile
        ahead, so that its load has a whole tile to arrive (rows end in two -1)."""
        if PAIRED:
            return nxt, gl.load(Sched + gl.program_id(0) * sched_w + pos + 2), pos + 1
        else:
            return tile + gl.num_programs(0), nxt, pos

    @gluon.jit
    def _has_tile(tile, n_tiles, PAIRED: gl.constexpr):
        if PAIRED:
            return tile >= 0
        else:
            return tile < n_tiles

    @gluon.jit
    def _tile(tile, n_m, Hq, Lk, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              CAUSAL: gl.constexpr, PAIRED: gl.constexpr):
        """Work tile ``tile`` (batch-head x n_m + query block) -> (batch, head, first query
        row, key tiles to visit, how many of them need no element mask). A head's query
        blocks are consecutive tiles, so that the programs running at the same time share its
        K / V in L2 (ordering the tiles by work across heads instead measured far slower:
        every program then streams its own K / V from memory). Causal launches of one
        program per tile take the heavier blocks first; persistent ones follow the schedule
        table."""
        if PAIRED:
            # a packed schedule entry (b, h, query block); n_m and Hq carry its field widths
            # in bits (_pack_schedule): shifts instead of two integer divisions a call
            pid_m = tile & ((1 << n_m) - 1)
            off_h = (tile >> n_m) & ((1 << Hq) - 1)
            off_b = tile >> (n_m + Hq)
        else:
            bh = tile // n_m
            pid_m = tile % n_m
            if CAUSAL:
                pid_m = n_m - 1 - pid_m
            off_b = bh // Hq
            off_h = bh % Hq
        start_m = pid_m * BLOCK_M
        if CAUSAL:
            hi = gl.minimum(start_m + BLOCK_M, Lk)
            n_full = gl.minimum(start_m + 1, Lk) // BLOCK_N
        else:
            hi = Lk
            n_full = Lk // BLOCK_N
        return off_b, off_h, start_m, gl.cdiv(hi, BLOCK_N), n_full

    @gluon.jit
    def _load_q(desc_q, q_smem, q_full, q_empty, done, off_b, off_h, start_m,
                BLOCK_M: gl.constexpr, HEAD_D: gl.constexpr, QBUF: gl.constexpr):
        """Q of the program's tile ``done`` into Q slot ``done % QBUF``, once the consumers are
        done with the Q that slot held, in 64-row boxes (one per consumer warpgroup; box sides
        must be powers of two)."""
        q_bytes: gl.constexpr = BLOCK_M * HEAD_D * desc_q.dtype.primitive_bitwidth // 8
        qs = done % QBUF
        mbarrier.wait(q_empty.index(qs), ((done // QBUF) & 1) ^ 1)
        mbarrier.expect(q_full.index(qs), q_bytes)
        for w in gl.static_range(BLOCK_M // 64):
            tma_load(
                desc_q, [off_b, off_h, start_m + w * 64, 0], q_full.index(qs),
                q_smem.index(qs * (BLOCK_M // 64) + w).reshape([1, 1, 64, HEAD_D]))

    @gluon.jit
    def _load_kv(desc_k, desc_v, desc_kb, k_bufs, v_bufs, kb_bufs, k_full, k_empty, v_full,
                 v_empty, it, j, off_b, off_h, off_hk, kb_nb, kb_nh, BLOCK_N: gl.constexpr,
                 HEAD_D: gl.constexpr, STAGES: gl.constexpr, BIAS_TC: gl.constexpr):
        """K_j and V_j (and BIAS_TC: the bias tile of K_j, see _bias_operand, on K_j's
        barrier) into ring slot ``it % STAGES`` as soon as the consumers have released it."""
        kv_bytes: gl.constexpr = BLOCK_N * HEAD_D * desc_k.dtype.primitive_bitwidth // 8
        kb_bytes: gl.constexpr = BLOCK_N * 16 * desc_k.dtype.primitive_bitwidth // 8
        slot = it % STAGES
        phase = (it // STAGES) & 1
        mbarrier.wait(k_empty.index(slot), phase ^ 1)
        if BIAS_TC:
            mbarrier.expect(k_full.index(slot), kv_bytes + kb_bytes)
            tma_load(
                desc_kb, [off_b % kb_nb, off_h % kb_nh, j * BLOCK_N, 0],
                k_full.index(slot), kb_bufs.index(slot).reshape([1, 1, BLOCK_N, 16]))
        else:
            mbarrier.expect(k_full.index(slot), kv_bytes)
        tma_load(
            desc_k, [off_b, off_hk, j * BLOCK_N, 0], k_full.index(slot),
            k_bufs.index(slot).reshape([1, 1, BLOCK_N, HEAD_D]))
        mbarrier.wait(v_empty.index(slot), phase ^ 1)
        mbarrier.expect(v_full.index(slot), kv_bytes)
        tma_load(
            desc_v, [off_b, off_hk, j * BLOCK_N, 0], v_full.index(slot),
            v_bufs.index(slot).reshape([1, 1, BLOCK_N, HEAD_D]))

    @gluon.jit
    def _producer(desc_q, desc_k, desc_v, desc_kb, q_smem, k_bufs, v_bufs, kb_bufs, q_full,
                  q_empty, k_full, k_empty, v_full, v_empty, Sched, n_m, n_units, Hq, GROUP,
                  Lk, kb_nb, kb_nh, sched_w, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  HEAD_D: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                  QBUF: gl.constexpr, PAIRED: gl.constexpr, BIAS_TC: gl.constexpr):
        """Bulk tensor copies, tile after tile: a tile's Q, then its K_j and V_j through the
        ring (``it`` counts K/V tiles over all work tiles, so the ring runs on across them and
        the next tile's loads overlap this tile's epilogue). Rows past the sequence are
        zero-filled by the copy engine. Waiting on parity ``phase ^ 1`` lets the first pass
        through.

        With two Q slots (persistent launches) the next tile's Q is fetched while this tile
        still runs, after its last K/V: with one, the consumers waited for it from memory at
        every tile start (a 32 KB copy from HBM, about an iteration of the loop). Fetching it
        earlier, after the tile's K_1 / V_1, measured slower (H200, causal D = 128 2k / 4k /
        8k: 520 / 550 / 582 TFLOP/s against 544 / 567 / 590; non-causal within noise)."""
        it = 0
        done = 0
        tile, nxt, pos = _first_tile(Sched, sched_w, PAIRED)
        while _has_tile(tile, n_units, PAIRED):
            off_b, off_h, start_m, n_blocks, n_full = _tile(tile, n_m, Hq, Lk, BLOCK_M, BLOCK_N,
                                                            CAUSAL, PAIRED)
            _load_q(desc_q, q_smem, q_full, q_empty, done, off_b, off_h, start_m, BLOCK_M,
                    HEAD_D, QBUF)
            for j in range(n_blocks):
                _load_kv(desc_k, desc_v, desc_kb, k_bufs, v_bufs, kb_bufs, k_full, k_empty,
                         v_full, v_empty, it, j, off_b, off_h, off_h // GROUP, kb_nb, kb_nh,
                         BLOCK_N, HEAD_D, STAGES, BIAS_TC)
                it += 1
            done += 1
            tile, nxt, pos = _next_tile(tile, nxt, pos, Sched, sched_w, PAIRED)

    @gluon.jit
    def _key_mask(s, offs_m, offs_n, Lk, CAUSAL: gl.constexpr):
        """-inf where key n is past Lk or (causal) past query row m: one comparison an element
        against the row's last visible key."""
        if CAUSAL:
            last = gl.minimum(offs_m, Lk - 1)
            return gl.where(gl.expand_dims(offs_n, 0) <= gl.expand_dims(last, 1), s,
                            float("-inf"))
        else:
            return gl.where(gl.expand_dims(offs_n < Lk, 0), s, float("-inf"))

    @gluon.jit
    def _softmax_tile(s, m_i, qk_scale, j, mask_from, offs_m, mask_base, stride_mm, stride_mn,
                      Lq, Lk, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, MASKED: gl.constexpr,
                      HAS_MASK: gl.constexpr, MASK_BOOL: gl.constexpr, MASK_RB: gl.constexpr,
                      MASK_CB: gl.constexpr, BIAS_TC: gl.constexpr, layout: gl.constexpr):
        """Online-softmax step for score tile j: returns (p, m_new, m_use) with the running
        max in log2 units. Element masking (causal diagonal, keys past Lk) only on the tiles
        that need it (MASKED; 2: decided at run time, on tiles j >= mask_from). Without a user
        mask, or with one the tensor cores already added (BIAS_TC), the scale is applied inside
        the exp2 argument (one FMA an element: needs qk_scale > 0, which the host checks)."""
        offs_n = j * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(0, layout))
        if HAS_MASK and not BIAS_TC:
            # Loaded in compact layouts, then moved into the accumulator's layout (a small
            # shared-memory shuffle): loading straight into it would hold a 64-bit address per
            # element, registers the loop has not got.
            if MASK_RB:
                if MASK_CB:
                    am = gl.expand_dims(gl.expand_dims(gl.load(mask_base), 0), 0)
                else:
                    vec: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
                    cols = j * BLOCK_N + gl.arange(0, BLOCK_N, vec)
                    am = gl.load(mask_base + cols * stride_mn, mask=cols < Lk, other=0)
                    am = gl.expand_dims(gl.convert_layout(am, gl.SliceLayout(0, layout)), 0)
            else:
                if MASK_CB:  # a value per query row: two rows a thread in this layout
                    am = gl.load(mask_base + offs_m * stride_mm, mask=offs_m < Lq, other=0)
                    am = gl.expand_dims(am, 1)
                else:
                    tile: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1],
                                                          [1, 0])
                    rows = gl.convert_layout(offs_m, gl.SliceLayout(1, tile))
                    cols = j * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(0, tile))
                    am = gl.load(mask_base + gl.expand_dims(rows, 1) * stride_mm
                                 + gl.expand_dims(cols, 0) * stride_mn,
                                 mask=gl.expand_dims(rows < Lq, 1) & gl.expand_dims(cols < Lk, 0),
                                 other=0)
                    am = gl.convert_layout(am, layout)
            if MASK_BOOL:
                s = gl.where(am != 0, s * qk_scale, float("-inf"))
            else:
                s = s * qk_scale + am.to(gl.float32) * 1.4426950408889634
        if MASKED == 2:
            if j >= mask_from:
                s = _key_mask(s, offs_m, offs_n, Lk, CAUSAL)
        elif MASKED:
            s = _key_mask(s, offs_m, offs_n, Lk, CAUSAL)
        if BIAS_TC:
            m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
            # a row whose keys are all masked so far: keep exp2's argument finite (0, not nan)
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
            p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
        elif HAS_MASK:
            m_new = gl.maximum(m_i, gl.max(s, 1))
            m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
            p = gl.exp2(s - gl.expand_dims(m_use, 1))
        else:
            m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
            m_use = m_new
            p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
        return p, m_new, m_use

    @gluon.jit
    def _bias_operand(bias_hi, bias_lo, dtype: gl.constexpr, layout: gl.constexpr):
        """BIAS_TC: the (64, 16) register operand [1/scale as hi + lo, 0, ...] whose product
        with the (16, BLOCK_N) bias tile [bias; bias (lo > 0 only); 0 ...] adds bias / scale
        to every row of S on the tensor cores (hi, lo >= 0: -inf biases stay -inf). The
        softmax then costs what it costs without a mask: an element-wise add of a row
        broadcast bias was a fifth more ALU work in a loop that is ALU-bound at D = 64."""
        blk: gl.constexpr = gl.BlockedLayout([1, 16], [32, 1], [4, 1], [1, 0])
        cols = gl.expand_dims(gl.arange(0, 16, gl.SliceLayout(0, blk)), 0)
        row = gl.where(cols == 0, bias_hi, gl.where(cols == 1, bias_lo, 0.0))
        a = row + gl.zeros([64, 16], gl.float32, blk)
        return gl.convert_layout(a.to(dtype), layout)

    @gluon.jit
    def _scores(q, k_bufs, kb_bufs, bias_a, k_full, turn, it, s_zero, WG: gl.constexpr,
                STAGES: gl.constexpr, PINGPONG: gl.constexpr, BIAS_TC: gl.constexpr):
        """Once it is this warpgroup's turn (PINGPONG) and K tile ``it`` has landed, issue
        S = Q K^T (+ bias / scale on the tensor cores: BIAS_TC), asynchronously ->
        (token, ring slot)."""
        slot = it % STAGES
        if PINGPONG:
            mbarrier.wait(turn.index(WG), it & 1)
        mbarrier.wait(k_full.index(slot), (it // STAGES) & 1)
        s_tok = _hopper.warpgroup_mma(q, k_bufs.index(slot).permute((1, 0)), s_zero,
                                      use_acc=False, is_async=True)
        if BIAS_TC:
            s_tok = _hopper.warpgroup_mma(bias_a, kb_bufs.index(slot).permute((1, 0)), s_tok,
                                          is_async=True)
        return s_tok, slot

    @gluon.jit
    def _step(q, k_bufs, v_bufs, kb_bufs, bias_a, k_full, k_empty, v_full, v_empty, turn, s_zero,
              acc, m_i, l_i, p_prev, prev, prev_phase, it, j, mask_from, qk_scale, offs_m,
              mask_base, stride_mm, stride_mn, Lq, Lk, WG: gl.constexpr, NUM_WG: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
              MASKED: gl.constexpr, HAS_MASK: gl.constexpr, MASK_BOOL: gl.constexpr,
              MASK_RB: gl.constexpr, MASK_CB: gl.constexpr, PINGPONG: gl.constexpr,
              BIAS_TC: gl.constexpr, mma: gl.constexpr, mma_o: gl.constexpr,
              p_layout: gl.constexpr, HOLD_P: gl.constexpr):
        """K/V tile j (ring position ``it``): issue S_j = Q K_j^T, then O += P_{j-1} V_{j-1};
        the softmax of S_j runs while the second product is still on the tensor cores.
        HOLD_P (the turnover loop): P_{j-1} goes through the final wait, so that its registers,
        which the product reads until it completes, are not reused for this tile's softmax
        before then."""
        s_tok, slot = _scores(q, k_bufs, kb_bufs, bias_a, k_full, turn, it, s_zero, WG, STAGES,
                              PINGPONG, BIAS_TC)
        mbarrier.wait(v_full.index(prev), prev_phase)
        acc = _hopper.warpgroup_mma(p_prev, v_bufs.index(prev), acc, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index((WG + 1) % NUM_WG))
        s, acc = _hopper.warpgroup_mma_wait(1, deps=[s_tok, acc])
        mbarrier.arrive(k_empty.index(slot))
        p, m_new, m_use = _softmax_tile(s, m_i, qk_scale, j, mask_from, offs_m, mask_base,
                                        stride_mm, stride_mn, Lq, Lk, BLOCK_N, CAUSAL, MASKED,
                                        HAS_MASK, MASK_BOOL, MASK_RB, MASK_CB, BIAS_TC, mma)
        alpha = gl.exp2(m_i - m_use)
        l_i = l_i * alpha + gl.sum(p, 1)
        p16 = p.to(p_prev.dtype)  # before the wait: the fp32 tile dies here, not after it
        if HOLD_P:
            acc, p_prev = _hopper.warpgroup_mma_wait(0, deps=[acc, p_prev])
        else:
            acc = _hopper.warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(v_empty.index(prev))
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, mma_o)), 1)
        p_prev = gl.convert_layout(p16, p_layout)
        return acc, m_new, l_i, p_prev, slot, (it // STAGES) & 1, it + 1

    @gluon.jit
    def _first_softmax(s, qk_scale, n_full, offs_m, mask_base, stride_mm, stride_mn, Lq, Lk,
                       ROWS: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                       HAS_MASK: gl.constexpr, MASK_BOOL: gl.constexpr, MASK_RB: gl.constexpr,
                       MASK_CB: gl.constexpr, BIAS_TC: gl.constexpr, dtype: gl.constexpr,
                       mma: gl.constexpr, p_layout: gl.constexpr):
        """Softmax of a tile's S_0 -> (running max, running sum, P_0 as the P.V operand)."""
        m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, mma))
        if n_full > 0:
            p, m_i, m_use = _softmax_tile(s, m_i, qk_scale, 0, 0, offs_m, mask_base, stride_mm,
                                          stride_mn, Lq, Lk, BLOCK_N, CAUSAL, False, HAS_MASK,
                                          MASK_BOOL, MASK_RB, MASK_CB, BIAS_TC, mma)
        else:
            p, m_i, m_use = _softmax_tile(s, m_i, qk_scale, 0, 0, offs_m, mask_base, stride_mm,
                                          stride_mn, Lq, Lk, BLOCK_N, CAUSAL, True, HAS_MASK,
                                          MASK_BOOL, MASK_RB, MASK_CB, BIAS_TC, mma)
        return m_i, gl.sum(p, 1), gl.convert_layout(p.to(dtype), p_layout)

    @gluon.jit
    def _epilogue(acc, m_i, l_i, Out, LSE, desc_o, o_smem, q_empty, qs, off_b, off_h, start_m,
                  Lq, stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
                  WG: gl.constexpr, NUM_WG: gl.constexpr, HEAD_D: gl.constexpr,
                  HAS_MASK: gl.constexpr, O_TMA: gl.constexpr, dtype: gl.constexpr,
                  mma: gl.constexpr, mma_o: gl.constexpr):
        """O = acc / l, lse = (m + log2 l) ln 2 for one warpgroup's 64 rows; fully masked
        rows: 0 and -inf. O_TMA 1: O goes out through this warpgroup's shared-memory slab and
        a bulk tensor copy (rows past Lq are clipped by the copy engine), which the warpgroup
        does not wait for; stored from registers instead, the epilogue took ~3000 cycles a
        tile (more than a loop iteration: 7 % of a tile at L = 2k, D = 128, H200, clock64
        trace), the tensor cores idle meanwhile. O_TMA 2: the slab is this warpgroup's part of
        the tile's Q slot ``qs``, finished with: the copy engine must have read it before the
        slot is released to the producer (``q_empty``), so the warpgroup waits for that read
        (not for the write to memory)."""
        if HAS_MASK:
            empty = l_i == 0.0
            l_safe = gl.where(empty, 1.0, l_i)
            lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
        else:
            l_safe = l_i
            lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
        inv_l = gl.convert_layout(1.0 / l_safe, gl.SliceLayout(1, mma_o))
        out = (acc * gl.expand_dims(inv_l, 1)).to(dtype)
        if O_TMA == 1:
            o_slab = o_smem.index(WG)
            tma.store_wait(0)   # the previous tile's O has left the slab
            o_slab.store(out)
            _hopper.fence_async_shared()
            tma_store(desc_o, [off_b, off_h, start_m + WG * 64, 0],
                      o_slab.reshape([1, 1, 64, HEAD_D]))
        elif O_TMA == 2:
            o_slab = o_smem.index(qs * NUM_WG + WG)
            o_slab.store(out)
            _hopper.fence_async_shared()
            tma_store(desc_o, [off_b, off_h, start_m + WG * 64, 0],
                      o_slab.reshape([1, 1, 64, HEAD_D]))
        else:
            rows_o = start_m + WG * 64 + gl.arange(0, 64, gl.SliceLayout(1, mma_o))
            cols_o = gl.arange(0, HEAD_D, gl.SliceLayout(0, mma_o))
            o_base = Out + off_b.to(gl.int64) * stride_ob + off_h.to(gl.int64) * stride_oh
            gl.store(o_base + gl.expand_dims(rows_o, 1) * stride_om + gl.expand_dims(cols_o, 0),
                     out, mask=gl.expand_dims(rows_o < Lq, 1))
        rows_l = start_m + WG * 64 + gl.arange(0, 64, gl.SliceLayout(1, mma))
        l_base = LSE + off_b.to(gl.int64) * stride_lb + off_h.to(gl.int64) * stride_lh
        gl.store(l_base + rows_l, lse, mask=rows_l < Lq)
        if O_TMA == 2:   # (after the LSE store: the copy engine reads the slab meanwhile)
            tma.store_wait(0)
            mbarrier.arrive(q_empty.index(qs))

    @gluon.jit
    def _last_pv(acc, p_prev, v_bufs, v_full, v_empty, prev, prev_phase):
        """A tile's last P.V product, on its own -> the finished accumulator."""
        mbarrier.wait(v_full.index(prev), prev_phase)
        acc = _hopper.warpgroup_mma(p_prev, v_bufs.index(prev), acc, is_async=True)
        acc, p_prev = _hopper.warpgroup_mma_wait(0, deps=[acc, p_prev])
        mbarrier.arrive(v_empty.index(prev))
        return acc

    @gluon.jit
    def _tile_rows(tile, n_m, Hq, Lk, Mask, stride_mb, stride_mh, WG: gl.constexpr,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                   PAIRED: gl.constexpr, mma: gl.constexpr):
        """_tile, and this warpgroup's 64 query rows and its (batch, head)'s mask base."""
        off_b, off_h, start_m, n_blocks, n_full = _tile(tile, n_m, Hq, Lk, BLOCK_M, BLOCK_N,
                                                        CAUSAL, PAIRED)
        offs_m = start_m + WG * 64 + gl.arange(0, 64, gl.SliceLayout(1, mma))
        mask_base = Mask + off_b.to(gl.int64) * stride_mb + off_h.to(gl.int64) * stride_mh
        return off_b, off_h, start_m, n_blocks, n_full, offs_m, mask_base

    @gluon.jit
    def _tile_start(q_smem, k_bufs, kb_bufs, bias_a, q_full, k_full, k_empty, turn, s_zero, tile,
                    it, done, n_m, Hq, qk_scale, Mask, stride_mb, stride_mh, stride_mm,
                    stride_mn, Lq, Lk, WG: gl.constexpr, NUM_WG: gl.constexpr,
                    BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                    HAS_MASK: gl.constexpr, MASK_BOOL: gl.constexpr, MASK_RB: gl.constexpr,
                    MASK_CB: gl.constexpr, PINGPONG: gl.constexpr, QBUF: gl.constexpr,
                    PAIRED: gl.constexpr, BIAS_TC: gl.constexpr, dtype: gl.constexpr,
                    mma: gl.constexpr, p_layout: gl.constexpr):
        """A tile's S_0 (K/V ring position ``it``, Q slot of tile ``done``) and its softmax on
        their own -> (running max, running sum, P_0)."""
        off_b, off_h, start_m, n_blocks, n_full = _tile(tile, n_m, Hq, Lk, 64 * NUM_WG, BLOCK_N,
                                                        CAUSAL, PAIRED)
        qs = done % QBUF
        mbarrier.wait(q_full.index(qs), (done // QBUF) & 1)
        s_tok, slot = _scores(q_smem.index(qs * NUM_WG + WG), k_bufs, kb_bufs, bias_a, k_full,
                              turn, it, s_zero, WG, STAGES, PINGPONG, BIAS_TC)
        if PINGPONG:
            mbarrier.arrive(turn.index((WG + 1) % NUM_WG))
        s = _hopper.warpgroup_mma_wait(0, deps=[s_tok])
        mbarrier.arrive(k_empty.index(slot))
        return _first_softmax(
            s, qk_scale, n_full, start_m + WG * 64 + gl.arange(0, 64, gl.SliceLayout(1, mma)),
            Mask + off_b.to(gl.int64) * stride_mb + off_h.to(gl.int64) * stride_mh, stride_mm,
            stride_mn, Lq, Lk, 64, BLOCK_N, CAUSAL, HAS_MASK, MASK_BOOL, MASK_RB, MASK_CB,
            BIAS_TC, dtype, mma, p_layout)

    @gluon.jit
    def _consumer(Out, LSE, Mask, Sched, desc_o, o_smem, q_smem, k_bufs, v_bufs, kb_bufs,
                  q_full, q_empty, k_full, k_empty, v_full, v_empty, turn, n_m, n_units, Hq,
                  sched_w, qk_scale, bias_hi, bias_lo, Lq, Lk,
                  stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
                  stride_mb, stride_mh, stride_mm, stride_mn,
                  WG: gl.constexpr, NUM_WG: gl.constexpr, BLOCK_N: gl.constexpr,
                  HEAD_D: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                  HAS_MASK: gl.constexpr, MASK_BOOL: gl.constexpr, MASK_RB: gl.constexpr,
                  MASK_CB: gl.constexpr, PINGPONG: gl.constexpr, QBUF: gl.constexpr,
                  PAIRED: gl.constexpr, BIAS_TC: gl.constexpr, TURNOVER: gl.constexpr,
                  O_TMA: gl.constexpr):
        """One warpgroup: rows WG*64 .. WG*64+63 of each work tile's query block.

        TURNOVER: tiles follow one another without a gap on the tensor cores: the last P.V
        product of a tile is issued together with S_0 of the next one, and the softmax of that
        S_0 runs while the P.V product still runs, before the tile's epilogue. Started and
        finished on their own (the other branch), each tile exposes a product and a softmax at
        each end.

        TURNOVER 1 walks a tile's key tiles in two loops, those that need no element mask and
        then the masked ones (the branch costs registers at D = 128); 2 in one loop that
        decides per tile whether to mask (causal launches, and short keys). Two loops gave
        wrong rows, not understood (the values change from run to run, so a race), where a
        tile's unmasked loop is empty and its masked loop is not: non-causal with 128 < Lk <
        256 (head dim 64, H100: every launch), causal at every head's query block 1 (its
        second warpgroup's rows, with inputs of 64 MB and more, H200); an ``if`` around the
        empty loop gave illegal memory accesses instead. One loop gave none of that (causal
        D = 64 / 128 at 2^25-element inputs, H100), so the launch plan takes two loops only
        where every tile runs its unmasked loop at least once (non-causal, Lk >= 2 BLOCK_N)."""
        ROWS: gl.constexpr = 64
        BLOCK_M: gl.constexpr = 64 * NUM_WG
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_N, 16])
        mma_o: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_o, k_width=2)
        dtype: gl.constexpr = q_smem.dtype
        s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, mma)
        if BIAS_TC:
            bias_a = _bias_operand(bias_hi, bias_lo, dtype,
                                   gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2))
        else:
            bias_a = 0
        if TURNOVER:
            # (every program has a tile: the launch has at most one program per tile)
            tile, nxt, pos = _first_tile(Sched, sched_w, PAIRED)
            done = 0   # work tiles finished (Q slot and phase)
            # the first tile's S_0 and its softmax, on their own
            m_i, l_i, p_prev = _tile_start(
                q_smem, k_bufs, kb_bufs, bias_a, q_full, k_full, k_empty, turn, s_zero, tile,
                0, done, n_m, Hq, qk_scale, Mask, stride_mb, stride_mh, stride_mm,
                stride_mn, Lq, Lk, WG, NUM_WG, BLOCK_N, STAGES, CAUSAL, HAS_MASK, MASK_BOOL,
                MASK_RB, MASK_CB, PINGPONG, QBUF, PAIRED, BIAS_TC, dtype, mma, p_layout)
            prev = 0
            prev_phase = 0
            it = 1     # K/V tiles consumed so far (ring slot and phase; ping-pong turn parity)
            acc = gl.zeros([ROWS, HEAD_D], gl.float32, mma_o)
            # (only the tile and the schedule cursor are carried from one iteration to the next;
            # the rest is recomputed from them: loop-carried values cost registers the loop has
            # not got)
            while _has_tile(tile, n_units, PAIRED):
                off_b, off_h, start_m, n_blocks, n_full, offs_m, mask_base = _tile_rows(
                    tile, n_m, Hq, Lk, Mask, stride_mb, stride_mh, WG, BLOCK_M, BLOCK_N, CAUSAL,
                    PAIRED, mma)
                qs = done % QBUF
                q = q_smem.index(qs * NUM_WG + WG)
                if TURNOVER == 2:
                    for j in range(1, n_blocks):
                        acc, m_i, l_i, p_prev, prev, prev_phase, it = _step(
                            q, k_bufs, v_bufs, kb_bufs, bias_a, k_full, k_empty, v_full,
                            v_empty, turn, s_zero, acc, m_i, l_i, p_prev, prev, prev_phase, it,
                            j, n_full, qk_scale, offs_m, mask_base, stride_mm, stride_mn, Lq, Lk,
                            WG, NUM_WG, BLOCK_N, STAGES, CAUSAL, 2, HAS_MASK, MASK_BOOL,
                            MASK_RB, MASK_CB, PINGPONG, BIAS_TC, mma, mma_o, p_layout, True)
                else:
                    for j in range(1, n_full):
                        acc, m_i, l_i, p_prev, prev, prev_phase, it = _step(
                            q, k_bufs, v_bufs, kb_bufs, bias_a, k_full, k_empty, v_full,
                            v_empty, turn, s_zero, acc, m_i, l_i, p_prev, prev, prev_phase, it,
                            j, n_full, qk_scale, offs_m, mask_base, stride_mm, stride_mn, Lq, Lk,
                            WG, NUM_WG, BLOCK_N, STAGES, CAUSAL, False, HAS_MASK, MASK_BOOL,
                            MASK_RB, MASK_CB, PINGPONG, BIAS_TC, mma, mma_o, p_layout, True)
                    for j in range(gl.maximum(n_full, 1), n_blocks):
                        acc, m_i, l_i, p_prev, prev, prev_phase, it = _step(
                            q, k_bufs, v_bufs, kb_bufs, bias_a, k_full, k_empty, v_full,
                            v_empty, turn, s_zero, acc, m_i, l_i, p_prev, prev, prev_phase, it,
                            j, n_full, qk_scale, offs_m, mask_base, stride_mm, stride_mn, Lq, Lk,
                            WG, NUM_WG, BLOCK_N, STAGES, CAUSAL, True, HAS_MASK, MASK_BOOL,
                            MASK_RB, MASK_CB, PINGPONG, BIAS_TC, mma, mma_o, p_layout, True)
                # every S of this tile is done: the producer may bring Q for the tile after next
                # (O_TMA 2: once O has left the slot, in the epilogue)
                if O_TMA != 2:
                    mbarrier.arrive(q_empty.index(qs))
                done += 1
                this_tile = tile
                tile, nxt, pos = _next_tile(tile, nxt, pos, Sched, sched_w, PAIRED)
                n_m_i = m_i
                n_l_i = l_i
                if _has_tile(tile, n_units, PAIRED):
                    # S_0 of the next tile and this tile's last P.V in one turn
                    n_off_b, n_off_h, n_start_m, n_n_blocks, n_n_full = _tile(
                        tile, n_m, Hq, Lk, BLOCK_M, BLOCK_N, CAUSAL, PAIRED)
                    n_qs = done % QBUF
                    mbarrier.wait(q_full.index(n_qs), (done // QBUF) & 1)
                    s_tok, slot = _scores(q_smem.index(n_qs * NUM_WG + WG), k_bufs, kb_bufs,
                                          bias_a, k_full, turn, it, s_zero, WG, STAGES, PINGPONG,
                                          BIAS_TC)
                    mbarrier.wait(v_full.index(prev), prev_phase)
                    acc = _hopper.warpgroup_mma(p_prev, v_bufs.index(prev), acc, is_async=True)
                    if PINGPONG:
                        mbarrier.arrive(turn.index((WG + 1) % NUM_WG))
                    s, acc = _hopper.warpgroup_mma_wait(1, deps=[s_tok, acc])
                    mbarrier.arrive(k_empty.index(slot))
                    n_m_i, n_l_i, n_p = _first_softmax(
                        s, qk_scale, n_n_full,
                        n_start_m + WG * ROWS + gl.arange(0, ROWS, gl.SliceLayout(1, mma)),
                        Mask + n_off_b.to(gl.int64) * stride_mb + n_off_h.to(gl.int64) * stride_mh,
                        stride_mm, stride_mn, Lq, Lk, ROWS, BLOCK_N, CAUSAL, HAS_MASK, MASK_BOOL,
                        MASK_RB, MASK_CB, BIAS_TC, dtype, mma, p_layout)
                    acc, p_prev = _hopper.warpgroup_mma_wait(0, deps=[acc, p_prev])
                    mbarrier.arrive(v_empty.index(prev))
                    p_prev = n_p
                    prev = slot
                    prev_phase = (it // STAGES) & 1
                    it += 1
                else:
                    acc = _last_pv(acc, p_prev, v_bufs, v_full, v_empty, prev, prev_phase)
                off_b, off_h, start_m, n_blocks, n_full = _tile(this_tile, n_m, Hq, Lk, BLOCK_M,
                                                                BLOCK_N, CAUSAL, PAIRED)
                _epilogue(acc, m_i, l_i, Out, LSE, desc_o, o_smem, q_empty, qs, off_b, off_h,
                          start_m, Lq, stride_ob, stride_oh, stride_om, stride_lb, stride_lh, WG,
                          NUM_WG, HEAD_D, HAS_MASK, O_TMA, dtype, mma, mma_o)
                acc = gl.zeros([ROWS, HEAD_D], gl.float32, mma_o)
                m_i = n_m_i
                l_i = n_l_i
        else:
            it = 0     # K/V tiles consumed so far (ring slot and phase; ping-pong turn parity)
            done = 0   # work tiles finished (Q phase)
            tile, nxt, pos = _first_tile(Sched, sched_w, PAIRED)
            while _has_tile(tile, n_units, PAIRED):
                off_b, off_h, start_m, n_blocks, n_full, offs_m, mask_base = _tile_rows(
                    tile, n_m, Hq, Lk, Mask, stride_mb, stride_mh, WG, BLOCK_M, BLOCK_N, CAUSAL,
                    PAIRED, mma)
                acc = gl.zeros([ROWS, HEAD_D], gl.float32, mma_o)
                qs = done % QBUF
                q = q_smem.index(qs * NUM_WG + WG)
                mbarrier.wait(q_full.index(qs), (done // QBUF) & 1)

                # K/V tile 0: S_0 only (its P.V is issued together with S_1)
                s_tok, slot = _scores(q, k_bufs, kb_bufs, bias_a, k_full, turn, it, s_zero, WG,
                                      STAGES, PINGPONG, BIAS_TC)
                if PINGPONG:
                    mbarrier.arrive(turn.index((WG + 1) % NUM_WG))
                s = _hopper.warpgroup_mma_wait(0, deps=[s_tok])
                mbarrier.arrive(k_empty.index(slot))
                m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, mma))
                if n_full > 0:
                    p, m_i, m_use = _softmax_tile(s, m_i, qk_scale, 0, 0, offs_m, mask_base,
                                                  stride_mm, stride_mn, Lq, Lk, BLOCK_N, CAUSAL,
                                                  False, HAS_MASK, MASK_BOOL, MASK_RB, MASK_CB,
                                                  BIAS_TC, mma)
                else:
                    p, m_i, m_use = _softmax_tile(s, m_i, qk_scale, 0, 0, offs_m, mask_base,
                                                  stride_mm, stride_mn, Lq, Lk, BLOCK_N, CAUSAL,
                                                  True, HAS_MASK, MASK_BOOL, MASK_RB, MASK_CB,
                                                  BIAS_TC, mma)
                l_i = gl.sum(p, 1)
                p_prev = gl.convert_layout(p.to(dtype), p_layout)
                prev = slot
                prev_phase = (it // STAGES) & 1
                it += 1
                # tiles that need no element mask, then the diagonal / ragged-edge ones (two
                # loops rather than a branch per tile: the branch costs registers the loop
                # has not got)
                for j in range(1, n_full):
                    acc, m_i, l_i, p_prev, prev, prev_phase, it = _step(
                        q, k_bufs, v_bufs, kb_bufs, bias_a, k_full, k_empty, v_full, v_empty,
                        turn, s_zero, acc, m_i, l_i, p_prev, prev, prev_phase, it, j, n_full,
                        qk_scale, offs_m, mask_base, stride_mm, stride_mn, Lq, Lk, WG, NUM_WG,
                        BLOCK_N, STAGES, CAUSAL, False, HAS_MASK, MASK_BOOL, MASK_RB, MASK_CB,
                        PINGPONG, BIAS_TC, mma, mma_o, p_layout, False)
                for j in range(gl.maximum(n_full, 1), n_blocks):
                    acc, m_i, l_i, p_prev, prev, prev_phase, it = _step(
                        q, k_bufs, v_bufs, kb_bufs, bias_a, k_full, k_empty, v_full, v_empty,
                        turn, s_zero, acc, m_i, l_i, p_prev, prev, prev_phase, it, j, n_full,
                        qk_scale, offs_m, mask_base, stride_mm, stride_mn, Lq, Lk, WG, NUM_WG,
                        BLOCK_N, STAGES, CAUSAL, True, HAS_MASK, MASK_BOOL, MASK_RB, MASK_CB,
                        PINGPONG, BIAS_TC, mma, mma_o, p_layout, False)
                # every S of this tile is done: the producer may bring the next tile's Q
                # (O_TMA 2: once O has left the slot, in the epilogue)
                if O_TMA != 2:
                    mbarrier.arrive(q_empty.index(qs))

                mbarrier.wait(v_full.index(prev), prev_phase)
                acc = _hopper.warpgroup_mma(p_prev, v_bufs.index(prev), acc, is_async=True)
                acc = _hopper.warpgroup_mma_wait(0, deps=[acc])
                mbarrier.arrive(v_empty.index(prev))

                _epilogue(acc, m_i, l_i, Out, LSE, desc_o, o_smem, q_empty, qs, off_b,
                          off_h, start_m, Lq, stride_ob, stride_oh, stride_om, stride_lb,
                          stride_lh, WG, NUM_WG, HEAD_D, HAS_MASK, O_TMA, dtype, mma, mma_o)
                done += 1
                tile, nxt, pos = _next_tile(tile, nxt, pos, Sched, sched_w, PAIRED)
        if O_TMA == 1:   # the last O must leave shared memory before the program ends
            tma.store_wait(0)

    @gluon.jit(do_not_specialize=["sched_w", "Lq", "Lk"])
    def _attn_fwd_sm90(desc_q, desc_k, desc_v, desc_kb, desc_o, Out, LSE, Mask, Sched,
                       stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
                       stride_mb, stride_mh, stride_mm, stride_mn,
                       n_m, n_units, Hq, GROUP, kb_nb, kb_nh, sched_w, Lq, Lk, qk_scale,
                       bias_hi, bias_lo,
                       HEAD_D: gl.constexpr, BLOCK_N: gl.constexpr, NUM_WG: gl.constexpr,
                       STAGES: gl.constexpr, CAUSAL: gl.constexpr, HAS_MASK: gl.constexpr,
                       MASK_BOOL: gl.constexpr, MASK_RB: gl.constexpr, MASK_CB: gl.constexpr,
                       PINGPONG: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                       CONSUMER_REGS: gl.constexpr, QBUF: gl.constexpr, PAIRED: gl.constexpr,
                       BIAS_TC: gl.constexpr, TURNOVER: gl.constexpr, O_TMA: gl.constexpr):
        """A work tile is one query block of one (batch, head). Program p does tiles p, p + P,
        p + 2P, ... of the n_units (P programs: one per tile, or one per SM for the persistent
        launch; see forward), or (PAIRED) the tiles in its row of ``Sched`` (see
        _causal_schedule)."""
        BLOCK_M: gl.constexpr = 64 * NUM_WG
        dtype: gl.constexpr = desc_q.dtype
        smem: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_D], dtype)
        # Q slots x warpgroups 64-row slabs (64-row boxes: tensor shapes are powers of two)
        q_smem = gl.allocate_shared_memory(dtype, [QBUF * NUM_WG, 64, HEAD_D], smem)
        k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], smem)
        v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], smem)
        if BIAS_TC:  # (BLOCK_N, 16) bias tiles, one per K slot
            kb_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, 16], dtype)
            kb_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, 16], kb_layout)
        else:
            kb_bufs = k_bufs   # (not read)
        if O_TMA == 1:  # a 64-row O slab per consumer warpgroup, for the bulk copy out
            o_smem = gl.allocate_shared_memory(dtype, [NUM_WG, 64, HEAD_D], smem)
        else:
            o_smem = q_smem    # (O_TMA 2: O is staged in the finished Q slot; else not written)
        bar: gl.constexpr = mbarrier.MBarrierLayout()
        q_full = gl.allocate_shared_memory(gl.int64, [QBUF, 1], bar)
        q_empty = gl.allocate_shared_memory(gl.int64, [QBUF, 1], bar)
        k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar)
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar)
        v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar)
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], bar)
        turn = gl.allocate_shared_memory(gl.int64, [NUM_WG, 1], bar)
        for i in gl.static_range(QBUF):
            mbarrier.init(q_full.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=NUM_WG)  # every consumer warpgroup releases Q
        for i in gl.static_range(STAGES):
            mbarrier.init(k_full.index(i), count=1)
            mbarrier.init(v_full.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=NUM_WG)
            mbarrier.init(v_empty.index(i), count=NUM_WG)
        for i in gl.static_range(NUM_WG):
            mbarrier.init(turn.index(i), count=1)
        if PINGPONG:
            mbarrier.arrive(turn.index(0))  # warpgroup 0 issues first

        # (argument tuples are spelled out: tuple arithmetic would turn the constexprs into
        # run-time values)
        if NUM_WG == 2:
            gl.warp_specialize([
                (_consumer, (Out, LSE, Mask, Sched, desc_o, o_smem, q_smem, k_bufs, v_bufs,
                             kb_bufs, q_full, q_empty, k_full, k_empty, v_full, v_empty, turn,
                             n_m, n_units, Hq, sched_w, qk_scale, bias_hi, bias_lo, Lq, Lk,
                             stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
                             stride_mb, stride_mh, stride_mm, stride_mn,
                             0, NUM_WG, BLOCK_N, HEAD_D, STAGES, CAUSAL, HAS_MASK, MASK_BOOL,
                             MASK_RB, MASK_CB, PINGPONG, QBUF, PAIRED, BIAS_TC, TURNOVER, O_TMA)),
                (_consumer, (Out, LSE, Mask, Sched, desc_o, o_smem, q_smem, k_bufs, v_bufs,
                             kb_bufs, q_full, q_empty, k_full, k_empty, v_full, v_empty, turn,
                             n_m, n_units, Hq, sched_w, qk_scale, bias_hi, bias_lo, Lq, Lk,
                             stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
                             stride_mb, stride_mh, stride_mm, stride_mn,
                             1, NUM_WG, BLOCK_N, HEAD_D, STAGES, CAUSAL, HAS_MASK, MASK_BOOL,
                             MASK_RB, MASK_CB, PINGPONG, QBUF, PAIRED, BIAS_TC, TURNOVER, O_TMA)),
                (_producer, (desc_q, desc_k, desc_v, desc_kb, q_smem, k_bufs, v_bufs, kb_bufs,
                             q_full, q_empty, k_full, k_empty, v_full, v_empty, Sched, n_m,
                             n_units, Hq, GROUP, Lk, kb_nb, kb_nh, sched_w, BLOCK_M, BLOCK_N, HEAD_D, STAGES, CAUSAL,
                             QBUF, PAIRED, BIAS_TC)),
            ], [4, 4], [CONSUMER_REGS, PRODUCER_REGS])
        else:
            gl.warp_specialize([
                (_consumer, (Out, LSE, Mask, Sched, desc_o, o_smem, q_smem, k_bufs, v_bufs,
                             kb_bufs, q_full, q_empty, k_full, k_empty, v_full, v_empty, turn,
                             n_m, n_units, Hq, sched_w, qk_scale, bias_hi, bias_lo, Lq, Lk,
                             stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
                             stride_mb, stride_mh, stride_mm, stride_mn,
                             0, NUM_WG, BLOCK_N, HEAD_D, STAGES, CAUSAL, HAS_MASK, MASK_BOOL,
                             MASK_RB, MASK_CB, PINGPONG, QBUF, PAIRED, BIAS_TC, TURNOVER, O_TMA)),
                (_consumer, (Out, LSE, Mask, Sched, desc_o, o_smem, q_smem, k_bufs, v_bufs,
                             kb_bufs, q_full, q_empty, k_full, k_empty, v_full, v_empty, turn,
                             n_m, n_units, Hq, sched_w, qk_scale, bias_hi, bias_lo, Lq, Lk,
                             stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
                             stride_mb, stride_mh, stride_mm, stride_mn,
                             1, NUM_WG, BLOCK_N, HEAD_D, STAGES, CAUSAL, HAS_MASK, MASK_BOOL,
                             MASK_RB, MASK_CB, PINGPONG, QBUF, PAIRED, BIAS_TC, TURNOVER, O_TMA)),
                (_consumer, (Out, LSE, Mask, Sched, desc_o, o_smem, q_smem, k_bufs, v_bufs,
                             kb_bufs, q_full, q_empty, k_full, k_empty, v_full, v_empty, turn,
                             n_m, n_units, Hq, sched_w, qk_scale, bias_hi, bias_lo, Lq, Lk,
                             stride_ob, stride_oh, stride_om, stride_lb, stride_lh,
                             stride_mb, stride_mh, stride_mm, stride_mn,
                             2, NUM_WG, BLOCK_N, HEAD_D, STAGES, CAUSAL, HAS_MASK, MASK_BOOL,
                             MASK_RB, MASK_CB, PINGPONG, QBUF, PAIRED, BIAS_TC, TURNOVER, O_TMA)),
                (_producer, (desc_q, desc_k, desc_v, desc_kb, q_smem, k_bufs, v_bufs, kb_bufs,
                             q_full, q_empty, k_full, k_empty, v_full, v_empty, Sched, n_m,
                             n_units, Hq, GROUP, Lk, kb_nb, kb_nh, sched_w, BLOCK_M, BLOCK_N, HEAD_D, STAGES, CAUSAL,
                             QBUF, PAIRED, BIAS_TC)),
            ], [4, 4, 4], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def _turnover(kind, causal):
    """The built-in TURNOVER (see _consumer): one key loop for causal launches, two otherwise;
    none with full masks (their tile loads spill registers in the turnover loop: 88 bytes of
    stack at D = 128, offline compile)."""
    return 0 if kind == "tile" else 2 if causal else 1


# (BLOCK_N, NUM_WG, STAGES, PINGPONG, PERSISTENT, PRODUCER_REGS, CONSUMER_REGS, QBUF, TURNOVER) per
# head dim, mask kind ("none"; "row": a mask broadcast over queries or keys, a vector per tile;
# "tile": a full (.., Lq, Lk) mask, whose tile takes registers: 64-key tiles keep it from
# spilling) and causality.
# * Shared memory: Q (64 NUM_WG x D) + STAGES x (K + V) (BLOCK_N x D each), 2 bytes an element:
#   one program per SM either way.
# * PERSISTENT: one program per SM looping over the work units, which overlaps a tile's
#   prologue and epilogue with its neighbours' (measured faster at L <= 4k). Causal query
#   blocks differ in work: a static round robin over them lost to the hardware's dynamic
#   scheduling of one program per block (400 vs 470 TFLOP/s at L = 2k, D = 128, third session),
#   so a persistent causal launch pairs a head's blocks r and n_m - 1 - r into units of equal
#   work, and balances the last of them over the programs block by block (PAIRED, see
#   _causal_schedule).
# * QBUF: Q slots; two for persistent launches, so that the next tile's Q arrives while this
#   tile runs (one program per tile has a single tile: one slot).
# * TURNOVER (see _consumer): a tile's last P.V issued with the next tile's S_0; 0: tile by
#   tile, 1: the key tiles in two loops (unmasked, masked), 2: in one loop.
# * Registers: 128 threads x (CONSUMER_REGS x NUM_WG + PRODUCER_REGS) <= 64K; each config was
#   checked for spills with scripts/sm90_offline_compile.py.
_BASE = {
    (64, "none"): (128, 3, 3, True, 24, 160),
    (64, "row"): (128, 3, 3, True, 24, 160),
    (64, "tile"): (64, 2, 3, True, 24, 240),
    (128, "none"): (128, 2, 2, True, 24, 240),
    (128, "row"): (128, 2, 2, True, 24, 240),
    (128, "tile"): (64, 2, 3, True, 24, 240),
}
# Causal D = 64 on two warpgroups below Lq = 5k, on three from there on: with the turnover and
# the balanced schedule (interleaved timing, H100, bf16), three (160 registers each; 56 bytes
# of stack) ran causal 2k / 3k / 4k / 5k / 6k / 8k at 324 / 422 / 422 / 439 / 489 / 474 TFLOP/s
# against 386 / 422 / 434 / 424 / 446 / 434 for two (a padding bias or GQA alike at 4k-16k in
# an earlier run); at 2k the 192-row blocks (11 of them, a ragged one, two masked key tiles in
# most) lose.
_CAUSAL = {(64, "none"): (128, 2, 3, True, 24, 240), (64, "row"): (128, 2, 3, True, 24, 240)}
_CAUSAL_LONG = {(64, "none"): (128, 3, 3, True, 24, 160), (64, "row"): (128, 3, 3, True, 24, 160)}
_CAUSAL_LONG_LQ = 5120
# Short launches (interleaved timing, H100, bf16, B * L = 16k tokens). D = 64 (thirteenth
# session): not causal, below Lq = 2k on two warpgroups: their 128-row blocks divide 512 and
# 1k, where three warpgroups' 192-row blocks leave a ragged one (576 rows of work for 512):
# 361 / 421 TFLOP/s at 512 / 1k against 298 / 407 on three (with a key bias 341 / 410 against
# 282 / 400); at 2k three are ahead again (476 against 429). Causal, below Lq = 1k on 64-key
# tiles: 512 246 against 208 on 128-key ones (with a key bias 222 against 182); at 1k 319
# against 341, so 128 from there on. Causal D = 128 alike (fifteenth session, H = 16), on 64-key
# tiles with three stages (197 KB of shared memory, 205 with a key bias; no stack, offline
# compile): at 512 312 against 266 on 128-key ones, 286 against 235 with a key bias (the bias
# then costs 8 % instead of 12 %), two stages 270; at 1k 420 against 431, but with the bias
# 408 / 383 / 404 against 392 / 376 / 390 (three runs); at 1.5k with the bias 459 against 466,
# at 2k 488 against 551 (with the bias 457 / 455 against 499 / 500). So below 1k without a
# bias, below 1.5k with one.
# (D, kind, causal) -> (Lq bound, (BLOCK_N, NUM_WG, STAGES, PINGPONG, PREGS, CREGS)).
_SHORT = {(64, kind, causal): (2048 if not causal else 1024,
                               (64 if causal else 128, 2, 3, True, 24, 240))
          for kind in ("none", "row") for causal in (False, True)}
_SHORT.update({(128, "none", True): (1024, (64, 2, 3, True, 24, 240)),
               (128, "row", True): (1536, (64, 2, 3, True, 24, 240))})
_CONFIGS = {(d, kind, causal): (bn, wg, st, pp, True, pr, cr, 2, _turnover(kind, causal))
            for (d, kind), base in _BASE.items() for causal in (False, True)
            for (bn, wg, st, pp, pr, cr) in [_CAUSAL.get((d, kind), base) if causal else base]}
_CONFIGS_LONG = {(d, kind): (bn, wg, st, pp, True, pr, cr, 2, _turnover(kind, True))
                 for (d, kind), (bn, wg, st, pp, pr, cr) in _CAUSAL_LONG.items()}
_CONFIGS_SHORT = {(d, kind, causal): (bound, (bn, wg, st, pp, True, pr, cr, 2,
                                                _turnover(kind, causal)))
                  for (d, kind, causal), (bound, (bn, wg, st, pp, pr, cr)) in _SHORT.items()}
HEAD_DIMS = (64, 128)


def mask_kind(has_mask, row_bcast, col_bcast):
    if not has_mask:
        return "none"
    return "row" if (row_bcast or col_bcast) else "tile"


def config(head_d, kind, causal, lq=0):
    """The launch config (``lq``: query length, 0 if unknown; short and long launches may
    differ). ``ADAATTN_SM90_CONFIG_<D>[_<kind>]="BLOCK_N,NUM_WG,STAGES,PINGPONG,PERSISTENT,
    PREGS,CREGS[,QBUF[,TURNOVER]]"`` replaces it (tuning runs; QBUF defaults to 2 for a
    persistent launch, else 1; TURNOVER to the built-in choice)."""
    txt = (os.environ.get(f"ADAATTN_SM90_CONFIG_{head_d}_{kind}")
           or os.environ.get(f"ADAATTN_SM90_CONFIG_{head_d}", "")).strip()
    if not txt:
        if causal and lq >= _CAUSAL_LONG_LQ and (head_d, kind) in _CONFIGS_LONG:
            return _CONFIGS_LONG[(head_d, kind)]
        bound, short = _CONFIGS_SHORT.get((head_d, kind, bool(causal)), (0, None))
        if 0 < lq < bound:
            return short
        return _CONFIGS[(head_d, kind, bool(causal))]
    v = [int(x) for x in txt.split(",")]
    qbuf = v[7] if len(v) > 7 else (2 if v[4] else 1)
    turnover = v[8] if len(v) > 8 else _turnover(kind, causal)
    return (v[0], v[1], v[2], bool(v[3]), bool(v[4]), v[5], v[6], qbuf, turnover)


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def tma_aligned(t):
    """Bulk tensor copies need a 16-byte aligned base, a unit last stride and 16-byte multiple
    strides (size-1 dims excepted). Shared with :mod:`.flash`'s descriptor kernel."""
    strides, es = t.stride(), t.element_size()   # (read once: stride() costs ~0.5 us a call)
    if t.data_ptr() % 16 or strides[-1] != 1:
        return False
    return all(n == 1 or (st > 0 and (st * es) % 16 == 0)
               for n, st in zip(t.shape[:-1], strides[:-1]))


def unsupported(q, k, v, scale, capability, causal=False):
    """None if :func:`forward` takes these (4-D, already validated by ``flash.supports``)
    inputs on a device of ``capability``, else a short reason."""
    if not AVAILABLE:
        return "Gluon (triton >= 3.5) unavailable"
    if _INTERPRET or q.device.type != "cuda":
        return "needs a CUDA device"
    if capability[0] != 9:
        return f"sm{capability[0]}{capability[1]} (the Gluon kernel is for sm90)"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {str(q.dtype).replace('torch.', '')}"
    D, Dv = q.shape[-1], v.shape[-1]
    if D != Dv or D not in HEAD_DIMS:
        return f"head dims {D}/{Dv} (the Gluon kernel takes D = Dv in {HEAD_DIMS})"
    if D == 64 and causal and not _causal64():
        return "causal with head dim 64 (ADAATTN_SM90_CAUSAL64=0)"
    if not (tma_aligned(q) and tma_aligned(k) and tma_aligned(v)):
        return "strides not 16-byte aligned"
    if not scale > 0:
        return "scale <= 0"
    return None


def _causal64():
    """Whether causal D = 64 takes this kernel: yes since its causal tiles follow one another
    without a gap (TURNOVER 2: H100, bf16, causal 2k / 4k / 8k / 16k 374 / 407 / 441 / 447
    TFLOP/s against the Triton-language kernel's 348 / 392 / 417 / 418; tile by tile it was
    as fast as that one unmasked, and took only row-masked calls). ``ADAATTN_SM90_CAUSAL64=0``
    sends them to the Triton kernel."""
    return os.environ.get("ADAATTN_SM90_CAUSAL64", "") not in ("0", "false", "False", "no")


def tma_strides(t):
    """Descriptor strides: size-1 dims may carry any stride; the copy engine wants 16-byte
    multiples everywhere. Shared with :mod:`.flash`'s descriptor kernel."""
    es = t.element_size()
    return [st if (n > 1 or (st > 0 and (st * es) % 16 == 0)) else 16 // es
            for n, st in zip(t.shape[:-1], t.stride()[:-1])] + [1]


def _descriptor(t, block_rows, head_d):
    layout = gl.NVMMASharedLayout.get_default_for([1, 1, block_rows, head_d],
                                                  gl.float16 if t.dtype == torch.float16
                                                  else gl.bfloat16)
    return TensorDescriptor(t, list(t.shape), tma_strides(t), [1, 1, block_rows, head_d], layout)


class _HostDescriptor:
    """What Triton's launcher reads off a host tensor descriptor (base, shape, strides,
    padding) once the kernel is compiled: the block shape and layout are baked into the kernel
    and its launch metadata, so the checked ``TensorDescriptor`` is only built for the first
    launch of each specialisation."""
    __slots__ = ("base", "shape", "strides", "padding")

    def __init__(self, t, shape=None, strides=None):
        # (shape / strides given: a bound launch's, computed once for its call signature)
        self.base, self.padding = t, "zero"
        self.shape = list(t.shape) if shape is None else shape
        self.strides = tma_strides(t) if strides is None else strides


# Compiled kernels by specialisation (the key built in forward), launched without
# JITFunction.run: in triton 3.6 its argument binding, cache-key string and descriptor checks
# cost tens of microseconds a call, which small attention calls pay in full (an SDPA call costs
# ~22 us of host time in all).
_LAUNCHERS: dict = {}


def clear_compiled() -> None:
    """Forget the compiled forwards and their direct launchers (see kernels.clear_compiled)."""
    if AVAILABLE:
        launch.drop_compiled(_attn_fwd_sm90)
    _LAUNCHERS.clear()
    _TILES.clear()
_FAST_LAUNCH = True


def _int_spec(value):
    # what Triton specialises an int argument on: == 1, divisibility by 16, 32-bit range
    return (value == 1, value % 16 == 0, -2**31 <= value < 2**31)


@functools.lru_cache(maxsize=64)
def inv_scale_split(sm_scale, dtype):
    """1 / sm_scale as hi + lo, both representable in ``dtype`` and >= 0 (hi rounded down), for
    a bias added on the tensor cores (bias * hi + bias * lo, exact products summed in fp32).
    Returns (hi, lo, bias rows used). Shared with :mod:`.flash`'s Triton forward."""
    inv = 1.0 / sm_scale
    hi_t = torch.tensor([inv], dtype=torch.float64).to(dtype)
    if float(hi_t) > inv:  # step down one ulp (positive values: integer view minus one)
        hi_t = (hi_t.view(torch.int16) - 1).view(dtype)
    hi = float(hi_t)
    lo = float(torch.tensor([inv - hi], dtype=torch.float64).to(dtype))
    return hi, lo, (2 if lo > 0 else 1)


def _bias_tc(q, mask, mask_flags, sm_scale):
    """Whether the mask is added on the tensor cores (BIAS_TC): a (B|1, H|1, 1, Lk) row, bool
    or additive in q's dtype (the tile is built in q's dtype: a wider bias would be rounded).
    ``ADAATTN_SM90_BIAS_TC=0`` turns it off."""
    has_mask, is_bool, rb, cb = mask_flags
    return (has_mask and rb and not cb and (is_bool or mask.dtype == q.dtype)
            and inv_scale_split(sm_scale, q.dtype)[0] > 0
            and os.environ.get("ADAATTN_SM90_BIAS_TC", "1") not in ("0", "false", "False", "no"))


@triton.jit
def _bias_tile_kernel(Mask, Tile, Lk, nh, stride_b, stride_h, stride_k, IS_BOOL: tl.constexpr,
                      ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """One (batch, head) row of keys, BLOCK of them a program: Tile[b, h, j, :] = (bias of key
    j) in the first ROWS columns, zeros in the rest (see :func:`_bias_tile`)."""
    bh = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < Lk
    row = tl.load(Mask + (bh // nh) * stride_b + (bh % nh) * stride_h + offs * stride_k,
                  mask=in_range, other=0)
    if IS_BOOL:   # (a bool mask arrives as bool or as its uint8 view: compare as ints)
        bias = tl.where(row.to(tl.int32) != 0, 0.0, float("-inf"))
    else:         # (an additive row is in the tile's dtype already: _bias_tc asks for it)
        bias = row.to(tl.float32)
    cols = tl.arange(0, 16)
    tile = tl.where(cols[None, :] < ROWS, bias[:, None], 0.0).to(Tile.dtype.element_ty)
    tl.store(Tile + (bh * Lk + offs[:, None]) * 16 + cols[None, :], tile,
             mask=in_range[:, None])


_TILE_BLOCK = 256
# Bound launches of the tile kernel by everything its non-tensor arguments follow from; off
# for the process after a failure (the torch ops build the tile then).
_TILE_LAUNCHES: dict = {}
_TILE_KERNEL_ON = True


def _bias_tile(mask, shape, mask_strides, is_bool, dtype, rows):
    """The (B|1, H|1, Lk, 16) tile read next to K for BIAS_TC: column 0 (and 1 if ``rows`` is
    2) the bias of key j (a bool mask: 0 / -inf), zeros elsewhere. ``mask``: the caller's row
    mask, broadcastable to ``shape`` = (B, Hq, Lq, Lk), read through ``mask_strides`` (those of
    its expansion to ``shape``: 0 on broadcast dims); bool ones as they are or as their uint8
    view.

    This runs once per mask value (see :func:`_shared_bias_tile`), at the first site of a
    forward: on CUDA one kernel (:func:`_bias_tile_kernel`, a bound launch after its first),
    because the torch ops it took before (where, cast, pad: four launches through the
    dispatcher) cost 230 us of host time a BERT-base forward on the H100 host, 6 % of the
    forward where that host is the bound (2026-11-27, ``host_breakdown.py --fine``)."""
    global _TILE_KERNEL_ON
    if mask.is_cuda and _TILE_KERNEL_ON:
        try:
            return _bias_tile_by_kernel(mask, shape, mask_strides, is_bool, dtype, rows)
        except Exception as exc:   # the ops below build the same tile
            _TILE_KERNEL_ON = False
            warnings.warn(f"flash_hopper: the bias tile kernel failed ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); building tiles with torch ops from now on")
    return _bias_tile_by_ops(mask, shape, mask_strides, is_bool, dtype, rows)


def _bias_tile_by_kernel(mask, shape, mask_strides, is_bool, dtype, rows):
    """:func:`_bias_tile` in one launch of :func:`_bias_tile_kernel` (any device triton runs
    on: the CPU under the interpreter in tests)."""
    B, H, _, Lk = shape
    sb, sh, _, sk = mask_strides
    nb, nh = (B if sb else 1), (H if sh else 1)
    tile = torch.empty((nb, nh, Lk, 16), dtype=dtype, device=mask.device)
    key = (mask.dtype, mask.device, mask.data_ptr() % 16 == 0, dtype, nb, nh, Lk, sb, sh, sk,
           bool(is_bool), rows)
    bound = _TILE_LAUNCHES.get(key)
    if bound is not None:
        bound(mask, tile)
        return tile
    args = (mask, tile, Lk, nh, sb, sh, sk)
    consts = dict(IS_BOOL=bool(is_bool), ROWS=rows, BLOCK=_TILE_BLOCK)
    grid = lambda meta: (triton.cdiv(Lk, meta["BLOCK"]), nb * nh)  # noqa: E731
    if mask.is_cuda:
        launch.launch(_bias_tile_kernel, grid, args, consts, mask.device)
        bound = launch.bind(_bias_tile_kernel, grid, args, consts, mask.device)
        if bound is not None:
            if len(_TILE_LAUNCHES) >= 64:
                _TILE_LAUNCHES.clear()
            _TILE_LAUNCHES[key] = bound
    else:
        _bias_tile_kernel[grid](*args, **consts)
    return tile


def _bias_tile_by_ops(mask, shape, mask_strides, is_bool, dtype, rows):
    """:func:`_bias_tile` in torch ops (where the kernel does not run)."""
    B, H, _, Lk = shape
    nb, nh = (B if mask_strides[0] else 1), (H if mask_strides[1] else 1)
    full = mask.expand(shape)
    if is_bool:
        b = torch.where(full[:nb, :nh, 0, :].view(torch.bool), 0.0, float("-inf")).to(dtype)
        return torch.nn.functional.pad(b.unsqueeze(-1).expand(*b.shape, rows), (0, 16 - rows))
    sb, sh, _, sk = full.stride()
    tile = torch.zeros((nb, nh, Lk, 16), dtype=dtype, device=mask.device)
    tile.narrow(3, 0, rows).copy_(full.as_strided((nb, nh, Lk, rows), (sb, sh, sk, 0)))
    return tile


# Bias tiles built this graph call, by (mask group, bias arguments): (weakref to the mask,
# its version, the tile). See _shared_bias_tile.
_TILES: dict = {}
_TILES_LIMIT = 16


def _shared_bias_tile(mask, bias, group, owner=None):
    """:func:`_bias_tile` of ``mask``, built once for every site of ``group`` (the sites of one
    graph that read the same mask node, so one value per graph call; the compiler names them)
    as long as the mask is the same tensor object at the same version: BERT's 12 layers read
    one padding mask, and building the tile costs a few ops of host time a call (host-bound at
    L = 4096 on the H100: 6.5 ms a forward against stock's 3.5). The group, not the tensor
    alone, keys it: Inductor may reuse a dead mask's buffer object for another mask, written by
    its kernels without a version bump. Not shared while a CUDA graph is captured (a replay
    must rebuild it) nor for inference tensors (no version counter). ``owner``: the tensor
    the caller was given, if ``mask`` is a view made for this call (a bool mask's uint8 view:
    a new object every call); views share its version counter."""
    owner = mask if owner is None else owner
    if owner.is_inference() or (owner.is_cuda and torch.cuda.is_current_stream_capturing()):
        return _bias_tile(mask, *bias)
    key = (group, bias)
    entry = _TILES.get(key)
    version = owner._version
    if entry is not None and entry[0]() is owner and entry[1] == version:
        return entry[2]
    tile = _bias_tile(mask, *bias)
    if len(_TILES) >= _TILES_LIMIT:
        _TILES.clear()

    def drop(ref, key=key):   # the mask is gone (its graph call ended): so is the tile
        entry = _TILES.get(key)
        if entry is not None and entry[0] is ref:
            del _TILES[key]
    _TILES[key] = (weakref.ref(owner, drop), version, tile)
    return tile


# The kernel's constexpr parameters, in order (the launcher key holds their values).
_CONSTEXPRS = ("HEAD_D", "BLOCK_N", "NUM_WG", "STAGES", "CAUSAL", "HAS_MASK", "MASK_BOOL",
               "MASK_RB", "MASK_CB", "PINGPONG", "PRODUCER_REGS", "CONSUMER_REGS", "QBUF",
               "PAIRED", "BIAS_TC", "TURNOVER", "O_TMA")
_BIAS_TC_AT, _O_TMA_AT = _CONSTEXPRS.index("BIAS_TC"), _CONSTEXPRS.index("O_TMA")

# Shared memory a program may have on sm90 (227 KB), less a margin for the mbarriers.
_SMEM_BYTES = 227 * 1024 - 1024


def _o_tma(head_d, block_n, num_wg, stages, qbuf, bias_tc):
    """How O leaves (see _epilogue): 1 through a shared-memory slab of its own and a bulk
    copy, where its (NUM_WG x 64 x D) slabs fit next to the Q slots, the K/V ring
    and the bias tiles (2-byte elements); 2 staged in the tile's finished Q slot where they do
    not (a bias on the tensor cores: 8 KB over), with two Q slots (with one, the next tile's
    Q would wait for this tile's O); 0 from registers. Staged in the Q slot, the warpgroup
    waits for the copy engine to read O (the slot goes back to the producer): with a bias at
    causal 2k / 4k / 8k / 16k 497 / 548 / 578 / 609 TFLOP/s against 463 / 512 / 555 / 587 from
    registers, unmasked 2-6 % slower than a slab of its own (H100, bf16). At D = 64 only on
    two warpgroups (causal below 5k), where the 240-register consumers do not spill: causal
    2k / 3k / 4k 406.9 / 430.6 / 448.7 TFLOP/s against 394.0 / 422.5 / 451.0 from registers
    (H100, bf16). On three 160-register warpgroups it spilled (88 bytes of stack) and measured
    even unmasked, with a padding bias 13 % slower (H100, 2k / 8k: 396 / 445 TFLOP/s against
    457 / 505). ``ADAATTN_SM90_O_TMA=0`` turns it off, ``=q`` stages O in the Q slot wherever
    it may, ``=force`` takes it on three warpgroups too (A/B runs)."""
    choice = os.environ.get("ADAATTN_SM90_O_TMA", "1").strip()
    if choice in ("0", "false", "False", "no"):
        return 0
    if head_d < 128 and num_wg > 2 and choice != "force":
        return 0
    q = qbuf * num_wg * 64 * head_d
    ring = stages * (2 * block_n * head_d + (block_n * 16 if bias_tc else 0))
    o = num_wg * 64 * head_d
    if choice != "q" and 2 * (q + ring + o) <= _SMEM_BYTES:
        return 1
    return 2 if qbuf >= 2 else 0


# Per-tile cost beyond its key tiles (prologue, epilogue), in key tiles, for the balance.
_TILE_OVERHEAD = 0.5


@functools.lru_cache(maxsize=64)
def _causal_schedule(bh, n_m, programs, block_m, block_n, lq, lk, balance=True):
    """The work tiles (``b_h * n_m + query block``) of each program of a persistent causal
    launch, as a (programs, W) int32 table whose rows end in two -1s.

    Query block r of a head needs ceil(min((r + 1) block_m, lk) / block_n) key tiles. The
    head's blocks r and n_m - 1 - r make a unit of n_m + 1 key tiles (the middle block of an
    odd n_m is a unit alone), and the units go round robin over the programs, head after head
    (programs running at the same time share a head's K / V in L2), heavier block first. But
    the units do not divide evenly over the programs: with 2048 units on 132 SMs, 68 programs
    ran 16 and the rest 15 (3 % idle at every causal length). So the last one to two rounds of
    units are split into their blocks and dealt out heaviest first, each to the program with
    the least work so far (longest processing time first): the loads then end within a key
    tile or so of each other. ``balance=False`` (``ADAATTN_SM90_BALANCE=0``, A/B runs): the
    round robin over the pairs to the end, as before."""
    def cost(r):
        return -(-min((r + 1) * block_m, lk) // block_n) + _TILE_OVERHEAD
    n_pairs = (n_m + 1) // 2
    n_units = bh * n_pairs
    if not balance:
        rows = [[] for _ in range(programs)]
        for uu in range(n_units):
            rr, base = uu % n_pairs, (uu // n_pairs) * n_m
            rows[uu % programs] += ([base + n_m - 1 - rr, base + rr] if n_m - 1 - rr != rr
                                    else [base + rr])
        width = max(len(x) for x in rows) + 2
        return torch.tensor([x + [-1] * (width - len(x)) for x in rows], dtype=torch.int32)
    static_rounds = max(0, n_units // programs - 1)
    n_static = static_rounds * programs
    cost_of = torch.tensor([cost(m) for m in range(n_m)], dtype=torch.float64)
    pair_cost = [cost(n_m - 1 - r) + (cost(r) if n_m - 1 - r != r else 0.0)
                 for r in range(n_pairs)]
    if len(set(pair_cost)) == 1:
        # units of equal work: round robin, (programs, rounds, heavy / light) -> rows
        u = torch.arange(n_static).view(static_rounds, programs).t()
        r = u % n_pairs
        static = torch.stack(((u // n_pairs) * n_m + n_m - 1 - r, (u // n_pairs) * n_m + r),
                             -1).reshape(programs, -1)
    else:
        # (an odd n_m's lone middle block, or BLOCK_M != BLOCK_N): each unit in turn to the
        # program with the least work so far, as a round robin would but for the work
        rows = [[] for _ in range(programs)]
        heap = [(0.0, p) for p in range(programs)]
        for uu in range(n_static):
            rr = uu % n_pairs
            least, p = heapq.heappop(heap)
            base = (uu // n_pairs) * n_m
            rows[p] += [base + n_m - 1 - rr, base + rr] if n_m - 1 - rr != rr else [base + rr]
            heapq.heappush(heap, (least + pair_cost[rr], p))
        longest = max((len(x) for x in rows), default=0)
        static = torch.tensor([x + [-1] * (longest - len(x)) for x in rows],
                              dtype=torch.int64).view(programs, longest)
    lengths = (static >= 0).sum(1).tolist()
    load = torch.where(static >= 0, cost_of[(static % n_m).clamp(min=0)], 0.0).sum(1).tolist()
    # the rest block by block, heaviest first, each to the least loaded program
    tail = [(uu, m) for uu in range(static_rounds * programs, n_units)
            for rr in [uu % n_pairs]
            for m in ((n_m - 1 - rr, rr) if n_m - 1 - rr != rr else (rr,))]
    tail.sort(key=lambda t: -cost(t[1]))   # (stable: a head's blocks stay together)
    extra = [[] for _ in range(programs)]
    heap = [(load[p], p) for p in range(programs)]
    heapq.heapify(heap)
    for uu, m in tail:
        least, p = heapq.heappop(heap)
        extra[p].append((uu // n_pairs) * n_m + m)
        heapq.heappush(heap, (least + cost(m), p))
    width = max(n + len(e) for n, e in zip(lengths, extra)) + 2
    table = torch.full((programs, width), -1, dtype=torch.int32)
    table[:, :static.shape[1]] = static.to(torch.int32)
    for p, (n, e) in enumerate(zip(lengths, extra)):
        if e:
            table[p, n:n + len(e)] = torch.tensor(e, dtype=torch.int32)
    return table


# The schedule tables on their devices, and a one-element stand-in for launches without one:
# never dropped (a CUDA graph may have captured a launch that reads one; a table holds an
# int32 per work tile and two per program, one table per causal shape).
_SCHEDULES: dict = {}


def _pack_bits(n_m, hq):
    """Field widths (query block, head) of a packed schedule entry."""
    return (n_m - 1).bit_length(), (hq - 1).bit_length()


def _packs(b, hq, n_m):
    """Whether (b, h, query block) packs into a non-negative int32."""
    return (b - 1).bit_length() + sum(_pack_bits(n_m, hq)) <= 31


def _pack_schedule(table, n_m, hq):
    """A schedule table's work tiles (b_h * n_m + query block) as (b << (hb + mb)) |
    (h << mb) | block, -1s kept: the kernel decodes them with shifts (see _tile)."""
    mb, hb = _pack_bits(n_m, hq)
    t = table.to(torch.int64)
    bh, m = t.clamp(min=0) // n_m, t.clamp(min=0) % n_m
    packed = ((bh // hq) << (mb + hb)) | ((bh % hq) << mb) | m
    return torch.where(t >= 0, packed, -1).to(torch.int32)


def _schedule_on(device, key):
    """``key``: (_causal_schedule's arguments, Hq), or () for launches without a table."""
    tables = _SCHEDULES.get((device, key))
    if tables is None:
        host = (_pack_schedule(_causal_schedule(*key[0]), key[0][1], key[1]) if key
                else torch.full((1,), -1, dtype=torch.int32))
        # (from pinned memory, kept alive with the copy: a copy made while a CUDA graph is
        # being captured is replayed from that buffer)
        pinned = host.pin_memory()
        tables = _SCHEDULES[(device, key)] = (
            pinned, pinned.to(f"cuda:{device}", non_blocking=True))
    return tables[1]


def _launch_plan(q, k, mask, mask_strides, mask_flags, is_causal, sm_scale, out, lse):
    """-> (config, programs, the int arguments, the float arguments after qk_scale, the
    constexpr values, the launcher key, the device index)."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    has_mask, is_bool, rb, cb = mask_flags
    cfg = config(D, mask_kind(has_mask, rb, cb), is_causal, Lq)
    block_n, num_wg, stages, pingpong, persistent, pregs, cregs, qbuf, turnover = cfg
    Lk = k.shape[2]
    # two key loops only where every tile runs the first one (see _consumer)
    if turnover == 1 and Lk < 2 * block_n:
        turnover = 2
    n_m = -(-Lq // (64 * num_wg))
    paired = bool(is_causal) and persistent and _packs(B, Hq, n_m)
    units = B * Hq * n_m   # work tiles
    device = q.device.index if q.device.index is not None else torch.cuda.current_device()
    programs = min(units, _sm_count(device)) if persistent else units
    schedule = (((B * Hq, n_m, programs, 64 * num_wg, block_n, Lq, Lk,
                  os.environ.get("ADAATTN_SM90_BALANCE", "1") not in ("0", "false", "False", "no")),
                 Hq) if paired else ())
    bias_tc = _bias_tc(q, mask, mask_flags, sm_scale)
    hi, lo, _ = inv_scale_split(sm_scale, q.dtype) if bias_tc else (0.0, 0.0, 0)
    kb_nb = B if mask_strides[0] else 1
    kb_nh = Hq if mask_strides[1] else 1
    o_tma = _o_tma(D, block_n, num_wg, stages, qbuf, bias_tc)
    sched_w = _causal_schedule(*schedule[0]).shape[1] if paired else 0
    # (paired: the n_m and Hq arguments carry the packed entries' field widths, see _tile)
    tile_m, tile_h = _pack_bits(n_m, Hq) if paired else (n_m, Hq)
    ints = (out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
            *mask_strides, tile_m, units, tile_h, Hq // Hkv, kb_nb, kb_nh, sched_w)
    consts = (D, block_n, num_wg, stages, bool(is_causal), has_mask, is_bool, rb, cb, pingpong,
              pregs, cregs, qbuf, paired, bias_tc, turnover, o_tma)
    key = (q.dtype, device, consts, mask.dtype, mask.data_ptr() % 16 == 0,
           tuple(_int_spec(x) for x in ints))
    return cfg, programs, ints, (hi, lo), consts, key, device, schedule


def forward(q, k, v, mask, mask_strides, mask_flags, is_causal, sm_scale, out, lse):
    """Launch the sm90 forward. ``mask`` / ``mask_strides`` / ``mask_flags`` come from
    ``flash._prep_mask`` (``mask_flags = (has_mask, is_bool, row_bcast, col_bcast)``);
    ``out`` (B, Hq, Lq, D) and ``lse`` (B, Hq, Lq) are written."""
    global _FAST_LAUNCH
    Lq, D = q.shape[2], q.shape[3]
    Lk = k.shape[2]
    cfg, programs, ints, floats, consts, key, device, schedule = _launch_plan(
        q, k, mask, mask_strides, mask_flags, is_causal, sm_scale, out, lse)
    bias_tc, o_tma = consts[_BIAS_TC_AT], consts[_O_TMA_AT]
    sched = _schedule_on(device, schedule)
    bk = None
    if bias_tc:
        # (a bool mask comes here as its uint8 view, to the bound path as it is: the tile kernel
        # gets it as bool on both, one specialisation, which a prebuild job then builds: bert-sdpa
        # compiled a second one, 0.3 s, inside its first call on the H100)
        tile_mask = mask.view(torch.bool) if mask_flags[1] else mask
        bk = _bias_tile(tile_mask, (q.shape[0], q.shape[1], Lq, Lk), mask_strides, mask_flags[1],
                        q.dtype, inv_scale_split(sm_scale, q.dtype)[2])
    kernel = _LAUNCHERS.get(key) if _FAST_LAUNCH else None
    if kernel is not None:
        args = (_HostDescriptor(q), _HostDescriptor(k), _HostDescriptor(v),
                None if bk is None else _HostDescriptor(bk),
                _HostDescriptor(out) if o_tma else None, out, lse, mask, sched,
                *ints, Lq, Lk, sm_scale * _LOG2E, *floats, *consts)
        try:
            launch.run_compiled(kernel, (programs, 1, 1), device, args)
            return out, lse
        except Exception as exc:  # another triton's launcher API: the checked path from now on
            _FAST_LAUNCH = False
            warnings.warn(f"flash_hopper: direct launch failed ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); launching through triton from now on")
    block_n = cfg[0]
    kernel = _attn_fwd_sm90[(programs,)](
        _descriptor(q, 64, D), _descriptor(k, block_n, D), _descriptor(v, block_n, D),
        None if bk is None else _descriptor(bk, block_n, 16),
        _descriptor(out, 64, D) if o_tma else None, out, lse, mask, sched, *ints, Lq, Lk,
        sm_scale * _LOG2E, *floats, **dict(zip(_CONSTEXPRS, consts)), num_warps=4)
    if _FAST_LAUNCH and hasattr(kernel, "packed_metadata") and hasattr(kernel, "function"):
        _LAUNCHERS[key] = kernel
    return out, lse


class BoundForward:
    """:func:`forward` for one call signature with everything but the tensors fixed (see
    :func:`bind`): ``bound(q, k, v, mask, out, lse)``; ``mask`` as the caller passed it (bool
    masks as their uint8 view). Where triton's launcher allows (:func:`launch.c_launcher`) it
    launches through the C launcher with the descriptors' tensor maps kept by address."""
    __slots__ = ("kernel", "programs", "device", "layouts", "tail", "bias", "c_launch",
                 "tile_layout")

    def __init__(self, kernel, programs, device, layouts, tail, bias, c_launch=None):
        self.kernel, self.programs, self.device = kernel, programs, device
        self.layouts, self.tail, self.bias = layouts, tail, bias
        self.c_launch = c_launch
        self.tile_layout = None   # the bias tile's (shape, strides), from its first call

    @property
    def reads_mask(self) -> bool:
        """Whether the kernel reads the mask argument (with a bias tile it reads the tile, which
        is built from the mask here: a bool mask may then come as it is, not as its uint8
        view, one op less a call)."""
        return self.bias is None

    def __call__(self, q, k, v, mask, out, lse, mask_group=None, mask_owner=None):
        (shape_q, strides_q), (shape_k, strides_k), (shape_v, strides_v), o_layout = self.layouts
        tile = None
        if self.bias is not None:
            tile = (_shared_bias_tile(mask, self.bias, mask_group, mask_owner)
                    if mask_group is not None else _bias_tile(mask, *self.bias))
        c = self.c_launch
        if c is not None and launch._C_LAUNCH and launch.hooks() == launch._NO_HOOKS:
            desc = c.descriptor
            if tile is None:
                bk = (None,)
            else:
                layout = self.tile_layout
                if layout is None or layout[0] != tile.shape:
                    layout = self.tile_layout = (tile.shape, tma_strides(tile))
                bk = desc(3, tile, list(layout[0]), layout[1])
            c((self.programs, 1, 1), launch.current_stream(self.device),
              (*desc(0, q, shape_q, strides_q), *desc(1, k, shape_k, strides_k),
               *desc(2, v, shape_v, strides_v), *bk,
               *((None,) if o_layout is None else desc(4, out, *o_layout)),
               out, lse, mask, *self.tail))
            return
        bk = None if tile is None else _HostDescriptor(tile)
        do = None if o_layout is None else _HostDescriptor(out, *o_layout)
        args = (_HostDescriptor(q, shape_q, strides_q), _HostDescriptor(k, shape_k, strides_k),
                _HostDescriptor(v, shape_v, strides_v), bk, do, out, lse, mask, *self.tail)
        launch.run_compiled(self.kernel, (self.programs, 1, 1), self.device, args)


def bind(q, k, v, mask, mask_strides, mask_flags, is_causal, sm_scale, out, lse):
    """A :class:`BoundForward` for the specialisation of these arguments once :func:`forward`
    has launched it directly, else None. The caller keys it on what fixes every non-tensor
    argument (shapes, strides, dtypes, alignment, mask layout, causal, scale)."""
    if not _FAST_LAUNCH:
        return None
    _, programs, ints, floats, consts, key, device, schedule = _launch_plan(
        q, k, mask, mask_strides, mask_flags, is_causal, sm_scale, out, lse)
    kernel = _LAUNCHERS.get(key)
    if kernel is None:
        return None
    layouts = (*((list(t.shape), tma_strides(t)) for t in (q, k, v)),
               (list(out.shape), tma_strides(out)) if consts[_O_TMA_AT]
               else None)
    tail = (_schedule_on(device, schedule), *ints, q.shape[2], k.shape[2], sm_scale * _LOG2E,
            *floats, *consts)
    bias = None
    if consts[_BIAS_TC_AT]:   # the bias tile is built from each call's mask
        bias = ((q.shape[0], q.shape[1], q.shape[2], k.shape[2]), mask_strides, mask_flags[1],
                q.dtype, inv_scale_split(sm_scale, q.dtype)[2])
    c = launch.c_launcher(kernel)
    if c is not None and c.descriptor_positions != frozenset(
            (0, 1, 2) + ((3,) if bias is not None else ()) + ((4,) if consts[_O_TMA_AT] else ())):
        c = None   # (not the descriptors this module passes: triton's own launch)
    return BoundForward(kernel, programs, device, layouts, tail, bias, c)
