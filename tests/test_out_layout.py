"""The op's output in (B, L, H, D) memory where the graph swaps the heads back next
(``out_blhd``): the pass asks for it only there, every path of the op honours it exactly (the
compiled graph asserts the fake's strides), and the swap then costs no copy."""
import pytest
import torch
import torch.nn.functional as F

import adaattn_compile
from adaattn_compile import op
from adaattn_compile.options import Options
from helpers import reference_attention, rel_err, rewritten

B, H, L, D = 2, 3, 37, 16


def _heads(x):
    return x.view(B, L, H, D).transpose(1, 2)


def sdpa_transpose(x, w):
    q, k, v = (_heads(t) for t in (x @ w).split(H * D, -1))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, H * D)


def sdpa_torch_transpose(x, w):
    q, k, v = (_heads(t) for t in (x @ w).split(H * D, -1))
    return torch.transpose(F.scaled_dot_product_attention(q, k, v), -3, -2).flatten(2)


def matmul_permute(x, w):
    q, k, v = (_heads(t) for t in (x @ w).split(H * D, -1))
    p = ((q @ k.transpose(-1, -2)) * D ** -0.5).softmax(-1)
    return (p @ v).permute(0, 2, 1, 3).reshape(B, L, H * D)


def einsum_into_bqhd(x, w):
    q, k, v = (_heads(t) for t in (x @ w).split(H * D, -1))
    p = torch.einsum("bhqd,bhkd->bhqk", q, k).mul(D ** -0.5).softmax(-1)
    return torch.einsum("bhqk,bhkd->bqhd", p, v).flatten(2)


def sdpa_hf5(x, w):   # transformers 5.x: a reshape to the same shape, then the transpose
    q, k, v = (_heads(t) for t in (x @ w).split(H * D, -1))
    o = F.scaled_dot_product_attention(q, k, v)
    o = o.reshape(o.shape[0], -1, L, D)
    return o.transpose(1, 2).contiguous().flatten(2)


def sdpa_reshaped_elsewhere(x, w):   # a reshape that changes the shape: not followed
    q, k, v = (_heads(t) for t in (x @ w).split(H * D, -1))
    return F.scaled_dot_product_attention(q, k, v).reshape(B, H * L, D).transpose(1, 2)


def sdpa_kept_in_heads(x, w):   # the heads stay where they are: contiguous out
    q, k, v = (_heads(t) for t in (x @ w).split(H * D, -1))
    return F.scaled_dot_product_attention(q, k, v).sum(1)


def sdpa_two_users(x, w):       # one user swaps, the other does not: contiguous out
    q, k, v = (_heads(t) for t in (x @ w).split(H * D, -1))
    o = F.scaled_dot_product_attention(q, k, v)
    return o.transpose(1, 2).flatten(2) + o.mean()


def sdpa_swaps_other_dims(x, w):
    q, k, v = (_heads(t) for t in (x @ w).split(H * D, -1))
    return F.scaled_dot_product_attention(q, k, v).transpose(2, 3).flatten(2)


CASES = [(sdpa_transpose, True), (sdpa_torch_transpose, True), (matmul_permute, True),
         (einsum_into_bqhd, True), (sdpa_hf5, True), (sdpa_reshaped_elsewhere, False),
         (sdpa_kept_in_heads, False), (sdpa_two_users, False), (sdpa_swaps_other_dims, False)]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, 32, generator=g), torch.randn(32, 3 * H * D, generator=g) / 6


@pytest.mark.parametrize("fn, blhd", CASES, ids=[fn.__name__ for fn, _ in CASES])
def test_the_pass_asks_for_the_layout_only_where_the_heads_swap_next(fn, blhd):
    gm, record = rewritten(fn, _inputs(), {"policy": "exact"})
    calls = [n for n in gm.graph.nodes if n.target is torch.ops.adaattn.attention.default]
    assert len(calls) == len(record.sites) == 1
    assert calls[0].kwargs.get("out_blhd", False) is blhd
    assert any("(B, L, H, D)" in note for note in record.sites[0].notes) is blhd   # (explain)
    out = calls[0].meta["example_value"][0]
    assert out.transpose(1, 2).is_contiguous() if blhd else out.is_contiguous()


@pytest.mark.parametrize("fn, blhd", CASES, ids=[fn.__name__ for fn, _ in CASES])
@pytest.mark.parametrize("kernel", ["triton", "reference"])
def test_compiled_models_match_eager_in_either_layout(fn, blhd, kernel):
    x, w = _inputs(1)
    torch._dynamo.reset()
    got = torch.compile(fn, backend=adaattn_compile.backend(policy="exact", kernel=kernel),
                        dynamic=False)(x, w)
    assert rel_err(got, fn(x, w)) < 1e-5


def _qkv(shape=(B, L, H, D), seed=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # (B, H, L, D) views of (B, L, H, D) memory, as projections hand them over
    return tuple(torch.randn(*shape, generator=g).to(dtype).transpose(1, 2) for _ in range(3))


@pytest.mark.parametrize("path", ["triton", "reference", "triton-causal-mask", "low-rank",
                                  "fp16-rung", "grad"])
def test_every_path_of_the_op_returns_the_promised_layout(path, monkeypatch):
    q, k, v = _qkv()
    mask, causal, policy, kernel = None, False, "exact", path.split("-")[0]
    site = f"s-layout-{path}"
    options = {"kernel": kernel if kernel != "grad" else "triton", "policy": policy}
    if path == "triton-causal-mask":
        mask = torch.ones(L, L, dtype=torch.bool).tril()
    if path == "low-rank":
        options.update(kernel="triton", policy="fast", rank="low", min_seq_len=16,
                       low_rank_min_gflops=0)
    if path == "fp16-rung":
        options.update(kernel="triton", policy="balanced", precision="fp16", min_seq_len=16)
    opts = Options.parse(options)
    op.register_site(site, opts)
    if path == "grad":
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse, _ = torch.ops.adaattn.attention(q, k, v, mask, 0.0, causal, None, False, site,
                                              opts.policy, opts.kernel, out_blhd=True)
    assert out.shape == (B, H, L, D) and out.transpose(1, 2).is_contiguous()
    assert lse.is_contiguous()
    ref = reference_attention(q.detach().double(), k.detach().double(), v.detach().double(),
                              mask)
    limit = {"low-rank": 0.5, "fp16-rung": 2e-3}.get(path, 1e-5)
    assert rel_err(out.detach(), ref) < limit
    if path == "grad":
        out.sum().backward()
        q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
        reference_attention(q2, k2, v2).sum().backward()
        for got, want in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
            assert rel_err(got, want) < 1e-5
    # and the contiguous layout when not asked
    out, _, _ = torch.ops.adaattn.attention(q, k, v, mask, 0.0, causal, None, False, site,
                                            opts.policy, opts.kernel)
    assert out.is_contiguous()


def test_the_fake_promises_what_the_kernel_returns():
    q, k, v = _qkv()
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fake = torch.ops.adaattn.attention(fq, fk, fv, None, 0.0, False, None, False, "s-fake",
                                           "exact", "triton", out_blhd=True)[0]
    real = torch.ops.adaattn.attention(q, k, v, None, 0.0, False, None, False, "s-fake",
                                       "exact", "triton", out_blhd=True)[0]
    assert fake.shape == real.shape and fake.stride() == real.stride()


# GPU: the dense kernels write out through its strides (the Gluon forward's O through a bulk
# copy with a 4-D descriptor of them); the bound launch (second call) keeps the layout.

@pytest.mark.gpu
@pytest.mark.parametrize("shape, case", [
    ((1, 16, 2048, 128), "plain"), ((1, 16, 2048, 128), "causal"),   # the Gluon forward
    ((1, 16, 2048, 128), "key-mask"), ((2, 12, 4096, 64), "key-mask"),
    ((1, 8, 777, 64), "plain"), ((2, 4, 300, 128), "bias"),          # the Triton forward
], ids=str)
def test_dense_kernels_write_the_layout_on_the_gpu(shape, case):
    b, h, n, d = shape
    q, k, v = _qkv((b, n, h, d), seed=3, dtype=torch.bfloat16)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    mask = None
    if case == "key-mask":
        mask = torch.rand(b, 1, 1, n, device="cuda") > 0.2
    if case == "bias":
        mask = torch.randn(b, h, n, n, device="cuda", dtype=torch.bfloat16)
    site = f"s-layout-gpu-{case}-{n}"
    op.register_site(site, Options.parse(policy="exact"))
    ref_mask = mask   # (the helper's causal mask is built on the CPU)
    if case == "causal":
        ref_mask = torch.ones(n, n, dtype=torch.bool, device="cuda").tril()
    ref = reference_attention(q.double(), k.double(), v.double(), ref_mask)
    op.set_mask_group(site, f"test/{case}")   # (a key mask's tile: shared from call two)
    for _ in range(3):   # (the second and third calls: the bound launch)
        out = torch.ops.adaattn.attention(q, k, v, mask, 0.0, case == "causal", None, False,
                                          site, "exact", "auto", out_blhd=True)[0]
        assert out.transpose(1, 2).is_contiguous()
        assert rel_err(out, ref) < 1e-2


# ---------------------------------------------------------------------------------------------
# Mask groups: what a kernel derives from a mask is built once per graph call for the sites
# that read the same mask node (BERT's 12 layers, one padding mask).

def two_layers_one_padding_mask(x, w, keep):
    mask = keep[:, None, None, :]
    for _ in range(2):
        q, k, v = (_heads(t) for t in (x @ w).split(H * D, -1))
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        x = x @ w[:, :H * D].T   # (back to the model width)
    return x


def two_masks(x, w, keep):
    q, k, v = (_heads(t) for t in (x @ w).split(H * D, -1))
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
    b = F.scaled_dot_product_attention(q, k, v, attn_mask=~keep[:, None, None, :])
    return a + b


@pytest.mark.parametrize("fn, groups", [(two_layers_one_padding_mask, 1), (two_masks, 2)])
def test_sites_reading_one_mask_node_share_a_group(fn, groups):
    x, w = _inputs(4)
    keep = torch.rand(B, L) > 0.2
    keep[:, 0] = True
    gm, record = rewritten(fn, (x, w, keep), {"policy": "exact"})
    sites = [s.id for s in record.sites]
    assert len(sites) == 2
    assert len({op._mask_groups[s] for s in sites}) == groups


def test_a_shared_bias_tile_is_built_once_per_mask_value():
    from adaattn_compile.kernels import flash_hopper
    flash_hopper._TILES.clear()
    n = 64
    mask = torch.rand(1, 1, 1, n) > 0.3
    bias = ((1, 4, n, n), (0, 0, 0, 1), True, torch.float16, 1)
    first = flash_hopper._shared_bias_tile(mask.view(torch.uint8), bias, "g/mask")
    uint8 = mask.view(torch.uint8)
    assert torch.equal(first, flash_hopper._bias_tile(uint8, *bias))
    again = flash_hopper._shared_bias_tile(uint8, bias, "g/mask")
    # (another view object of the same mask: not the same tensor, built again)
    assert again is not first and torch.equal(again, first)
    # ... unless the caller names the tensor it was given (a bool mask's uint8 view is made
    # anew every call)
    viewed = flash_hopper._shared_bias_tile(mask.view(torch.uint8), bias, "g/bool", mask)
    assert flash_hopper._shared_bias_tile(mask.view(torch.uint8), bias, "g/bool",
                                          mask) is viewed
    assert flash_hopper._shared_bias_tile(uint8, bias, "g/mask") is again      # shared
    assert flash_hopper._shared_bias_tile(uint8, bias, "g/other") is not again  # another group
    uint8[..., :8] = 1   # an in-place write: built again, with the new values
    written = flash_hopper._shared_bias_tile(uint8, bias, "g/mask")
    assert written is not again and torch.equal(written, flash_hopper._bias_tile(uint8, *bias))
    assert not torch.equal(written, again)
    del uint8, mask
    import gc
    gc.collect()
    assert not flash_hopper._TILES   # the masks are gone, and their tiles with them
