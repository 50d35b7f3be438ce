"""F.scaled_dot_product_attention with every argument, and torch.nn's attention modules."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import compile_and_run, rel_err

B, H, L, D = 2, 4, 10, 8


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def padding_mask():
    keep = torch.ones(B, 1, 1, L, dtype=torch.bool)
    keep[1, ..., 6:] = False
    return keep


VARIANTS = {
    "plain": dict(),
    "bool_mask_broadcast": dict(attn_mask=padding_mask()),
    "float_mask_broadcast": dict(attn_mask=rand(1, H, 1, L, seed=3)),
    "float_mask_full": dict(attn_mask=rand(B, H, L, L, seed=4)),
    "is_causal": dict(is_causal=True),
    "scale": dict(scale=0.1),
    "causal_and_scale": dict(is_causal=True, scale=0.5),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_sdpa_arguments(variant):
    kwargs = VARIANTS[variant]
    q, k, v = rand(B, H, L, D, seed=1), rand(B, H, L, D, seed=2), rand(B, H, L, D, seed=5)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    out, sites, _, _ = compile_and_run(fn, q, k, v)
    assert len(sites) == 1
    site = sites[0]
    assert site.causal == kwargs.get("is_causal", False)
    mask = kwargs.get("attn_mask")
    assert site.mask == (None if mask is None else "bool" if mask.dtype == torch.bool else "additive")
    assert site.scale == kwargs.get("scale")
    assert rel_err(out, fn(q, k, v)) < 1e-5


def test_sdpa_lq_ne_lk_gqa_and_dropout():
    q, k, v = rand(B, 8, 5, D, seed=1), rand(B, 2, 13, D, seed=2), rand(B, 2, 13, 6, seed=3)

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    out, sites, _, _ = compile_and_run(fn, q, k, v)
    assert len(sites) == 1 and sites[0].gqa_groups == 4 and sites[0].v_shape == (B, 2, 13, 6)
    assert rel_err(out, fn(q, k, v)) < 1e-5

    def dropped(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.3, enable_gqa=True)
    out, sites, _, _ = compile_and_run(dropped, q, k, v)
    assert len(sites) == 1 and sites[0].dropout_p == 0.3
    assert sites[0].decision.kernel == "reference"
    assert out.shape == (B, 8, 5, 6) and torch.isfinite(out).all()


def test_sdpa_constant_causal_mask_becomes_is_causal():
    def fn(q, k, v):
        keep = torch.ones(L, L, dtype=torch.bool).tril()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    q = rand(B, H, L, D)
    out, sites, _, _ = compile_and_run(fn, q, q, q)
    assert sites[0].causal and sites[0].mask is None
    assert rel_err(out, fn(q, q, q)) < 1e-5



def _hf_style_keep(lq, lk):
    """transformers' ``sdpa_mask`` (>= 4.48) as Dynamo traces it: index comparisons combined
    with ``operator.and_`` / ``or_`` (whose names end in "_" but are not in place)."""
    q_idx = torch.arange(lq)[None, None, :, None]
    kv_idx = torch.arange(lk)[None, None, None, :]
    keep = torch.ones((), dtype=torch.bool) & (kv_idx <= q_idx)
    same_doc = torch.zeros(lk, dtype=torch.long)        # one packed sequence
    keep = keep & (same_doc[kv_idx] == same_doc[q_idx])
    return (keep | torch.zeros((), dtype=torch.bool)).expand(1, -1, lq, lk)


def test_sdpa_mask_combined_with_and_is_proven_causal():
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_hf_style_keep(L, L))
    q = rand(B, H, L, D)
    out, sites, _, _ = compile_and_run(fn, q, q, q)
    assert sites[0].causal and sites[0].mask is None
    assert rel_err(out, fn(q, q, q)) < 1e-5


def test_sdpa_mask_written_in_place_is_not_folded():
    """``keep &= x`` mutates the mask: evaluating the graph's factories would not see the
    write, so the mask must stay a runtime mask."""
    def fn(q, k, v, extra):
        keep = torch.ones(L, L, dtype=torch.bool).tril()
        keep &= extra
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    q = rand(B, H, L, D)
    extra = torch.rand(L, L) > 0.3
    extra.diagonal().fill_(True)
    out, sites, _, _ = compile_and_run(fn, q, q, q, extra)
    assert not sites[0].causal and sites[0].mask == "bool"
    assert rel_err(out, fn(q, q, q, extra)) < 1e-5

def _hf_padding_keep(padding, lq):
    """transformers' ``sdpa_mask`` for a bidirectional model with a padding mask, as Dynamo
    traces it: ``(q_idx >= 0) & padding[b, kv_idx]`` expanded to (B, 1, Lq, Lk)."""
    b_idx = torch.arange(padding.shape[0])[:, None, None, None]
    q_idx = torch.arange(lq)[None, None, :, None]
    kv_idx = torch.arange(padding.shape[1])[None, None, None, :]
    keep = q_idx.new_ones((), dtype=torch.bool) & (q_idx >= 0)
    keep = keep & padding.bool()[b_idx, kv_idx]
    return keep.expand(padding.shape[0], -1, lq, -1)


@pytest.mark.parametrize("how", ["and_then_expand", "expand_only", "broadcast_to"])
def test_sdpa_broadcast_mask_is_read_through_its_input(how):
    """A mask that is an expand / an ``a & b`` with a constant all-True side is passed to the
    op as its small input (Inductor would otherwise write the (B, 1, L, L) tensor out)."""
    padding = torch.ones(B, L, dtype=torch.long)
    padding[1, 6:] = 0

    def fn(q, k, v, padding):
        if how == "and_then_expand":
            keep = _hf_padding_keep(padding, L)
        elif how == "expand_only":
            keep = padding.bool()[:, None, None, :].expand(B, 1, L, L)
        else:
            keep = torch.broadcast_to(padding.bool()[:, None, None, :], (B, 1, L, L))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    q, k, v = rand(B, H, L, D, seed=1), rand(B, H, L, D, seed=2), rand(B, H, L, D, seed=3)
    out, sites, _, records = compile_and_run(fn, q, k, v, padding)
    assert sites[0].mask == "bool" and not sites[0].causal
    assert any(f"broadcast ({B}, 1, 1, {L}) input" in note for note in sites[0].notes), \
        sites[0].notes
    assert rel_err(out, fn(q, k, v, padding)) < 1e-5


def test_sdpa_mask_and_of_two_runtime_masks_is_kept_whole():
    """Neither side of the ``&`` is a constant: nothing narrows."""
    def fn(q, k, v, a, b):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=a & b)
    q = rand(B, H, L, D)
    a, b = torch.rand(B, 1, L, 1) > 0.2, torch.rand(B, 1, 1, L) > 0.2
    a[..., 0, :] = True
    b[..., 0] = True
    out, sites, _, _ = compile_and_run(fn, q, q, q, a, b)
    assert not any("broadcast" in note for note in sites[0].notes)
    assert rel_err(out, fn(q, q, q, a, b)) < 1e-5


def test_sdpa_mask_side_written_after_the_and_is_not_read_instead():
    """``keep = ones & pad`` then ``pad`` changed in place: ``keep`` holds the old values, so
    the op must not read ``pad`` in its place."""
    def fn(q, k, v, pad):
        pad = pad.clone()
        keep = torch.ones((), dtype=torch.bool) & pad
        pad.fill_(False)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    q = rand(B, H, L, D)
    pad = torch.ones(B, 1, 1, L, dtype=torch.bool)
    out, sites, _, _ = compile_and_run(fn, q, q, q, pad)
    assert not any("broadcast" in note for note in sites[0].notes)
    assert rel_err(out, fn(q, q, q, pad)) < 1e-5


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention(need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = rand(B, L, 32)

    def fn(x):
        out, weights = mha(x, x, x, need_weights=need_weights)
        return out if weights is None else (out, weights)
    with torch.no_grad():
        out, sites, skipped, _ = compile_and_run(fn, x)
        ref = fn(x)
    if need_weights:
        # The averaged attention weights are returned: the probabilities escape, so the site
        # is skipped with the reason rather than computed twice.
        assert sites == [] and len(skipped) == 1 and "escape" in skipped[0].reason
        assert rel_err(out[0], ref[0]) < 1e-5 and rel_err(out[1], ref[1]) < 1e-5
    else:
        assert len(sites) == 1
        assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_transformer_layers_training(kind):
    torch.manual_seed(0)
    if kind == "encoder":
        layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
        args = (rand(B, L, 32),)
        n_attention = 1
    else:
        layer = nn.TransformerDecoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
        args = (rand(B, L, 32), rand(B, 7, 32, seed=1))
        n_attention = 2
    layer.train()
    import adaattn_compile
    adaattn_compile.reset_stats()
    out, sites, _, _ = compile_and_run(layer, *args, options={"inner": "aot_eager"})
    ref = layer(*args)
    assert len(sites) == n_attention
    assert all(adaattn_compile.stats()[s.id]["calls"] == 1 for s in sites)
    assert rel_err(out, ref) < 1e-5
    grads = torch.autograd.grad(out.sum(), list(layer.parameters()))
    want = torch.autograd.grad(ref.sum(), list(layer.parameters()))
    for g, w in zip(grads, want):
        assert rel_err(g, w) < 1e-4


@pytest.mark.parametrize("masks", ["none", "key_padding", "attn_mask_bool", "causal_hint"])
def test_multihead_attention_masks_route_through_adaattn(masks):
    import adaattn_compile
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True, kdim=24, vdim=16).eval()
    x, mem = rand(B, L, 32), rand(B, 7, 24, seed=1)
    kwargs = {}
    if masks == "key_padding":
        kwargs["key_padding_mask"] = torch.zeros(B, 7, dtype=torch.bool)
        kwargs["key_padding_mask"][0, 5:] = True
    elif masks == "attn_mask_bool":
        kwargs["attn_mask"] = torch.rand(L, 7, generator=torch.Generator().manual_seed(2)) > 0.7
        kwargs["attn_mask"][:, 0] = False
    mem_v = rand(B, 7, 16, seed=3)
    if masks == "causal_hint":
        mem, mem_v = rand(B, L, 24, seed=1), rand(B, L, 16, seed=3)
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L)
        kwargs["is_causal"] = True

    def fn(x, mem, mem_v):
        return mha(x, mem, mem_v, need_weights=False, **kwargs)[0]
    adaattn_compile.reset_stats()
    with torch.no_grad():
        out, sites, _, _ = compile_and_run(fn, x, mem, mem_v, options={"inner": "inductor"})
        ref = fn(x, mem, mem_v)
    assert len(sites) == 1 and sites[0].pattern.startswith("nn.MultiheadAttention")
    assert adaattn_compile.stats()[sites[0].id]["calls"] == 1   # our op really ran
    assert rel_err(out, ref) < 1e-5
