"""Host time of one attention call on the GPU, in a loop, by layer of our path against SDPA's.

    python3 scripts/launch_cost.py [--shape 1,12,1024,64] [--number 200] [--repeat 15]

Rows (us a call, median of ``--repeat`` batches of ``--number`` calls, taking turns; each
batch starts on an idle device and is timed until its last call returns, kernels queued):
  sdpa / sdpa, key mask         F.scaled_dot_product_attention, with a (B, 1, 1, L) bool mask
  op                            torch.ops.adaattn.attention.default as graphs call it (its lane)
  op, C launch off              the same with bound launches through triton's Python launcher
  direct / direct, out only     op.inductor_attention(_out_only), as Inductor's code calls it
  op body (no dispatch)         op.attention_impl called as a function (no dispatcher)
  lane call / lane key          op._lane_call; the signature it keys the lane on
  run_fast                      flash.run_fast: the lane's outputs and bound launch
  bound launch (+ C off)        the bound launch alone, given outputs
  torch.empty / seed            an output's allocation; the op's per-call seed tensor
Rows with "key mask" pass a padding mask (10 % of keys masked) in the group a graph gives it
(never causal; ``--causal`` makes the others causal). ``--until-done``: each batch is timed
until its kernels finish, so a row is the call's throughput, host or device bound.
How many op calls took their lane is printed: a row whose calls left it measures another path.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import adaattn_compile  # noqa: E402,F401
from adaattn_compile import op as op_module  # noqa: E402
from adaattn_compile.kernels import flash, launch  # noqa: E402


def per_call_us(fns, repeat, number, until_done=False):
    for fn in fns.values():
        for _ in range(20):
            fn()
    torch.cuda.synchronize()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(number):
                fn()
            if until_done:
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / number * 1e6)
    torch.cuda.synchronize()
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1,12,1024,64")
    ap.add_argument("--number", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--until-done", action="store_true",
                    help="time each batch until its kernels finish: a call's throughput, the "
                         "larger of its host and device time")
    args = ap.parse_args()
    causal = args.causal
    B, H, L, D = map(int, args.shape.split(","))
    g = torch.Generator(device="cuda").manual_seed(0)
    # (B, L, H, D) memory viewed as (B, H, L, D), as a graph's projections hand them over
    q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16,
                           generator=g).transpose(1, 2) for _ in range(3))
    mask = torch.rand(B, 1, 1, L, device="cuda", generator=g) > 0.1
    mask[..., 0] = True
    attention = torch.ops.adaattn.attention.default
    op_module.set_mask_group("lc-mask", "lc/mask")
    lane_hits = {"n": 0, "calls": 0}
    real_lane_call = op_module._lane_call

    def counting(*a):
        done = real_lane_call(*a)
        lane_hits["calls"] += 1
        lane_hits["n"] += done is not None
        return done
    op_module._lane_call = counting

    def op_call(m, site):
        return lambda: attention(q, k, v, m, 0.0, causal and m is None, None, False, site,
                                 "exact", "triton", False)

    def direct_call(m, site, out_only):
        entry = (op_module.inductor_attention_out_only if out_only
                 else op_module.inductor_attention)
        return lambda: entry(q, k, v, m, 0.0, causal and m is None, None, False, site, "exact",
                             "triton", False)

    def c_off(fn):
        def run():
            launch._C_LAUNCH = False
            try:
                return fn()
            finally:
                launch._C_LAUNCH = True
        return run

    rows = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            "sdpa, key mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)}
    with torch.no_grad():
        for name, m, site in (("op", None, "lc-none"), ("op, key mask", mask, "lc-mask")):
            rows[name] = op_call(m, site)
            rows[name + ", C launch off"] = c_off(op_call(m, site))
            rows[name.replace("op", "direct")] = direct_call(m, site, False)
            rows[name.replace("op", "direct") + ", out only"] = direct_call(m, site, True)
            for _ in range(3):
                rows[name]()
        fast = flash.fast_entry(flash._fwd_signature(q, k, v, None, causal, None, False))
        if fast is None:
            sys.exit("no bound launch was kept for the unmasked call: nothing to time")
        out = torch.empty(fast.out_shape, device="cuda", dtype=q.dtype)
        lse = torch.empty(fast.lse_shape, device="cuda", dtype=torch.float32)
        bound = fast.launch
        print(f"bound launch: {type(bound).__name__}, C launch: "
              f"{getattr(bound, 'c_launch', None) is not None}", flush=True)
        rows["op body (no dispatch)"] = lambda: op_module.attention_impl(
            q, k, v, None, 0.0, causal, None, False, "lc-none", "exact", "triton", False)
        rows["lane call"] = lambda: real_lane_call(q, k, v, None, causal, None, False, "lc-none",
                                                   "exact", "triton", False)
        rows["lane key"] = lambda: flash._fwd_signature(q, k, v, None, causal, None, False)
        rows["run_fast"] = lambda: flash.run_fast(fast, q, k, v, None)
        rows["bound launch"] = lambda: bound(q, k, v, fast.no_mask, out, lse)
        rows["bound launch, C launch off"] = c_off(rows["bound launch"])
        rows["torch.empty"] = lambda: torch.empty(fast.out_shape, device="cuda", dtype=q.dtype)
        rows["seed"] = lambda: op_module._NO_SEED.new_zeros(1)
        res = per_call_us(rows, args.repeat, args.number, args.until_done)
    print(f"shape {args.shape} bf16{', causal' if causal else ''}"
          f"{', until done' if args.until_done else ''}; lane: {lane_hits['n']} of "
          f"{lane_hits['calls']} op calls")
    for name, us in res.items():
        print(f"  {name:32s} {us:7.1f} us")
    # the results of the two launch paths, against SDPA in fp32
    for m, site in ((None, "lc-none"), (mask, "lc-mask")):
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m,
                                             is_causal=causal and m is None)
        a = op_call(m, site)()[0]
        b = c_off(op_call(m, site))()[0]
        rel = lambda x: ((x.float() - ref).norm() / ref.norm()).item()  # noqa: E731
        print(f"  rel. L2 against fp32 SDPA, mask {m is not None}: C launch {rel(a):.2e}, "
              f"triton's launcher {rel(b):.2e}, equal: {torch.equal(a, b)}")


if __name__ == "__main__":
    main()
