"""Masks that arrive at run time (graph inputs) proven causal or empty once per tensor, and the
op's result unchanged by running them as is_causal / without a mask."""
import pytest
import torch
import torch.nn.functional as F

import adaattn_compile
from adaattn_compile import mask_proofs, op
from adaattn_compile.options import Options
from adaattn_compile.passes import match
from helpers import compile_and_run, reference_attention, rel_err

L = mask_proofs.MIN_LEN


def causal_bool(b=2, lq=L, lk=L):
    return torch.ones(lq, lk, dtype=torch.bool).tril().expand(b, 1, lq, lk).contiguous()


def padded_causal(pads, right=False):
    """HF's causal mask of a padded batch: j <= i and key j is not padding (left padding by
    default: the first pads[b] keys of row b)."""
    keys = torch.ones(len(pads), 1, 1, L, dtype=torch.bool)
    for b, n in enumerate(pads):
        if n:
            keys[b, ..., (L - n if right else 0):(L if right else n)] = False
    return torch.ones(L, L, dtype=torch.bool).tril() & keys, keys


def additive(keep, dtype=torch.float32, fill=None):
    fill = torch.finfo(dtype).min if fill is None else fill
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, fill)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(mask_proofs, "MIN_GFLOPS", 0.0)   # these calls are small
    mask_proofs.clear()
    yield
    mask_proofs.clear()


@pytest.mark.parametrize("make, expected", [
    (lambda: causal_bool(), "causal"),
    (lambda: additive(causal_bool()), "causal"),
    (lambda: additive(causal_bool(), torch.float16, float("-inf")), "causal"),
    (lambda: torch.ones(2, 1, L, L, dtype=torch.bool), "none"),
    (lambda: torch.zeros(1, 4, L, L), "none"),
    (lambda: causal_bool().transpose(-1, -2), None),                       # bottom-left
    (lambda: additive(causal_bool(), fill=-1.0), None),                    # a bias, not a mask
    (lambda: causal_bool(lq=L - 1, lk=L - 1), None),                       # too short to check
    (lambda: torch.ones(2, 1, L, L + 1, dtype=torch.bool).tril(), None),   # Lq != Lk
    (lambda: torch.ones(2, 1, 1, L, dtype=torch.bool), None),              # a padding row
    (lambda: additive(causal_bool()).requires_grad_(), None),              # needs its gradient
    (lambda: padded_causal([0, 5])[0], "causal+keys"),                     # left padding
    (lambda: additive(padded_causal([3, 0], right=True)[0]), "causal+keys"),
    # additive, left padding: the padded query rows hold only very negative values, which
    # eager spreads over every key (the causal run would not)
    (lambda: additive(padded_causal([0, 5])[0], fill=-1e9), None),
    (lambda: padded_causal([0, 5])[0] & causal_bool(2).transpose(-1, -2), None),  # a diagonal
], ids=["bool", "additive-min", "additive-inf-fp16", "all-true", "all-zero", "upper",
        "bias", "short", "lq-ne-lk", "row", "requires-grad", "bool-padded", "additive-padded",
        "additive-left-padded", "diagonal"])
def test_run_time_kind(make, expected):
    mask = make()
    kind, keys = mask_proofs.run_time_kind(mask, mask.shape[-2], mask.shape[-1])
    assert kind == expected
    if kind == "causal+keys":
        assert keys.shape == mask.shape[:-2] + (1, L)
        assert torch.equal(keys, mask[..., -1:, :])
    else:
        assert keys is None


@pytest.mark.parametrize("make, expected", [
    (lambda: torch.ones(2, 1, 1, L, dtype=torch.bool), "none"),
    (lambda: torch.zeros(2, 1, 1, L), "none"),
    (lambda: torch.zeros(1, 1, 1, L, dtype=torch.float16), "none"),
    (lambda: padded_causal([0, 5])[1], None),                     # pads something
    (lambda: additive(padded_causal([3, 0])[1]), None),
    (lambda: torch.full((2, 1, 1, L), -1.0), None),              # a bias on every key
], ids=["bool", "additive", "additive-fp16", "bool-padded", "additive-padded", "bias"])
def test_key_masks_that_keep_every_key_are_empty(make, expected):
    mask = make()
    assert mask_proofs.run_time_kind(mask, L, L) == (expected, None)
    mask_proofs.clear()
    assert mask_proofs.run_time_kind(mask, 2 * L, L)[0] == expected   # Lq != Lk is fine here
    mask_proofs.clear()
    assert mask_proofs.run_time_kind(mask, L - 1, L)[0] is None      # too few query rows


@pytest.mark.parametrize("options, grad, proven", [
    (dict(kernel="triton", low_rank_min_gflops=0), False, {"none": 1}),  # opens low rank
    (dict(kernel="triton"), False, {}),        # this call is under low_rank_min_gflops
    (dict(kernel="reference", low_rank_min_gflops=0), False, {}),   # (no low rank there)
    (dict(rank="dense"), False, {}),           # nothing to open: a sync for a vector read
    (dict(policy="exact"), False, {}),
    (dict(rank="dense"), True, {"none": 1}),   # gradients follow
], ids=["low-rank-open", "small", "reference", "dense", "exact", "training"])
def test_op_drops_an_empty_padding_mask_where_that_changes_the_call(options, grad, proven):
    """A key mask's proof costs a sync per mask tensor (HF builds one per call): asked for
    only where it opens the low-rank path or gradients follow."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, L, 16, requires_grad=grad) for _ in range(3))
    mask = torch.ones(2, 1, 1, L, dtype=torch.bool)
    site = "s-keys-" + "-".join(f"{key}={value}" for key, value in options.items()) + str(grad)
    opts = Options.parse({"kernel": "reference", "min_seq_len": 16, **options})
    op.register_site(site, opts)
    out = torch.ops.adaattn.attention(q, k, v, mask, 0.0, False, None, False, site,
                                      opts.policy, opts.kernel)[0]
    # (the low-rank path, where it ran, is within the policy's tolerance)
    assert rel_err(out.detach(), F.scaled_dot_product_attention(q, k, v, attn_mask=mask).detach()) <= 2e-2
    assert adaattn_compile.stats()[site]["run_time_masks"] == proven


def test_inference_tensors_are_not_checked():
    with torch.inference_mode():
        mask = causal_bool()
    assert mask_proofs.run_time_kind(mask, L, L) == (None, None)


def test_one_check_per_tensor_and_version(monkeypatch):
    calls = []
    real = match.causal_kind
    monkeypatch.setattr(match, "causal_kind", lambda *a: calls.append(1) or real(*a))
    mask = causal_bool()
    for _ in range(3):
        assert mask_proofs.run_time_kind(mask, L, L)[0] == "causal"
    assert len(calls) == 1
    mask[0, 0, 5, 9] = True          # an in-place write: the proof no longer holds
    assert mask_proofs.run_time_kind(mask, L, L)[0] is None
    assert len(calls) == 2
    other = causal_bool()            # equal values, another tensor: checked on its own
    assert mask_proofs.run_time_kind(other, L, L)[0] == "causal"
    assert len(calls) == 3


def diagonal(b=2):
    """Passes the first-row screen (row 0 keeps key 0 only), fails the proof."""
    return torch.eye(L, dtype=torch.bool).expand(b, 1, L, L).contiguous()


def test_first_row_screen_spares_the_full_check(monkeypatch):
    proofs = []
    real = mask_proofs._prove
    monkeypatch.setattr(mask_proofs, "_prove", lambda *a: proofs.append(1) or real(*a))
    g = torch.Generator().manual_seed(4)
    t5_bias = torch.randn(1, 4, L, L, generator=g)      # a position bias: no row is 0 / -inf
    assert mask_proofs.check(t5_bias, L, L) == (None, None, True)
    assert proofs == []
    assert mask_proofs.check(diagonal(), L, L) == (None, None, True)
    assert proofs == [1]


def test_a_site_stops_checking_after_unprovable_masks():
    site = "s-test"
    for _ in range(mask_proofs.GIVE_UP):
        assert not mask_proofs.given_up(site)
        assert mask_proofs.check(diagonal(), L, L, site) == (None, None, True)
    assert mask_proofs.given_up(site)
    # given up: not even a causal mask is checked there (it runs as read: slower, same result)
    assert mask_proofs.check(causal_bool(), L, L, site) == (None, None, False)
    assert mask_proofs.check(causal_bool(), L, L, "s-other")[0] == "causal"
    mask_proofs.clear()
    assert mask_proofs.check(causal_bool(), L, L, site)[0] == "causal"


def test_a_proof_resets_the_misses():
    site = "s-test"
    for _ in range(3 * mask_proofs.GIVE_UP):
        assert mask_proofs.check(diagonal(), L, L, site)[2]
        assert mask_proofs.check(causal_bool(), L, L, site)[0] == "causal"
    assert not mask_proofs.given_up(site)


def test_small_calls_are_not_checked(monkeypatch):
    monkeypatch.setattr(mask_proofs, "MIN_GFLOPS", 1.0)
    mask = causal_bool()
    assert mask_proofs.check(mask, L, L, "s-test", flops=0.9e9) == (None, None, False)
    assert mask_proofs.check(mask, L, L, "s-test", flops=1.0e9)[0] == "causal"
    # proven once (by a large call), the proof holds for a small call with the same tensor
    assert mask_proofs.check(mask, L, L, "s-test", flops=1.0)[0] == "causal"
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, L, 16, generator=g) for _ in range(3))   # 4.2 MFLOP
    adaattn_compile.reset_stats()
    adaattn_compile.attention(q, k, v, attn_mask=causal_bool(1), kernel="reference")
    entry, = adaattn_compile.stats().values()
    assert not entry["run_time_masks"] and not entry["run_time_mask_misses"]


def test_switched_off(monkeypatch):
    monkeypatch.setenv("ADAATTN_RUN_TIME_MASKS", "0")
    assert mask_proofs.check(causal_bool(), L, L) == (None, None, False)


@pytest.mark.parametrize("kernel", ["reference", "triton"])
@pytest.mark.parametrize("mask_type", ["bool", "additive"])
def test_op_runs_a_run_time_causal_mask_as_causal(kernel, mask_type):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, L, 16, generator=g).requires_grad_() for _ in range(3))
    keep = causal_bool(1)
    mask = keep if mask_type == "bool" else additive(keep)
    out = adaattn_compile.attention(q, k, v, attn_mask=mask, kernel=kernel)
    ref = reference_attention(q, k, v, mask=keep)
    assert rel_err(out, ref) < 1e-5
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    ref_grads = torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref))
    for g_, r in zip(grads, ref_grads):
        assert rel_err(g_, r) < 1e-5
    proven = [e.get("run_time_masks") for e in adaattn_compile.stats().values()]
    assert any(p and p.get("causal") for p in proven), proven


@pytest.mark.parametrize("kernel", ["reference", "triton"])
def test_op_runs_a_padded_causal_mask_as_causal_with_key_mask(kernel):
    # left padding: the padded query rows of batch 1 have no key at all (output 0, as SDPA)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, L, 16, generator=g).requires_grad_() for _ in range(3))
    mask, _ = padded_causal([0, 7])
    out = adaattn_compile.attention(q, k, v, attn_mask=mask, kernel=kernel)
    ref = reference_attention(q, k, v, mask=mask)
    assert rel_err(out, ref) < 1e-5 and float(out[1, :, :7].abs().max()) == 0.0
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    ref_grads = torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref))
    for g_, r in zip(grads, ref_grads):
        assert rel_err(g_, r) < 1e-5
    proven = [e.get("run_time_masks") for e in adaattn_compile.stats().values()]
    assert any(p and p.get("causal+keys") for p in proven), proven


def test_compiled_graph_with_the_mask_as_input():
    # The mask is an input of the graph (as in a DDP or FSDP2 piece): the pass can't prove it,
    # the op does, and the result equals SDPA with the mask.
    def attn(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, L, 32, generator=g) for _ in range(3))
    mask = causal_bool()
    out, sites, _, _ = compile_and_run(attn, q, k, v, mask)
    assert len(sites) == 1 and sites[0].mask == "bool" and not sites[0].causal
    assert rel_err(out, reference_attention(q, k, v, mask=mask)) < 1e-5
    assert sites[0].runtime().get("run_time_masks") == {"causal": 1}


def test_report_counts_run_time_proofs():
    assert_expected_inline = pytest.importorskip("expecttest").assert_expected_inline
    from adaattn_compile.compiler import reset_ids

    def attn(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, L, 16, generator=g) for _ in range(3))

    def runtime_lines(mask):
        reset_ids()
        adaattn_compile.reset_stats()
        report = adaattn_compile.explain(attn, q, k, v, mask, options={"policy": "exact"})
        return "\n".join(line for line in report.format_sites(runtime=True).splitlines()
                         if line.startswith(("  runtime", "  masks")))
    assert_expected_inline(runtime_lines(padded_causal([4])[0]), """\
  runtime   calls=1 backward=0 kernel=reference:1 precision=fp32:1 rank=dense:2 demotions=0 error=exact
  masks     proven at run time, not read: causal+keys:1 calls""")
    assert_expected_inline(runtime_lines(diagonal(1)), """\
  runtime   calls=1 backward=0 kernel=reference:1 precision=fp32:1 rank=dense:2 demotions=0 error=exact
  masks     checked at run time, not provable: 1 calls""")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("which", ["causal", "padded", "additive-padded"])
def test_gpu_run_time_masks(dtype, D, which):
    # Llama-like: GQA 8/2, L = 1024 (the Gluon forward takes D=128; causal D=64 the Triton one)
    B, Hq, Hkv, n = 2, 8, 2, 1024
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, Hq, n, D, generator=g).to("cuda", dtype).requires_grad_()
    k, v = (torch.randn(B, Hkv, n, D, generator=g).to("cuda", dtype).requires_grad_()
            for _ in range(2))
    tril = torch.ones(n, n, dtype=torch.bool).tril()
    keys = torch.ones(B, 1, 1, n, dtype=torch.bool)
    keys[0, ..., n - 37:] = False                 # right padding
    if which == "padded":
        keys[1, ..., :100] = False                # left padding: rows with no key at all
    keep = tril.expand(B, 1, n, n) if which == "causal" else tril & keys
    mask = keep.contiguous().cuda()
    if which == "additive-padded":                # (every row keeps a key: see run_time_kind)
        mask = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, float("-inf")).cuda()
    adaattn_compile.reset_stats()
    out = adaattn_compile.attention(q, k, v, attn_mask=mask, enable_gqa=True)
    ref = reference_attention(q, k, v, mask=keep.cuda(), gqa=True)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert rel_err(out, ref) < tol
    # gradients against the same kernels run with the mask read (no proof): equal up to rounding
    mask_proofs.clear()
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to("cuda", dtype)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mask_proofs, "MIN_LEN", 10**9)           # nothing checked: the mask is read
        out_read = adaattn_compile.attention(q, k, v, attn_mask=mask, enable_gqa=True)
        grads_read = torch.autograd.grad(out_read, (q, k, v), grad_out)
    out_proven = adaattn_compile.attention(q, k, v, attn_mask=mask, enable_gqa=True)
    grads_proven = torch.autograd.grad(out_proven, (q, k, v), grad_out)
    assert rel_err(out_proven, out_read) < tol
    for a, b in zip(grads_proven, grads_read):
        assert rel_err(a, b) < 2 * tol
    kinds = [e.get("run_time_masks") for e in adaattn_compile.stats().values()]
    assert any(kk and kk.get("causal" if which == "causal" else "causal+keys") for kk in kinds)


def test_a_proof_belongs_to_the_mask_node_as_well_as_the_tensor():
    """Inductor may reuse a dead mask's buffer object for a later mask node, writing it from a
    kernel (no version bump): the later node must not take the earlier one's proof."""
    mask_proofs.clear()
    mask = torch.ones(1, 1, L, L, dtype=torch.bool).tril()
    assert mask_proofs.check(mask, L, L, "s-a", group="g/first")[0] == "causal"
    mask.data.fill_(True)   # (written without a version bump, as a kernel of Inductor's would)
    assert mask._version == 0
    assert mask_proofs.check(mask, L, L, "s-b", group="g/second")[0] == "none"
    assert mask_proofs.check(mask, L, L, "s-c", group="g/first")[0] == "causal"   # (kept)
    mask_proofs.clear()


def test_per_layer_masks_of_one_shape_each_proven_in_a_compiled_graph(monkeypatch):
    """Layers that each build their own (L, L) mask from an input: a causal one, then a
    sliding window of the same shape. Each site gets the answer of its own mask."""
    monkeypatch.setattr(mask_proofs, "MIN_GFLOPS", 0.0)
    mask_proofs.clear()
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, L, 16, generator=g) for _ in range(3))
    pos = torch.arange(L)

    def layers(q, k, v, pos, windows):
        out = q
        for window in windows:
            diff = pos[:, None] - pos[None, :]
            keep = (diff >= 0) & (diff < window)
            out = F.scaled_dot_product_attention(out, k, v, attn_mask=keep)
        return out

    windows = torch.tensor([L + 1, 8])   # (a tensor: not constant-folded at compile time)
    want = layers(q, k, v, pos, windows)
    got, sites, _, _ = compile_and_run(layers, q, k, v, pos, windows,
                                       options={"kernel": "reference", "inner": "inductor"})
    assert len(sites) == 2
    assert rel_err(got, want) < 1e-5
    mask_proofs.clear()
