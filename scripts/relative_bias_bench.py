"""One attention call with a T5-style position bias, four ways, on the GPU (bf16, non-causal):

    python3 scripts/relative_bias_bench.py [--heads 8] [--dim 64] [--lengths 2048,4096,8192]

  ours, realised bias     flash_forward with the bias realised, (1, H, L, L) contiguous (what
                          the op got before the table pass)
  ours, table             flash_forward on reversed K / V with the (1, 1)-strided view of the
                          per-offset table (what the table pass hands it), plus the two flips
  sdpa, realised bias     F.scaled_dot_product_attention with the realised bias (torch picks)
  flex, score_mod         FlexAttention (compiled) adding the table entry of (j - i) per score:
                          the bias never realised, the peer for relative biases
ms a call (triton.testing.do_bench medians, every row in the same process), the bias's bytes,
and each output's relative L2 error against float64 attention with the realised bias.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from adaattn_compile.kernels import flash  # noqa: E402


def case(h, length, d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(1, h, length, d, device="cuda", generator=g, dtype=torch.bfloat16)
               for _ in range(3))
    n = 2 * length - 1
    # per offset j - i in [-(L-1), L-1]: entry (j - i) + L - 1 (a smooth T5-like profile)
    offsets = torch.arange(-(length - 1), length, device="cuda")
    per_offset = (torch.randn(h, 1, device="cuda", generator=g)
                  * torch.log1p(offsets.abs().float())[None, :] / 4).to(torch.bfloat16)
    rel = torch.arange(length, device="cuda")[None, :] - torch.arange(length, device="cuda")[:, None]
    dense = per_offset[:, rel + length - 1].unsqueeze(0).contiguous()      # (1, H, L, L)
    # the pass's table: entry s of the reversed keys is offset (L - 1) - s
    table = per_offset.flip(-1).reshape(1, h, 1, n).contiguous()
    view = table.as_strided((1, h, length, length), (0, n, 1, 1))
    return q, k, v, dense, per_offset, view


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--json")
    args = ap.parse_args()
    from triton.testing import do_bench
    from torch.nn.attention.flex_attention import flex_attention
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        q, k, v, dense, per_offset, view = case(args.heads, length, args.dim)
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                             attn_mask=dense.double())
        torch._dynamo.reset()
        flex = torch.compile(flex_attention, dynamic=False)
        shift = length - 1

        def score_mod(score, b, h, qi, ki):
            return score + per_offset[h, ki - qi + shift]

        fns = {
            "ours, realised bias": lambda: flash.flash_forward(q, k, v, attn_mask=dense)[0],
            "ours, table": lambda: flash.flash_forward(q, k.flip(-2), v.flip(-2),
                                                       attn_mask=view)[0],
            "flips alone": lambda: (k.flip(-2), v.flip(-2)),
            "sdpa, realised bias": lambda: F.scaled_dot_product_attention(q, k, v,
                                                                          attn_mask=dense),
            "flex, score_mod": lambda: flex(q, k, v, score_mod=score_mod),
        }
        row = {"L": length, "H": args.heads, "D": args.dim,
               "bias_MiB_realised": dense.numel() * 2 / 2**20,
               "bias_KiB_table": view.untyped_storage().nbytes() / 1024}
        with torch.no_grad():
            for name, fn in fns.items():
                out = fn()
                if name != "flips alone":
                    row[f"err {name}"] = rel_err(out, ref)
                row[f"ms {name}"] = do_bench(fn, warmup=25, rep=200)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
