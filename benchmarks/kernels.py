"""Attention kernel benchmark: our Triton flash kernel vs SDPA flash, SDPA cuDNN and FlexAttention.

Prints forward and backward TFLOP/s (forward FLOPs = 4*B*H*Lq*Lk*D, halved when causal; backward
= 2.5x forward), bf16, B*L = 16k tokens, H = 2048 // D (so the hidden size is 2048), plus an
additive (B, 1, 1, L) bias variant and a GQA variant (Hkv = H // 4). Before timing, our outputs
and gradients are checked against SDPA (relative L2).

    python3 benchmarks/kernels.py                       # full sweep (takes a while)
    python3 benchmarks/kernels.py --lengths 1024,4096 --dims 128 --variants plain --json out.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from adaattn_compile.kernels import flash  # noqa: E402

TOKENS = 16 * 1024
HIDDEN = 2048


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _bench(fn, rep):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=max(10, rep // 4), rep=rep, return_mode="median")


def _flops(B, H, L, D, causal):
    f = 4.0 * B * H * L * L * D
    return f / 2 if causal else f


class Case:
    def __init__(self, L, D, causal, variant, dtype):
        self.L, self.D, self.causal, self.variant = L, D, causal, variant
        self.B = max(1, TOKENS // L)
        self.H = HIDDEN // D
        self.Hkv = self.H // 4 if variant == "gqa" else self.H
        dev = "cuda"
        g = torch.Generator(device=dev).manual_seed(0)
        mk = lambda h: torch.randn(self.B, h, L, D, device=dev, dtype=dtype, generator=g)  # noqa
        self.q, self.k, self.v = mk(self.H), mk(self.Hkv), mk(self.Hkv)
        self.do = torch.randn(self.B, self.H, L, D, device=dev, dtype=dtype, generator=g)
        self.bias = None
        if variant == "bias":
            # padding-style additive bias: last 1/8 of the keys of odd batches masked off
            bias = torch.randn(self.B, 1, 1, L, device=dev, dtype=dtype, generator=g) * 0.5
            bias[1::2, ..., L - L // 8:] = float("-inf")
            self.bias = bias

    def name(self):
        return f"L={self.L} D={self.D} {'causal' if self.causal else 'full'} {self.variant}"


# ------------------------------------------------------------------------------------- providers
def ours(c):
    q, k, v = c.q, c.k, c.v

    def fwd():
        return flash.flash_forward(q, k, v, attn_mask=c.bias, is_causal=c.causal)

    out, lse = fwd()

    def bwd():
        return flash.flash_backward(c.do, q, k, v, out, lse, attn_mask=c.bias,
                                    is_causal=c.causal)

    return fwd, bwd, (lambda: fwd()[0]), (lambda: bwd()[:3])


def ours_plain(c):
    """Our kernels on this case without what makes it a variant: the bias dropped, GQA's K / V
    repeated to every query head. Issue 3's "masked within 15 % of the unmasked kernel",
    timed in the same rounds as ``ours`` (the plain rows, timed minutes apart, read up to 7
    points lower than interleaved timing did, H100). None for the plain variant."""
    if c.variant == "plain":
        return None
    k, v = c.k, c.v
    if c.Hkv != c.H:
        k, v = (t.repeat_interleave(c.H // c.Hkv, dim=1) for t in (c.k, c.v))
    return ours(types.SimpleNamespace(q=c.q, k=k, v=v, do=c.do, bias=None, causal=c.causal))


def _sdpa(c, backend):
    from torch.nn.attention import sdpa_kernel

    q, k, v = (t.detach().clone().requires_grad_() for t in (c.q, c.k, c.v))
    kw = {}
    if c.Hkv != c.H:
        kw["enable_gqa"] = True

    def run():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=c.bias, is_causal=c.causal,
                                                  **kw)

    with torch.no_grad():
        run()  # raises if the backend cannot take these inputs
    out = run()

    def fwd():
        with torch.no_grad():
            return run()

    def bwd():
        return torch.autograd.grad(out, (q, k, v), c.do, retain_graph=True)

    return fwd, bwd, fwd, bwd


def sdpa_flash(c):
    from torch.nn.attention import SDPBackend

    return _sdpa(c, SDPBackend.FLASH_ATTENTION)


def sdpa_cudnn(c):
    from torch.nn.attention import SDPBackend

    return _sdpa(c, SDPBackend.CUDNN_ATTENTION)


def flex(c):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # A fresh compile per case: one shared compiled function recompiles for every shape and
    # grad mode, and past dynamo's recompile limit (8) it runs flex_attention eagerly, which
    # materialises the scores (3.6 TFLOP/s causal, out of memory at 8k; fifteenth session).
    torch._dynamo.reset()
    fa = torch.compile(flex_attention, dynamic=False)
    q, k, v = (t.detach().clone().requires_grad_() for t in (c.q, c.k, c.v))
    block_mask = None
    if c.causal:
        block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, c.L, c.L,
                                       device="cuda")
    score_mod = None
    if c.bias is not None:
        bias = c.bias.view(c.B, c.L)

        def score_mod(score, b, h, qi, ki):
            return score + bias[b, ki]

    kw = dict(block_mask=block_mask, score_mod=score_mod)
    if c.Hkv != c.H:
        kw["enable_gqa"] = True

    def fwd():
        with torch.no_grad():
            return fa(q, k, v, **kw)

    out = fa(q, k, v, **kw)

    def bwd():
        return torch.autograd.grad(out, (q, k, v), c.do, retain_graph=True)

    return fwd, bwd, fwd, bwd


PROVIDERS = {"ours": ours, "ours_plain": ours_plain, "sdpa_flash": sdpa_flash,
             "sdpa_cudnn": sdpa_cudnn, "flex": flex}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--lengths", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--causal", default="both", choices=["both", "yes", "no"])
    ap.add_argument("--variants", default="plain,bias,gqa",
                    help="plain, bias ((B,1,1,L) additive mask), gqa (Hkv = H/4)")
    ap.add_argument("--providers", default="ours,ours_plain,sdpa_flash,sdpa_cudnn,flex")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    # (three: the median of two is their mean, and one disturbed timing -- in a row where
    # the same kernels' other round and the other providers read as usual, our masked
    # forward at 0.51 ms against 0.20 ms, H100 -- went half into the table)
    ap.add_argument("--rounds", type=int, default=3,
                    help="timing rounds, providers in reverse order every other round; the "
                    "median of the rounds is kept")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    lengths = [int(x) for x in args.lengths.split(",") if x]
    dims = [int(x) for x in args.dims.split(",") if x]
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    variants = [x for x in args.variants.split(",") if x]
    providers = [x for x in args.providers.split(",") if x]
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"triton {__import__('triton').__version__}", flush=True)

    rows = []
    for variant in variants:
        for D in dims:
            for causal in causals:
                for L in lengths:
                    c = Case(L, D, causal, variant, dtype)
                    fl = _flops(c.B, c.H, L, D, causal)
                    row = dict(L=L, D=D, causal=causal, variant=variant, B=c.B, H=c.H,
                               Hkv=c.Hkv, dtype=args.dtype)
                    # set up (and check) every provider first, then time them in rounds of
                    # alternating order: the same kernel timed as the earlier or the later of
                    # two providers in fixed-order rounds read 2-8 % apart (2026-11-25, H100)
                    fns = {}
                    for p in providers:
                        t0 = time.time()
                        try:
                            made = PROVIDERS[p](c)
                            if made is None:   # nothing to time for this variant
                                continue
                            fwd, bwd, out_fn, grad_fn = made
                            if p == "ours":
                                # correctness vs SDPA (default backend choice, fp32 accumulate)
                                qr, kr, vr = (t.detach().clone().requires_grad_()
                                              for t in (c.q, c.k, c.v))
                                kw = {"enable_gqa": True} if c.Hkv != c.H else {}
                                ro = F.scaled_dot_product_attention(
                                    qr, kr, vr, attn_mask=c.bias, is_causal=causal, **kw)
                                rg = torch.autograd.grad(ro, (qr, kr, vr), c.do)
                                o = out_fn()
                                row["err_out"] = _rel(o, ro)
                                if not args.no_bwd:
                                    g = grad_fn()
                                    row["err_dq"], row["err_dk"], row["err_dv"] = (
                                        _rel(a, b) for a, b in zip(g, rg))
                                del ro, rg, qr, kr, vr
                            fns[p] = (fwd, bwd)
                        except Exception as e:  # backend cannot run this case
                            row[f"{p}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                            if os.environ.get("BENCH_TRACE"):
                                traceback.print_exc()
                        row[f"{p}_wall_s"] = time.time() - t0
                    times = {p: ([], []) for p in fns}
                    for rnd in range(max(1, args.rounds)):
                        order = list(fns) if rnd % 2 == 0 else list(fns)[::-1]
                        for p in order:
                            if f"{p}_error" in row:
                                continue
                            t0 = time.time()
                            fwd, bwd = fns[p]
                            try:
                                times[p][0].append(_bench(fwd, args.rep))
                                if not args.no_bwd:
                                    times[p][1].append(_bench(bwd, args.rep))
                            except Exception as e:
                                row[f"{p}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                            row[f"{p}_wall_s"] += time.time() - t0
                    for p, (tfs, tbs) in times.items():
                        if f"{p}_error" in row:
                            continue
                        tf = statistics.median(tfs)
                        row[f"{p}_fwd_ms"] = tf
                        row[f"{p}_fwd_tflops"] = fl / tf * 1e-9
                        if not args.no_bwd:
                            tb = statistics.median(tbs)
                            row[f"{p}_bwd_ms"] = tb
                            row[f"{p}_bwd_tflops"] = 2.5 * fl / tb * 1e-9
                    for d in ("fwd", "bwd"):   # the variant's speed against our unmasked one
                        if f"ours_{d}_ms" in row and f"ours_plain_{d}_ms" in row:
                            row[f"ours_vs_plain_{d}"] = (row[f"ours_plain_{d}_ms"]
                                                         / row[f"ours_{d}_ms"])
                    del fns, times
                    torch.cuda.empty_cache()
                    rows.append(row)
                    _print_row(row, providers, args.no_bwd)
                    del c
                    torch.cuda.empty_cache()
    _print_table(rows, providers, args.no_bwd)
    print("chosen configs:", json.dumps(_chosen_configs(), indent=1))
    if args.json:
        info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                    triton=__import__("triton").__version__, rows=rows,
                    configs=_chosen_configs())
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
    return rows


def _chosen_configs():
    out = {}
    for key, tuner in flash._TUNED.items():
        cache = getattr(tuner, "cache", {})
        out[str(key)] = {str(k): str(v) for k, v in cache.items()}
    return out


def _fmt(row, p, d):
    v = row.get(f"{p}_{d}_tflops")
    return f"{v:6.1f}" if v is not None else "   n/a"


def _print_row(row, providers, no_bwd):
    s = f"L={row['L']:6d} D={row['D']:3d} {'causal' if row['causal'] else 'full  '} " \
        f"{row['variant']:5s} err={row.get('err_out', float('nan')):.1e}"
    if not no_bwd and "err_dq" in row:
        s += f"/{max(row['err_dq'], row['err_dk'], row['err_dv']):.1e}"
    s += " | fwd " + " ".join(f"{p}={_fmt(row, p, 'fwd')}" for p in providers)
    if not no_bwd:
        s += " | bwd " + " ".join(f"{p}={_fmt(row, p, 'bwd')}" for p in providers)
    if "ours_vs_plain_fwd" in row:
        s += f" | ours / ours_plain fwd {100 * row['ours_vs_plain_fwd']:.1f} %"
        if "ours_vs_plain_bwd" in row:
            s += f" bwd {100 * row['ours_vs_plain_bwd']:.1f} %"
    errs = [p for p in providers if f"{p}_error" in row]
    if errs:
        s += " | errors: " + "; ".join(f"{p}: {row[p + '_error'][:80]}" for p in errs)
    print(s, flush=True)


def _print_table(rows, providers, no_bwd):
    cols = [f"{p} fwd" for p in providers] + ([] if no_bwd else [f"{p} bwd" for p in providers])
    print()
    print("TFLOP/s (fwd = 4*B*H*L*L*D, /2 causal; bwd = 2.5x fwd)")
    print("| variant | D | causal | L | err out/grad | " + " | ".join(cols) + " |")
    print("|---" * (5 + len(cols)) + "|")
    for r in rows:
        err = f"{r.get('err_out', float('nan')):.1e}"
        if "err_dq" in r:
            err += f"/{max(r['err_dq'], r['err_dk'], r['err_dv']):.1e}"
        vals = [_fmt(r, p, "fwd").strip() for p in providers]
        if not no_bwd:
            vals += [_fmt(r, p, "bwd").strip() for p in providers]
        print(f"| {r['variant']} | {r['D']} | {'y' if r['causal'] else 'n'} | {r['L']} | {err} | "
              + " | ".join(vals) + " |")


if __name__ == "__main__":
    main()
