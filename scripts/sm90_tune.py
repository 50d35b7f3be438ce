"""Tune the Gluon sm90 forward: time each candidate config against cuDNN, SDPA flash (FA2) and
our Triton-language kernel, in one process on one GPU (bf16, B*L = 16k tokens, H = 2048 / D).

    python3 scripts/sm90_tune.py [--dims 64,128] [--lengths 2048,4096,8192,16384]
        [--configs128 "default;128,2,2,1,1,24,240,1"] [--json out.json]

A config is BLOCK_N,NUM_WG,STAGES,PINGPONG,PERSISTENT,PRODUCER_REGS,CONSUMER_REGS[,QBUF] (see
flash_hopper.config), or "default" for the built-in one; "+NAME=VALUE" suffixes set environment
switches for that candidate only ("default+ADAATTN_SM90_BIAS_TC=0").
Every config's output is checked against cuDNN first (relative L2 printed); a config that fails
to build is reported and skipped.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from adaattn_compile.kernels import flash  # noqa: E402

DEFAULTS = {
    64: "128,3,3,1,1,24,160;128,3,3,0,1,24,160;128,3,3,1,0,24,160;128,2,3,1,1,24,240",
    128: "128,2,2,1,1,24,240;128,2,2,0,1,24,240;128,2,2,1,0,24,240;128,2,2,0,0,24,240",
}


def make_case(D, L, variant, device="cuda"):
    """The benchmark's inputs (shared with sm90_ab.py): bf16, B*L = 16k tokens, H = 2048 / D,
    GQA 4:1 for 'gqa', a (B, 1, 1, L) bias for 'bias' (odd batches' last eighth of keys -inf);
    seeded by (L, D) -> (q, k, v, bias or None)."""
    B, H = max(1, 16384 // L), 2048 // D
    Hkv = H // 4 if variant == "gqa" else H
    g = torch.Generator(device=device).manual_seed(L + D)
    q = torch.randn(B, H, L, D, device=device, dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, Hkv, L, D, device=device, dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, Hkv, L, D, device=device, dtype=torch.bfloat16, generator=g)
    bias = None
    if variant == "bias":
        bias = torch.randn(B, 1, 1, L, device=device, dtype=torch.bfloat16, generator=g) * 0.5
        bias[1::2, ..., L - L // 8:] = float("-inf")
    return q, k, v, bias


def grad_out_like(out):
    """The backward timings' dO: the same seeded values for every candidate of a case."""
    return torch.randn(out.shape, device=out.device, dtype=out.dtype,
                       generator=torch.Generator(device=out.device).manual_seed(0))


def add_case_args(ap):
    """The case selection both sm90 timing scripts take (see make_case)."""
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--lengths", default="2048,4096,8192,16384")
    ap.add_argument("--causal", default="both", choices=["both", "yes", "no"])
    ap.add_argument("--variant", default="plain", choices=["plain", "bias", "gqa"])


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _bench(fn, rep):
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    add_case_args(ap)
    ap.add_argument("--configs64", default=DEFAULTS[64])
    ap.add_argument("--configs128", default=DEFAULTS[128])
    ap.add_argument("--no-triton", action="store_true", help="skip our Triton-language kernel")
    ap.add_argument("--rep", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=4,
                    help="timing rounds, providers in reverse order every other round")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__} "
          f"triton {triton.__version__}", flush=True)
    for D in [int(x) for x in a.dims.split(",")]:
        configs = [c for c in (a.configs64 if D == 64 else a.configs128).split(";") if c]
        for causal in {"both": [False, True], "yes": [True], "no": [False]}[a.causal]:
            for L in [int(x) for x in a.lengths.split(",")]:
                q, k, v, bias = make_case(D, L, a.variant)
                B, H, Hkv = q.shape[0], q.shape[1], k.shape[1]
                flops = 4.0 * B * H * L * L * D / (2 if causal else 1)
                row = dict(D=D, causal=causal, L=L, B=B, H=H, variant=a.variant)
                kw = {"enable_gqa": True} if Hkv != H else {}

                def sdpa(backend):
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                              is_causal=causal, **kw)
                # every provider as a closure; timed in `--rounds` interleaved rounds (the
                # median of the rounds is kept) so that clock drift hits all of them alike, in
                # reverse order every other round: two identical kernels timed one after the
                # other in a fixed order read 2-8 % apart, the later one lower (2026-11-25)
                fns, ref = {}, None
                for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                                      ("fa2", SDPBackend.FLASH_ATTENTION),
                                      ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
                    try:
                        o = sdpa(backend)
                        ref = o if ref is None else ref
                        if name != "efficient":  # a reference only (where cuDNN can't)
                            fns[name] = (lambda b=backend: sdpa(b)), {}
                    except Exception as e:
                        row[name + "_error"] = str(e)[:100]
                if not a.no_triton:
                    fns["triton"] = (lambda: flash.flash_forward(q, k, v, attn_mask=bias,
                                                                 is_causal=causal),
                                     {"ADAATTN_FLASH_SM90": "0"})
                for cfg in configs:
                    base, *switches = cfg.split("+")
                    env = {} if base == "default" else {f"ADAATTN_SM90_CONFIG_{D}": base}
                    env.update(sw.split("=", 1) for sw in switches)
                    if causal and D == 64:   # routed to the Triton kernel unless asked
                        env["ADAATTN_SM90_CAUSAL64"] = "1"
                    fns[f"sm90[{cfg}]"] = (lambda: flash.flash_forward(
                        q, k, v, attn_mask=bias, is_causal=causal), env)
                times = {}
                for rnd in range(a.rounds):
                    order = list(fns.items())
                    for name, (fn, env) in (order if rnd % 2 == 0 else order[::-1]):
                        if name in row.get("_failed", ()):
                            continue
                        os.environ.update(env)
                        try:
                            if rnd == 0 and name.startswith(("sm90", "triton")):
                                flash._SM90_FAILED.clear()
                                import warnings
                                with warnings.catch_warnings():
                                    warnings.simplefilter("error")
                                    row[name + "_err"] = _rel(fn()[0], ref)
                            times.setdefault(name, []).append(_bench(fn, a.rep))
                        except Exception as e:
                            row[name + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                            row.setdefault("_failed", []).append(name)
                        for key in env:
                            os.environ.pop(key, None)
                for name, ts in times.items():
                    row[name] = flops / sorted(ts)[len(ts) // 2] * 1e-9
                rows.append(row)
                best = max((v for kk, v in row.items() if kk.startswith("sm90[")
                            and not kk.endswith(("_err", "_error"))), default=0.0)
                print(f"D={D} causal={int(causal)} L={L:5d} cudnn={row.get('cudnn', 0):6.1f} "
                      f"fa2={row.get('fa2', 0):6.1f} triton={row.get('triton', 0):6.1f} "
                      f"best_sm90={best:6.1f} ({best / max(row.get('cudnn', 1e-9), 1e-9):.0%} "
                      f"of cudnn) | " + " ".join(
                          f"{kk[5:-1]}={vv:.1f}" if not kk.endswith(("_err", "_error"))
                          else f"{kk[-6:]}={vv if isinstance(vv, str) else round(vv, 6)}"
                          for kk, vv in row.items() if kk.startswith("sm90[")), flush=True)
                del q, k, v
                torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
