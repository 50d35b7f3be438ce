"""Shared test helpers: compile with adaattn and collect what it rewrote."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import adaattn_compile
from adaattn_compile.compiler import record_graphs, rewrite_graph
from adaattn_compile.options import Options


def compile_and_run(fn, *args, options=None, dynamic=None, fullgraph=False, **kwargs):
    """Returns (output, sites, skipped, graph records)."""
    options = {"policy": "exact", "inner": "eager", **(options or {})}
    compiled = torch.compile(fn, backend=adaattn_compile.backend(**options), dynamic=dynamic,
                             fullgraph=fullgraph)
    with record_graphs() as records:
        out = compiled(*args, **kwargs)
    sites = [s for r in records for s in r.sites]
    skipped = [s for r in records for s in r.skipped]
    for r in records:
        assert r.error is None, r.error
    return out, sites, skipped, records


def rewritten(fn, args, options):
    """(graph module, record) of ``fn``'s one graph after our passes, compiled by nothing."""
    captured = {}

    def backend(gm, example_inputs):
        captured["record"] = rewrite_graph(gm, Options.parse(options), "graph0")
        captured["gm"] = gm
        return gm.forward
    torch.compile(fn, backend=backend, dynamic=False)(*args)
    return captured["gm"], captured["record"]


def rel_err(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def reference_attention(q, k, v, mask=None, causal=False, scale=None, gqa=False):
    """float64 reference (SDPA's math, with SDPA's fully-masked-row convention)."""
    q, k, v = q.double(), k.double(), v.double()
    if gqa:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    if causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v


def reference_with_lse(q, k, v, mask, causal, scale):
    """float64 attention with a 'safe' softmax (fully masked rows -> 0); returns out, lse."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    Lq, Lk = s.shape[-2:]
    if causal:
        s = s.masked_fill(~torch.ones(Lq, Lk, dtype=torch.bool, device=s.device).tril(),
                          float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, float("-inf"))
        else:
            s = s + mask.double()
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    l = e.sum(-1, keepdim=True)
    p = e / torch.where(l == 0, torch.ones_like(l), l)
    lse = (torch.log(l) + m).squeeze(-1)
    return p @ v, lse


class RecordingBound:
    """Stands in for ``launch.Bound`` where direct launches are off (the interpreter): runs
    ``fn[grid]`` through triton with the call's tensors in the first positions of the argument
    list, as a bound launch passes them, and logs those tensors in ``log``."""

    def __init__(self, fn, grid, args, kwargs, log):
        self.fn, self.grid, self.args, self.kwargs, self.log = fn, grid, args, kwargs, log

    def __call__(self, *tensors, mask_group=None, mask_owner=None):
        self.log.append(tensors)
        args = list(self.args)
        args[:len(tensors)] = tensors
        self.fn[self.grid](*args, **self.kwargs)


class RecordingMode(TorchDispatchMode):
    """A torch dispatch mode that records every op it sees (``.ops``) and runs it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))
