"""Inductor's generated code calls the op's Python entry points, not the operator
(``inductor_call.py``): which name a graph's code calls (inference graphs that read ``out``
alone, training graphs, the switch off), results against float64, and every condition under
which an entry point still goes through the dispatcher."""
import math

import pytest
import torch
import torch.nn.functional as F

import adaattn_compile
from adaattn_compile import inductor_call, op
from helpers import RecordingMode, reference_attention, rel_err

OPERATOR = "torch.ops.adaattn.attention.default("
OUT_ONLY = "_adaattn_attention_out_only("
FULL = "_adaattn_attention("


def _model(q, k, v, mask):
    first = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(first.sin(), k, v, is_causal=True)


def _reference(q, k, v, mask):
    q, k, v, mask = (t.double() for t in (q, k, v, mask))
    return reference_attention(reference_attention(q, k, v, mask).sin(), k, v, causal=True)


def _inputs(seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, 21, 16, generator=g, requires_grad=requires_grad)
               for _ in range(3))
    mask = torch.randn(2, 1, 21, 21, generator=g)
    return q, k, v, mask


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("switch", ["1", "0"])
def test_the_graphs_code_calls_our_entry_point(tmp_path, monkeypatch, training, switch):
    from torch._inductor.utils import run_and_get_code
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))   # (code made for this case)
    monkeypatch.setenv("ADAATTN_DIRECT_CALL", switch)
    compiled = torch.compile(_model, backend=adaattn_compile.backend(policy="exact",
                                                                     inner="inductor"))
    q, k, v, mask = _inputs(0, requires_grad=training)

    def step():
        out = compiled(q, k, v, mask)
        if training:
            out.square().sum().backward()
        return out
    with torch.set_grad_enabled(training):
        out, codes = run_and_get_code(step)
    code = "\n".join(codes)
    expected = OPERATOR if switch == "0" else FULL if training else OUT_ONLY
    assert code.count(expected) == 2, code
    assert sum(code.count(name) for name in (OPERATOR, OUT_ONLY, FULL)) == 2
    qd, kd, vd, maskd = (t.detach().double().requires_grad_() for t in (q, k, v, mask))
    ref = _reference(qd, kd, vd, maskd)
    assert rel_err(out.detach(), ref.detach()) < 1e-5
    if training:
        ref.square().sum().backward()
        for got, want in ((q, qd), (k, kd), (v, vd)):
            assert rel_err(got.grad, want.grad) < 1e-5
    with torch.set_grad_enabled(training):   # fresh inputs: nothing kept from the first call
        out = compiled(*_inputs(1, requires_grad=training))
    assert rel_err(out.detach(), _reference(*(t.detach() for t in _inputs(1)))) < 1e-5


def test_the_lowering_is_installed_once_and_keeps_inductors_fallback():
    from torch._inductor import lowering
    assert inductor_call.install() and inductor_call.install()
    lower = lowering.lowerings[torch.ops.adaattn.attention.default]
    assert lower._adaattn_direct and lower._is_fallback_handler



class _Sub(torch.Tensor):
    pass


@pytest.mark.parametrize("entry", ["inductor_attention", "inductor_attention_out_only"])
@pytest.mark.parametrize("why", [None, "dispatch mode", "profiler", "grad", "subclass",
                                 "switched off"])
def test_the_entry_points_go_through_the_dispatcher_where_it_could_do_more(monkeypatch, entry,
                                                                           why):
    through = []

    class Counting:   # the operator, its calls counted
        def __call__(self, *args):
            through.append(1)
            return torch.ops.adaattn.attention.default(*args)

        def __getattr__(self, name):
            return getattr(torch.ops.adaattn.attention.default, name)
    monkeypatch.setattr(op, "_attention", Counting())
    q, k, v, mask = _inputs(2, requires_grad=why == "grad")
    if why == "subclass":
        q = q.as_subclass(_Sub)
    if why == "switched off":
        monkeypatch.setattr(op, "_DIRECT_CALL", False)
    mode = RecordingMode() if why == "dispatch mode" else None
    profiler = torch.profiler.profile() if why == "profiler" else None
    with (mode or profiler or torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)):
        out, lse, seed = getattr(op, entry)(q, k, v, mask, 0.0, False, None, False, "t-direct",
                                            "exact", "auto", False)
    assert through == ([] if why is None else [1])
    ref = reference_attention(*(t.detach().double() for t in (q, k, v, mask)))
    assert rel_err(out.detach(), ref) < 1e-5
    assert lse.shape == (2, 3, 21) and seed.shape == (1,)
    if why == "dispatch mode":
        assert torch.ops.adaattn.attention.default in mode.ops
    if why == "profiler":
        assert any(e.name == "adaattn::attention" for e in profiler.events())
    if why == "grad":
        assert out.requires_grad


def test_reads_out_only_looks_at_every_user():
    import operator
    graph = torch.fx.Graph()
    call = graph.call_function(torch.ops.adaattn.attention.default, ())
    assert not inductor_call._reads_out_only(call)   # (no users: nothing to tell)
    graph.call_function(operator.getitem, (call, 0))
    assert inductor_call._reads_out_only(call)
    lse = graph.call_function(operator.getitem, (call, 1))
    assert not inductor_call._reads_out_only(call)
    graph.erase_node(lse)
    graph.output((call,))   # the whole tuple read
    assert not inductor_call._reads_out_only(call)
