"""The low-rank path against cuDNN SDPA and our dense kernel (issue 5), on the GPU.

    python3 scripts/lowrank_bench.py --lengths 1024,2048,4096,8192,16384 --json out.json

Per length, bf16, D = 128, B x H heads: median times (``do_bench``) of cuDNN SDPA, our dense
kernel, the whole low-rank path as the op runs it (low-rank kernel + estimator + exact
recompute of the refused heads, one host sync), and its parts alone: the low-rank kernel, the
estimator (row sampling, exact sampled rows, errors, the host sync). Inputs: diffuse heads (q, k ~ N(0, s^2)
with s = --spread, v ~ N(0, 1)) and, with --peaked, heads every check refuses (s = 1), where the
path costs the dense kernel plus the estimator. Accuracy: the router's sampled-row error and
the true relative L2 of the whole output against float64, per head.
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from adaattn_compile import rank
from adaattn_compile.kernels import flash, lowrank


def true_error(q, k, v, out, causal, scale, heads):
    """Relative L2 of ``out`` against float64 attention, for the first ``heads`` heads of
    batch 0 (float64 at L = 16k costs seconds a head)."""
    B, H, L, D = q.shape
    errs = []
    for b in range(1):
        for h in range(min(heads, H)):
            qd, kd, vd = (t[b, h].double() for t in (q, k, v))
            num = den = 0.0
            for r0 in range(0, L, 2048):
                s = (qd[r0:r0 + 2048] @ kd.T) * scale
                if causal:
                    rows = torch.arange(r0, min(r0 + 2048, L), device=q.device)[:, None]
                    s = s.masked_fill(torch.arange(L, device=q.device)[None, :] > rows,
                                      float("-inf"))
                ref = torch.softmax(s, -1) @ vd
                num += (out[b, h, r0:r0 + 2048].double() - ref).pow(2).sum().item()
                den += ref.pow(2).sum().item()
            errs.append((num / den) ** 0.5)
    return errs


ESTIMATOR_KERNELS = ("_exact_rows_kernel", "_check_kernel", "_decide_kernel", "topk", "sort",
                     "gather", "cat", "Memcpy")


def check_kernel_times(q, k, v, causal, scale, tolerance, calls=10):
    """GPU time (ms, per call, from the profiler) of the estimator's kernels in a call that
    runs the check: row sampling, exact sampled rows, the error and the decision, the copy
    home."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            rank.route(q, k, v, causal, scale, tolerance, False)
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None)
        if total is None:
            total = getattr(event, "cuda_time_total", 0)
        name = event.key
        if total and any(part in name for part in ESTIMATOR_KERNELS):
            times[name[:48]] = total / calls / 1000
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--spread", type=float, default=0.3)
    ap.add_argument("--causal", default="no", choices=("no", "yes", "both"))
    ap.add_argument("--peaked", action="store_true")
    ap.add_argument("--tolerance", type=float, default=1e-2)
    ap.add_argument("--rep", type=int, default=100)
    ap.add_argument("--error-heads", type=int, default=4,
                    help="heads checked against float64 (0: none)")
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = "cuda"
    torch.manual_seed(0)
    rows = []
    causals = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    kinds = [("diffuse", args.spread)] + ([("peaked", 1.0)] if args.peaked else [])
    for L in (int(x) for x in args.lengths.split(",")):
        for causal in causals:
            for kind, spread in kinds:
                B, H, D = args.batch, args.heads, args.dim
                q, k = (torch.randn(B, H, L, D, device=dev) * spread for _ in range(2))
                v = torch.randn(B, H, L, D, device=dev)
                q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
                scale = D ** -0.5

                def cudnn():
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

                def ours_dense():
                    return flash.flash_forward(q, k, v, None, causal, scale)

                state = [None]

                def path():   # as the op runs it: the check every rank.CHECK_EVERY calls
                    out, lse, pending, state[0] = rank.route(q, k, v, causal, scale,
                                                             args.tolerance, False, state[0])
                    return out, lse, pending

                def kernel_only():
                    return lowrank.lowrank_forward(q, k, v, causal, scale)

                out_lr, lse_lr, worst, keys = kernel_only()

                def estimator():
                    idx = rank.sample_rows(worst, L)
                    return lowrank.check_rows(q, k, v, out_lr, idx, causal, scale, worst[0],
                                              keys)

                state[0] = None
                out, _, pending = path()   # a call with a check
                checks = pending.result()
                times = {name: do_bench(fn, rep=args.rep, return_mode="median")
                         for name, fn in [("cudnn", cudnn), ("ours_dense", ours_dense),
                                          ("lowrank_path", path), ("lowrank_kernel", kernel_only),
                                          ("estimator", estimator)]}
                flops = 4.0 * B * H * L * L * D / (2 if causal else 1)
                row = dict(L=L, causal=causal, kind=kind, spread=spread, B=B, H=H, D=D,
                           times_ms=times, tflops_cudnn=flops / times["cudnn"] / 1e9,
                           speedup_vs_cudnn=times["cudnn"] / times["lowrank_path"],
                           estimator_share_of_dense=times["estimator"] / times["ours_dense"],
                           estimator_amortised_share=times["estimator"] / rank.CHECK_EVERY
                           / times["ours_dense"],
                           heads_taken=checks.taken_count, heads=len(checks.taken),
                           sampled_error_max=max(checks.error), rank=checks.rank,
                           entropy_mean=sum(checks.entropy) / len(checks.entropy))
                row["check_kernels_gpu_ms"] = check_kernel_times(q, k, v, causal, scale,
                                                                 args.tolerance)
                row["check_kernels_share_of_dense"] = \
                    sum(row["check_kernels_gpu_ms"].values()) / times["ours_dense"]
                if args.error_heads:
                    errs = true_error(q, k, v, out, causal, scale, args.error_heads)
                    row["true_error_max"] = max(errs)
                    row["true_error_taken_max"] = max(
                        [e for e, t in zip(errs, checks.taken) if t], default=None)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "argv": sys.argv, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
