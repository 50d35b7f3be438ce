"""The sm90 Gluon 8-bit kernel (kernels/attn8_hopper.py) against float64 across shapes, on an
H100: ragged and unequal lengths, causal, GQA, head dims 64 / 128, fp16 / bf16. Prints the
relative L2 and cosine of O and the largest lse error, beside the Triton 8-bit kernel's on
the same inputs.

    python3 scripts/attn8_sm90_check.py [--json out.json]
"""
import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from adaattn_compile.kernels import attn8  # noqa: E402
from test_precision import SM90_CASES  # noqa: E402   (the GPU test's shapes)

CASES = [  # (B, Hq, Hk, Lq, Lk, D, causal, dtype): real sizes, then the GPU test's shapes
    (2, 8, 8, 4096, 4096, 128, False, torch.bfloat16),
    (2, 8, 8, 4096, 4096, 128, True, torch.bfloat16),
    (2, 8, 8, 4096, 4096, 64, False, torch.bfloat16),
    (2, 8, 8, 4096, 4096, 64, True, torch.bfloat16),
    *SM90_CASES,
]


def reference(q, k, v, causal):
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device)
                          .triu(1), -math.inf)
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def measure(out, lse, ref, ref_lse):
    o, r = out.double().flatten(), ref.flatten()
    finite = torch.isfinite(ref_lse)
    return {"rel_l2": ((o - r).norm() / r.norm()).item(),
            "cosine": torch.nn.functional.cosine_similarity(o, r, dim=0).item(),
            "lse_err": (lse.double() - ref_lse)[finite].abs().max().item(),
            "nan": bool(torch.isnan(out).any())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for B, Hq, Hk, Lq, Lk, D, causal, dtype in CASES:
        q = torch.randn(B, Hq, Lq, D, device="cuda", dtype=dtype)
        k = torch.randn(B, Hk, Lk, D, device="cuda", dtype=dtype)
        v = torch.randn(B, Hk, Lk, D, device="cuda", dtype=dtype)
        ref, ref_lse = reference(q, k, v, causal)
        row = {"case": [B, Hq, Hk, Lq, Lk, D, causal, str(dtype)],
               "sm90": attn8.sm90_unsupported(q, k, v)}
        try:
            row["sm90_kernel"] = measure(*attn8.forward(q, k, v, None, causal), ref, ref_lse)
        except Exception as exc:
            row["sm90_kernel"] = f"{type(exc).__name__}: {exc}"[:400]
        t = attn8.quantise(q, k, v)
        row["triton"] = measure(*attn8.attend(t, q, k, v, None, causal), ref, ref_lse)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
