"""Masks that several attention sites each build from the same tensors (T5's per-layer
``torch.where(mask, position_bias, min).contiguous()``) become one, only where no result can
change."""
import re

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import adaattn_compile
from adaattn_compile.passes.share_masks import share_mask_computations
from helpers import compile_and_run, rel_err

B, H, L, D = 1, 4, 24, 16


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, L, D, generator=g)
    table = torch.randn(L, L, H, generator=g)   # a bias gathered as (Lq, Lk, H), as T5's
    keep = torch.rand(B, 1, L, L, generator=g) > 0.2
    return x, table, keep


def t5_like(x, table, keep, layers=3, style="where", write=None, reuse=False):
    bias = table.permute(2, 0, 1).unsqueeze(0)    # (1, H, L, L), not contiguous
    out = x
    for i in range(layers):
        if style == "where":
            mask = torch.where(keep, bias, torch.finfo(bias.dtype).min).contiguous()
        else:
            mask = bias.contiguous()
        if reuse and i == 1:
            out = out + mask.amax()                # the mask is also read elsewhere
        if write == "mask" and i == 1:
            mask.mul_(0.5)                         # this layer's own mask, written in place
        out = F.scaled_dot_product_attention(out, out, out, attn_mask=mask)
        if write == "table" and i == 0:
            table.mul_(0.5)                        # changes every later mask
    return out


@pytest.mark.parametrize("style", ["where", "contiguous"])
@pytest.mark.parametrize("kw, masks", [
    ({}, 1),                    # three identical masks: one
    ({"reuse": True}, 1),       # also read elsewhere: still one (nothing writes)
    ({"write": "table"}, 2),    # an in-place write after the first: the later two share one
    ({"write": "mask"}, 3),     # layer 1 writes its mask: a write between, nothing shared
], ids=["shared", "read-elsewhere", "input-written-between", "mask-written"])
def test_mask_computations_shared(style, kw, masks):
    x, table, keep = _inputs()
    ref = t5_like(x.clone(), table.clone(), keep, style=style, **kw)
    out, sites, _, records = compile_and_run(
        lambda a, t, m: t5_like(a, t, m, style=style, **kw), x.clone(), table.clone(), keep)
    assert len(sites) == 3
    code = records[0].code_after
    assert code.count(".contiguous()") == masks
    if style == "where":
        assert code.count("torch.where(") == masks
    assert rel_err(out, ref) < 1e-5


def test_only_mask_cones_and_pure_calls_are_merged():
    """Repeated computations outside a mask's cone, and calls that are not known pure, stay."""
    def f(x, bias):
        a = x.contiguous() + 1
        b = x.contiguous() + 1                     # not a mask: stays
        m1 = torch.where(bias > 0, bias, -1e4)
        m2 = torch.where(bias > 0, bias, -1e4)
        r1 = torch.rand_like(bias)                 # random: never merged
        r2 = torch.rand_like(bias)
        o1 = torch.ops.aten.add(a, 0)              # (placeholder consumers)
        return (F.scaled_dot_product_attention(x, x, x, attn_mask=m1 + r1),
                F.scaled_dot_product_attention(x, x, x, attn_mask=m2 + r2), o1, b)
    gm = fx.symbolic_trace(f)
    merged = share_mask_computations(gm)
    gm.recompile()
    code = gm.code
    assert merged == 2   # the second `bias > 0` and the second where
    assert code.count("torch.where(") == 1 and code.count("torch.rand_like(") == 2
    assert code.count("x.contiguous()") == 2


def test_a_strided_mask_of_several_sites_is_copied_once():
    """T5's eager attention: every layer adds the same permuted position bias (keys H apart in
    memory); the sites read one contiguous copy of it."""
    x, table, _ = _inputs()

    def f(x, table):
        bias = table.permute(2, 0, 1).unsqueeze(0)
        out = x
        for _ in range(3):
            out = torch.softmax(out @ out.mT / 4 + bias, -1) @ out
        return out
    ref = f(x, table)
    out, sites, _, records = compile_and_run(f, x, table)
    assert len(sites) == 3
    code = records[0].code_after
    assert code.count(".contiguous()") == 1
    assert rel_err(out, ref) < 1e-5


def test_a_computed_mask_of_several_sites_is_realised_once_by_inductor(tmp_path, monkeypatch):
    """Inductor's generated code holds one mask-sized buffer for three sites that read one
    computed mask (T5's position bias, gathered then permuted): with the default layout
    constraint for custom ops (exact strides), Inductor made a copy for every site."""
    from torch._inductor.utils import run_and_get_code
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    x, table, _ = _inputs()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 7, (L, L), generator=g)
    emb = torch.randn(7, H, generator=g)

    def f(x, idx, emb):
        bias = F.embedding(idx, emb).permute(2, 0, 1).unsqueeze(0)   # computed, key-strided
        out = x
        for _ in range(3):
            out = torch.softmax(out @ out.mT / 4 + bias, -1) @ out
        return out
    ref = f(x, idx, emb)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend=adaattn_compile.backend(policy="exact",
                                                                inner="inductor"))
    out, codes = run_and_get_code(compiled, x, idx, emb)
    assert rel_err(out, ref) < 1e-5
    code = "\n".join(codes)
    mask_buffers = re.findall(rf"empty_strided_cpu\(\(1, {H}, {L}, {L}\)", code)
    assert code.count("_adaattn_attention_out_only(") == 3   # (see inductor_call.py)
    assert len(mask_buffers) == 1, code
