"""Adaptive precision (issue 4): the planner's ladder under mocked capabilities and dtypes, the
8-bit kernel against float64, the sampled-row check, and the run-time demotions.

CPU: the Triton kernels under the interpreter (fp32 / fp16: the interpreter computes bf16
wrongly). GPU (marked): bf16 at real sizes, through ``device``.
"""
import math
import warnings

import pytest
import torch

import adaattn_compile
from adaattn_compile import op, planner, precision, report
from adaattn_compile.kernels import attn8
from adaattn_compile.options import OptionError, Options
from adaattn_compile.planner import DeviceInfo, Problem, plan

from helpers import reference_with_lse, rel_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CPU = DeviceInfo("cpu")
SM75 = DeviceInfo("cuda", (7, 5))
SM80 = DeviceInfo("cuda", (8, 0))
SM89 = DeviceInfo("cuda", (8, 9))
SM90 = DeviceInfo("cuda", (9, 0))
SM90_TF32 = DeviceInfo("cuda", (9, 0), allow_tf32=True)
FITS, HUGE = (3.0, 4.0, 5.0), (3.0, 4.0e5, 5.0)


def problem(dtype="bfloat16", length=8192, amax=None, **kw):
    return Problem(dtype=dtype, q_len=length, k_len=length, head_dim=128, v_head_dim=128,
                   mask=None, causal=False, dropout_p=kw.pop("dropout_p", 0.0), amax=amax, **kw)


INT8_ON = {"int8_min_seq_len": 0}


@pytest.mark.parametrize("device,dtype,amax,options,ladder", [
    # no ladder off CUDA, below sm80 (no Triton kernel: the reference path computes in fp32)
    (CPU, "float32", FITS, {}, ("fp32",)),
    (CPU, "bfloat16", None, INT8_ON, ("bf16",)),
    (SM75, "float32", FITS, INT8_ON, ("fp32",)),
    (SM75, "float16", None, INT8_ON, ("fp16",)),
    # fp32 inputs: fp16 where the measured ranges fit, else bf16 (sm80+); tf32 stays tf32
    (SM80, "float32", FITS, {}, ("fp16", "fp32")),
    (SM80, "float32", HUGE, {}, ("bf16", "fp32")),
    (SM80, "float32", None, {}, ("bf16", "fp32")),
    (SM90_TF32, "float32", FITS, {}, ("fp16", "tf32")),
    # 16-bit inputs: nothing cheaper than themselves unless the 8-bit kernel is offered,
    # and it is only from sm89
    (SM80, "bfloat16", None, {}, ("bf16",)),
    (SM80, "bfloat16", None, INT8_ON, ("bf16",)),
    (SM89, "bfloat16", None, INT8_ON, ("int8", "bf16")),
    (SM90, "float16", None, INT8_ON, ("int8", "fp16")),
    (SM90, "float32", FITS, INT8_ON, ("int8", "fp16", "fp32")),
    (SM90, "float32", HUGE, INT8_ON, ("int8", "bf16", "fp32")),
    (SM90, "bfloat16", None, {}, ("bf16",)),           # 8-bit not offered by default
    (SM90, "bfloat16", None, {"int8_min_seq_len": 16384}, ("bf16",)),
    (SM90, "float64", None, INT8_ON, ("fp64",)),
    # exact policy: the inputs' precision, fp32 stays fp32 / tf32
    (SM90, "float32", FITS, {"policy": "exact", **INT8_ON}, ("fp32",)),
    (SM90_TF32, "float32", FITS, {"policy": "exact"}, ("tf32",)),
    (SM90, "bfloat16", None, {"policy": "exact", **INT8_ON}, ("bf16",)),
    # below min_seq_len: exact
    (SM90, "float32", FITS, {"min_seq_len": 16384, **INT8_ON}, ("fp32",)),
])
def test_precision_ladder_by_capability_dtype_and_policy(device, dtype, amax, options, ladder):
    options = Options.parse(dict({"min_seq_len": 4096}, **options))
    chosen = plan(device, problem(dtype, amax=amax), options)
    assert chosen.precisions == ladder
    assert chosen.precision == ladder[0]
    assert not chosen.precision_forced
    if len(ladder) > 1:
        assert any(g.startswith(f"precision {'>'.join(ladder)}: each lower one checked")
                   for g in chosen.guards)


def test_training_dropout_and_kernel_failures_keep_the_input_precision():
    on = Options.parse(INT8_ON)
    assert plan(SM90, problem("float32", amax=FITS, training=True), on).precisions == ("fp32",)
    forced = plan(SM90, problem("float32", amax=FITS, training=True), Options.parse(
        precision="bf16"))
    assert forced.precisions == ("fp32",) and not forced.precision_forced
    assert "precision fp32: precision=bf16 unavailable: gradients taken" in forced.guards
    # dropout: the 8-bit kernel has none, the 16-bit cast keeps it (the Triton kernel takes
    # no dropout either: the reference path, no ladder)
    p = problem("float32", amax=FITS, dropout_p=0.1, kernel_unsupported="dropout")
    assert plan(SM90, p, on).precisions == ("fp32",)
    p = problem("bfloat16", int8_unsupported="head dim > 256")
    assert plan(SM90, p, on).precisions == ("bf16",)
    assert plan(SM90, problem("bfloat16"), Options.parse(kernel="reference",
                                                         **INT8_ON)).precisions == ("bf16",)


@pytest.mark.parametrize("device,dtype,amax,forced,ladder,why", [
    (SM90, "bfloat16", None, "int8", ("int8", "bf16"), "forced by precision=int8"),
    (SM80, "bfloat16", None, "int8", ("bf16",), "8-bit kernel needs sm89 (cuda sm80)"),
    (SM75, "float32", FITS, "bf16", ("fp32",), "no Triton kernel"),
    (SM80, "float32", HUGE, "fp16", ("fp32",), "input range 4e+05 >= 16384"),
    (SM80, "float32", None, "bf16", ("bf16", "fp32"), "forced by precision=bf16"),
    (SM90, "bfloat16", None, "fp32", ("bf16",), "inputs are already 16-bit"),
    (SM90, "float32", FITS, "tf32", ("fp32",), "the input's own precision"),
    (SM90, "bfloat16", None, "input", ("bf16",), "precision='input'"),
])
def test_forced_precision(device, dtype, amax, forced, ladder, why):
    chosen = plan(device, problem(dtype, amax=amax), Options.parse(precision=forced))
    assert chosen.precisions == ladder
    if why is not None:
        assert any(why in g for g in chosen.guards), chosen.guards
    assert chosen.precision_forced == (len(ladder) > 1)


def test_precision_options():
    assert Options.parse(precision="fp8").precision == "int8"   # the older name
    assert Options.parse(precision="int8").precision == "int8"
    assert Options.parse().int8_min_seq_len is None
    assert Options.parse(int8_min_seq_len=2048).int8_min_seq_len == 2048
    for bad in (-1, 1.5, True, "4k"):
        with pytest.raises(OptionError, match="'int8_min_seq_len'"):
            Options.parse(int8_min_seq_len=bad)
    with pytest.raises(OptionError, match="'precision'.*fp8"):
        Options.parse(precision="int4")


# ---------------------------------------------------------------------------------------------
# the 8-bit kernel against float64

CASES = [  # B, Hq, Hk, Lq, Lk, D, Dv, causal, mask
    (1, 2, 2, 100, 77, 64, 64, False, None),
    (2, 4, 2, 65, 130, 16, 32, True, None),       # GQA, causal, Lq != Lk
    (1, 2, 1, 50, 90, 128, 128, False, "bool"),   # MQA, a bool mask with masked rows
    (1, 2, 2, 33, 70, 80, 48, False, "additive"),  # D not a power of two, Dv != D
    (1, 1, 1, 97, 97, 256, 256, True, None),
    (1, 3, 3, 1, 45, 32, 32, False, None),        # one query
]


def _mask(kind, B, H, Lq, Lk, dtype):
    gen = torch.Generator().manual_seed(1)
    if kind == "bool":
        m = torch.rand(B, 1, Lq, Lk, generator=gen) > 0.3
        m[..., 3, :] = False   # a fully masked row: 0 and lse = -inf
        return m.to(DEV)
    if kind == "additive":
        return torch.randn(1, H, 1, Lk, generator=gen).to(DEV, dtype)
    return None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_int8_kernel_against_float64(case, dtype):
    B, Hq, Hk, Lq, Lk, D, Dv, causal, kind = case
    torch.manual_seed(hash(case) % 2**31)
    q = torch.randn(B, Hq, Lq, D, device=DEV, dtype=dtype)
    k = torch.randn(B, Hk, Lk, D, device=DEV, dtype=dtype)
    v = torch.randn(B, Hk, Lk, Dv, device=DEV, dtype=dtype)
    mask = _mask(kind, B, Hq, Lq, Lk, dtype)
    out, lse = attn8.forward(q, k, v, mask, causal)
    ref, ref_lse = reference_with_lse(q, k, v, None if mask is None else mask.expand(
        B, Hq, Lq, Lk), causal, 1 / math.sqrt(D))
    assert out.dtype == dtype and out.shape == (B, Hq, Lq, Dv)
    assert rel_err(out, ref) < 3e-2
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite].double() - ref_lse[finite]).abs().max() < 5e-2
    if kind == "bool":
        assert out[..., 3, :].abs().max() == 0


def test_int8_kernel_outlier_key_channels_and_zero_rows():
    """Four key channels x20 (LLM keys' outliers; the rotation spreads them) and all-zero
    query rows (scale 0: uniform attention, no nan)."""
    torch.manual_seed(2)
    q = torch.randn(1, 2, 96, 64, device=DEV)
    k = torch.randn(1, 2, 96, 64, device=DEV)
    v = torch.randn(1, 2, 96, 64, device=DEV)
    k[..., [3, 17, 40, 61]] *= 20
    q[..., 5, :] = 0
    out, _ = attn8.forward(q, k, v, None, True)
    ref, _ = reference_with_lse(q, k, v, None, True, 1 / 8)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < 5e-2
    assert rel_err(out[..., 5, :], ref[..., 5, :]) < 3e-2


@pytest.mark.parametrize("boost", [5.0, 8.0])
def test_int8_p_keeps_its_levels_in_tiles_below_the_running_max(boost):
    """The first key scores ``boost`` above the rest (natural-log units) and the rest of its
    key tile is masked: every other key sits in a tile far below the running max. P is rounded
    relative to each tile row's own max, so those tiles keep all 255 levels; relative to the
    running max they had e^-boost of them (the interpreter's 32-key tiles: 4.8e-2 and 8.3e-2
    that way, 1.2e-2 and 1.1e-2 now). Keys that share a tile with such a key do lose their
    levels: unmasked, with the GPU's 128-key tiles, this case errs 2.7e-2 / 3.8e-2 (H100,
    twenty-eighth session), which the sampled-row checks measure like any other error."""
    torch.manual_seed(7)
    tile = attn8._blocks(32)[1]
    q = torch.randn(1, 2, 128, 32, device=DEV)
    k = torch.randn(1, 2, 3 * tile, 32, device=DEV)
    v = torch.randn(1, 2, 3 * tile, 32, device=DEV)
    bias = torch.zeros(1, 1, 1, 3 * tile, device=DEV)
    bias[..., 0] = boost
    bias[..., 1:tile] = -math.inf
    out, lse = attn8.forward(q, k, v, bias, False)
    ref, ref_lse = reference_with_lse(q, k, v, bias.expand(1, 2, 128, 3 * tile), False,
                                      32 ** -0.5)
    assert rel_err(out, ref) < 2e-2
    assert (lse.double() - ref_lse).abs().max() < 5e-2


# the pre-pass rotates fp16 / bf16 inputs in their own dtype and fp32 ones in fp16 parts
PREPASS_DTYPES = [torch.float32, torch.float16] + (
    [torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("dtype", PREPASS_DTYPES, ids=str)
def test_quantise_roundtrip_and_k_smoothing(dtype):
    """The pre-pass's tensors rebuild Q R and (K - mean of the first keys) R within int8's
    rounding; V's per-block scales rebuild V; q . mean (for the lse) is exact."""
    torch.manual_seed(3)
    q = torch.randn(1, 1, 40, 32, device=DEV, dtype=dtype)
    k = torch.randn(1, 1, 70, 32, device=DEV, dtype=dtype) + 5.0   # smoothing removes the bias
    v = torch.randn(1, 1, 70, 16, device=DEV, dtype=dtype)
    t = attn8.quantise(q, k, v)
    rot = attn8._rotation_cpu(32).double().to(DEV)
    q, k, v = q.double(), k.double(), v.double()
    rows = t["rows"]
    scale = 1 / math.sqrt(32) * attn8._LOG2E / 32
    q_back = t["q8"][0, 0, :40].double() * (t["qs"][0, 0, :40, None] / scale)
    assert rel_err(q_back, q[0, 0] @ rot) < 1e-2
    mean = k[0, 0, :rows].mean(0)
    k_back = t["k8"][0, 0, :70].double() * t["ks"][0, 0, :70, None]
    assert rel_err(k_back, (k[0, 0] - mean) @ rot) < 1e-2
    q_mean = t["qm"][0, 0, :40].double() / (1 / math.sqrt(32) * attn8._LOG2E)
    assert (q_mean - q[0, 0] @ mean).abs().max() < 1e-4 * (q[0, 0].abs() @ mean.abs()).max()
    v_back = t["v8t"][0, 0, :16, :70].double().T.reshape(-1, 16)
    scales = (t["vs"][0, 0, :, :16] * 254).repeat_interleave(rows, 0)[:70]
    assert rel_err(v_back * scales, v[0, 0]) < 1e-2


@pytest.mark.parametrize("dtype", PREPASS_DTYPES, ids=str)
@pytest.mark.parametrize("L,D,Hq,Hk,rows", [(70, 32, 2, 2, None), (200, 64, 4, 2, None),
                                             (300, 64, 2, 1, 128)])
def test_quantise_in_the_sm90_kernels_form(L, D, Hq, Hk, rows, dtype, monkeypatch):
    """The sm90 form (what attn8_hopper reads): one K scale per block of keys, V·R with one
    scale per block, V's keys in the P operand's order; the attention those tensors describe
    (the kernel's math without P's rounding, in float64) matches float64 attention, and its
    lse too. GQA; ``rows`` 128 (the GPU's blocks). Keys with a bias of 3 (what smoothing
    takes out before the 8-bit rounding)."""
    if rows:
        monkeypatch.setenv("ADAATTN_ATTN8_CONFIG", f"{rows},{rows},4,1")
    torch.manual_seed(4)
    q = torch.randn(1, Hq, L, D, device=DEV, dtype=dtype)
    k = torch.randn(1, Hk, L, D, device=DEV, dtype=dtype) + 3.0
    v = torch.randn(1, Hk, L, D, device=DEV, dtype=dtype)
    t = attn8.quantise(q, k, v, sm90=True)
    rows, Lk_p = t["rows"], t["Lk_p"]
    assert t["sm90"]
    for name in ("ks", "vs"):
        per_block = t[name].reshape(1, Hk, Lk_p // rows, -1)
        assert torch.equal(per_block, per_block[..., :1].expand_as(per_block)), name
    n = torch.arange(Lk_p, device=DEV)
    place = (n & ~15) | (((n >> 1) & 3) << 2) | (((n >> 3) & 1) << 1) | (n & 1)
    assert torch.equal(place.sort().values, n)   # a permutation of each 16 keys
    g = Hq // Hk
    v_rot = (t["v8t"].double()[..., place].transpose(-1, -2)
             * t["vs"][..., :1].double().repeat_interleave(rows, -2)).repeat_interleave(g, 1)
    k8, ks = t["k8"].double().repeat_interleave(g, 1), t["ks"].double().repeat_interleave(g, 1)
    s = (t["q8"].double() @ k8.transpose(-1, -2)
         * t["qs"].double()[..., None] * ks[..., None, :])[..., :L, :L]
    s = s * math.log(2)   # (the scales give log2 units)
    out = torch.softmax(s, -1) @ v_rot[..., :L, :] @ attn8._rotation_cpu(D).double().T.to(DEV) / D
    ref, ref_lse = reference_with_lse(q, k, v, None, False, 1 / math.sqrt(D))
    assert rel_err(out, ref) < 2.5e-2
    lse = torch.logsumexp(s, -1) + t["qm"].double()[..., :L] * math.log(2)
    assert (lse - ref_lse).abs().max() < 5e-2


def test_quantise_sm90_form_needs_equal_head_dims():
    q, k = torch.randn(1, 1, 8, 32), torch.randn(1, 1, 8, 32)
    with pytest.raises(ValueError, match="D == Dv"):
        attn8.quantise(q, k, torch.randn(1, 1, 8, 16), sm90=True)


def test_a_failing_sm90_kernel_leaves_the_triton_one(monkeypatch):
    """The Gluon kernel failing (another triton's API, a build error) warns once and the Triton
    8-bit kernel runs that call and the device's later ones; clear_compiled tries it again."""
    from adaattn_compile.kernels import attn8_hopper
    tries = []

    def broken(*args):
        tries.append(1)
        raise RuntimeError("no such Gluon op")
    monkeypatch.setattr(attn8_hopper, "unsupported", lambda *args: None)
    monkeypatch.setattr(attn8_hopper, "attend", broken)
    monkeypatch.setattr(attn8, "_SM90_FAILED", set())
    q, k, v = (torch.randn(1, 2, 40, 32, device=DEV) for _ in range(3))
    with pytest.warns(UserWarning, match="sm90 Gluon kernel failed.*RuntimeError"):
        out, _ = attn8.forward(q, k, v)
    ref, _ = reference_with_lse(q, k, v, None, False, 32 ** -0.5)
    assert rel_err(out, ref) < 3e-2
    assert "failed" in attn8.sm90_unsupported(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attn8.forward(q, k, v)
    assert len(tries) == 1
    attn8.clear_compiled()
    assert attn8.sm90_unsupported(q, k, v) is None


def test_sm90_kernel_says_why_not():
    """Off sm90, with a mask or another head dim the 8-bit forward stays on the Triton kernel
    (the capability is passed in: checked without the device where the interpreter is off)."""
    from types import SimpleNamespace

    from adaattn_compile.kernels import attn8_hopper
    q = torch.randn(1, 1, 8, 64)
    assert attn8.sm90_unsupported(q, q, q) is not None   # a CPU tensor
    if not attn8_hopper.AVAILABLE or attn8_hopper._INTERPRET:
        return

    def like(d=64):
        return SimpleNamespace(device=torch.device("cuda", 0), shape=(1, 1, 8, d))
    x = like()
    assert "sm80" in attn8_hopper.unsupported(x, x, x, None, (8, 0))
    assert "mask" in attn8_hopper.unsupported(x, x, x, object(), (9, 0))
    assert "head dims" in attn8_hopper.unsupported(like(96), like(96), like(96), None, (9, 0))
    assert "head dims" in attn8_hopper.unsupported(x, x, like(128), None, (9, 0))
    assert attn8_hopper.unsupported(x, x, x, None, (9, 0)) is None


# ---------------------------------------------------------------------------------------------
# the sampled-row check

@pytest.mark.parametrize("causal,kind,groups", [(False, None, 1), (True, None, 2),
                                                (False, "bool", 1), (False, "additive", 2)])
def test_sampled_error_matches_the_full_error_on_its_rows(causal, kind, groups, monkeypatch):
    torch.manual_seed(4)
    q = torch.randn(2, 2 * groups, 50, 16, device=DEV)
    k = torch.randn(2, 2, 60, 16, device=DEV)
    v = torch.randn(2, 2, 60, 8, device=DEV)
    mask = _mask(kind, 2, 2 * groups, 50, 60, torch.float32)
    ref, _ = reference_with_lse(q, k, v, None if mask is None else mask.expand(
        2, 2 * groups, 50, 60), causal, 0.25)
    noisy = ref + 1e-2 * torch.randn_like(ref)
    rows = precision.sample_rows(50, 3, DEV, samples=10)
    assert rows.numel() == 10 and len(set(rows.tolist())) == 10
    err = precision.sampled_error(q, k, v, noisy.float(), mask, causal, 0.25, rows)
    expect = rel_err(noisy[..., rows, :], ref[..., rows, :])
    assert err == pytest.approx(expect, rel=1e-3)
    assert precision.sampled_error(q, k, v, ref.float(), mask, causal, 0.25, rows) < 1e-6
    # a subset of (batch, kv head) pairs: the error of those heads' rows (every query head of
    # a kv head's group)
    heads = precision.sample_heads(2, 2, 1, DEV, limit=3)
    assert [(int(b), int(h)) for b, h in zip(*heads)] == [(1, 1), (0, 0), (0, 1)]
    pick = [(b, h * groups + g) for b, h in [(1, 1), (0, 0), (0, 1)] for g in range(groups)]
    got = torch.stack([noisy[b, h][rows] for b, h in pick])
    want = torch.stack([ref[b, h][rows] for b, h in pick])
    err = precision.sampled_error(q, k, v, noisy.float(), mask, causal, 0.25, rows, heads)
    assert err == pytest.approx(rel_err(got, want), rel=1e-3)
    # one head at a time (long sequences: the float64 K and V of a few heads at once)
    monkeypatch.setattr(precision, "_CHECK_BYTES", 1)
    assert precision.sampled_error(q, k, v, noisy.float(), mask, causal, 0.25, rows,
                                   heads) == pytest.approx(err, rel=1e-9)


def test_sample_rows_move_between_checks():
    seen = set()
    for check in range(8):
        seen.update(precision.sample_rows(4096, check, "cpu", samples=32).tolist())
    assert len(seen) > 32 * 4


# ---------------------------------------------------------------------------------------------
# run-time demotion (the op, a mocked sm90 device, the kernels under the interpreter / on GPU)

@pytest.fixture
def sm90(monkeypatch):
    if DEV == "cpu":
        monkeypatch.setattr(op, "device_info", lambda device: DeviceInfo("cuda", (9, 0)))


_SITE = iter(range(10**6))


def _run(q, k, v, calls=1, **options):
    site = f"precision-test-{next(_SITE)}"
    opts = Options.parse(dict({"min_seq_len": 0, "int8_min_seq_len": 0, "kernel": "triton"},
                              **options))
    op.register_site(site, opts)
    for _ in range(calls):
        out = torch.ops.adaattn.attention(q, k, v, None, 0.0, False, None, False, site,
                                          opts.policy, "triton")[0]
    return out, adaattn_compile.stats()[site]


@pytest.mark.parametrize("tolerance,used,demoted", [
    (5e-2, "int8", []),
    (4e-3, "fp16", ["int8 -> fp16"]),
    (1e-6, "fp32", ["int8 -> fp16", "fp16 -> fp32"]),
])
def test_a_failed_check_demotes_the_site_and_reruns_the_call(sm90, tolerance, used, demoted):
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 2, 130, 64, device=DEV) for _ in range(3))
    out, rt = _run(q, k, v, calls=2, policy="fast", tolerance=tolerance)
    ref, _ = reference_with_lse(q, k, v, None, False, 1 / 8)
    assert rt["precision"] == {used: 2}
    assert [d.split(":")[0] for d in rt["precision_demotions"]] == demoted
    assert rel_err(out, ref) <= max(tolerance, 1e-6)
    errors = rt["precision_errors"]
    assert set(errors) == {d.split(" ")[0] for d in demoted} | ({used} - {"fp32"})
    if used != "fp32":
        assert rt["measured_error"] == errors[used] <= tolerance
        assert errors[used] == pytest.approx(rel_err(out, ref), rel=0.5)


def test_checks_repeat_every_n_calls(sm90, monkeypatch):
    monkeypatch.setattr(precision, "CHECK_EVERY", 3)
    q, k, v = (torch.randn(1, 1, 70, 32, device=DEV) for _ in range(3))
    _, rt = _run(q, k, v, calls=7, policy="fast")
    assert rt["precision"] == {"int8": 7} and rt["precision_checks"] == 3   # calls 1, 4, 7


def test_forced_precision_is_measured_not_demoted(sm90):
    q, k, v = (torch.randn(1, 2, 64, 32, device=DEV) for _ in range(3))
    out, rt = _run(q, k, v, calls=2, policy="exact", precision="int8")
    assert rt["precision"] == {"int8": 2} and not rt["precision_demotions"]
    assert 1e-3 < rt["precision_errors"]["int8"] < 3e-2


def test_fp16_range_check_at_run_time(sm90, monkeypatch):
    """Planned fp16 (small inputs), then inputs outgrow fp16's range: the next check moves the
    site up before fp16 runs (no inf reaches the output)."""
    monkeypatch.setattr(precision, "CHECK_EVERY", 1)
    q, k, v = (torch.randn(1, 1, 40, 16, device=DEV) for _ in range(3))
    site = f"precision-test-{next(_SITE)}"
    opts = Options.parse(min_seq_len=0, kernel="triton", policy="fast")
    op.register_site(site, opts)
    call = lambda *t: torch.ops.adaattn.attention(*t, None, 0.0, False, None, False, site,  # noqa
                                                 "fast", "triton")[0]
    call(q, k, v)
    big = v * 1e5
    out = call(q, k, big)
    rt = adaattn_compile.stats()[site]
    assert rt["precision"] == {"fp16": 1, "fp32": 1}
    assert rt["precision_demotions"][0].startswith("fp16 -> fp32: input range")
    assert torch.isfinite(out).all()
    ref, _ = reference_with_lse(q, k, big, None, False, 0.25)
    assert rel_err(out, ref) < 1e-5


def test_a_failing_rung_falls_back_with_a_warning(sm90, monkeypatch):
    def broken():
        def forward(*args):
            raise RuntimeError("no 8-bit today")
        return forward
    monkeypatch.setattr(op, "_attn8", broken)
    q, k, v = (torch.randn(1, 1, 40, 16, device=DEV, dtype=torch.float16) for _ in range(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, rt = _run(q, k, v, calls=2, policy="fast")
    assert rt["precision"] == {"fp16": 2}
    assert any("int8 kernel failed" in str(w.message) for w in caught)
    assert "int8 kernel failed (RuntimeError: no 8-bit today)" in rt["fallbacks"]
    ref, _ = reference_with_lse(q, k, v, None, False, 0.25)
    assert rel_err(out, ref) < 2e-3


def test_report_shows_precision_checks_and_demotions():
    rt = {"precision_checks": 3, "precision_errors": {"int8": 4.4e-2, "fp16": 5.1e-4},
          "precision_demotions": ["int8 -> fp16: 4.40e-02 > 0.01"]}
    assert report._format_precision(rt) == (
        "  precision checks=3 error: int8 4.4e-02, fp16 5.1e-04; "
        "demoted int8 -> fp16: 4.40e-02 > 0.01")


def test_explain_shows_the_ladder_and_the_run_time_precision(sm90):
    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    q, k, v = (torch.randn(1, 2, 64, 32, device=DEV) for _ in range(3))
    options = {"min_seq_len": 0, "int8_min_seq_len": 0, "kernel": "triton", "policy": "fast",
               "small_call_gflops": 0}
    rep = adaattn_compile.explain(Attn(), q, k, v, options=options)
    text = str(rep)
    assert ("precision int8>bf16>fp32: each lower one checked on sampled rows within 0.03; "
            "fp16 instead of bf16 where the inputs' measured range fits") in text
    assert "precision checks=1 error: int8" in text
    assert rep.sites[0].decision.precision == "int8"
    assert rep.sites[0].decision.precisions == ("int8", "bf16", "fp32")


# ---------------------------------------------------------------------------------------------
# GPU: bf16 at real sizes (the interpreter computes bf16 wrongly)

@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["sm90", "triton"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("inputs", ["normal", "key bias", "outlier keys"])
def test_int8_kernel_bf16_real_sizes(inputs, causal, kernel, monkeypatch):
    """``sm90``: the Gluon kernel where the device has it (else the same Triton one)."""
    if kernel == "triton":
        monkeypatch.setenv("ADAATTN_ATTN8_SM90", "0")
    torch.manual_seed(6)
    q, k, v = (torch.randn(2, 4, 4096, 128, device="cuda") for _ in range(3))
    if inputs == "key bias":    # a channel-wise bias: smoothing removes it
        k = k + 20 * torch.randn(128, device="cuda") * (torch.arange(128, device="cuda") % 32 == 0)
    if inputs == "outlier keys":   # four channels x20: the rotation spreads them
        k[..., [3, 17, 50, 99]] *= 20
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out, lse = attn8.forward(q, k, v, None, causal)
    # (against float64 of the bf16 inputs: the kernel's error, not the inputs' rounding)
    ref, ref_lse = reference_with_lse(q, k, v, None, causal, 1 / math.sqrt(128))
    o, r = out.double().flatten(), ref.flatten()
    # (issue 4's bar on (a) and (b); outlier keys measured 2.39e-2, cosine 0.99972 on the
    # H100 once P was rounded per tile row, 4.3e-2 before)
    assert rel_err(out, ref) < 3e-2
    assert torch.nn.functional.cosine_similarity(o, r, dim=0) > 0.9995
    # (outlier keys: scores reach ~20, and 8-bit products err in proportion; causal: a first
    # row's lse is one 8-bit score, ~1.1e-2 nats rms here, 2.16e-2 the largest of 8 heads)
    lse_limit = 4e-2 if inputs == "outlier keys" or causal else 2e-2
    assert ((lse.double() - ref_lse).abs() / (1 + ref_lse.abs())).max() < lse_limit


SM90_CASES = [  # (B, Hq, Hk, Lq, Lk, D, causal, dtype)
    (1, 4, 4, 1000, 1000, 128, False, torch.bfloat16),
    (1, 4, 4, 1000, 1000, 128, True, torch.bfloat16),
    (1, 4, 4, 77, 333, 64, False, torch.float16),
    (1, 4, 4, 333, 77, 128, True, torch.float16),
    (1, 8, 2, 2048, 1536, 128, False, torch.bfloat16),
    (1, 8, 1, 1537, 1537, 64, True, torch.bfloat16),
    (3, 2, 2, 1, 129, 128, False, torch.bfloat16),
    (1, 2, 2, 130, 1, 64, True, torch.float16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", SM90_CASES, ids=lambda c: "-".join(map(str, c[:7])))
def test_sm90_int8_kernel_shapes(case):
    """The Gluon kernel (sm90) on ragged and unequal lengths, causal, GQA / MQA, both head
    dims, fp16 and bf16."""
    B, Hq, Hk, Lq, Lk, D, causal, dtype = case
    torch.manual_seed(hash(case) % 2**31)
    q = torch.randn(B, Hq, Lq, D, device="cuda", dtype=dtype)
    k = torch.randn(B, Hk, Lk, D, device="cuda", dtype=dtype)
    v = torch.randn(B, Hk, Lk, D, device="cuda", dtype=dtype)
    if attn8.sm90_unsupported(q, k, v) is not None:
        pytest.skip(attn8.sm90_unsupported(q, k, v))
    out, lse = attn8.forward(q, k, v, None, causal)
    ref, ref_lse = reference_with_lse(q, k, v, None, causal, 1 / math.sqrt(D))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < 3e-2
    # (a causal head's first rows see a key or two: their lse is a score or two, each with its
    # 8-bit product's error, K's scale being its block's: up to 6.2e-2 at D = 64, H100)
    assert (lse.double() - ref_lse).abs().max() < 1e-1


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["sm90", "triton"])
def test_int8_kernel_scores_spread_over_thousands_of_nats(kernel, monkeypatch):
    """Self-attention of large vectors (q = k, |q|^2 / sqrt(D) ~ 10^4 nats above the rest): the
    scores' row factor is large, and P's largest entry must stay 127 (a p rounded above 1 would
    wrap to -128 in the int8 operand and flip that key's sign). Each row is one-hot."""
    if kernel == "triton":
        monkeypatch.setenv("ADAATTN_ATTN8_SM90", "0")
    torch.manual_seed(8)
    q = (30 * torch.randn(1, 4, 1024, 128, device="cuda")).bfloat16()
    v = torch.randn(1, 4, 1024, 128, device="cuda").bfloat16()
    out, _ = attn8.forward(q, q, v, None, False)
    assert rel_err(out, v.double()) < 3e-2


@pytest.mark.gpu
def test_ladder_on_the_gpu():
    """No mock: this GPU's capability decides (sm89+: int8 first; sm80: bf16 only)."""
    q, k, v = (torch.randn(1, 8, 4096, 64, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    calls = precision.CHECK_EVERY + 1
    out, rt = _run(q, k, v, calls=calls, policy="fast")
    major, minor = torch.cuda.get_device_capability()
    used = "int8" if (major, minor) >= (8, 9) else "bf16"
    assert rt["precision"] == {used: calls}
    if used == "int8":
        assert rt["precision_checks"] == 2 and rt["measured_error"] < 3e-2
    ref, _ = reference_with_lse(q[:, :2], k[:, :2], v[:, :2], None, False, 1 / 8)
    assert rel_err(out[:, :2], ref) < 3e-2


# ---------------------------------------------------------------------------------------------
# exact fp32 on CUDA: the reference path runs torch's memory-efficient kernel (with the lse)

@pytest.mark.gpu
@pytest.mark.parametrize("kind,causal,gqa", [(None, False, False), (None, True, True),
                                             ("bool", False, False), ("additive", True, False)])
def test_reference_path_on_cuda_matches_float64(kind, causal, gqa, monkeypatch):
    from adaattn_compile.kernels import reference
    torch.manual_seed(7)
    B, H, L, D = 2, 4, 300, 64
    q = torch.randn(B, H, L, D, device="cuda")
    k = torch.randn(B, H // (2 if gqa else 1), L, D, device="cuda")
    v = torch.randn(B, H // (2 if gqa else 1), L, D, device="cuda")
    mask = None
    if kind == "bool":
        mask = torch.rand(B, 1, L, L, device="cuda") > 0.3
        mask[..., 3, :] = False
    if kind == "additive":
        mask = torch.randn(1, H, 1, L, device="cuda")
    if kind is None:   # the efficient kernel takes these: the chunked math must not run
        def no_math(*args):
            raise AssertionError("chunked math path taken")
        monkeypatch.setattr(reference, "_chunk_probs", no_math)
    out, lse = reference.reference_forward(q, k, v, mask, causal, None, 0.0, gqa, 0)
    kk, vv = (t.repeat_interleave(2, 1) for t in (k, v)) if gqa else (k, v)
    ref, ref_lse = reference_with_lse(q, kk, vv, None if mask is None else mask.expand(
        B, H, L, L), causal, 1 / 8)
    assert rel_err(out, ref) < 1e-5
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite].double() - ref_lse[finite]).abs().max() < 1e-4
    if kind == "bool":
        assert out[..., 3, :].abs().max() == 0


@pytest.mark.gpu
def test_cuda_graph_capture_runs_the_verified_rung_and_never_syncs():
    """A site checked before capture replays its verified rung; a site first seen under capture
    plans without measuring (no sync) and runs at the inputs' precision."""
    q, k, v = (torch.randn(1, 4, 1024, 64, device="cuda") for _ in range(3))
    warm = f"precision-test-{next(_SITE)}"
    cold = f"precision-test-{next(_SITE)}"
    opts = Options.parse(min_seq_len=0, policy="fast", rank="dense")
    for site in (warm, cold):
        op.register_site(site, opts)

    def call(site):
        return torch.ops.adaattn.attention(q, k, v, None, 0.0, False, None, False, site,
                                           "fast", "auto")[0]
    call(warm)   # plans (fp16: ranges fit) and checks
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call(warm)   # (warm-up on the side stream, as torch.cuda.graph expects)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_warm = call(warm)
        out_cold = call(cold)
    graph.replay()
    torch.cuda.synchronize()
    ref, _ = reference_with_lse(q, k, v, None, False, 1 / 8)
    assert rel_err(out_warm, ref) < 3e-3     # fp16
    assert rel_err(out_cold, ref) < 1e-5     # fp32 (the reference path: no tf32)
    rt = adaattn_compile.stats()
    assert "fp16" in rt[warm]["precision"] and set(rt[cold]["precision"]) == {"fp32"}
