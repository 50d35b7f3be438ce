"""Masks that arrive at run time, proven causal (or empty) once per mask tensor.

The pass proves a mask causal when the graph builds it from constants (see
``passes.match.causal_kind``). A mask that enters the graph as an input can't be proven there:
HF models under torch < 2.14 build their causal mask as a (B, 1, L, L) tensor while compiling
(they pass ``is_causal`` only when not compiling), and graph pieces hand it on as an input —
DDP's optimizer splits the forward at bucket bounds and FSDP2 breaks the graph at every
sharded block, so every decoder layer's graph receives the mask from the first one. Read
through the mask, a causal attention does twice the work (no block above the diagonal is
skipped) and reads L² mask entries per head.

So the op checks such a mask once: the check reads the mask and waits for the answer (one
device sync), and the answer is kept for that tensor object and its version counter (an
in-place write bumps it), so that the other layers of the step, and the backward, reuse it.
Only masks of shape (.., L, L) with L >= MIN_LEN are checked (there a causal skip halves the
work); never during CUDA graph capture (no sync allowed there) nor for inference-mode tensors
(they keep no version counter).
"""
from __future__ import annotations

import threading
import weakref
from typing import Optional

import torch

MIN_LEN = 128
_MAX_ENTRIES = 16   # distinct live masks remembered (a step passes one or two)

_lock = threading.Lock()
# id(mask) -> (weakref to the mask, its version when checked, kind); the weakref tells a live
# object from a new one that reuses a dead one's id
_proofs: "dict[int, tuple]" = {}


def _checkable(mask: torch.Tensor, lq: int, lk: int) -> bool:
    if lq != lk or lq < MIN_LEN or mask.dim() < 2 or mask.shape[-2:] != (lq, lk):
        return False
    if mask.requires_grad or mask.is_inference():
        return False
    if mask.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return mask.dtype == torch.bool or mask.is_floating_point()


def run_time_kind(mask: Optional[torch.Tensor], lq: int, lk: int) -> Optional[str]:
    """'causal' if ``mask`` is SDPA's top-left causal mask (bool keep-mask, or additive with 0
    kept and very negative dropped), 'none' if it masks nothing, else None (also for masks not
    checked, see the module doc)."""
    if mask is None or not _checkable(mask, lq, lk):
        return None
    key, version = id(mask), mask._version
    entry = _proofs.get(key)
    if entry is not None and entry[0]() is mask and entry[1] == version:
        return entry[2]
    from .passes.match import causal_kind
    kind = causal_kind(mask, lq, lk, True if mask.dtype == torch.bool else None)
    with _lock:
        if len(_proofs) >= _MAX_ENTRIES:
            # drop the dead entries first, then the oldest
            for k in [k for k, e in _proofs.items() if e[0]() is None]:
                del _proofs[k]
            while len(_proofs) >= _MAX_ENTRIES:
                del _proofs[next(iter(_proofs))]
        _proofs[key] = (weakref.ref(mask), version, kind)
    return kind


def clear() -> None:
    with _lock:
        _proofs.clear()
