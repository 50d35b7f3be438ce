"""The matcher on every hand-written attention style we support, and on look-alikes.

Each style is checked three ways: the number of sites rewritten, what was recognised
(causal / mask / scale / GQA), and the compiled output against eager in float32."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import compile_and_run, rel_err

B, H, L, D = 2, 4, 12, 16


def qkv(lq=L, lk=L, h=H, hkv=None, d=D):
    g = torch.Generator().manual_seed(lq * 100 + lk)
    hkv = hkv or h
    return (torch.randn(B, h, lq, d, generator=g), torch.randn(B, hkv, lk, d, generator=g),
            torch.randn(B, hkv, lk, d, generator=g))


# --- styles: fn(q, k, v) -> out; expected attributes of the single site ------------------------

def matmul_div_sqrt(q, k, v):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    return F.softmax(s, dim=-1) @ v


def torch_matmul_mul_permute(q, k, v):
    s = torch.matmul(q, k.permute(0, 1, 3, 2)) * (q.shape[-1] ** -0.5)
    return torch.matmul(torch.softmax(s, dim=3), v)


def tensor_matmul_mT(q, k, v):
    s = q.matmul(k.mT) * 0.3
    return s.softmax(-1).matmul(v)


def bmm_folded_heads(q, k, v):
    b, h, l, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, -1, d) for t in (q, k, v))
    s = torch.bmm(q3, k3.transpose(1, 2)) / d ** 0.5
    return torch.bmm(F.softmax(s, dim=-1), v3).view(b, h, l, d)


def einsum_bhid(q, k, v):
    s = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bhij,bhjd->bhid", s.softmax(dim=-1), v)


def einsum_blhd_layout(q, k, v):
    ql, kl, vl = (t.transpose(1, 2) for t in (q, k, v))   # (B, L, H, D)
    s = torch.einsum("bqhd,bkhd->bhqk", ql, kl) / 4.0
    return torch.einsum("bhqk,bkhd->bqhd", F.softmax(s, -1), vl)


def einsum_ellipsis(q, k, v):
    s = torch.einsum("...id,...jd->...ij", q, k) * 0.25
    return torch.einsum("...ij,...jd->...id", s.softmax(-1), v)


def baddbmm_alpha_bias(q, k, v):
    b, h, l, d = q.shape
    bias = torch.linspace(-1, 1, l * l).view(1, l, l).expand(b * h, l, l)
    q3, k3, v3 = (t.reshape(b * h, -1, d) for t in (q, k, v))
    s = torch.baddbmm(bias, q3, k3.transpose(1, 2), beta=1.0, alpha=1 / math.sqrt(d))
    return torch.bmm(s.softmax(-1), v3).view(b, h, l, d)


def scale_folded_into_q(q, k, v):
    q = q * q.shape[-1] ** -0.5
    return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


def scale_split_q_and_k(q, k, v):
    d = q.shape[-1]
    s = (q * d ** -0.25) @ (k * d ** -0.25).transpose(-2, -1)
    return s.softmax(-1) @ v


def no_scale_t5(q, k, v):
    s = torch.matmul(q, k.transpose(3, 2))
    return torch.matmul(F.softmax(s.float(), dim=-1).type_as(s), v)


def softmax_upcast_cast_back(q, k, v):
    s = q @ k.transpose(-1, -2) / 4
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return p @ v


def scale_after_mask(q, k, v):
    mask = torch.zeros(L, L)
    mask[:, -3:] = -1e9
    s = (q @ k.transpose(-1, -2) + mask) * 0.25   # the mask is scaled too
    return s.softmax(-1) @ v


STYLES = [
    (matmul_div_sqrt, {"scale": D ** -0.5}),
    (torch_matmul_mul_permute, {"scale": D ** -0.5}),
    (tensor_matmul_mT, {"scale": 0.3}),
    (bmm_folded_heads, {"scale": D ** -0.5}),
    (einsum_bhid, {"scale": D ** -0.5}),
    (einsum_blhd_layout, {"scale": 0.25}),
    (einsum_ellipsis, {"scale": 0.25}),
    (baddbmm_alpha_bias, {"mask": "additive"}),
    (scale_folded_into_q, {"scale": 1.0}),
    (scale_split_q_and_k, {"scale": 1.0}),
    (no_scale_t5, {"scale": 1.0}),
    (softmax_upcast_cast_back, {"scale": 0.25}),
    (scale_after_mask, {"mask": "additive", "scale": 0.25}),
]


@pytest.mark.parametrize("fn,expect", STYLES, ids=[f.__name__ for f, _ in STYLES])
def test_style(fn, expect):
    q, k, v = qkv()
    out, sites, _skipped, _ = compile_and_run(fn, q, k, v)
    assert len(sites) == 1, f"expected one site, got {len(sites)}"
    site = sites[0]
    for key, value in expect.items():
        got = getattr(site, key)
        assert (got == pytest.approx(value)) if isinstance(value, float) else got == value, (key, got)
    assert rel_err(out, fn(q, k, v)) < 1e-5


def test_lq_ne_lk_and_pretransposed_k():
    q, k, v = qkv(lq=5, lk=9)
    kt = k.transpose(-1, -2).contiguous()     # K stored as (B, H, D, L)

    def fn(q, kt, v):
        return torch.softmax(q @ kt * 0.25, dim=-1) @ v
    out, sites, _, _ = compile_and_run(fn, q, kt, v)
    assert len(sites) == 1 and sites[0].q_shape == (B, H, 5, D) and sites[0].k_shape == (B, H, 9, D)
    assert rel_err(out, fn(q, kt, v)) < 1e-5


# --- masks ----------------------------------------------------------------------------------------

FILLS = {"-inf": float("-inf"), "finfo.min": torch.finfo(torch.float32).min, "-10000": -10000.0}


@pytest.mark.parametrize("fill", FILLS, ids=list(FILLS))
@pytest.mark.parametrize("how", ["masked_fill", "where_keep", "where_fill_first"])
def test_bool_padding_masks(fill, how):
    q, k, v = qkv()
    pad = torch.zeros(B, 1, 1, L, dtype=torch.bool)
    pad[0, ..., -4:] = True   # masked keys of batch 0
    value = FILLS[fill]

    def fn(q, k, v, pad):
        s = q @ k.transpose(-1, -2) * 0.25
        if how == "masked_fill":
            s = s.masked_fill(pad, value)
        elif how == "where_keep":
            s = torch.where(~pad, s, torch.tensor(value))
        else:
            s = torch.where(pad, value, s)
        return F.softmax(s, dim=-1) @ v
    out, sites, _, _ = compile_and_run(fn, q, k, v, pad)
    assert len(sites) == 1 and sites[0].mask == "bool" and not sites[0].causal
    assert rel_err(out, fn(q, k, v, pad)) < 1e-5


def test_additive_mask_and_bias_broadcast():
    q, k, v = qkv()
    ext = torch.zeros(B, 1, 1, L)
    ext[1, ..., :3] = torch.finfo(torch.float32).min
    bias = torch.randn(1, H, L, L)

    def fn(q, k, v, ext, bias):
        s = q @ k.transpose(-1, -2) / 4.0
        s = s + bias
        s = s + ext
        return s.softmax(-1) @ v
    out, sites, _, _ = compile_and_run(fn, q, k, v, ext, bias)
    assert len(sites) == 1 and sites[0].mask == "additive"
    assert rel_err(out, fn(q, k, v, ext, bias)) < 1e-5


class TrilBufferAttention(nn.Module):
    """GPT-2 (old HF) style: a registered tril buffer, sliced and compared."""

    def __init__(self, max_len=32):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool))
                             .view(1, 1, max_len, max_len))

    def forward(self, q, k, v):
        lq, lk = q.size(-2), k.size(-2)
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(v.size(-1))
        causal = self.bias[:, :, lk - lq:lk, :lk]
        s = torch.where(causal, s, torch.full([], torch.finfo(s.dtype).min, dtype=s.dtype))
        return torch.matmul(nn.functional.softmax(s, dim=-1), v)


def in_graph_triu(q, k, v):
    lq = q.shape[-2]
    mask = torch.triu(torch.full((lq, lq), float("-inf")), diagonal=1)
    return torch.softmax(q @ k.transpose(-1, -2) * 0.25 + mask, dim=-1) @ v


def in_graph_arange(q, k, v):
    i = torch.arange(q.shape[-2])
    keep = i[:, None] >= i[None, :]
    return torch.softmax((q @ k.transpose(-1, -2) * 0.25).masked_fill(~keep, float("-inf")), -1) @ v


@pytest.mark.parametrize("fn", [TrilBufferAttention(), in_graph_triu, in_graph_arange],
                         ids=["tril_buffer", "in_graph_triu", "in_graph_arange"])
def test_causal_masks_proven(fn):
    q, k, v = qkv()
    out, sites, _, _ = compile_and_run(fn, q, k, v)
    assert len(sites) == 1 and sites[0].causal and sites[0].mask is None
    assert rel_err(out, fn(q, k, v)) < 1e-5


def test_bottom_right_tril_slice_is_not_called_causal():
    """GPT-2's slice with Lq < Lk is bottom-right aligned: not SDPA's top-left causal."""
    q, k, v = qkv(lq=4, lk=10)
    fn = TrilBufferAttention()
    out, sites, _, _ = compile_and_run(fn, q, k, v)
    assert len(sites) == 1 and not sites[0].causal and sites[0].mask == "bool"
    assert rel_err(out, fn(q, k, v)) < 1e-5


# --- dropout, GQA, position biases --------------------------------------------------------------

class DropoutAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.25)

    def forward(self, q, k, v):
        p = F.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1)
        return self.drop(p) @ v


def test_dropout_eval_and_train():
    q, k, v = qkv()
    model = DropoutAttention().eval()
    out, sites, _, _ = compile_and_run(model, q, k, v)
    assert len(sites) == 1 and sites[0].dropout_p == 0.0
    assert rel_err(out, model(q, k, v)) < 1e-5
    model.train()
    torch.manual_seed(0)
    out, sites, _, _ = compile_and_run(model, q, k, v)
    assert len(sites) == 1 and sites[0].dropout_p == 0.25
    # Dropout keeps each probability with p=0.75 and rescales: the mean output is unbiased,
    # and entries differ from the eval output.
    assert not torch.allclose(out, model.eval()(q, k, v))


def repeat_kv(x, n):
    b, h, l, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, l, d).reshape(b, h * n, l, d)


def gqa_repeat_kv(q, k, v):
    n = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n), repeat_kv(v, n)
    return torch.softmax(q @ k.transpose(2, 3) * 0.25, dim=-1) @ v


def gqa_repeat_interleave(q, k, v):
    n = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
    return torch.softmax(q @ k.transpose(2, 3) * 0.25, dim=-1) @ v


@pytest.mark.parametrize("fn", [gqa_repeat_kv, gqa_repeat_interleave])
def test_gqa(fn):
    q, k, v = qkv(h=8, hkv=2)
    out, sites, _, _ = compile_and_run(fn, q, k, v)
    assert len(sites) == 1 and sites[0].gqa_groups == 4 and sites[0].k_shape[1] == 2
    assert rel_err(out, fn(q, k, v)) < 1e-5


class T5Bias(nn.Module):
    def __init__(self):
        super().__init__()
        self.rel = nn.Embedding(32, H)

    def forward(self, q, k, v):
        pos = torch.arange(q.shape[-2])
        bucket = (pos[None, :] - pos[:, None]).clamp(-15, 15) + 16
        bias = self.rel(bucket).permute(2, 0, 1).unsqueeze(0)
        s = torch.matmul(q, k.transpose(3, 2)) + bias
        return torch.matmul(F.softmax(s.float(), dim=-1).type_as(s), v)


class ALiBi(nn.Module):
    def forward(self, q, k, v):
        slopes = torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)]).view(1, H, 1, 1)
        pos = torch.arange(k.shape[-2])
        bias = slopes * (pos[None, :] - pos[:, None]).float()
        s = q @ k.transpose(-1, -2) * 0.25 + bias
        return s.softmax(-1) @ v


@pytest.mark.parametrize("model", [T5Bias(), ALiBi()], ids=["t5_relative_bias", "alibi"])
def test_position_biases(model):
    q, k, v = qkv()
    out, sites, _, _ = compile_and_run(model, q, k, v)
    assert len(sites) == 1 and sites[0].mask == "additive"
    assert rel_err(out, model(q, k, v)) < 1e-5


def test_t5_bias_gradients_flow_to_the_embedding():
    q, k, v = (t.requires_grad_() for t in qkv())
    model = T5Bias()
    out, sites, _, _ = compile_and_run(model, q, k, v)
    out.square().sum().backward()
    got = [t.grad.clone() for t in (q, k, v, model.rel.weight)]
    for t in (q, k, v, model.rel.weight):
        t.grad = None
    model(q, k, v).square().sum().backward()
    for g, t in zip(got, (q, k, v, model.rel.weight)):
        assert rel_err(g, t.grad) < 1e-5


# --- look-alikes ----------------------------------------------------------------------------------

def softmax_over_queries(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2), dim=-2) @ v


class SoftmaxOfLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, L)

    def forward(self, q, k, v):
        return torch.softmax(self.proj(q), dim=-1) @ v


def sigmoid_attention(q, k, v):
    return torch.sigmoid(q @ k.transpose(-1, -2)) @ v


def relu_attention(q, k, v):
    return torch.relu(q @ k.transpose(-1, -2)) @ v


def escaping_probabilities(q, k, v):
    p = torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1)
    return p @ v, p


def softmax_classifier(q, k, v):
    return torch.softmax(q.sum(-1), dim=-1)


LOOKALIKES = [
    (softmax_over_queries, "non-key axis"),
    (SoftmaxOfLinear(), "linear"),
    (sigmoid_attention, None),
    (relu_attention, None),
    (escaping_probabilities, "escape"),
    (softmax_classifier, "not a Q·Kᵀ product"),
]


@pytest.mark.parametrize("fn,reason", LOOKALIKES,
                         ids=["over_queries", "of_linear", "sigmoid", "relu", "escaping", "classifier"])
def test_lookalikes_left_alone(fn, reason):
    q, k, v = qkv()
    out, sites, skipped, _ = compile_and_run(fn, q, k, v)
    assert sites == []
    if reason is not None:
        assert len(skipped) == 1 and reason in skipped[0].reason, skipped
    else:
        assert skipped == []
    ref = fn(q, k, v)
    for o, r in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        assert rel_err(o, r) < 1e-6


def test_two_sites_and_a_lookalike_in_one_graph():
    q, k, v = qkv()

    def fn(q, k, v):
        a = matmul_div_sqrt(q, k, v)
        b = F.scaled_dot_product_attention(q, k, a, is_causal=True)
        return b + softmax_over_queries(q, k, v)
    out, sites, skipped, _ = compile_and_run(fn, q, k, v)
    assert len(sites) == 2 and len(skipped) == 1
    assert rel_err(out, fn(q, k, v)) < 1e-5


# --- rows with every key masked: eager's value, not the op's 0 ----------------------------------

def _dead_rows_keep(lq, lk):
    keep = torch.ones(B, 1, lq, lk, dtype=torch.bool)
    keep[0, :, 2] = False            # one query row of batch 0 sees no key
    keep[1, :, :, :3] = False        # and batch 1 loses its first keys (left padding)
    return keep


def fill_masked(fill):
    def fn(q, k, v, keep):
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        return s.masked_fill(~keep, fill).softmax(-1) @ v
    return fn


def where_masked(fill):
    def fn(q, k, v, keep):
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        return torch.where(keep, s, torch.tensor(fill)).softmax(-1) @ v
    return fn


def causal_and_padding(fill):
    def fn(q, k, v, keep):   # HF-style: a causal fill and a padding fill with one value
        lq, lk = q.shape[-2], k.shape[-2]
        causal = torch.ones(lq, lk, dtype=torch.bool).tril()
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        s = s.masked_fill(~causal, fill)
        return s.masked_fill(~keep[:, :, :1, :], fill).softmax(-1) @ v
    return fn


def additive_neg_inf(q, k, v, keep):
    bias = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    return (q @ k.transpose(-1, -2) * 0.25 + bias).softmax(-1) @ v


def gqa_fill(fill):
    def fn(q, k, v, keep):
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        return s.masked_fill(~keep, fill).softmax(-1) @ v
    return fn


MIN = torch.finfo(torch.float32).min
DEAD_ROWS = [
    ("fill_-inf", fill_masked(float("-inf")), "nan"),
    ("fill_finfo_min", fill_masked(MIN), "mean_v"),
    ("fill_-1e9", fill_masked(-1e9), "mean_v"),
    ("where_-inf", where_masked(float("-inf")), "nan"),
    ("where_finfo_min", where_masked(MIN), "mean_v"),
    ("causal_padding_-inf", causal_and_padding(float("-inf")), "nan"),
    ("causal_padding_min", causal_and_padding(MIN), "mean_v"),
    ("gqa_min", gqa_fill(MIN), "mean_v"),
]


@pytest.mark.parametrize("kernel", ["auto", "triton"])
@pytest.mark.parametrize("name,fn,expect", DEAD_ROWS, ids=[d[0] for d in DEAD_ROWS])
def test_fully_masked_rows_give_eagers_value(name, fn, expect, kernel):
    """A query row whose every key is masked: eager softmax gives NaN (every masked score
    -inf) or the mean of v (one finite fill: equal scores); the rewritten graph gives the
    same, on the reference path and on the Triton kernel (interpreter), not SDPA's 0."""
    q, k, v = qkv(lq=7, lk=9, hkv=H // 2 if name.startswith("gqa") else None)
    keep = _dead_rows_keep(7, 9)
    out, sites, _skipped, _ = compile_and_run(fn, q, k, v, keep, options={"kernel": kernel})
    assert len(sites) == 1
    ref = fn(q, k, v, keep)
    assert (ref.isnan().any() if expect == "nan" else not ref.isnan().any())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_fully_masked_rows_of_an_additive_mask_give_0():
    """An additive mask that is -inf along a whole row: the op's 0 stays (README: the kernels
    cannot tell such a row from one masked by HF's finite finfo.min, where eager gives the mean
    of v), the other rows equal eager."""
    q, k, v = qkv(lq=7, lk=9)
    keep = _dead_rows_keep(7, 9)
    out, sites, _skipped, _ = compile_and_run(additive_neg_inf, q, k, v, keep)
    assert len(sites) == 1
    ref = additive_neg_inf(q, k, v, keep)
    dead = ~keep.expand(B, H, 7, 9).any(-1)
    assert ref[dead].isnan().all() and dead.any()
    assert not out[dead].any()
    torch.testing.assert_close(out[~dead], ref[~dead], rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_with_mixed_masks_are_reported():
    """A finite fill together with an additive mask: eager's value in a dead row is not known
    at compile time; the op's 0 stays and the site's notes say so."""
    q, k, v = qkv()

    def fn(q, k, v, bias):
        s = q @ k.transpose(-1, -2) * 0.25 + bias
        return s.masked_fill(bias < -1, MIN).softmax(-1) @ v
    bias = torch.randn(B, 1, 1, L)
    out, sites, _skipped, _ = compile_and_run(fn, q, k, v, bias)
    assert len(sites) == 1 and any("fully masked row gives 0" in n for n in sites[0].notes)
    assert rel_err(out, fn(q, k, v, bias)) < 1e-5   # no dead row here: the same answer
