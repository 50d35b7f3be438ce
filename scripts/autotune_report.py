"""Which autotune candidate won, and the time of each, for the flash kernels at given shapes.

    python3 scripts/autotune_report.py [--shapes 1,12,12,4096,64;4,32,8,2048,128] [--causal]

Runs a forward and a backward per shape (bf16), then prints each tuned kernel's timings
(``configs_timings`` of triton's autotuner) and the first-call time: the data for pruning the
candidate lists in ``kernels/flash.py`` (every candidate costs a compile on a cold cache).
"""
import argparse
import time

import torch

from adaattn_compile.kernels import flash

ap = argparse.ArgumentParser()
ap.add_argument("--shapes", default="1,12,12,4096,64;1,32,8,4096,64;4,16,16,2048,128")
ap.add_argument("--causal", default="1,0")
args = ap.parse_args()
for causal in [c == "1" for c in args.causal.split(",")]:
    for shape in args.shapes.split(";"):
        B, H, HK, L, D = map(int, shape.split(","))
        q = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, HK, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, HK, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        t = time.perf_counter()
        out, lse = flash.flash_forward(q, k, v, None, causal)
        torch.cuda.synchronize()
        t_fwd = time.perf_counter() - t
        t = time.perf_counter()
        flash.flash_backward(torch.randn_like(out), q, k, v, out, lse, None, causal)
        torch.cuda.synchronize()
        print(f"== {shape} causal={causal}: first forward {t_fwd:.1f} s, first backward "
              f"{time.perf_counter() - t:.1f} s", flush=True)
for key, fn in flash._TUNED.items():
    timings = getattr(fn, "configs_timings", None) or {}
    print(key, "best:", getattr(fn, "best_config", None))
    for cfg, ms in sorted(timings.items(), key=lambda kv: kv[1]):
        print(f"    {ms}  {cfg}")
