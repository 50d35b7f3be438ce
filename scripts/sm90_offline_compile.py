"""Compile the Gluon sm90 attention kernel for an H100 on a machine without a GPU.

Runs the whole Triton pipeline (Gluon frontend, TTGIR passes, LLVM, ptxas for sm_90a) and prints
each variant's registers, spills and shared memory, so that layout errors, register spills and
shared-memory overflows are found before spending device time. Needs a triton with Gluon and
its bundled ptxas (the GPU machine's triton 3.6, or this machine's 3.9: the kernels build on
both; ``tests/test_flash_hopper.py`` builds them with the installed one).

    python scripts/sm90_offline_compile.py [--dims 64,128] [--variants plain,causal,bias,mask]
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

from adaattn_compile.kernels import flash_hopper as fh  # noqa: E402


def compile_sm90(fn, args, num_warps=4, gluon=True):
    """``fn`` (a Gluon kernel, or with ``gluon=False`` a Triton-language one) built for sm90
    with ``args`` (name -> value: tensors give pointer types, ints / floats scalars)."""
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = args[name]
        if fn.params[i].is_constexpr:
            sig[name], consts[name] = "constexpr", value
            continue
        sig[name] = mangle_type(value)
        # the launch's specialisation: 16-divisible ints and 16-byte aligned pointers are
        # marked, so that loads and stores vectorise here as they do there
        aligned = (value.data_ptr() % 16 == 0 if isinstance(value, torch.Tensor) else
                   isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0
                   and not fn.params[i].do_not_specialize)
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = (GluonASTSource if gluon else ASTSource)(fn, sig, consts, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))


def compile_or_report(fn, args, name, **options):
    """compile_sm90, or None after printing the compiler's complaint (and its first cause)."""
    try:
        return compile_sm90(fn, args, **options)
    except Exception as e:
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        print(f"{name}: FAILED {type(e).__name__}: {str(e)[-2500:]}\n"
              f"  cause: {type(cause).__name__}: {str(cause)[:1500]}")
        return None


def sass(kernel):
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([os.path.join(bin_dir, "nvdisasm"), "-c", "-g", f.name],
                              capture_output=True, text=True).stdout


def dump(kernel, directory, tag):
    """Write the kernel's TTGIR, PTX and SASS under ``directory`` as ``tag``.{ttgir,ptx,sass}
    (spills: grep STL / LDL in the SASS)."""
    os.makedirs(directory, exist_ok=True)
    for ext in ("ttgir", "ptx"):
        with open(os.path.join(directory, f"{tag}.{ext}"), "w") as f:
            f.write(kernel.asm[ext])
    with open(os.path.join(directory, f"{tag}.sass"), "w") as f:
        f.write(sass(kernel))


def resources(kernel):
    ptxas_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        txt = subprocess.run([os.path.join(ptxas_dir, "cuobjdump"), "-res-usage", f.name],
                             capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", txt)
    stack = re.search(r"STACK:(\d+)", txt)
    return (int(regs.group(1)) if regs else -1, int(stack.group(1)) if stack else -1)


def summary(kernel, counts=(("wgmma", "wgmma.mma_async"),), extra="") -> str:
    """One line on a compiled kernel: registers, stack, shared memory, the count of each
    (label, PTX pattern) in ``counts``, ``extra``, and whether it spills to local memory."""
    regs, stack = resources(kernel)
    ptx = kernel.asm["ptx"]
    parts = [f"regs={regs}", f"stack={stack}", f"smem={kernel.metadata.shared}",
             *(f"{label}={ptx.count(pattern)}" for label, pattern in counts)]
    if extra:
        parts.append(extra)
    parts.append(f"local={'ld.local' in ptx or 'st.local' in ptx}")
    return " ".join(parts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--variants", default="plain,causal,bias,bias_causal,bias_alu,mask")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--dump", default="", help="folder for ttgir/ptx of each variant")
    a = ap.parse_args()
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    for D in [int(x) for x in a.dims.split(",")]:
        for variant in a.variants.split(","):
            kind = {"bias": "row", "bias_causal": "row", "bias_alu": "row",
                    "mask": "tile"}.get(variant, "none")
            # bias_alu: the row bias added in registers
            bias_tc = variant in ("bias", "bias_causal")
            causal = variant in ("causal", "bias_causal")
            cfg = fh.config(D, kind, causal)
            block_n, num_wg, stages, pingpong, persistent, pregs, cregs, qbuf, turnover = cfg
            B, H, L = 2, 4, 1024
            o_tma = fh._o_tma(D, block_n, num_wg, stages, qbuf, bias_tc)
            q = torch.empty(B, H, L, D, dtype=dt)
            mask = torch.empty(B, 1, 1, L, dtype=dt) if kind == "row" else (
                torch.empty(B, H, L, L, dtype=torch.uint8) if variant == "mask" else
                torch.empty(1, dtype=torch.float32))
            has_mask = kind != "none"
            mask_strides = ((L, 0, 0, 1) if kind == "row" else
                            (H * L * L, L * L, L, 1) if variant == "mask" else (0, 0, 0, 0))
            args = dict(desc_q=fh._descriptor(q, 64, D), desc_k=fh._descriptor(q, block_n, D),
                        desc_v=fh._descriptor(q, block_n, D),
                        desc_kb=fh._descriptor(torch.empty(B, 1, L, 16, dtype=dt), block_n, 16)
                        if bias_tc else None,
                        desc_o=fh._descriptor(q, 64, D) if o_tma else None,
                        Out=q, LSE=torch.empty(B, H, L),
                        Mask=mask, Sched=torch.empty(8, dtype=torch.int32),
                        # the strides a launch passes (their specialisation: == 1, % 16), so
                        # that O's and the mask's loads / stores vectorise as they will there
                        stride_ob=H * L * D, stride_oh=L * D, stride_om=D, stride_lb=H * L,
                        stride_lh=L, **dict(zip(("stride_mb", "stride_mh", "stride_mm",
                                                 "stride_mn"), mask_strides)), n_m=8,
                        n_units=B * H * 8, Hq=H, GROUP=1, kb_nb=B, kb_nh=1, sched_w=8, bias_hi=8.0,
                        bias_lo=0.0,
                        Lq=L, Lk=L, qk_scale=0.1, HEAD_D=D, BLOCK_N=block_n, NUM_WG=num_wg,
                        STAGES=stages, CAUSAL=causal, HAS_MASK=has_mask,
                        MASK_BOOL=variant == "mask", MASK_RB=kind == "row", MASK_CB=False,
                        PINGPONG=pingpong, PRODUCER_REGS=pregs, CONSUMER_REGS=cregs, QBUF=qbuf,
                        PAIRED=causal and persistent, BIAS_TC=bias_tc,
                        TURNOVER=turnover, O_TMA=o_tma)
            k = compile_or_report(fh._attn_fwd_sm90, args, f"D={D} {variant}")
            if k is None:
                continue
            setmaxnreg = re.findall(r"setmaxnreg[^;]*", k.asm["ptx"])
            print(f"D={D} {variant:6s} cfg={cfg} {summary(k, extra=f'setmaxnreg={setmaxnreg}')}")
            if a.dump:
                dump(k, a.dump, f"D{D}_{variant}")


if __name__ == "__main__":
    main()
