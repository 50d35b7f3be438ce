"""Inductor's pooled buffer reuse in our compiles: short holds only (inductor_memory.py)."""
import importlib.util
import pathlib
import re
import types

import pytest
import torch
import torch._dynamo
from torch._inductor.codegen import wrapper
from torch._inductor.utils import run_and_get_code

from adaattn_compile import inductor_memory
from adaattn_compile.bench import build_model
from helpers import rel_err

MODES = ["short", "off", "on"]


def _compile(model, args, kwargs, monkeypatch, reuse):
    """-> (the compiled model's output, the code Inductor generated for it)."""
    monkeypatch.setenv("ADAATTN_BUFFER_REUSE", reuse)
    torch._dynamo.reset()
    with torch.no_grad():
        out, codes = run_and_get_code(torch.compile(model, backend="adaattn"), *args, **kwargs)
    return out, "\n".join(codes)


class TwoLayerMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.ModuleList(torch.nn.Linear(16, 64) for _ in range(2))
        self.down = torch.nn.ModuleList(torch.nn.Linear(64, 16) for _ in range(2))

    def forward(self, x):
        for up, down in zip(self.up, self.down):
            x = x + down(torch.relu(up(x)).sin())
        return x


def test_a_hold_across_one_step_is_kept_unless_switched_off(monkeypatch):
    """The first layer's (8, 64) activation dies at the step before the residual add; the
    second layer's, allocated the step after it, takes its storage (a hold across one step)
    but with ADAATTN_BUFFER_REUSE=0, which frees it instead. A buffer written in place of a
    dying input is reused in every mode."""
    model, x = TwoLayerMLP(), torch.randn(8, 16)
    codes = {}
    for reuse in MODES:
        out, codes[reuse] = _compile(model, (x,), {}, monkeypatch, reuse)
        assert rel_err(out, model(x)) < 1e-5
    allocations = {k: len(re.findall(r"= empty_strided_cpu\(\(8, 64\)", c))
                   for k, c in codes.items()}
    assert allocations == {"short": 1, "off": 2, "on": 1}, codes
    assert re.search(r"^\s*del buf\d+$", codes["off"], re.M)
    for code in codes.values():
        assert re.findall(r"^\s*(buf\d+) = (buf\d+); del \2  # reuse", code, re.M)


def _buffer_plan_script():
    """scripts/buffer_plan.py, the measurement in RESULTS.md, as a module."""
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "buffer_plan.py"
    spec = importlib.util.spec_from_file_location("buffer_plan", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_holds_keep_the_peak_of_no_reuse_with_fewer_allocations(monkeypatch):
    """A Llama-style model (hand-written GQA attention, SwiGLU MLP; registry's tiny scale): with
    short holds the graph's buffers peak no higher than with no pooled reuse at all, and it
    allocates fewer of them a call (the short holds Inductor chose are kept), more than with
    Inductor's own reuse (its long holds dropped: on the H100 at L = 512 one held a layer's
    MLP buffers through the next layer's attention, above stock's peak: inductor_memory.py)."""
    planned_buffers = _buffer_plan_script().planned_buffers
    built = build_model("llama-eager", 64, 1, scale="tiny")
    args, kwargs = built.make_inputs()
    model = built.model.eval()
    monkeypatch.setenv("ADAATTN_BUFFER_REUSE", "short")   # (restored after the test)
    plans = {reuse: planned_buffers(model, args, kwargs, "adaattn", reuse) for reuse in MODES}
    short, off, on = plans["short"], plans["off"], plans["on"]
    assert short["peak_mib"] <= off["peak_mib"], plans
    assert on["allocations"] < short["allocations"] < off["allocations"], plans


def _line(step, peak_estimate=None, held_peak=0):
    """A stand-in for Inductor's AllocateLine / FreeIfNotReusedLine: what its reuse check reads."""
    estimate = types.SimpleNamespace(overall_peak_memory=peak_estimate,
                                     peak_between=lambda free_line, line: held_peak)
    return types.SimpleNamespace(scheduler_node_index=step, comm_buffer=False,
                                 wrapper=types.SimpleNamespace(estimate_peak=estimate))


@pytest.mark.parametrize("held_steps, size, inductors, expect", [
    (1, 4096, True, True),        # the step just before: nothing held
    (2, 4096, True, True),        # held across one step
    (3, 4096, True, False),       # across two: dropped ...
    (17, 1 << 20, True, False),
    (17, 1024, True, True),       # ... unless under 1/1024 of the peak estimate (2 MiB here)
    (17, 2048, True, True),
    (17, 2049, True, False),
    (2, 4096, False, False),      # Inductor's own check first
])
def test_reuse_check_keeps_short_holds_inside_our_compiles(held_steps, size, inductors, expect):
    assert inductor_memory.install()
    peak = 2 << 20
    line = _line(20 + held_steps, peak_estimate=peak,
                 held_peak=peak - size + (0 if inductors else 1))
    free_line = _line(20)
    check = wrapper.AllocateLine.should_reuse_buffer
    assert check(line, free_line, size) == inductors   # (outside our compiles: Inductor's)
    allowed = inductor_memory.short_holds(lambda: check(line, free_line, size))()
    assert allowed == expect


@pytest.mark.parametrize("value, expect", [(None, "short"), ("short", "short"), ("0", "off"),
                                           ("off", "off"), ("1", "on"), ("ON", "on"),
                                           ("sometimes", "short")])
def test_switch_values(monkeypatch, value, expect):
    """The switch's values; an unknown one is the default, with a warning naming it (the log
    is read through a stand-in: the suite runs with pytest's logging plugin off)."""
    if value is None:
        monkeypatch.delenv("ADAATTN_BUFFER_REUSE", raising=False)
    else:
        monkeypatch.setenv("ADAATTN_BUFFER_REUSE", value)
    warned = []
    monkeypatch.setattr(inductor_memory.log, "warning", lambda msg, *a: warned.append(msg % a))
    assert inductor_memory.mode() == expect
    assert [w for w in warned if "ADAATTN_BUFFER_REUSE='sometimes'" in w] == (
        warned if value == "sometimes" else [])
    assert bool(warned) == (value == "sometimes")
    patches, wrap = inductor_memory.compile_settings()
    if expect == "short":   # (the plan's tag in Inductor's cache keys)
        assert list(patches) == ["post_grad_custom_post_pass"]
        assert patches["post_grad_custom_post_pass"].uuid().startswith("adaattn-buffer-reuse")
    else:
        assert patches == ({"allow_buffer_reuse": False} if expect == "off" else {})
    assert (wrap is inductor_memory.short_holds) == (expect == "short")


def test_a_users_keyed_post_grad_pass_runs_under_a_key_with_ours(monkeypatch):
    """A user's own post-grad pass (a CustomGraphPass) still runs, and the key Inductor caches
    under is its uuid with ours; a pass without a uuid is left alone (Inductor then bypasses
    its caches: no plan to tell apart)."""
    from torch._inductor import config
    from torch._inductor.custom_graph_pass import CustomGraphPass
    monkeypatch.delenv("ADAATTN_BUFFER_REUSE", raising=False)
    seen = []

    class UsersPass(CustomGraphPass):
        def __call__(self, graph):
            seen.append(graph)

        def uuid(self):
            return "users-pass-v1"
    with config.patch(post_grad_custom_post_pass=UsersPass()):
        patches, wrap = inductor_memory.compile_settings()
    assert wrap is inductor_memory.short_holds
    keyed = patches["post_grad_custom_post_pass"]
    assert keyed.uuid() == (inductor_memory._short_holds_cache_tag().uuid(), "users-pass-v1")
    keyed("a graph")
    assert seen == ["a graph"]
    torch._dynamo.reset()
    with config.patch(post_grad_custom_post_pass=UsersPass()), torch.no_grad():
        torch.compile(TwoLayerMLP(), backend="adaattn")(torch.randn(5, 16))   # (a shape of its own)
    assert len(seen) == 2   # ran in our compile too
    with config.patch(post_grad_custom_post_pass=lambda graph: None):
        patches, wrap = inductor_memory.compile_settings()
    assert patches == {} and wrap is inductor_memory.short_holds


def test_cache_keys_tell_the_plans_apart(monkeypatch):
    """A graph planned with short holds is never served from Inductor's cache to a compile
    planned otherwise (stock torch.compile of the same graph, Inductor's own reuse), nor the
    other way round; the same plan is (the cache still works for us)."""
    from torch._dynamo.utils import counters
    model, x = TwoLayerMLP(), torch.randn(7, 16)   # (a shape no other test compiles)

    def hits_after(backend, reuse):
        monkeypatch.setenv("ADAATTN_BUFFER_REUSE", reuse)
        torch._dynamo.reset()
        before = counters["inductor"]["fxgraph_cache_hit"]
        with torch.no_grad():
            torch.compile(model, backend=backend)(x)
        return counters["inductor"]["fxgraph_cache_hit"] - before
    assert hits_after("adaattn", "short") == 0
    assert hits_after("inductor", "short") == 0      # stock: not ours
    assert hits_after("adaattn", "on") == 1          # Inductor's own plan: stock's
    assert hits_after("adaattn", "short") == 1
