"""Why the 8-bit kernel quantises as it does (issue 4): float64 emulation of each choice for
Q·Kᵀ and P·V, relative L2 of the attention output against float64. CPU, ~1 minute.

    python3 scripts/attn8_numerics.py [--length 4096] [--heads 4]

Inputs, D = 128, q, k, v ~ N(0, 1): "random"; "keys x20": four key channels scaled x20 (random
signs: smoothing cannot remove them); "key bias": four key channels with a bias of 20.
Q·Kᵀ choices (P·V exact): INT8 with one scale per 128-row block, INT8 per token, FP8 e4m3 per
block, each with and without the Hadamard rotation; K smoothed (its mean subtracted) in all.
P·V choices (Q·Kᵀ exact): e4m3 P and V (per-channel V scale), INT8 P on 128 levels, INT8 P on
255 levels (offset by 127) with INT8 V per block and channel. P is taken relative to the
running max of 128-key blocks, as the online softmax sees it, or (the kernel's choice) rounded
relative to each tile row's own max and scaled back. Whole forwards, both products quantised:
the Triton kernel's form (K per token, P on 255 levels, V per block and channel) and the sm90
kernel's (K per block, P on 128 levels, V rotated with one scale per block).
"""
import argparse
import math

import torch

F8 = torch.float8_e4m3fn


def hadamard(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.where(torch.rand(n, generator=torch.Generator().manual_seed(1)) < 0.5, -1., 1.)
    return signs.double()[:, None] * h / math.sqrt(n)


def int8_rows(x):
    s = x.abs().amax(-1, keepdim=True) / 127
    return torch.round(x / s).clamp(-127, 127) * s


def int8_blocks(x, block=128):
    b, h, n, d = x.shape
    xb = x.reshape(b, h, n // block, block, d)
    s = xb.abs().amax(dim=(-1, -2), keepdim=True) / 127
    return (torch.round(xb / s).clamp(-127, 127) * s).reshape(x.shape)


def fp8_blocks(x, block=128):
    b, h, n, d = x.shape
    xb = x.reshape(b, h, n // block, block, d)
    s = xb.abs().amax(dim=(-1, -2), keepdim=True) / 448
    return ((xb / s).to(F8).double() * s).reshape(x.shape)


def rel(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


def qk_error(q, k, v, quant, rotate):
    d = q.shape[-1]
    ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
    qs, ks = q / math.sqrt(d), k - k.mean(-2, keepdim=True)
    if rotate:
        m = hadamard(d)
        qs, ks = qs @ m, ks @ m
    return rel(torch.softmax(quant(qs) @ quant(ks).transpose(-1, -2), -1) @ v, ref)


def pv_error(q, k, v, p_quant, v_quant, block=128, tile_max=False):
    """``tile_max``: P rounded relative to each tile row's own max (then scaled back), not
    relative to the running max."""
    b, h, n, d = q.shape
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    ref = torch.softmax(s, -1) @ v
    sb = s.reshape(b, h, n, n // block, block)
    running = sb.amax(-1).cummax(-1).values            # the online softmax's running max
    p = torch.exp(sb - running[..., None])
    rescale = torch.exp(running - running[..., -1:])[..., None]
    if tile_max:
        top = p.amax(-1, keepdim=True)
        pq = p_quant(p / top) * top
    else:
        pq = p_quant(p)
    vq = v_quant(v).reshape(b, h, n // block, block, -1)
    out = torch.einsum("bhlnk,bhnkd->bhld", pq * rescale, vq)
    return rel(out / (pq * rescale).sum((-1, -2))[..., None], ref)


def v_fp8_channel(v):
    s = v.abs().amax(-2, keepdim=True) / 448
    return (v / s).to(F8).double() * s


def v_int8_block_channel(v, block=128):
    b, h, n, d = v.shape
    vb = v.reshape(b, h, n // block, block, d)
    s = vb.abs().amax(-2, keepdim=True) / 127
    return (torch.round(vb / s) * s).reshape(v.shape)


def whole_error(q, k, v, k_quant, levels, v_quant, block=128):
    """Both products quantised as a kernel does them: Q per token and K by ``k_quant`` after
    smoothing (the mean of the first ``block`` keys) and the rotation; P rounded to ``levels``
    relative to each tile row's max; V by ``v_quant`` (which gets the rotation matrix)."""
    d = q.shape[-1]
    ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
    m = hadamard(d)
    s = int8_rows((q / math.sqrt(d)) @ m) @ k_quant(
        (k - k[..., :block, :].mean(-2, keepdim=True)) @ m).transpose(-1, -2)
    b, h, n, _ = s.shape
    sb = s.reshape(b, h, n, n // block, block)
    top = sb.amax(-1, keepdim=True)
    w = torch.round(torch.exp(sb - top) * levels) / levels * torch.exp(top - top.amax(-2, True))
    vq = v_quant(v, m).reshape(b, h, n // block, block, -1)
    out = torch.einsum("bhlnk,bhnkd->bhld", w, vq) / w.sum((-1, -2))[..., None]
    return rel(out, ref)


def v_rotated_blocks(v, m, block=128):
    """V·R with one int8 scale per block, turned back (R orthogonal here)."""
    return int8_blocks(v @ m, block) @ m.T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)
    shape = (1, args.heads, args.length, 128)
    q, k, v = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    channels = torch.tensor([3, 17, 50, 99])
    scaled, biased = k.clone(), k.clone()
    scaled[..., channels] *= 20
    biased[..., channels] += 20
    inputs = {"random": k, "keys x20": scaled, "key bias": biased}
    print("Q·Kᵀ (P·V exact)              " + "".join(f"{n:>12s}" for n in inputs))
    for name, quant in (("INT8 per block", int8_blocks), ("INT8 per token", int8_rows),
                        ("FP8 e4m3 per block", fp8_blocks)):
        for rotate in (False, True):
            errors = [qk_error(q, kk, v, quant, rotate) for kk in inputs.values()]
            label = f"{name}{' + rotation' if rotate else ''}"
            print(f"{label:30s}" + "".join(f"{e:12.2e}" for e in errors), flush=True)
    print("P·V (Q·Kᵀ exact)")
    p255 = lambda p: torch.round(p * 254) / 254   # noqa: E731
    for label, p_quant, v_quant, tile_max in (
            ("e4m3 P, e4m3 V per channel", lambda p: p.to(F8).double(), v_fp8_channel, False),
            ("INT8 P (128 levels), INT8 V", lambda p: torch.round(p * 127) / 127,
             v_int8_block_channel, False),
            ("INT8 P (255 levels), INT8 V", p255, v_int8_block_channel, False),
            ("... P per tile row's max", p255, v_int8_block_channel, True)):
        errors = [pv_error(q, kk, v, p_quant, v_quant, tile_max=tile_max)
                  for kk in inputs.values()]
        print(f"{label:30s}" + "".join(f"{e:12.2e}" for e in errors), flush=True)
    print("Whole forward (both products)")
    for label, k_quant, levels, v_quant in (
            ("Triton kernel's form", int8_rows, 254, lambda v, m: v_int8_block_channel(v)),
            ("sm90 kernel's form", int8_blocks, 127, v_rotated_blocks)):
        errors = [whole_error(q, kk, v, k_quant, levels, v_quant) for kk in inputs.values()]
        print(f"{label:30s}" + "".join(f"{e:12.2e}" for e in errors), flush=True)


if __name__ == "__main__":
    main()
