"""Small CUDA sites stay torch's SDPA (planner.small_call): the rewrite swaps its op call for
``F.scaled_dot_product_attention`` on the same operands. Checked here with the planner told it
plans for an sm90 GPU; the graph itself runs on the CPU (torch's SDPA runs anywhere)."""
import pytest
import torch

import adaattn_compile
from adaattn_compile import op, planner
from adaattn_compile.compiler import reset_ids
from adaattn_compile.options import Options, OptionError
from helpers import compile_and_run, reference_attention, rel_err

L = 64


@pytest.fixture
def planned_for_gpu(monkeypatch):
    # (tf32 allowed: fp32 without it plans the reference path, see test_planner)
    monkeypatch.setattr(op, "device_info",
                        lambda device: planner.DeviceInfo("cuda", (9, 0), allow_tf32=True))
    monkeypatch.setattr(op, "_flash_unsupported", lambda *args: None)


def plain(q, k, v):
    return torch.softmax(q @ k.mT / 8, -1) @ v


def causal(q, k, v):
    s = (q @ k.mT) * 0.125
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def biased(q, k, v, bias):
    return torch.softmax(q @ k.mT / 8 + bias, -1) @ v


def causal_biased(q, k, v, bias):
    """T5's decoder: a causal mask and a position bias; torch's SDPA takes no explicit mask
    with is_causal=True, so the site keeps our op (this compile raised in the backend)."""
    s = q @ k.mT / 8 + bias
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def sdpa_gqa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def _inputs(fn):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, L, 64, generator=g)
    kv_heads = 2 if fn is sdpa_gqa else 4
    k, v = (torch.randn(2, kv_heads, L, 64, generator=g) for _ in range(2))
    extra = ((torch.randn(2, 1, 1, L, generator=g),) if fn is biased else
             (torch.randn(1, 4, L, L, generator=g),) if fn is causal_biased else ())
    return (q, k, v, *extra)


@pytest.mark.parametrize("fn", [plain, causal, biased, sdpa_gqa], ids=lambda f: f.__name__)
def test_small_sites_become_torch_sdpa(fn, planned_for_gpu):
    args = _inputs(fn)
    out, sites, _, records = compile_and_run(fn, *args)
    assert [s.decision.kernel for s in sites] == ["sdpa"]
    assert sites[0].decision.reason.startswith("0.0")   # (4 B H L L D: 8.4 MFLOP)
    code = records[0].code_after
    assert "scaled_dot_product_attention" in code and "adaattn.attention" not in code
    assert rel_err(out, fn(*args)) < 1e-5


def test_small_causal_site_with_a_bias_keeps_our_op(planned_for_gpu):
    args = _inputs(causal_biased)
    out, sites, _, records = compile_and_run(causal_biased, *args)
    assert sites[0].causal and sites[0].decision.kernel == "triton"   # (planned for sm90)
    assert "adaattn.attention" in records[0].code_after
    assert rel_err(out, causal_biased(*args)) < 1e-5


def test_small_call_gflops_zero_keeps_every_site(planned_for_gpu):
    args = _inputs(causal)
    out, sites, _, records = compile_and_run(causal, *args, options={"small_call_gflops": 0,
                                                                     "kernel": "reference"})
    assert sites[0].decision.kernel == "reference"
    assert "adaattn.attention" in records[0].code_after
    q, k, v = args
    assert rel_err(out, reference_attention(q, k, v, causal=True, scale=0.125)) < 1e-5


def test_large_calls_and_other_devices_keep_our_op():
    info = planner.DeviceInfo("cuda", (9, 0))
    problem = planner.Problem(dtype="bfloat16", q_len=4096, k_len=4096, head_dim=64,
                              v_head_dim=64, mask=None, causal=True, dropout_p=0.0)
    options = Options.parse()
    assert planner.small_call(info, problem, options, 1.9, True) is not None
    assert planner.small_call(info, problem, options, 2.1, True) is None        # large enough
    assert planner.small_call(info, problem, options, 1.0, False) is None       # mask / dropout
    assert planner.small_call(planner.DeviceInfo("cuda", (7, 5)), problem, options, 1.0,
                              True) is None                                     # no Triton kernel
    assert planner.small_call(info, problem, Options.parse(kernel="triton"), 1.0, True) is None


@pytest.mark.parametrize("bad", [-1, "2", True, float("nan")])
def test_bad_small_call_gflops(bad):
    with pytest.raises(OptionError, match="small_call_gflops"):
        Options.parse(small_call_gflops=bad)


def test_report_shows_the_sdpa_decision(planned_for_gpu):
    assert_expected_inline = pytest.importorskip("expecttest").assert_expected_inline
    reset_ids()
    report = adaattn_compile.explain(causal, *_inputs(causal), options={"policy": "exact"})
    lines = [line for line in report.format_sites().splitlines()
             if line.startswith(("  decision", "  guards"))]
    assert_expected_inline("\n".join(lines), """\
  decision  kernel=sdpa precision=tf32 rank=dense (0.0042 GFLOP a call < small_call_gflops=2: torch's SDPA, our op's host cost would exceed what its kernel saves)
  guards    device=cuda sm90 dtype=float32 seq_bucket=64 policy=exact capability>=sm80 rank dense: policy exact, tolerance 0""")


@pytest.mark.parametrize("fill", [float("-inf"), torch.finfo(torch.float32).min],
                         ids=["fill_-inf", "fill_min"])
def test_small_sites_keep_eagers_fully_masked_rows(fill, planned_for_gpu):
    """A small site swapped for torch's SDPA still gives eager's value in a row whose every key
    is masked (NaN, or the mean of v): the rows are read from the mask, as SDPA has no lse."""
    q, k, v = _inputs(plain)
    keep = torch.ones(2, 1, L, L, dtype=torch.bool)
    keep[0, :, 5] = False
    keep[1, :, :, :7] = False

    def fn(q, k, v, keep):
        return torch.softmax((q @ k.mT / 8).masked_fill(~keep, fill), -1) @ v
    out, sites, _, records = compile_and_run(fn, q, k, v, keep)
    assert [s.decision.kernel for s in sites] == ["sdpa"]
    assert "adaattn.attention" not in records[0].code_after
    ref = fn(q, k, v, keep)
    assert ref[0, :, 5].isnan().all() == (fill != torch.finfo(torch.float32).min)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, equal_nan=True)
