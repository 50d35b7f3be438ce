"""Adaptive precision on a GPU (issue 4): what the planner and the sampled-row checks cost, and
what the fp32 -> 16-bit rung gains.

    python3 scripts/precision_overhead.py --json out.json

1. bf16, L = 4096, D = 128, B = 4, H = 16 (the DESIGN table's shape): the op with the 8-bit
   rung offered (``int8_min_seq_len=0``, policy ``fast``: the rung passes its checks on these
   inputs) against the 8-bit kernel called directly, both as the mean of 160 consecutive calls
   (five checks among them, one every 32: a median would hide them), timed with device
   events.
2. fp32 inputs, the same shape: the op under ``balanced`` (fp16 rung) against ``exact`` (fp32
   or tf32, torch's setting) and torch's SDPA on the fp32 tensors; error against float64 on
   sampled rows.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import adaattn_compile  # noqa: E402
from adaattn_compile import op, precision  # noqa: E402
from adaattn_compile.kernels import attn8  # noqa: E402
from adaattn_compile.options import Options  # noqa: E402
from attn_case import bench  # noqa: E402  (scripts/, on the path as this script's folder)


def mean_ms(fn, calls=160, rounds=5):
    """Median over ``rounds`` of the mean time of ``calls`` back-to-back calls."""
    return bench(fn, n=rounds, inner=calls)


def op_call(site, options, q, k, v):
    opts = Options.parse(options)
    op.register_site(site, opts)
    return lambda: torch.ops.adaattn.attention(q, k, v, None, 0.0, False, None, False, site,
                                               opts.policy, opts.kernel)[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--length", type=int, default=4096)
    args = ap.parse_args()
    torch.manual_seed(0)
    L, D, B, H = args.length, 128, max(1, 16384 // args.length), 16
    result = {"device": torch.cuda.get_device_name(), "shape": [B, H, L, D]}
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    direct = mean_ms(lambda: attn8.forward(q, k, v))
    adaattn_compile.reset_stats()
    routed = mean_ms(op_call("overhead-int8", {"int8_min_seq_len": 0, "policy": "fast",
                                               "min_seq_len": 0, "rank": "dense"}, q, k, v))
    rt = adaattn_compile.stats()["overhead-int8"]
    dense_direct = mean_ms(lambda: op._flash().flash_forward(q, k, v))
    dense_op = mean_ms(op_call("overhead-dense", {"precision": "input", "rank": "dense"}, q, k,
                               v))
    result["bf16"] = {
        "int8_direct_ms": direct, "int8_through_op_ms": routed,
        "overhead": routed / direct - 1, "checks": rt["precision_checks"],
        "calls": rt["calls"], "precision": rt["precision"], "error": rt["measured_error"],
        "demotions": rt["precision_demotions"],
        "dense_direct_ms": dense_direct, "dense_through_op_ms": dense_op,
        "op_overhead_dense": dense_op / dense_direct - 1, "check_every": precision.CHECK_EVERY}
    print(json.dumps(result["bf16"]), flush=True)

    q32, k32, v32 = (t.float() for t in (q, k, v))
    rows = precision.sample_rows(L, 0, "cuda", samples=64)
    rows32 = {}
    for name, options in (("balanced", {"policy": "balanced", "min_seq_len": 0,
                                        "rank": "dense"}),
                          ("exact", {"policy": "exact"})):
        adaattn_compile.reset_stats()
        fn = op_call(f"fp32-{name}", options, q32, k32, v32)
        ms = mean_ms(fn, calls=8, rounds=3)
        out = fn()
        err = precision.sampled_error(q32, k32, v32, out, None, False, None, rows)
        rt = adaattn_compile.stats()[f"fp32-{name}"]
        rows32[name] = {"ms": ms, "error": err, "precision": rt["precision"],
                        "demotions": rt["precision_demotions"]}
    sdpa = mean_ms(lambda: F.scaled_dot_product_attention(q32, k32, v32), calls=8, rounds=3)
    out = F.scaled_dot_product_attention(q32, k32, v32)
    rows32["torch_sdpa_fp32"] = {"ms": sdpa, "error": precision.sampled_error(
        q32, k32, v32, out, None, False, None, rows)}
    rows32["tf32_allowed"] = torch.get_float32_matmul_precision() != "highest"
    result["fp32"] = rows32
    print(json.dumps(rows32), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
