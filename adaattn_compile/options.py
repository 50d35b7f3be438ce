"""Backend options: parsed and validated once, so that a typo fails loudly and names itself."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

POLICIES = ("exact", "balanced", "fast")
POLICY_ALIASES = {"quality": "exact", "speed": "fast"}
INNER_COMPILERS = ("inductor", "aot_eager", "eager")
PRECISIONS = ("auto", "input", "fp32", "tf32", "bf16", "fp16", "int8")
# "fp8": the older name of the 8-bit kernel's precision (its products are INT8, see
# kernels/attn8.py for why)
PRECISION_ALIASES = {"fp8": "int8"}
KERNELS = ("auto", "triton", "reference")

# Per-site relative L2 error budget each policy allows its approximations.
DEFAULT_TOLERANCE = {"exact": 0.0, "balanced": 1e-2, "fast": 3e-2}
# The low-rank path's crossovers with the dense kernel (H100, bf16, D = 128, benchmarks/
# RESULTS.md "issue 5"): it runs below neither many queries or keys nor this much forward work
# (4 B H Lq Lk D, halved when causal). Its cost has a fixed part (five kernel launches and a
# check's worth of host time, ~0.3 ms a call): at 64 heads it lost at L = 2048 (0.74x cuDNN)
# and won at 4096 (1.70x); at 16 heads it lost at 6144 (309 GFLOP, 0.78x) and won at 8192
# (550 GFLOP, 3.07x); causal at 16 heads it won from 12288 (618 GFLOP, 1.82x).
DEFAULT_MIN_SEQ_LEN = 4096
DEFAULT_LOW_RANK_MIN_GFLOPS = 400.0
RANKS = ("auto", "dense", "low")
# Forward GFLOP (4 B H Lq Lk D, halved when causal) under which a CUDA site with static shapes
# stays torch's SDPA: our op's host cost per call (tens of microseconds) outweighs what its
# kernels save on calls this small (all-MiniLM-L6-v2 at L = 512, 0.4 GFLOP a call: 0.81x
# stock; GPT at L = 1024, 1.6: 0.83x; Llama-1B's 4.3 at L = 1024 already gains: 1.28x; H100,
# eighth session).
DEFAULT_SMALL_CALL_GFLOPS = 2.0
# Where precision="auto" offers the 8-bit kernel: None = nowhere. On the H100 the whole 8-bit
# forward (pre-pass + the sm90 kernel) measured slower than the dense bf16 kernel up to 8k and
# level with it at 16k (causal; 6 % ahead not causal: benchmarks/RESULTS.md, twenty-first
# session), so it is opt-in:
# int8_min_seq_len=N offers it (checked on sampled rows, as every lower precision is) where
# min(q_len, k_len) >= N; precision="int8" forces it.
DEFAULT_INT8_MIN_SEQ_LEN = None


class OptionError(ValueError):
    """A bad option passed to the adaattn backend or API."""


class AttentionInputError(ValueError, RuntimeError):
    """Tensors ``adaattn_compile.attention`` cannot take. A RuntimeError as well, as the error
    ``F.scaled_dot_product_attention`` raises for the same inputs is, so code that catches
    SDPA's errors catches ours."""


def canonical_policy(policy: Any, name: str = "policy") -> str:
    if isinstance(policy, str):
        policy = POLICY_ALIASES.get(policy, policy)
        if policy in POLICIES:
            return policy
    allowed = ", ".join(POLICIES + tuple(POLICY_ALIASES))
    raise OptionError(f"adaattn: bad value {policy!r} for option '{name}'; allowed: {allowed}")


@dataclasses.dataclass(frozen=True)
class Options:
    policy: str = "balanced"
    tolerance: float = DEFAULT_TOLERANCE["balanced"]
    min_seq_len: int = DEFAULT_MIN_SEQ_LEN
    inner: str = "inductor"
    precision: str = "auto"
    rank: str = "auto"  # "auto", "dense", or "low" to force the low-rank path on every head
    kernel: str = "auto"
    small_call_gflops: float = DEFAULT_SMALL_CALL_GFLOPS
    low_rank_min_gflops: float = DEFAULT_LOW_RANK_MIN_GFLOPS
    int8_min_seq_len: Optional[int] = DEFAULT_INT8_MIN_SEQ_LEN

    @staticmethod
    def parse(options: Mapping[str, Any] | None = None, **overrides: Any) -> "Options":
        raw = dict(options or {})
        raw.update(overrides)
        known = {f.name for f in dataclasses.fields(Options)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise OptionError(
                f"adaattn: unknown option(s) {', '.join(repr(k) for k in unknown)}; "
                f"allowed: {', '.join(sorted(known))}")
        policy = canonical_policy(raw.get("policy", "balanced"))
        tolerance = raw.get("tolerance", DEFAULT_TOLERANCE[policy])
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
            raise OptionError(f"adaattn: bad value {tolerance!r} for option 'tolerance'; "
                              "allowed: a number in [0, 1) (relative L2 error)")
        min_seq_len = raw.get("min_seq_len", DEFAULT_MIN_SEQ_LEN)
        if isinstance(min_seq_len, bool) or not isinstance(min_seq_len, int) or min_seq_len < 0:
            raise OptionError(f"adaattn: bad value {min_seq_len!r} for option 'min_seq_len'; "
                              "allowed: an int >= 0")
        inner = raw.get("inner", "inductor")
        if inner not in INNER_COMPILERS:
            raise OptionError(f"adaattn: bad value {inner!r} for option 'inner'; "
                              f"allowed: {', '.join(INNER_COMPILERS)}")
        precision = raw.get("precision", "auto") or "auto"
        precision = PRECISION_ALIASES.get(precision, precision) \
            if isinstance(precision, str) else precision
        if precision not in PRECISIONS:
            raise OptionError(f"adaattn: bad value {precision!r} for option 'precision'; "
                              f"allowed: {', '.join(PRECISIONS + tuple(PRECISION_ALIASES))}")
        rank = raw.get("rank", "auto") or "auto"
        if not isinstance(rank, str) or rank not in RANKS:
            raise OptionError(f"adaattn: bad value {rank!r} for option 'rank'; allowed: "
                              f"{', '.join(RANKS)} (the low-rank path's rank is head_dim + 1)")
        kernel = raw.get("kernel", "auto") or "auto"
        if kernel not in KERNELS:
            raise OptionError(f"adaattn: bad value {kernel!r} for option 'kernel'; "
                              f"allowed: {', '.join(KERNELS)}")
        small = raw.get("small_call_gflops", DEFAULT_SMALL_CALL_GFLOPS)
        if isinstance(small, bool) or not isinstance(small, (int, float)) or not small >= 0:
            raise OptionError(f"adaattn: bad value {small!r} for option 'small_call_gflops'; "
                              "allowed: a number >= 0 (0: every site through our op)")
        low_gflops = raw.get("low_rank_min_gflops", DEFAULT_LOW_RANK_MIN_GFLOPS)
        if isinstance(low_gflops, bool) or not isinstance(low_gflops, (int, float)) or \
                not low_gflops >= 0:
            raise OptionError(f"adaattn: bad value {low_gflops!r} for option "
                              "'low_rank_min_gflops'; allowed: a number >= 0 (forward GFLOP a "
                              "call needs before the low-rank path is tried)")
        int8_len = raw.get("int8_min_seq_len", DEFAULT_INT8_MIN_SEQ_LEN)
        if int8_len is not None and (isinstance(int8_len, bool) or not isinstance(int8_len, int)
                                     or int8_len < 0):
            raise OptionError(f"adaattn: bad value {int8_len!r} for option 'int8_min_seq_len'; "
                              "allowed: None (the 8-bit kernel only where precision='int8') "
                              "or an int >= 0")
        return Options(policy, float(tolerance), min_seq_len, inner, precision, rank, kernel,
                       float(small), float(low_gflops), int8_len)

    def describe(self) -> str:
        return (f"policy={self.policy} tolerance={self.tolerance:g} min_seq_len={self.min_seq_len} "
                f"inner={self.inner} precision={self.precision} rank={self.rank} kernel={self.kernel} "
                f"small_call_gflops={self.small_call_gflops:g} "
                f"low_rank_min_gflops={self.low_rank_min_gflops:g} "
                f"int8_min_seq_len={self.int8_min_seq_len}")
