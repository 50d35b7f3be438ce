"""Graphs handed to the backend while the built-in GPT-style model runs at 10 sequence lengths,
stock torch.compile against adaattn, default settings and ``dynamic=True`` (issue 7; the CI
test ``tests/test_recompiles_and_threads.py`` counts the same with both compiling to eager).

    python3 scripts/recompile_counts.py [--inner inductor|eager]
"""
import argparse

import torch
import torch._dynamo
from torch._inductor.compile_fx import compile_fx

import adaattn_compile
from adaattn_compile.models import TinyGPT

LENGTHS = [8, 12, 16, 24, 31, 40, 48, 64, 80, 100]


def count(model, backend, dynamic):
    torch._dynamo.reset()
    n = [0]

    def counting(gm, example_inputs):
        n[0] += 1
        return backend(gm, example_inputs)
    compiled = torch.compile(model, backend=counting, dynamic=dynamic)
    with torch.no_grad():
        for length in LENGTHS:
            x = torch.randint(0, 256, (2, length))
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    return n[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--inner", default="inductor", choices=["inductor", "eager"])
    a = ap.parse_args()
    torch.manual_seed(0)
    model = TinyGPT(layers=1).eval()
    stock = compile_fx if a.inner == "inductor" else (lambda gm, example_inputs: gm.forward)
    ours = adaattn_compile.backend(inner=a.inner)
    for dynamic in (None, True):
        print(f"dynamic={dynamic}: stock {count(model, stock, dynamic)} graphs, "
              f"adaattn {count(model, ours, dynamic)}", flush=True)


if __name__ == "__main__":
    main()
