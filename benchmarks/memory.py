"""Peak GPU memory of one attention forward+backward: our Triton kernels vs SDPA flash.

Nothing may grow as L²: at L = 16k one (B, H, L, L) bf16 score matrix would be 512 MiB per
head-batch, so the peak above the inputs tells at once.

    python3 benchmarks/memory.py [--lengths 4096,16384] [--dim 128]
"""
import argparse

import torch
import torch.nn.functional as F

import adaattn_compile


def peak_mib(fn, *tensors):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    for t in tensors:
        t.grad = None
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="4096,16384")
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print("| L | B×H | inputs MiB | ours fwd+bwd peak MiB | SDPA flash peak MiB | one L² score matrix MiB |")
    print("|---|---|---|---|---|---|")
    for length in (int(x) for x in args.lengths.split(",")):
        heads, batch = 2048 // args.dim, max(1, 16384 // length)
        q, k, v = (torch.randn(batch, heads, length, args.dim, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        inputs = 3 * q.numel() * 2 / 2**20
        ours = peak_mib(lambda: adaattn_compile.attention(q, k, v, is_causal=True, kernel="triton"), q, k, v)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            sdpa = peak_mib(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v)
        square = batch * heads * length * length * 2 / 2**20
        print(f"| {length} | {batch}×{heads} | {inputs:.0f} | {ours:.0f} | {sdpa:.0f} | {square:.0f} |")


if __name__ == "__main__":
    main()
