"""The op's lanes (``op._lane_call``): a forward call whose path is one bound launch of the
dense kernel goes there straight from its key, from the second call of a key on (the first
launches through triton, flash binds that launch, and the op keeps the lane). On CPU the
bound launches are recording stand-ins that run the interpreted kernel (as in
``test_flash_fast_path.py``): checked here are which calls take a lane, their results against
a float64 reference, the counters, and every condition that keeps a call off its lane."""
import math
import warnings

import pytest
import torch

import adaattn_compile
from adaattn_compile import op
from adaattn_compile.kernels import flash, launch
from adaattn_compile.options import Options
from helpers import RecordingBound, reference_with_lse

attention = torch.ops.adaattn.attention.default
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def lanes(monkeypatch):
    """Bound launches on (recording), lanes empty; yields a dict of counters: ``lane`` (calls
    a lane took), ``launches`` (bound launches run)."""
    counts = {"lane": 0, "launches": []}

    def bind(fn, grid, args, kwargs, device):
        return RecordingBound(fn, grid, args, kwargs, counts["launches"])

    real_lane_call = op._lane_call

    def counting_lane_call(*args):
        done = real_lane_call(*args)
        counts["lane"] += done is not None
        return done

    monkeypatch.setattr(flash, "_FAST_FWD_ON", True)
    monkeypatch.setattr(launch, "bind", bind)
    monkeypatch.setattr(op, "_lane_call", counting_lane_call)
    monkeypatch.setenv("ADAATTN_FLASH_AUTOTUNE", "0")
    op._flash()
    flash._FAST_FWD.clear()
    op.clear_lanes()
    adaattn_compile.reset_stats()
    yield counts
    flash._FAST_FWD.clear()
    op.clear_lanes()


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _inputs(seed, B=2, Hq=4, Hkv=4, Lq=19, Lk=23, D=16, mask_kind=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, Hq, D, generator=g).transpose(1, 2).to(DEV)   # (B, L, H, D) memory
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(DEV)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(DEV)
    mask = None
    if mask_kind == "key":   # a padding mask: (B, 1, 1, Lk)
        mask = torch.rand(B, 1, 1, Lk, generator=g) > 0.3
        mask[..., 0] = True
    elif mask_kind == "full":
        mask = torch.rand(B, 1, Lq, Lk, generator=g) > 0.3
        mask[..., 0] = True
    return q, k, v, None if mask is None else mask.to(DEV)


def _call(q, k, v, mask=None, causal=False, site="t-lane", policy="exact", gqa=False,
          out_blhd=False, dropout=0.0, kernel="triton"):
    return attention(q, k, v, mask, dropout, causal, None, gqa, site, policy, kernel, out_blhd)


def _check(out, lse, q, k, v, mask, causal, gqa=False):
    if gqa:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    ref_out, ref_lse = reference_with_lse(q, k, v, mask, causal, 1 / math.sqrt(q.shape[-1]))
    assert _rel(out, ref_out) < 1e-4
    ok = torch.isfinite(ref_lse)
    assert torch.allclose(lse[ok].double(), ref_lse[ok].double(), atol=1e-4)


@pytest.mark.parametrize("mask_kind,causal,gqa,out_blhd", [
    (None, False, False, False), (None, True, False, True), ("key", False, False, True),
    ("key", True, True, False), (None, False, True, True)])
def test_the_second_call_of_a_key_takes_its_lane(lanes, mask_kind, causal, gqa, out_blhd):
    calls = 5
    for call in range(calls):   # fresh inputs each call: a stale tensor would show
        q, k, v, mask = _inputs(call, Hkv=2 if gqa else 4, mask_kind=mask_kind)
        out, lse, seed = _call(q, k, v, mask, causal, gqa=gqa, out_blhd=out_blhd)
        _check(out, lse, q, k, v, mask, causal, gqa)
        assert out.transpose(1, 2).is_contiguous() if out_blhd else out.is_contiguous()
        assert seed.device.type == "cpu" and int(seed) == 0
        assert lanes["launches"][-1][0] is q if call else True   # the call's own q
    assert lanes["lane"] == calls - 1
    assert len(lanes["launches"]) == calls - 1   # the first call launched through triton
    entry = adaattn_compile.stats()["t-lane"]
    assert entry["calls"] == calls and entry["kernel"] == {"triton": calls}
    assert entry["precision"] == {"fp32": calls}
    assert entry["rank"] == {"dense": calls * q.shape[0] * q.shape[1]}


@pytest.mark.parametrize("mask_kind,causal", [(None, False), ("key", True)])
def test_out_only_calls_write_lse_into_the_lanes_buffer(lanes, mask_kind, causal):
    """Inductor's direct call for a graph that reads ``out`` alone
    (``op.inductor_attention_out_only``): on its lane the kernel's lse goes into one buffer
    the lanes of its shape share, the seed is the shared template, and ``out`` is new every
    call."""
    outs = []
    for call in range(4):
        q, k, v, mask = _inputs(call, mask_kind=mask_kind)
        out, lse, seed = op.inductor_attention_out_only(q, k, v, mask, 0.0, causal, None, False,
                                                        "t-lane", "exact", "triton", True)
        _check(out, lse, q, k, v, mask, causal)   # (the buffer holds this call's lse)
        outs.append((out, lse, seed))
    assert lanes["lane"] == 3
    lane_lses = {lse.data_ptr() for _, lse, _ in outs[1:]}
    assert len(lane_lses) == 1 and outs[0][1].data_ptr() not in lane_lses
    assert all(seed is op._NO_SEED for _, _, seed in outs[1:])
    assert len({out.data_ptr() for out, _, _ in outs}) == 4   # (all alive: none reused)
    for _ in range(2):   # another site's lane of the same shape: the same buffer
        q, k, v, mask = _inputs(9, mask_kind=mask_kind)
        _, lse, _ = op.inductor_attention_out_only(q, k, v, mask, 0.0, causal, None, False,
                                                   "t-lane-2", "exact", "triton", True)
    assert lanes["lane"] == 4 and lse.data_ptr() in lane_lses
    for call, (out, _, _) in enumerate(outs):   # earlier outputs untouched by later calls
        q, k, v, mask = _inputs(call, mask_kind=mask_kind)
        ref, _ = reference_with_lse(q, k, v, mask, causal, 1 / math.sqrt(q.shape[-1]))
        assert _rel(out, ref) < 1e-4


def test_each_signature_has_its_own_lane(lanes):
    q, k, v, _ = _inputs(0)
    for _ in range(2):
        _call(q, k, v)
    assert lanes["lane"] == 1
    for variant in (dict(causal=True), dict(site="t-lane-2"), dict(policy="balanced")):
        out, lse, _ = _call(q, k, v, **variant)   # a new key: the full path (no lane yet)
        _check(out, lse, q, k, v, None, variant.get("causal", False))
    out, lse, _ = _call(q[:, :, :18], k, v)   # a shape differs
    _check(out, lse, q[:, :, :18], k, v, None, False)
    assert lanes["lane"] == 1
    _call(q, k, v)
    assert lanes["lane"] == 2


@pytest.mark.parametrize("why", ["full mask", "gradients", "training site", "dropout",
                                 "broadcast batch"])
def test_calls_with_something_to_decide_take_no_lane(lanes, why):
    """A mask to prove, gradients to follow, a site compiled for training, dropout and
    inputs _flash_forward reshapes keep every call on the full path."""
    site = f"t-nolane-{why}"
    if why == "training site":
        op.register_site(site, Options.parse(policy="exact", kernel="triton"), training=True)
    for call in range(4):
        q, k, v, mask = _inputs(call, mask_kind="full" if why == "full mask" else None)
        if why == "gradients":
            q.requires_grad_()
        if why == "broadcast batch":
            k, v = k[:1], v[:1]   # (1, H, L, D) keys for a batch of 2 queries
        out, lse, _ = _call(q, k, v, mask, site=site, dropout=0.1 if why == "dropout" else 0.0)
        if why == "broadcast batch":
            k, v = k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)
        if why != "dropout":
            _check(out.detach(), lse.detach(), q.detach(), k, v, mask, False)
    assert lanes["lane"] == 0 and not [key for key in op._lanes if key[0] == site]
    op._site_options.pop(site, None)
    op._training_sites.discard(site)


def test_changed_site_options_leave_the_lane(lanes):
    site = "t-lane-options"
    op.register_site(site, Options.parse(policy="exact", kernel="triton"))
    q, k, v, _ = _inputs(0)
    for _ in range(2):   # (kernel "": the site's own)
        _call(q, k, v, site=site, kernel="")
    assert lanes["lane"] == 1
    op.register_site(site, Options.parse(policy="exact", kernel="reference"))   # a new plan
    out, lse, _ = _call(q, k, v, site=site, kernel="")
    assert lanes["lane"] == 1
    assert adaattn_compile.stats()[site]["kernel"] == {"triton": 2, "reference": 1}
    _check(out, lse, q, k, v, None, False)
    op._site_options.pop(site, None)


def test_dropped_bound_launches_leave_the_lane(lanes):
    q, k, v, _ = _inputs(0)
    for _ in range(2):
        _call(q, k, v)
    assert lanes["lane"] == 1
    flash.clear_compiled()   # (bound launches dropped: their epoch moves)
    _call(q, k, v)
    assert lanes["lane"] == 1
    _call(q, k, v)
    assert lanes["lane"] == 2


def test_a_failing_lane_launch_falls_back_to_the_full_path(lanes, monkeypatch):
    q, k, v, _ = _inputs(0)
    _call(q, k, v)
    (lane,) = op._lanes.values()

    def broken(*tensors, **kwargs):
        raise RuntimeError("launcher API changed")

    monkeypatch.setattr(lane.fast, "launch", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, lse, _ = _call(q, k, v)
    assert any("bound launch failed" in str(w.message) for w in caught)
    _check(out, lse, q, k, v, None, False)
    assert flash._FAST_FWD_ON is False and not op._lanes and lanes["lane"] == 0
    out, lse, _ = _call(q, k, v)   # and the calls after it, through triton
    _check(out, lse, q, k, v, None, False)


def test_two_threads_share_lanes_and_counters(lanes):
    """Two threads call the op at once on two signatures: every result right, no count lost."""
    import threading

    inputs = [_inputs(t, Lq=17 + t) for t in range(2)]
    per_thread = 12
    start = threading.Barrier(2)
    errors = []

    def work(t):
        try:
            q, k, v, _ = inputs[t]
            start.wait()
            for _ in range(per_thread):
                out, lse, _ = _call(q, k, v, site="t-lane-threads")
                _check(out, lse, q, k, v, None, False)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    entry = adaattn_compile.stats()["t-lane-threads"]
    assert entry["calls"] == 2 * per_thread and entry["kernel"] == {"triton": 2 * per_thread}
    assert lanes["lane"] >= 2 * (per_thread - 2)   # (the first calls of each may race)
