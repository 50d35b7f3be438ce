"""Bad input, through a compiled model (an SDPA call and a hand-written attention) and through
``adaattn_compile.attention``: each case computes what eager computes or raises the error eager
raises, never a different answer."""
import math

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import adaattn_compile

B, H, L, D = 2, 3, 6, 8


def sdpa_model(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_math(*args):
    """Eager SDPA on its math path, the semantics the op follows (torch's fused CPU kernel
    returns 0 for a query row holding a NaN; the math path, hand-written attention and the
    CUDA kernels give NaN)."""
    with sdpa_kernel([SDPBackend.MATH]):
        return sdpa_model(*args)


def handwritten_model(q, k, v, mask=None):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s + mask if mask.dtype != torch.bool else s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1) @ v


def api(q, k, v, mask=None):
    return adaattn_compile.attention(q, k, v, attn_mask=mask)


def _outcome(fn, *args):
    try:
        return fn(*args), None
    except Exception as exc:   # the error type is what must agree
        return None, exc


def assert_same_behaviour(eager_fn, ours_fn, *args, stock_fn=None):
    """``stock_fn``: the model under stock torch.compile, whose error (dynamo's, raised while
    tracing) is the one a compiled model is held to."""
    ref, ref_exc = _outcome(eager_fn, *args)
    out, exc = _outcome(ours_fn, *args)
    if ref_exc is not None:
        assert exc is not None, f"eager raised {ref_exc!r}; ours returned a value"
        expected = _outcome(stock_fn, *args)[1] if stock_fn is not None else ref_exc
        assert isinstance(exc, type(expected)), (expected, exc)
        return
    stock_exc = _outcome(stock_fn, *args)[1] if stock_fn is not None else None
    if stock_exc is not None:   # stock torch.compile fails where eager does not (dynamo, tracing)
        assert isinstance(exc, type(stock_exc)), (stock_exc, exc)
        return
    assert exc is None, f"ours raised {exc!r} where eager did not"
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6, equal_nan=True)


def _qkv(dtype=torch.float32, b=B, h=H, lq=L, lk=L, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, lq, d, generator=g).to(dtype),
            torch.randn(b, h, lk, d, generator=g).to(dtype),
            torch.randn(b, h, lk, d, generator=g).to(dtype))


def _poison(t, where, value):
    t = t.clone()
    t[where] = value
    return t


def _cases():
    q, k, v = _qkv()
    pad = torch.zeros(B, 1, 1, L)
    yield "nan_q", (_poison(q, (0, 1, 2, 3), float("nan")), k, v)
    yield "nan_k", (q, _poison(k, (1, 0, 4, 0), float("nan")), v)
    yield "nan_v", (q, k, _poison(v, (0, 2, 5, 7), float("nan")))
    yield "inf_q", (_poison(q, (0, 0, 0, 0), float("inf")), k, v)
    yield "inf_k", (q, _poison(k, (0, 0, 1, 0), float("-inf")), v)
    yield "nan_mask", (q, k, v, _poison(pad, (1, 0, 0, 3), float("nan")))
    yield "inf_mask", (q, k, v, _poison(pad, (1, 0, 0, 3), float("inf")))
    yield "dead_row_mask", (q, k, v, torch.zeros(B, 1, L, L).index_fill(2, torch.tensor([1]),
                                                                        float("-inf")))
    yield "int_qkv", tuple(t.long() for t in (q, k, v))
    yield "bool_qkv", tuple(t > 0 for t in (q, k, v))
    yield "int_mask", (q, k, v, torch.zeros(B, 1, 1, L, dtype=torch.int32))
    yield "head_dim_512", _qkv(d=512)
    yield "head_dims_differ", (q, k[..., :4], v)
    yield "lengths_differ", (q, k, v[:, :, :3])
    yield "zero_queries", _qkv(lq=0)
    yield "zero_keys", _qkv(lk=0)
    yield "empty_batch", _qkv(b=0)
    yield "mixed_dtypes", (q, k.double(), v)
    yield "different_devices", (q, k.to("meta"), v)
    yield "expanded_kv", (q, k[:1].expand(B, H, L, D), v[:1].expand(B, H, L, D))
    yield "last_dim_strided", (torch.randn(B, H, L, 2 * D)[..., ::2], k, v)
    yield "one_dim", (q[0, 0, 0], k[0, 0, 0], v[0, 0, 0])
    yield "mask_too_wide", (q, k, v, torch.zeros(B, 1, 1, L + 1))


CASES = list(_cases())


# Where eager SDPA's answer is not defined: torch's CPU kernel does not check that k and v have
# one length (it returned a value); the API raises a clear error instead.
UNDEFINED_IN_EAGER = {"lengths_differ"}


@pytest.mark.parametrize("model", [sdpa_model, handwritten_model], ids=["sdpa", "handwritten"])
@pytest.mark.parametrize("name,args", CASES, ids=[c[0] for c in CASES])
def test_compiled_model_behaves_as_eager(name, args, model):
    if name in UNDEFINED_IN_EAGER and model is sdpa_model:
        pytest.skip("eager's answer undefined")
    eager = sdpa_math if model is sdpa_model else model
    if name == "dead_row_mask" and model is handwritten_model:
        # README's known difference: a row an additive mask sets to -inf entirely gives the
        # op's 0 where eager softmax gives NaN
        eager = lambda *a: handwritten_model(*a).nan_to_num(0.0)   # noqa: E731
    torch._dynamo.reset()
    stock = torch.compile(model, backend="eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=adaattn_compile.backend(inner="eager"))
    assert_same_behaviour(eager, compiled, *args, stock_fn=stock)


@pytest.mark.parametrize("name,args", CASES, ids=[c[0] for c in CASES])
def test_api_behaves_as_sdpa(name, args):
    if name in UNDEFINED_IN_EAGER:
        with pytest.raises(adaattn_compile.AttentionInputError, match="lengths differ"):
            api(*args)
        return
    assert_same_behaviour(sdpa_math, api, *args)
    # every error of the API is a RuntimeError too, as SDPA's are
    exc = _outcome(api, *args)[1]
    assert exc is None or isinstance(exc, RuntimeError), exc


@pytest.mark.parametrize("model", [sdpa_model, handwritten_model], ids=["sdpa", "handwritten"])
def test_mask_requiring_grad(model):
    """An additive mask that requires grad gets eager's gradient."""
    q, k, v = (t.requires_grad_() for t in _qkv())
    mask = torch.randn(B, 1, L, L, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=adaattn_compile.backend(inner="eager"))
    out = compiled(q, k, v, mask)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, mask))
    ref = torch.autograd.grad(model(q, k, v, mask).square().sum(), (q, k, v, mask))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", [sdpa_model, handwritten_model], ids=["sdpa", "handwritten"])
def test_inference_mode_tensors(model):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=adaattn_compile.backend(inner="eager"))
    with torch.inference_mode():
        q, k, v = _qkv()
        out, ref = compiled(q, k, v), model(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out = compiled(*_qkv(seed=1))   # and outside it again, with ordinary tensors
    torch.testing.assert_close(out, model(*_qkv(seed=1)), rtol=1e-5, atol=1e-6)
