"""A bias computed from the key-query offset alone (T5's position bias) reaches the op as a
strided view of a per-offset table over reversed keys, never realised, and the results equal
eager's; anything the proof does not cover keeps its mask as it was."""
import pytest
import torch
import torch.nn.functional as F

from adaattn_compile.passes.relative_bias import NOTE
from helpers import compile_and_run, rel_err, rewritten

H, D = 4, 16
# (the kernel tests run where our kernels do: the GPU, or the interpreter on a CPU machine)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _bucket(rel, buckets=32, max_distance=128):
    """T5's bidirectional bucket of an offset (the same calls as transformers')."""
    half = buckets // 2
    out = (rel > 0).to(torch.long) * half
    rel = torch.abs(rel)
    exact = half // 2
    small = rel < exact
    large = exact + (torch.log(rel.float() / exact) / torch.log(torch.tensor(max_distance / exact))
                     * (half - exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, half - 1))
    out += torch.where(small, rel, large)
    return out


def relative_attention(q, k, v, table, q_start=0, k_start=0, sign=1, layers=2, scale=None,
                       style="t5"):
    """``layers`` attentions that all read one bias of (memory - context) or its negation."""
    lq, lk = q.shape[-2], k.shape[-2]
    context = torch.arange(lq, dtype=torch.long, device=q.device)[:, None] + q_start
    memory = torch.arange(lk, dtype=torch.long, device=q.device)[None, :] + k_start
    rel = memory - context if sign > 0 else context - memory
    if style == "t5":
        bias = F.embedding(_bucket(rel), table).permute([2, 0, 1]).unsqueeze(0)
    else:   # ALiBi-like: a per-head slope times the distance, heads from a (H, 1, 1) slope
        bias = -rel.abs().float().unsqueeze(0) * 0.5
        bias = bias.unsqueeze(0)
    out = q
    for _ in range(layers):
        scores = out @ k.transpose(-2, -1) * (scale if scale is not None else 1.0)
        out = torch.softmax(scores + bias, dim=-1) @ v
    return out


def _inputs(lq, lk, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, lq, D, generator=g, dtype=dtype)
    k = torch.randn(1, H, lk, D, generator=g, dtype=dtype)
    v = torch.randn(1, H, lk, D, generator=g, dtype=dtype)
    table = torch.randn(32, H, generator=g, dtype=dtype)
    return q, k, v, table


@pytest.mark.parametrize("lq, lk, q_start, k_start, sign, style", [
    (24, 24, 0, 0, 1, "t5"),
    (37, 37, 0, 0, -1, "t5"),          # context - memory: the other sign
    (24, 40, 3, 0, 1, "t5"),           # Lq != Lk, offset progressions (a continued chunk)
    (41, 17, 0, 5, 1, "t5"),
    (33, 33, 0, 0, 1, "alibi"),        # element-wise calls only, no embedding
])
def test_relative_bias_runs_as_a_table(lq, lk, q_start, k_start, sign, style):
    q, k, v, table = _inputs(lq, lk, seed=lq + lk)
    # (q attends k with the output of the layer before: square shapes need lq == lk there)
    layers = 2 if lq == lk else 1
    fn = lambda q, k, v, t: relative_attention(q, k, v, t, q_start, k_start, sign, layers,  # noqa
                                               style=style)
    out, sites, _, records = compile_and_run(fn, q, k, v, table)
    ref = relative_attention(q.double(), k.double(), v.double(), table.double(), q_start,
                             k_start, sign, layers, style=style)
    assert len(sites) == layers
    assert all(NOTE in s.notes for s in sites)
    code = records[0].code_after
    assert code.count("as_strided(") == 1 and code.count("torch.flip(") == 2 * layers
    assert f"as_strided((1, {H if style == 't5' else 1}, {lq}, {lk}), (0, " in code
    assert rel_err(out.double(), ref) < 1e-5


def test_t5_position_bias_table_view_shape():
    """The view's strides: unit along both the query and the (reversed) key dim."""
    q, k, v, table = _inputs(24, 24, seed=1)
    gm, record = rewritten(lambda q, k, v, t: relative_attention(q, k, v, t), (q, k, v, table),
                           {"policy": "exact"})
    views = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "as_strided"]
    assert len(views) == 1
    table_node, shape, strides = views[0].args
    assert shape == (1, H, 24, 24) and strides == (0, 47, 1, 1)
    assert tuple(table_node.meta["example_value"].shape) == (1, H, 1, 47)


def _sdpa_style(q, k, v, table, keep=None):
    """transformers' sdpa path: ``where(mask, bias, min)``, the mask built in the graph (all
    True for an encoder without padding) or given."""
    lq, lk = q.shape[-2], k.shape[-2]
    rel = torch.arange(lk)[None, :] - torch.arange(lq)[:, None]
    bias = F.embedding(_bucket(rel), table).permute([2, 0, 1]).unsqueeze(0)
    if keep is None:
        keep = (torch.arange(lk)[None, None, None, :] >= 0).expand(1, 1, lq, lk)
    mask = torch.where(keep, bias, torch.finfo(bias.dtype).min).contiguous()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_sdpa_style_mask_that_keeps_everything():
    q, k, v, table = _inputs(30, 30, seed=11)
    out, sites, _, records = compile_and_run(_sdpa_style, q, k, v, table)
    ref = _sdpa_style(q.double(), k.double(), v.double(), table.double())
    assert len(sites) == 1 and NOTE in sites[0].notes
    assert "as_strided(" in records[0].code_after
    assert rel_err(out.double(), ref) < 1e-5


def _with_padding(q, k, v, table):
    rel = torch.arange(k.shape[-2])[None, :] - torch.arange(q.shape[-2])[:, None]
    bias = F.embedding(_bucket(rel), table).permute([2, 0, 1]).unsqueeze(0)
    pad = torch.zeros(1, 1, 1, k.shape[-2])
    pad[..., -3:] = float("-inf")
    return torch.softmax(q @ k.transpose(-2, -1) + (bias + pad), -1) @ v


def _causal(q, k, v, table):
    lq = q.shape[-2]
    rel = torch.arange(lq)[None, :] - torch.arange(lq)[:, None]
    bias = F.embedding(_bucket(rel), table).permute([2, 0, 1]).unsqueeze(0)
    future = torch.ones(lq, lq, dtype=torch.bool).triu(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(future,
                                                                              float("-inf")))


def _position_input(q, k, v, table, positions):
    rel = torch.arange(k.shape[-2])[None, :] - positions[:, None]   # a cache position
    bias = F.embedding(_bucket(rel), table).permute([2, 0, 1]).unsqueeze(0)
    return torch.softmax(q @ k.transpose(-2, -1) + bias, -1) @ v


def _reduced(q, k, v, table):
    rel = torch.arange(k.shape[-2])[None, :] - torch.arange(q.shape[-2])[:, None]
    bias = F.embedding(_bucket(rel), table).permute([2, 0, 1]).unsqueeze(0)
    bias = bias - bias.amax(-1, keepdim=True)          # a reduction over keys: not per offset
    return torch.softmax(q @ k.transpose(-2, -1) + bias, -1) @ v


@pytest.mark.parametrize("case", ["padding", "causal", "cache-position", "reduction",
                                  "training", "given-keep"])
def test_masks_the_proof_does_not_cover_are_left_alone(case):
    q, k, v, table = _inputs(20, 20, seed=7)
    args = (q, k, v, table)
    if case == "padding":
        fn = _with_padding
    elif case == "causal":
        fn = _causal
    elif case == "cache-position":
        fn = _position_input
        args += (torch.arange(20) + 0,)
    elif case == "reduction":
        fn = _reduced
    elif case == "given-keep":   # (all True here, but an input: not known at compile time)
        fn = _sdpa_style
        args += (torch.ones(1, 1, 20, 20, dtype=torch.bool),)
    else:
        fn = relative_attention
        table = table.clone().requires_grad_()
        args = (q, k, v, table)
    out, sites, _, records = compile_and_run(fn, *args)
    ref = fn(*args)
    assert sites and not any(NOTE in s.notes for s in sites)
    assert "as_strided(" not in records[0].code_after
    assert rel_err(out.detach(), ref.detach()) < 1e-5
    if case == "training":
        out.sum().backward()
        assert table.grad is not None


def test_hf_t5_encoder_sites_take_the_table():
    T = pytest.importorskip("transformers")
    from hf_models import build
    model, args, kwargs, _ = build("t5", "eager", layers=2, seq=40)
    model.eval()
    with torch.no_grad():
        ref = model(*args, **kwargs).last_hidden_state
        out, sites, _, _ = compile_and_run(model, *args, **kwargs)
    tabled = [s for s in sites if NOTE in s.notes]
    # the encoder's self-attention sites (non-causal); the decoder's are causal
    assert len(tabled) == 2 and all(not s.causal for s in tabled)
    assert rel_err(out.last_hidden_state, ref) < 1e-5


def _kernel_case(b, h, lq, lk, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype).to(DEVICE) for n in (lq, lk, lk))
    n = lq + lk - 1
    table = torch.randn(1, h, 1, n, generator=g).to(dtype).to(DEVICE)   # s: offset lk - 1 - s
    view = table.as_strided((1, h, lq, lk), (0, n, 1, 1))
    offsets = torch.arange(lk)[None, :] - torch.arange(lq)[:, None]       # j - i
    dense = table[0, :, 0, (lk - 1 - offsets).to(DEVICE)].unsqueeze(0)  # (1, H, lq, lk)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                         attn_mask=dense.double())
    return q, k, v, view, ref


@pytest.mark.parametrize("lq, lk, dtype", [(37, 37, torch.float16), (20, 45, torch.float32),
                                           (45, 20, torch.float16)])
def test_flash_kernel_reads_the_table_view(lq, lk, dtype):
    """The dense kernel given reversed keys and the (1, 1)-strided view of a table equals
    attention with the realised Toeplitz bias (float64)."""
    from adaattn_compile.kernels import flash
    q, k, v, view, ref = _kernel_case(2, H, lq, lk, D, dtype, lq * lk)
    out, _ = flash.flash_forward(q, k.flip(-2), v.flip(-2), attn_mask=view)
    assert rel_err(out.double(), ref) < (2e-3 if dtype == torch.float16 else 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("b, h, lq, lk, d", [(1, 8, 4096, 4096, 64), (1, 8, 1000, 1000, 64),
                                             (2, 4, 333, 777, 128), (1, 8, 2048, 2048, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_kernels_read_the_table_view(b, h, lq, lk, d, dtype):
    """On the GPU (the sm90 Gluon forward where it runs) at real sizes, both 2-byte dtypes."""
    from adaattn_compile.kernels import flash
    q, k, v, view, ref = _kernel_case(b, h, lq, lk, d, dtype, lq + d)
    out, _ = flash.flash_forward(q, k.flip(-2), v.flip(-2), attn_mask=view)
    assert rel_err(out.double(), ref) < 1e-2


def test_fp16_model_runs_the_kernel_on_the_table():
    q, k, v, table = (t.half().to(DEVICE) for t in _inputs(33, 33, seed=3))
    out, sites, _, _ = compile_and_run(relative_attention, q, k, v, table,
                                       options={"kernel": "triton", "min_seq_len": 0})
    ref = relative_attention(q.double(), k.double(), v.double(), table.double())
    assert all(NOTE in s.notes for s in sites)
    assert all(s.runtime()["kernel"] == {"triton": 1} for s in sites)
    assert rel_err(out.double(), ref) < 3e-3


@pytest.mark.parametrize("how", ["table fails", "switched off"])
def test_a_failed_or_disabled_table_leaves_the_site_as_it_was(how, monkeypatch):
    from adaattn_compile.passes import relative_bias

    if how == "table fails":
        real = relative_bias._table

        def broken(*args, **kwargs):   # (after adding its nodes: they must all go again)
            real(*args, **kwargs)
            raise RuntimeError("no table")
        monkeypatch.setattr(relative_bias, "_table", broken)
    else:
        monkeypatch.setenv("ADAATTN_RELATIVE_BIAS", "0")
    q, k, v, table = _inputs(24, 24, seed=5)
    out, sites, _, records = compile_and_run(relative_attention, q, k, v, table)
    ref = relative_attention(q.double(), k.double(), v.double(), table.double())
    assert len(sites) == 2 and not any(NOTE in s.notes for s in sites)
    code = records[0].code_after
    assert "as_strided(" not in code and "flip(" not in code and "arange(47" not in code
    assert rel_err(out.double(), ref) < 1e-5


def _transposed_grid(q, k, v, table):
    """The grid built (Lk, Lq) and permuted back: the proof follows the dims, not the order."""
    rel = torch.arange(k.shape[-2])[:, None] - torch.arange(q.shape[-2])[None, :]   # (Lk, Lq)
    bias = F.embedding(_bucket(rel), table).permute(2, 1, 0).unsqueeze(0)         # (1, H, Lq, Lk)
    return torch.softmax(q @ k.transpose(-2, -1) + bias, -1) @ v


def _renormed(q, k, v, table):
    """max_norm renormalises the embedding's table in place: not a pure lookup."""
    rel = torch.arange(k.shape[-2])[None, :] - torch.arange(q.shape[-2])[:, None]
    bias = F.embedding(_bucket(rel), table, max_norm=1.0).permute([2, 0, 1]).unsqueeze(0)
    return torch.softmax(q @ k.transpose(-2, -1) + bias, -1) @ v


@pytest.mark.parametrize("fn, tabled", [(_transposed_grid, True), (_renormed, False)],
                         ids=["transposed-grid", "max-norm"])
def test_grid_layouts_and_lookups(fn, tabled):
    q, k, v, table = _inputs(19, 26, seed=13)
    ref = fn(q.double(), k.double(), v.double(), table.double().clone())
    out, sites, _, _ = compile_and_run(fn, q, k, v, table.clone())
    assert len(sites) == 1 and (NOTE in sites[0].notes) == tabled
    assert rel_err(out.double(), ref) < 1e-5


def test_rewritten_graph_printed():
    """The table's computation, the view and the flips as the rewritten graph prints them."""
    assert_expected_inline = pytest.importorskip("expecttest").assert_expected_inline

    def alibi_like(q, k, v):
        rel = torch.arange(k.shape[-2])[None, :] - torch.arange(q.shape[-2])[:, None]
        bias = (-0.5 * rel.abs().float()).unsqueeze(0).unsqueeze(0)
        return torch.softmax(q @ k.transpose(-2, -1) + bias, -1) @ v

    from adaattn_compile.compiler import reset_ids
    reset_ids()   # (site ids count from 0 again: the printed call names its site)
    q, k, v, _ = _inputs(6, 6, seed=2)
    gm, record = rewritten(alibi_like, (q, k, v), {"policy": "exact"})
    lines = [line.strip().split(";")[0] for line in gm.code.splitlines()
             if any(word in line for word in ("arange", "view", "abs", "float", "mul",
                                              "unsqueeze", "contiguous", "as_strided", "flip",
                                              "attention"))]
    assert_expected_inline("\n".join(lines), """\
arange_2 = torch.arange(11, dtype = torch.int64, device = device(type='cpu'))
sub_1 = 5 - arange_2
view = sub_1.view((1, 11))
abs_2 = view.abs()
float_2 = abs_2.float()
mul_1 = -0.5 * float_2
unsqueeze_2 = mul_1.unsqueeze(0)
unsqueeze_3 = unsqueeze_2.unsqueeze(0)
contiguous = unsqueeze_3.contiguous()
as_strided = contiguous.as_strided((1, 1, 6, 6), (0, 0, 1, 1))
flip = torch.flip(l_k_, (-2,))
flip_1 = torch.flip(l_v_, (-2,))
attention_default = torch.ops.adaattn.attention.default(l_q_, flip, flip_1, as_strided, 0.0, False, 1.0, False, 's0', 'exact', 'auto')
getitem_2 = attention_default[0]""")
