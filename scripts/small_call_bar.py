"""Small calls: stock against adaattn with its small-call bar as it is and at 0 (every site on
our op), interleaved in one process.

    python3 scripts/small_call_bar.py [--models minilm:512,gpt:1024] [--rounds 30] [--dump DIR]

For each registry model (bf16, batch 1, inference) three compiled forwards take turns, in
``--rounds`` rounds of 5 calls each: stock torch.compile, adaattn (default options: sites under
``small_call_gflops`` stay torch's SDPA) and adaattn with ``small_call_gflops=0``. Prints the
host time of a call (until it returns, kernels queued) and its time until the device is done,
median and min over the rounds, and each output's relative difference from stock's.
``--dump DIR`` writes each compile's Inductor code there (``<model>_<variant>.py``).
"""
import argparse
import os
import statistics
import time

import torch

import adaattn_compile
from adaattn_compile.bench import host_probe, main_tensor, model_and_inputs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm:512,gpt:1024")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--dump", help="directory for the Inductor code of each compile")
    args = ap.parse_args()
    variants = (("stock", "inductor"),
                ("ours", adaattn_compile.backend(policy="exact")),
                ("ours bar 0", adaattn_compile.backend(policy="exact", small_call_gflops=0)))
    for item in args.models.split(","):
        name, seq = item.split(":")
        model, a, kw = model_and_inputs(name, int(seq))
        compiled = {}
        for tag, backend in variants:
            torch._dynamo.reset()
            fn = torch.compile(model, backend=backend, dynamic=False)
            with torch.no_grad():
                if args.dump:
                    from torch._inductor.utils import run_and_get_code
                    out, codes = run_and_get_code(lambda: main_tensor(fn(*a, **kw)))
                    path = os.path.join(args.dump, f"{name}_{tag.replace(' ', '_')}.py")
                    with open(path, "w") as f:
                        f.write("\n\n".join(codes))
                for _ in range(3):
                    out = main_tensor(fn(*a, **kw))
            compiled[tag] = (fn, out)
        host = {tag: [] for tag in compiled}
        call = {tag: [] for tag in compiled}
        with torch.no_grad():
            for _ in range(args.rounds):
                for tag, (fn, _) in compiled.items():
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(5):
                        main_tensor(fn(*a, **kw))
                    t1 = time.perf_counter()
                    torch.cuda.synchronize()
                    t2 = time.perf_counter()
                    host[tag].append((t1 - t0) / 5 * 1e3)
                    call[tag].append((t2 - t0) / 5 * 1e3)
        print(f"== {name} L={seq} probe {host_probe()[0]:.1f}")
        ref = compiled["stock"][1].float()
        for tag, (_, out) in compiled.items():
            diff = ((out.float() - ref).norm() / ref.norm()).item()
            print(f"  {tag:11s} host median {statistics.median(host[tag]):.3f} min "
                  f"{min(host[tag]):.3f}; call median {statistics.median(call[tag]):.3f} min "
                  f"{min(call[tag]):.3f} ms; rel diff to stock {diff:.1e}")


if __name__ == "__main__":
    main()
