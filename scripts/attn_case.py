"""One attention call as a model makes it: our kernels (under several switch settings) against
SDPA's backends, timed on the GPU.

    python3 scripts/attn_case.py --shape 1,32,8,4096,64 --causal [--hf-layout]
        [--variants "default;tma:ADAATTN_FLASH_TMA=1;g:ADAATTN_SM90_CAUSAL64=1+ADAATTN_X=1"]

--shape B,Hq,Hkv,L,D; --hf-layout gives q/k/v the strides of HF's (B,L,H,D).transpose(1,2).
Each variant is NAME[:ENV=VALUE+...]; it times ``flash.flash_forward`` with those environment
switches set. Also timed: the op (``adaattn_compile.attention``) and SDPA flash / cuDNN. Prints
ms per call (CUDA events over back-to-back calls, median of interleaved rounds), TFLOP/s and
the error against SDPA.
"""
import argparse
import os
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import adaattn_compile
from adaattn_compile.kernels import flash


def bench(fn, n=15, inner=10):
    """Median over ``n`` samples of the mean time of ``inner`` back-to-back calls: the host
    work of one call overlaps the previous kernel, as in a model (a lone call would also time
    the host work before its launch)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / inner)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1,32,8,4096,64")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--hf-layout", action="store_true")
    ap.add_argument("--variants", default="default")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    B, H, HK, L, D = map(int, args.shape.split(","))

    def make(h):
        if args.hf_layout:
            return torch.randn(B, L, h, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        return torch.randn(B, h, L, D, device="cuda", dtype=torch.bfloat16)

    q, k, v = make(H), make(HK), make(HK)
    flops = 4 * B * H * L * L * D / (2 if args.causal else 1)
    gqa = dict(enable_gqa=True) if H != HK else {}

    def sdpa(backend):
        def fn():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=args.causal, **gqa)
        return fn

    fns = {"sdpa_flash": (sdpa(SDPBackend.FLASH_ATTENTION), {}),
           "sdpa_cudnn": (sdpa(SDPBackend.CUDNN_ATTENTION), {}),
           "adaattn op": (lambda: adaattn_compile.attention(q, k, v, is_causal=args.causal,
                                                            enable_gqa=H != HK), {})}
    for spec in filter(None, args.variants.split(";")):
        name, _, envs = spec.partition(":")
        env = dict(e.split("=", 1) for e in filter(None, envs.split("+")))
        fns[name] = (lambda: flash.flash_forward(q, k, v, None, args.causal, None)[0], env)
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                             is_causal=args.causal, **gqa)
        times = {}
        for _ in range(args.rounds):
            for name, (fn, env) in fns.items():
                os.environ.update(env)
                try:
                    if name not in times:
                        out = fn()
                        err = ((out.float() - ref).norm() / ref.norm()).item()
                        times[name] = ([], err)
                    times[name][0].append(bench(fn))
                except Exception as e:
                    print(f"  {name}: {type(e).__name__}: {str(e)[:200]}")
                    times[name] = ([float("nan")], float("nan"))
                for key in env:
                    os.environ.pop(key, None)
    for name, (ts, err) in times.items():
        ms = statistics.median(ts)
        print(f"{args.shape} causal={int(args.causal)} hf={int(args.hf_layout)} {name:12s} "
              f"{ms:.3f} ms {flops / ms / 1e9:6.0f} TFLOP/s err {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
