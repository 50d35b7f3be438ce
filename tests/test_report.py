"""The printed report (expecttest), the report's attributes, and the CLI."""
import subprocess
import sys
from pathlib import Path

import pytest

assert_expected_inline = pytest.importorskip("expecttest").assert_expected_inline

import adaattn_compile
from adaattn_compile.compiler import reset_ids
from report_models import factory

TESTS = Path(__file__).parent


def make_report():
    import os
    os.chdir(TESTS.parent)     # locations print relative to the working directory
    reset_ids()
    adaattn_compile.reset_stats()
    model, args = factory()
    return adaattn_compile.explain(model, *args, options={"policy": "exact"})


def test_report_attributes():
    report = make_report()
    assert len(report.sites) == 2
    hand, sdpa = report.sites
    assert hand.pattern.startswith("matmul") and "masked_fill" in hand.pattern
    assert hand.location == "tests/report_models.py:17"
    assert (hand.q_shape, hand.k_shape, hand.v_shape) == ((1, 2, 8, 4),) * 3
    assert hand.causal and hand.mask is None and abs(hand.scale - 0.5) < 1e-12
    assert hand.dropout_p == 0.0 and hand.gqa_groups == 1
    assert hand.decision.kernel == "reference" and hand.decision.rank == "dense"
    assert hand.decision.measured_error is None
    assert any(g.startswith("device=cpu") for g in hand.decision.guards)
    assert sdpa.mask == "bool" and not sdpa.causal and sdpa.scale is None
    assert len(report.skipped) == 1 and "non-key axis" in report.skipped[0].reason
    assert adaattn_compile.stats()[hand.id]["calls"] == 1
    assert "torch.ops.adaattn.attention" in report.graphs[0].code_after
    assert "softmax(float_1" in report.graphs[0].code_before


def test_report_printed_form():
    report = make_report()
    assert_expected_inline(report.format_sites(runtime=True), """\
[s0] graph0  tests/report_models.py:17
  pattern   matmul → div-scale → masked_fill → softmax(fp32) → matmul
  shapes    q (1, 2, 8, 4)  k (1, 2, 8, 4)  v (1, 2, 8, 4)  float32
  attention causal=True mask=None scale=0.5 dropout_p=0 gqa_groups=1
  notes     constant mask proven causal
  decision  kernel=reference precision=fp32 rank=dense (no Triton kernel on cpu)
  guards    device=cpu dtype=float32 seq_bucket=8 policy=exact rank dense: policy exact, tolerance 0
  runtime   calls=1 backward=0 kernel=reference:1 precision=fp32:1 rank=dense:2 demotions=0 error=exact
[s1] graph0  tests/report_models.py:18
  pattern   F.scaled_dot_product_attention
  shapes    q (1, 2, 8, 4)  k (1, 2, 8, 4)  v (1, 2, 8, 4)  float32
  attention causal=False mask=bool scale=1/sqrt(D) dropout_p=0 gqa_groups=1
  decision  kernel=reference precision=fp32 rank=dense (no Triton kernel on cpu)
  guards    device=cpu dtype=float32 seq_bucket=8 policy=exact rank dense: policy exact, tolerance 0
  runtime   calls=1 backward=0 kernel=reference:1 precision=fp32:1 rank=dense:2 demotions=0 error=exact""")
    assert_expected_inline(report.format_skipped(), """\
graph0  tests/report_models.py:19  softmax: softmax over a non-key axis (dim -2 of a 4-D score tensor)""")
    # The body of the rewritten graph (placeholder order is Dynamo's business, so not compared).
    body = [line.strip() for line in report.graphs[0].code_after.strip().splitlines()
            if "= L_" not in line and "def forward" not in line]
    assert_expected_inline("\n".join(body), """\
attention_default = torch.ops.adaattn.attention.default(l_q_, l_k_, l_v_, None, 0.0, True, 0.5, False, 's0', 'exact', 'auto');  l_v_ = None
getitem = attention_default[0];  attention_default = None
attention_default_1 = torch.ops.adaattn.attention.default(l_q_, l_k_, getitem, l_pad_, 0.0, False, None, False, 's1', 'exact', 'auto');  l_k_ = getitem = l_pad_ = None
getitem_1 = attention_default_1[0];  attention_default_1 = None
gate = torch.softmax(l_q_, dim = -2);  l_q_ = None
mul = getitem_1 * gate;  getitem_1 = gate = None
return (mul,)""")


def test_report_str_has_every_section():
    text = str(make_report())
    for part in ("2 attention site(s) rewritten", "Sites", "Skipped", "--- graph0 before ---",
                 "--- graph0 after ---", "pass time"):
        assert part in text


def test_cli_explain():
    result = subprocess.run(
        [sys.executable, "-m", "adaattn_compile.cli", "explain", "report_models:factory",
         "--policy", "exact", "--no-graphs"],
        cwd=TESTS, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "2 attention site(s) rewritten" in result.stdout
    assert "causal=True" in result.stdout and "non-key axis" in result.stdout
    assert "--- graph0 before ---" not in result.stdout


def test_cli_explain_builtin_example():
    result = subprocess.run(
        [sys.executable, "-m", "adaattn_compile.cli", "explain", "adaattn_compile.models:example"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "2 attention site(s) rewritten" in result.stdout
    assert "--- graph0 after ---" in result.stdout


def test_cli_explain_bad_factory():
    result = subprocess.run([sys.executable, "-m", "adaattn_compile.cli", "explain", "nocolon"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "pkg.module:factory" in result.stderr
