"""The 8-bit forward (issue 4) on a GPU: accuracy against float64 and speed against cuDNN SDPA,
FlashAttention-2 (SDPA flash) and our dense bf16 kernel, in one process.

    python3 scripts/attn8_bench.py --json out.json [--accuracy] [--speed] [--configs ...]

Accuracy (relative L2 and cosine of the whole output against float64 computed from the same
bf16 inputs):
(a) q, k, v ~ N(0, 1); (b) the same with four key channels scaled x20 (outliers as LLM keys
have), and with four channels of q and k scaled x20; (c) q, k, v captured from every layer of
all-MiniLM-L6-v2 with its real weights (``ADAATTN_MINILM_DIR``), at L = 512. The dense bf16
kernel's error on the same inputs is listed beside ours.

Speed: bf16, B·L = 16k tokens, H = 2048 / D (the DESIGN table's shapes), do_bench medians;
our 8-bit forward whole (pre-pass + kernel: on sm90 the Gluon kernel), its kernel and its
pre-pass alone, and on sm90 the Triton-language 8-bit kernel's too (``int8_triton_kernel``).
``--configs`` tries (BLOCK_M, BLOCK_N, warps, stages) settings of the Triton kernel
(ADAATTN_ATTN8_CONFIG), or with a ``sm90:`` prefix (BLOCK_N, STAGES, PREGS, CREGS) of the
Gluon one (ADAATTN_ATTN8_SM90_CONFIG).
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from adaattn_compile.kernels import attn8, flash  # noqa: E402


def reference(q, k, v, causal=False, scale=None):
    """float64 attention, chunked over query rows (L = 16k would need 2 GB a head)."""
    q, k, v = q.double(), k.double(), v.double()
    if k.shape[1] != q.shape[1]:
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64, device=q.device)
    for i in range(0, q.shape[-2], 1024):
        s = q[..., i:i + 1024, :] @ k.transpose(-1, -2) * scale
        if causal:
            rows = torch.arange(i, min(i + 1024, q.shape[-2]), device=q.device)
            s = s.masked_fill(rows[:, None] < torch.arange(k.shape[-2], device=q.device), -math.inf)
        out[..., i:i + 1024, :] = torch.softmax(s, -1) @ v
    return out


def errors(out, ref):
    o, r = out.double().flatten(), ref.flatten()
    return {"rel_l2": ((o - r).norm() / r.norm()).item(),
            "cosine": F.cosine_similarity(o, r, dim=0).item()}


def minilm_qkv(seq=512, batch=2):
    """(layer, q, k, v) from every attention call of all-MiniLM-L6-v2 (real weights)."""
    from adaattn_compile import bench
    built = bench.build_model("minilm-sdpa", seq, batch, device="cuda")
    inputs = {k: v.cuda() for k, v in built.make_inputs()[1].items()}
    captured = []
    original = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        captured.append((q.detach().clone(), k.detach().clone(), v.detach().clone()))
        return original(q, k, v, *args, **kwargs)
    F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            built.model(**inputs)
    finally:
        F.scaled_dot_product_attention = original
    return captured


def accuracy(rows, dtype=torch.bfloat16):
    torch.manual_seed(0)
    cases = []
    B, H, L, D = 2, 8, 4096, 128
    q, k, v = (torch.randn(B, H, L, D, device="cuda") for _ in range(3))
    cases.append(("(a) random normal", q, k, v, False))
    cases.append(("(a) random normal, causal", q, k, v, True))
    idx = torch.tensor([3, 17, 50, 99])
    ko = k.clone()
    ko[..., idx] *= 20
    cases.append(("(b) 4 key channels x20", q, ko, v, False))
    qo = q.clone()
    qo[..., idx] *= 20
    cases.append(("(b) 4 q and k channels x20", qo, ko, v, False))
    kb = k + 20 * torch.randn(D, device="cuda") * (torch.arange(D, device="cuda") % 32 == 0)
    cases.append(("(b) 4 key channels with a bias of 20 sigma", q, kb, v, False))
    q32, k32, v32 = (torch.randn(1, 8, 1024, 32, device="cuda") for _ in range(3))
    cases.append(("(a) random normal, D=32, L=1024", q32, k32, v32, False))
    if os.environ.get("ADAATTN_MINILM_DIR"):
        for i, (mq, mk, mv) in enumerate(minilm_qkv()):
            cases.append((f"(c) all-MiniLM-L6-v2 layer {i}", mq, mk, mv, False))
        for i, (mq, mk, mv) in enumerate(minilm_qkv()):
            # head dim 32 runs the Triton kernel; zero-padded to 64 (same scores, same output
            # in the first 32 channels) the same activations run the sm90 Gluon one
            pad = [torch.nn.functional.pad(x, (0, 32)) for x in (mq, mk, mv)]
            cases.append((f"(c) all-MiniLM-L6-v2 layer {i}, D padded to 64", *pad, False))
    for name, q, k, v, causal in cases:
        qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
        padded = "padded" in name
        scale = 1 / math.sqrt(32) if padded else None
        # float64 of the bf16 inputs: the kernels' error, not the inputs' rounding
        ref = reference(qd, kd, vd, causal, scale)
        out = attn8.forward(qd, kd, vd, None, causal, scale)[0]
        if padded:
            out, ref = out[..., :32], ref[..., :32]
        ours = errors(out, ref)
        ours["kernel"] = ("sm90" if attn8.sm90_unsupported(qd, kd, vd) is None else "triton")
        dense_out = flash.flash_forward(qd, kd, vd, None, causal, scale)[0]
        dense = errors(dense_out[..., :32] if padded else dense_out, ref)
        row = {"case": name, "shape": list(q.shape), "dtype": str(dtype), "int8": ours,
               "dense_bf16": dense}
        rows.append(row)
        print(f"{name:48s} int8 ({ours['kernel']}) rel {ours['rel_l2']:.2e} "
              f"cos {ours['cosine']:.6f} | "
              f"dense rel {dense['rel_l2']:.2e}", flush=True)


def speed(rows, configs, lengths, dims):
    from triton.testing import do_bench
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for D in dims:
        for causal in (False, True):
            for L in lengths:
                B, H = max(1, 16384 // L), 2048 // D
                q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)
                           for _ in range(3))
                flops = 4 * B * H * L * L * D / (2 if causal else 1)
                row = {"L": L, "D": D, "B": B, "H": H, "causal": causal}

                def tf(ms):
                    return flops / ms / 1e9
                for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION),
                                      ("fa2", SDPBackend.FLASH_ATTENTION)):
                    with sdpa_kernel(backend):
                        row[name] = tf(do_bench(lambda: F.scaled_dot_product_attention(
                            q, k, v, is_causal=causal), return_mode="median"))
                row["dense"] = tf(do_bench(lambda: flash.flash_forward(q, k, v, None, causal),
                                           return_mode="median"))
                for cfg in configs:
                    # (a config of the Gluon kernel: "sm90:BLOCK_N,STAGES,PREGS,CREGS")
                    var = "ADAATTN_ATTN8_SM90_CONFIG" if cfg.startswith("sm90:") else \
                        "ADAATTN_ATTN8_CONFIG"
                    os.environ.pop("ADAATTN_ATTN8_CONFIG", None)
                    os.environ.pop("ADAATTN_ATTN8_SM90_CONFIG", None)
                    if cfg:
                        os.environ[var] = cfg.replace("sm90:", "")
                    try:
                        whole = do_bench(lambda: attn8.forward(q, k, v, None, causal),
                                         return_mode="median")
                        if attn8.sm90_unsupported(q, k, v) is None:
                            # the Gluon kernel on its own form of the pre-pass
                            from adaattn_compile.kernels import attn8_hopper
                            t = attn8.quantise(q, k, v, sm90=True)
                            pre = do_bench(lambda: attn8.quantise(q, k, v, sm90=True),
                                           return_mode="median")
                            o = torch.empty_like(q)
                            lse = torch.empty(q.shape[:3], device="cuda")
                            kern = do_bench(lambda: attn8_hopper.attend(t, q, causal, L, o, lse),
                                            return_mode="median")
                            t = attn8.quantise(q, k, v)
                            row["int8_triton_kernel"] = tf(do_bench(
                                lambda: attn8.attend(t, q, k, v, None, causal),
                                return_mode="median"))
                        else:
                            t = attn8.quantise(q, k, v)
                            pre = do_bench(lambda: attn8.quantise(q, k, v), return_mode="median")
                            kern = do_bench(lambda: attn8.attend(t, q, k, v, None, causal),
                                            return_mode="median")
                        row[f"int8[{cfg or 'default'}]"] = {
                            "whole": tf(whole), "kernel": tf(kern), "prepass_ms": pre,
                            "whole_ms": whole, "vs_cudnn": tf(whole) / row["cudnn"]}
                    except Exception as exc:
                        row[f"int8[{cfg or 'default'}]"] = f"{type(exc).__name__}: {exc}"[:300]
                os.environ.pop("ADAATTN_ATTN8_CONFIG", None)
                os.environ.pop("ADAATTN_ATTN8_SM90_CONFIG", None)
                rows.append(row)
                print(json.dumps(row), flush=True)
                del q, k, v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--accuracy", action="store_true")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--configs", nargs="*", default=[""])
    ap.add_argument("--lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--dims", type=int, nargs="*", default=[64, 128])
    args = ap.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "accuracy": [], "speed": []}
    import triton
    result["triton"] = triton.__version__
    if args.accuracy:
        accuracy(result["accuracy"])
    if args.speed:
        speed(result["speed"], args.configs, args.lengths, args.dims)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
