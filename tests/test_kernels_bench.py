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
