"""Compile the Gluon sm90 8-bit attention kernel (kernels/attn8_hopper.py) for an H100 on a
machine without a GPU, and print each variant's registers, stack (spills), shared memory and
whether the loop goes through shared memory for P; and the pre-pass (kernels/attn8.py's
``_quant_kernel``, Triton language) in its sm90 form for bf16 and fp32 inputs (the two ways it
rotates). Same needs as sm90_offline_compile.py (a triton with Gluon and its ptxas).

    python scripts/attn8_sm90_offline_compile.py [--dims 64,128] [--configs 64,4,24,240 ...]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from adaattn_compile.kernels import attn8  # noqa: E402
from adaattn_compile.kernels import attn8_hopper as a8h  # noqa: E402
from sm90_offline_compile import compile_or_report, dump, summary  # noqa: E402

# PTX instructions counted per build: (label, pattern)
_COUNTS = (("wgmma", "wgmma.mma_async"), ("st.shared", "st.shared"), ("ld.shared", "ld.shared"),
           ("shfl", "shfl.sync"), ("prmt", "prmt"), ("cvt", "cvt."))


def prepass(D):
    """Build the pre-pass in its sm90 form (128-row blocks, 4 warps) for bf16 and fp32 inputs."""
    B, H, L = 2, 4, 1024
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.empty(B, H, L, D, dtype=dtype)
        i8, f32 = torch.empty(B, H, L, D, dtype=torch.int8), torch.empty(B, H, L)
        native = dtype != torch.float32
        args = dict(Q=x, K=x, V=x, Rot=torch.empty(D, D, dtype=dtype if native else torch.float16),
                    Q8=i8, QS=f32, QM=f32, K8=i8, KS=f32, V8T=i8, VS=f32, VC=f32)
        sb, sh, sl, sd = x.stride()   # q, k and v alike
        args.update(stride_qb=sb, stride_qh=sh, stride_qm=sl, stride_qd=sd,
                    stride_kb=sb, stride_kh=sh, stride_kn=sl, stride_kd=sd,
                    stride_vb=sb, stride_vh=sh, stride_vn=sl, stride_vd=sd)
        args.update(Hq=H, Hk=H, Lq=L, Lk=L, Lq_p=L, Lk_p=L, n_q_blocks=L // 128, qk_scale=0.1,
                    qk_log2=0.1, D=D, DV=D, BD=D, BDV=D, ROWS=128, SM90=True, NATIVE=native)
        name = f"pre-pass D={D} {str(dtype).replace('torch.', '')}"
        k = compile_or_report(attn8._quant_kernel, args, name, gluon=False)
        if k is not None:
            print(f"{name} {summary(k)}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--configs", nargs="*", default=[""])
    ap.add_argument("--dump", default="")
    a = ap.parse_args()
    for D in [int(x) for x in a.dims.split(",")]:
        prepass(D)
        for cfg_txt in a.configs:
            for causal in (False, True):
                cfg = (tuple(int(x) for x in cfg_txt.split(",")) if cfg_txt else a8h.config(D))
                block_n, stages, pregs, cregs = cfg
                B, H, L = 2, 4, 1024
                i8 = torch.empty(B, H, L, D, dtype=torch.int8)
                v8t = torch.empty(B, H, D, L, dtype=torch.int8)
                f32 = torch.empty(B, H, L)
                out = torch.empty(B, H, L, D, dtype=torch.bfloat16)
                args = dict(desc_q=a8h._descriptor(i8, [1, 1, 64, D]),
                            desc_k=a8h._descriptor(i8, [1, 1, block_n, D]),
                            desc_v=a8h._descriptor(v8t, [1, 1, D, block_n]),
                            desc_r=a8h.TensorDescriptor(
                                torch.empty(D, D, dtype=torch.bfloat16), [D, D], [D, 1], [D, D],
                                a8h.gl.NVMMASharedLayout.get_default_for([D, D],
                                                                         a8h.gl.bfloat16)),
                            Out=out, LSE=f32, QS=f32, QM=f32, KS=f32, VS=f32, n_m=8, Hq=H,
                            GROUP=1, Lq=L, Lk=L, Lq_p=L, Lk_p=L, n_vblocks=8,
                            stride_ob=H * L * D, stride_oh=L * D, stride_om=D, stride_lb=H * L,
                            stride_lh=L, HEAD_D=D, BLOCK_N=block_n,
                            STAGES=stages, V_ROWS=128, CAUSAL=causal, PRODUCER_REGS=pregs,
                            CONSUMER_REGS=cregs)
                name = f"D={D} cfg={cfg} causal={causal}"
                k = compile_or_report(a8h._attn8_fwd_sm90, args, name)
                if k is None:
                    continue
                print(f"{name} {summary(k, _COUNTS)}", flush=True)
                if a.dump:
                    dump(k, a.dump, f"D{D}_{'_'.join(map(str, cfg))}_{'c' if causal else 'n'}")


if __name__ == "__main__":
    main()
