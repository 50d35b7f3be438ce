"""Triton flash-attention kernel (adaattn_compile/kernels/flash.py) vs a float64 torch reference.

On CPU-only machines the kernels run under TRITON_INTERPRET=1 (set by conftest.py), so shapes are
tiny; bf16 and large shapes are GPU-only (the interpreter computes bf16 wrongly).
"""
import math
import os

import pytest
import torch

from adaattn_compile.kernels import flash
from helpers import reference_with_lse

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
if DEV == "cuda":
    TOL[torch.float32] = 2e-3  # TF32 may be enabled by the user; 'highest' is checked separately


@pytest.fixture(autouse=True, scope="module")
def _no_autotune():
    """Use the default config: these tests compile many shape variants, and autotuning each one
    would take minutes on a GPU (the interpreter uses one config anyway)."""
    old = os.environ.get("ADAATTN_FLASH_AUTOTUNE")
    os.environ["ADAATTN_FLASH_AUTOTUNE"] = "0"
    yield
    if old is None:
        os.environ.pop("ADAATTN_FLASH_AUTOTUNE", None)
    else:
        os.environ["ADAATTN_FLASH_AUTOTUNE"] = old


def _rel(a, b, terms=None):
    """Relative L2 error; the floor keeps exactly-zero references (e.g. dq of a query that sees a
    single key) from turning rounding noise into a huge ratio. ``terms``: how many values each
    entry sums (a mask gradient reduced over broadcast dims), whose noise the floor covers."""
    a, b = a.double(), b.double()
    den = max(b.norm().item(), 1e-2 * math.sqrt(terms or b.numel()))
    return (a - b).norm().item() / den


_reference = reference_with_lse  # (tests/helpers.py)


def _make(shape, dtype, layout="contig"):
    """Random tensor of logical shape (B, H, L, D) with a given memory layout."""
    B, H, L, D = shape
    if layout == "contig":
        return torch.randn(shape, device=DEV, dtype=dtype)
    if layout == "blhd":  # (B, L, H, D) storage, transposed view: strided heads / rows
        return torch.randn(B, L, H, D, device=DEV, dtype=dtype).transpose(1, 2)
    if layout == "padded":  # rows padded: stride(-2) > D, a slice of a wider tensor
        return torch.randn(B, H, L, D + 8, device=DEV, dtype=dtype)[..., 3:3 + D]
    if layout == "lastdim":  # last dim not unit stride -> the wrapper copies
        return torch.randn(B, H, D, L, device=DEV, dtype=dtype).transpose(-1, -2)
    raise ValueError(layout)


def _make_mask(kind, mshape, Lq, Lk, dtype):
    if kind is None:
        return None
    if kind == "bool":
        m = torch.rand(mshape, device=DEV) > 0.3
        return m
    m = torch.randn(mshape, device=DEV, dtype=dtype)
    # some -inf entries in the additive mask (never a whole row here)
    drop = torch.rand(mshape, device=DEV) < 0.15
    drop[..., 0] = False
    return m.masked_fill(drop, float("-inf"))


def _check(B, Hq, Hkv, Lq, Lk, D, Dv, dtype, causal=False, mask_kind=None, mshape=None,
           layout="contig", scale=None, mask_grad=False, backward=True, seed=0):
    torch.manual_seed(seed)
    q = _make((B, Hq, Lq, D), dtype, layout)
    k = _make((B, Hkv, Lk, D), dtype, layout)
    v = _make((B, Hkv, Lk, Dv), dtype, layout)
    mask = _make_mask(mask_kind, mshape, Lq, Lk, dtype)
    assert flash.supports(q, k, v, mask, 0.0) is None
    sc = 1.0 / math.sqrt(D) if scale is None else scale

    out, lse = flash.flash_forward(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    assert out.shape == (B, Hq, Lq, Dv) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (B, Hq, Lq) and lse.dtype == torch.float32

    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    mr = None
    if mask is not None and mask.dtype != torch.bool:
        mr = mask.detach().double().requires_grad_(mask_grad)
    elif mask is not None:
        mr = mask
    ref_out, ref_lse = _reference(qr, kr, vr, mr, causal, sc)
    tol = TOL[dtype]
    assert torch.isfinite(out).all()
    assert _rel(out, ref_out) < tol, _rel(out, ref_out)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert torch.equal(lse[~fin], ref_lse[~fin].float())  # -inf where the row is fully masked
    assert _rel(lse[fin], ref_lse[fin]) < tol
    if not backward:
        return
    do = torch.randn_like(out)
    dq, dk, dv, dm = flash.flash_backward(do, q, k, v, out, lse, attn_mask=mask,
                                          is_causal=causal, scale=scale,
                                          mask_needs_grad=mask_grad)
    ref_out.backward(do.double())
    for name, got, want, like in (("dq", dq, qr.grad, q), ("dk", dk, kr.grad, k),
                                  ("dv", dv, vr.grad, v)):
        assert got.shape == like.shape and got.dtype == like.dtype, name
        assert torch.isfinite(got).all(), name
        assert _rel(got, want) < tol, (name, _rel(got, want))
    if mask_grad and mask is not None and mask.dtype != torch.bool:
        assert dm is not None and dm.shape == mask.shape and dm.dtype == mask.dtype
        want = torch.nan_to_num(mr.grad, nan=0.0)
        # (a "headonly" mask's exact gradient is 0: each entry sums B * Lq * Lk values of
        # dS whose fp32 noise is all that is left)
        err = _rel(dm, want, terms=B * Hq * Lq * Lk)
        assert err < tol, ("d_mask", err)
    else:
        assert dm is None


# ----------------------------------------------------------------------------------------------
# shapes / lengths / head dims
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Lq,Lk", [(37, 37), (1, 45), (50, 19), (16, 70), (64, 64)])
def test_lengths(dtype, causal, Lq, Lk):
    _check(2, 2, 2, Lq, Lk, 32, 32, dtype, causal=causal)


@pytest.mark.parametrize("D,Dv,L", [(16, 16, 33), (40, 40, 21), (80, 80, 17), (96, 64, 9),
                                    (112, 112, 9), (128, 128, 13), (64, 40, 29), (32, 96, 18),
                                    (256, 256, 5), (8, 8, 20)])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims(D, Dv, L, causal):
    _check(1, 2, 1, L, L + 3, D, Dv, torch.float16, causal=causal)


@pytest.mark.parametrize("scale", [0.3, -0.2])
def test_head_dims_fp32_scale(scale):
    _check(1, 2, 2, 23, 31, 80, 48, torch.float32, causal=True, scale=scale)


# ----------------------------------------------------------------------------------------------
# GQA / MQA
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("Hkv", [2, 1])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gqa(Hkv, causal, dtype):
    _check(2, 4, Hkv, 41, 29, 32, 32, dtype, causal=causal)


# ----------------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------------
MASK_SHAPES = {
    "pad": lambda B, H, Lq, Lk: (B, 1, 1, Lk),
    "2d": lambda B, H, Lq, Lk: (Lq, Lk),
    "q1": lambda B, H, Lq, Lk: (1, 1, Lq, Lk),
    "full": lambda B, H, Lq, Lk: (B, H, Lq, Lk),
    "col": lambda B, H, Lq, Lk: (B, H, Lq, 1),
    "headonly": lambda B, H, Lq, Lk: (1, H, 1, 1),
}


@pytest.mark.parametrize("mshape", ["pad", "2d", "q1", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bool_mask(mshape, dtype):
    B, H, Lq, Lk = 2, 2, 35, 42
    _check(B, H, H, Lq, Lk, 32, 32, dtype, mask_kind="bool",
           mshape=MASK_SHAPES[mshape](B, H, Lq, Lk))


# "col" / "headonly" masks are constant along each row, so their exact gradient is 0 (softmax is
# shift invariant); in fp16 the rounding of O leaves noise there, so they run in fp32 only.
@pytest.mark.parametrize("mshape,dtype", [
    (m, dt) for m in ("pad", "q1", "full") for dt in (torch.float32, torch.float16)
] + [("col", torch.float32), ("headonly", torch.float32)])
def test_float_mask_with_grad(mshape, dtype):
    B, H, Lq, Lk = 2, 2, 33, 27
    _check(B, H, H, Lq, Lk, 32, 32, dtype, mask_kind="float",
           mshape=MASK_SHAPES[mshape](B, H, Lq, Lk), mask_grad=True)


def test_float_mask_no_grad_requested():
    _check(2, 2, 2, 20, 30, 32, 32, torch.float32, mask_kind="float", mshape=(2, 1, 1, 30),
           mask_grad=False)


def _key_bias(B, H, Lk, values, dtype, seed=0):
    """A (B, H, 1, Lk) additive key row: random normal, or with some keys far from 0, at
    -inf, or every key of the last batch at -inf (its rows fully masked)."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(B, H, 1, Lk, generator=g, dtype=torch.float64)
    if values in ("spread", "far"):
        b[..., 1::5] = float("-inf")
        b[..., 2::7] *= 20.0            # |b| up to ~60 (natural units): scaled, within range
    if values == "far":
        b[..., 3] = -1e4                # a finite bias far from 0: its key block adds it
        b[..., -2] = 200.0
    if values == "far_all":
        # every key block (of 16 keys or more) adds it; (not key 0: the first causal rows
        # would see only far keys, where fp32's rounding of s + b ~ -1e4 costs ~1e-4)
        b[..., 5::7] = -1e4
    if values == "dead":
        b[-1] = float("-inf")
    return b.to(dtype).to(DEV)


@pytest.mark.parametrize("values", ["normal", "spread", "far", "dead"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,Hq,Hkv,heads", [
    (torch.float32, 2, 2, 1), (torch.float16, 2, 2, 1), (torch.float32, 4, 2, 1),
    (torch.float32, 4, 2, 4),
])
def test_key_bias_backward(values, causal, dtype, Hq, Hkv, heads, monkeypatch):
    """An additive key row without its own gradient: dK / dV rows scaled by 2^b at the end
    where one row serves every query head of a kv head and the dtype has the range (fp32,
    bf16; KEY_SCALE), key blocks holding a finite bias beyond the range add it score by score
    (a second pass). Against float64."""
    _check_key_bias(values, causal, dtype, 2, Hq, Hkv, heads, 37, 90, 32, monkeypatch)


@pytest.mark.parametrize("values", ["far", "far_all"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Lk", [70, 90])
def test_key_bias_worklist_pieces(values, causal, Lk, monkeypatch):
    """The first dK / dV pass lists the key blocks it cannot scale in pieces of the second
    pass's BLOCK_N, here 16 keys against its own 32 (the last block's pieces wholly past Lk
    left out: a piece's number names its (batch, head) too), and the persistent second pass
    (four programs here, several pieces each) computes each listed piece. Against float64."""
    monkeypatch.setattr(flash, "_TUNED", {})
    monkeypatch.setattr(flash, "_rest_config", lambda bucket, cap: (16, 16, 4, 1))
    _check_key_bias(values, causal, torch.float32, 2, 2, 2, 1, 37, Lk, 32, monkeypatch)


def test_scaled_key_bias_pass_is_tuned_as_the_unmasked_kernel(monkeypatch):
    """The dK / dV pass that runs the unmasked loop is launched with triton's tuning key of
    the unmasked kernel, a bf16 bias included (the key holds every tensor's dtype: the rows
    go in float32, as the unmasked launch's stand-in mask), so that both run on the same
    tiles. (Launch keys only: the interpreter computes bf16 wrongly.)"""
    keys = []
    real = flash.launch.launch

    def spy(fn, grid, args, consts, device):
        if getattr(getattr(fn, "fn", fn), "__name__", "") == "_attn_bwd_dkdv":
            named = dict(zip(fn.arg_names, args), **consts)
            keys.append((consts["KEY_SCALE"], tuple(named[n] for n in fn.keys)
                         + tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))))
        return real(fn, grid, args, consts, device)

    monkeypatch.setattr(flash.launch, "launch", spy)
    q, k, v = (torch.randn(1, 2, 40, 32, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    bias = torch.randn(1, 1, 1, 40, device=DEV, dtype=torch.bfloat16)
    for mask in (bias, None):
        out, lse = flash.flash_forward(q, k, v, attn_mask=mask)
        flash.flash_backward(torch.ones_like(out), q, k, v, out, lse, attn_mask=mask)
    (p1, scaled), (p2, rest), (p0, plain) = keys
    assert (p1, p2, p0) == (1, 2, 0) and scaled == plain and rest != plain


@pytest.mark.gpu
@pytest.mark.parametrize("values", ["spread", "far", "dead"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_bf16_key_bias(values, causal, D, monkeypatch):
    """bf16 at real sizes, and no less accurate than adding the bias score by score (the
    gradients of a strongly peaked softmax are ill-conditioned in bf16 either way: O is
    rounded before delta = rowsum(dO * O))."""
    new = _check_key_bias(values, causal, torch.bfloat16, 2, 8, 2, 1, 1029, 1100, D,
                          monkeypatch, tol=None)
    monkeypatch.setenv("ADAATTN_FLASH_BWD_KEY_SCALE", "0")
    old = _check_key_bias(values, causal, torch.bfloat16, 2, 8, 2, 1, 1029, 1100, D,
                          monkeypatch, tol=None, paths=False)
    for name in new:
        assert new[name] <= 1.25 * old[name] + 1e-4, (name, new[name], old[name])
        assert new[name] < max(TOL[torch.bfloat16], 1.25 * old[name]), (name, new[name])


def _check_key_bias(values, causal, dtype, B, Hq, Hkv, heads, Lq, Lk, D, monkeypatch,
                    tol=True, paths=True):
    """-> the relative errors of dq, dk, dv against float64 (``tol``: asserted < TOL;
    ``paths``: the dK / dV and dQ paths the launches took, asserted)."""
    launched = {}
    real = flash.launch.launch

    tune_keys = {}

    def spy(fn, grid, args, consts, device):
        name = getattr(getattr(fn, "fn", fn), "__name__", "")
        launched.setdefault(name, []).append(consts)
        if hasattr(fn, "keys"):   # triton's tuning key: the named values, every tensor's dtype
            named = dict(zip(fn.arg_names, args), **consts)
            tune_keys.setdefault(name, []).append(
                tuple(named[n] for n in fn.keys)
                + tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor)))
        return real(fn, grid, args, consts, device)

    monkeypatch.setattr(flash.launch, "launch", spy)
    torch.manual_seed(3)
    q = torch.randn(B, Hq, Lq, D, device=DEV, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, device=DEV, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, D, device=DEV, dtype=dtype)
    mask = _key_bias(B, heads, Lk, values, dtype)
    out, lse = flash.flash_forward(q, k, v, attn_mask=mask, is_causal=causal)
    do = torch.randn_like(out)
    dq, dk, dv, dm = flash.flash_backward(do, q, k, v, out, lse, attn_mask=mask,
                                          is_causal=causal)
    assert dm is None
    if paths:
        # (two dK / dV passes where the rows are scaled: the scaled blocks, then the rest)
        scaled = dtype != torch.float16 and (heads == 1 or Hq == Hkv)
        assert [c["KEY_SCALE"] for c in launched["_attn_bwd_dkdv"]] == ([1, 2] if scaled
                                                                         else [0])
        assert [c["HAS_MASK"] for c in launched["_attn_bwd_dkdv"]] == ([False, True] if scaled
                                                                        else [True])
        if scaled:   # the scaled pass is tuned as the unmasked kernel is (the same tiles)
            launched.clear()
            flash.flash_backward(do, q, k, v, *flash.flash_forward(q, k, v, is_causal=causal),
                                 is_causal=causal)
            assert tune_keys["_attn_bwd_dkdv"][0] == tune_keys["_attn_bwd_dkdv"][-1]
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = _reference(qr, kr, vr, mask.double(), causal, 1.0 / math.sqrt(D))
    ref.backward(do.double())
    errs = {}
    for name, got, want in (("dq", dq, qr.grad), ("dk", dk, kr.grad), ("dv", dv, vr.grad)):
        want = torch.nan_to_num(want, nan=0.0)
        assert torch.isfinite(got).all(), name
        errs[name] = _rel(got, want)
        if tol:
            assert errs[name] < TOL[dtype], (name, errs[name])
    if values == "dead":
        assert (dk[-1] == 0).all() and (dv[-1] == 0).all() and (dq[-1] == 0).all()
    return errs


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_with_causal_and_gqa(kind):
    B, Hq, Hkv, Lq, Lk = 2, 4, 2, 39, 39
    _check(B, Hq, Hkv, Lq, Lk, 32, 32, torch.float32, causal=True, mask_kind=kind,
           mshape=(B, Hq, Lq, Lk), mask_grad=(kind == "float"))


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fully_masked_rows(kind, dtype):
    B, H, Lq, Lk, D = 2, 2, 30, 25, 32
    torch.manual_seed(1)
    if kind == "bool":
        mask = torch.rand(B, 1, Lq, Lk, device=DEV) > 0.4
        mask[0, 0, 3] = False
        mask[1, 0, 17:21] = False
        mask[:, :, -1] = False
    else:
        mask = torch.randn(B, 1, Lq, Lk, device=DEV, dtype=dtype)
        mask[0, 0, 3] = float("-inf")
        mask[1, 0, 17:21] = float("-inf")
        mask[:, :, -1] = float("-inf")
    q = torch.randn(B, H, Lq, D, device=DEV, dtype=dtype)
    k = torch.randn(B, H, Lk, D, device=DEV, dtype=dtype)
    v = torch.randn(B, H, Lk, D, device=DEV, dtype=dtype)
    out, lse = flash.flash_forward(q, k, v, attn_mask=mask)
    assert (out[0, :, 3] == 0).all() and (out[1, :, 17:21] == 0).all()
    assert (out[:, :, -1] == 0).all()
    assert torch.isneginf(lse[0, :, 3]).all() and torch.isneginf(lse[:, :, -1]).all()
    # the math path of SDPA (torch >= 2.5) returns zeros for fully masked rows, too
    sd = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                          attn_mask=mask if kind == "bool"
                                                          else mask.double())
    assert _rel(out, torch.nan_to_num(sd, nan=0.0)) < TOL[dtype]
    # the full comparison incl. gradients (zero for the masked rows)
    _check_masked_rows_grads(q, k, v, mask, out, lse, dtype)


def _check_masked_rows_grads(q, k, v, mask, out, lse, dtype):
    do = torch.randn_like(out)
    mg = mask.dtype != torch.bool
    dq, dk, dv, dm = flash.flash_backward(do, q, k, v, out, lse, attn_mask=mask,
                                          mask_needs_grad=mg)
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    mr = mask.double().requires_grad_() if mg else mask
    ref, _ = _reference(qr, kr, vr, mr, False, 1.0 / math.sqrt(q.shape[-1]))
    ref.backward(do.double())
    for got, want in ((dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        assert torch.isfinite(got).all()
        assert _rel(got, want) < TOL[dtype]
    assert (dq[0, :, 3] == 0).all()
    if mg:
        assert _rel(dm, torch.nan_to_num(mr.grad, nan=0.0)) < TOL[dtype]


# ----------------------------------------------------------------------------------------------
# layouts
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["blhd", "padded", "lastdim"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_strided_inputs(layout, dtype):
    _check(2, 4, 2, 27, 35, 32, 32, dtype, causal=True, layout=layout)


def test_strided_grad_out_and_lse():
    torch.manual_seed(3)
    B, H, L, D = 2, 2, 25, 32
    q, k, v = (torch.randn(B, L, H, D, device=DEV).transpose(1, 2) for _ in range(3))
    out, lse = flash.flash_forward(q, k, v)
    do = torch.randn(B, L, H, D, device=DEV).transpose(1, 2)
    lse_t = lse.transpose(1, 2).contiguous().transpose(1, 2)  # strided lse
    out_t = out.transpose(1, 2).contiguous().transpose(1, 2)
    dq, dk, dv, _ = flash.flash_backward(do, q, k, v, out_t, lse_t)
    dq2, dk2, dv2, _ = flash.flash_backward(do.contiguous(), q.contiguous(), k.contiguous(),
                                            v.contiguous(), out, lse)
    for a, b in ((dq, dq2), (dk, dk2), (dv, dv2)):
        assert _rel(a, b) < 1e-6


# ----------------------------------------------------------------------------------------------
# tensor-descriptor (Hopper / TMA) forward: on CPU forced under the interpreter
# ----------------------------------------------------------------------------------------------
def _tma_calls(monkeypatch):
    monkeypatch.setenv("ADAATTN_FLASH_TMA", "force" if DEV == "cpu" else "1")
    calls = []
    orig = flash._launch_fwd_tma
    monkeypatch.setattr(flash, "_launch_fwd_tma", lambda *a, **k: (calls.append(1), orig(*a, **k)))
    return calls


_TMA_CASES = [  # B, Hq, Hkv, Lq, Lk, D, Dv, causal, layout
    (2, 2, 2, 37, 37, 32, 32, False, "contig"),
    (2, 2, 2, 50, 19, 32, 32, True, "blhd"),
    (2, 4, 1, 41, 29, 32, 32, True, "contig"),
    (1, 2, 1, 21, 24, 40, 40, False, "blhd"),
    (1, 2, 1, 9, 12, 96, 64, True, "contig"),
    (1, 2, 1, 18, 21, 32, 96, False, "contig"),
    (1, 2, 1, 20, 23, 8, 8, True, "blhd"),
]


@pytest.mark.parametrize("case", _TMA_CASES)
def test_descriptor_path(case, monkeypatch):
    B, Hq, Hkv, Lq, Lk, D, Dv, causal, layout = case
    calls = _tma_calls(monkeypatch)
    _check(B, Hq, Hkv, Lq, Lk, D, Dv, torch.float16, causal=causal, layout=layout)
    cap = torch.cuda.get_device_capability() if DEV == "cuda" else (9, 0)
    assert bool(calls) == (cap[0] == 9)


@pytest.mark.parametrize("mshape", ["pad", "2d", "full"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_descriptor_path_masks(mshape, kind, monkeypatch):
    """float "pad" masks of the inputs' dtype take the tensor-core bias add (BIAS_ROWS)."""
    B, H, Lq, Lk = 2, 2, 35, 42
    calls = _tma_calls(monkeypatch)
    _check(B, H, H, Lq, Lk, 32, 32, torch.float16, mask_kind=kind, causal=True,
           mshape=MASK_SHAPES[mshape](B, H, Lq, Lk), backward=False)
    cap = torch.cuda.get_device_capability() if DEV == "cuda" else (9, 0)
    assert bool(calls) == (cap[0] == 9)


def test_descriptor_path_misaligned_falls_back(monkeypatch):
    calls = _tma_calls(monkeypatch)
    _check(2, 2, 2, 27, 35, 32, 32, torch.float16, layout="padded", backward=False)
    assert not calls


def test_backward_tuning_is_keyed_by_length_bucket():
    """The backward kernels are tuned per power-of-two length bucket (a config tuned at one
    length served every length before)."""
    assert "TUNE_L" in flash._KEY_EXTRA["dkdv"] and "TUNE_L" in flash._KEY_EXTRA["dq"]
    assert [flash._tune_bucket(L, L) for L in (1, 100, 128, 129, 2048, 3000, 16384, 10 ** 6)] \
        == [7, 7, 7, 8, 11, 12, 14, 15]
    assert flash._tune_bucket(10, 5000) == flash._tune_bucket(5000, 10) == 13


def test_inv_split():
    for dt in (torch.float16, torch.bfloat16):
        for s in (1 / math.sqrt(128), 0.125, 0.3):
            hi, lo, rows = flash._inv_split(s, dt)
            assert hi > 0 and lo >= 0 and rows == (2 if lo > 0 else 1)
            assert float(torch.tensor(hi).to(dt)) == hi and float(torch.tensor(lo).to(dt)) == lo
            assert abs(hi + lo - 1 / s) <= 1e-4 / s


# ----------------------------------------------------------------------------------------------
# supports()
# ----------------------------------------------------------------------------------------------
def test_supports_reasons():
    q = torch.randn(1, 2, 8, 32, device=DEV)
    assert flash.supports(q, q, q, None, 0.0) is None
    assert "dropout" in flash.supports(q, q, q, None, 0.1)
    q64 = q.double()
    assert "float64" in flash.supports(q64, q64, q64, None, 0.0)
    big = torch.randn(1, 1, 4, 300, device=DEV)
    assert "300 > 256" in flash.supports(big, big, big, None, 0.0)
    k3 = torch.randn(1, 3, 8, 32, device=DEV)
    assert flash.supports(torch.randn(1, 4, 8, 32, device=DEV), k3, k3, None, 0.0) is not None
    assert flash.supports(q, q, q, torch.ones(3, 8, dtype=torch.bool, device=DEV), 0.0)
    assert flash.supports(q, q, q, torch.ones(8, 8, dtype=torch.int32, device=DEV), 0.0)
    assert flash.supports(q, q.half(), q, None, 0.0)
    assert flash.supports(q[0], q[0], q[0], None, 0.0)
    assert flash.supports(q, q, q, torch.zeros(1, 1, 8, 8, device=DEV), 0.0) is None


# ----------------------------------------------------------------------------------------------
# GPU only: bf16, larger shapes, tf32 setting
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 128, 80, 256])
def test_gpu_bf16(causal, D):
    _check(2, 4, 2, 300, 277, D, D, torch.bfloat16, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_large(dtype, causal, D):
    _check(2, 8, 2, 1029, 1029, D, D, dtype, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_gpu_bf16_masks(kind):
    B, H, Lq, Lk = 2, 4, 513, 700
    _check(B, H, 2, Lq, Lk, 128, 128, torch.bfloat16, mask_kind=kind, mshape=(B, 1, 1, Lk),
           mask_grad=(kind == "float"))
    _check(B, H, H, Lq, Lk, 64, 64, torch.bfloat16, mask_kind=kind, mshape=(B, H, Lq, Lk),
           causal=True, mask_grad=(kind == "float"))


@pytest.mark.gpu
def test_gpu_fp32_highest_precision():
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 2, 200, 64, device=DEV) for _ in range(3))
        out, _ = flash.flash_forward(q, k, v, is_causal=True)
        ref, _ = _reference(q, k, v, None, True, 1 / 8)
        assert _rel(out, ref) < 1e-5
    finally:
        torch.set_float32_matmul_precision(old)


@pytest.mark.gpu
def test_gpu_vs_sdpa_bf16():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 1024, 128, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    out, _ = flash.flash_forward(q, k, v, is_causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert _rel(out, ref) < 1e-2


@pytest.mark.gpu
def test_gpu_autotuned_path():
    """The autotuned entry points (as used in production / the benchmark)."""
    os.environ["ADAATTN_FLASH_AUTOTUNE"] = "1"
    try:
        _check(2, 8, 2, 1024, 1024, 128, 128, torch.bfloat16, causal=True)
        _check(2, 8, 8, 777, 1024, 64, 64, torch.float16, mask_kind="float", mshape=(2, 1, 1, 1024),
               mask_grad=True)
    finally:
        os.environ["ADAATTN_FLASH_AUTOTUNE"] = "0"


@pytest.mark.parametrize("cap", [(9, 0), (8, 0), (8, 6)])
@pytest.mark.parametrize("bucket", [64, 128, 256, 512])
def test_second_pass_pieces_divide_every_first_pass_block(bucket, cap, monkeypatch):
    """The key-bias backward's first pass lists its unscalable key blocks in pieces of the
    second pass's BLOCK_N: that must divide every BLOCK_N the first pass may be tuned to (the
    GPU candidate tables, small shared memory included, and an override), and the second pass's
    BLOCK_M its BLOCK_N (causal tiling)."""
    monkeypatch.setattr(flash, "_INTERPRET", False)

    def check():
        bm, bn, _, _ = flash._rest_config(bucket, cap)
        firsts = [c.kwargs["BLOCK_N"] for c in flash._configs(
            "dkdv", bucket, cap, flash._config_override("dkdv"))]
        assert firsts and all(n % bn == 0 for n in firsts), (bn, firsts)
        assert bn % bm == 0

    check()
    monkeypatch.setenv("ADAATTN_FLASH_CONFIGS_DKDV", "16,32,4,2;32,128,8,3")
    check()
