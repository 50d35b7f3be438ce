"""Where a compiled model's time goes: stock torch.compile against adaattn, kernel by kernel.

    python3 scripts/profile_model.py --model llama-sdpa --seq 4096 [--layers 4] [--top 25]

Builds the benchmark registry's model (bf16, batch 1, inference), compiles it both ways, and
for each prints the wall time of one forward, its host time and the device syncs one forward
makes (torch's sync debug mode), the GPU time summed over kernels (their gap is host time the
GPU waited for) and the kernels sorted by GPU time. Written to diagnose models
where adaattn is slower than stock (issue 6's "SDPA models >= 1.0x").
"""
import argparse
import cProfile
import io
import pstats
import statistics
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

import adaattn_compile
from adaattn_compile.bench import main_tensor, model_and_inputs, time_calls


def timed(step, n=10):
    """Median ms of ``n`` calls after 3 warm-up calls (the benchmark harness's timer)."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return statistics.median(time_calls(step, n, "cuda"))


def host_and_syncs(step, n=10):
    """(median host ms of a call: from the call until it returns, kernels still queued; the
    device syncs one call makes, as torch's sync debug mode reports them). A host time close
    to the call's time means the host set the pace, or that the call waited on the GPU: the
    syncs tell which."""
    host = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    # (the mode's own "is a prototype feature" notice is no sync)
    syncs = [str(w.message).splitlines()[0][:160] for w in caught
             if "synchroniz" in str(w.message).lower() and "prototype" not in str(w.message)]
    return statistics.median(host), syncs


def kernel_table(step, top):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_total = sum(e.self_device_time_total for e in events) / 3 / 1e3
    rows = sorted(events, key=lambda e: -e.self_device_time_total)[:top]
    lines = [f"  GPU time per forward (sum of kernels): {gpu_total:.3f} ms"]
    for e in rows:
        lines.append(f"  {e.self_device_time_total / 3 / 1e3:8.3f} ms  x{e.count // 3:<4d} "
                     f"{e.key[:110]}")
    cpu = sorted([e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU],
                 key=lambda e: -e.self_cpu_time_total)[:12]
    lines.append("  host (self CPU time per forward):")
    for e in cpu:
        lines.append(f"  {e.self_cpu_time_total / 3 / 1e3:8.3f} ms  x{e.count // 3:<4d} {e.key[:100]}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="llama-sdpa")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--policy", default="exact")
    ap.add_argument("--cprofile", action="store_true",
                    help="also a cProfile of 5 forwards (host time by Python function)")
    args = ap.parse_args()

    model, a, kw = model_and_inputs(args.model, args.seq, layers=args.layers)
    for name, fn in (("stock", torch.compile(model, dynamic=False)),
                     ("adaattn", torch.compile(model, dynamic=False,
                                               backend=adaattn_compile.backend(policy=args.policy)))):
        torch._dynamo.reset()

        def step():
            with torch.no_grad():
                return main_tensor(fn(*a, **kw))
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        print(f"== {args.model} L={args.seq} {name}: first call {time.perf_counter() - t0:.1f} s, "
              f"median {timed(step):.3f} ms", flush=True)
        host, syncs = host_and_syncs(step)
        print(f"  host time per call {host:.3f} ms; device syncs in one call: {len(syncs)}"
              + "".join(f"\n    {m}" for m in syncs[:8]), flush=True)
        if name == "adaattn":
            print("  ", adaattn_compile.stats(), flush=True)
        print(kernel_table(step, args.top), flush=True)
        if args.cprofile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(5):
                step()
            prof.disable()
            torch.cuda.synchronize()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
            print(f"  cProfile of 5 forwards ({name}):\n{buf.getvalue()}", flush=True)


if __name__ == "__main__":
    main()
