"""Interleaved A/B timing of the Gluon sm90 forward against cuDNN and against itself.

The candidates take turns launch by launch (the order rotating), each launch timed by its own
pair of CUDA events, and each candidate's median is reported: clock and thermal drift then fall
on every candidate alike. (Timing one candidate for 25 ms after another, as do_bench does,
moved two identical kernels apart by up to 7 % on the H100, the first of a round ahead.)

    python3 scripts/sm90_ab.py [--dims 64,128] [--causal both] [--lengths 2048,4096,8192,16384]
        [--variant plain|bias|gqa] [--candidates "new;new+ADAATTN_SM90_BALANCE=0;old;cudnn"]
        [--old DIR] [--iters 40] [--json out.json]

``new``: this tree's ``flash_hopper.forward``, called directly (no bound-launch cache, so every
call reads the environment switches); ``+NAME=VALUE`` suffixes set switches for that candidate
only. ``bwd``: this tree's ``flash.flash_backward`` of the case (the Triton backward kernels;
TFLOP/s counted as 2.5x the forward's), ``bwd@plain`` the same without the case's mask (the
masked / unmasked ratio in one interleaved run); their errors are against the first ``bwd``
candidate's gradients. ``fwd``, ``fwd@plain``: the same for ``flash.flash_forward``, the
whole forward dispatch (the Gluon kernel or, below its size bar or where it does not run, the
Triton-language kernels). ``flashbwd``: SDPA flash's backward kernel alone
(``aten._scaled_dot_product_flash_attention_backward``, unmasked: it takes no mask).
``old``: the ``flash_hopper`` module in ``DIR``, a copy of ``adaattn_compile/kernels``
from another commit (``git archive REV adaattn_compile/kernels | tar -x -C tmp`` then
``--old tmp/adaattn_compile/kernels``). ``cudnn``: SDPA's cuDNN backend. bf16, B*L = 16k
tokens, H = 2048 / D, as in benchmarks/kernels.py. Every candidate's output is checked against
cuDNN's first (relative L2 printed).
"""
import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from adaattn_compile.kernels import flash, flash_hopper  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# (the tuning runs' inputs)
from sm90_tune import _rel, add_case_args, grad_out_like, make_case  # noqa: E402


def _load_old(folder):
    """The flash_hopper module of another tree, as package ``adaattn_old_kernels`` (it imports
    ``launch`` relatively)."""
    pkg = types.ModuleType("adaattn_old_kernels")
    pkg.__path__ = [folder]
    sys.modules["adaattn_old_kernels"] = pkg
    for name in ("launch", "flash_hopper"):
        spec = importlib.util.spec_from_file_location(f"adaattn_old_kernels.{name}",
                                                      os.path.join(folder, f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return sys.modules["adaattn_old_kernels.flash_hopper"]


def _candidate(spec, old, q, k, v, bias, causal):
    """-> (fn returning the output, environment switches)."""
    base, *switches = spec.split("+")
    env = dict(sw.split("=", 1) for sw in switches)
    if base == "cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def run():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal,
                                                      enable_gqa=k.shape[1] != q.shape[1])
        return run, env
    if base == "flashbwd":
        fwd = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)
        out, lse, cq, ck, mq, mk, seed, offset = fwd[:8]
        do = grad_out_like(out)

        def run():
            return torch.cat([g.flatten() for g in
                              torch.ops.aten._scaled_dot_product_flash_attention_backward(
                                  do, q, k, v, out, lse, cq, ck, mq, mk, 0.0, causal, seed,
                                  offset)])
        return run, env
    if base in ("fwd", "fwd@plain"):
        mask = bias if base == "fwd" else None

        def run():
            return flash.flash_forward(q, k, v, attn_mask=mask, is_causal=causal)[0]
        return run, env
    if base in ("bwd", "bwd@plain"):
        mask = bias if base == "bwd" else None
        out, lse = flash.flash_forward(q, k, v, attn_mask=mask, is_causal=causal)
        do = grad_out_like(out)

        def run():
            return torch.cat([g.flatten() for g in flash.flash_backward(
                do, q, k, v, out, lse, attn_mask=mask, is_causal=causal)[:3]])
        return run, env
    module = {"new": flash_hopper, "old": old}[base]
    if module is None:
        raise SystemExit("candidate 'old' needs --old DIR")
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    mask, ms, has_mask, is_bool, rb, cb = flash._prep_mask(bias, (B, Hq, Lq, Lk), q.device)
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq, Lq), device=q.device, dtype=torch.float32)
    scale = D ** -0.5

    def run():
        module.forward(q, k, v, mask, ms, (has_mask, is_bool, rb, cb), causal, scale, out, lse)
        return out
    return run, env


def _call(fn, env):
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        return fn()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _interleaved(cands, iters):
    """Median milliseconds a launch for each candidate, launches taking turns."""
    names = list(cands)
    for name in names:   # compile and warm up
        t0 = time.perf_counter()
        for _ in range(3):
            _call(*cands[name])
        torch.cuda.synchronize()
        print(f"  (warm: {name} {time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    events = {name: [] for name in names}
    for i in range(iters):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _call(*cands[name])
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: statistics.median(s.elapsed_time(e) for s, e in ev)
            for name, ev in events.items()}


def main():
    ap = argparse.ArgumentParser()
    add_case_args(ap)
    ap.add_argument("--candidates", default="new;cudnn")
    ap.add_argument("--old", default=None)
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    old = _load_old(a.old) if a.old else None
    specs = [c for c in a.candidates.split(";") if c]
    print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__} "
          f"candidates: {specs}", flush=True)
    rows = []
    for D in [int(x) for x in a.dims.split(",")]:
        for causal in {"both": [False, True], "yes": [True], "no": [False]}[a.causal]:
            for L in [int(x) for x in a.lengths.split(",")]:
                q, k, v, bias = make_case(D, L, a.variant)
                B, H = q.shape[0], q.shape[1]
                cands = {spec: _candidate(spec, old, q, k, v, bias, causal) for spec in specs}
                ref = _call(*_candidate("cudnn", None, q, k, v, bias, causal)).clone()
                grads = [s for s in specs if s.split("+")[0] == "bwd"]
                ref_bwd = _call(*cands[grads[0]]).clone() if grads else None
                row = dict(D=D, causal=causal, L=L, B=B, H=H, variant=a.variant)
                for spec, cand in cands.items():
                    bwd = spec.startswith("bwd")
                    row[spec + "_err"] = (float("nan") if spec.startswith(("bwd@plain", "fwd@plain",
                                                                           "flashbwd")) else
                                          _rel(_call(*cand), ref_bwd if bwd else ref))
                ms = _interleaved(cands, a.iters)
                flops = 4.0 * B * H * L * L * D / (2 if causal else 1)
                row.update({spec: flops * (2.5 if spec.startswith(("bwd", "flashbwd")) else 1)
                            / t * 1e-9 for spec, t in ms.items()})
                rows.append(row)
                base = row.get("cudnn")
                print(f"D={D} causal={int(causal)} L={L:5d} | " + "  ".join(
                    f"{spec}={row[spec]:.1f}" + (f" ({row[spec] / base:.1%})" if base else "")
                    for spec in specs) + "  | err " + " ".join(
                    f"{row[spec + '_err']:.1e}" for spec in specs), flush=True)
                del q, k, v, bias, cands, ref
                torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           candidates=specs, iters=a.iters, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
