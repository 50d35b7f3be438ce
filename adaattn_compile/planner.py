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
    int8_unsupported: Optional[str] = None   # why the 8-bit kernel can't, if it can't
    # max |q * scale|, |k|, |v| of the call (measured at run time for fp32 inputs; None where
    # unknown, as at compile time): fp16 is a candidate only where they fit
    amax: Optional[Tuple[float, float, float]] = None


@dataclasses.dataclass(frozen=True)
class Plan:
    kernel: str                 # "triton" | "reference" ("sdpa": see small_call)
    precision: str              # "int8" | "fp16" | "bf16" | "tf32" | "fp32" | "fp64": the first
                                # choice; the run-time check may step up ``precisions``
    rank: str                   # "dense", "auto" (low rank where it verifies), "low" (forced)
    seq_bucket: int
    guards: Tuple[str, ...]
    reason: str                 # why this kernel
    tolerance: float = 0.0      # relative L2 the run-time low-rank check allows
    low_rank_min_flops: float = 0.0   # forward work a call needs before low rank is tried
    # the precision ladder, cheapest first; the last is the inputs' own (exact) precision.
    # More than one entry: each lower rung is checked on sampled rows when first used and
    # every N calls, and a check above ``tolerance`` demotes the site to the next rung
    precisions: Tuple[str, ...] = ()
    precision_forced: bool = False    # precision=... named: measured, never demoted

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
    kernel, reason = _choose_kernel(device, problem, options)
    if kernel == "triton" and device.capability is not None:
        guards.append("capability>=sm80")
    triton_ok = kernel == "triton" or reason == _FP32_IEEE
    ladder, forced, why_precision = _choose_precision(device, problem, options,
                                                      "triton" if triton_ok else kernel)
    if len(ladder) > 1:
        guards.append(f"precision {'>'.join(ladder)}: {why_precision}")
    elif why_precision:
        guards.append(f"precision {ladder[0]}: {why_precision}")
    rank, why_dense = _choose_rank(problem, options, kernel)
    if rank != "dense":
        guards.append(f"min(q_len,k_len)>={options.min_seq_len} and "
                      f"GFLOP>={options.low_rank_min_gflops:g}: low rank where sampled rows "
                      f"verify within {options.tolerance:g}")
    elif why_dense is not None:
        guards.append(f"rank dense: {why_dense}")
    return Plan(kernel=kernel, precision=ladder[0], rank=rank, seq_bucket=bucket,
                guards=tuple(guards), reason=reason, tolerance=options.tolerance,
                low_rank_min_flops=options.low_rank_min_gflops * 1e9, precisions=ladder,
                precision_forced=forced)


# fp32 inputs are cast to fp16 only where max |q * scale|, |k| and |v| stay under this: fp16's
# largest value is 65504, and the headroom covers inputs that grow between two range checks
FP16_INPUT_MAX = 2.0 ** 14


def input_precision(device: DeviceInfo, problem: Problem) -> str:
    """The precision the inputs' own dtype computes at: exact for this call (fp32 is tf32
    where torch allows tf32 matmuls, as torch's own attention would run it)."""
    precision = _PRECISION_OF_DTYPE.get(problem.dtype, problem.dtype)
    if precision == "fp32" and device.type == "cuda" and device.allow_tf32:
        precision = "tf32"
    return precision


def _choose_precision(device: DeviceInfo, problem: Problem, options: Options, kernel: str):
    """(ladder, forced, why): the precisions this site may run at, cheapest first, ending with
    the input's own. Guards: no bf16 below sm80, no 8-bit kernel below sm89, fp16 only where
    the measured ranges fit, nothing below the input precision under a zero tolerance
    (``exact``), for training, below ``min_seq_len``, or off CUDA (the reference path gains
    nothing from a cast)."""
    exact = input_precision(device, problem)
    wanted = options.precision
    if wanted == "input":
        return (exact,), False, "precision='input'"
    if wanted != "auto":
        if problem.training and wanted != exact:
            # (the backward differentiates the exact attention with the forward's out and lse)
            return (exact,), False, f"precision={wanted} unavailable: gradients taken"
        if wanted == exact or (wanted in ("fp32", "tf32") and exact in ("fp32", "tf32")):
            return (exact,), False, "the input's own precision"
        why = _unavailable(wanted, device, problem, kernel)
        if why is not None:
            return (exact,), False, f"precision={wanted} unavailable: {why}"
        return (wanted, exact), True, f"forced by precision={wanted}, measured, not demoted"
    # (no guard text where the rank's guard already says why: a zero tolerance, training,
    # below min_seq_len)
    if (options.tolerance <= 0 or problem.training or device.type != "cuda"
            or min(problem.q_len, problem.k_len) < options.min_seq_len):
        return (exact,), False, ""
    ladder = []
    if (options.int8_min_seq_len is not None
            and min(problem.q_len, problem.k_len) >= options.int8_min_seq_len
            and _unavailable("int8", device, problem, kernel) is None):
        ladder.append("int8")
    if exact in ("fp32", "tf32"):
        for candidate in ("fp16", "bf16"):
            if _unavailable(candidate, device, problem, kernel) is None:
                ladder.append(candidate)
                break
    why = f"each lower one checked on sampled rows within {options.tolerance:g}"
    if "bf16" in ladder and problem.amax is None:
        why += "; fp16 instead of bf16 where the inputs' measured range fits"
    ladder.append(exact)
    return tuple(ladder), False, why


def _unavailable(precision: str, device: DeviceInfo, problem: Problem, kernel: str):
    """Why ``precision`` can't run this call (None if it can)."""
    cap = device.capability
    if precision in ("fp32", "tf32") and problem.dtype in ("float16", "bfloat16"):
        return "inputs are already 16-bit: no gain"
    if precision == "tf32":
        if not device.allow_tf32:
            return "tf32 follows torch.set_float32_matmul_precision"
        return None
    if problem.dtype not in ("float16", "bfloat16", "float32"):
        return f"dtype {problem.dtype}"
    if kernel != "triton":
        return "no Triton kernel (the reference path computes in fp32 whatever the inputs)"
    if problem.dropout_p > 0 and precision == "int8":
        return "dropout"
    if precision == "bf16":
        if cap is not None and cap < (8, 0):
            return f"bf16 needs sm80 ({device.describe()})"
        return None
    if precision == "fp16":
        if problem.amax is None:
            return "input ranges not measured"
        if max(problem.amax) >= FP16_INPUT_MAX or any(a != a for a in problem.amax):
            return f"input range {max(problem.amax):.3g} >= {FP16_INPUT_MAX:g}"
        return None
    if precision == "int8":
        if cap is not None and cap < (8, 9):
            return f"8-bit kernel needs sm89 ({device.describe()})"
        if problem.training:
            return "gradients taken (inference only)"
        if problem.int8_unsupported is not None:
            return problem.int8_unsupported
        return None
    return f"unknown precision {precision}"


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
    kernel, why = _choose_kernel(device, problem, options)
    if kernel != "triton" and why != _FP32_IEEE:   # (fp32 without tf32: SDPA is faster still)
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
    if problem.dtype == "float32" and not device.allow_tf32:
        return "reference", _FP32_IEEE
    return "triton", "dense flash kernel"


# Triton's full-precision fp32 products (tf32 off, torch's default) run off the tensor cores:
# the dense kernel ran L = 4096, D = 128 in 594 ms against 11.9 for torch's SDPA (H100,
# seventeenth session), so exact fp32 stays on the reference path (on CUDA torch's
# memory-efficient kernel: 11.96 ms); the cheaper rungs still run on ours.
_FP32_IEEE = ("fp32 without tf32: the reference path (Triton's full-precision fp32 products "
              "are slow)")
