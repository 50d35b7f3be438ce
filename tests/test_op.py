"""torch.ops.adaattn.attention / adaattn_compile.attention against a float64 reference."""
import os

import pytest
import torch
import torch.nn.functional as F

import adaattn_compile
from adaattn_compile.options import OptionError
from helpers import reference_attention, rel_err

TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


CASES = [  # (B, Hq, Hkv, Lq, Lk, D, Dv)
    (2, 3, 3, 7, 7, 16, 16),
    (1, 2, 2, 1, 13, 32, 32),
    (2, 4, 4, 17, 5, 40, 24),
    (1, 2, 2, 33, 33, 80, 80),
    (1, 1, 1, 9, 11, 256, 256),
    (2, 8, 2, 12, 12, 64, 64),     # GQA
    (1, 4, 1, 6, 10, 16, 16),      # MQA
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("variant", ["plain", "causal", "bool", "additive"])
def test_forward_matches_float64(case, dtype, variant):
    b, hq, hkv, lq, lk, d, dv = case
    q, k, v = rand(b, hq, lq, d, dtype=dtype, seed=1), rand(b, hkv, lk, d, dtype=dtype, seed=2), \
        rand(b, hkv, lk, dv, dtype=dtype, seed=3)
    mask = None
    if variant == "bool":
        mask = torch.rand(b, 1, lq, lk, generator=torch.Generator().manual_seed(4)) > 0.3
        mask[..., 0] = True
    elif variant == "additive":
        mask = rand(1, hq, 1, lk, seed=5).to(dtype)
    causal = variant == "causal"
    out = adaattn_compile.attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=hq != hkv)
    ref = reference_attention(q, k, v, mask, causal, gqa=hq != hkv)
    assert out.dtype == dtype and out.shape == (b, hq, lq, dv)
    assert rel_err(out, ref) < TOL[dtype] * 10


@pytest.mark.parametrize("layout", ["blhd_transposed", "k_pretransposed", "expanded_batch", "3d", "5d"])
def test_strided_and_odd_layouts(layout):
    b, h, lq, lk, d = 2, 3, 9, 14, 16
    q, k, v = rand(b, h, lq, d, seed=1), rand(b, h, lk, d, seed=2), rand(b, h, lk, d, seed=3)
    if layout == "blhd_transposed":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    elif layout == "k_pretransposed":
        k = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "expanded_batch":
        k, v = k[:1].expand(b, h, lk, d), v[:1].expand(b, h, lk, d)
    elif layout == "3d":
        q, k, v = (t.flatten(0, 1) for t in (q, k, v))
    elif layout == "5d":
        q, k, v = (t.unsqueeze(0).expand(2, *t.shape) for t in (q, k, v))
    out = adaattn_compile.attention(q, k, v, scale=0.3)
    assert rel_err(out, reference_attention(q, k, v, scale=0.3)) < 1e-5
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v, scale=0.3)) < 1e-5


def test_fully_masked_rows_are_zero_like_sdpa():
    q, k, v = rand(1, 2, 4, 8, seed=1), rand(1, 2, 6, 8, seed=2), rand(1, 2, 6, 8, seed=3)
    mask = torch.ones(1, 1, 4, 6, dtype=torch.bool)
    mask[..., 2, :] = False
    out = adaattn_compile.attention(q, k, v, attn_mask=mask)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out[..., 2, :], torch.zeros_like(out[..., 2, :]))
    assert rel_err(out, sdpa) < 1e-6


@pytest.mark.parametrize("variant", ["plain", "causal", "additive", "gqa", "dropout"])
def test_gradients_match_float64(variant):
    b, hq, hkv, lq, lk, d = 2, 4, 2 if variant == "gqa" else 4, 7, 9, 16
    dtype = torch.float64 if variant == "dropout" else torch.float32
    q = rand(b, hq, lq, d, seed=1, dtype=dtype).requires_grad_()
    k = rand(b, hkv, lk, d, seed=2, dtype=dtype).requires_grad_()
    v = rand(b, hkv, lk, d, seed=3, dtype=dtype).requires_grad_()
    mask = rand(1, hq, lq, lk, seed=4, dtype=dtype).requires_grad_() if variant == "additive" else None
    kwargs = dict(attn_mask=mask, is_causal=variant == "causal", enable_gqa=variant == "gqa")
    if variant == "dropout":
        q, k, v = (t[:1, :1, :4, :4].detach().requires_grad_() for t in (q, k, v))

        def f(q, k, v):
            torch.manual_seed(7)   # the same keep-mask on every evaluation
            return adaattn_compile.attention(q, k, v, dropout_p=0.2)
        assert torch.autograd.gradcheck(f, (q, k, v))
        return
    out = adaattn_compile.attention(q, k, v, **kwargs)
    grad = rand(*out.shape, seed=9)
    leaves = [t for t in (q, k, v, mask) if t is not None]
    got = torch.autograd.grad(out, leaves, grad)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    q64, k64, v64 = leaves64[:3]
    m64 = leaves64[3] if mask is not None else None
    ref = reference_attention(q64, k64, v64, m64, kwargs["is_causal"], gqa=kwargs["enable_gqa"])
    want = torch.autograd.grad(ref, leaves64, grad.double())
    for g, w in zip(got, want):
        assert g.shape == w.shape and rel_err(g, w) < 1e-5


def test_dropout_statistics():
    q, k, v = rand(1, 1, 64, 8, seed=1), rand(1, 1, 64, 8, seed=2), torch.ones(1, 1, 64, 8)
    torch.manual_seed(0)
    out = adaattn_compile.attention(q, k, v, dropout_p=0.5)
    # rows of P sum to 1; dropout keeps half and doubles: the mean stays near 1.
    assert abs(out.mean().item() - 1.0) < 0.1 and out.std().item() > 0.05
    torch.manual_seed(0)
    assert torch.equal(out, adaattn_compile.attention(q, k, v, dropout_p=0.5))


def test_opcheck():
    q, k, v = rand(2, 2, 5, 8, seed=1), rand(2, 2, 6, 8, seed=2), rand(2, 2, 6, 8, seed=3)
    mask = rand(1, 2, 5, 6, seed=4).requires_grad_()
    for args in [(q, k, v, None, 0.0, True, None, False, "t", "exact", "auto"),
                 (q.requires_grad_(), k, v, mask, 0.0, False, 0.5, False, "t", "balanced", "auto")]:
        torch.library.opcheck(torch.ops.adaattn.attention.default, args)


@pytest.mark.parametrize("kwargs,match", [
    ({"policy": "turbo"}, "'policy'"),
    ({"kernel": "cuda"}, "'kernel'"),
    ({"dropout_p": 1.5}, "'dropout_p'"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    q = rand(1, 1, 4, 8)
    with pytest.raises((ValueError, OptionError), match=match):
        adaattn_compile.attention(q, q, q, **kwargs)


def test_bad_tensors():
    q = rand(1, 1, 4, 8)
    with pytest.raises(TypeError, match="'k'"):
        adaattn_compile.attention(q, None, q)
    with pytest.raises(ValueError, match="head dims"):
        adaattn_compile.attention(q, rand(1, 1, 4, 6), q)


def test_triton_kernel_forced_under_interpreter():
    """kernel='triton' runs our Triton kernel (TRITON_INTERPRET=1 on CPU)."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.to(device) for t in (rand(1, 2, 9, 16, seed=1), rand(1, 2, 11, 16, seed=2),
                                     rand(1, 2, 11, 16, seed=3)))
    adaattn_compile.reset_stats()
    out = adaattn_compile.attention(q, k, v, is_causal=True, kernel="triton")
    assert rel_err(out.cpu(), reference_attention(q.cpu(), k.cpu(), v.cpu(), causal=True)) < 1e-3
    entry = adaattn_compile.stats()["direct"]
    assert entry["kernel"] == {"triton": 1}, entry


@pytest.mark.parametrize("requires_grad", [False, True])
def test_op_kernels_run_with_dynamos_frame_hook_off(requires_grad):
    """Run eagerly while Dynamo's frame hook is set (a frame Dynamo fell back on runs its
    callees under the hook), the op's Python kernels must not reach the hook: Dynamo would try
    to trace them as new frames. A recording hook stands in for Dynamo's."""
    types = pytest.importorskip("torch._dynamo.types")
    set_eval_frame = torch._C._dynamo.eval_frame.set_eval_frame
    package_dir = os.path.dirname(adaattn_compile.__file__)
    frames = []   # the package's frames the hook saw

    def hook(frame, *rest):
        if frame.f_code.co_filename.startswith(package_dir):
            frames.append(frame.f_code.co_name)
        return types.ConvertFrameReturn()

    q = rand(1, 2, 8, 16).requires_grad_(requires_grad)
    prior = set_eval_frame(hook)
    try:
        out = torch.ops.adaattn.attention.default(q, q, q, None, 0.0, False, None, False,
                                                  "hook-test", "exact", "reference")[0]
        if requires_grad:
            out.sum().backward()
    finally:
        set_eval_frame(prior)
    # the hook ran; what it saw of ours: the hook-off wrapper's own frame (and the autograd
    # node's backward, which only calls that wrapper), none of the kernels'
    assert frames and set(frames) <= {"kernel", "backward"}, frames
