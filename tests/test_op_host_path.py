"""The op's per-call host path: run-time counters stay exact (also from two threads at once),
every dispatch route (no_grad, autograd, inference_mode, a dispatch mode, fake tensors) gives
the same result, and the plan cache re-plans when it should."""
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

import adaattn_compile
from adaattn_compile import op
from adaattn_compile.options import Options
from adaattn_compile.planner import seq_bucket
from helpers import RecordingMode, rel_err

attention = torch.ops.adaattn.attention.default


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def call(q, k, v, mask=None, site="direct", policy="balanced", kernel="reference", causal=False):
    return attention(q, k, v, mask, 0.0, causal, None, False, site, policy, kernel)


def test_stats_count_calls_kernels_precisions_and_heads():
    adaattn_compile.reset_stats()
    shapes = [(1, 2, 8, 16), (3, 2, 5, 16), (4, 8, 16), (2, 1, 3, 9, 8)]  # heads 2, 6, 4, 6
    n = 0
    heads = 0
    for rep in range(3):
        for i, shape in enumerate(shapes):
            q = rand(*shape, seed=i)
            adaattn_compile.attention(q, q, q, kernel="reference")
            n += 1
            heads += q.numel() // (shape[-2] * shape[-1])
    q64 = rand(1, 2, 4, 8, dtype=torch.float64)
    adaattn_compile.attention(q64, q64, q64)
    call(rand(1, 3, 4, 8), rand(1, 3, 6, 8), rand(1, 3, 6, 8), site="t-other")
    snap = adaattn_compile.stats()
    entry = snap["direct"]
    assert entry["calls"] == n + 1
    assert entry["kernel"] == {"reference": n + 1}
    assert entry["precision"] == {"fp32": n, "fp64": 1}
    assert entry["rank"] == {"dense": heads + 2}
    assert entry["backward_calls"] == 0 and entry["fallbacks"] == [] and entry["demotions"] == 0
    other = snap["t-other"]
    assert (other["calls"], other["kernel"], other["rank"]) == (1, {"reference": 1}, {"dense": 3})
    assert list(snap) == ["direct", "t-other"]   # sites in the order first seen

    # A snapshot is a copy: later calls and backward passes don't change it.
    q = rand(2, 2, 6, 8).requires_grad_()
    adaattn_compile.attention(q, q, q).sum().backward()
    assert entry["calls"] == n + 1
    after = adaattn_compile.stats()["direct"]
    assert after["calls"] == n + 2 and after["backward_calls"] == 1
    assert after["rank"] == {"dense": heads + 2 + 4}
    assert type(after["kernel"]) is dict

    adaattn_compile.reset_stats()
    assert adaattn_compile.stats() == {}


def test_two_threads_share_the_op_and_its_counters():
    """Two threads call the op 200 times each, at once: results equal the single-threaded
    ones and no count is lost."""
    inputs = [tuple(rand(2, 2, 7 + t, 16, seed=3 * t + i) for i in range(3)) for t in range(2)]
    expected = [call(*qkv, site="t-threads")[0] for qkv in inputs]
    adaattn_compile.reset_stats()
    per_thread = 200
    start = threading.Barrier(2)
    errors = []

    def work(t):
        try:
            start.wait()
            for i in range(per_thread):
                out = call(*inputs[t], site="t-threads")[0]
                if not torch.equal(out, expected[t]):
                    errors.append(f"thread {t} call {i}: wrong result")
                    return
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)   # switch threads as often as possible
    try:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    entry = adaattn_compile.stats()["t-threads"]
    assert entry["calls"] == 2 * per_thread
    assert entry["kernel"] == {"reference": 2 * per_thread}
    assert entry["precision"] == {"fp32": 2 * per_thread}
    assert entry["rank"] == {"dense": 2 * per_thread * 4}


def test_two_threads_run_one_compiled_model():
    torch.manual_seed(0)

    def fn(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ v
    compiled = torch.compile(fn, backend=adaattn_compile.backend(policy="exact", inner="eager"))
    inputs = [tuple(rand(2, 2, 9, 16, seed=3 * t + i) for i in range(3)) for t in range(2)]
    with torch.no_grad():
        expected = [compiled(*qkv) for qkv in inputs]   # compiles once, here
    for qkv, out in zip(inputs, expected):
        assert rel_err(out, fn(*qkv)) < 1e-5
    adaattn_compile.reset_stats()
    errors = []
    start = threading.Barrier(2)

    def work(t):
        try:
            start.wait()
            with torch.no_grad():
                for _ in range(100):
                    if not torch.equal(compiled(*inputs[t]), expected[t]):
                        errors.append(f"thread {t}: wrong result")
                        return
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors
    snap = adaattn_compile.stats()
    assert sum(e["calls"] for e in snap.values()) == 200



@pytest.mark.parametrize("variant", ["plain", "mask", "causal"])
def test_every_dispatch_route_gives_the_same_result(variant):
    q, k, v = rand(2, 3, 7, 16, seed=1), rand(2, 3, 9, 16, seed=2), rand(2, 3, 9, 16, seed=3)
    mask = rand(1, 3, 7, 9, seed=4) if variant == "mask" else None
    causal = variant == "causal"
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    with torch.no_grad():
        out_no_grad, lse, seed = call(q, k, v, mask, causal=causal)
    assert rel_err(out_no_grad, want) < 1e-5
    assert seed.dtype == torch.int64 and seed.shape == (1,) and int(seed) == 0
    assert out_no_grad.is_contiguous() and lse.is_contiguous() and lse.dtype == torch.float32
    outs = {"grad mode, no input requires grad": call(q, k, v, mask, causal=causal)[0]}
    with torch.inference_mode():
        outs["inference_mode"] = call(q, k, v, mask, causal=causal)[0]
    recorder = RecordingMode()
    with recorder, torch.no_grad():   # a mode on: the redispatch route
        outs["dispatch mode"] = call(q, k, v, mask, causal=causal)[0]
    assert attention in recorder.ops
    qg = q.clone().requires_grad_()
    out_grad = call(qg, k, v, mask, causal=causal)[0]
    assert out_grad.requires_grad and out_grad.grad_fn is not None
    outs["autograd"] = out_grad.detach()
    for name, out in outs.items():
        assert torch.equal(out, out_no_grad), name
    # gradients through the autograd route agree with SDPA's
    out_grad.sum().backward()
    qr = q.clone().requires_grad_()
    F.scaled_dot_product_attention(qr, k, v, attn_mask=mask, is_causal=causal).sum().backward()
    assert rel_err(qg.grad, qr.grad) < 1e-5


def test_fake_and_meta_tensors_take_the_fake_kernel():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        q = mode.from_tensor(rand(2, 3, 7, 16))
        out, lse, seed = call(q, q, q)
    assert out.shape == (2, 3, 7, 16) and lse.shape == (2, 3, 7) and seed.shape == (1,)
    m = torch.empty(2, 3, 7, 16, device="meta")
    out, lse, seed = call(m, m, m)
    assert out.device.type == "meta" and out.shape == (2, 3, 7, 16)


def test_outputs_are_fresh_tensors_each_call():
    q = rand(1, 2, 4, 8)
    a = call(q, q, q)
    b = call(q, q, q)
    for x, y in zip(a, b):
        assert x.data_ptr() != y.data_ptr() or x.numel() == 0
    a[2].add_(5)   # a caller writing into one call's seed leaves the next call's alone
    assert int(call(q, q, q)[2]) == 0


def test_dropout_seed_is_drawn_from_the_torch_generator():
    q = rand(1, 1, 16, 8)
    torch.manual_seed(3)
    out1, _, seed1 = attention(q, q, q, None, 0.5, False, None, False, "direct", "balanced",
                               "reference")
    torch.manual_seed(3)
    expected_seed = int(torch.randint(0, 2**62, (), device="cpu"))
    torch.manual_seed(3)
    out2, _, seed2 = attention(q, q, q, None, 0.5, False, None, False, "direct", "balanced",
                               "reference")
    assert int(seed1) == int(seed2) == expected_seed
    assert torch.equal(out1, out2)


def test_plan_cache_is_per_sequence_bucket():
    site = "t-bucket"
    before = {key for key in op._plan_cache if key[0] == site}
    assert not before
    for length in range(5, 9):   # one bucket: 8
        q = rand(1, 2, length, 16)
        call(q, q, q, site=site)
    assert len([key for key in op._plan_cache if key[0] == site]) == 1
    q = rand(1, 2, 9, 16)   # the next bucket: 16
    call(q, q, q, site=site)
    assert len([key for key in op._plan_cache if key[0] == site]) == 2


def test_cache_key_buckets_agree_with_the_planner():
    # The op keys plans on (L - 1).bit_length() (0 for L = 0): the same classes as seq_bucket.
    def key(length):
        return length and (length - 1).bit_length()
    for a in range(0, 300):
        assert key(a) == key(a + 1) or seq_bucket(a) != seq_bucket(a + 1)
        assert key(a) != key(a + 1) or seq_bucket(a) == seq_bucket(a + 1)


def test_changed_site_options_replan():
    site = "t-replan"
    q = rand(1, 2, 6, 16)
    adaattn_compile.reset_stats()
    op.register_site(site, Options.parse(policy="exact", kernel="reference"))
    call(q, q, q, site=site, policy="exact", kernel="auto")
    plan = [p for key, p in op._plan_cache.items() if key[0] == site]
    assert len(plan) == 1 and plan[0].reason == "forced by kernel='reference'"
    op.register_site(site, Options.parse(policy="exact", kernel="reference"))   # same options
    assert [p for key, p in op._plan_cache.items() if key[0] == site] == plan
    op.register_site(site, Options.parse(policy="exact"))   # changed: planned again
    assert not [key for key in op._plan_cache if key[0] == site]
    call(q, q, q, site=site, policy="exact", kernel="auto")
    (new_plan,) = [p for key, p in op._plan_cache.items() if key[0] == site]
    assert new_plan.reason != "forced by kernel='reference'"
    assert adaattn_compile.stats()[site]["calls"] == 2
