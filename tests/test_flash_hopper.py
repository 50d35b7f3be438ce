"""The Gluon sm90 forward (adaattn_compile/kernels/flash_hopper.py) vs a float64 reference.

Gluon has no interpreter: the kernel tests need an sm90 GPU (marked ``gpu``, skipped elsewhere).
The host-side choice (which calls the kernel takes, and why not) is tested everywhere.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

from adaattn_compile.kernels import flash, flash_hopper
from helpers import reference_with_lse

HAS_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
sm90 = pytest.mark.skipif(not HAS_SM90, reason="needs an sm90 (Hopper) GPU")


_reference = reference_with_lse  # (tests/helpers.py)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _make(B, H, L, D, dtype, layout):
    if layout == "blhd":  # HF layout: (B, L, H, D) storage seen as (B, H, L, D)
        return torch.randn(B, L, H, D, device="cuda", dtype=dtype).transpose(1, 2)
    return torch.randn(B, H, L, D, device="cuda", dtype=dtype)


def _mask(kind, B, H, Lq, Lk, dtype):
    if kind is None:
        return None
    if kind == "pad-bias":  # HF key padding: (B, 1, 1, Lk) additive, -inf past each length
        m = torch.randn(B, 1, 1, Lk, device="cuda", dtype=dtype) * 0.5
        m[-1, ..., max(1, Lk - Lk // 3):] = float("-inf")
        return m
    if kind == "pad-bool":  # key padding as a bool row; the last batch has no key at all
        m = torch.rand(B, 1, 1, Lk, device="cuda") > 0.3
        m[-1] = False
        return m
    if kind == "head-bias":  # a row bias per head (ALiBi-like slopes times key position)
        slopes = torch.rand(1, H, 1, 1, device="cuda") * 0.02
        return (-slopes * torch.arange(Lk, device="cuda")).to(dtype)
    if kind == "bias-fp32":  # T5/ALiBi-style per-head bias, fp32, broadcast over batch
        return torch.randn(1, H, Lq, Lk, device="cuda", dtype=torch.float32)
    if kind == "bool":  # random bool mask with fully masked rows
        m = torch.rand(B, H, Lq, Lk, device="cuda") > 0.3
        m[:, :, : min(3, Lq)] = False
        return m
    if kind == "bool-rows":  # (B, 1, Lq, 1): whole query rows masked
        m = torch.rand(B, 1, Lq, 1, device="cuda") > 0.2
        return m
    raise ValueError(kind)


CASES = [
    # (B, Hq, Hkv, Lq, Lk, D, causal, mask, layout)
    (2, 4, 4, 1, 1, 64, False, None, "bhld"),
    (1, 2, 2, 17, 33, 64, False, None, "bhld"),
    (2, 3, 3, 100, 100, 128, True, None, "bhld"),
    (1, 2, 2, 333, 257, 128, False, None, "blhd"),
    (1, 2, 2, 257, 333, 64, True, None, "blhd"),
    (2, 4, 4, 1000, 1000, 128, True, None, "bhld"),
    (1, 8, 2, 1031, 1031, 64, False, None, "bhld"),      # GQA 4:1
    (1, 8, 1, 515, 777, 128, True, None, "blhd"),        # MQA, Lq < Lk causal
    (1, 2, 2, 900, 300, 128, True, None, "bhld"),        # Lq > Lk causal
    (2, 4, 4, 384, 384, 64, False, "pad-bias", "bhld"),
    (2, 4, 4, 391, 391, 128, True, "pad-bias", "blhd"),
    (1, 4, 4, 200, 300, 128, False, "bias-fp32", "bhld"),
    (1, 2, 2, 129, 257, 64, True, "bias-fp32", "bhld"),
    (2, 2, 2, 150, 190, 128, False, "bool", "bhld"),
    (1, 2, 2, 150, 190, 64, True, "bool", "bhld"),
    (2, 4, 4, 300, 300, 64, False, "bool-rows", "bhld"),
    (1, 4, 4, 4096, 4096, 128, True, None, "bhld"),
    (1, 4, 4, 4096, 4096, 64, False, None, "bhld"),
    # more work tiles than SMs: the persistent programs loop over several tiles each
    (2, 8, 8, 2048, 2048, 128, True, None, "blhd"),
    (2, 16, 4, 1500, 1500, 64, False, "pad-bias", "bhld"),
    (2, 8, 8, 1100, 1100, 128, False, "bool", "bhld"),
    # ... non-causal, where a tile's last P.V runs with the next tile's S_0 (the turnover):
    # plain, ragged key ends, GQA, a padding bias
    (4, 16, 16, 2048, 2048, 128, False, None, "bhld"),
    (3, 16, 16, 1000, 1500, 64, False, None, "blhd"),
    (2, 16, 4, 1300, 1700, 128, False, None, "blhd"),
    (4, 8, 8, 1500, 1500, 128, False, "pad-bias", "bhld"),
    # one full key tile and a ragged second (two key loops gave wrong rows there: the launch
    # plan takes one), the shapes next to it, short keys over many tiles
    (2, 4, 4, 200, 200, 64, False, None, "bhld"),
    (8, 16, 16, 1000, 100, 64, False, None, "bhld"),
    (4, 16, 4, 2048, 256, 128, False, "pad-bias", "blhd"),
    (2, 4, 1, 300, 200, 64, False, "pad-bias", "blhd"),
    (2, 4, 4, 200, 200, 128, False, None, "bhld"),
    (2, 4, 4, 300, 256, 64, False, None, "bhld"),
    (2, 4, 4, 300, 257, 64, False, None, "bhld"),
    # row masks added on the tensor cores (BIAS_TC): bool rows, per-head rows, GQA, causal
    (3, 4, 4, 300, 300, 64, False, "pad-bool", "bhld"),
    (2, 4, 4, 1000, 1000, 128, True, "pad-bool", "blhd"),
    (1, 6, 2, 257, 513, 128, True, "head-bias", "blhd"),
    (2, 8, 8, 1100, 1100, 64, True, "head-bias", "bhld"),
    # causal D = 64 on two warpgroups (paired persistent tiles): plain, GQA + padding bias,
    # MQA with Lq < Lk and a bool padding row
    (2, 8, 8, 2048, 2048, 64, True, None, "blhd"),
    (2, 16, 4, 1500, 1500, 64, True, "pad-bias", "bhld"),
    (2, 8, 1, 515, 777, 64, True, "pad-bool", "blhd"),
    # causal D = 64 from Lq = 5k on three warpgroups (192-row blocks): ragged, a padding
    # bias, GQA, Lq < Lk
    (1, 4, 4, 6144, 6144, 64, True, None, "bhld"),
    (1, 4, 2, 6301, 6301, 64, True, "pad-bias", "blhd"),
    (1, 3, 1, 7000, 8000, 64, True, "pad-bool", "bhld"),
]


@pytest.fixture(autouse=True)
def _small_calls_too(monkeypatch):
    """These shapes are small: flash_forward would send them to the Triton kernel (see
    flash._sm90_min_flops); the Gluon kernel is what is tested here."""
    monkeypatch.setenv("ADAATTN_SM90_MIN_GFLOPS", "0")


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_sm90_forward_matches_float64(case, dtype):
    B, Hq, Hkv, Lq, Lk, D, causal, mask_kind, layout = case
    torch.manual_seed(hash(case) % 1000)
    q = _make(B, Hq, Lq, D, dtype, layout)
    k = _make(B, Hkv, Lk, D, dtype, layout)
    v = _make(B, Hkv, Lk, D, dtype, layout)
    mask = _mask(mask_kind, B, Hq, Lq, Lk, dtype)
    scale = 1.0 / math.sqrt(D)
    assert flash._use_sm90(q, k, v, scale, causal), flash_hopper.unsupported(
        q, k, v, scale, torch.cuda.get_device_capability(), causal)
    out = torch.full((B, Hq, Lq, D), float("nan"), device="cuda", dtype=dtype)  # poison
    lse = torch.full((B, Hq, Lq), float("nan"), device="cuda")
    ms = flash._prep_mask(mask, (B, Hq, Lq, Lk), q.device)
    flash_hopper.forward(q, k, v, ms[0], ms[1], ms[2:], causal, scale, out, lse)
    ref, ref_lse = _reference(q, k, v, mask, causal, scale)
    assert not out.isnan().any(), "unwritten or NaN output"
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert _rel(out, ref) < tol
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    if finite.any():   # (a batch whose keys are all masked has no finite lse)
        assert (lse[finite] - ref_lse[finite]).abs().max().item() < 2e-2
    # the public entry point takes the same path (where the planner routes it there)
    has_mask, _, row_bcast, col_bcast = ms[2:]
    if flash._use_sm90(q, k, v, scale, causal):
        out2, _ = flash.flash_forward(q, k, v, attn_mask=mask, is_causal=causal)
        assert torch.equal(out2, out)


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("scale", [None, 0.3, 0.05])
def test_sm90_row_bias_on_tensor_cores_and_in_registers(D, scale, monkeypatch):
    """A (B, 1, 1, Lk) bias in q's dtype is added by the tensor cores (1/scale split in two
    bf16 terms: 0.3 needs both), and in registers with ADAATTN_SM90_BIAS_TC=0: both agree
    with float64, -inf keys included."""
    torch.manual_seed(D)
    B, H, L = 2, 4, 700
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    bias = _mask("pad-bias", B, H, L, L, torch.bfloat16) * 4
    ref, _ = _reference(q, k, v, bias, False, scale or 1 / math.sqrt(D))
    outs = []
    for switch in ("1", "0"):
        monkeypatch.setenv("ADAATTN_SM90_BIAS_TC", switch)
        out, _ = flash.flash_forward(q, k, v, attn_mask=bias, scale=scale)
        assert _rel(out, ref) < 2e-2
        outs.append(out)
    assert _rel(outs[0], outs[1]) < 2e-2


@pytest.mark.gpu
@sm90
def test_sm90_scale_and_repeatability():
    q, k, v = (torch.randn(2, 4, 700, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for scale in (0.02, 0.3):
        out, _ = flash.flash_forward(q, k, v, scale=scale)
        ref, _ = _reference(q, k, v, None, False, scale)
        assert _rel(out, ref) < 2e-2
        again, _ = flash.flash_forward(q, k, v, scale=scale)
        assert torch.equal(out, again)  # no race: bitwise the same on the same inputs


def test_unsupported_reasons(monkeypatch):
    cap = (9, 0)
    q = torch.randn(1, 2, 8, 64)
    reason = flash_hopper.unsupported(q, q, q, 0.125, cap)
    assert reason is not None  # CPU tensors (or no Gluon): never this kernel
    if torch.cuda.is_available() and flash_hopper.AVAILABLE:
        g = torch.randn(1, 2, 8, 64, device="cuda", dtype=torch.float16)
        assert flash_hopper.unsupported(g, g, g, 0.125, (8, 0)).startswith("sm80")
        assert "dtype" in flash_hopper.unsupported(g.float(), g.float(), g.float(), 0.125, cap)
        h = torch.randn(1, 2, 8, 96, device="cuda", dtype=torch.float16)
        assert "head dims" in flash_hopper.unsupported(h, h, h, 0.1, cap)
        assert flash_hopper.unsupported(g, g, g, -1.0, cap) == "scale <= 0"
        odd = torch.randn(1, 2, 8, 65, device="cuda", dtype=torch.float16)[..., :64]
        assert "aligned" in flash_hopper.unsupported(odd, g, g, 0.125, cap)
        monkeypatch.delenv("ADAATTN_SM90_CAUSAL64", raising=False)
        assert flash_hopper.unsupported(g, g, g, 0.125, cap, causal=True) is None
        monkeypatch.setenv("ADAATTN_SM90_CAUSAL64", "0")
        assert "causal" in flash_hopper.unsupported(g, g, g, 0.125, cap, True)
        g128 = torch.randn(1, 2, 8, 128, device="cuda", dtype=torch.float16)
        assert flash_hopper.unsupported(g128, g128, g128, 0.1, cap, causal=True) is None


@pytest.mark.parametrize("flag, expected", [("", True), ("1", True), ("0", False)])
def test_causal64_routing(flag, expected, monkeypatch):
    """Causal D = 64 takes the Gluon kernel (two warpgroups below Lq = 5k, three from there
    on; one key loop with the turnover) unless ADAATTN_SM90_CAUSAL64=0."""
    monkeypatch.setenv("ADAATTN_SM90_CAUSAL64", flag)
    assert flash_hopper._causal64() is expected
    for kind in ("none", "row"):
        for lq, warpgroups in [(0, 2), (2048, 2), (5119, 2), (5120, 3), (16384, 3)]:
            cfg = flash_hopper.config(64, kind, True, lq)
            assert cfg[1] == warpgroups and cfg[8] == 2   # one key loop
        assert flash_hopper.config(128, kind, True, 16384)[1] == 2


@pytest.mark.parametrize("kind", ["none", "row"])
@pytest.mark.parametrize("causal, lq, block_n, warpgroups", [
    (False, 0, 128, 3), (False, 512, 128, 2), (False, 2047, 128, 2), (False, 2048, 128, 3),
    (False, 16384, 128, 3), (True, 0, 128, 2), (True, 512, 64, 2), (True, 1023, 64, 2),
    (True, 1024, 128, 2)])
def test_short_d64_configs(kind, causal, lq, block_n, warpgroups):
    """Short D = 64 launches: not causal below Lq = 2k on two warpgroups (128-row blocks, no
    ragged 192-row one at 512 / 1k), causal below 1k on 64-key tiles."""
    cfg = flash_hopper.config(64, kind, causal, lq)
    assert (cfg[0], cfg[1]) == (block_n, warpgroups)
    assert cfg[8] == (2 if causal else 1)   # the built-in turnover either way


@pytest.mark.parametrize("kind, causal, lq, block_n", [
    (kind, False, lq, None) for kind in ("none", "row", "tile") for lq in (512, 1023)] + [
    (kind, True, lq, None) for kind in ("none", "row", "tile") for lq in (0, 2048, 16384)] + [
    ("tile", True, 512, None), ("none", True, 1, 64), ("none", True, 1023, 64),
    ("none", True, 1024, None), ("row", True, 1, 64), ("row", True, 1024, 64),
    ("row", True, 1535, 64), ("row", True, 1536, None)])
def test_short_d128_configs(kind, causal, lq, block_n):
    """Short causal D = 128 launches run on 64-key tiles, three stages: below Lq = 1k without
    a mask, below 1.5k with a key row; everything else keeps the length-free config
    (``block_n`` None)."""
    cfg = flash_hopper.config(128, kind, causal, lq)
    if block_n is None:
        assert cfg == flash_hopper.config(128, kind, causal)
    else:
        assert cfg[:3] == (block_n, 2, 3) and cfg[4] and cfg[8] == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rows", [1, 2])
def test_bias_tile_layout(dtype, rows):
    """The (B|1, H|1, Lk, 16) tile BIAS_TC reads next to K: the bias of key j in column 0 (and
    1), zeros elsewhere; broadcast dims stay size 1; a bool row becomes 0 / -inf."""
    B, H, Lq, Lk = 3, 4, 5, 37
    bias = torch.randn(B, 1, 1, Lk, dtype=dtype)
    m, ms, *flags = flash._prep_mask(bias, (B, H, Lq, Lk), torch.device("cpu"))
    tile = flash_hopper._bias_tile(m, (B, H, Lq, Lk), ms, False, dtype, rows)
    assert tile.shape == (B, 1, Lk, 16) and tile.dtype == dtype and tile.is_contiguous()
    assert torch.equal(tile[..., 0], bias[:, :, 0, :])
    assert torch.equal(tile[..., 1], bias[:, :, 0, :] if rows == 2 else torch.zeros_like(
        tile[..., 1]))
    assert not tile[..., 2:].any()

    keep = torch.rand(1, H, 1, Lk) > 0.5
    m, ms, *flags = flash._prep_mask(keep, (B, H, Lq, Lk), torch.device("cpu"))
    tile = flash_hopper._bias_tile(m, (B, H, Lq, Lk), ms, True, dtype, rows)
    assert tile.shape == (1, H, Lk, 16)
    expect = torch.where(keep[:, :, 0, :], 0.0, float("-inf")).to(dtype)
    assert torch.equal(tile[..., 0], expect)
    # the bound launch passes the caller's mask (bool as its uint8 view), not the expanded one
    again = flash_hopper._bias_tile(keep.view(torch.uint8), (B, H, Lq, Lk), ms, True, dtype,
                                    rows)
    assert torch.equal(again, tile)


def _tile_masks(is_bool, dtype, device):
    """Key rows in every layout _bias_tile takes: (mask, (B, H, Lq, Lk)); bool ones also as
    their uint8 view (what bound launches pass)."""
    B, H, Lq, Lk = 3, 4, 5, 300   # (Lk over the kernel's 256-key block, not a multiple of it)
    if is_bool:
        rows = {"batch_row": torch.rand(B, 1, 1, Lk, device=device) > 0.3,
                "head_row": torch.rand(1, H, 1, Lk, device=device) > 0.3,
                "key_vector": torch.rand(Lk, device=device) > 0.3,
                "offset_view": (torch.rand(B, 1, Lq, Lk + 3, device=device) > 0.3)[:, :, 2:3, 1:-2]}
        rows["uint8_view"] = rows["batch_row"].view(torch.uint8)
    else:
        def r(*s):
            x = torch.randn(*s, device=device, dtype=dtype)
            x[..., -7:] = float("-inf")   # (padded keys: -inf must come through)
            return x
        rows = {"batch_row": r(B, 1, 1, Lk), "head_row": r(1, H, 1, Lk), "key_vector": r(Lk),
                "offset_view": r(B, 1, Lq, Lk + 3)[:, :, 2:3, 1:-2]}
    return rows, (B, H, Lq, Lk)


@pytest.mark.interpreter
@pytest.mark.parametrize("is_bool", [True, False], ids=["bool", "additive"])
@pytest.mark.parametrize("rows", [1, 2])
def test_bias_tile_kernel_matches_the_ops(is_bool, rows):
    """The tile kernel (here under the interpreter, fp16: its bf16 is not trusted) writes the
    tile the torch ops build, bit for bit, in every mask layout."""
    dtype = torch.float16
    masks, shape = _tile_masks(is_bool, dtype, "cpu")
    for name, mask in masks.items():
        _, ms, *_ = flash._prep_mask(mask.view(torch.bool) if name == "uint8_view" else mask,
                                     shape, torch.device("cpu"))
        got = flash_hopper._bias_tile_by_kernel(mask, shape, ms, is_bool, dtype, rows)
        expect = flash_hopper._bias_tile_by_ops(mask, shape, ms, is_bool, dtype, rows)
        assert got.shape == expect.shape and got.is_contiguous(), name
        assert torch.equal(got, expect), name


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("is_bool", [True, False], ids=["bool", "additive"])
def test_bias_tile_on_cuda_is_one_bound_kernel(dtype, is_bool, monkeypatch):
    """On CUDA _bias_tile runs the kernel, bound after its first launch, and builds the tile
    the ops build (bf16 too); a failing kernel leaves the ops to build it."""
    masks, shape = _tile_masks(is_bool, dtype, "cuda")
    for name, mask in masks.items():
        _, ms, *_ = flash._prep_mask(mask.view(torch.bool) if name == "uint8_view" else mask,
                                     shape, mask.device)
        expect = flash_hopper._bias_tile_by_ops(mask, shape, ms, is_bool, dtype, 2)
        for _ in range(2):   # (the second call through the bound launch)
            assert torch.equal(flash_hopper._bias_tile(mask, shape, ms, is_bool, dtype, 2),
                               expect), name
    assert flash_hopper._TILE_KERNEL_ON and flash_hopper._TILE_LAUNCHES

    def broken(*args, **kwargs):
        raise RuntimeError("no launch")
    monkeypatch.setattr(flash_hopper, "_bias_tile_by_kernel", broken)
    monkeypatch.setattr(flash_hopper, "_TILE_KERNEL_ON", True)   # (restored after the test)
    with pytest.warns(UserWarning, match="bias tile kernel failed"):
        got = flash_hopper._bias_tile(mask, shape, ms, is_bool, dtype, 2)
    assert torch.equal(got, expect) and not flash_hopper._TILE_KERNEL_ON


@pytest.mark.gpu
@sm90
def test_bool_key_mask_tile_is_one_build_bound_or_not(monkeypatch):
    """A forward's first call gets a bool mask as its uint8 view (flash._prep_mask), its bound
    calls get it as it is: the tile kernel sees bool on both, so the build a prebuild job runs
    (the first call's) is the one the bound calls launch, not a second compile inside the
    model's first call. Both write the same output."""
    monkeypatch.setattr(flash_hopper, "_TILE_LAUNCHES", {})
    torch.manual_seed(0)
    B, H, L, D = 2, 4, 384, 64
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    keep = torch.rand(B, 1, 1, L, device="cuda") > 0.3
    keep[..., 0] = True
    m, ms, *flags = flash._prep_mask(keep, (B, H, L, L), q.device)
    out, lse = torch.empty_like(q), torch.empty(B, H, L, device="cuda")
    flash_hopper.forward(q, k, v, m, ms, flags, False, 0.125, out, lse)
    bound = flash_hopper.bind(q, k, v, m, ms, flags, False, 0.125, out, lse)
    assert bound is not None and bound.bias is not None   # (the BIAS_TC path)
    out_bound, lse_bound = torch.empty_like(q), torch.empty_like(lse)
    bound(q, k, v, keep, out_bound, lse_bound)
    assert torch.equal(out_bound, out) and torch.equal(lse_bound, lse)
    assert [key[0] for key in flash_hopper._TILE_LAUNCHES] == [torch.bool]


@pytest.mark.parametrize("layout", ["batch_row", "head_row", "key_vector", "offset_view"])
def test_bias_tile_from_strided_rows(layout):
    """The additive tile copies the row through the caller's strides and storage offset
    (broadcast dims, a 1-D key vector, one query row sliced out of a larger mask)."""
    B, H, Lq, Lk, dtype = 3, 4, 5, 37, torch.float16
    mask = {"batch_row": lambda: torch.randn(B, 1, 1, Lk, dtype=dtype),
            "head_row": lambda: torch.randn(1, H, 1, Lk, dtype=dtype),
            "key_vector": lambda: torch.randn(Lk, dtype=dtype),
            "offset_view": lambda: torch.randn(B, 1, Lq, Lk + 3, dtype=dtype)[:, :, 2:3, 1:-2],
            }[layout]()
    m, ms, *flags = flash._prep_mask(mask, (B, H, Lq, Lk), torch.device("cpu"))
    tile = flash_hopper._bias_tile(mask, (B, H, Lq, Lk), ms, False, dtype, 2)
    nb, nh = {"batch_row": (B, 1), "head_row": (1, H), "key_vector": (1, 1),
              "offset_view": (B, 1)}[layout]
    expect = mask.expand(B, H, Lq, Lk)[:nb, :nh, 0, :]
    assert tile.shape == (nb, nh, Lk, 16) and tile.is_contiguous()
    assert torch.equal(tile[..., 0], expect) and torch.equal(tile[..., 1], expect)
    assert not tile[..., 2:].any()


def test_bias_on_tensor_cores_only_for_rows_in_q_dtype(monkeypatch):
    """BIAS_TC takes (B|1, H|1, 1, Lk) rows, additive in q's dtype or bool; full tiles, column
    broadcasts and wider biases stay on the register path; the switch turns it off."""
    shape = (2, 4, 8, 16)
    q = torch.empty(2, 4, 8, 64, dtype=torch.bfloat16)

    def decide(mask, scale=0.125):
        m, ms, *flags = flash._prep_mask(mask, shape, torch.device("cpu"))
        return flash_hopper._bias_tc(q, m, flags, scale)

    assert decide(torch.zeros(2, 1, 1, 16, dtype=torch.bfloat16))
    assert decide(torch.ones(1, 4, 1, 16, dtype=torch.bool))
    assert not decide(torch.zeros(2, 1, 1, 16, dtype=torch.float32))   # rounding: no
    assert not decide(torch.zeros(2, 4, 8, 16, dtype=torch.bfloat16))  # a full tile
    assert not decide(torch.zeros(2, 1, 8, 1, dtype=torch.bfloat16))   # a column broadcast
    assert not decide(None)
    monkeypatch.setenv("ADAATTN_SM90_BIAS_TC", "0")
    assert not decide(torch.zeros(2, 1, 1, 16, dtype=torch.bfloat16))


def test_config_override_and_q_slots(monkeypatch):
    """ADAATTN_SM90_CONFIG_<D> replaces the launch config; Q slots default to two for a
    persistent launch and one otherwise, or follow an eighth field; the turnover is on for
    launches without a full mask (two key loops non-causal, one causal), or follows a ninth
    field."""
    assert flash_hopper.config(128, "none", False)[4] is True
    assert flash_hopper.config(128, "none", True)[7] == 2
    assert [flash_hopper.config(d, kind, causal)[8] for d in (64, 128)
            for kind in ("none", "row", "tile") for causal in (False, True)] == \
        [1, 2, 1, 2, 0, 0] * 2
    monkeypatch.setenv("ADAATTN_SM90_CONFIG_128", "64,2,3,1,0,24,240")
    assert flash_hopper.config(128, "none", True) == (64, 2, 3, True, False, 24, 240, 1, 2)
    monkeypatch.setenv("ADAATTN_SM90_CONFIG_128", "64,2,3,1,1,24,240,1")
    assert flash_hopper.config(128, "row", False)[7] == 1
    assert flash_hopper.config(128, "row", False)[8] == 1
    monkeypatch.setenv("ADAATTN_SM90_CONFIG_128", "64,2,3,1,1,24,240,2,0")
    assert flash_hopper.config(128, "none", True)[8] == 0


@pytest.mark.skipif(not flash_hopper.AVAILABLE, reason="needs Gluon (triton >= 3.5)")
def test_launch_plan_constexprs_follow_the_kernel_signature(monkeypatch):
    """The launch plan's constexpr values are passed by position on the direct launch path
    and by name on the first launch: both must follow the kernel's parameters."""
    fn = flash_hopper._attn_fwd_sm90
    assert [n for n, p in zip(fn.arg_names, fn.params) if p.is_constexpr] == \
        list(flash_hopper._CONSTEXPRS)
    monkeypatch.setattr(flash_hopper, "_sm_count", lambda index: 132)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    B, H, L = 4, 16, 2048
    # O_TMA: 1 a slab of its own, 2 staged in the Q slot (a bias: no room for the slab); at
    # D = 64 only on two warpgroups (causal below 5k; three would spill)
    for D, causal, bias, o_tma, programs in [(128, False, False, 1, 132),
                                             (128, True, False, 1, 132),
                                             (128, False, True, 2, 132),
                                             (128, True, True, 2, 132),
                                             (64, False, True, 0, 132),
                                             (64, True, False, 1, 132),
                                             (64, True, True, 1, 132)]:
        q = torch.empty(B, H, L, D, dtype=torch.bfloat16)
        mask = torch.zeros(B, 1, 1, L, dtype=torch.bfloat16) if bias else torch.empty(1)
        flags = (True, False, True, False) if bias else (False, False, False, False)
        strides = (L, 0, 0, 1) if bias else (0, 0, 0, 0)
        cfg, n_prog, ints, floats, consts, key, device, _ = flash_hopper._launch_plan(
            q, q, mask, strides, flags, causal, D ** -0.5, q, torch.empty(B, H, L))
        named = dict(zip(flash_hopper._CONSTEXPRS, consts))
        assert (named["HEAD_D"], named["CAUSAL"], named["BIAS_TC"]) == (D, causal, bias)
        assert named["TURNOVER"] == (2 if causal else 1) and named["O_TMA"] == o_tma
        assert n_prog == programs
    q = torch.empty(B, H, L, 128, dtype=torch.bfloat16)
    for switch, o_tma in [("0", 0), ("q", 2)]:   # (unmasked D = 128: 1 by default)
        monkeypatch.setenv("ADAATTN_SM90_O_TMA", switch)
        consts = flash_hopper._launch_plan(q, q, torch.empty(1), (0, 0, 0, 0),
                                           (False, False, False, False), False, 0.125, q,
                                           torch.empty(B, H, L))[4]
        assert dict(zip(flash_hopper._CONSTEXPRS, consts))["O_TMA"] == o_tma


@pytest.mark.parametrize("bh, n_m, programs, block_m, L", [
    (256, 16, 132, 128, 2048),     # 2 warpgroups, 2k: 2048 units of equal work on 132 SMs
    (32, 128, 132, 128, 16384),
    (32, 43, 132, 192, 8192),      # 3 warpgroups: odd n_m, units of unequal work
    (512, 11, 132, 192, 2048),     # (the lone middle blocks would all land on 22 programs)
    (3, 5, 15, 128, 600),          # fewer tiles than SMs: one program per tile
    (1, 1, 1, 128, 5),
    (7, 9, 40, 128, 1100),         # ragged last block
])
def test_causal_schedule(bh, n_m, programs, block_m, L):
    """The persistent causal schedule: every tile exactly once, rows ending in two -1s, every
    program busy, head after head at the start, and no program more than one heaviest tile
    over the mean (the round robin over pairs left 68 of 132 programs a whole unit over)."""
    table = flash_hopper._causal_schedule(bh, n_m, programs, block_m, 128, L, L)
    assert table.dtype == torch.int32 and table.shape[0] == programs
    entries = table[table >= 0]
    assert sorted(entries.tolist()) == list(range(bh * n_m))
    cost = [-(-min((m + 1) * block_m, L) // 128) + flash_hopper._TILE_OVERHEAD
            for m in range(n_m)]
    loads = []
    for row in table.tolist():
        n = sum(x >= 0 for x in row)
        assert n >= 1 and all(x >= 0 for x in row[:n]) and row[n:] == [-1] * (len(row) - n)
        assert len(row) - n >= 2
        loads.append(sum(cost[x % n_m] for x in row[:n]))
    assert max(loads) - sum(loads) / programs <= max(cost)
    unbalanced = flash_hopper._causal_schedule(bh, n_m, programs, block_m, 128, L, L, False)
    assert sorted(unbalanced[unbalanced >= 0].tolist()) == list(range(bh * n_m))
    if bh * ((n_m + 1) // 2) >= 2 * programs:   # round robin first: program p starts on unit p
        n_pairs = (n_m + 1) // 2
        assert [row[0] for row in table.tolist()] == [
            (p // n_pairs) * n_m + n_m - 1 - p % n_pairs for p in range(programs)]


@pytest.mark.parametrize("b, hq, n_m", [(8, 32, 16), (1, 1, 1), (3, 5, 11), (2048, 16, 32)])
def test_packed_schedule_decodes_as_the_kernel_does(b, hq, n_m):
    """Packed entries, decoded with the kernel's shifts (_tile), give back each tile's
    (batch, head, query block); -1s stay."""
    table = flash_hopper._causal_schedule(b * hq, n_m, 7, 128, 128, 128 * n_m, 128 * n_m)
    packed = flash_hopper._pack_schedule(table, n_m, hq)
    assert flash_hopper._packs(b, hq, n_m) and packed.dtype == torch.int32
    mb, hb = flash_hopper._pack_bits(n_m, hq)
    for t, p in zip(table.flatten().tolist(), packed.flatten().tolist()):
        if t < 0:
            assert p == -1
            continue
        assert p >= 0
        assert (p >> (mb + hb), (p >> mb) & ((1 << hb) - 1), p & ((1 << mb) - 1)) == \
            ((t // n_m) // hq, (t // n_m) % hq, t % n_m)
    assert not flash_hopper._packs(1 << 20, 1 << 6, 1 << 6)


def test_launch_plan_schedule(monkeypatch):
    """Persistent causal launches carry a schedule (its width as an int argument), others
    none; the table is built once per shape."""
    monkeypatch.setattr(flash_hopper, "_sm_count", lambda index: 132)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    q = torch.empty(8, 32, 2048, 64, dtype=torch.bfloat16)
    plan = flash_hopper._launch_plan(q, q, torch.empty(1), (0, 0, 0, 0),
                                     (False, False, False, False), True, 0.125, q,
                                     torch.empty(8, 32, 2048))
    schedule, ints = plan[7], plan[2]
    assert schedule == ((256, 16, 132, 128, 128, 2048, 2048, True), 32)
    assert ints[-1] == flash_hopper._causal_schedule(*schedule[0]).shape[1] == 34
    # the tile arguments carry the packed entries' field widths: 16 blocks, 32 heads
    assert (ints[9], ints[11]) == (4, 5)
    plan = flash_hopper._launch_plan(q, q, torch.empty(1), (0, 0, 0, 0),
                                     (False, False, False, False), False, 0.125, q,
                                     torch.empty(8, 32, 2048))
    assert plan[7] == () and plan[2][-1] == 0


@pytest.mark.gpu
@sm90
def test_sm90_causal_schedule_under_cuda_graph():
    """A causal launch captured in a CUDA graph replays with its schedule table, also where
    the table for the shape is first built during the capture (copied from pinned memory that
    stays alive)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1500, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = 0.125
    ms = flash._prep_mask(None, (2, 4, 1500, 1500), q.device)
    out = torch.empty_like(q)
    lse = torch.empty(2, 4, 1500, device="cuda")
    flash_hopper.forward(q, k, v, ms[0], ms[1], ms[2:], True, scale, out, lse)   # compile
    for batch in (2, 3):   # 3: a shape whose table is built inside the capture
        qb, kb, vb = (torch.randn(batch, 4, 1500, 64, device="cuda", dtype=torch.bfloat16)
                      for _ in range(3))
        ob = torch.empty_like(qb)
        lb = torch.empty(batch, 4, 1500, device="cuda")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            flash_hopper.forward(qb, kb, vb, ms[0], ms[1], ms[2:], True, scale, ob, lb)
        for _ in range(2):
            for t in (qb, kb, vb):
                t.normal_()
            ob.fill_(float("nan"))
            graph.replay()
            ref, _ = _reference(qb, kb, vb, None, True, scale)
            assert _rel(ob, ref) < 2e-2


def _random_cases(n, seed):
    """Seeded random shapes for the Gluon forward: lengths 1..2500 on both sides, GQA / MQA,
    both head dims, causal or not, no mask or a padding row (the kinds the fast path takes)."""
    import random
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        D = rng.choice((64, 128))
        Hkv = rng.choice((1, 2, 4))
        Hq = Hkv * rng.choice((1, 2, 4))
        B = rng.choice((1, 2, 3))
        Lq, Lk = rng.randint(1, 2500), rng.randint(1, 2500)
        causal = rng.random() < 0.4
        mask = rng.choice((None, None, "pad-bias", "pad-bool"))
        cases.append((B, Hq, Hkv, Lq, Lk, D, causal, mask, rng.choice(("bhld", "blhd"))))
    return cases


@pytest.mark.gpu
@sm90
@pytest.mark.parametrize("case", _random_cases(24, 2026_11_26), ids=lambda c: "-".join(map(str, c)))
def test_sm90_forward_random_shapes(case):
    """Random shapes against the float64 reference, bf16 (several programs' worth of tiles
    for the longer ones: the persistent loops, the turnover, ragged ends on both sides)."""
    B, Hq, Hkv, Lq, Lk, D, causal, mask_kind, layout = case
    dtype = torch.bfloat16
    q = _make(B, Hq, Lq, D, dtype, layout)
    k = _make(B, Hkv, Lk, D, dtype, layout)
    v = _make(B, Hkv, Lk, D, dtype, layout)
    mask = _mask(mask_kind, B, Hq, Lq, Lk, dtype)
    scale = 1.0 / math.sqrt(D)
    out = torch.full((B, Hq, Lq, D), float("nan"), device="cuda", dtype=dtype)
    lse = torch.full((B, Hq, Lq), float("nan"), device="cuda")
    ms = flash._prep_mask(mask, (B, Hq, Lq, Lk), q.device)
    flash_hopper.forward(q, k, v, ms[0], ms[1], ms[2:], causal, scale, out, lse)
    ref, ref_lse = _reference(q, k, v, mask, causal, scale)
    assert not out.isnan().any(), "unwritten or NaN output"
    assert _rel(out, ref) < 2e-2
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    if finite.any():
        assert (lse[finite] - ref_lse[finite]).abs().max().item() < 2e-2


@pytest.mark.skipif(not flash_hopper.AVAILABLE, reason="needs Gluon (triton >= 3.5)")
@pytest.mark.parametrize("Lk, turnover", [(100, 2), (128, 2), (129, 2), (200, 2), (255, 2),
                                          (256, 1), (300, 1), (4096, 1)])
def test_two_key_loops_only_where_every_tile_runs_the_first(Lk, turnover, monkeypatch):
    """Two key loops gave wrong rows for 128 < Lk < 256 (an empty unmasked loop before a
    masked one): the launch plan takes them only for Lk >= 2 BLOCK_N (128 at both head dims),
    one loop below that."""
    monkeypatch.setattr(flash_hopper, "_sm_count", lambda index: 132)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for D in (64, 128):
        q = torch.empty(2, 4, 300, D, dtype=torch.bfloat16)
        k = torch.empty(2, 4, Lk, D, dtype=torch.bfloat16)
        consts = flash_hopper._launch_plan(q, k, torch.empty(1), (0, 0, 0, 0),
                                           (False, False, False, False), False, 0.125, q,
                                           torch.empty(2, 4, 300))[4]
        assert dict(zip(flash_hopper._CONSTEXPRS, consts))["TURNOVER"] == turnover


def _bundled_ptxas():
    import triton
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                       "bin", "ptxas"))


@pytest.mark.skipif(not flash_hopper.AVAILABLE, reason="this triton has no Gluon Hopper API")
@pytest.mark.skipif(not _bundled_ptxas(), reason="this triton bundles no ptxas")
@pytest.mark.parametrize("script, args, builds", [
    ("sm90_offline_compile.py", ["--dims", "128", "--variants", "plain,causal"], 2),
    # (the 8-bit pre-pass for bf16 and fp32 inputs, then the kernel non-causal and causal)
    ("attn8_sm90_offline_compile.py", ["--dims", "128"], 4),
])
def test_gluon_kernels_build_for_sm90_with_the_installed_triton(script, args, builds):
    """The Gluon kernels (dense and 8-bit) and the 8-bit pre-pass go through the installed
    triton's whole pipeline to an sm90 binary, no GPU needed: Gluon's API moves between
    releases (triton 3.7 renamed the bulk tensor copies), and a kernel that no longer builds
    would only show on a Hopper GPU, as a warning and the slower Triton-language kernel; the
    interpreter runs what the compiler may reject. (In a process of its own: this one runs
    triton's interpreter.)"""
    root = os.path.join(os.path.dirname(__file__), "..")
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, os.path.join(root, "scripts", script), *args],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    built = [line for line in run.stdout.splitlines() if "regs=" in line]
    assert "FAILED" not in run.stdout and len(built) == builds, run.stdout[-3000:]
