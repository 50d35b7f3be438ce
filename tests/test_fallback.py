"""Never break a model: failures in our pass or our kernels fall back, warn once, and say so."""
import warnings

import pytest
import torch

import adaattn_compile
import adaattn_compile.compiler as compiler
from adaattn_compile.models import TinyGPT
from helpers import rel_err


def test_rewrite_failure_compiles_the_graph_unchanged(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected rewrite failure")
    monkeypatch.setattr(compiler, "rewrite_site", broken)
    torch.manual_seed(0)
    model, idx = TinyGPT().eval(), torch.randint(0, 256, (2, 16))
    with pytest.warns(RuntimeWarning, match="rewriting graph\\d+ failed .*injected rewrite failure"):
        report = adaattn_compile.explain(model, idx, options={"inner": "inductor"})
    assert report.sites == []
    assert len(report.failures) == 1 and "injected rewrite failure" in report.failures[0][1]
    assert "rewrite failed, compiled unchanged" in str(report)
    assert "adaattn.attention" not in report.graphs[0].code_after
    compiled = torch.compile(model, backend="adaattn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            assert rel_err(compiled(idx), model(idx)) < 1e-5


def test_failure_compiling_the_rewritten_graph_compiles_it_unchanged(monkeypatch):
    """A rewritten graph the inner compiler rejects (as Inductor rejected torch's SDPA with a
    mask and is_causal=True for T5's decoder) is compiled as it came, with a warning."""
    real = compiler.inner_compile

    def picky(gm, example_inputs, inner, mode=None):
        if "adaattn" in gm.code:
            raise RuntimeError("injected inner compile failure")
        return real(gm, example_inputs, inner, mode)
    monkeypatch.setattr(compiler, "inner_compile", picky)
    torch.manual_seed(0)
    model, idx = TinyGPT().eval(), torch.randint(0, 256, (2, 16))
    with pytest.warns(RuntimeWarning, match="compiling the rewritten graph failed.*injected"):
        report = adaattn_compile.explain(model, idx, options={"inner": "eager"})
    assert report.sites == [] and len(report.failures) == 1
    assert "adaattn.attention" not in report.graphs[0].code_after
    compiled = torch.compile(model, backend=adaattn_compile.backend(inner="eager"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            assert rel_err(compiled(idx), model(idx)) < 1e-5


def test_matcher_failure_is_contained(monkeypatch):
    def broken(gm):
        raise KeyError("injected matcher failure")
    monkeypatch.setattr(compiler, "find_attention", broken)
    f = torch.compile(lambda q: torch.softmax(q @ q.mT, -1) @ q,
                      backend=adaattn_compile.backend(inner="eager"))
    q = torch.randn(2, 5, 4)
    with pytest.warns(RuntimeWarning, match="injected matcher failure"):
        assert rel_err(f(q), torch.softmax(q @ q.mT, -1) @ q) < 1e-6


def _out_of_resources():
    from triton.runtime.errors import OutOfResources
    return OutOfResources(232448, 227328, "shared memory")   # (its message: "out of resource")


def _compile_error():
    import ast

    from triton.compiler.errors import CompilationError
    return CompilationError("x = tl.load(p)", ast.parse("x").body[0], "injected: out of resources")


@pytest.mark.parametrize("make_error", [
    lambda: RuntimeError("injected: out of resources: shared memory"), _out_of_resources,
    _compile_error], ids=["runtime_error", "triton_out_of_resources", "triton_compile_error"])
def test_kernel_failure_falls_back_to_reference_and_warns_once(monkeypatch, make_error):
    """A kernel that fails to build (a Triton compile error) or to launch (out of shared
    memory) at the first call: the site takes the reference path, warns once, and the stats
    the report prints hold the reason."""
    from adaattn_compile.kernels import flash

    def broken(*args, **kwargs):
        raise make_error()
    monkeypatch.setattr(flash, "flash_forward", broken)
    monkeypatch.setattr(flash, "flash_backward", broken)
    adaattn_compile.reset_stats()
    device = "cuda" if torch.cuda.is_available() else "cpu"   # CPU: under TRITON_INTERPRET
    q, k, v = (torch.randn(1, 2, 6, 8, device=device, requires_grad=True) for _ in range(3))
    f = torch.compile(lambda q, k, v: torch.softmax(q @ k.mT * 0.3, -1) @ v,
                      backend=adaattn_compile.backend(kernel="triton", inner="aot_eager",
                                                      policy="exact"))
    with pytest.warns(RuntimeWarning, match=r"(?s)Triton forward failed.*using the reference path"):
        out = f(q, k, v)
    ref = torch.softmax(q @ k.mT * 0.3, -1) @ v
    assert rel_err(out, ref) < 1e-6
    with pytest.warns(RuntimeWarning, match="Triton backward failed"):
        out.sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the second call warns no more
        f(q, k, v)
    (entry,) = [e for site, e in adaattn_compile.stats().items() if site != "direct"]
    assert entry["kernel"] == {"reference": 2}
    assert any("out of resource" in reason for reason in entry["fallbacks"])
