"""Per-kernel GPU time of our backward (preprocess, dK/dV, dQ) for the benchmark's cases, with
and without the case's mask, from torch.profiler: which kernel a mask's cost lands in.

    python3 scripts/bwd_kernel_times.py [--dims 64] [--causal yes] [--lengths 16384]
        [--variant bias] [--iters 10] [--asm DIR]

Prints, per case and kernel, the mean microseconds a call (after a warm-up that also tunes).
"""
import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from adaattn_compile.kernels import flash  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sm90_tune import add_case_args, grad_out_like, make_case  # noqa: E402


def kernel_times(q, k, v, mask, causal, iters):
    """{kernel name: mean us a backward call} over ``iters`` calls."""
    out, lse = flash.flash_forward(q, k, v, attn_mask=mask, is_causal=causal)
    do = grad_out_like(out)
    for _ in range(3):   # compile, tune, warm up
        flash.flash_backward(do, q, k, v, out, lse, attn_mask=mask, is_causal=causal)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            flash.flash_backward(do, q, k, v, out, lse, attn_mask=mask, is_causal=causal)
        torch.cuda.synchronize()
    total = collections.Counter()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total[ev.name] += ev.device_time_total if hasattr(ev, "device_time_total") \
                else ev.cuda_time_total
    return {name: us / iters for name, us in total.items()}


_FLAGS = ("BLOCK_M", "BLOCK_N", "HAS_MASK", "KEY_SCALE", "CAUSAL")


def _backward_plans():
    """(launch-plan number, kernel name, plan) of the backward kernels launched so far."""
    from adaattn_compile.kernels import launch
    for i, plan in enumerate(launch._PLANS.values()):
        name = getattr(plan.kernel, "name", "") or getattr(
            getattr(plan.kernel, "metadata", None), "name", "")
        if "bwd_dkdv" in name or "bwd_dq" in name:
            yield i, name, plan


def plans():
    """The backward kernels' launch plans so far: (name, config and flags, registers, spills)."""
    rows = []
    for _, name, plan in _backward_plans():
        meta = {n: plan.meta[n] for n in _FLAGS if n in plan.meta}
        md = plan.kernel.metadata
        rows.append((name, meta, getattr(md, "num_warps", None), getattr(md, "num_stages", None),
                     getattr(plan.kernel, "n_regs", None), getattr(plan.kernel, "n_spills", None)))
    return rows


def main():
    ap = argparse.ArgumentParser()
    add_case_args(ap)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--asm", default=None,
                    help="write each backward kernel's TTGIR and PTX under this folder")
    a = ap.parse_args()
    for D in [int(x) for x in a.dims.split(",")]:
        for causal in {"both": [False, True], "yes": [True], "no": [False]}[a.causal]:
            for L in [int(x) for x in a.lengths.split(",")]:
                q, k, v, bias = make_case(D, L, a.variant)
                masked = kernel_times(q, k, v, bias, causal, a.iters)
                plain = kernel_times(q, k, v, None, causal, a.iters)
                print(f"D={D} causal={int(causal)} L={L} variant={a.variant}: us a call, "
                      f"masked / plain")
                for name in sorted(set(masked) | set(plain), key=lambda n: -masked.get(n, 0)):
                    m, p = masked.get(name, 0.0), plain.get(name, 0.0)
                    print(f"  {name[:60]:60s} {m:9.1f} / {p:9.1f}"
                          + (f"  ({m / p:.2f}x)" if p else ""))
                print(f"  {'total':60s} {sum(masked.values()):9.1f} / "
                      f"{sum(plain.values()):9.1f}", flush=True)
    print("launch plans (kernel, config and flags, warps, stages, registers, spills):")
    for row in plans():
        print("  ", *row)
    if a.asm:
        dump_asm(a.asm)


def dump_asm(folder):
    """Each backward launch plan's TTGIR / PTX, named by kernel and flags (no commas: the
    device tool drops such names)."""
    os.makedirs(folder, exist_ok=True)
    for i, name, plan in _backward_plans():
        tag = "_".join(f"{n}{int(plan.meta[n])}" for n in _FLAGS if n in plan.meta)
        for ext in ("ttgir", "ptx"):
            text = plan.kernel.asm.get(ext)
            if text:
                with open(os.path.join(folder, f"{i}_{name[:30]}_{tag}.{ext}"), "w") as f:
                    f.write(text)


if __name__ == "__main__":
    main()
