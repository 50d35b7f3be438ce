"""The planner is pure: decisions under mocked devices and dtypes."""
import pytest

from adaattn_compile.options import Options
from adaattn_compile.planner import DeviceInfo, Problem, plan, seq_bucket

CPU = DeviceInfo("cpu")
SM75 = DeviceInfo("cuda", (7, 5))
SM80 = DeviceInfo("cuda", (8, 0))
SM89 = DeviceInfo("cuda", (8, 9))
SM90 = DeviceInfo("cuda", (9, 0), allow_tf32=True)


def problem(dtype="float16", lq=2048, lk=2048, unsupported=None, **kw):
    return Problem(dtype=dtype, q_len=lq, k_len=lk, head_dim=64, v_head_dim=64, mask=None,
                   causal=False, dropout_p=0.0, kernel_unsupported=unsupported, **kw)


@pytest.mark.parametrize("device,dtype,kernel,precision", [
    (CPU, "float32", "reference", "fp32"),
    (CPU, "bfloat16", "reference", "bf16"),
    (SM75, "float16", "reference", "fp16"),
    (SM80, "float16", "triton", "fp16"),
    (SM80, "bfloat16", "triton", "bf16"),
    (SM80, "float32", "reference", "fp32"),   # no tf32: Triton's fp32 products are slow
    (SM89, "float16", "triton", "fp16"),
    (SM90, "bfloat16", "triton", "bf16"),
    (SM90, "float32", "triton", "tf32"),
    (SM90, "float64", "reference", "fp64"),
])
def test_kernel_and_precision_by_device_and_dtype(device, dtype, kernel, precision):
    chosen = plan(device, problem(dtype), Options())
    # (L = 2048 is under min_seq_len: the low-rank path is not offered; test_lowrank.py)
    assert (chosen.kernel, chosen.precision, chosen.rank) == (kernel, precision, "dense")
    assert f"dtype={dtype}" in chosen.guards and "seq_bucket=2048" in chosen.guards


def test_unsupported_shapes_take_the_reference_path_with_the_reason():
    chosen = plan(SM90, problem(unsupported="head dim 512 > 256"), Options())
    assert chosen.kernel == "reference" and chosen.reason == "head dim 512 > 256"


def test_forced_kernels():
    assert plan(CPU, problem(), Options.parse({"kernel": "triton"})).kernel == "triton"
    assert plan(SM90, problem(), Options.parse({"kernel": "reference"})).kernel == "reference"


def test_min_seq_len_guard_is_shown():
    chosen = plan(SM90, problem(lq=100, lk=100), Options.parse({"min_seq_len": 512}))
    assert "rank dense: min(q_len,k_len)<512" in chosen.guards and chosen.rank == "dense"


@pytest.mark.parametrize("length,bucket", [(1, 1), (2, 2), (3, 4), (1000, 1024), (1024, 1024)])
def test_seq_bucket(length, bucket):
    assert seq_bucket(length) == bucket


def test_fp32_without_tf32_plans_the_reference_path_and_small_calls_stay_sdpa():
    from adaattn_compile.planner import small_call
    sm90_ieee = DeviceInfo("cuda", (9, 0))
    chosen = plan(sm90_ieee, problem("float32"), Options())
    assert chosen.kernel == "reference" and "Triton's full-precision fp32" in chosen.reason
    assert plan(SM90, problem("float32"), Options()).kernel == "triton"   # tf32 allowed
    assert small_call(sm90_ieee, problem("float32"), Options(), 0.5, True) is not None
    assert small_call(sm90_ieee, problem("float64"), Options(), 0.5, True) is None
