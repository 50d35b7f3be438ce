"""torch.compile modes: dynamic shapes, fullgraph, no_grad, autocast, graph breaks, training."""

import pytest
import torch
import torch._dynamo

import adaattn_compile
from adaattn_compile.compiler import record_graphs
from adaattn_compile.models import TinyGPT
from helpers import compile_and_run, rel_err


def model_and_input(seq=16, layers=2):
    torch.manual_seed(0)
    return TinyGPT(layers=layers).eval(), torch.randint(0, 256, (2, seq))


@pytest.mark.parametrize("inner", ["eager", "aot_eager", "inductor"])
def test_inner_compilers(inner):
    model, idx = model_and_input()
    with torch.no_grad():
        out, sites, _, _ = compile_and_run(model, idx, options={"inner": inner})
        assert len(sites) == 2 and all(s.causal for s in sites)
        assert rel_err(out, model(idx)) < 1e-5


def test_dynamic_true_serves_every_length_with_one_graph():
    model, _ = model_and_input()
    compiled = torch.compile(model, backend=adaattn_compile.backend(policy="exact"), dynamic=True)
    with record_graphs() as records, torch.no_grad():
        compiled_after = []
        for seq in (9, 17, 33):
            idx = torch.randint(0, 256, (2, seq))
            assert rel_err(compiled(idx), model(idx)) < 1e-5
            compiled_after.append(len(records))
    # Inductor may restart the first compile once (symbolic floats): stock torch.compile does
    # too. After the first length, no length compiles anything new.
    assert compiled_after[0] == compiled_after[-1]
    sites = records[-1].sites
    assert len(sites) == 2 and all(s.dynamic for s in sites)


def test_mark_dynamic_on_sequence_axis():
    model, idx = model_and_input(seq=20)
    torch._dynamo.mark_dynamic(idx, 1)
    compiled = torch.compile(model, backend=adaattn_compile.backend(policy="exact"))
    with record_graphs() as records, torch.no_grad():
        assert rel_err(compiled(idx), model(idx)) < 1e-5
        other = torch.randint(0, 256, (2, 31))
        assert rel_err(compiled(other), model(other)) < 1e-5
    assert len(records) == 1 and len(records[0].sites) == 2


def test_fullgraph():
    model, idx = model_and_input()
    with torch.no_grad():
        out, sites, _, records = compile_and_run(model, idx, fullgraph=True)
    assert len(records) == 1 and len(sites) == 2
    assert rel_err(out, model(idx)) < 1e-5


def test_autocast_bf16():
    model, idx = model_and_input()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(idx)
        out, sites, _, _ = compile_and_run(model, idx)
    assert len(sites) == 2 and all(s.dtype == "bfloat16" for s in sites)
    assert out.dtype == ref.dtype
    # bf16 has 8 bits of mantissa; our op computes the softmax in fp32, eager partly in bf16.
    assert rel_err(out.float(), ref.float()) < 2e-2


def test_graph_breaks_inside_the_model():
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = TinyGPT(layers=1).blocks[0], TinyGPT(layers=1).blocks[0]

        def forward(self, x):
            x = self.a(x)
            torch._dynamo.graph_break()
            return self.b(x)
    model = Broken().eval()
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        out, sites, _, records = compile_and_run(model, x)
    assert len(records) == 2 and len(sites) == 2
    assert {s.graph for s in sites} == {r.name for r in records}
    assert rel_err(out, model(x)) < 1e-5


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_training_gradients_match_eager(inner):
    model, idx = model_and_input()
    model.train()
    logits = model(idx)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())
    ref = torch.autograd.grad(loss, list(model.parameters()))
    out, sites, _, _ = compile_and_run(model, idx, options={"inner": inner})
    loss_c = torch.nn.functional.cross_entropy(out.flatten(0, 1), idx.flatten())
    got = torch.autograd.grad(loss_c, list(model.parameters()))
    assert len(sites) == 2
    assert abs(loss_c.item() - loss.item()) < 1e-5
    for g, r in zip(got, ref):
        assert rel_err(g, r) < 1e-4


MODES = ["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["string", "callable"])
def test_torch_compile_mode_reaches_inductor(monkeypatch, mode, backend):
    """torch.compile passes ``mode`` to any backend; ours hands Inductor the config stock
    torch.compile would (Inductor itself stubbed here: the real compiles are below)."""
    from torch._inductor import compile_fx, list_mode_options
    seen = []

    def recording_compile_fx(gm, example_inputs, **kwargs):
        patches = dict(kwargs.get("config_patches") or {})
        patches.pop("post_grad_custom_post_pass")   # (a cache-key tag: test_inductor_memory.py)
        seen.append((patches, getattr(kwargs.get("inner_compile"), "__name__", None)))
        return gm.forward
    monkeypatch.setattr(compile_fx, "compile_fx", recording_compile_fx)
    model, idx = model_and_input()
    chosen = "adaattn" if backend == "string" else adaattn_compile.backend(policy="exact")
    with torch.no_grad():
        out = torch.compile(model, backend=chosen, mode=mode)(idx)
    # (and its inner compile keeps Inductor's pooled buffer reuse to short holds:
    # tests/test_inductor_memory.py)
    assert seen == [(list_mode_options(mode), "compile_with_short_holds")]
    assert rel_err(out, model(idx)) < 1e-5


def test_reduce_overhead_compiles_and_runs_on_cpu():
    model, idx = model_and_input()
    compiled = torch.compile(model, backend="adaattn", mode="reduce-overhead")
    with record_graphs() as records, torch.no_grad():
        for seed in range(3):
            idx = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))
            assert rel_err(compiled(idx), model(idx)) < 1e-5
    assert sum(len(r.sites) for r in records) == 2


def test_a_bad_mode_is_named():
    model, idx = model_and_input()
    with pytest.raises(Exception, match="argument 'mode'"):
        torch.compile(model, backend="adaattn", mode="fastest")(idx)


def test_the_op_is_left_out_of_cuda_graphs():
    if not hasattr(torch.Tag, "cudagraph_unsafe"):
        pytest.skip("a torch without the cudagraph_unsafe tag")
    for op in (torch.ops.adaattn.attention.default, torch.ops.adaattn.attention_backward.default):
        assert torch.Tag.cudagraph_unsafe in op.tags


@pytest.mark.gpu
def test_reduce_overhead_captures_the_graph_around_the_op(monkeypatch):
    """mode="reduce-overhead" on the GPU: Inductor's CUDA graphs replay what lies between the
    op's calls, and the op itself runs every call (its Python, its checks), with fresh inputs
    giving fresh results."""
    replays = []
    real_replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay",
                        lambda self: replays.append(1) or real_replay(self))
    torch.manual_seed(0)
    model = TinyGPT(layers=2).cuda().eval()
    compiled = torch.compile(model, mode="reduce-overhead",
                             backend=adaattn_compile.backend(policy="exact", small_call_gflops=0))
    adaattn_compile.reset_stats()
    with torch.no_grad():
        for seed in range(6):
            idx = torch.randint(0, 256, (2, 64), device="cuda",
                                generator=torch.Generator(device="cuda").manual_seed(seed))
            assert rel_err(compiled(idx), model(idx)) < 1e-4
    assert replays, "no CUDA graph was replayed"
    assert sum(entry["calls"] for entry in adaattn_compile.stats().values()) == 6 * 2
