"""Host (CPU-side) overhead of one call of ``torch.ops.adaattn.attention``, at tiny shapes where
the arithmetic is negligible and the time is the Python and dispatcher work around it.

    python scripts/op_overhead.py                   # table of us/call (median of batches)
    python scripts/op_overhead.py --profile         # plus a cProfile of the op called directly
    python scripts/op_overhead.py --shape 1,2,8,16 --repeat 41 --number 200
    python scripts/op_overhead.py --device cuda --dtype bfloat16 --shape 1,8,256,128

Rows:
  reference_forward      kernels.reference.reference_forward called directly (the floor)
  op (graph call)        torch.ops.adaattn.attention.default(...), as rewritten graphs call it
  adaattn.attention      adaattn_compile.attention(...), the public function
  sdpa                   F.scaled_dot_product_attention
  op body (no dispatch)  the op's Python body called as a plain function (what we control)
Each is timed under torch.no_grad(), with inputs that require grad (grad mode on: the autograd
graph is built, no backward is run) and under torch.inference_mode().
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import adaattn_compile  # noqa: E402
from adaattn_compile import op as op_module  # noqa: E402
from adaattn_compile.kernels import reference  # noqa: E402


def per_call_us(fns, repeat: int, number: int, sync=lambda: None):
    """{name: (median, min)} over ``repeat`` batches of the mean time of ``number`` calls, in
    microseconds. The functions take turns batch by batch, so that a slower stretch of a busy
    machine hits all of them alike."""
    for fn in fns.values():
        for _ in range(max(50, number // 4)):
            fn()
    sync()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(number):
                fn()
            sync()
            times[name].append((time.perf_counter() - start) / number * 1e6)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def calls(q, k, v, causal=False):
    opov = torch.ops.adaattn.attention.default
    body = getattr(op_module, "attention_impl", None)   # the op's Python body
    if body is None:   # the custom_op version of op.py
        body = getattr(getattr(op_module, "attention_op", None), "_init_fn", None)
    rows = {
        "reference_forward": lambda: reference.reference_forward(q, k, v, None, causal, None, 0.0,
                                                                 False, 0),
        "op (graph call)": lambda: opov(q, k, v, None, 0.0, causal, None, False, "s0",
                                        "balanced", "auto"),
        "adaattn.attention": lambda: adaattn_compile.attention(q, k, v, is_causal=causal),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
    }
    if body is not None:
        rows["op body (no dispatch)"] = lambda: body(q, k, v, None, 0.0, causal, None, False, "s0",
                                                     "balanced", "auto")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1,2,8,16", help="B,H,L,D (default 1,2,8,16)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--repeat", type=int, default=31, help="batches (the median is kept)")
    parser.add_argument("--number", type=int, default=300, help="calls per batch")
    parser.add_argument("--profile", action="store_true", help="cProfile the op (graph call)")
    parser.add_argument("--causal", action="store_true", help="is_causal=True calls")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=gen).to(args.device, dtype) for _ in range(3))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    with torch.no_grad():
        no_grad = per_call_us(calls(q, k, v, args.causal), args.repeat, args.number, sync)
    with_grad = per_call_us(calls(qg, kg, vg, args.causal), args.repeat, args.number, sync)
    with torch.inference_mode():
        qi, ki, vi = (t.clone() for t in (q, k, v))
        inference = per_call_us(calls(qi, ki, vi, args.causal), args.repeat, args.number, sync)

    print(f"torch {torch.__version__}, shape {shape} {args.dtype}, {args.device}, "
          f"{args.threads} thread(s), us/call: median (min) of {args.repeat} batches of "
          f"{args.number} calls")
    print(f"{'':24s} {'no_grad':>15s} {'requires_grad':>15s} {'inference_mode':>15s}")
    for name in no_grad:
        cells = [no_grad[name], with_grad[name], inference[name]]
        print(f"{name:24s} " + " ".join(f"{med:7.1f} ({low:5.1f})" for med, low in cells))

    if args.profile:
        opov = torch.ops.adaattn.attention.default
        for label, tensors, ctx in (("no_grad", (q, k, v), torch.no_grad),
                                    ("requires_grad", (qg, kg, vg), torch.enable_grad)):
            prof = cProfile.Profile()
            with ctx():
                prof.enable()
                for _ in range(2000):
                    opov(*tensors, None, 0.0, args.causal, None, False, "s0", "balanced",
                         "auto")
                prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
            print(f"\n--- cProfile, op (graph call), {label}, 2000 calls ---")
            print(buf.getvalue())


if __name__ == "__main__":
    main()
