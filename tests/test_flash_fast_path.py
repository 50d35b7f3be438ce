"""flash_forward's per-call fast path (a call signature seen before launches its bound kernel
without taking any decision again). On CPU the kernels run under the interpreter, where direct
launches are off, so ``launch.bind`` is replaced by a stand-in whose bound launch runs the same
interpreted kernel with the tensors it is given: what is checked here is the plumbing (which
tensors reach the kernel, the outputs' shapes, the mask views, when a signature differs) and
the results against a float64 reference. On the GPU every flash test runs the real bound
launches (the second call of each shape)."""
import math
import warnings

import pytest
import torch

from adaattn_compile.kernels import flash, launch
from helpers import RecordingBound, reference_with_lse

SCALE = 1 / math.sqrt(16)   # every test here but the last has head dim 16
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def fast(monkeypatch):
    """The fast path on, with recording bound launches; yields (binds made, launches run)."""
    binds, launches = [], []

    def bind(fn, grid, args, kwargs, device):
        binds.append(args[:6])
        return RecordingBound(fn, grid, args, kwargs, launches)

    monkeypatch.setattr(flash, "_FAST_FWD_ON", True)
    monkeypatch.setattr(launch, "bind", bind)
    monkeypatch.setenv("ADAATTN_FLASH_AUTOTUNE", "0")
    flash._FAST_FWD.clear()
    yield binds, launches
    flash._FAST_FWD.clear()


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _qkv(B, Hq, Hkv, Lq, Lk, D, transposed=False, device=DEV):
    if transposed:   # (B, L, H, D) storage, as attention modules produce it
        return tuple(torch.randn(B, L, H, D, device=device).transpose(1, 2)
                     for L, H in ((Lq, Hq), (Lk, Hkv), (Lk, Hkv)))
    return tuple(torch.randn(B, H, L, D, device=device) for L, H in ((Lq, Hq), (Lk, Hkv), (Lk, Hkv)))


@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_second_call_takes_the_bound_launch_with_its_own_tensors(fast, mask_kind, causal,
                                                                 transposed):
    binds, launches = fast
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 19, 23, 16
    for call in range(3):   # fresh inputs each call: a stale tensor would show in the error
        torch.manual_seed(call)
        q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, D, transposed)
        mask = None
        if mask_kind == "bool":
            mask = torch.rand(B, 1, Lq, Lk, device=DEV) > 0.3
            mask[..., 0] = True
        elif mask_kind == "additive":
            mask = torch.randn(1, Hq, 1, Lk, device=DEV)
        out, lse = flash.flash_forward(q, k, v, mask, causal)
        ref_out, ref_lse = reference_with_lse(q, k, v, mask, causal, SCALE)
        assert out.shape == (B, Hq, Lq, D) and lse.shape == (B, Hq, Lq)
        assert out.is_contiguous() and lse.dtype == torch.float32
        assert _rel(out, ref_out) < 1e-4, call
        ok = torch.isfinite(ref_lse)
        assert torch.allclose(lse[ok].double(), ref_lse[ok].double(), atol=1e-4), call
    assert len(binds) == 1, "one bind for one signature"
    assert len(launches) == 2, "the second and third calls launch the bound kernel"
    for tensors in launches:
        assert tensors[0].data_ptr() != binds[0][0].data_ptr()


@pytest.mark.parametrize("mask_kind", [None, "bool"])
def test_the_bound_launch_keeps_the_blhd_layout(fast, mask_kind):
    """``out_blhd``: out allocated as (B, L, H, D) memory on the bound launch as on the first
    call (the signature tells the two layouts apart), with a mask group passed through."""
    binds, launches = fast
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 19, 23, 16
    for call, blhd in enumerate((True, True, True, False, False)):
        torch.manual_seed(call)
        q, k, v = _qkv(B, Hq, Hkv, Lq, Lk, D, transposed=True)
        mask = None
        if mask_kind == "bool":
            mask = torch.rand(B, 1, 1, Lk, device=DEV) > 0.3
            mask[..., 0] = True
        out, lse = flash.flash_forward(q, k, v, mask, False, None, blhd, "graph0/mask")
        assert out.shape == (B, Hq, Lq, D)
        assert out.transpose(1, 2).is_contiguous() if blhd else out.is_contiguous()
        kept = flash.fast_entry(flash._fwd_signature(q, k, v, mask, False, None, blhd))
        # (the layouts a bound call allocates in one step on CUDA: those of the first call)
        assert kept.out_layout == (tuple(out.shape), tuple(out.stride()))
        assert kept.lse_strides == lse.stride() and lse.is_contiguous()
        ref_out, _ = reference_with_lse(q, k, v, mask, False, SCALE)
        assert _rel(out, ref_out) < 1e-4, call
    assert len(binds) == 2, "one bind for each layout"
    assert len(launches) == 3


def test_a_different_signature_takes_the_full_path(fast, monkeypatch):
    binds, launches = fast
    q, k, v = _qkv(1, 2, 2, 16, 16, 16)
    flash.flash_forward(q, k, v, None, False)
    flash.flash_forward(q, k, v, None, True)                   # causal differs
    flash.flash_forward(q[:, :, :15], k, v, None, False)       # a shape differs
    flash.flash_forward(q, k, v, None, False, 0.5)             # the scale differs
    flash.flash_forward(q, torch.randn(1, 2, 16, 24, device=DEV)[..., :16], v)   # k's strides
    monkeypatch.setenv("ADAATTN_FLASH_BIAS_DOT", "0")          # a switch differs
    flash.flash_forward(q, k, v, None, False)
    assert len(binds) == 6 and launches == []
    flash.flash_forward(q, k, v, None, False)                  # the last signature again
    assert len(binds) == 6 and len(launches) == 1


def test_inputs_that_need_a_copy_are_never_bound(fast):
    binds, launches = fast
    q, k, v = _qkv(1, 2, 2, 16, 16, 16)
    q_cols = torch.randn(1, 2, 16, 16, device=DEV).transpose(2, 3)   # last dim not unit stride: copied
    for _ in range(2):
        out, _ = flash.flash_forward(q_cols, k, v)
        assert _rel(out, reference_with_lse(q_cols, k, v, None, False, SCALE)[0]) < 1e-4
    assert binds == [] and launches == []


def test_a_failing_bound_launch_turns_the_fast_path_off(fast, monkeypatch):
    binds, launches = fast

    def broken(*tensors):
        raise RuntimeError("launcher API changed")

    q, k, v = _qkv(1, 2, 2, 16, 16, 16)
    flash.flash_forward(q, k, v)
    (entry,) = flash._FAST_FWD.values()
    monkeypatch.setattr(entry, "launch", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = flash.flash_forward(q, k, v)
    assert any("bound launch failed" in str(w.message) for w in caught)
    assert _rel(out, reference_with_lse(q, k, v, None, False, SCALE)[0]) < 1e-4
    assert flash._FAST_FWD_ON is False and not flash._FAST_FWD


def test_signature_is_cheap_to_compare_and_complete():
    """Everything the full path decides on is in the signature (shapes, strides, dtypes,
    devices, alignment, mask layout, causal, scale, switches)."""
    q, k, v = _qkv(1, 2, 2, 16, 16, 16, device="cpu")
    base = flash._fwd_signature(q, k, v, None, False, None)
    assert base == flash._fwd_signature(q.clone(), k.clone(), v.clone(), None, False, None)
    offset = torch.randn(1 * 2 * 16 * 16 + 1)[1:].view(1, 2, 16, 16)   # 4-byte, not 16-byte
    variants = [flash._fwd_signature(q.half(), k.half(), v.half(), None, False, None),
                flash._fwd_signature(q, k, v, None, True, None),
                flash._fwd_signature(q, k, v, None, False, 1 / math.sqrt(16)),
                flash._fwd_signature(q, k, v, torch.ones(16, 16, dtype=torch.bool), False, None),
                flash._fwd_signature(q, k, v, torch.ones(16, 16), False, None),
                flash._fwd_signature(offset, k, v, None, False, None)]
    for i, sig in enumerate(variants):
        assert sig != base, i


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [
    # (B, Hq, Hkv, Lq, Lk, D, causal, mask, transposed)
    (1, 12, 12, 1000, 1000, 64, True, None, True),        # Triton forward (causal D=64)
    (2, 8, 2, 513, 777, 128, False, None, False),        # Gluon sm90 forward on Hopper (with
    (2, 8, 8, 300, 300, 128, True, None, True),          # ADAATTN_SM90_MIN_GFLOPS=0), causal
    (1, 4, 4, 257, 129, 96, False, "bool", False),       # padded head dim, bool mask (TMA)
    (2, 4, 1, 200, 200, 64, False, "additive", True),    # MQA, (B, 1, 1, Lk) bias
    (1, 4, 4, 128, 128, 40, True, None, False),
])
def test_real_bound_launches_on_the_gpu(dtype, case, monkeypatch):
    """No stand-ins: the second and third calls of each signature take the real bound launch
    (forward) and the direct launches (backward); every call's results are checked."""
    monkeypatch.setenv("ADAATTN_SM90_MIN_GFLOPS", "0")   # small shapes: the Gluon kernel too
    B, Hq, Hkv, Lq, Lk, D, causal, mask_kind, transposed = case
    flash._FAST_FWD.clear()
    old = flash._FAST_FWD_ON
    flash._FAST_FWD_ON = launch.enabled()
    try:
        for call in range(3):
            torch.manual_seed(call)
            q, k, v = (t.to(dtype) for t in _qkv(B, Hq, Hkv, Lq, Lk, D, transposed))
            mask = None
            if mask_kind == "bool":
                mask = (torch.rand(B, 1, Lq, Lk, device="cuda") > 0.3)
                mask[..., 0] = True
            elif mask_kind == "additive":
                mask = torch.randn(B, 1, 1, Lk, device="cuda", dtype=dtype)
            out, lse = flash.flash_forward(q, k, v, mask, causal)
            grad = torch.randn_like(out)
            dq, dk, dv, _ = flash.flash_backward(grad, q, k, v, out, lse, mask, causal)
            ref_q, ref_k, ref_v = (t.detach().double().requires_grad_(True) for t in (q, k, v))
            ref_out, _ = reference_with_lse(ref_q, ref_k, ref_v, mask, causal, 1 / math.sqrt(D))
            ref_out.backward(grad.double())
            tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
            assert _rel(out, ref_out) < tol, ("out", call)
            for name, got, ref in (("dq", dq, ref_q.grad), ("dk", dk, ref_k.grad),
                                   ("dv", dv, ref_v.grad)):
                assert _rel(got, ref) < 2 * tol, (name, call)
        BD, BDV = (max(16, 1 << (d - 1).bit_length()) for d in (D, D))
        if not flash._use_tma(q, k, v, BD, BDV, causal, mask is not None):
            # (the tensor-descriptor forward is launched through triton: never bound)
            assert flash._FAST_FWD, "the forward's signature was bound"
    finally:
        flash._FAST_FWD_ON = old


def test_autotuner_compiles_every_candidate_before_timing_the_first(monkeypatch):
    """_ParallelCompileAutotuner: on a new tuning key, the first timing compiles all
    candidates (warmup launches, in threads); later timings and keys already tuned do not."""
    import threading

    import triton

    compiled, lock = [], threading.Lock()

    class FakeJit:
        def run(self, *args, **kwargs):
            assert kwargs["warmup"] is True
            with lock:
                compiled.append((args, kwargs["BLOCK_M"], kwargs["num_warps"]))

    configs = [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in ((16, 4), (32, 4),
                                                                          (64, 8))]
    tuner = object.__new__(flash._ParallelCompileAutotuner)
    tuner.fn, tuner.configs = FakeJit(), configs
    timed = []
    monkeypatch.setattr(flash._Autotuner, "prune_configs", lambda self, kwargs: self.configs)
    monkeypatch.setattr(flash._Autotuner, "_bench",
                        lambda self, *args, config, **meta: timed.append(config) or 1.0)
    monkeypatch.setattr(flash.os, "cpu_count", lambda: 4)

    pruned = tuner.prune_configs({})
    for config in pruned:
        tuner._bench("x", 3, config=config, grid=None, warmup=False)
    assert sorted((bm, w) for _, bm, w in compiled) == [(16, 4), (32, 4), (64, 8)]
    assert all(args == ("x", 3) for args, _, _ in compiled)
    assert timed == configs
    tuner._bench("x", 3, config=configs[0], grid=None, warmup=False)   # no new tuning key
    assert len(compiled) == 3


def test_small_calls_stay_off_the_gluon_kernel(monkeypatch):
    """The FLOP bar below which flash_forward keeps a call on the Triton kernel."""
    q = torch.empty(1, 12, 2048, 64, device="meta")
    monkeypatch.delenv("ADAATTN_SM90_MIN_GFLOPS", raising=False)
    assert flash._fwd_flops(q, q, False) == 4 * 12 * 2048 * 2048 * 64
    assert flash._fwd_flops(q, q, True) == 2 * 12 * 2048 * 2048 * 64
    # (measured faster on the Gluon kernel: 6.4 and 4.3 GFLOP)
    assert flash._fwd_flops(q, q, True) > flash._sm90_min_flops()
    llama = torch.empty(1, 32, 1024, 64, device="meta")
    assert flash._fwd_flops(llama, llama, True) > flash._sm90_min_flops()
    small = torch.empty(1, 12, 1024, 64, device="meta")   # 3.2 GFLOP: unmeasured, Triton's
    assert flash._fwd_flops(small, small, False) < flash._sm90_min_flops()
    monkeypatch.setenv("ADAATTN_SM90_MIN_GFLOPS", "0")
    assert flash._sm90_min_flops() == 0
    monkeypatch.setenv("ADAATTN_SM90_MIN_GFLOPS", "not a number")
    assert flash._sm90_min_flops() == 4e9


@pytest.mark.parametrize("reads_mask", [True, False])
def test_a_bool_mask_reaches_the_bound_launch_as_its_kernel_reads_it(reads_mask):
    """A bound launch whose kernel reads the mask gets a bool mask as its uint8 view; one that
    reads a bias tile built from it (the Gluon forward's BIAS_TC) gets the mask as it is."""
    seen = []

    class Bound:
        def __call__(self, q, k, v, mask, out, lse, mask_group=None, mask_owner=None):
            seen.append((mask, mask_group, mask_owner))

    bound = Bound()
    bound.reads_mask = reads_mask
    q, k, v = _qkv(1, 2, 2, 16, 16, 16)
    mask = torch.rand(1, 1, 1, 16, device=DEV) > 0.5
    out, lse = torch.empty(1, 2, 16, 16, device=DEV), torch.empty(1, 2, 16, device=DEV)
    signature = flash._fwd_signature(q, k, v, mask, False, None)
    try:
        flash._remember_fast(signature, bound, out, lse, mask.view(torch.uint8), mask)
        entry = flash._FAST_FWD[signature]
        got_out, got_lse = flash.run_fast(entry, q, k, v, mask, False, "graph0/mask")
    finally:
        flash._FAST_FWD.pop(signature, None)
    (passed, group, owner), = seen
    assert passed.dtype == (torch.uint8 if reads_mask else torch.bool)
    assert passed.data_ptr() == mask.data_ptr() and owner is mask and group == "graph0/mask"
    assert got_out.shape == out.shape and got_lse.shape == lse.shape


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_a_bool_key_mask_through_the_gluon_bound_launch(head_dim):
    """BERT's case on Hopper: a (B, 1, 1, Lk) bool padding mask with masked keys, read as a bias
    tile next to K; the bound launch takes the mask as it is (no uint8 view) and the tile is
    shared by the calls of one mask group. Fresh masks each call: a stale tile would show."""
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)):
        pytest.skip("the Gluon forward runs on sm90")
    import torch.nn.functional as F
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 12, 4096, head_dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    flash._FAST_FWD.clear()
    old = flash._FAST_FWD_ON
    flash._FAST_FWD_ON = launch.enabled()
    try:
        for call in range(4):
            mask = torch.rand(2, 1, 1, 4096, device="cuda") > 0.1
            mask[..., 0] = True
            out, _ = flash.flash_forward(q, k, v, mask, False, None, False, "graph0/mask")
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
            assert _rel(out, ref) < 2e-2, call
        if launch.enabled():
            (entry,) = flash._FAST_FWD.values()
            assert getattr(entry.launch, "reads_mask", True) is False and not entry.mask_bool
    finally:
        flash._FAST_FWD_ON = old
        flash._FAST_FWD.clear()
