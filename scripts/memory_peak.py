"""What is alive at a compiled model's peak GPU memory: stock torch.compile against adaattn.

    python3 scripts/memory_peak.py --model t5-sdpa --seq 4096 [--top 12]

Builds the benchmark registry's model (bf16, batch 1, inference), compiles it both ways, runs
it three times, then records one more call's allocations (torch's memory history) and replays
them to the moment the most was allocated: the tensors alive then, largest first, each with
the innermost frames that allocated it. Written for models where our peak exceeds stock's
(issue 6's "peak memory <= stock").
"""
import argparse
import linecache
import os

import torch

import adaattn_compile
from adaattn_compile.bench import model_and_inputs

_SKIP = ("torch/_ops.py", "torch/utils/", "torch/_library", "torch/_dynamo", "torch/nn/modules",
         "torch/_functorch", "torch/_inductor/runtime", "torch/autograd", "contextlib.py")


def _where(frames, n=3):
    keep = [f for f in frames if f.get("filename", "").endswith(".py")
            and not any(s in f["filename"] for s in _SKIP)]
    return " <- ".join(f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}"
                       for f in keep[:n]) or "?"


def peak_tensors(step, top):
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=200000)
    step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    live, cur, best, best_live = {}, 0, 0, {}
    for event in snap["device_traces"][torch.cuda.current_device()]:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], event.get("frames", []))
            cur += event["size"]
            if cur > best:
                best, best_live = cur, dict(live)
        elif event["action"] == "free_completed" and event["addr"] in live:
            cur -= live.pop(event["addr"])[0]
    print(f"  allocated during the call, at its peak: {best / 2**20:.1f} MiB "
          f"in {len(best_live)} tensors")
    for size, frames in sorted(best_live.values(), key=lambda x: -x[0])[:top]:
        print(f"    {size / 2**20:9.1f} MiB  {_where(frames)}")
        py = [f for f in frames if f.get("filename", "").endswith(".py")]
        if py:   # the allocating line itself (in Inductor's generated code: the buffer)
            line = linecache.getline(py[0]["filename"], py[0].get("line", 0))
            print(f"                   {line.strip()[:150]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="t5-sdpa")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    model, a, kw = model_and_inputs(args.model, args.seq)
    for name, fn in (("stock", torch.compile(model, dynamic=False)),
                     ("adaattn", torch.compile(model, dynamic=False, backend="adaattn"))):
        def step():
            with torch.no_grad():
                return fn(*a, **kw)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        print(f"== {args.model} L={args.seq} {name}: peak above the inputs "
              f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.1f} MiB", flush=True)
        peak_tensors(step, args.top)
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
