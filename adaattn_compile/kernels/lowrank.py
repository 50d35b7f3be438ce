"""Low-rank attention in Triton: softmax linearised around the mean key, with an exact band.

Method. Write each key as ``k_j = mu + d_j`` with ``mu`` the mean key of the sequence. Softmax
over keys is invariant to the per-row constant ``exp(scale * q.mu)``, so the weights are
``exp(x_ij)`` with ``x_ij = scale * q_i . d_j``. Where attention is diffuse the ``x_ij`` are
small and ``exp(x) ~ 1 + x``: the weight matrix becomes ``1 + scale * Q D^T``, of rank
``D + 1`` -- the numerator ``sum_j (1 + x_ij) v_j = vsum + scale * q_i^T (D^T V)`` and the
denominator ``n + scale * q_i . sum_j d_j`` come from a ``(D + 1) x Dv`` state, at O(L D Dv)
instead of O(L^2 D). Each 64-query block takes its own key block (the local window, where
real heads concentrate) exactly, with ``exp``; the whole sequence's state less that block's
linear terms covers the rest. Causal: each query block is exact over its 256-key chunk up to
the diagonal (masked element-wise) and linear over the chunks before it, from a prefix sum of
the chunk states, so no query ever reads a later key.

Why this method (measured in float64 by ``scripts/lowrank_methods.py``, ``benchmarks/
RESULTS.md`` sixteenth session): on diffuse heads the linearisation's error is second order in
the score spread, where 64 block-mean landmarks (pooled keys) lose the first-order term and
64-landmark Nystrom's pseudo-inverse amplifies errors: on all-MiniLM-L6-v2's best-fitting head
0.053 against 0.26 and 1.7, on random heads at score spread 0.3 0.006 against 0.093 and 1.1.
The exact band lowers the error of real heads (which attend locally) by up to 2x. A
second-order term in K's top-8 principal subspace did not help on those heads nor on random
ones, for 30% more state and an eigen-solve per head.

The kernels compute; which heads keep the result is decided on the device from sampled exact
rows (:mod:`adaattn_compile.rank` drives them):

* :func:`key_sums` (per chunk of keys: ``K^T V``, ``sum K``, ``sum V``; one pass over K and V)
  and :func:`rest_states` (mean key, centred states, the centred Gram of K from <= 1024 keys);
* :func:`lowrank_forward` -- ``(out, lse, (rating, worst row), (gram, mu, spec))`` with each query
  block's worst row by ``scale^2 q^T G q`` (what the linearisation drops);
* :func:`check_rows` -- exact sampled rows, each head's error and entropy, its keys'
  effective rank, the decision and the budget for the calls until the next check; :func:`exact_rows` the rows alone (tests);
* :func:`exact_heads` -- exact attention over the heads that do not keep the low-rank rows.

Layout as the dense kernels: ``q (B, Hq, Lq, D)``, ``k (B, Hkv, Lk, D)``, ``v (B, Hkv, Lk, Dv)``,
read through their strides, GQA by ``h // (Hq // Hkv)``. fp32 accumulation and state.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import launch

__all__ = ["supports", "key_sums", "rest_states", "lowrank_forward", "check_rows", "exact_rows",
           "exact_heads", "BLOCK", "rank_of"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_MAX_HEAD_DIM = 256
# Key block = query block: the exact band of query block i is key block i, so causal blocks
# line up with the diagonal. 64 keeps the fp32 state tile of D = 256 in registers.
BLOCK = 64
# fp32 operands (the state, fp32 inputs): TF32 tensor cores on the GPU; the router's sampled
# exact rows measure the whole path's error, rounding included. 16-bit inputs multiply as they
# are, fp32 sums.
_PREC = "ieee" if _INTERPRET else "tf32"


def rank_of(head_dim: int) -> int:
    """Rank of the linearised weight matrix outside the exact band: D + 1."""
    return head_dim + 1


@triton.jit
def _key_chunk_kernel(K, V, KV, KSUM, VSUM,
                      stride_kb, stride_kh, stride_kn, stride_kd,
                      stride_vb, stride_vh, stride_vn, stride_vd,
                      H, LK, D, DV, n_chunks, keys_per_chunk,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DV_POW: tl.constexpr,
                      PREC: tl.constexpr):
    """Sums over one chunk of keys of one kv head, for one slice of D (all of D up to 128):
    K^T V, sum K and sum V. Registers hold the sums; no atomics."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    dc = tl.program_id(2)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    offs_dc = dc * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, DV_POW)
    dc_ok = offs_dc < D
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    kv = tl.zeros((BLOCK_D, DV_POW), dtype=tl.float32)
    ksum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    vsum = tl.zeros((DV_POW,), dtype=tl.float32)
    start = chunk * keys_per_chunk
    end = tl.minimum(start + keys_per_chunk, LK)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        kc = tl.load(k_base + offs_n[:, None] * stride_kn + offs_dc[None, :] * stride_kd,
                     mask=n_ok[:, None] & dc_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        # products of the inputs' own values, fp32 sums
        kv = tl.dot(tl.trans(kc), v, kv, input_precision=PREC)
        ksum += tl.sum(kc.to(tl.float32), 0)
        vsum += tl.sum(v.to(tl.float32), 0)
    part = bh.to(tl.int64) * n_chunks + chunk
    tl.store(KV + part * D * DV + offs_dc[:, None] * DV + offs_dv[None, :], kv,
             mask=dc_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(KSUM + part * D + offs_dc, ksum, mask=dc_ok)
    if dc == 0:
        tl.store(VSUM + part * DV + offs_dv, vsum, mask=offs_dv < DV)


@triton.jit
def _lowrank_fwd_kernel(Q, K, V, MU, RC_HI, RC_LO, RV, RD, RN, GRAM, Out, LSE, M2MAX, M2ROW,
                        stride_qb, stride_qh, stride_qm, stride_qd,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd,
                        stride_ob, stride_oh, stride_om, stride_od,
                        H, HKV, GROUPS, LQ, LK, D, DV, n_kblocks, n_chunks, keys_per_chunk,
                        sm_scale,
                        CAUSAL: tl.constexpr, BLOCK: tl.constexpr, D_POW: tl.constexpr,
                        BLOCK_DV: tl.constexpr, BLOCK_G: tl.constexpr, SPLIT: tl.constexpr,
                        PREC: tl.constexpr):
    """One query block of one query head, one chunk of Dv. Exact keys: non-causal, the band
    block; causal, from the start of the block's key chunk through the diagonal block. The
    rank-(D+1) linear term covers the rest: non-causal, the whole sequence's state less the
    band's own linear terms; causal, the prefix state of the chunks before. The first Dv
    chunk also rates each row by its mean squared score deviation ``scale^2 q^T G q / Lk``
    (G the centred Gram of K; +inf where the row's linearised denominator is not positive):
    the size of what the linearisation drops. It writes the block's worst row and its rating,
    from which the router picks the rows it checks."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    dvc = tl.program_id(2)
    off_b = (bh // H).to(tl.int64)
    off_h = bh % H
    off_hk = (off_h // GROUPS).to(tl.int64)
    kv_bh = off_b * HKV + off_hk

    offs_m = i * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_POW)
    offs_dv = dvc * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m_ok = offs_m < LQ
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    q = tl.load(Q + off_b * stride_qb + off_h.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    mu = tl.load(MU + kv_bh * D + offs_d, mask=d_ok, other=0.0)
    if CAUSAL:
        chunk = (i * BLOCK) // keys_per_chunk
        lo = chunk * keys_per_chunk
        hi = tl.minimum((i + 1) * BLOCK, LK)
    else:
        chunk = 0
        lo = tl.minimum(i, n_kblocks - 1) * BLOCK
        hi = tl.minimum(lo + BLOCK, LK)
    state = kv_bh * n_chunks + chunk
    dsum = tl.load(RD + state * D + offs_d, mask=d_ok, other=0.0)
    q32 = q.to(tl.float32)
    # scale * q . mu: the per-row constant every weight is taken relative to
    shift = tl.sum(q32 * mu[None, :], 1) * sm_scale
    q_dsum = tl.sum(q32 * dsum[None, :], 1) * sm_scale
    q_base = Q + off_b * stride_qb + off_h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm
    m2 = tl.zeros((BLOCK,), dtype=tl.float32)
    if dvc == 0:
        for g0 in tl.static_range(0, D_POW, BLOCK_G):
            offs_g = g0 + tl.arange(0, BLOCK_G)
            g_ok = offs_g < D
            g = tl.load(GRAM + kv_bh * D * D + offs_d[:, None] * D + offs_g[None, :],
                        mask=d_ok[:, None] & g_ok[None, :], other=0.0)
            q_g = tl.load(q_base + offs_g[None, :] * stride_qd,
                          mask=m_ok[:, None] & g_ok[None, :], other=0.0).to(tl.float32)
            m2 += tl.sum(tl.dot(q.to(g.dtype), g, input_precision=PREC) * q_g, 1)
        m2 = m2 * (sm_scale * sm_scale)

    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    # the row max starts at 0: the linear part's weights are O(1), a max below 0 would
    # scale them up
    m_i = tl.zeros((BLOCK,), dtype=tl.float32)
    l_i = tl.zeros((BLOCK,), dtype=tl.float32)
    acc = tl.zeros((BLOCK, BLOCK_DV), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK):
        offs_n = n0 + tl.arange(0, BLOCK)
        n_ok = offs_n < hi
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        x = tl.dot(q, tl.trans(k), input_precision=PREC) * sm_scale - shift[:, None]
        keep = n_ok[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(keep, x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        if not CAUSAL:
            # the whole sequence's linear terms are added below: take the band's off here,
            # in the same product (weight exp(x - m) - exp(-m) (1 + x))
            p = p - tl.where(keep, tl.exp(-m_new)[:, None] * (1.0 + x), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    # linear term over the rest: n + scale q.dsum, vsum + scale q^T C. C / Lk is stored as a
    # 16-bit pair (hi + lo: ~16 significant bits) so that q^T C runs on tensor cores with the
    # state tile in 16 bits
    c_ptrs = state * D * DV + offs_d[:, None] * DV + offs_dv[None, :]
    c_mask = d_ok[:, None] & dv_ok[None, :]
    c_hi = tl.load(RC_HI + c_ptrs, mask=c_mask, other=0.0)
    q_dot = q.to(c_hi.dtype)
    qc = tl.dot(q_dot, c_hi, input_precision=PREC)
    if SPLIT:
        qc = tl.dot(q_dot, tl.load(RC_LO + c_ptrs, mask=c_mask, other=0.0), qc,
                    input_precision=PREC)
    vsum = tl.load(RV + state * DV + offs_dv, mask=dv_ok, other=0.0)
    n_rest = tl.load(RN + state)
    lin_num = vsum[None, :] + qc * (sm_scale * LK)
    lin_den = n_rest + q_dsum
    e = tl.exp(-m_i)
    acc += e[:, None] * lin_num
    l_i += e * lin_den

    # a row whose linearised denominator is not positive has no meaningful output: NaN, which
    # the router's check refuses (the row's m2 is +inf, so the check samples it)
    usable = l_i > 0
    out = acc / tl.where(usable, l_i, float("nan"))[:, None]
    tl.store(Out + off_b * stride_ob + off_h.to(tl.int64) * stride_oh
             + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=m_ok[:, None] & dv_ok[None, :])
    if dvc == 0:
        lse = tl.where(usable, shift + m_i + tl.log(l_i), float("nan"))
        tl.store(LSE + bh.to(tl.int64) * LQ + offs_m, lse, mask=m_ok)
        m2 = tl.where(usable, m2, float("inf"))
        m2 = tl.where(m_ok, m2, float("-inf"))
        worst = tl.argmax(m2, 0)
        blocks = tl.num_programs(0)
        tl.store(M2MAX + bh.to(tl.int64) * blocks + i, tl.max(m2, 0))
        tl.store(M2ROW + bh.to(tl.int64) * blocks + i, (i * BLOCK + worst).to(tl.int32))


def supports(q, k, v, attn_mask, dropout_p, is_causal) -> str | None:
    """Why the low-rank kernel can't take the call (None if it can)."""
    if attn_mask is not None:
        return "a mask (the low-rank path takes none or causal)"
    if dropout_p > 0:
        return "dropout"
    if q.dim() != 4:
        return f"{q.dim()}-D inputs"
    if is_causal and q.shape[-2] != k.shape[-2]:
        return "causal with Lq != Lk"
    if max(q.shape[-1], v.shape[-1]) > _MAX_HEAD_DIM:
        return f"head dim > {_MAX_HEAD_DIM}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype}"
    if q.device.type != "cuda" and not (_INTERPRET and q.device.type == "cpu"):
        return f"device {q.device.type}"
    if q.dtype == torch.float32 and q.device.type == "cuda" and q.shape[-1] > 64:
        # its tiles are sized for 16-bit inputs: fp32 at D = 128 needs 256 KB of shared
        # memory, over the H100's 227 KB (found by scripts/precision_overhead.py)
        return "fp32 inputs with head dim > 64"
    return None


def _launch(fn, grid, args, kwargs, device):
    """``fn[grid](*args, **kwargs)``, launched directly after the first call of each
    specialisation (:mod:`.launch`): the low-rank path launches five kernels a call, and
    Triton's own launch costs more host time than some of them run."""
    launch.launch(fn, lambda meta: grid, args, kwargs, device)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


# Keys per state chunk. Causal: the linear term of a query block sums the chunks before its
# own; the keys of its own chunk up to the diagonal are exact (a window of 64 to 256 keys).
# Non-causal: only the whole sequence's sums are used; chunks split the reduction over SMs.
_CAUSAL_CHUNK = 256
_CHUNK = 1024


def key_sums(k, v, keys_per_chunk: int):
    """Per chunk of keys of each kv head, fp32: ``kv (BH, nc, D, Dv)`` = K^T V,
    ``ksum (BH, nc, D)``, ``vsum (BH, nc, Dv)``."""
    B, H, LK, D = k.shape
    DV = v.shape[-1]
    nc = triton.cdiv(LK, keys_per_chunk)
    dev = k.device
    kv = torch.empty((B * H, nc, D, DV), device=dev, dtype=torch.float32)
    ksum = torch.empty((B * H, nc, D), device=dev, dtype=torch.float32)
    vsum = torch.empty((B * H, nc, DV), device=dev, dtype=torch.float32)
    d_pow, dv_pow = _pow2(D), _pow2(DV)
    block_d = d_pow if max(d_pow, dv_pow) <= 128 else 64
    grid = (nc, B * H, triton.cdiv(D, block_d))
    _launch(_key_chunk_kernel, grid,
            (k, v, kv, ksum, vsum, *k.stride(), *v.stride(), H, LK, D, DV, nc, keys_per_chunk),
            dict(BLOCK_N=BLOCK, BLOCK_D=block_d, DV_POW=dv_pow, PREC=_PREC,
                 num_warps=4 if _INTERPRET else 8), k.device)
    return kv, ksum, vsum


@triton.jit
def _store_split(HI, LO, offs, x, mask, SPLIT: tl.constexpr):
    """x as hi (+ lo = the rounding error of hi) in HI's dtype."""
    hi = x.to(HI.dtype.element_ty)
    tl.store(HI + offs, hi, mask=mask)
    if SPLIT:
        tl.store(LO + offs, (x - hi.to(tl.float32)).to(LO.dtype.element_ty), mask=mask)


@triton.jit
def _rest_kernel(K, KV, KSUM, VSUM, MU, RC_HI, RC_LO, RV, RD, RN, GRAM, SPEC,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 H, LK, D, DV, n_chunks, keys_per_chunk, gram_keys, gram_step,
                 CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, D_POW: tl.constexpr,
                 DV_POW: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr):
    """From the chunk sums of one kv head, for one slice of D: the mean key, the centred Gram's
    rows, and what the linear term of each chunk's query blocks sums over -- the centred
    ``sum (k - mu) v^T``, ``sum v``, ``sum (k - mu)`` and the key count, over the chunks
    before (causal: an exclusive prefix, chunk by chunk) or over the whole sequence. The
    Gram and the centred state are divided by the key count (sizes of one key's terms: a
    16-bit dtype holds them) and stored in the dot dtype, the state as a hi + lo pair. The
    Gram only ranks query rows for the check: it is taken over ``gram_keys`` keys spread
    ``gram_step`` apart (all of them up to 1024 keys)."""
    bh = tl.program_id(0).to(tl.int64)
    dc = tl.program_id(1)
    offs_dc = dc * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_d = tl.arange(0, D_POW)
    offs_dv = tl.arange(0, DV_POW)
    dc_ok = offs_dc < D
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    ksum = tl.zeros((D_POW,), dtype=tl.float32)
    ksum_c = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for c in range(0, n_chunks):
        part = bh * n_chunks + c
        ksum += tl.load(KSUM + part * D + offs_d, mask=d_ok, other=0.0)
        ksum_c += tl.load(KSUM + part * D + offs_dc, mask=dc_ok, other=0.0)
    mu = ksum / LK
    mu_c = ksum_c / LK
    if dc == 0:
        tl.store(MU + bh * D + offs_d, mu, mask=d_ok)
    k_base = K + (bh // H) * stride_kb + (bh % H) * stride_kh
    gram = tl.zeros((BLOCK_D, D_POW), dtype=tl.float32)
    for t0 in range(0, gram_keys, 64):
        offs_t = t0 + tl.arange(0, 64)
        t_ok = offs_t < gram_keys
        rows = offs_t.to(tl.int64) * gram_step * stride_kn
        kc = tl.load(k_base + rows[:, None] + offs_dc[None, :] * stride_kd,
                     mask=t_ok[:, None] & dc_ok[None, :], other=0.0).to(tl.float32)
        k = tl.load(k_base + rows[:, None] + offs_d[None, :] * stride_kd,
                    mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        kc = tl.where(t_ok[:, None], kc - mu_c[None, :], 0.0)
        k = tl.where(t_ok[:, None], k - mu[None, :], 0.0)
        gram = tl.dot(tl.trans(kc), k, gram, input_precision=PREC)
    gram = gram / gram_keys
    tl.store(GRAM + bh * D * D + offs_dc[:, None] * D + offs_d[None, :],
             gram.to(GRAM.dtype.element_ty), mask=dc_ok[:, None] & d_ok[None, :])
    # this slice's share of the Gram's trace and squared Frobenius norm (K's spectrum, for
    # the check: effective rank = trace^2 / |G|_F^2)
    spec = (bh * tl.num_programs(1) + dc) * 2
    tl.store(SPEC + spec, tl.sum(tl.sum(tl.where(offs_dc[:, None] == offs_d[None, :], gram, 0.0),
                                        1), 0))
    tl.store(SPEC + spec + 1, tl.sum(tl.sum(gram * gram, 1), 0))
    run_kv = tl.zeros((BLOCK_D, DV_POW), dtype=tl.float32)
    run_k = tl.zeros((BLOCK_D,), dtype=tl.float32)
    run_v = tl.zeros((DV_POW,), dtype=tl.float32)
    n_out = n_chunks if CAUSAL else 1
    for c in range(0, n_chunks):
        if CAUSAL:   # chunk c's query blocks: the chunks before it
            n_before = (c * keys_per_chunk).to(tl.float32)
            out = bh * n_out + c
            _store_split(RC_HI, RC_LO, out * D * DV + offs_dc[:, None] * DV + offs_dv[None, :],
                         (run_kv - mu_c[:, None] * run_v[None, :]) / LK,
                         dc_ok[:, None] & dv_ok[None, :], SPLIT)
            tl.store(RD + out * D + offs_dc, run_k - n_before * mu_c, mask=dc_ok)
            if dc == 0:
                tl.store(RV + out * DV + offs_dv, run_v, mask=dv_ok)
                tl.store(RN + out, n_before)
        part = bh * n_chunks + c
        run_kv += tl.load(KV + part * D * DV + offs_dc[:, None] * DV + offs_dv[None, :],
                          mask=dc_ok[:, None] & dv_ok[None, :], other=0.0)
        run_k += tl.load(KSUM + part * D + offs_dc, mask=dc_ok, other=0.0)
        run_v += tl.load(VSUM + part * DV + offs_dv, mask=dv_ok, other=0.0)
    if not CAUSAL:
        _store_split(RC_HI, RC_LO, bh * D * DV + offs_dc[:, None] * DV + offs_dv[None, :],
                     (run_kv - mu_c[:, None] * run_v[None, :]) / LK,
                     dc_ok[:, None] & dv_ok[None, :], SPLIT)
        tl.store(RD + bh * D + offs_dc, run_k - LK * mu_c, mask=dc_ok)
        if dc == 0:
            tl.store(RV + bh * DV + offs_dv, run_v, mask=dv_ok)
            tl.store(RN + bh, LK * 1.0)


_GRAM_KEYS = 1024


def rest_states(k, kv, ksum, vsum, keys_per_chunk: int, causal: bool, dot_dtype):
    """What the linear term of each chunk's query blocks sums over, from the chunk sums:
    -> ``(mu, rc_hi, rc_lo, rv, rd, rn, gram, spec)``: the mean key ``(BH, D)``; per chunk the
    centred ``sum (k - mu) v^T / Lk`` ``(BH, nc', D, Dv)`` as a hi + lo pair in ``dot_dtype``
    (lo None for fp32), ``sum v``, ``sum (k - mu)`` and the key count (causal: over the
    chunks before; non-causal: nc' = 1, the whole sequence); the centred Gram over the key
    count, ``(BH, D, D)`` in ``dot_dtype``, and per slice of it its share of the trace and the
    squared Frobenius norm, ``(BH, slices, 2)``. One small kernel (a handful of torch ops would
    cost more host time than the GPU spends on them)."""
    BH, nc, D, DV = kv.shape
    LK = k.shape[2]
    n_out = nc if causal else 1
    dev = kv.device
    split = dot_dtype != torch.float32
    mu = torch.empty((BH, D), device=dev, dtype=torch.float32)
    rc_hi = torch.empty((BH, n_out, D, DV), device=dev, dtype=dot_dtype)
    rc_lo = torch.empty_like(rc_hi) if split else None
    rv = torch.empty((BH, n_out, DV), device=dev, dtype=torch.float32)
    rd = torch.empty((BH, n_out, D), device=dev, dtype=torch.float32)
    rn = torch.empty((BH, n_out), device=dev, dtype=torch.float32)
    gram = torch.empty((BH, D, D), device=dev, dtype=dot_dtype)
    block_d = min(_pow2(D), 32)
    spec = torch.empty((BH, triton.cdiv(D, block_d), 2), device=dev, dtype=torch.float32)
    gram_keys = min(LK, _GRAM_KEYS)
    _launch(_rest_kernel, (BH, triton.cdiv(D, block_d), 1),
            (k, kv, ksum, vsum, mu, rc_hi, rc_lo if split else rc_hi, rv, rd, rn, gram, spec,
             *k.stride(), k.shape[1], LK, D, DV, nc, keys_per_chunk, gram_keys,
             LK // gram_keys),
            dict(CAUSAL=bool(causal), BLOCK_D=block_d, D_POW=_pow2(D), DV_POW=_pow2(DV),
                 SPLIT=split, PREC=_PREC, num_warps=4), dev)
    return mu, rc_hi, rc_lo, rv, rd, rn, gram, spec


def lowrank_forward(q, k, v, is_causal: bool, scale):
    """``(out, lse, worst, keys)`` of the linearised attention over every head: ``out`` and
    ``lse`` are NaN on rows whose linearised weights are unusable; ``worst = (rating, row)``,
    each ``(B * Hq, query blocks)``: per block of ``BLOCK`` query rows, the row with the
    largest mean squared score deviation from the mean key (+inf: an unusable row) and that
    value; ``keys = (gram, mu, spec)``: K's centred Gram over the key count
    ``(B * Hkv, D, D)``, its mean ``(B * Hkv, D)`` and the Gram's trace and squared Frobenius
    norm by slices (see :func:`rest_states`)."""
    B, H, LQ, D = q.shape
    HKV, LK, DV = k.shape[1], k.shape[2], v.shape[-1]
    sm_scale = float(scale) if scale is not None else D ** -0.5
    per_chunk = _CAUSAL_CHUNK if is_causal else _CHUNK
    mu, rc_hi, rc_lo, rv, rd, rn, gram, spec = rest_states(k, *key_sums(k, v, per_chunk),
                                                           per_chunk, is_causal, q.dtype)
    out = torch.empty((B, H, LQ, DV), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, LQ), device=q.device, dtype=torch.float32)
    n_qblocks = triton.cdiv(LQ, BLOCK)
    worst = torch.empty((B * H, n_qblocks), device=q.device, dtype=torch.float32)
    worst_row = torch.empty((B * H, n_qblocks), device=q.device, dtype=torch.int32)
    dv_pow = _pow2(DV)
    block_dv = min(dv_pow, 64 if _pow2(D) > 128 else 128)
    grid = (n_qblocks, B * H, triton.cdiv(DV, block_dv))
    _launch(_lowrank_fwd_kernel, grid,
            (q, k, v, mu, rc_hi, rc_hi if rc_lo is None else rc_lo, rv, rd, rn, gram, out, lse,
             worst, worst_row, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
             H, HKV, H // HKV, LQ, LK, D, DV, triton.cdiv(LK, BLOCK), rc_hi.shape[1], per_chunk,
             sm_scale),
            dict(CAUSAL=bool(is_causal), BLOCK=BLOCK, D_POW=_pow2(D), BLOCK_DV=block_dv,
                 BLOCK_G=min(_pow2(D), 128), SPLIT=rc_lo is not None, PREC=_PREC,
                 num_warps=4 if _INTERPRET else 8), q.device)
    return out, lse, (worst, worst_row), (gram, mu, spec)


@triton.jit
def _exact_rows_kernel(Q, K, V, IDX, Acc, M, L, T,
                       stride_qb, stride_qh, stride_qm, stride_qd,
                       stride_kb, stride_kh, stride_kn, stride_kd,
                       stride_vb, stride_vh, stride_vn, stride_vd,
                       H, HKV, GROUPS, LK, D, DV, keys_per_split, n_splits, sm_scale,
                       CAUSAL: tl.constexpr, S: tl.constexpr, ROWS: tl.constexpr,
                       BLOCK_N: tl.constexpr, D_POW: tl.constexpr, DV_POW: tl.constexpr,
                       PREC: tl.constexpr):
    """Exact attention for ROWS of the S sampled query rows (positions in IDX) of one head over
    one split of the keys: unnormalised ``acc``, row max ``m``, ``l = sum exp(s - m)`` and
    ``t = sum exp(s - m) s`` (for the entropy), fp32 sums. The products take the inputs as
    they are and p in their dtype, as the dense kernels (and cuDNN) do: a p in fp32 would have
    the conversion and a TF32 product in the key loop, measured 3-4x slower on the H100.
    Combined over splits by :func:`check_rows` / :func:`exact_rows`."""
    bh = tl.program_id(0)
    grp = tl.program_id(1)
    split = tl.program_id(2)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    off_hk = off_h // GROUPS
    offs_s = grp * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, D_POW)
    offs_dv = tl.arange(0, DV_POW)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    rows = tl.load(IDX + bh.to(tl.int64) * S + offs_s)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + rows[:, None].to(tl.int64) * stride_qm
                + offs_d[None, :] * stride_qd, mask=d_ok[None, :], other=0.0)
    m_i = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((ROWS,), dtype=tl.float32)
    t_i = tl.zeros((ROWS,), dtype=tl.float32)
    acc = tl.zeros((ROWS, DV_POW), dtype=tl.float32)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, LK)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * sm_scale
        keep = n_ok[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= rows[:, None])
        m_new = tl.maximum(m_i, tl.max(tl.where(keep, s, float("-inf")), 1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp(m_i - m_safe)
        p = tl.where(keep, tl.exp(s - m_safe[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        t_i = t_i * alpha + tl.sum(p * tl.where(keep, s, 0.0), 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    part = (bh.to(tl.int64) * n_splits + split) * S + offs_s
    tl.store(Acc + part[:, None] * DV + offs_dv[None, :], acc, mask=dv_ok[None, :])
    tl.store(M + part, m_i)
    tl.store(L + part, l_i)
    tl.store(T + part, t_i)


@triton.jit
def _max_rating(RATING, bh, n_qblocks):
    """The largest of a head's per-block row ratings."""
    offs = tl.arange(0, 256)
    worst = tl.full((256,), float("-inf"), dtype=tl.float32)
    for b0 in range(0, n_qblocks, 256):
        worst = tl.maximum(worst, tl.load(RATING + bh.to(tl.int64) * n_qblocks + b0 + offs,
                                          mask=b0 + offs < n_qblocks, other=float("-inf")))
    return tl.max(worst, 0)


@triton.jit
def _check_kernel(Acc, M, L, T, IDX, Out, Part,
                  stride_ob, stride_oh, stride_om, stride_od,
                  H, LK, DV, n_splits,
                  CAUSAL: tl.constexpr, S: tl.constexpr, ROWS: tl.constexpr,
                  DV_POW: tl.constexpr):
    """ROWS of one head's sampled rows: combine the exact rows' splits, then the squared
    error of the low-rank output's rows against them, the rows' squared norm and their summed
    normalised entropy -> Part[0 | 1 | 2, head, group]."""
    bh = tl.program_id(0)
    grp = tl.program_id(1)
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    offs_s = grp * ROWS + tl.arange(0, ROWS)
    offs_dv = tl.arange(0, DV_POW)
    dv_ok = offs_dv < DV
    base = bh.to(tl.int64) * n_splits * S
    m_all = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    for sp in range(0, n_splits):
        m_all = tl.maximum(m_all, tl.load(M + base + sp * S + offs_s))
    l_all = tl.zeros((ROWS,), dtype=tl.float32)
    t_all = tl.zeros((ROWS,), dtype=tl.float32)
    acc = tl.zeros((ROWS, DV_POW), dtype=tl.float32)
    for sp in range(0, n_splits):
        part = base + sp * S + offs_s
        m = tl.load(M + part)
        w = tl.where(m > float("-inf"), tl.exp(m - m_all), 0.0)   # splits a row has no key in
        l_all += w * tl.load(L + part)
        t_all += w * tl.load(T + part)
        acc += w[:, None] * tl.load(Acc + part[:, None] * DV + offs_dv[None, :],
                                    mask=dv_ok[None, :], other=0.0)
    exact = tl.where(dv_ok[None, :], acc / l_all[:, None], 0.0)
    rows = tl.load(IDX + bh.to(tl.int64) * S + offs_s)
    approx = tl.load(Out + off_b * stride_ob + off_h * stride_oh
                     + rows[:, None].to(tl.int64) * stride_om + offs_dv[None, :] * stride_od,
                     mask=dv_ok[None, :], other=0.0).to(tl.float32)
    diff = tl.where(dv_ok[None, :], approx - exact, 0.0)
    # entropy = log Z - E[s] = m + log l - t / l, over the log of the keys the row attends
    entropy = m_all + tl.log(l_all) - t_all / l_all
    if CAUSAL:
        n_keys = tl.minimum(rows + 1, LK).to(tl.float32)
    else:
        n_keys = tl.zeros((ROWS,), dtype=tl.float32) + LK
    # (a row with one key attends it uniformly: 1)
    entropy = tl.where(n_keys > 1, entropy / tl.log(tl.maximum(n_keys, 2.0)), 1.0)
    out = bh.to(tl.int64) * tl.num_programs(1) + grp
    total = tl.num_programs(0) * tl.num_programs(1)
    tl.store(Part + out, tl.sum(tl.sum(diff * diff, 1), 0))
    tl.store(Part + total + out, tl.sum(tl.sum(exact * exact, 1), 0))
    tl.store(Part + 2 * total + out, tl.sum(entropy, 0))


@triton.jit
def _decide_kernel(Part, Result, TAKEN, RATING, BUDGET, SPEC, MU, n_qblocks, tolerance, H, HKV,
                   D, FORCE: tl.constexpr, S: tl.constexpr, GROUPS: tl.constexpr,
                   D_POW: tl.constexpr, SLICES: tl.constexpr):
    """One head: its relative L2 error and mean entropy over the sampled rows, and its keys'
    spectrum summed up as the centred Gram's effective rank ``(sum l)^2 / sum l^2`` over its
    eigenvalues l (= trace^2 / |G|_F^2, no eigen-solve: 1 when keys vary along one
    direction, D when along all equally; 0 when they do not vary) -> Result[0 | 1 | 2,
    head]; and the decision: TAKEN[head] = 1 where the error is inside the
    tolerance (FORCE: wherever it is a number; NaN means unusable rows were sampled). The
    linearisation's error grows with the rows' rating (the second-order term it drops), so
    BUDGET[head] = the head's worst rating scaled by the headroom ``tolerance / error`` (at
    most 4x): the rating later calls may reach and keep the low-rank rows unchecked."""
    bh = tl.program_id(0)
    heads = tl.num_programs(0)
    offs = bh.to(tl.int64) * GROUPS + tl.arange(0, GROUPS)
    diff2 = tl.sum(tl.load(Part + offs), 0)
    exact2 = tl.sum(tl.load(Part + heads * GROUPS + offs), 0)
    entropy = tl.sum(tl.load(Part + 2 * heads * GROUPS + offs), 0) / S
    err = tl.sqrt(diff2) / tl.maximum(tl.sqrt(exact2), 1e-30)
    tl.store(Result + bh, err)
    tl.store(Result + heads + bh, entropy)
    kv_bh = (bh // H).to(tl.int64) * HKV + (bh % H) // (H // HKV)
    offs_d = tl.arange(0, D_POW)
    d_ok = offs_d < D
    offs_sl = kv_bh * SLICES * 2 + tl.arange(0, SLICES) * 2
    trace = tl.sum(tl.load(SPEC + offs_sl), 0)
    frob2 = tl.sum(tl.load(SPEC + offs_sl + 1), 0)
    # keys that do not vary (a trace at the rounding level of the mean's square, the Gram
    # being the second moment less it): 0
    mu = tl.load(MU + kv_bh * D + offs_d, mask=d_ok, other=0.0)
    varies = (trace > 1e-5 * tl.sum(mu * mu, 0)) & (frob2 > 0)
    tl.store(Result + 2 * heads + bh,
             tl.where(varies, trace * trace / tl.maximum(frob2, 1e-30), 0.0))
    if FORCE:
        taken = err == err
    else:
        taken = err <= tolerance
    tl.store(TAKEN + bh, taken.to(tl.int32))
    worst = _max_rating(RATING, bh, n_qblocks)
    if FORCE:
        budget = float("inf")
    else:
        budget = worst * tl.minimum(tolerance / tl.maximum(err, 1e-30), 4.0)
    tl.store(BUDGET + bh, tl.where(taken, budget, float("-inf")))


# The exact-rows kernel splits each head's keys so that a call has about _EXACT_PROGRAMS
# programs (SMs busy, few partial results for the check to combine), each walking 1024 to
# 2048 keys (H100, L = 8192: 97 us at 64 heads -- K and V read once, ~90 us at 3 TB/s --
# against 324 us with a fixed 512-key split and an fp32 p). The check combines _CHECK_ROWS
# sampled rows a program.
_EXACT_PROGRAMS = 128
_MIN_KEYS_PER_SPLIT = 1024
_MAX_KEYS_PER_SPLIT = 2048
_CHECK_ROWS = 16
_EXACT_BLOCK_N = 64
_EXACT_WARPS = 4


def _exact_partials(q, k, v, rows, is_causal, scale):
    B, H, LQ, D = q.shape
    HKV, LK, DV = k.shape[1], k.shape[2], v.shape[-1]
    S = rows.shape[1]
    sm_scale = float(scale) if scale is not None else D ** -0.5
    per_split = min(_MAX_KEYS_PER_SPLIT, max(
        _MIN_KEYS_PER_SPLIT, triton.next_power_of_2(triton.cdiv(LK * B * H, _EXACT_PROGRAMS))))
    splits = triton.cdiv(LK, per_split)
    dev = q.device
    acc = torch.empty((B * H, splits, S, DV), device=dev, dtype=torch.float32)
    m, l, t = (torch.empty((B * H, splits, S), device=dev, dtype=torch.float32) for _ in range(3))
    d_pow, dv_pow = _pow2(D), _pow2(DV)
    # all the sampled rows of a head in one program (K and V read once), up to D = 128
    rows_per = S if max(d_pow, dv_pow) <= 128 else S // 2
    _launch(_exact_rows_kernel, (B * H, S // rows_per, splits),
            (q, k, v, rows, acc, m, l, t, *q.stride(), *k.stride(), *v.stride(),
             H, HKV, H // HKV, LK, D, DV, per_split, splits, sm_scale),
            dict(CAUSAL=bool(is_causal), S=S, ROWS=rows_per,
                 BLOCK_N=32 if max(d_pow, dv_pow) > 128 else _EXACT_BLOCK_N, D_POW=d_pow,
                 DV_POW=dv_pow, PREC=_PREC, num_warps=_EXACT_WARPS), dev)
    return acc, m, l, t


def check_rows(q, k, v, out, rows, is_causal: bool, scale, rating, keys,
               tolerance: float = 0.0, force: bool = False):
    """Per head of ``out`` (the low-rank output, ``(B, Hq, Lq, Dv)``): the relative L2 error of
    its rows at ``rows (B * Hq, S)`` against exact attention, the exact rows' mean normalised
    entropy and the effective rank of K's centred Gram (``keys``: what
    :func:`lowrank_forward` returns), ``(3, B * Hq)`` fp32; whether the head keeps the low-rank rows, ``(B * Hq,)``
    int32; and the row rating up to which later calls may keep them unchecked, ``(B * Hq,)``
    fp32 (``rating``: the per-block worst-row ratings of the low-rank kernel). On the
    device."""
    B, H = q.shape[:2]
    S = rows.shape[1]
    acc, m, l, t = _exact_partials(q, k, v, rows, is_causal, scale)
    groups = S // _CHECK_ROWS
    parts = torch.empty((3, B * H, groups), device=q.device, dtype=torch.float32)
    _launch(_check_kernel, (B * H, groups, 1),
            (acc, m, l, t, rows, out, parts, *out.stride(), H, k.shape[2], v.shape[-1],
             acc.shape[1]),
            dict(CAUSAL=bool(is_causal), S=S, ROWS=_CHECK_ROWS, DV_POW=_pow2(v.shape[-1]),
                 num_warps=4), q.device)
    result = torch.empty((3, B * H), device=q.device, dtype=torch.float32)
    taken = torch.empty((B * H,), device=q.device, dtype=torch.int32)
    budget = torch.empty((B * H,), device=q.device, dtype=torch.float32)
    _, mu, spec = keys
    D = q.shape[-1]
    _launch(_decide_kernel, (B * H, 1, 1),
            (parts, result, taken, rating, budget, spec, mu, rating.shape[1], float(tolerance),
             H, k.shape[1], D),
            dict(FORCE=bool(force), S=S, GROUPS=groups, D_POW=_pow2(D), SLICES=spec.shape[1],
                 num_warps=1), q.device)
    return result, taken, budget


def exact_rows(q, k, v, rows, is_causal: bool, scale):
    """Exact attention at sampled query positions, for tests and the benchmark: ``rows
    (B * Hq, S)`` int32 positions per head (S a power of two >= 16). -> ``(out (B * Hq, S,
    Dv), entropy (B * Hq, S))`` in fp32, the entropy normalised by the log of the number of
    keys each row attends."""
    LK = k.shape[2]
    acc, m, l, t = _exact_partials(q, k, v, rows, is_causal, scale)
    m_all = m.amax(1, keepdim=True)
    w = torch.exp(m - m_all).nan_to_num_(0.0)      # splits a row has no key in: weight 0
    l_all = (w * l).sum(1)
    out = (w[..., None] * acc).sum(1) / l_all[..., None]
    entropy = m_all.squeeze(1) + torch.log(l_all) - (w * t).sum(1) / l_all
    n_keys = (rows.to(torch.float32) + 1).clamp(max=LK) if is_causal else \
        torch.full_like(l_all, float(LK))
    return out, torch.where(n_keys > 1, entropy / torch.log(n_keys.clamp_min(2)), 1.0)


@triton.jit
def _fixup_kernel(Q, K, V, TAKEN, RATING, BUDGET, KEPT, Out, LSE,
                  stride_qb, stride_qh, stride_qm, stride_qd,
                  stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd,
                  stride_ob, stride_oh, stride_om, stride_od,
                  H, GROUPS, HKV, LQ, LK, D, DV, n_qblocks, sm_scale,
                  CAUSAL: tl.constexpr, GUARD: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, D_POW: tl.constexpr, DV_POW: tl.constexpr,
                  PREC: tl.constexpr):
    """Exact attention (FlashAttention-2's loop) over the heads that do not keep the low-rank
    output, written over it; the programs of the other heads return at once. A head keeps it
    where TAKEN[head] (this call's check, or the last one's) says so and, with GUARD (a call
    without a check), where its worst row rating is within BUDGET[head]. KEPT[head] records
    the outcome. The routing stays on the device: no host round trip decides which heads to
    redo."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    keep_low_rank = tl.load(TAKEN + bh) != 0
    if GUARD:
        keep_low_rank = keep_low_rank & (_max_rating(RATING, bh, n_qblocks)
                                         <= tl.load(BUDGET + bh))
    if i == 0:
        tl.store(KEPT + bh, keep_low_rank.to(tl.int32))
    if keep_low_rank:
        return
    off_b = (bh // H).to(tl.int64)
    off_h = (bh % H).to(tl.int64)
    off_hk = off_h // GROUPS
    offs_m = i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_POW)
    offs_dv = tl.arange(0, DV_POW)
    m_ok = offs_m < LQ
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    qk_scale = sm_scale * 1.4426950408889634   # exp2 with log2(e) folded in
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, DV_POW), dtype=tl.float32)
    if CAUSAL:
        hi = tl.minimum((i + 1) * BLOCK_M, LK)
    else:
        hi = LK
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < LK
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        keep = n_ok[None, :]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om
             + offs_dv[None, :] * stride_od, out.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & dv_ok[None, :])
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_i)) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + bh.to(tl.int64) * LQ + offs_m, lse, mask=m_ok)


def exact_heads(q, k, v, out, lse, taken, rating, budget, guard: bool, is_causal: bool,
                scale):
    """Overwrite ``out`` / ``lse`` with exact attention on the heads that do not keep the
    low-rank output (see :func:`_fixup_kernel`), in place, on the device. -> ``kept``
    ``(B * Hq,)`` int32."""
    B, H, LQ, D = q.shape
    HKV, LK, DV = k.shape[1], k.shape[2], v.shape[-1]
    sm_scale = float(scale) if scale is not None else D ** -0.5
    d_pow, dv_pow = _pow2(D), _pow2(DV)
    if _INTERPRET:
        block_m, block_n, warps = 16, 16, 4
    else:
        block_m, block_n, warps = (128, 64, 8) if max(d_pow, dv_pow) <= 128 else (64, 32, 8)
    kept = torch.empty_like(taken)
    _launch(_fixup_kernel, (triton.cdiv(LQ, block_m), B * H, 1),
            (q, k, v, taken, rating, budget, kept, out, lse, *q.stride(), *k.stride(),
             *v.stride(), *out.stride(), H, H // HKV, HKV, LQ, LK, D, DV, rating.shape[1],
             sm_scale),
            dict(CAUSAL=bool(is_causal), GUARD=bool(guard), BLOCK_M=block_m, BLOCK_N=block_n,
                 D_POW=d_pow, DV_POW=dv_pow, PREC=_PREC, num_warps=warps), q.device)
    return kept
