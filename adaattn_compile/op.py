"""``torch.ops.adaattn.attention``: the one operator every rewritten attention site calls.

Defined with ``torch.library.Library`` (schema, fake implementation, a Python autograd
kernel) rather than ``torch.library.custom_op``: the op runs once per attention call, and
custom_op's generic wrappers cost more host time than small attention calls cost on the GPU
(its autograd kernel rebuilds the argument list from the schema on every training call,
~40 us; its backend wrapper adds an aliasing check and a dataclass per call).
``triton_op`` + ``wrap_triton`` does not compile on CPU with torch 2.13. The op returns
``(out, lse, seed)``: ``lse`` is the row log-sum-exp the flash backward needs and ``seed`` the
dropout seed the backward needs to redraw the forward's mask; rewritten graphs use ``out``.

Each call asks the planner for a plan (cached per site, device, dtype, head shapes and
sequence bucket), runs the chosen kernel, and falls back to the reference path with one
warning if a kernel fails, so a kernel bug costs speed, never the model.

Host overhead is measured by ``scripts/op_overhead.py``; keep the per-call path lean.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import math
import os
import threading
import warnings
from typing import Dict, Optional

import torch
from torch import Tensor

from . import mask_proofs, planner, precision
from .kernels import reference
from .options import Options

# The module (the package's ``stats`` attribute is the function of that name once the package
# has been imported, which a reload of this module would pick up).
stats = importlib.import_module(f"{__package__}.stats")
log = logging.getLogger("adaattn")

_site_options: Dict[str, Options] = {}
# site -> the graph's mask node it reads ("graph3/expand_1"): sites of one group read one value
# per graph call (see compiler._register_mask_groups)
_mask_groups: Dict[str, str] = {}
_training_sites: set = set()   # sites of graphs compiled for training (gradients taken)
_grad_call = threading.local()   # .on: this thread is in a forward autograd will differentiate
_plan_cache: Dict[tuple, planner.Plan] = {}
_plan_generation = 0   # bumped when a site's options change: plans made before are dropped
_cache_lock = threading.Lock()
_warned: set = set()

_CPU = torch.device("cpu")
_NO_SEED = torch.zeros(1, dtype=torch.int64, device=_CPU)   # template of the seed without dropout


def register_site(site: str, options: Options, training: bool = False) -> None:
    """Remember the options a rewritten site was compiled with (the op reads them by id), and
    whether its graph was compiled for training (AOT then runs the op's forward with tensors
    that do not require grad, so only the compiler can tell)."""
    global _plan_generation
    with _cache_lock:
        old = _site_options.get(site)
        _site_options[site] = options
        was_training = site in _training_sites
        (_training_sites.add if training else _training_sites.discard)(site)
        if old != options or was_training != training:
            # plans made with other options (a site id reused after reset_ids, or called
            # before it was registered here) are dropped
            _plan_generation += 1
            for key in [key for key in _plan_cache if key[0] == site]:
                del _plan_cache[key]
            for key in [key for key in _ladder_states if key[0] == site]:
                del _ladder_states[key]   # and the rungs its checks settled on


def set_mask_group(site: str, group: Optional[str]) -> None:
    """Record that ``site`` reads the mask node ``group`` (None: no mask node)."""
    if group is None:
        _mask_groups.pop(site, None)
    else:
        _mask_groups[site] = group


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
    # Cached: asking the driver costs ~10 us.
    return torch.cuda.get_device_capability(index)


def mask_kind(attn_mask: Optional[Tensor]) -> Optional[str]:
    if attn_mask is None:
        return None
    return "bool" if attn_mask.dtype == torch.bool else "additive"


_flash_module = None


def _flash():
    """``kernels.flash``, imported on first use (it imports Triton) and then kept."""
    global _flash_module
    if _flash_module is None:
        from .kernels import flash
        _flash_module = flash
    return _flash_module


def _flash_unsupported(q, k, v, attn_mask, dropout_p, enable_gqa) -> Optional[str]:
    """Why the flash kernels can't run this call (None if they can)."""
    try:
        flash = _flash()
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


def _other_kernel_unsupported(module: str, q, k, v, enable_gqa, check) -> Optional[str]:
    """Why kernels.``module`` can't run this call (None if it can): ``check(module, q4, k4,
    v4)`` on the inputs brought to (B, H, L, D)."""
    try:
        kernels = importlib.import_module(f"{__package__}.kernels.{module}")
    except Exception as exc:  # triton missing or broken
        return f"Triton kernel unavailable ({type(exc).__name__})"
    if q.dim() not in (3, 4):
        return f"{q.dim()}-D inputs"
    qb, kb, vb = _broadcast_batch(q, k, v, enable_gqa)
    return check(kernels, _to4d(qb), _to4d(kb), _to4d(vb))


def lowrank_unsupported(q, k, v, attn_mask, is_causal, dropout_p, enable_gqa) -> Optional[str]:
    """Why the low-rank kernel can't run this call (None if it can)."""
    return _other_kernel_unsupported(
        "lowrank", q, k, v, enable_gqa,
        lambda m, q4, k4, v4: m.supports(q4, k4, v4, attn_mask, dropout_p, is_causal))


def int8_unsupported(q, k, v, attn_mask, dropout_p, enable_gqa) -> Optional[str]:
    """Why the 8-bit kernel can't run this call (None if it can)."""
    return _other_kernel_unsupported(
        "attn8", q, k, v, enable_gqa,
        lambda m, q4, k4, v4: m.supports(q4, k4, v4, _mask4d(attn_mask), dropout_p))


def problem_of(q, k, v, attn_mask, is_causal, dropout_p, enable_gqa, unsupported=None,
               lowrank_why=None, training=False, int8_why=None, amax=None) -> planner.Problem:
    groups = q.shape[-3] // k.shape[-3] if enable_gqa and q.dim() >= 3 else 1
    return planner.Problem(
        dtype=str(q.dtype).replace("torch.", ""), q_len=int(q.shape[-2]), k_len=int(k.shape[-2]),
        head_dim=int(q.shape[-1]), v_head_dim=int(v.shape[-1]), mask=mask_kind(attn_mask),
        causal=bool(is_causal), dropout_p=float(dropout_p), gqa_groups=int(groups),
        kernel_unsupported=unsupported, lowrank_unsupported=lowrank_why, training=training,
        int8_unsupported=int8_why, amax=amax)


def wants_int8(opts: Options) -> bool:
    return opts.precision == "int8" or (opts.precision == "auto"
                                        and opts.int8_min_seq_len is not None)


def _make_plan(opts, q, k, v, attn_mask, is_causal, dropout_p, enable_gqa, training,
               scale) -> planner.Plan:
    unsupported = lowrank_why = int8_why = amax = None
    if opts.kernel != "reference":
        unsupported = _flash_unsupported(q, k, v, attn_mask, dropout_p, enable_gqa)
        if unsupported is None and opts.rank != "dense":
            lowrank_why = lowrank_unsupported(q, k, v, attn_mask, is_causal, dropout_p,
                                              enable_gqa)
        if unsupported is None and wants_int8(opts):
            int8_why = int8_unsupported(q, k, v, attn_mask, dropout_p, enable_gqa)
    device = device_info(q.device)
    if (q.dtype == torch.float32 and opts.precision in ("auto", "fp16") and opts.tolerance > 0
            and not training and min(q.shape[-2], k.shape[-2]) >= opts.min_seq_len
            and device.type == "cuda"
            and not (q.is_cuda and torch.cuda.is_current_stream_capturing())):
        # fp16 is a rung only where the inputs' range fits it (one sync, once per plan; the
        # run-time checks measure it again). Not while a CUDA graph is captured (no sync may
        # run): the plan then offers bf16, which holds any fp32 range.
        amax = precision.measure_amax(q, k, v, scale)
    return planner.plan(device,
                        problem_of(q, k, v, attn_mask, is_causal, dropout_p, enable_gqa,
                                   unsupported, lowrank_why, training, int8_why, amax), opts)


def _plan(site, policy, kernel, q, k, v, attn_mask, is_causal, dropout_p, enable_gqa,
          scale=None):
    """The plan for this call, cached per site, the call's policy and kernel, device (and
    whether it allows tf32), dtype, head counts and dims, sequence-length bucket (so a
    dynamic-length model plans once per bucket, not per length), mask kind and rank, causal,
    dropout on/off and GQA. The key is a flat tuple of values read straight off the tensors:
    this runs on every call of the op."""
    qs, ks = q.shape, k.shape
    lq, lk = qs[-2], ks[-2]
    nd = len(qs)
    if attn_mask is None:
        mask_bool, mask_dim = None, -1
    else:
        mask_bool, mask_dim = attn_mask.dtype == torch.bool, attn_mask.dim()
    training = site in _training_sites or getattr(_grad_call, "on", False)
    key = (site, policy, kernel, training, q.device,
           q.is_cuda and torch.get_float32_matmul_precision() != "highest",
           q.dtype, nd, qs[-3] if nd >= 3 else 1, ks[-3] if len(ks) >= 3 else 1, qs[-1],
           v.shape[-1], lq and (lq - 1).bit_length(), lk and (lk - 1).bit_length(),
           mask_bool, mask_dim, is_causal, dropout_p > 0, enable_gqa)
    cached = _plan_cache.get(key)
    if cached is not None:
        return cached
    generation = _plan_generation
    result = _make_plan(site_options(site, policy, kernel), q, k, v, attn_mask, is_causal,
                        dropout_p, enable_gqa, training, scale)
    with _cache_lock:
        if generation == _plan_generation:
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


def _flash_forward(q, k, v, attn_mask, is_causal, scale, enable_gqa, forward=None,
                   out_blhd=False, mask_group=None):
    """``forward`` (default: the dense flash kernel's) on q / k / v brought to (B, H, L, D).
    ``out_blhd``: the dense kernel writes out in (B, L, H, D) memory (see :func:`_in_layout`);
    other forwards, and calls with something to broadcast, return it contiguous.
    ``mask_group``: the site's mask group (see :func:`set_mask_group`), None if unknown."""
    qs, ks, vs = q.shape, k.shape, v.shape
    if len(qs) == 4 and qs[0] == ks[0] == vs[0] and (enable_gqa or qs[1] == ks[1] == vs[1]):
        # (B, H, L, D) with nothing to broadcast: what rewritten graphs pass (every step
        # below is a no-op then, and this runs on every call)
        if forward is None:
            return _flash().flash_forward(q, k, v, _mask4d(attn_mask), is_causal, scale,
                                          out_blhd, mask_group)
        return forward(q, k, v, _mask4d(attn_mask), is_causal, scale)
    forward = forward or _flash().flash_forward
    qb, kb, vb = _broadcast_batch(q, k, v, enable_gqa)
    out_shape = qb.shape[:-1] + (v.shape[-1],)
    out, lse = forward(_to4d(qb), _to4d(kb), _to4d(vb), _mask4d(attn_mask), is_causal, scale)
    return out.reshape(out_shape), lse.reshape(out_shape[:-1])


def _flash_backward(grad_out, q, k, v, out, lse, attn_mask, is_causal, scale, enable_gqa,
                    mask_needs_grad):
    qb, kb, vb = _broadcast_batch(q, k, v, enable_gqa)
    mask4 = _mask4d(attn_mask)
    dq, dk, dv, dmask = _flash().flash_backward(
        _to4d(grad_out), _to4d(qb), _to4d(kb), _to4d(vb), _to4d(out),
        lse.unsqueeze(0) if lse.dim() == 2 else lse, mask4, is_causal, scale, mask_needs_grad)
    dq, dk, dv = dq.reshape(qb.shape), dk.reshape(kb.shape), dv.reshape(vb.shape)
    if dmask is not None:
        dmask = _sum_to(dmask.reshape(mask4.shape), attn_mask)
    return _sum_to(dq, q), _sum_to(dk, k), _sum_to(dv, v), dmask


# ---------------------------------------------------------------------------------------------
# The operator's kernels: plain functions, registered below autograd (and called straight
# from the Autograd kernel when nothing else sits in between).

def _key_mask_worth_proving(site, policy, kernel, q, k, flops) -> bool:
    """Whether proving a per-key mask empty can change this forward call: it opens the
    low-rank path (which takes no mask), or gradients follow (the backward then runs
    unmasked). Otherwise an empty key mask only saves the kernel a vector read per key
    tile, and the proof costs a device sync per mask tensor: HF builds its padding mask anew
    every call, so every forward waited for the GPU once (BERT-base sdpa at L = 4096, host-bound
    on the H100: 8.3 ms a call against 5.9 ms unchecked, stock 2.7 ms)."""
    if site in _training_sites or getattr(_grad_call, "on", False):
        return True
    opts = site_options(site, policy, kernel)
    if opts.rank == "dense" or (opts.rank == "auto" and opts.tolerance <= 0):
        return False
    if opts.kernel not in ("auto", "triton"):
        return False
    return (min(q.shape[-2], k.shape[-2]) >= opts.min_seq_len
            and flops >= opts.low_rank_min_gflops * 1e9)


def _key_mask_left_alone(site, attn_mask, q, k, policy, kernel, flops) -> bool:
    """A forward call's per-key mask that is run as it is, unproven (see
    :func:`_key_mask_worth_proving`)."""
    return (attn_mask.dim() >= 2 and attn_mask.shape[-2] == 1 and q.shape[-2] > 1
            and not _key_mask_worth_proving(site, policy, kernel, q, k, flops))


def _drop_proven_mask(site, attn_mask, q, k, count=True, policy="", kernel="", group=None):
    """(mask, is_causal) to run with: a run-time mask proven causal becomes ``is_causal``
    (blocks above the diagonal skipped, no mask read), causal AND a key mask becomes
    ``is_causal`` with the (.., 1, Lk) key mask, one that masks nothing goes; the result is
    the same (see :mod:`.mask_proofs`). A per-key mask is checked only where its proof can
    change the call (:func:`_key_mask_worth_proving`). ``count`` False: the backward's call
    (gradients: key masks are checked; not counted). ``group``: the site's mask group."""
    flops = planner.forward_flops(q.shape, k.shape[-2])
    if count and _key_mask_left_alone(site, attn_mask, q, k, policy, kernel, flops):
        return attn_mask, False
    kind, keys, missed = mask_proofs.check(attn_mask, q.shape[-2], k.shape[-2], site, flops,
                                           group)
    if kind is None:
        if missed and count:
            stats.record_mask_miss(site)
        return attn_mask, False
    if count:
        stats.record_mask_proof(site, kind)
    return keys, kind != "none"


# The seed output of a forward that ran the low-rank path (no dropout there, so the seed is
# otherwise 0): a backward given it recomputes the exact forward first.
_LOW_RANK_SEED = -1
# After a check that refused every head, a (site, bucket) runs dense for this many calls
# before checking again: a peaked model pays for the check once in so many calls.
RECHECK_AFTER_REFUSAL = 16
_low_rank_backoff: Dict[tuple, int] = {}
# checks on their way to the host: (site, bucket, forced, rank.Pending), oldest first
_pending_checks: list = []
# what the last check of a (site, bucket, heads, device, dtype) decided (rank.RouteState)
_route_states: Dict[tuple, object] = {}


def settle_checks(wait: bool = False) -> None:
    """Fold the low-rank checks that have reached the host into the statistics (all of them,
    waiting for the device, with ``wait``), and start the back-off of a (site, bucket) whose
    check took no head."""
    while _pending_checks:
        with _cache_lock:
            if not _pending_checks or not (wait or _pending_checks[0][3].ready()):
                return
            site, bucket, forced, pending = _pending_checks.pop(0)
        checks = pending.result()
        stats.record_rank_check(site, checks, forced)
        if checks.error is not None and not checks.taken_count and not forced:
            _low_rank_backoff[(site, bucket)] = RECHECK_AFTER_REFUSAL
            for key in [key for key in _route_states if key[:2] == (site, bucket)]:
                del _route_states[key]   # the next try starts with a check


stats.add_settler(settle_checks)


def _try_low_rank(site, chosen, q, k, is_causal) -> bool:
    if planner.forward_flops(q.shape, k.shape[-2], is_causal) < chosen.low_rank_min_flops:
        return False
    if not (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        settle_checks()   # (not under capture: it queries events)
    key = (site, chosen.seq_bucket)
    wait = _low_rank_backoff.get(key)
    if wait:
        _low_rank_backoff[key] = wait - 1
        return False
    return True


def _lowrank_forward(q, k, v, is_causal, scale, enable_gqa, site, chosen):
    """-> (out, lse): the low-rank kernel's output on the heads that keep it, the dense fix-up
    kernel's on the others (see :mod:`.rank`); None under CUDA-graph capture with no check
    done yet for this (site, bucket, shape)."""
    from . import rank

    qb, kb, vb = _broadcast_batch(q, k, v, enable_gqa)
    out_shape = qb.shape[:-1] + (v.shape[-1],)
    forced = chosen.rank == "low"
    key = (site, chosen.seq_bucket, math.prod(out_shape[:-2]), q.device, q.dtype)
    state = _route_states.get(key)
    # Under graph capture no check runs (its results travel home with an event): the
    # captured call, and every replay, routes on the device by the last check's decisions
    # and budgets. No check yet: dense.
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    if capturing and state is None:
        return None
    out, lse, pending, _route_states[key] = rank.route(
        _to4d(qb), _to4d(kb), _to4d(vb), is_causal, scale, chosen.tolerance, forced, state,
        capturing)
    if pending is not None:
        with _cache_lock:
            _pending_checks.append((site, chosen.seq_bucket, forced, pending))
    return out.reshape(out_shape), lse.reshape(out_shape[:-1])


# (site, bucket, dtype, device, ladder) -> precision.LadderState: the rung a site runs at
_ladder_states: Dict[tuple, precision.LadderState] = {}
_SIXTEEN_BIT = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _attn8():
    from .kernels import attn8
    return attn8.forward


def _run_rung(rung, q, k, v, attn_mask, is_causal, scale, enable_gqa):
    """The call at one rung below the inputs' precision, on the Triton kernels: the 8-bit
    kernel, or the dense kernel on a 16-bit copy of fp32 inputs (with the scale folded into
    q, which is what has to fit fp16's range)."""
    if rung == "int8":
        return _flash_forward(q, k, v, attn_mask, is_causal, scale, enable_gqa, _attn8())
    dtype = _SIXTEEN_BIT[rung]
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, lse = _flash_forward((q * sm_scale).to(dtype), k.to(dtype), v.to(dtype), attn_mask,
                              is_causal, 1.0, enable_gqa)
    return out.to(q.dtype), lse


def _laddered_forward(site, chosen, q, k, v, attn_mask, is_causal, scale, enable_gqa):
    """-> ((out, lse), precision): the call at its site's current rung of ``chosen.precisions``
    (None for the result: the input's precision on the reference path),
    checked on sampled rows when the rung is new and every ``precision.CHECK_EVERY`` calls;
    a failed check (or a kernel failure) moves the site up a rung and runs the call again."""
    ladder = chosen.precisions
    key = (site, chosen.seq_bucket, q.dtype, q.device, ladder)
    state = _ladder_states.get(key)
    if state is None:
        state = _ladder_states[key] = precision.LadderState()
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    while state.level < len(ladder) - 1:
        rung = ladder[state.level]
        check = state.calls_to_check <= 0
        if capturing and not (state.verified and not check):
            # nothing may wait for the device here: a rung not verified (or due a check)
            # runs at the inputs' precision until an uncaptured call checks it
            break
        if check and rung == "fp16" and not chosen.precision_forced:
            amax = precision.measure_amax(q, k, v, scale)
            if max(amax) >= planner.FP16_INPUT_MAX or not all(a == a for a in amax):
                _demote(site, state, ladder, rung, None,
                        f"input range {max(amax):.3g} >= {planner.FP16_INPUT_MAX:g}")
                continue
        try:
            result = _run_rung(rung, q, k, v, attn_mask, is_causal, scale, enable_gqa)
        except Exception as exc:  # the next rung up still runs the call
            reason = f"{rung} kernel failed ({type(exc).__name__}: {str(exc)[:200]})"
            warn_once((site, "rung", rung, type(exc).__name__),
                      f"adaattn: site {site}: {reason}; running at {ladder[state.level + 1]}")
            stats.record_fallback(site, reason)
            _demote(site, state, ladder, rung, None, "kernel failed")
            continue
        if not check:
            state.calls_to_check -= 1
            return result, rung
        qb, kb, vb = _broadcast_batch(q, k, v, enable_gqa)
        out4 = result[0].reshape(qb.shape[:-1] + (v.shape[-1],))
        qb, kb, vb, out4 = _to4d(qb), _to4d(kb), _to4d(vb), _to4d(out4)
        error = precision.sampled_error(
            qb, kb, vb, out4, _mask4d(attn_mask), is_causal, scale,
            precision.sample_rows(q.shape[-2], state.checks, q.device),
            precision.sample_heads(kb.shape[0], kb.shape[1], state.checks, q.device))
        state.checks += 1
        if error <= chosen.tolerance or chosen.precision_forced:
            stats.record_precision_check(site, rung, error)
            state.verified = True
            state.calls_to_check = precision.CHECK_EVERY - 1
            return result, rung
        _demote(site, state, ladder, rung, error, f"{error:.2e} > {chosen.tolerance:g}")
    if chosen.kernel != "triton":
        return None, ladder[-1]   # the input's precision on the reference path
    return _flash_forward(q, k, v, attn_mask, is_causal, scale, enable_gqa), ladder[-1]


def _demote(site, state, ladder, rung, error, why):
    """Move ``state`` up one rung (for good: a site whose check failed stays above it)."""
    state.level += 1
    state.verified = False
    state.calls_to_check = 0
    stats.record_precision_check(site, rung, error, ladder[state.level], why)


def _in_layout(out: Tensor, blhd: bool) -> Tensor:
    """``out`` in the layout the op's schema promises: contiguous, or with ``blhd`` a
    (B, H, L, D) view of (B, L, H, D) memory -- where the graph transposes the heads back next
    to each other (every HF model, most hand-written ones), that transpose is then a view, not
    a copy kernel and a second buffer of out's size (SDPA's own kernels return out in q's
    layout for the same reason). The dense kernels write that layout directly; other paths
    are copied here."""
    if not blhd or out.dim() != 4:
        return out.contiguous()
    if out.transpose(1, 2).is_contiguous():
        return out
    return out.transpose(1, 2).contiguous().transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Lanes. A forward call whose whole path is one bound launch of the dense kernel (no gradients
# to follow, no dropout, a plan of one precision with no low-rank path open for the call's
# size, its mask None, causal or a key mask run unproven, nothing to broadcast) is kept under
# one key: the site, policy, kernel and GQA flag with the flash launch signature, which holds
# all the plan's key holds. A later call with that key goes straight to the bound launch: the
# plan's key, the mask-proof test and the layout steps are not taken again. Why: HF models
# that call SDPA are host-bound at batch 1 on the H100 (their GPU work done in 3 ms of a 5 ms
# forward), and every microsecond of the op's Python is paid in every layer, where SDPA's own
# call costs ~25 us. A lane is valid while the site's options (the plan generation) and the
# flash module's bound launches (its epoch) are those it was made with.

class _Lane:
    __slots__ = ("fast", "precision", "heads", "generation", "epoch", "lse_scratch")

    def __init__(self, fast, precision, heads, generation, epoch):
        self.fast, self.precision, self.heads = fast, precision, heads
        self.generation, self.epoch = generation, epoch
        self.lse_scratch = None   # (see _lse_scratch)


_lanes: Dict[tuple, _Lane] = {}
_lane_sites: set = set()   # sites that have had a lane (only their calls build a lane's key)
_LANES_LIMIT = 4096   # (a dynamic-length model makes one per length, as flash's signatures)
_LANES_ON = True   # (off: every call takes the full path; for A/B timing)


def _lane_key(q, k, v, attn_mask, is_causal, scale, enable_gqa, site, policy, kernel,
              out_blhd) -> tuple:
    return (site, policy, kernel, enable_gqa, _flash_module._fwd_signature(
        q, k, v, attn_mask, is_causal, scale, out_blhd))


def _lane_call(q, k, v, attn_mask, is_causal, scale, enable_gqa, site, policy, kernel,
               out_blhd, out_only=False):
    """-> (out, lse, seed) through the call's lane, or None (no valid lane: the full path).
    (The key is built here, not by :func:`_lane_key`: a call less on the op's busiest path.)
    ``out_only``: the caller reads ``out`` alone (see :func:`inductor_attention_out_only`):
    the kernel writes its lse into a buffer shared by the lanes of its shape
    (:func:`_lse_scratch`) and the seed is the shared template, two allocations a call
    fewer."""
    flash = _flash_module
    lane_key = (site, policy, kernel, enable_gqa,
                flash._fwd_signature(q, k, v, attn_mask, is_causal, scale, out_blhd))
    lane = _lanes.get(lane_key)
    if lane is None:
        return None
    if lane.generation != _plan_generation or lane.epoch != flash._FAST_EPOCH:
        _lanes.pop(lane_key, None)
        return None
    lse = lane.lse_scratch if out_only else None
    if out_only and lse is None:
        lse = lane.lse_scratch = _lse_scratch(lane.fast.lse_shape, q.device)
    try:
        out, lse = flash.run_fast(lane.fast, q, k, v, attn_mask, out_blhd,
                                  None if attn_mask is None else _mask_groups.get(site), lse)
    except Exception as exc:  # another triton's launcher: the full path from now on
        flash.fast_launch_failed(exc)
        clear_lanes()
        return None
    stats.record_call(site, "triton", lane.precision, "dense", lane.heads)
    return out, lse, _NO_SEED if out_only else _NO_SEED.new_zeros(1)


# Buffers out-only lane calls write their lse into, one per (device, shape): the sites of a
# model share one (never read; the kernels that write it run in stream order, and a write
# racing another stream's leaves garbage nobody reads), so the memory it holds does not grow
# with the number of sites.
_lse_scratch_buffers: Dict[tuple, Tensor] = {}


def _lse_scratch(shape, device) -> Tensor:
    key = (device, shape)
    with _cache_lock:
        buffer = _lse_scratch_buffers.get(key)
        if buffer is None:
            if len(_lse_scratch_buffers) >= _LANES_LIMIT:
                _lse_scratch_buffers.clear()
            buffer = _lse_scratch_buffers[key] = torch.empty(shape, device=device,
                                                             dtype=torch.float32)
        return buffer


def _lane_holds(site, policy, kernel, chosen, q, k, v, given_mask, attn_mask, given_causal,
                is_causal, enable_gqa) -> bool:
    """Whether a forward call that ran the dense flash kernel would take the same path again,
    with nothing decided on the way (the conditions of a lane, above)."""
    if (site in _training_sites or attn_mask is not given_mask or is_causal != given_causal
            or len(chosen.precisions) != 1):
        return False
    qs, ks, vs = q.shape, k.shape, v.shape
    if not (len(qs) == 4 and qs[0] == ks[0] == vs[0] and (enable_gqa or qs[1] == ks[1] == vs[1])
            and (attn_mask is None or attn_mask.dim() == 4)):
        return False   # (_flash_forward's steps would broadcast or reshape)
    flops = planner.forward_flops(qs, ks[-2], is_causal)
    if chosen.rank != "dense" and flops >= chosen.low_rank_min_flops:
        return False
    return (attn_mask is None or is_causal
            or _key_mask_left_alone(site, attn_mask, q, k, policy, kernel,
                                    planner.forward_flops(qs, ks[-2])))


def _keep_lane(lane_key, generation, precision, q):
    """After a full-path call that the lane conditions hold for: its lane, if flash kept a
    bound launch for its signature (``lane_key[-1]``)."""
    flash = _flash_module
    epoch = flash._FAST_EPOCH
    fast = flash.fast_entry(lane_key[-1])
    if fast is None:
        return
    with _cache_lock:
        if generation != _plan_generation:
            return
        if len(_lanes) >= _LANES_LIMIT:
            _lanes.clear()
        _lanes[lane_key] = _Lane(fast, precision, math.prod(q.shape[:-2]), generation, epoch)
        _lane_sites.add(lane_key[0])


def clear_lanes() -> None:
    with _cache_lock:
        _lanes.clear()
        _lane_sites.clear()
        _lse_scratch_buffers.clear()


def attention_impl(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, site, policy,
                   kernel, out_blhd=False, out_only=False):
    """The forward of ``adaattn::attention`` on real tensors: -> (out, lse, seed).
    ``out_only`` (never through the dispatcher): the caller reads ``out`` alone, so ``lse``
    and ``seed`` may be buffers shared between calls (see :func:`_lane_call`)."""
    lanes_open = (_LANES_ON and dropout_p == 0.0 and _flash_module is not None
                  and _flash_module._FAST_FWD_ON and not getattr(_grad_call, "on", False))
    if lanes_open and site in _lane_sites:   # (other sites don't pay for the lane's key)
        done = _lane_call(q, k, v, attn_mask, is_causal, scale, enable_gqa, site, policy,
                          kernel, out_blhd, out_only)
        if done is not None:
            return done
    generation = _plan_generation
    given_mask, given_causal = attn_mask, is_causal
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=_CPU)
        seed_value = int(seed)
    else:
        seed = _NO_SEED.new_zeros(1)   # a fresh tensor each call: outputs must not alias
        seed_value = 0
    # (the graph's mask node the site reads: keys the mask's proof and its bias tile)
    mask_group = None if attn_mask is None else _mask_groups.get(site)
    if attn_mask is not None and not is_causal:
        attn_mask, is_causal = _drop_proven_mask(site, attn_mask, q, k, True, policy, kernel,
                                                 mask_group)
    chosen = _plan(site, policy, kernel, q, k, v, attn_mask, is_causal, dropout_p, enable_gqa,
                   scale)
    kernel_used = chosen.kernel
    exact_precision = chosen.precisions[-1]   # (the planner's ladder ends with it)
    precision_used = exact_precision
    result = None
    if q.numel() == 0 or k.shape[-2] == 0:   # nothing for a kernel to do (bucket 1 holds L=0)
        kernel_used = "reference"
    else:
        if (kernel_used == "triton" and chosen.rank != "dense"
                and _try_low_rank(site, chosen, q, k, is_causal)):
            try:
                result = _lowrank_forward(q, k, v, is_causal, scale, enable_gqa, site, chosen)
                if result is not None:
                    seed.fill_(_LOW_RANK_SEED)
            except Exception as exc:  # the dense kernel still runs the call
                reason = f"low-rank path failed ({type(exc).__name__}: {str(exc)[:200]})"
                warn_once((site, "lowrank", type(exc).__name__),
                          f"adaattn: site {site}: {reason}; using the dense kernel")
                stats.record_fallback(site, reason)
        try:
            if result is None and len(chosen.precisions) > 1:
                # (the rungs below the input's precision run on our Triton kernels even where
                # the input's own precision runs on the reference path: fp32 without tf32)
                result, precision_used = _laddered_forward(site, chosen, q, k, v, attn_mask,
                                                           is_causal, scale, enable_gqa)
                kernel_used = "triton" if result is not None else "reference"
            elif result is None and kernel_used == "triton":
                result = _flash_forward(q, k, v, attn_mask, is_causal, scale, enable_gqa,
                                        out_blhd=out_blhd, mask_group=mask_group)
                if lanes_open and _lane_holds(site, policy, kernel, chosen, q, k, v, given_mask,
                                              attn_mask, given_causal, is_causal, enable_gqa):
                    _keep_lane(_lane_key(q, k, v, attn_mask, is_causal, scale, enable_gqa, site,
                                         policy, kernel, out_blhd),
                               generation, precision_used, q)
        except Exception as exc:  # never lose the model to a kernel failure
            reason = f"Triton forward failed ({type(exc).__name__}: {str(exc)[:200]})"
            warn_once((site, "fwd", type(exc).__name__),
                      f"adaattn: site {site}: {reason}; using the reference path")
            stats.record_fallback(site, reason)
            kernel_used = "reference"
    if result is None:
        kernel_used = "reference"
        result = reference.reference_forward(q, k, v, attn_mask, is_causal, scale, dropout_p,
                                             enable_gqa, seed_value)
    out, lse = result
    # (batch, head) pairs: the unit the rank choice is made for; those the low-rank path keeps
    # move from "dense" to "low-rank" when the call's check reaches the host
    if kernel_used == "reference":
        precision_used = exact_precision
    stats.record_call(site, kernel_used, precision_used, "dense", math.prod(q.shape[:-2]))
    return _in_layout(out, out_blhd), lse.contiguous(), seed


def _attention_fake(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, site, policy,
                    kernel, out_blhd=False):
    lead_q = q.shape[:-3] if enable_gqa else q.shape[:-2]
    lead_k = k.shape[:-3] if enable_gqa else k.shape[:-2]
    lead_v = v.shape[:-3] if enable_gqa else v.shape[:-2]
    lead = torch.broadcast_shapes(lead_q, lead_k, lead_v)
    if enable_gqa:
        lead = (*lead, q.shape[-3])
    if out_blhd and len(lead) == 2:   # (see _in_layout)
        out = q.new_empty((lead[0], q.shape[-2], lead[1], v.shape[-1])).transpose(1, 2)
    else:
        out = q.new_empty((*lead, q.shape[-2], v.shape[-1]))
    lse = q.new_empty((*lead, q.shape[-2]), dtype=torch.float32)
    seed = torch.empty((1,), dtype=torch.int64, device="cpu")
    return out, lse, seed


def attention_backward_impl(grad_out, q, k, v, attn_mask, out, lse, seed, dropout_p, is_causal,
                            scale, enable_gqa, site, policy, kernel, mask_needs_grad):
    """The backward of ``adaattn::attention``: -> (dq, dk, dv, dmask or an empty tensor)."""
    if attn_mask is not None and not is_causal and not mask_needs_grad:
        attn_mask, is_causal = _drop_proven_mask(site, attn_mask, q, k, count=False,
                                                 group=_mask_groups.get(site))
    chosen = _plan(site, policy, kernel, q, k, v, attn_mask, is_causal, dropout_p, enable_gqa,
                   scale)
    stats.record_backward(site)
    grads = None
    if (chosen.kernel == "triton" and q.numel() and k.shape[-2]
            and int(seed[0]) == _LOW_RANK_SEED):
        # a forward that ran the low-rank path (planned for inference; reached a backward
        # anyway): the gradients of exact attention need the exact output and lse
        out, lse = _flash_forward(q, k, v, attn_mask, is_causal, scale, enable_gqa)
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


def _attention_backward_fake(grad_out, q, k, v, attn_mask, out, lse, seed, dropout_p, is_causal,
                             scale, enable_gqa, site, policy, kernel, mask_needs_grad):
    dmask = attn_mask.new_empty(attn_mask.shape) if mask_needs_grad else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


# ---------------------------------------------------------------------------------------------
# Registration. The dispatcher calls, for a real call: the Autograd kernel (ours, below), which
# either records the autograd node or redispatches straight below autograd to the
# CompositeExplicitAutograd kernel (the impl above). Both Python entry points run with
# Dynamo's frame hook off, as custom_op's (``torch._disable_dynamo``) do, so that Dynamo never
# traces into them when the op runs eagerly under an active compile (e.g. a frame that fell
# back to eager).

try:
    _set_eval_frame = torch._C._dynamo.eval_frame.set_eval_frame
    _get_eval_frame = torch._C._dynamo.eval_frame.get_eval_frame_callback
except AttributeError:  # pragma: no cover - a torch without Dynamo's C hook
    _set_eval_frame = _get_eval_frame = None


def _outside_dynamo(fn):
    """``torch._disable_dynamo(fn)``'s effect for a dispatcher kernel: Dynamo's frame hook is
    off while ``fn`` (and what it calls) runs, and restored after. Done by hand, and only where
    a hook is set (not while a compiled graph runs: Dynamo calls those with it off). The
    decorator sets and restores it on every call, in what is the op's most frequent path: on
    the H100 machine (Python 3.12) the dispatcher-to-body part of a call measured 34 us of its
    96 us (2026-11-25, ``scripts/op_overhead.py``)."""
    if _set_eval_frame is None:
        return torch._disable_dynamo(fn)

    @functools.wraps(fn)
    def kernel(*args):
        if _get_eval_frame() is None:
            return fn(*args)
        prior = _set_eval_frame(None)
        try:
            return fn(*args)
        finally:
            _set_eval_frame(prior)
    return kernel


_ATTENTION_SCHEMA = (
    "attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float dropout_p, bool is_causal, "
    "float? scale, bool enable_gqa, str site, str policy, str kernel, bool out_blhd=False) "
    "-> (Tensor, Tensor, Tensor)")
_BACKWARD_SCHEMA = (
    "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? attn_mask, "
    "Tensor out, Tensor lse, Tensor seed, float dropout_p, bool is_causal, float? scale, "
    "bool enable_gqa, str site, str policy, str kernel, bool mask_needs_grad) "
    "-> (Tensor, Tensor, Tensor, Tensor)")

_previous_lib = globals().get("_lib")   # set when importlib.reload(op) runs this again:
if _previous_lib is not None and hasattr(_previous_lib, "_destroy"):
    _previous_lib._destroy()   # drop the first registrations before redefining the ops
_lib = torch.library.Library("adaattn", "FRAGMENT")   # kept alive: it owns the registrations
# flexible_layout: Inductor hands the forward its inputs as they are realised, in any strides
# (the op reads every input through its strides and returns contiguous outputs, which the fake
# implementation says). Under the default (needs_exact_strides) Inductor realised a computed
# input again for every call that reads it, with the traced strides: T5's position bias, read
# by all six encoder layers, became four 256 MiB copies alive at once at L = 4096 (H100).
# cudagraph_unsafe: under torch.compile's CUDA graphs (mode="reduce-overhead") Inductor leaves
# the op's calls out of the graphs it captures (its graph partition captures what lies between
# them): a call's plan, lanes, mask proofs and precision checks run on the host, some of them
# reading the device, every call.
_UNSAFE_FOR_CUDA_GRAPHS = tuple(getattr(torch.Tag, name) for name in ("cudagraph_unsafe",)
                                if hasattr(torch.Tag, name))
_lib.define(_ATTENTION_SCHEMA, tags=(torch.Tag.pt2_compliant_tag,) + tuple(
    getattr(torch.Tag, name) for name in ("flexible_layout",) if hasattr(torch.Tag, name))
    + _UNSAFE_FOR_CUDA_GRAPHS)
_lib.define(_BACKWARD_SCHEMA, tags=(torch.Tag.pt2_compliant_tag,) + _UNSAFE_FOR_CUDA_GRAPHS)
_lib.impl("attention", _outside_dynamo(attention_impl), "CompositeExplicitAutograd")
_lib.impl("attention_backward", _outside_dynamo(attention_backward_impl),
          "CompositeExplicitAutograd")
torch.library.register_fake("adaattn::attention", _attention_fake, lib=_lib)
torch.library.register_fake("adaattn::attention_backward", _attention_backward_fake, lib=_lib)

_attention = torch.ops.adaattn.attention.default
_attention_backward = torch.ops.adaattn.attention_backward.default
_after_autograd = torch._C._after_autograd_keyset
_below_autograd = torch._C._AutoDispatchBelowAutograd
_any_requires_grad = torch._C._any_requires_grad
_grad_enabled = torch.is_grad_enabled


def _plain_keysets() -> frozenset:
    """Raw dispatch keysets (below autograd) of dense CPU and CUDA tensors with no mode, wrapper
    subclass, functionalization or fake tensor in play: for these, a redispatch would reach
    our CompositeExplicitAutograd kernel directly, so the Autograd kernel calls it itself."""
    try:
        keys = torch._C.DispatchKey
        plain = set()
        for backend in (keys.CPU, keys.CUDA):
            keyset = torch._C.DispatchKeySet(backend)
            plain.add(keyset.raw_repr())
            plain.add((keyset | torch._C.DispatchKeySet(keys.ADInplaceOrView)).raw_repr())
        return frozenset(plain)
    except (AttributeError, RuntimeError):   # a torch without these bindings: always redispatch
        return frozenset()


_PLAIN_KEYSETS = _plain_keysets()


class _AttentionFunction(torch.autograd.Function):
    """The autograd node of a forward call. ``apply(q, k, v, attn_mask, rest)``: the tensors
    apart, ``rest`` = (the op's other arguments..., the dispatch keyset) in one tuple, since
    ``Function.apply`` walks its arguments in Python."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, rest):
        keyset = rest[-1] & _after_autograd
        args = (q, k, v, attn_mask, *rest[:-1])
        _grad_call.on = True   # gradients follow: the plan keeps to exact attention
        try:
            if keyset.raw_repr() in _PLAIN_KEYSETS:   # see _attention_autograd
                out, lse, seed = attention_impl(*args)
            else:
                with _below_autograd():
                    out, lse, seed = _attention.redispatch(keyset, *args)
        finally:
            _grad_call.on = False
        ctx.save_for_backward(q, k, v, attn_mask, out, lse, seed)
        ctx.args = rest[:-1]   # dropout_p, is_causal, scale, enable_gqa, site, policy, kernel,
                               # out_blhd
        ctx.mask_is_float = attn_mask is not None and attn_mask.is_floating_point()
        return out, lse, seed

    @staticmethod
    def backward(ctx, grad_out, grad_lse, grad_seed):
        # (called by the autograd engine, not through the dispatcher: the hook off here too)
        return _backward_outside_dynamo(ctx, grad_out, grad_lse, grad_seed)

    @staticmethod
    def _backward(ctx, grad_out, grad_lse, grad_seed):
        q, k, v, attn_mask, out, lse, seed = ctx.saved_tensors
        dropout_p, is_causal, scale, enable_gqa, site, policy, kernel = ctx.args[:7]
        mask_needs_grad = bool(ctx.mask_is_float and ctx.needs_input_grad[3])
        dq, dk, dv, dmask = _attention_backward(
            grad_out, q, k, v, attn_mask, out, lse, seed, dropout_p, is_causal, scale,
            enable_gqa, site, policy, kernel, mask_needs_grad)
        return dq, dk, dv, dmask if mask_needs_grad else None, None


_backward_outside_dynamo = _outside_dynamo(_AttentionFunction._backward)


class _AttentionBackwardFunction(torch.autograd.Function):
    """The backward op has no derivative: differentiating through it raises."""

    @staticmethod
    def forward(ctx, *args):
        with _below_autograd():
            return _attention_backward.redispatch(args[-1] & _after_autograd, *args[:-1])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("Trying to backward through adaattn::attention_backward, which has "
                           "no autograd formula (adaattn has no double backward)")


def _attention_autograd(keyset, *args):
    if _grad_enabled() and _any_requires_grad(*args):
        return _AttentionFunction.apply(*args[:4], (*args[4:], keyset))
    keyset = keyset & _after_autograd
    if keyset.raw_repr() in _PLAIN_KEYSETS:
        # Where the redispatch would land, without the round trip through the dispatcher
        # (~6 us). No input requires grad (or grad mode is off), so running the kernel's
        # ops above autograd records nothing, as below it.
        return attention_impl(*args)
    with _below_autograd():
        return _attention.redispatch(keyset, *args)


def _attention_backward_autograd(keyset, *args):
    if _grad_enabled() and _any_requires_grad(*args):
        return _AttentionBackwardFunction.apply(*args, keyset)
    keyset = keyset & _after_autograd
    if keyset.raw_repr() in _PLAIN_KEYSETS:
        return attention_backward_impl(*args)
    with _below_autograd():
        return _attention_backward.redispatch(keyset, *args)


_lib.impl("attention", _outside_dynamo(_attention_autograd), "Autograd",
          with_keyset=True)
_lib.impl("attention_backward", _outside_dynamo(_attention_backward_autograd), "Autograd",
          with_keyset=True)


# ---------------------------------------------------------------------------------------------
# Inductor's direct call. The wrapper code Inductor writes for a graph calls these in place of
# ``torch.ops.adaattn.attention.default`` (see inductor_call.py). The dispatcher's round trip
# for a Python kernel (the overload's __call__, boxing twelve arguments, the Autograd and
# CompositeExplicitAutograd kernels with their Dynamo-hook guards) cost ~14 us of the op's
# ~60 us a call on the H100 host, where torch's SDPA call costs ~25 us in all: in HF models at
# batch 1, host-bound, it is paid in every layer. Inside a compiled graph the dispatcher would
# reach attention_impl with nothing recorded on the way; wherever it might do more (a torch
# dispatch mode, the profiler, an input that requires grad under grad mode, a tensor subclass,
# a Dynamo frame hook), the call goes through the dispatcher as before.

_DIRECT_CALL = os.environ.get("ADAATTN_DIRECT_CALL", "1") != "0"   # (off: the dispatcher, for A/B)
_Tensor = torch.Tensor
_profiler_on = torch._C._autograd._profiler_enabled
_dispatch_modes = torch._C._len_torch_dispatch_stack


def _direct_ok(q, k, v, attn_mask) -> bool:
    return (_DIRECT_CALL and type(q) is _Tensor and type(k) is _Tensor and type(v) is _Tensor
            and (attn_mask is None or type(attn_mask) is _Tensor)
            and not _dispatch_modes() and not _profiler_on()
            and (_get_eval_frame is None or _get_eval_frame() is None)
            and not (_grad_enabled() and _any_requires_grad(q, k, v, attn_mask)))


def inductor_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, site,
                       policy, kernel, out_blhd=False):
    """``adaattn::attention`` as Inductor's generated code calls it: -> (out, lse, seed)."""
    if _direct_ok(q, k, v, attn_mask):
        return attention_impl(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, site,
                              policy, kernel, out_blhd)
    return _attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, site, policy,
                      kernel, out_blhd)


def inductor_attention_out_only(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                site, policy, kernel, out_blhd=False):
    """:func:`inductor_attention` for a call whose graph reads ``out`` alone (inference): its
    ``lse`` and ``seed`` may be buffers shared between calls, never read."""
    if _direct_ok(q, k, v, attn_mask):
        return attention_impl(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, site,
                              policy, kernel, out_blhd, True)
    return _attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, site, policy,
                      kernel, out_blhd)
