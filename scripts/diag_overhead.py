"""GPU diagnostic: host overhead per call of adaattn's op vs SDPA (tiny shapes: host-bound)."""
import cProfile
import pstats
import time

import torch
import torch.nn.functional as F

import adaattn_compile
import adaattn_compile.kernels.flash

q = torch.randn(1, 8, 256, 128, device="cuda", dtype=torch.bfloat16)


def per_call_us(fn, n=200):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


print("sdpa us/call", per_call_us(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True)))
print("adaattn us/call", per_call_us(lambda: adaattn_compile.attention(q, q, q, is_causal=True)))
print("flash_forward us/call", per_call_us(
    lambda: adaattn_compile.kernels.flash.flash_forward(q, q, q, None, True, None)))
prof = cProfile.Profile()
prof.enable()
for _ in range(200):
    adaattn_compile.attention(q, q, q, is_causal=True)
torch.cuda.synchronize()
prof.disable()
pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
