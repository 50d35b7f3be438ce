"""The planner: (device, dtype, shapes, policy, options) -> Plan.

Pure: it takes plain values and returns a frozen Plan, so that the same function decides at
compile time (for ``explain``, from fake tensors) and at run time (from real tensors), and
can be tested under any mocked device capability. It never touches torch state.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from .options import Options

# Dtype names the planner understands (strings keep it free of torch).
_PRECISION_OF_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    type: str                                  # "cpu", "cuda", ...
    capability: Optional[Tuple[int, int]] = None  # CUDA compute capability, None elsewhere
    allow_tf32: bool = False                   # torch's float32 matmul precision allows tf32

    def describe(self) -> str:
        if self.capability is None:
            return self.type
        return f"{self.type} sm{self.capability[0]}{self.capability[1]}"


@dataclasses.dataclass(frozen=True)
class Problem:
    """What the planner needs to know about one call of one site."""
    dtype: str            # torch dtype name without "torch.", e.g. "float16"
    q_len: int
    k_len: int
    head_dim: int
    v_head_dim: int
    mask: Optional[str]   # None | "bool" | "additive"
    causal: bool
    dropout_p: float
    gqa_groups: int = 1
    kernel_unsupported: Optional[str] = None  # why the Triton kernel can't take it, if it can't
    lowrank_unsupported: Optional[str] = None  # why the low-rank kernel can't, if it can't
    training: bool = False   # gradients will be taken (the low-rank path is inference-only)


@dataclasses.dataclass(frozen=True)
class Plan:
    kernel: str                 # "triton" | "reference" ("sdpa": see small_call)
    precision: str              # "fp32" | "tf32" | "bf16" | "fp16" | "fp64"
    rank: str                   # "dense", "auto" (low rank where it verifies), "low" (forced)
    seq_bucket: int
    guards: Tuple[str, ...]
    reason: str                 # why this kernel
    tolerance: float = 0.0      # relative L2 the run-time low-rank check allows
    low_rank_min_flops: float = 0.0   # forward work a call needs before low rank is tried

    def describe(self) -> str:
        return f"kernel={self.kernel} precision={self.precision} rank={self.rank} ({self.reason})"


def seq_bucket(length: int) -> int:
    """Power-of-two bucket of a sequence length: plans are cached and guarded per bucket."""
    bucket = 1
    while bucket < length:
        bucket *= 2
    return bucket


def plan(device: DeviceInfo, problem: Problem, options: Options) -> Plan:
    bucket = seq_bucket(max(problem.q_len, problem.k_len))
    guards = [f"device={device.describe()}", f"dtype={problem.dtype}",
              f"seq_bucket={bucket}", f"policy={options.policy}"]
    precision = _PRECISION_OF_DTYPE.get(problem.dtype, problem.dtype)
    if precision == "fp32" and device.type == "cuda" and device.allow_tf32:
        precision = "tf32"

    kernel, reason = _choose_kernel(device, problem, options)
    if kernel == "triton" and device.capability is not None:
        guards.append("capability>=sm80")
    rank, why_dense = _choose_rank(problem, options, kernel)
    if rank != "dense":
        guards.append(f"min(q_len,k_len)>={options.min_seq_len} and "
                      f"GFLOP>={options.low_rank_min_gflops:g}: low rank where sampled rows "
                      f"verify within {options.tolerance:g}")
    elif why_dense is not None:
        guards.append(f"rank dense: {why_dense}")
    return Plan(kernel=kernel, precision=precision, rank=rank, seq_bucket=bucket,
                guards=tuple(guards), reason=reason, tolerance=options.tolerance,
                low_rank_min_flops=options.low_rank_min_gflops * 1e9)


def _choose_rank(problem: Problem, options: Options, kernel: str):
    """(rank, why not low rank): "auto" lets the run-time check route each head, "low" forces
    the low-rank path on every head (experiments), "dense" is exact. The low-rank path runs on
    our Triton kernel only, for inference, at lengths of at least ``min_seq_len``; the op also
    skips it for calls under ``low_rank_min_gflops`` of forward work (the batch is not part
    of the plan). Below both the dense kernel is as fast: the crossovers measured on the
    H100."""
    if options.rank == "dense":
        return "dense", None
    if options.rank == "auto" and options.tolerance <= 0:
        return "dense", f"policy {options.policy}, tolerance 0"
    if kernel != "triton":
        return "dense", "no Triton kernel"
    if problem.lowrank_unsupported is not None:
        return "dense", problem.lowrank_unsupported
    if problem.training:
        return "dense", "gradients taken (the low-rank path is inference-only)"
    if min(problem.q_len, problem.k_len) < options.min_seq_len:
        return "dense", f"min(q_len,k_len)<{options.min_seq_len}"
    return options.rank, None


def forward_flops(q_shape, k_len: int, causal: bool = False) -> float:
    """Forward FLOPs of one call: 4 B H Lq Lk D (two products), halved when causal. ``q_shape``
    is q's shape, any number of leading dims."""
    rows = 1
    for n in q_shape[:-1]:
        rows *= int(n)
    flops = 4.0 * rows * int(k_len) * int(q_shape[-1])
    return flops / 2 if causal else flops


def small_call(device: DeviceInfo, problem: Problem, options: Options, gflops: float,
               sdpa_takes_it: bool) -> Optional[str]:
    """Compile time, static shapes: why a site should stay torch's SDPA rather than become our
    op, or None. Only where our Triton kernel would run it (CUDA, kernel 'auto') and the call
    does under ``options.small_call_gflops`` of forward work: there torch's SDPA (cuDNN,
    FlashAttention) runs it as fast, and our op's host cost per call is what remains.
    ``sdpa_takes_it``: the call's mask and dropout are ones torch's SDPA takes as they are."""
    if options.kernel != "auto" or not sdpa_takes_it or gflops >= options.small_call_gflops:
        return None
    if _choose_kernel(device, problem, options)[0] != "triton":
        return None
    return (f"{gflops:.2g} GFLOP a call < small_call_gflops={options.small_call_gflops:g}: "
            "torch's SDPA, our op's host cost would exceed what its kernel saves")


def _choose_kernel(device: DeviceInfo, problem: Problem, options: Options):
    if options.kernel == "reference":
        return "reference", "forced by kernel='reference'"
    if options.kernel != "triton" and device.type != "cuda":
        return "reference", f"no Triton kernel on {device.type}"
    if problem.kernel_unsupported is not None:
        return "reference", problem.kernel_unsupported
    if options.kernel == "triton":
        return "triton", "forced by kernel='triton'"
    if device.capability is None or device.capability < (8, 0):
        return "reference", f"{device.describe()} < sm80"
    if problem.dtype not in ("float16", "bfloat16", "float32"):
        return "reference", f"dtype {problem.dtype}"
    return "triton", "dense flash kernel"
