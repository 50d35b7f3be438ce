"""benchmarks/kernels.py's timing plan, on CPU with fake providers: every provider is set up
once, then timed in rounds of alternating order, the median kept; a provider that cannot run a
case is recorded and the others go on."""
import importlib.util
import sys
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"


def _load():
    spec = importlib.util.spec_from_file_location("kernels_bench", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels_bench"] = module
    spec.loader.exec_module(module)
    return module


class _FakeCase:
    def __init__(self, L, D, causal, variant, dtype):
        self.L, self.D, self.causal, self.variant = L, D, causal, variant
        self.B, self.H, self.Hkv, self.bias = 1, 2, 2, None


def test_rounds_alternate_the_providers_and_keep_the_median(monkeypatch):
    kb = _load()
    timed, setups = [], []
    # per provider, the fwd times its successive timings return (ms)
    readings = {"a": iter([1.0, 3.0, 2.0]), "b": iter([4.0, 4.0, 6.0])}

    def provider(name):
        def make(c):
            setups.append(name)

            def fwd():
                return name
            return fwd, fwd, fwd, fwd
        return make

    def broken(c):
        raise RuntimeError("cannot take this case")

    def bench(fn, rep):
        timed.append(fn())
        return next(readings[fn()])

    monkeypatch.setattr(kb, "PROVIDERS", {"a": provider("a"), "b": provider("b"), "x": broken})
    monkeypatch.setattr(kb, "Case", _FakeCase)
    monkeypatch.setattr(kb, "_bench", bench)
    monkeypatch.setattr(kb, "_chosen_configs", lambda: {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake", raising=False)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    rows = kb.main(["--lengths", "64", "--dims", "16", "--causal", "no", "--variants", "plain",
                    "--providers", "a,x,b", "--no-bwd", "--rounds", "3"])
    assert setups == ["a", "b"]                       # each set up once, before any timing
    assert timed == ["a", "b", "b", "a", "a", "b"]    # rounds in alternating order
    (row,) = rows
    assert row["a_fwd_ms"] == 2.0 and row["b_fwd_ms"] == 4.0   # the median of the rounds
    assert "cannot take this case" in row["x_error"] and "x_fwd_ms" not in row


class _CpuCase:
    """A small case on the CPU (our kernels under the interpreter), as kernels.Case lays it
    out: (B, H, L, D) q, GQA's K / V with fewer heads, a (B, 1, 1, L) bias."""

    def __init__(self, variant, causal=False, H=4, L=24, D=16):
        g = torch.Generator().manual_seed(0)
        self.variant, self.causal, self.B, self.H = variant, causal, 1, H
        self.Hkv = H // 4 if variant == "gqa" else H
        self.q = torch.randn(1, H, L, D, generator=g)
        self.k, self.v = (torch.randn(1, self.Hkv, L, D, generator=g) for _ in range(2))
        self.do = torch.randn(1, H, L, D, generator=g)
        self.bias = torch.randn(1, 1, 1, L, generator=g) if variant == "bias" else None


def test_ours_plain_is_the_variant_without_its_mask_or_its_shared_heads():
    """``ours_plain`` runs our kernels on the case without its bias, or with GQA's K / V
    repeated to every query head (the same attention), and nothing for the plain variant."""
    kb = _load()
    assert kb.ours_plain(_CpuCase("plain")) is None
    gqa = _CpuCase("gqa", causal=True)
    _, _, out_gqa, grads_gqa = kb.ours(gqa)
    _, _, out_mha, _ = kb.ours_plain(gqa)
    torch.testing.assert_close(out_mha(), out_gqa(), rtol=1e-5, atol=1e-5)
    assert grads_gqa()[1].shape == gqa.k.shape   # (the variant itself keeps its K / V heads)
    bias = _CpuCase("bias")
    _, _, out_plain, _ = kb.ours_plain(bias)
    bias.bias = None
    torch.testing.assert_close(out_plain(), kb.ours(bias)[2](), rtol=0, atol=0)


def test_masked_over_unmasked_ratio_from_the_same_rounds(monkeypatch):
    kb = _load()
    readings = {"ours": iter([2.0, 2.0]), "ours_plain": iter([1.5, 1.5])}

    def provider(name):
        def make(c):
            if name == "ours_plain" and c.variant == "plain":
                return None

            def fwd():
                return name

            def out():   # (the harness checks "ours" against SDPA before timing it)
                return torch.nn.functional.scaled_dot_product_attention(
                    c.q, c.k, c.v, attn_mask=c.bias)
            return fwd, fwd, out, out
        return make

    monkeypatch.setattr(kb, "PROVIDERS", {p: provider(p) for p in readings})
    monkeypatch.setattr(kb, "Case", lambda L, D, causal, variant, dtype: _CpuCase(variant))
    monkeypatch.setattr(kb, "_bench", lambda fn, rep: next(readings[fn()]))
    monkeypatch.setattr(kb, "_chosen_configs", lambda: {})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake", raising=False)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    plain_row, bias_row = kb.main(["--lengths", "64", "--dims", "16", "--causal", "no",
                                   "--variants", "plain,bias", "--providers",
                                   "ours,ours_plain", "--no-bwd", "--rounds", "1"])
    assert "ours_plain_fwd_ms" not in plain_row and "ours_vs_plain_fwd" not in plain_row
    assert bias_row["ours_vs_plain_fwd"] == 1.5 / 2.0
